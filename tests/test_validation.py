"""Bad input raises a clear TypeError/ValueError naming the argument before any kernel runs.

A Buffer is built without its constructor (no GPU here); every check below must fire before the
code could reach the driver, which does not exist on this machine."""
from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from epcomm import envs  # noqa: E402
from epcomm._validate import check_int, check_topk_indices  # noqa: E402
from epcomm.buffer import Buffer, DispatchHandle  # noqa: E402
from epcomm.config import Config  # noqa: E402
from epcomm.errors import BufferStateError  # noqa: E402
from epcomm.kernels import intranode as K_intra  # noqa: E402
from epcomm.kernels.layout import check_layout_args  # noqa: E402


class _NoErr:
    poisoned = None

    def check(self, *a, **k):
        pass


def _fake_buffer(normal=True):
    b = object.__new__(Buffer)
    b.rank, b.num_ranks, b.device_id = 0, 2, 0
    b._destroyed = False
    b._err = _NoErr()
    b._ll = None
    b._dispatch_config = b._combine_config = Config()
    b._intra = None
    if normal:
        class _St:
            layout = K_intra.BufferLayout.for_bytes(2, 64 << 20)
            prof = 0  # EPCOMM_PROFILE off
            host_stamps: dict = {}
        b._intra = _St()
    return b


def test_dispatch_rejects_wrong_dtype_type_and_device():
    b = _fake_buffer()
    with pytest.raises(TypeError, match="x: expected dtype bfloat16"):
        b.dispatch(torch.zeros(4, 128))
    with pytest.raises(TypeError, match="^x: expected"):
        b.dispatch("not a tensor")
    with pytest.raises(ValueError, match="x: expected a CUDA tensor"):
        b.dispatch(torch.zeros(4, 128, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="FP8 input is a pair"):
        b.dispatch((torch.zeros(4, 128, dtype=torch.float8_e4m3fn),))
    with pytest.raises(TypeError, match=r"x\[0\]: expected dtype float8_e4m3fn"):
        b.dispatch((torch.zeros(4, 128, dtype=torch.bfloat16), torch.zeros(4, 1)))


def test_modes_and_handles_are_checked():
    with pytest.raises(BufferStateError, match="num_nvl_bytes > 0"):
        _fake_buffer(normal=False).dispatch(torch.zeros(4, 128, dtype=torch.bfloat16))
    with pytest.raises(BufferStateError, match="low_latency_mode=True"):
        _fake_buffer().low_latency_dispatch(torch.zeros(4, 128, dtype=torch.bfloat16), None, 8, 8)
    with pytest.raises(TypeError, match="handle: expected a DispatchHandle"):
        _fake_buffer().combine(torch.zeros(4, 128, dtype=torch.bfloat16), handle=object())
    b = _fake_buffer()
    b._destroyed = True
    with pytest.raises(BufferStateError, match="destroyed"):
        b.dispatch(torch.zeros(4, 128, dtype=torch.bfloat16))
    assert DispatchHandle.__doc__


def test_integer_arguments_and_layout_arguments():
    assert check_int("n", np.int64(3)) == 3
    with pytest.raises(TypeError, match="n must be an int"):
        check_int("n", 2.5)
    with pytest.raises(ValueError, match="num_sms=1 must be >= 2"):
        check_int("num_sms", 1, lo=2)
    with pytest.raises(ValueError, match="multiple of num_ranks"):
        check_layout_args(16, 10, 4, 8)
    with pytest.raises(ValueError, match="num_ranks_per_node"):
        check_layout_args(16, 96, 12, 8)
    assert check_layout_args(16, 256, 16, 8) == 2
    with pytest.raises(ValueError, match="Config.num_sms"):
        Config(num_sms=1)


def test_expert_index_range_checked_on_host(monkeypatch):
    t = torch.tensor([[0, 5], [-1, 7]])
    check_topk_indices(t, "torch", 8)
    with pytest.raises(ValueError, match=r"topk_idx holds expert index 8, outside \[-1, 8\)"):
        check_topk_indices(torch.tensor([[0, 8]]), "torch", 8)
    with pytest.raises(ValueError, match="index -2"):
        check_topk_indices(torch.tensor([[-2, 1]]), "torch", 8)
    monkeypatch.setenv("EPCOMM_CHECK_INDICES", "0")
    assert envs.CHECK_INDICES.get() is False
    check_topk_indices(torch.tensor([[0, 8]]), "torch", 8)   # disabled: the device check reports it
    check_topk_indices(torch.tensor([[0, 8]]), "torch", 8, capturing=True)


@pytest.mark.parametrize("fw", ["torch", "numpy", "jax"])
def test_repeated_experts_rejected_when_unique_is_asked(fw):
    import numpy as np
    rows = np.array([[0, 5, -1, -1], [3, 1, 2, 0], [4, 6, 4, -1], [7, 2, 7, 7]])
    arr = {"torch": torch.from_numpy, "numpy": lambda a: a}.get(fw)
    if arr is None:
        jnp = pytest.importorskip("jax.numpy")
        arr = jnp.asarray
    check_topk_indices(arr(rows[:2]), fw, 8, unique=True)  # repeated -1 is fine
    check_topk_indices(arr(rows), fw, 8)                    # not asked: range only
    with pytest.raises(ValueError, match="topk_idx row 2 lists the same expert twice"):
        check_topk_indices(arr(rows), fw, 8, unique=True)


def test_buffer_size_hints_cover_the_worst_case():
    need = Buffer.get_nvl_buffer_size_hint(7168, 2, 4096, 8)
    lay = K_intra.BufferLayout.for_bytes(2, need)
    assert lay.capacity_rows(K_intra.max_row_bytes(7168, 8)) >= 4096
    small = K_intra.BufferLayout.for_bytes(2, need // 2)
    assert small.capacity_rows(K_intra.max_row_bytes(7168, 8)) < 4096
    with pytest.raises(ValueError, match="too small"):
        K_intra.BufferLayout.for_bytes(8, 100_000)
    assert Buffer.get_low_latency_rdma_size_hint(128, 7168, 2, 256) < 1908 * 10**6  # DeepEP's hint for this shape


@pytest.mark.parametrize("R,T,H,E", [(1, 128, 7168, 256), (2, 128, 7168, 288), (8, 256, 2048, 64), (64, 1, 128, 64)])
def test_low_latency_heap_regions_are_disjoint_and_flags_come_first(R, T, H, E):
    from epcomm.kernels import low_latency as K_ll
    lay = K_ll.HeapLayout.make(T, H, E, R)
    ctrl = 2 * R * 8
    # Flag words (arrival counters, acks, shape words, combine-weight flags) at offsets that do
    # not depend on T, H or E, so ranks that disagree on those still meet there.
    flags = sorted([lay.disp_flag_off, lay.comb_flag_off, lay.disp_ack_off, lay.comb_ack_off, lay.disp_shape_off,
                    lay.comb_wflag_off])
    assert flags == [i * ctrl for i in range(6)]
    regions = [(lay.disp_region_off, 2 * R * T * lay.msg_bytes), (lay.comb_w_off, 2 * R * T * K_ll.MAX_TOPK * 4),
               (lay.comb_region_off, 2 * T * K_ll.MAX_TOPK * H * 2), (lay.disp_send_off, 2 * T * lay.msg_bytes),
               (lay.comb_send_off, 2 * E * T * H * 2)]
    end = 6 * ctrl
    for off, size in regions:  # in this order, each after the previous one
        assert off >= end and off % 4096 == 0
        end = off + size
    assert lay.total >= end
    # clean() zeroes [0, comb_region_off): every flag, the dispatch messages and the weights.
    assert lay.comb_w_off + 2 * R * T * K_ll.MAX_TOPK * 4 <= lay.comb_region_off
    # the combine send's dynamic shared memory: group masks and prefixes, then one entry per token
    assert K_ll.combine_smem_bytes(R, T) >= 8 * R * ((T + 31) // 32) + 4 * R * T


def test_envs_parse_and_document():
    from epcomm import envs as e
    table = e.table_markdown()
    from pathlib import Path
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    for k in e.KNOBS:
        assert f"`{k}`" in table
        assert f"`{k}`" in readme, f"README's configuration table lacks {k}"
    import os
    os.environ["EPCOMM_TIMEOUT_S"] = "abc"
    try:
        with pytest.raises(ValueError, match="EPCOMM_TIMEOUT_S"):
            e.TIMEOUT_S.get()
    finally:
        del os.environ["EPCOMM_TIMEOUT_S"]
    assert e.TIMEOUT_S.get() == 100.0


def test_memoised_knob_follows_changes_of_the_variable(monkeypatch):
    from epcomm import envs as e
    monkeypatch.setenv("EPCOMM_CHECK_INDICES", "0")
    assert e.CHECK_INDICES.get_memo() is False
    assert e.CHECK_INDICES.get_memo() is False
    monkeypatch.setenv("EPCOMM_CHECK_INDICES", "yes")
    assert e.CHECK_INDICES.get_memo() is True
    monkeypatch.delenv("EPCOMM_CHECK_INDICES")
    assert e.CHECK_INDICES.get_memo() is True  # the default
    monkeypatch.setenv("EPCOMM_CHECK_INDICES", "maybe")
    with pytest.raises(ValueError, match="EPCOMM_CHECK_INDICES"):
        e.CHECK_INDICES.get_memo()
