"""Bad input raises a clear TypeError/ValueError naming the argument before any kernel runs.

A Buffer is built without its constructor (no GPU here); every check below must fire before the
code could reach the driver, which does not exist on this machine."""
from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from epcomm import envs  # noqa: E402
from epcomm.interop.indices import check_topk_indices  # noqa: E402
from epcomm.validate import check_int  # noqa: E402
from epcomm.buffer import Buffer, DispatchHandle  # noqa: E402
from epcomm.config import Config  # noqa: E402
from epcomm.errors import BufferStateError  # noqa: E402
from epcomm.kernels import intranode as K_intra  # noqa: E402
from epcomm.kernels.layout import check_layout_args  # noqa: E402
from fake_rig import FakeRuntime  # noqa: E402
from fake_runtime import fake_buffer, fake_context  # noqa: E402


def test_dispatch_rejects_wrong_dtype_type_and_device():
    b = fake_buffer()
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
        fake_buffer(normal=False).dispatch(torch.zeros(4, 128, dtype=torch.bfloat16))
    with pytest.raises(BufferStateError, match="low_latency_mode=True"):
        fake_buffer().low_latency_dispatch(torch.zeros(4, 128, dtype=torch.bfloat16), None, 8, 8)
    with pytest.raises(TypeError, match="handle: expected a DispatchHandle"):
        fake_buffer().combine(torch.zeros(4, 128, dtype=torch.bfloat16), handle=object())
    b = fake_buffer()
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
    # The last place a message header may sit (what a clean zeroes up to).
    assert lay.disp_send_end == lay.disp_send_off + 2 * T * lay.msg_bytes
    # The LogFMT combine's group words come last, so they move no other region: those of the
    # arriving rows [2][T][32][H/128], then their put-path staging [2][E*T][H/128] (u64 each).
    G = H // 128
    for off, size in ((lay.lf_meta_off, 2 * T * K_ll.MAX_TOPK * G * 8), (lay.lf_stage_off, 2 * E * T * G * 8)):
        assert off >= end and off % 4096 == 0
        end = off + size
    assert lay.lf_total >= end and lay.lf_total % 4096 == 0
    # clean() zeroes [0, comb_region_off): every flag, the dispatch messages and the weights.
    assert lay.comb_w_off + 2 * R * T * K_ll.MAX_TOPK * 4 <= lay.comb_region_off
    # the combine send's dynamic shared memory: group masks and prefixes, then one entry per token
    assert K_ll.combine_smem_bytes(R, T) >= 8 * R * ((T + 31) // 32) + 4 * R * T


def test_envs_parse_and_document():
    from epcomm import envs as e
    table = e.table_markdown()
    from pathlib import Path
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    for k in e.KNOBS:
        assert f"`{k}`" in table
        assert f"`{k}`" in readme, f"README's configuration table lacks {k}"
    assert table in readme, "README's configuration table differs from `python -m epcomm.envs`"
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


# ---- normal mode through the whole call: driver calls recorded instead of made ----------------
# The fake runtime of tests/helpers/fake_rig.py: CPU tensors stand in for CUDA ones and every
# call that would reach the driver is recorded.  "Nothing launched" means the error came first.

@pytest.fixture
def rig(monkeypatch):
    return FakeRuntime(monkeypatch)


_BF = torch.bfloat16
_IDX = torch.tensor([[0, 1], [1, 2], [2, 3], [3, -1]])


def _dispatch(b, **kw):
    kw.setdefault("topk_idx", _IDX)
    kw.setdefault("num_experts", 4)
    return b.dispatch(torch.zeros(4, 128, dtype=_BF), **kw)


def test_combine_topk_weights_must_have_the_dispatch_topk_width(rig):
    b = rig.normal_buffer()
    h = _dispatch(b, topk_weights=torch.ones(4, 2))[4]
    x = torch.zeros(h.out_rows, 128, dtype=_BF)
    rig.kernels.clear()
    # Wider rows than the dispatch checked the capacity for could overrun a peer's region.
    with pytest.raises(ValueError, match=r"topk_weights: has 3 columns .* handle.num_topk=2"):
        b.combine(x, h, topk_weights=torch.zeros(h.out_rows, 3))
    with pytest.raises(ValueError, match="has 1 columns"):
        b.combine(x, h, topk_weights=torch.zeros(h.out_rows, 1))
    # A dispatch without top-k (num_worst_tokens: no counts known to check against) takes none.
    hw = b.dispatch(torch.zeros(4, 128, dtype=_BF), is_token_in_rank=torch.ones(4, 2, dtype=torch.bool),
                    num_worst_tokens=8)[4]
    assert hw.recv_counts is None and hw.num_topk == 0
    rig.kernels.clear()
    with pytest.raises(ValueError, match=r"dispatch had no top-k \(handle.num_topk=0\)"):
        b.combine(torch.zeros(8, 128, dtype=_BF), hw, topk_weights=torch.zeros(8, 64))
    assert rig.launched() == []
    out, w, _ = b.combine(x, h, topk_weights=torch.zeros(h.out_rows, 2))
    assert tuple(w.shape) == (4, 2) and rig.launched() == ["combine"]


def test_config_fields_are_typed_bounded_and_stored_as_python_numbers():
    c = Config(num_sms=np.int64(24), chunk_rows=np.int32(64), send_fraction=np.float32(0.5))
    assert type(c.num_sms) is int and type(c.chunk_rows) is int and type(c.send_fraction) is float
    assert c.split() == (12, 12)
    with pytest.raises(TypeError, match="Config.num_sms must be an int"):
        Config(num_sms=24.0)
    with pytest.raises(TypeError, match="Config.num_sms must be an int"):
        Config(num_sms="24")
    with pytest.raises(TypeError, match="Config.chunk_rows must be an int"):
        Config(chunk_rows=100.5)
    with pytest.raises(TypeError, match="Config.send_fraction must be a real number"):
        Config(send_fraction="0.5")
    with pytest.raises(ValueError, match="Config.send_fraction=nan"):
        Config(send_fraction=float("nan"))
    Config(chunk_rows=K_intra.MAX_CHUNK_ROWS)
    with pytest.raises(ValueError, match=f"Config.chunk_rows={K_intra.MAX_CHUNK_ROWS + 1} must be <="):
        Config(chunk_rows=K_intra.MAX_CHUNK_ROWS + 1)  # an int32 field, with int32 arithmetic on it
    with pytest.raises(ValueError, match="Config.chunk_rows=2147483648"):
        Config(chunk_rows=2**31)


def test_set_num_sms_stores_an_int_within_the_device(rig):
    b = rig.normal_buffer()
    b.set_num_sms(np.int64(20))
    assert type(b.get_dispatch_config().num_sms) is int and b.get_combine_config().num_sms == 20
    with pytest.raises(ValueError, match="num_sms=133 must be <= 132"):
        b.set_num_sms(133)
    assert b.get_dispatch_config().num_sms == 20  # unchanged
    _dispatch(b)
    assert rig.launched() == ["layout", "notify", "send", "recv"]


def test_config_argument_is_checked_at_call_time(rig):
    b = rig.normal_buffer()
    h = _dispatch(b)[4]
    x = torch.zeros(h.out_rows, 128, dtype=_BF)
    rig.kernels.clear()
    with pytest.raises(TypeError, match="config: expected an epcomm.Config or None, got int"):
        _dispatch(b, config=24)
    with pytest.raises(TypeError, match="config: expected an epcomm.Config"):
        b.combine(x, h, config={"num_sms": 24})
    with pytest.raises(ValueError, match="dispatch: config.num_sms=200 exceeds the 132 SMs"):
        _dispatch(b, config=Config(num_sms=200))
    with pytest.raises(ValueError, match="combine: config.num_sms=200 exceeds the 132 SMs"):
        b.combine(x, h, config=Config(num_sms=200))
    assert rig.launched() == []
    b.combine(x, h, config=Config(num_sms=132))
    assert rig.kernels[-1][:2] == ("combine", 132)


def test_destroyed_buffer_says_so_before_anything_else():
    b = fake_buffer()
    b._destroyed, b._intra = True, None  # what destroy() leaves
    with pytest.raises(BufferStateError, match="dispatch: the Buffer was destroyed"):
        b.dispatch(torch.zeros(4, 128, dtype=torch.bfloat16))
    with pytest.raises(BufferStateError, match="combine: the Buffer was destroyed"):
        b.combine(torch.zeros(4, 128, dtype=torch.bfloat16), handle=object())
    with pytest.raises(BufferStateError, match="get_dispatch_layout: the Buffer was destroyed"):
        b.get_dispatch_layout(torch.zeros(4, 2, dtype=torch.long), 4)


def test_every_array_of_a_call_is_in_the_framework_of_x(rig):
    b = rig.normal_buffer()
    itr, nte = torch.ones(4, 2, dtype=torch.bool), torch.zeros(4, dtype=torch.int32)
    cases = {"topk_idx": dict(topk_idx=_IDX.numpy()),
             "topk_weights": dict(topk_weights=np.ones((4, 2), np.float32)),
             "is_token_in_rank": dict(is_token_in_rank=itr.numpy(), num_tokens_per_expert=nte),
             "num_tokens_per_expert": dict(is_token_in_rank=itr, num_tokens_per_expert=nte.numpy()),
             "num_tokens_per_rank": dict(num_tokens_per_rank=np.zeros(2, np.int32))}
    for name, kw in cases.items():
        with pytest.raises(TypeError, match=f"{name}: is a numpy array but x is a torch one"):
            _dispatch(b, **kw)
    with pytest.raises(TypeError, match=r"x\[1\]: is a numpy array but x is a torch one"):
        b.dispatch((torch.zeros(4, 128, dtype=torch.float8_e4m3fn), np.ones((4, 1), np.float32)),
                   topk_idx=_IDX, num_experts=4)
    h = _dispatch(b, topk_weights=torch.ones(4, 2))[4]
    x = torch.zeros(h.out_rows, 128, dtype=_BF)
    rig.kernels.clear()
    with pytest.raises(TypeError, match="topk_weights: is a numpy array"):
        b.combine(x, h, topk_weights=np.zeros((h.out_rows, 2), np.float32))
    with pytest.raises(TypeError, match=r"bias\[0\]: is a numpy array"):
        b.combine(x, h, bias=np.zeros((4, 128), np.float32))
    assert rig.launched() == []


def test_previous_event_must_be_an_event(rig):
    b = rig.normal_buffer()
    h = _dispatch(b)[4]
    rig.kernels.clear()
    for call in (lambda: b.get_dispatch_layout(_IDX, 4, previous_event="x"),
                 lambda: _dispatch(b, previous_event="x"),
                 lambda: b.combine(torch.zeros(h.out_rows, 128, dtype=_BF), h, previous_event=object())):
        with pytest.raises(TypeError, match="previous_event: expected an EventOverlap"):
            call()
    assert rig.launched() == []


def test_layout_shared_memory_is_bounded(rig):
    from epcomm.kernels.layout import LAYOUT_MAX_COUNTERS
    assert LAYOUT_MAX_COUNTERS == 12288
    check_layout_args(4, 16 * 767, 16, 16)  # 12272 experts + 16 ranks: fits
    with pytest.raises(ValueError, match="12304 experts, ranks and nodes in shared memory, at most 12288"):
        check_layout_args(4, 16 * 768, 16, 16)
    b = rig.normal_buffer(R=16)
    idx = torch.zeros(4, 2, dtype=torch.long)
    with pytest.raises(ValueError, match="at most 12288"):
        b.get_dispatch_layout(idx, 16 * 768)
    with pytest.raises(ValueError, match="at most 12288"):  # dispatch would run the layout kernel itself
        b.dispatch(torch.zeros(4, 128, dtype=_BF), topk_idx=idx, num_experts=16 * 768)
    assert rig.launched() == []
    # Both arrays given: no layout kernel, so no such limit.
    b.dispatch(torch.zeros(4, 128, dtype=_BF), topk_idx=idx, num_experts=16 * 768,
               is_token_in_rank=torch.ones(4, 16, dtype=torch.bool),
               num_tokens_per_expert=torch.zeros(16 * 768, dtype=torch.int32))
    assert rig.launched() == ["notify", "send", "recv"]


@pytest.mark.parametrize("R", [12, 16, 72])
def test_buffer_layout_accepts_every_rank_count_of_dispatch(rig, R):
    b = rig.normal_buffer(R=R)
    ntr, nrdma, nte, itr, _ = b.get_dispatch_layout(torch.zeros(4, 2, dtype=torch.long), 2 * R)
    assert nrdma is None  # one NVLink domain
    assert tuple(ntr.shape) == (R,) and tuple(nte.shape) == (2 * R,) and tuple(itr.shape) == (4, R)
    assert rig.launched() == ["layout"]
    _dispatch(b, topk_idx=torch.zeros(4, 2, dtype=torch.long), num_experts=2 * R, num_tokens_per_rank=ntr,
              num_tokens_per_rdma_rank=nrdma, is_token_in_rank=itr, num_tokens_per_expert=nte)


def test_expert_alignment_is_bounded(rig):
    b = rig.normal_buffer()
    with pytest.raises(ValueError, match="expert_alignment=2147483648 must be <= 1048576"):
        _dispatch(b, expert_alignment=2**31)  # would wrap in the kernel's 32-bit field
    with pytest.raises(TypeError, match="expert_alignment must be an int"):
        _dispatch(b, expert_alignment=4.0)
    assert rig.launched() == []
    _dispatch(b, expert_alignment=np.int64(K_intra.MAX_EXPERT_ALIGNMENT))
    assert rig.kernels[-1][2]["expert_alignment"] == K_intra.MAX_EXPERT_ALIGNMENT


def test_layout_counts_are_checked_when_given_and_cached_dispatch_takes_no_routing(rig):
    b = rig.normal_buffer()
    with pytest.raises(TypeError, match="num_tokens_per_rank: expected a"):
        _dispatch(b, num_tokens_per_rank="garbage")
    with pytest.raises(TypeError, match="num_tokens_per_rank: expected dtype int32"):
        _dispatch(b, num_tokens_per_rank=torch.zeros(2))
    with pytest.raises(ValueError, match=r"num_tokens_per_rank: expected shape \(2,\)"):
        _dispatch(b, num_tokens_per_rank=torch.zeros(7, dtype=torch.int32))
    with pytest.raises(TypeError, match="num_tokens_per_rdma_rank: expected a"):
        _dispatch(b, num_tokens_per_rdma_rank="garbage")
    with pytest.raises(ValueError, match="num_tokens_per_rdma_rank: has 3 entries"):
        _dispatch(b, num_tokens_per_rdma_rank=torch.zeros(3, dtype=torch.int32))
    assert rig.launched() == []
    h = _dispatch(b, num_tokens_per_rank=torch.zeros(2, dtype=torch.int32),
                  num_tokens_per_rdma_rank=torch.zeros(1, dtype=torch.int32))[4]
    rig.kernels.clear()
    x = torch.zeros(4, 128, dtype=_BF)
    for kw in (dict(num_tokens_per_expert=torch.zeros(4, dtype=torch.int32)), dict(num_experts=4),
               dict(num_tokens_per_rdma_rank=torch.zeros(1, dtype=torch.int32))):
        with pytest.raises(ValueError, match=f"{next(iter(kw))}: must be None for a cached dispatch"):
            b.dispatch(x, handle=h, **kw)
    with pytest.raises(ValueError, match="expert_alignment=4: a cached dispatch"):
        b.dispatch(x, handle=h, expert_alignment=4)
    assert rig.launched() == []
    b.dispatch(x, handle=h)
    assert rig.launched() == ["notify", "send", "recv"]


def test_nvl_buffer_size_hint_checks_its_arguments():
    assert Buffer.get_nvl_buffer_size_hint(np.int64(7168), 2, 4096) == Buffer.get_nvl_buffer_size_hint(7168, 2, 4096)
    for args, exc, msg in (((7168, 2, -5), ValueError, "num_max_tokens_per_rank=-5 must be >= 1"),
                           ((7168, 2, 0), ValueError, "num_max_tokens_per_rank=0"),
                           ((0, 2, 4096), ValueError, "hidden=0 must be >= 8"),
                           ((100, 2, 10), ValueError, "hidden=100 must be a multiple of 8"),
                           ((7168.0, 2, 4096), TypeError, "hidden must be an int"),
                           ((7168, 1, 4096), ValueError, "num_ranks=1 must be >= 2"),
                           ((7168, 100, 4096), ValueError, "num_ranks=100 must be <= 72"),
                           ((7168, 2, 4096, -8), ValueError, "num_topk=-8 must be >= 0"),
                           ((7168, 2, 4096, 8.0), TypeError, "num_topk must be an int")):
        with pytest.raises(exc, match=msg):
            Buffer.get_nvl_buffer_size_hint(*args)


def test_handles_belong_to_their_buffer_by_serial_not_address(rig):
    b1, b2 = rig.normal_buffer(), rig.normal_buffer()
    assert b1._serial != b2._serial
    h = _dispatch(b1)[4]
    assert h.buffer_id == b1._serial
    with pytest.raises(ValueError, match="handle: was made by another Buffer"):
        b2.combine(torch.zeros(h.out_rows, 128, dtype=_BF), h)
    # id() of a collected Buffer can be that of a new one: a handle must not pass for its own.
    h.buffer_id = id(b2)
    rig.kernels.clear()
    with pytest.raises(ValueError, match="handle: was made by another Buffer"):
        b2.combine(torch.zeros(h.out_rows, 128, dtype=_BF), h)
    with pytest.raises(ValueError, match="handle: was made by another Buffer"):
        b2.dispatch(torch.zeros(4, 128, dtype=_BF), handle=h)
    assert rig.launched() == []


def test_numpy_num_experts_and_half_empty_bias_pairs(rig):
    b = rig.normal_buffer()
    ntr, _, nte, _, _ = b.get_dispatch_layout(_IDX, np.int64(4))
    assert tuple(nte.shape) == (4,)
    h = _dispatch(b)[4]
    x = torch.zeros(h.out_rows, 128, dtype=_BF)
    bias = torch.zeros(4, 128, dtype=_BF)
    for pair in ((bias, None), (None, bias), (None, None)):
        b.combine(x, h, bias=pair)
    with pytest.raises(TypeError, match=r"bias\[1\]: expected dtype bfloat16"):
        b.combine(x, h, bias=(None, torch.zeros(4, 128)))


def test_outputs_allocated_on_the_comm_stream_record_the_callers_stream(rig, monkeypatch):
    b = rig.normal_buffer()
    caller = object()
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: caller)

    class _Out:
        def __init__(self):
            self.streams = []

        def record_stream(self, s):
            self.streams.append(s)

    outs = [_Out(), None, _Out()]
    b.ctx.alloc_on_comm = True
    b.ctx.finish("torch", 0, False, outs, [])
    assert outs[0].streams == [caller] and outs[2].streams == [caller]
    b.ctx.alloc_on_comm = False  # allocated on the caller's stream: nothing to record
    plain = _Out()
    b.ctx.finish("torch", 0, False, [plain], [])
    assert plain.streams == []


# ---- found by mutation testing: each fails if the check it names is removed or loosened ----


def test_check_int_and_check_bool_refuse_bools_and_other_ints():
    from epcomm.validate import check_bool
    with pytest.raises(TypeError, match="n must be an int"):
        check_int("n", True)
    with pytest.raises(TypeError, match="n must be an int"):
        check_int("n", np.bool_(True))
    assert check_int("n", 5, lo=1, hi=5) == 5
    assert check_bool("f", 1) is True and check_bool("f", np.bool_(False)) is False
    for v in (2, -1, "yes", 1.0):
        with pytest.raises(TypeError, match="f must be a bool"):
            check_bool("f", v)


def test_dispatch_hidden_and_local_expert_limits(rig):
    b = rig.normal_buffer()
    with pytest.raises(ValueError, match="hidden size 100 must be a multiple of 8"):
        b.dispatch(torch.zeros(4, 100, dtype=_BF), topk_idx=_IDX, num_experts=4)
    M = K_intra.MAX_LOCAL_EXPERTS
    with pytest.raises(ValueError, match=f"{M + 1} experts per rank: at most {M}"):
        _dispatch(b, num_experts=2 * (M + 1))
    assert rig.launched() == []
    _dispatch(b, num_experts=2 * M)


def test_cached_dispatch_checks_the_token_count_and_combine_the_bias_count(rig):
    b = rig.normal_buffer()
    h = _dispatch(b)[4]
    rig.kernels.clear()
    with pytest.raises(ValueError, match="x: has 3 tokens but the handle's dispatch had 4"):
        b.dispatch(torch.zeros(3, 128, dtype=_BF), handle=h)
    x = torch.zeros(h.out_rows, 128, dtype=_BF)
    bias = torch.zeros(4, 128, dtype=_BF)
    with pytest.raises(ValueError, match="bias: at most two tensors, got 3"):
        b.combine(x, h, bias=(bias, bias, bias))
    assert rig.launched() == []


def test_num_tokens_per_expert_must_have_num_experts_entries(rig):
    b = rig.normal_buffer()
    with pytest.raises(ValueError, match="num_tokens_per_expert: has 6 entries, expected num_experts=4"):
        _dispatch(b, num_tokens_per_expert=torch.zeros(6, dtype=torch.int32))
    assert rig.launched() == []


def test_dispatch_refuses_one_token_more_than_the_buffer_holds(rig):
    b = rig.normal_buffer()
    b._intra.layout = lay = K_intra.BufferLayout.for_bytes(2, K_intra.BufferLayout.header_bytes(2) + 2 * 4096)
    cap = lay.capacity_rows(K_intra.max_row_bytes(128, 2))
    idx = torch.zeros(cap + 1, 2, dtype=torch.long)
    idx[:, 1] = 1
    with pytest.raises(ValueError, match=f"Buffer too small: {cap + 1} tokens"):
        b.dispatch(torch.zeros(cap + 1, 128, dtype=_BF), topk_idx=idx, num_experts=4)
    assert rig.launched() == []
    b.dispatch(torch.zeros(cap, 128, dtype=_BF), topk_idx=idx[:cap], num_experts=4)


def test_layout_shared_memory_bound_is_exact():
    from epcomm.kernels.layout import LAYOUT_MAX_COUNTERS
    check_layout_args(4, LAYOUT_MAX_COUNTERS - 1, 1, 1)
    with pytest.raises(ValueError, match=f"{LAYOUT_MAX_COUNTERS + 1} experts, ranks and nodes"):
        check_layout_args(4, LAYOUT_MAX_COUNTERS, 1, 1)


@pytest.mark.parametrize("H", [128, 2880, 4096, 7168])
@pytest.mark.parametrize("K", [0, 1, 8, 32])
def test_nvl_size_hint_holds_the_largest_row_of_every_operation(H, K):
    need = Buffer.get_nvl_buffer_size_hint(H, 4, 1000, K)
    lay = K_intra.BufferLayout.for_bytes(4, need)
    rows = [K_intra.dispatch_row_bytes(H, False, K), K_intra.combine_row_bytes(H, K)]
    if H % 128 == 0:
        rows.append(K_intra.dispatch_row_bytes(H, True, K))
    assert all(lay.capacity_rows(r) >= 1000 for r in rows)


def test_intranode_specs_reject_one_rank():
    for spec in (K_intra.IntranodeDispatchSpec(1, 7168, False), K_intra.IntranodeCombineSpec(1, 7168)):
        with pytest.raises(ValueError, match="num_ranks=1"):
            spec.validate()
    K_intra.IntranodeDispatchSpec(2, 7168, False).validate()


def test_dispatch_tail_chunks_equals_the_cuda_expression():
    from pathlib import Path
    src = (Path(__file__).resolve().parents[2] / "cuda_src" / "intranode.cuh").read_text()
    assert "constexpr int kTailChunks = (16 + R - 2) / (R - 1) > 2 ? (16 + R - 2) / (R - 1) : 2;" in src
    for R in range(2, K_intra.MAX_RANKS + 1):
        c = (16 + R - 2) // (R - 1)  # C integer division of positive ints
        assert K_intra.dispatch_tail_chunks(R) == (c if c > 2 else 2), R


def test_config_split_keeps_a_receiving_block_and_defaults_per_op():
    from epcomm.config import default_combine_config, default_dispatch_config
    assert Config(num_sms=2, send_fraction=0.9).split() == (1, 1)
    assert Config(num_sms=10, send_fraction=0.01).split() == (1, 9)
    with pytest.raises(ValueError, match="Config.send_fraction=0.0"):
        Config(send_fraction=0.0)
    with pytest.raises(ValueError, match="Config.send_fraction=1.0"):
        Config(send_fraction=1.0)
    assert default_dispatch_config(4).chunk_rows == 128 and default_combine_config(4).chunk_rows == 64


def test_envs_parse_every_spelling(monkeypatch, tmp_path):
    from epcomm import envs as e
    for raw, want in (("1", True), ("true", True), ("YES", True), (" on ", True), ("0", False),
                      ("false", False), ("No", False), ("off\n", False), ("", False)):
        monkeypatch.setenv("EPCOMM_CHECK_INDICES", raw)
        assert e.CHECK_INDICES.get() is want, raw
    monkeypatch.setenv("EPCOMM_NUM_SMS", "0x10")
    assert e.NUM_SMS.get() == 16
    monkeypatch.setenv("EPCOMM_NUM_SMS", "")
    assert e.NUM_SMS.get() == 24  # empty: the default, for every knob that is not a flag
    monkeypatch.setenv("EPCOMM_NUM_SMS", "2.5")
    with pytest.raises(ValueError, match="EPCOMM_NUM_SMS"):
        e.NUM_SMS.get()
    monkeypatch.delenv("EPCOMM_CACHE_DIR", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/dir")
    assert e.CACHE_DIR.get() == tmp_path / ".cache" / "epcomm"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert e.CACHE_DIR.get() == tmp_path / "xdg" / "epcomm"
    monkeypatch.setenv("EPCOMM_CACHE_DIR", "~/jit")
    assert e.CACHE_DIR.get() == tmp_path / "jit"


def test_fp8_column_major_scales_take_the_speculative_receive_and_come_back_with_leading_dimension_m(rig):
    # The first dispatch of a shape receives into exact outputs; the next ones into outputs
    # allocated before the counts (speculative).  With column-major scales the receive then
    # writes [G, spec_rows], and the host packs the M valid columns into a fresh [G, M] array
    # (kernel "compact_scales", after the receive): the caller sees strides (1, M) either way.
    b = rig.normal_buffer(recv_per_rank=4)  # 8 rows arrive (4 from each rank)
    b._intra.speculation = 0.0625
    fp8 = torch.float8_e4m3fn
    for scales, want_strides in (("col", (1, 8)), ("row", (2, 1))):
        b._intra.recv_history.clear()
        s = torch.ones(2, 4).T if scales == "col" else torch.ones(4, 2)
        for call in range(3):
            rig.kernels.clear()
            (rq, rs), *_ = b.dispatch((torch.zeros(4, 256, dtype=fp8), s), topk_idx=_IDX, num_experts=4)
            assert tuple(rq.shape) == (8, 256) and tuple(rs.shape) == (8, 2), (scales, call)
            assert rs.stride() == want_strides, (scales, call, rs.stride())
            recv = [e for e in rig.kernels if e[0] == "recv"]
            assert len(recv) == 1 and recv[0][2]["speculative"] == (1 if call else 0), (scales, call)
            compact = [e for e in rig.kernels if e[0] == "compact_scales"]
            if scales == "col" and call:
                # after the receive; the receive's leading dimension is the speculative rows
                assert [e[0] for e in rig.kernels][-1] == "compact_scales"
                assert compact[0][2]["src_ld"] == 64 and compact[0][2]["rows"] == 8 and compact[0][2]["groups"] == 2
            else:
                assert compact == [], (scales, call)
    assert b._intra.spec_hits == 4 and b._intra.spec_misses == 0


def test_fp8_hidden_size_not_a_multiple_of_128_raises_before_any_launch(rig):
    # H=2880 (gpt-oss) runs in BF16 only: its 2880 / 128 = 22.5 scale groups have no FP8 layout.
    # The check comes before the scales are looked at (their shape here does not matter).
    b = rig.normal_buffer()
    fp8 = torch.float8_e4m3fn
    with pytest.raises(ValueError, match="FP8 hidden size 2880 must be a multiple of 128"):
        b.dispatch((torch.zeros(4, 2880, dtype=fp8), torch.ones(4, 22)), topk_idx=_IDX, num_experts=4)
    assert rig.launched() == []
    # The same call is accepted in BF16 at 2880 and in FP8 at a multiple of 128 (so the error
    # above is about FP8 at 2880, not about the call).
    b.dispatch(torch.zeros(4, 2880, dtype=_BF), topk_idx=_IDX, num_experts=4)
    b.dispatch((torch.zeros(4, 2944, dtype=fp8), torch.ones(4, 23)), topk_idx=_IDX, num_experts=4)
    assert rig.launched().count("send") == 2


def test_async_dispatch_keeps_everything_its_kernels_read(rig, monkeypatch):
    from epcomm import reference
    from epcomm.context import CommContext
    from epcomm.runtime.event import EventOverlap
    seen = []

    def finish(self, fw, caller, async_finish, outputs, inputs, cap=None):
        seen.append(inputs)  # kept alive by the event and recorded on the comm streams
        return EventOverlap(None, fw, 0)

    b = rig.normal_buffer()
    h = _dispatch(b, topk_weights=torch.ones(4, 2))[4]
    monkeypatch.setattr(CommContext, "finish", finish)
    x = torch.zeros(4, 128, dtype=_BF)
    b.dispatch(x, handle=h, async_finish=True)
    # a cached dispatch reads the handle's tensors (autograd drops the handle right after)
    for t in (h.send_list, h.rank_prefix, h.send_count, h.send_pos, h.is_token_in_rank):
        assert any(k is t for k in seen[-1])
    lay = reference.get_dispatch_layout(_IDX.numpy(), 4, b.num_ranks)
    ner = torch.from_numpy(lay.num_tokens_per_expert)
    b.dispatch(x, topk_idx=_IDX, num_tokens_per_expert=ner, is_token_in_rank=torch.from_numpy(lay.is_token_in_rank),
               num_tokens_per_rank=torch.from_numpy(lay.num_tokens_per_rank), num_worst_tokens=8, async_finish=True)
    assert any(k is ner for k in seen[-1])  # notify reads it after the call returned
    b.dispatch(x, topk_idx=_IDX, num_experts=4, num_worst_tokens=8, async_finish=True)
    assert all(not isinstance(k, (list, tuple)) for k in seen[-1])  # its own layout's outputs, one by one
    assert sum(isinstance(k, torch.Tensor) for k in seen[-1]) >= 8


def test_a_cpu_synchronised_dispatch_under_capture_raises_before_touching_any_stream(rig, monkeypatch):
    from epcomm.runtime import driver
    b = rig.normal_buffer()
    touched = []
    monkeypatch.setattr(driver, "stream_is_capturing", lambda s: True)
    monkeypatch.setattr(driver, "capture_id", lambda s: 5)
    monkeypatch.setattr(driver, "event_record", lambda *a: touched.append(("record", a)))
    monkeypatch.setattr(driver, "stream_wait_event", lambda *a: touched.append(("wait", a)))
    with pytest.raises(ValueError, match="capture needs num_worst_tokens"):
        _dispatch(b)
    # the comm stream never joined the caller's capture (a capture left forked is lost)
    assert touched == []


def test_destroy_keeps_the_comm_streams_for_the_next_buffer(monkeypatch):
    """torch records an event on every stream a freed tensor was record_stream()ed on, and
    async_finish records the caller's tensors on the comm streams: those may be freed after
    destroy(), so the streams must stay valid (a later Buffer of the device reuses them)."""
    import contextlib

    from epcomm.runtime import driver
    from epcomm import context as C
    made, destroyed = [], []
    for name, fn in (("on_device", lambda d: contextlib.nullcontext()), ("device_sync", lambda: None),
                     ("event_destroy", lambda *a: None), ("stream_destroy", destroyed.append),
                     ("stream_create", lambda *a: made.append(100 + len(made)) or made[-1])):
        monkeypatch.setattr(driver, name, fn)
    monkeypatch.setattr(C, "SPARE_STREAMS", {})
    ctx = fake_context()
    ctx.stream, ctx.stream2 = C.take_stream(0), C.take_stream(0)
    b = fake_buffer(normal=False, ctx=ctx)
    b.destroy()
    assert destroyed == [] and sorted(C.SPARE_STREAMS[0]) == [100, 101]
    assert {C.take_stream(0), C.take_stream(0)} == {100, 101} and made == [100, 101]
    assert C.take_stream(0) == 102 and C.take_stream(1) == 103


def test_a_dropped_pending_event_keeps_its_arrays_until_the_operation_finished(monkeypatch):
    """CuPy's and JAX's allocators do not know the comm stream reads an async call's inputs:
    dropping the EventOverlap early keeps them until the operation is seen finished.  Dropping
    never queries (it may happen inside a graph capture, which a query would invalidate); torch's
    (record_stream) and captured events are destroyed at once."""
    import contextlib
    import gc
    import weakref

    from epcomm.runtime import driver
    from epcomm.runtime import event as E_
    done, destroyed, queried = set(), [], []

    def query(e):
        queried.append(e)
        if e == 13:
            raise RuntimeError("capture invalidated")
        return e in done

    monkeypatch.setattr(driver, "event_query", query)
    monkeypatch.setattr(driver, "event_destroy", destroyed.append)
    monkeypatch.setattr(driver, "relaxed_capture_mode", contextlib.nullcontext)
    monkeypatch.setattr(E_, "_DEFERRED", [])

    class Arr:
        pass

    a, b, c, d = Arr(), Arr(), Arr(), Arr()
    wa, wb, wc, wd = (weakref.ref(o) for o in (a, b, c, d))
    e7 = E_.EventOverlap(7, "cupy", 0, extra=[a], capture=0)
    e8 = E_.EventOverlap(8, "torch", 0, extra=[b], capture=0)   # record_stream covers torch
    e9 = E_.EventOverlap(9, "cupy", 0, extra=[c], capture=3)    # recorded in a capture
    e13 = E_.EventOverlap(13, "jax", 0, extra=[d], capture=0)
    del a, b, c, d, e7, e8, e9, e13
    gc.collect()
    assert queried == [] and destroyed == [8, 9]
    assert wa() is not None and wb() is None and wc() is None and wd() is not None
    E_.release_finished()  # 7 pending; 13's query fails: no proof it finished, kept
    assert wa() is not None and wd() is not None and destroyed == [8, 9]
    done.add(7)
    E_.release_finished()
    gc.collect()
    assert wa() is None and wd() is not None and destroyed == [8, 9, 7] and [e for e, _ in E_._DEFERRED] == [13]


def test_wait_for_skips_only_an_event_known_to_be_from_outside_the_capture(monkeypatch):
    from epcomm.runtime import driver
    from epcomm.runtime import event as E_
    waits = []
    monkeypatch.setattr(driver, "stream_wait_event", lambda s, e: waits.append((s, e)))
    EO = E_.EventOverlap
    assert not E_.wait_for(1, None, 0) and not E_.wait_for(1, EO(None), 5)
    for ev, cap, expect in ((EO(10, owned=False, capture=0), 0, True), (EO(11, owned=False, capture=5), 0, False),
                            (EO(12, owned=False, capture=0), 5, False), (EO(13, owned=False, capture=4), 5, False),
                            (EO(14, owned=False, capture=5), 5, True), (EO(15, owned=False), 5, True)):
        assert E_.wait_for(1, ev, cap) is expect, (ev.event, cap)
    assert waits == [(1, 10), (1, 14), (1, 15)]


def test_a_constructor_that_fails_frees_what_it_made(monkeypatch):
    """Buffer.__init__: low-latency arguments are checked before the NVLink buffer exists, and
    a later failure frees what was made (NVLink state, events, error record; streams kept)."""
    import contextlib

    from epcomm.runtime import driver
    from epcomm import buffer as B
    from epcomm import context as C
    made = {"intra": 0, "intra_freed": 0, "events": 0, "events_freed": 0, "err_freed": 0}
    for name, fn in (("init", lambda: 1), ("current_device", lambda: 0),
                     ("on_device", lambda d: contextlib.nullcontext()),
                     ("stream_create", lambda *a: 500), ("pci_bus_id", lambda d: "0000:01:00.0"),
                     ("event_create", lambda *a: made.__setitem__("events", made["events"] + 1) or 9),
                     ("event_destroy", lambda e: made.__setitem__("events_freed", made["events_freed"] + 1))):
        monkeypatch.setattr(driver, name, fn)

    class Err:
        def __init__(self, dev):
            pass

        def free(self):
            made["err_freed"] += 1

    class Intra:
        def __init__(self, buf, n):
            made["intra"] += 1

        def free(self):
            made["intra_freed"] += 1

    class G:
        rank, size = 0, 2

        def allgather_bytes(self, b):
            return [b, b]

        def broadcast_bytes(self, b, root=0):
            return b

        def barrier(self):
            pass

    monkeypatch.setattr(C, "ErrorState", Err)
    monkeypatch.setattr(B, "NvlinkState", Intra)
    monkeypatch.setattr(C, "SPARE_STREAMS", {})
    monkeypatch.setenv("EPCOMM_SHARE_GPU", "1")
    with pytest.raises(ValueError, match="num_rdma_bytes > 0"):
        B.Buffer(G(), 1 << 20, 0, low_latency_mode=True)
    assert made["intra"] == 0 and made["events"] == made["events_freed"] == 3 and made["err_freed"] == 1
    assert C.SPARE_STREAMS[0] == [500, 500]

    def broken(self, buf, n):
        raise RuntimeError("NVSHMEM could not map the heap")

    monkeypatch.setattr(B.LowLatencyState, "__init__", broken)
    with pytest.raises(RuntimeError, match="could not map"):
        B.Buffer(G(), 1 << 20, 1 << 20, low_latency_mode=True)
    assert made["intra"] == made["intra_freed"] == 1 and made["events_freed"] == 6 and made["err_freed"] == 2
    assert not any(isinstance(b, B.Buffer) and b.group.__class__ is G for b in B._LIVE_BUFFERS)


def test_deferred_arrays_are_released_in_relaxed_capture_mode_and_once(monkeypatch):
    """The queries may run while another thread captures in global mode: relaxed mode keeps that
    capture valid.  Entries are taken out before querying, so nothing is destroyed twice."""
    import contextlib

    from epcomm.runtime import driver
    from epcomm.runtime import event as E_
    modes, destroyed = [], []

    @contextlib.contextmanager
    def relaxed():
        modes.append("relaxed")
        yield

    monkeypatch.setattr(driver, "relaxed_capture_mode", relaxed)
    monkeypatch.setattr(driver, "event_query", lambda e: e != 2)
    monkeypatch.setattr(driver, "event_destroy", destroyed.append)
    monkeypatch.setattr(E_, "_DEFERRED", [(1, "a"), (2, "b")])
    E_.release_finished()
    assert modes == ["relaxed"] and destroyed == [1] and E_._DEFERRED == [(2, "b")]
    E_.release_finished()
    assert destroyed == [1] and E_._DEFERRED == [(2, "b")]


def test_a_failed_low_latency_setup_does_not_free_the_heap_collectively(monkeypatch):
    """nvshmem_free has a barrier: a rank whose setup failed (its peers stuck in another
    collective, or gone) must not enter it.  Its private memory is freed."""
    import contextlib

    from epcomm.runtime import driver
    from epcomm import low_latency as LLm
    from epcomm.runtime import nvshmem as nvr
    freed, heap_freed = [], []
    monkeypatch.setattr(nvr, "init", lambda *a, **k: None)
    monkeypatch.setattr(nvr, "alloc", lambda n: ("heap", 1 << 40))
    monkeypatch.setattr(nvr, "free", heap_freed.append)
    monkeypatch.setattr(driver, "on_device", lambda d: contextlib.nullcontext())
    monkeypatch.setattr(driver, "memset_d8_async", lambda *a: None)
    allocs = iter([77])

    def mem_alloc(n):
        try:
            return next(allocs)
        except StopIteration:
            raise MemoryError("out of device memory") from None

    monkeypatch.setattr(driver, "mem_alloc", mem_alloc)
    monkeypatch.setattr(driver, "mem_free", freed.append)
    monkeypatch.setattr(driver, "stream_sync", lambda s: (_ for _ in ()).throw(RuntimeError("peer gone")))
    with pytest.raises(RuntimeError, match="peer gone"):
        LLm.LowLatencyState(fake_context(group=None), 1 << 20)
    assert freed == [77] and heap_freed == []


def test_a_failed_nvlink_setup_frees_what_it_made(monkeypatch):
    import contextlib
    import ctypes

    from epcomm.normal.state import NvlinkState
    from epcomm.runtime import driver
    freed, host_freed, closed = [], [], []
    ptrs = iter([100, 200])
    for name, fn in (("on_device", lambda d: contextlib.nullcontext()), ("mem_alloc", lambda n: next(ptrs)),
                     ("memset_d8_async", lambda *a: None), ("host_alloc_mapped", lambda n: (0, 0)),
                     ("stream_sync", lambda s: None), ("ipc_get_handle", lambda p: b"h"),
                     ("mem_free", freed.append), ("host_free", host_freed.append), ("ipc_close", closed.append)):
        monkeypatch.setattr(driver, name, fn)
    host = ctypes.create_string_buffer(4 * (2 + 2 + K_intra.MAX_LOCAL_EXPERTS))
    monkeypatch.setattr(driver, "host_alloc_mapped", lambda n: (ctypes.addressof(host), 300))

    def ipc_open(h):
        raise RuntimeError("cannot map the peer's memory")

    monkeypatch.setattr(driver, "ipc_open", ipc_open)
    group = type("G", (), {"rank": 0, "size": 2, "allgather_bytes": lambda self, x: [x, x],
                           "barrier": lambda self: None})()
    with pytest.raises(RuntimeError, match="cannot map"):
        NvlinkState(fake_context(group=group), 64 << 20)
    assert sorted(freed) == [100, 200] and host_freed == [ctypes.addressof(host)]


# ---- found by the fuzz (tests/cpu/test_fuzz_api.py) ---------------------------------------------


def test_call_flags_are_bools_and_num_worst_tokens_is_bounded_before_any_launch(rig):
    from epcomm import api
    b = rig.normal_buffer()
    h = _dispatch(b)[4]
    x = torch.zeros(h.out_rows, 128, dtype=_BF)
    rig.kernels.clear()
    for name in ("async_finish", "allocate_on_comm_stream"):
        # "no" would count as True (an async call whose outputs nobody waits for)
        with pytest.raises(TypeError, match=f"{name} must be a bool"):
            _dispatch(b, **{name: "no"})
        with pytest.raises(TypeError, match=f"{name} must be a bool"):
            b.combine(x, h, **{name: "no"})
        with pytest.raises(TypeError, match=f"{name} must be a bool"):
            b.get_dispatch_layout(_IDX, 4, **{name: "no"})
    # More rows than every rank can send: refused before the count exchange and send launch
    # (the outputs are allocated after them), and before an int32 kernel field could wrap.
    cap = b._intra.layout.capacity_rows(K_intra.max_row_bytes(128, 2))
    with pytest.raises(ValueError, match=f"num_worst_tokens={2 * cap + 1}: more rows"):
        _dispatch(b, num_worst_tokens=2 * cap + 1)
    with pytest.raises(TypeError, match="stream must be an int"):
        api.get_dispatch_layout(_IDX, 4, 2, stream="s")
    with pytest.raises(ValueError, match="stream=-1 must be >= 0"):
        api.get_dispatch_layout(_IDX, 4, 2, stream=-1)
    assert rig.launched() == []
    _dispatch(b, num_worst_tokens=2 * cap, async_finish=False, allocate_on_comm_stream=0)
    assert rig.launched()[-3:] == ["notify", "send", "recv"]
