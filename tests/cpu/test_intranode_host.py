"""CPU tests of the normal mode's host side: buffer layout, default configs, the constants shared
with the CUDA source and the sizing of speculative dispatch outputs."""
import re
from pathlib import Path

import pytest

from epcomm.config import default_combine_config, default_dispatch_config
from epcomm.kernels import intranode as K
from epcomm.normal.state import NvlinkState

SRC = Path(__file__).resolve().parents[2] / "cuda_src" / "intranode.cuh"


@pytest.mark.parametrize("ranks", [2, 4, 8, 72])
def test_layout_header_and_flags_do_not_overlap_staging(ranks):
    hint = K.nvl_buffer_size_hint(7168, ranks, 4096, 8)
    lay = K.BufferLayout.for_bytes(ranks, hint)
    assert lay.staging_off == K.BufferLayout.header_bytes(ranks)
    # Every (source, chunk) has one flag per sending warp, all inside the header.
    assert lay.flags_off + ranks * K.MAX_CHUNKS * K.CHUNK_FLAG_SLOTS * 8 <= lay.staging_off
    assert lay.flags_off % 64 == 0 and lay.staging_off % 4096 == 0
    assert lay.capacity_rows(K.max_row_bytes(7168, 8)) >= 4096


def test_constants_shared_with_the_cuda_source():
    src = SRC.read_text()
    assert K.CHUNK_FLAG_SLOTS == K.THREADS // 32
    assert re.search(r"constexpr int kChunkFlagSlots = kIntraThreads / 32;", src)
    assert re.search(rf"constexpr int kIntraThreads = {K.THREADS};", src)
    assert re.search(rf"constexpr int kProfMaxBlocks = {K.PROF_MAX_BLOCKS};", src)
    assert re.search(rf"constexpr int kProfSlots = {K.PROF_SLOTS};", src)


@pytest.mark.parametrize("ranks", [2, 3, 4, 8, 72])
def test_dispatch_chunks_cover_every_row_once_and_fit_the_flags(ranks):
    src = SRC.read_text()
    assert "kTailChunks" in src and "struct ChunkPlan" in src
    for cfg_rows in (1, 32, 64, 128):
        for capacity in (1, 7, 100, 4096, 8192, 65536, 10**6):
            cr = K.dispatch_chunk_rows(cfg_rows, capacity, ranks)
            assert cr >= cfg_rows
            # the fullest region (every staged row from one source) fits in MAX_CHUNKS flags
            assert len(K.dispatch_chunk_ranges(capacity, cr, ranks)) <= K.MAX_CHUNKS
            for rows in {0, 1, 5, cr, 4 * cr + 3, capacity}:
                ranges = K.dispatch_chunk_ranges(rows, cr, ranks)
                assert [r for b, e in ranges for r in range(b, e)] == list(range(rows))
                assert all(e > b for b, e in ranges)
                small = [e - b for b, e in ranges][-K.dispatch_tail_chunks(ranks):]
                assert all(n <= max(cr // 4, 1) for n in small) or rows == 0


def test_default_sm_split_per_rank_count():
    assert default_dispatch_config(2).split() == (8, 16)
    assert default_combine_config(2).split() == (8, 16)
    assert default_dispatch_config(4).split() == (12, 12)
    assert default_dispatch_config(8).with_sms(12).split() == (6, 6)


def _spec_rows(st, key):
    """NvlinkState's speculation rule, on a stand-in holding only what it reads."""
    return NvlinkState.speculative_rows(st, key)


class _SpecSt:
    def __init__(self, speculation, hist=None):
        self.speculation = speculation
        self.recv_history = {} if hist is None else {(4096, 256): hist}


def test_speculative_rows_cover_the_largest_recent_receive_with_slack():
    assert _spec_rows(_SpecSt(0.0625), (4096, 256)) == 0  # shape never seen: no guess
    rows = _spec_rows(_SpecSt(0.0625, [8000, 8150, 7990]), (4096, 256))
    assert rows % 64 == 0 and rows >= 8150 * 1.0625 and rows < 8150 * 1.0625 + 65
    assert _spec_rows(_SpecSt(0.0625, [0]), (4096, 256)) == 64  # never below one tile
    assert _spec_rows(_SpecSt(-1.0, [8000]), (4096, 256)) == 0  # knob negative: off
    assert _spec_rows(_SpecSt(0.0625, [8000]), (128, 256)) == 0  # another shape


def test_remembered_rows_keep_the_last_four_receives_of_a_shape():
    st = _SpecSt(0.0625)
    for rows in (100, 9000, 200, 300, 400):
        NvlinkState.remember_rows(st, (4096, 256), rows)
    assert st.recv_history[(4096, 256)] == [9000, 200, 300, 400]
    assert _spec_rows(st, (4096, 256)) >= 9000 * 1.0625  # the largest of the four
