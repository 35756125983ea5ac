"""CPU tests of the normal mode's host side: buffer layout, default configs, the mirrors of the
host-shared structs and the host half of the early-receive handshake (epcomm::LateOutputs)."""
import ctypes
import re
from pathlib import Path

import pytest

from epcomm.buffer import Buffer
from epcomm.config import default_combine_config, default_dispatch_config
from epcomm.kernels import intranode as K

SRC = Path(__file__).resolve().parents[1] / "cuda_src" / "intranode.cuh"


@pytest.mark.parametrize("ranks", [2, 4, 8, 72])
def test_layout_header_and_flags_do_not_overlap_staging(ranks):
    hint = K.nvl_buffer_size_hint(7168, ranks, 4096, 8)
    lay = K.BufferLayout.for_bytes(ranks, hint)
    assert lay.staging_off == K.BufferLayout.header_bytes(ranks)
    # Every (source, chunk) has one flag per sending warp, all inside the header.
    assert lay.flags_off + ranks * K.MAX_CHUNKS * K.CHUNK_FLAG_SLOTS * 8 <= lay.staging_off
    assert lay.flags_off % 64 == 0 and lay.staging_off % 4096 == 0
    assert lay.capacity_rows(K.max_row_bytes(7168, 8)) >= 4096


def test_host_shared_struct_mirrors_match_the_cuda_source():
    src = SRC.read_text()
    m = re.search(r"static_assert\(sizeof\(LateOutputs\) == (\d+)", src)
    assert m, "intranode.cuh lost its LateOutputs size assert"
    assert ctypes.sizeof(K.LateOutputs) == int(m.group(1))
    assert K.CHUNK_FLAG_SLOTS == K.THREADS // 32
    assert re.search(r"constexpr int kChunkFlagSlots = kIntraThreads / 32;", src)
    assert re.search(rf"constexpr int kIntraThreads = {K.THREADS};", src)


def test_default_sm_split_per_rank_count():
    assert default_dispatch_config(2).split() == (8, 16)
    assert default_combine_config(2).split() == (8, 16)
    assert default_dispatch_config(4).split() == (12, 12)
    assert default_dispatch_config(8).with_sms(12).split() == (6, 6)


class _St:
    def __init__(self, seq):
        self.late = K.LateOutputs()
        self.late_seq = seq


class _P:
    recv_x, recv_scales, recv_topk_idx, recv_topk_weights, recv_src_idx = 0x1000, 0, 0x2000, 0x3000, 0x4000
    rscale_st, rscale_sg, out_rows = 0, 0, 77


def _buf():
    b = object.__new__(Buffer)
    b.rank, b.timeout_s = 0, 0.2
    return b


def test_late_outputs_publish_when_the_kernel_is_still_waiting():
    st = _St(5)
    assert _buf()._publish_late(st.late, st.late_seq, _P()) is True
    lo = st.late
    assert (lo.seq, lo.recv_x, lo.recv_topk_idx, lo.recv_src_idx, lo.out_rows) == (5, 0x1000, 0x2000, 0x4000, 77)


def test_late_outputs_kernel_gave_up_and_left_or_stayed():
    st = _St(6)
    st.late.gave_up, st.late.decided = 6, 6 * 2  # stood down: the host must relaunch
    assert _buf()._publish_late(st.late, st.late_seq, _P()) is False
    st = _St(7)
    st.late.gave_up, st.late.decided = 7, 7 * 2 + 1  # gave up but then saw seq: it goes on
    assert _buf()._publish_late(st.late, st.late_seq, _P()) is True
    st = _St(8)
    st.late.gave_up, st.late.decided = 7, 7 * 2  # an older call's words: not this call's
    assert _buf()._publish_late(st.late, st.late_seq, _P()) is True


def test_late_outputs_missing_verdict_times_out():
    from epcomm.errors import EpcommTimeoutError
    st = _St(9)
    st.late.gave_up = 9  # gave up, verdict never written
    with pytest.raises(EpcommTimeoutError, match="did not report"):
        _buf()._publish_late(st.late, st.late_seq, _P())


class _SpecSt:
    def __init__(self, speculation, hist=None):
        self.speculation = speculation
        self.recv_history = {} if hist is None else {(4096, 256): hist}


def test_speculative_rows_cover_the_largest_recent_receive_with_slack():
    b = _buf()
    assert b._speculative_rows(_SpecSt(0.0625), (4096, 256)) == 0  # shape never seen: no guess
    rows = b._speculative_rows(_SpecSt(0.0625, [8000, 8150, 7990]), (4096, 256))
    assert rows % 64 == 0 and rows >= 8150 * 1.0625 and rows < 8150 * 1.0625 + 65
    assert b._speculative_rows(_SpecSt(0.0625, [0]), (4096, 256)) == 64  # never below one tile
    assert b._speculative_rows(_SpecSt(-1.0, [8000]), (4096, 256)) == 0  # knob negative: off
    assert b._speculative_rows(_SpecSt(0.0625, [8000]), (128, 256)) == 0  # another shape

