"""Low-latency API: bad input raises a clear error naming the argument before any kernel is
launched and before any state changes (buffer slots, generations, pending hooks).

No GPU here: a real LowLatencyState on a fake heap, on the fake runtime of tests/helpers/fake_rig.py
(the driver calls recorded, CPU tensors standing in for CUDA ones).  Every check below must fire before the code could reach the recorded launches.
"""
from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from epcomm.jit import loader  # noqa: E402
from epcomm.runtime import driver  # noqa: E402
from epcomm.errors import BufferStateError  # noqa: E402
from epcomm.runtime.event import EventOverlap  # noqa: E402
from epcomm.buffer import Buffer  # noqa: E402
from epcomm.low_latency.dispatch import DEFAULT_SMEM  # noqa: E402
from epcomm.kernels import low_latency as K  # noqa: E402
from epcomm.low_latency.state import LowLatencyState  # noqa: E402
from fake_driver import FakeModule  # noqa: E402
from fake_rig import FakeRuntime, fake_heap  # noqa: E402
from fake_runtime import FakeGroup, fake_buffer, fake_context  # noqa: E402

H, E = 256, 8


@pytest.fixture
def rig(monkeypatch):
    return FakeRuntime(monkeypatch)


def _inputs(N=4, Kt=2, idx_dtype=torch.int64):
    x = torch.zeros(N, H, dtype=torch.bfloat16)
    topk = (torch.arange(N * Kt).reshape(N, Kt) % E).to(idx_dtype)
    w = torch.ones(N, Kt, dtype=torch.float32)
    return x, topk, w


def _state(st):
    return (st._disp_slot, st._comb_slot, list(st._disp_gen), list(st._disp_pending), list(st._comb_pending))


def test_combine_rejects_a_handle_of_another_buffer_and_a_stale_one(rig):
    b1, st1 = rig.ll_buffer()
    b2, st2 = rig.ll_buffer()
    x, topk, w = _inputs()
    _, _, h1, _, _ = b1.low_latency_dispatch(x, topk, 8, E, use_fp8=False)
    b2.low_latency_dispatch(x, topk, 8, E, use_fp8=False)  # same slot and generation numbers as b1's
    y = torch.zeros(E // 2, 2 * 8, H, dtype=torch.bfloat16)
    n, before = len(rig.launches()), _state(st2)
    with pytest.raises(ValueError, match="handle: was made by another Buffer"):
        b2.low_latency_combine(y, topk, w, h1)
    with pytest.raises(ValueError, match="handle: was made by another Buffer"):
        b2.get_next_low_latency_combine_buffer(h1)
    assert len(rig.launches()) == n and _state(st2) == before
    # Two more dispatches reuse h1's slot: its results are gone.
    b1.low_latency_dispatch(x, topk, 8, E, use_fp8=False)
    b1.low_latency_dispatch(x, topk, 8, E, use_fp8=False)
    n = len(rig.launches())
    with pytest.raises(BufferStateError, match="overwritten"):
        b1.low_latency_combine(y, topk, w, h1)
    with pytest.raises(BufferStateError, match="overwritten"):
        b1.get_next_low_latency_combine_buffer(h1)
    assert len(rig.launches()) == n


def test_combine_checks_the_indices_and_frameworks_before_launch(rig):
    b, st = rig.ll_buffer()
    x, topk, w = _inputs()
    _, _, h, _, _ = b.low_latency_dispatch(x, topk, 8, E, use_fp8=False)
    y = torch.zeros(E // 2, 2 * 8, H, dtype=torch.bfloat16)
    n, before = len(rig.launches()), _state(st)
    bad = topk.clone()
    bad[1, 1] = E
    with pytest.raises(ValueError, match=r"outside \[-1, 8\)"):
        b.low_latency_combine(y, bad, w, h)
    rep = topk.clone()
    rep[2, 1] = rep[2, 0]
    with pytest.raises(ValueError, match="row 2 lists the same expert twice"):
        b.low_latency_combine(y, rep, w, h)
    with pytest.raises(TypeError, match="topk_weights: is a numpy array but x is a torch one"):
        b.low_latency_combine(y, topk, w.numpy(), h)
    with pytest.raises(TypeError, match="previous_event: expected an EventOverlap"):
        b.low_latency_combine(y, topk, w, h, previous_event="yes")
    with pytest.raises(TypeError, match="zero_copy must be a bool"):
        b.low_latency_combine(y, topk, w, h, zero_copy="no")
    assert len(rig.launches()) == n and _state(st) == before
    b.low_latency_combine(y, topk, w, h)  # the same call with good arguments goes through
    assert len(rig.launches()) == n + 1


def test_dispatch_rejects_mixed_frameworks_flags_events_and_empty_rows(rig):
    b, st = rig.ll_buffer()
    x, topk, _ = _inputs()
    before = _state(st)
    with pytest.raises(TypeError, match="topk_idx: is a numpy array but x is a torch one"):
        b.low_latency_dispatch(x, topk.numpy(), 8, E)
    with pytest.raises(TypeError, match="use_fp8 must be a bool"):
        b.low_latency_dispatch(x, topk, 8, E, use_fp8="no")
    with pytest.raises(TypeError, match="previous_event: expected an EventOverlap"):
        b.low_latency_dispatch(x, topk, 8, E, previous_event=object())
    with pytest.raises(ValueError, match="hidden size 0 must be a positive multiple of 128"):
        b.low_latency_dispatch(torch.zeros(4, 0, dtype=torch.bfloat16), topk, 8, E)
    with pytest.raises(TypeError, match="cumulative_local_expert_recv_stats: is a numpy array"):
        b.low_latency_dispatch(x, topk, 8, E, cumulative_local_expert_recv_stats=np.zeros(E // 2, np.int32))
    assert rig.launches() == [] and _state(st) == before and st._results == [None, None]


def test_a_shared_memory_error_leaves_the_slots_alone(rig, monkeypatch):
    b, st = rig.ll_buffer(rdma=1 << 34)

    def no_room(self, mod, names, smem):
        raise ValueError(f"low-latency dispatch: the kernel needs {smem} bytes of shared memory per block")

    monkeypatch.setattr(LowLatencyState, "_allow_smem", no_room)
    T = 8192  # dispatch_smem_bytes(2, 8192) is above the 48 KiB default
    assert K.dispatch_smem_bytes(2, T) > DEFAULT_SMEM
    x, topk, _ = _inputs()
    with pytest.raises(ValueError, match="shared memory"):
        b.low_latency_dispatch(x, topk, T, E, use_fp8=False)
    assert rig.launches() == [] and st._results == [None, None] and _state(st) == (0, 0, [0, 0], [False, False],
                                                                                   [False, False])


def test_async_finish_keeps_the_inputs_alive_and_in_use_on_the_comm_stream(rig, monkeypatch):
    b, st = rig.ll_buffer()
    recorded = []
    monkeypatch.setattr(torch.cuda, "ExternalStream", lambda s, device=None: ("comm", s))
    monkeypatch.setattr(torch.Tensor, "record_stream", lambda self, s: recorded.append((self.data_ptr(), s)),
                        raising=False)
    x, topk32, _ = _inputs(idx_dtype=torch.int32)  # widened into a temporary int64 copy
    _, _, _, ev, _ = b.low_latency_dispatch(x, topk32, 8, E, use_fp8=False, async_finish=True)
    wide = [o for o in ev.extra if isinstance(o, torch.Tensor) and o.dtype == torch.int64]
    assert len(wide) == 1 and torch.equal(wide[0], topk32.long())
    assert (wide[0].data_ptr(), ("comm", b.ctx.stream)) in recorded
    assert any(o is x for o in ev.extra)


def test_clean_checks_its_shape_and_pending_hooks_before_the_collective(rig):
    b, st = rig.ll_buffer()
    for args, exc in (((0, 7168, 8), ValueError), ((-1, 7168, 8), ValueError), ((8, 100, 8), ValueError),
                      ((8, 256, 7), ValueError), ((8.0, 256, 8), TypeError), ((8, 256, 0), ValueError)):
        with pytest.raises(exc):
            b.clean_low_latency_buffer(*args)
    assert rig.log == []
    x, topk, _ = _inputs()
    _, _, _, _, hook = b.low_latency_dispatch(x, topk, 8, E, use_fp8=False, return_recv_hook=True)
    with pytest.raises(BufferStateError, match="receive hook is pending"):
        b.clean_low_latency_buffer(8, H, E)
    assert ("barrier",) not in rig.log
    hook()
    # A larger shape was used before: its dispatch regions and put staging are zeroed too
    # (message tags restart, and any header left there could match one).
    b.low_latency_dispatch(torch.zeros(4, 1024, dtype=torch.bfloat16), topk, 64, E, use_fp8=False)
    rig.log.clear()
    b.clean_low_latency_buffer(8, H, E)
    # Everything up to the end of the largest shape's put staging (the last region holding
    # message headers), but the rank mask between the flags and the regions (shrink mode keeps
    # it: clean_mask clears it).
    big = K.HeapLayout.make(64, 1024, E, 2)
    end, m0 = big.disp_send_off + 2 * 64 * big.msg_bytes, K.mask_offset(2)
    heap_sets = sorted((e[1] - st.heap, e[2]) for e in rig.log if e[0] == "memset" and
                       st.heap <= e[1] < st.heap + end)
    assert heap_sets == [(0, m0), (m0 + 4 * 2, end - m0 - 4 * 2)]
    # Kernels still queued on any stream (the caller's, usually) finish before the barrier.
    assert rig.log.index(("device_sync",)) < rig.log.index(("barrier",))
    assert st._disp_gen == [2, 2] and not any(st._disp_pending)


def test_rdma_size_hint_rejects_shapes_the_kernels_cannot_run():
    hint = Buffer.get_low_latency_rdma_size_hint
    assert hint(128, 7168, 2, 256) == K.HeapLayout.make(128, 7168, 256, 2).lf_total
    for args, exc, msg in (((-5, 7168, 2, 256), ValueError, "num_max_dispatch_tokens_per_rank"),
                           ((128.5, 7168, 2, 256), TypeError, "num_max_dispatch_tokens_per_rank"),
                           ((0, 7168, 2, 256), ValueError, "num_max_dispatch_tokens_per_rank"),
                           ((128, 100, 2, 256), ValueError, "hidden=100"),
                           ((128, 0, 2, 256), ValueError, "hidden"),
                           ((128, 7168, 2, 255), ValueError, "multiple of the number of ranks"),
                           ((128, 7168, 0, 256), ValueError, "num_ranks"),
                           ((128, 7168, 65, 260), ValueError, "num_ranks"),
                           ((128, 7168, 2, -8), ValueError, "num_experts"),
                           ((2**20, 7168, 2, 256), ValueError, "num_max_dispatch_tokens_per_rank")):
        with pytest.raises(exc, match=msg):
            hint(*args)


def test_read_only_arrays_are_refused_where_the_kernels_write(rig):
    jnp = pytest.importorskip("jax.numpy")
    b, _ = rig.ll_buffer()
    a = jnp.zeros((4, 128), dtype=jnp.float32)
    assert b.ctx.tensor(a, "a", dtype="float32") is not None  # reading is fine
    with pytest.raises(ValueError, match="out: is read-only"):
        b.ctx.tensor(a, "out", dtype="float32", writable=True)


def test_fast_combine_is_off_while_the_host_index_check_is_on(rig, monkeypatch):
    import epcomm.envs as envs
    b, st = rig.ll_buffer()
    x, topk, w = _inputs()
    y = torch.zeros(E // 2, 2 * 8, H, dtype=torch.bfloat16)
    monkeypatch.setenv("EPCOMM_CHECK_INDICES", "1")
    envs.CHECK_INDICES.get_memo()
    _, _, h, _, _ = b.low_latency_dispatch(x, topk, 8, E, use_fp8=False)
    # Let the CPU tensors pass the fast path's device tests, and record its launches.
    monkeypatch.setattr(st, "_torch", torch)
    st._tdev, st._get_device = "cpu", lambda: 0
    monkeypatch.setattr(torch.Tensor, "get_device", lambda self: 0)
    monkeypatch.setattr(K, "launch_prepared", lambda *a: rig.log.append(("launch", "prepared")))
    b.low_latency_combine(y, topk, w, h)
    b.low_latency_combine(y, topk, w, h)
    rep = topk.clone()
    rep[2, 1] = rep[2, 0]
    with pytest.raises(ValueError, match="lists the same expert twice"):
        b.low_latency_combine(y, rep, w, h)
    assert st.fast_calls == 0
    monkeypatch.setenv("EPCOMM_CHECK_INDICES", "0")  # production: the prepared plan serves
    b.low_latency_combine(y, topk, w, h)
    assert st.fast_calls == 1


def test_int32_indices_after_previous_event_order_the_kernel_after_the_widening(rig, monkeypatch):
    b, st = rig.ll_buffer()
    waits = []
    syncs = []
    import contextlib

    from epcomm.runtime import driver as real_cuda  # interop and EventOverlap call the module itself
    monkeypatch.setattr(driver, "stream_wait_event", lambda s, e: waits.append((s, e)), raising=False)
    monkeypatch.setattr(real_cuda, "stream_wait_event", lambda s, e: waits.append((s, e)))
    monkeypatch.setattr(real_cuda, "on_device", lambda d: contextlib.nullcontext())
    monkeypatch.setattr(real_cuda, "event_sync", lambda e: syncs.append(e))
    x, topk32, _ = _inputs(idx_dtype=torch.int32)
    prev = EventOverlap(99, "torch", 0, owned=False)
    b.low_latency_dispatch(x, topk32, 8, E, use_fp8=False, previous_event=prev)
    # The indices may be written on a stream only the event orders: the widening copy's stream
    # (the caller's) waits for it first, then the kernel stream waits for the event and that copy.
    assert waits[0][1] == 99 and waits[0][0] != b.ctx.stream
    assert (b.ctx.stream, 99) in waits and (b.ctx.stream, b.ctx.ev_start) in waits
    assert syncs == [99]  # the host index check read the values only after the event
    waits.clear()
    syncs.clear()
    _, topk64, _ = _inputs()
    b.low_latency_dispatch(x, topk64, 8, E, use_fp8=False, previous_event=prev)
    assert [wt for wt in waits if wt[0] == b.ctx.stream] == [(b.ctx.stream, 99)]  # the event only
    assert syncs == [99]
    syncs.clear()
    monkeypatch.setenv("EPCOMM_CHECK_INDICES", "0")
    b.low_latency_dispatch(x, topk64, 8, E, use_fp8=False, previous_event=prev)
    assert syncs == []  # no host check, no host wait


# ---- found by mutation testing: each fails if the check it names is removed or loosened ----


def test_dispatch_rejects_bad_shapes_and_flag_combinations_before_launch(rig):
    b, st = rig.ll_buffer()
    x, topk, _ = _inputs()
    before = _state(st)
    with pytest.raises(ValueError, match="x: 4 tokens exceed num_max_dispatch_tokens_per_rank=3"):
        b.low_latency_dispatch(x, topk, 3, E)
    with pytest.raises(ValueError, match="num_experts=32768: at most 32767"):
        b.low_latency_dispatch(x, topk, 8, 32768)
    with pytest.raises(ValueError, match=rf"top-k {K.MAX_TOPK + 1} must be in \[1, {K.MAX_TOPK}\]"):
        b.low_latency_dispatch(x, torch.full((4, K.MAX_TOPK + 1), -1, dtype=torch.int64), 8, 64)
    dup = topk.clone()
    dup[1] = torch.tensor([3, 3])
    with pytest.raises(ValueError, match="topk_idx row 1 lists the same expert twice"):
        b.low_latency_dispatch(x, dup, 8, E)
    with pytest.raises(ValueError, match="use_ue8m0=True needs round_scale=True"):
        b.low_latency_dispatch(x, topk, 8, E, use_ue8m0=True)
    with pytest.raises(ValueError, match="async_finish and return_recv_hook cannot both be set"):
        b.low_latency_dispatch(x, topk, 8, E, async_finish=True, return_recv_hook=True)
    assert rig.launches() == [] and _state(st) == before and st._results == [None, None]


def test_rdma_size_hint_bounds_are_exact():
    hint = Buffer.get_low_latency_rdma_size_hint
    hint(1, 128 * 1023, 1, 32767)
    with pytest.raises(ValueError, match="hidden"):
        hint(1, 128 * 1024, 1, 8)
    with pytest.raises(ValueError, match="num_experts"):
        hint(1, 128, 1, 32768)


def test_dispatch_shared_memory_holds_a_count_per_group_and_an_entry_and_k_per_slot():
    for R, T in ((1, 1), (2, 128), (8, 256), (64, 1)):
        slots = R * T
        assert K.dispatch_smem_bytes(R, T) >= 4 * R * ((T + 31) // 32) + 4 * slots + slots


def test_combine_refuses_top_k_other_than_the_dispatch_s(rig, monkeypatch):
    b, st = rig.ll_buffer()
    x, topk, w = _inputs()
    y = torch.zeros(E // 2, 2 * 8, H, dtype=torch.bfloat16)
    h = b.low_latency_dispatch(x, topk, 8, E, use_fp8=False)[2]
    topk[0, 0] = -1  # masked in place after the dispatch, as DeepEP code may do
    n, before = len(rig.launches()), _state(st)
    with pytest.raises(ValueError, match="differs from the dispatch's"):
        b.low_latency_combine(y, topk, w, h)
    assert len(rig.launches()) == n and _state(st) == before
    topk[0, 0] = h.refs["topk"][0, 0]
    b.low_latency_combine(y, topk.to(torch.int32), w, h)  # the same values in another width
    # Without the host check nothing is kept or compared (production).
    monkeypatch.setenv("EPCOMM_CHECK_INDICES", "0")
    h2 = b.low_latency_dispatch(x, topk, 8, E, use_fp8=False)[2]
    assert h2.refs.get("topk") is None
    other = topk.clone()
    other[0, 0] = -1
    b.low_latency_combine(y, other, w, h2)


def test_a_hook_after_previous_event_orders_the_caller_after_the_receive(rig, monkeypatch):
    b, st = rig.ll_buffer()
    calls = []
    monkeypatch.setattr(driver, "stream_wait_event", lambda s, e: calls.append(("wait", s, e)), raising=False)
    monkeypatch.setattr(driver, "event_record", lambda e, s: calls.append(("record", e, s)), raising=False)
    monkeypatch.setattr(K, "launch", lambda fn, grid, threads, stream, p, smem=0, cooperative=False:
                        calls.append(("launch", stream)))
    monkeypatch.setenv("EPCOMM_CHECK_INDICES", "0")
    x, topk, w = _inputs()
    prev = EventOverlap(99, "torch", 0, owned=False)
    _, _, h, _, hook = b.low_latency_dispatch(x, topk, 8, E, use_fp8=False, return_recv_hook=True,
                                               previous_event=prev)
    calls.clear()
    hook()
    # the receive runs on epcomm's stream (it followed the event), then the caller's stream waits
    assert calls[0] == ("launch", b.ctx.stream)
    assert calls[1] == ("record", b.ctx.ev_start, b.ctx.stream) and calls[2][0] == "wait" and calls[2][1] != b.ctx.stream
    y = torch.zeros(E // 2, 2 * 8, H, dtype=torch.bfloat16)
    _, _, chook = b.low_latency_combine(y, topk, w, h, return_recv_hook=True, previous_event=prev)
    calls.clear()
    chook()
    assert calls[0] == ("launch", b.ctx.stream) and calls[2][0] == "wait" and calls[2][1] != b.ctx.stream


def test_hooks_are_refused_for_jax_arrays(rig):
    jnp = pytest.importorskip("jax.numpy")
    b, st = rig.ll_buffer()
    x, topk, _ = _inputs()
    before = _state(st)
    with pytest.raises(ValueError, match="return_recv_hook=True with JAX arrays"):
        b.low_latency_dispatch(jnp.zeros((4, H), dtype=jnp.bfloat16), jnp.asarray(topk.numpy()), 8, E,
                               use_fp8=False, return_recv_hook=True)
    assert _state(st) == before and rig.launches() == []


def test_a_previous_event_from_before_a_capture_still_brings_the_comm_stream_into_it(rig, monkeypatch):
    """The event orders nothing inside the graph; the comm stream must join the capture through
    the caller's stream, or the kernel runs once now and is missing from every replay."""
    b, st = rig.ll_buffer()
    monkeypatch.setenv("EPCOMM_CHECK_INDICES", "0")
    # async_finish's event would tell torch's allocator about the comm stream (needs CUDA)
    monkeypatch.setattr(LowLatencyState, "_event", lambda self, fw, *a: EventOverlap(None, fw, 0))
    x, topk, w = _inputs()
    rig.recorded_on[55] = 3  # recorded on some stream before the capture began
    prev = EventOverlap(55, "torch", 0, owned=False)
    rig.capturing.add(0)      # the caller's stream (cpu_arrays_as_cuda: stream 0) is capturing
    _, _, h, _, _ = b.low_latency_dispatch(x, topk, 8, E, use_fp8=False, async_finish=True, previous_event=prev)
    assert rig.launch_streams[-1] == (b.ctx.stream, True)
    rig.capturing.discard(b.ctx.stream)  # the capture ended (the comm stream rejoined the caller)
    y = torch.zeros(E // 2, 2 * 8, H, dtype=torch.bfloat16)
    b.low_latency_combine(y, topk, w, h, async_finish=True, previous_event=prev)
    assert rig.launch_streams[-1] == (b.ctx.stream, True)
    # Outside a capture the event alone orders the comm stream (no wait for the caller's).
    rig.capturing.clear()
    b.low_latency_dispatch(x, topk, 8, E, use_fp8=False, async_finish=True, previous_event=prev)
    assert rig.launch_streams[-1] == (b.ctx.stream, False)
    rig.capturing.add(3)  # an event recorded inside the capture: the comm stream joins through it
    rig.capturing.add(0)
    st._disp_pending = [False, False]
    b.ctx.begin("torch", prev)
    assert b.ctx.stream in rig.capturing


def test_results_of_every_shape_stay_with_the_buffer(rig):
    """A graph captured with one shape writes into that shape's results at every replay: a
    dispatch of another shape in the same slot must not free them."""
    b, st = rig.ll_buffer()
    x, topk, _ = _inputs()
    b.low_latency_dispatch(x, topk, 8, E, use_fp8=False)          # slot 0, bf16
    first = st._results[0]
    b.low_latency_dispatch(x, topk, 8, E, use_fp8=False)          # slot 1
    b.low_latency_dispatch(x, topk, 8, E, use_fp8=True)           # slot 0, another dtype
    assert st._results[0] is not first and st._kept[(0, first.key)] is first
    b.low_latency_dispatch(x, topk, 8, E, use_fp8=False)          # slot 1 again: same storage
    h = b.low_latency_dispatch(x, topk, 8, E, use_fp8=False)[2]   # slot 0: the first results again
    assert st._results[0] is first and h.refs["keep"] is first
    # Each shape's first dispatch (outside a capture) made the results of both slots: a capture
    # at the next call, in the other slot, then allocates nothing.
    assert len(st._kept) == 4 and {k[0] for k in st._kept} == {0, 1}
    # clean_low_latency_buffer zeroes the combine records of every kept set (message tags restart).
    rig.log.clear()
    b.clean_low_latency_buffer(8, H, E)
    zeroed = {e[1] for e in rig.log if e[0] == "memset"}
    assert all(r.tok_meta[1].ptr in zeroed for r in st._kept.values())


def test_a_dispatch_captured_first_leaves_no_fast_path_that_skips_zeroing(rig, monkeypatch):
    """The first dispatch into new results zeroes their combine records; under capture that
    memset runs only at replay, so the next eager call must take the full path and zero them."""
    b, st = rig.ll_buffer()
    monkeypatch.setenv("EPCOMM_CHECK_INDICES", "0")
    x, topk, _ = _inputs()
    rig.capturing.add(0)
    b.low_latency_dispatch(x, topk, 8, E, use_fp8=False)
    res = st._results[0]
    assert res.fresh and st._plans == {}
    assert set(st._kept) == {(0, res.key)}  # under capture only the slot in use (the graph's pool)
    rig.capturing.clear()
    b.low_latency_dispatch(x, topk, 8, E, use_fp8=False)  # slot 1
    rig.log.clear()
    b.low_latency_dispatch(x, topk, 8, E, use_fp8=False)  # slot 0, eager: zeroes, then plans
    assert ("memset", res.tok_meta[1].ptr, res.tok_meta[1].nbytes) in rig.log
    assert not res.fresh and any(k[0] == "d" and k[-1] == 0 for k in st._plans)


def test_inside_a_capture_an_event_from_before_it_is_not_waited_for(rig, monkeypatch):
    """Waiting for an event recorded before a capture from a stream in the capture invalidates
    it: a known pre-capture previous_event is skipped (it orders nothing in the graph), also in
    the capture's later calls, whose comm stream is already in it, and in the int32 widening."""
    b, st = rig.ll_buffer()
    monkeypatch.setenv("EPCOMM_CHECK_INDICES", "0")
    monkeypatch.setattr(LowLatencyState, "_event", lambda self, fw, *a: EventOverlap(None, fw, 0))
    x, topk, w = _inputs()
    pre = EventOverlap(55, "torch", 0, owned=False, capture=0)
    rig.capturing.add(0)
    for idx in (topk, topk.to(torch.int32)):
        for _ in range(2):  # the second call finds the comm stream in the capture already
            b.low_latency_dispatch(x, idx, 8, E, use_fp8=False, async_finish=True, previous_event=pre)
            assert rig.launch_streams[-1] == (b.ctx.stream, True)
    assert not any(ev == 55 for _, ev in rig.waits)
    # An event of this capture is waited for; one of unknown origin too (the caller's promise).
    for ev in (EventOverlap(56, "torch", 0, owned=False, capture=rig.capture),
               EventOverlap(57, "torch", 0, owned=False)):
        b.low_latency_dispatch(x, topk, 8, E, use_fp8=False, async_finish=True, previous_event=ev)
        assert (b.ctx.stream, ev.event) in rig.waits
    # Outside a capture the pre-capture event is waited for as usual.
    rig.capturing.clear()
    b.low_latency_dispatch(x, topk, 8, E, use_fp8=False, async_finish=True, previous_event=pre)
    assert rig.waits[-1] == (b.ctx.stream, 55)


def test_a_receive_hook_runs_once_even_after_its_slot_is_reused(rig):
    """A hook called again, after a later call of its slot sent with a hook of its own, raises:
    its receive would take that call's messages into the old call's outputs."""
    b, st = rig.ll_buffer()
    x, topk, _ = _inputs()
    _, _, _, _, old = b.low_latency_dispatch(x, topk, 8, E, use_fp8=False, return_recv_hook=True)
    old()
    b.low_latency_dispatch(x, topk, 8, E, use_fp8=False)                      # slot 1
    _, _, _, _, new = b.low_latency_dispatch(x, topk, 8, E, use_fp8=False, return_recv_hook=True)  # slot 0
    n = len(rig.launches())
    for _ in range(2):
        with pytest.raises(BufferStateError, match="already called"):
            old()
    assert len(rig.launches()) == n and st._hooks_pending == 1
    new()
    assert len(rig.launches()) == n + 1 and st._hooks_pending == 0
    with pytest.raises(BufferStateError, match="already called"):
        new()


def test_receive_hooks_refuse_after_destroy_and_keep_the_stats_alive(rig):
    import gc
    import weakref
    b, st = rig.ll_buffer()
    x, topk, w = _inputs()
    stats = torch.zeros(E // 2, dtype=torch.int32)
    ws = weakref.ref(stats)
    _, _, h, _, hook = b.low_latency_dispatch(x, topk, 8, E, use_fp8=False, return_recv_hook=True,
                                              cumulative_local_expert_recv_stats=stats)
    del stats
    gc.collect()
    assert ws() is not None  # the receive adds into it: kept until the hook is gone
    hook()
    y = torch.zeros(E // 2, 2 * 8, H, dtype=torch.bfloat16)
    _, _, h2, _, dhook = b.low_latency_dispatch(x, topk, 8, E, use_fp8=False, return_recv_hook=True)
    _, _, chook = b.low_latency_combine(y, topk, w, h, return_recv_hook=True)
    n = len(rig.launches())
    b._destroyed = True  # what destroy() leaves (its heap, control words and error record freed)
    for hk in (dhook, chook):
        with pytest.raises(BufferStateError, match="the Buffer was destroyed"):
            hk()
    assert len(rig.launches()) == n
    del hook
    gc.collect()
    assert ws() is None


# ---- numerics="deepep", use_logfmt and the wait statistics ----------------------------------------

def _record_launches(rig, monkeypatch):
    """Launches recorded with their params (the rig's recorder keeps only the kernel name), and
    the specs the loader was asked for."""
    params, specs = [], []

    def launch(fn, grid, threads, stream, p, smem=0, cooperative=False):
        rig.log.append(("launch", fn))
        params.append((fn, p))

    def load(spec, dev):
        specs.append(spec)
        return FakeModule()

    monkeypatch.setattr(K, "launch", launch)
    monkeypatch.setattr(loader, "load", load)
    return params, specs


def _numerics_buffer(rig, numerics, rdma=1 << 30):
    ctx = fake_context(2, stream=7, group=FakeGroup(0, 2, rig.log))
    ctx.numerics = numerics
    st = LowLatencyState(ctx, rdma, resources=fake_heap(2))
    return fake_buffer(normal=False, ctx=ctx, low_latency=st), st


def test_deepep_numerics_pick_their_kernels_and_turn_partials_off(rig, monkeypatch):
    params, specs = _record_launches(rig, monkeypatch)
    b, st = _numerics_buffer(rig, "deepep")
    assert b.numerics == "deepep" and not st.partials and st.template.partials == 0
    with pytest.raises(ValueError, match="numerics='deepep'"):
        st.set_combine_partials(True)
    st.set_combine_partials(False)  # allowed: nothing changes
    x, topk, w = _inputs()
    y = torch.zeros(E // 2, 2 * 8, H, dtype=torch.bfloat16)
    _, _, h, _, _ = b.low_latency_dispatch(x, topk, 8, E)             # FP8: DeepEP's scales
    _, _, h2, _, _ = b.low_latency_dispatch(x, topk, 8, E, use_fp8=False)  # BF16: no difference
    b.low_latency_combine(y, topk, w, h2)
    b.low_latency_combine(y, topk, w, h2, use_logfmt=True)
    assert specs == [K.LowLatencySpec(H, True, deepep=True), K.LowLatencySpec(H, False),
                     K.LowLatencySpec(H, False, deepep=True), K.LowLatencySpec(H, False, deepep=True, logfmt=True)]
    assert all(p.partials == 0 for _, p in params)
    # The shape word carries the partials bit every rank must agree on: off here.
    assert K.unpack_shape_word(params[0][1].shape_word)["EPCOMM_LL_COMBINE_PARTIALS"] == 0
    # An epcomm Buffer keeps its defaults: the plain modules, partials on.
    params.clear(), specs.clear()
    b2, st2 = _numerics_buffer(rig, "epcomm")
    assert st2.partials
    _, _, h3, _, _ = b2.low_latency_dispatch(x, topk, 8, E)
    b2.low_latency_combine(y, topk, w, h3)
    assert specs == [K.LowLatencySpec(H, True), K.LowLatencySpec(H, False)]
    assert [p.partials for _, p in params] == [1, 1]


def test_logfmt_combine_turns_partials_off_for_its_call_and_checks_its_arguments(rig, monkeypatch):
    params, specs = _record_launches(rig, monkeypatch)
    lay = K.HeapLayout.make(8, H, E, 2)
    b, st = _numerics_buffer(rig, "epcomm", rdma=lay.lf_total)
    x, topk, w = _inputs()
    y = torch.zeros(E // 2, 2 * 8, H, dtype=torch.bfloat16)
    _, _, h, _, _ = b.low_latency_dispatch(x, topk, 8, E, use_fp8=False)
    b.low_latency_combine(y, topk, w, h, use_logfmt=True)
    fn, p = params[-1]
    assert specs[-1] == K.LowLatencySpec(H, False, logfmt=True) and fn == "combine_both"
    assert p.partials == 0 and st.template.partials == 1  # this call only
    assert (p.lf_meta_off, p.lf_stage_off) == (lay.lf_meta_off, lay.lf_stage_off)
    b.low_latency_combine(y, topk, w, h)
    assert params[-1][1].partials == 1 and specs[-1] == K.LowLatencySpec(H, False)
    n, before = len(rig.launches()), _state(st)
    zc = b.get_next_low_latency_combine_buffer(h)
    with pytest.raises(ValueError, match="zero-copy"):
        b.low_latency_combine(zc, topk, w, h, use_logfmt=True, zero_copy=True)
    with pytest.raises(TypeError, match="use_logfmt must be a bool"):
        b.low_latency_combine(y, topk, w, h, use_logfmt="on")
    assert len(rig.launches()) == n and _state(st) == before
    # A heap big enough for every call but the LogFMT one's group words.
    b2, st2 = _numerics_buffer(rig, "epcomm", rdma=lay.total)
    _, _, h2, _, _ = b2.low_latency_dispatch(x, topk, 8, E, use_fp8=False)
    b2.low_latency_combine(y, topk, w, h2)
    n, before = len(rig.launches()), _state(st2)
    with pytest.raises(ValueError, match=rf"use_logfmt=True .* need num_rdma_bytes >= {lay.lf_total}"):
        b2.low_latency_combine(y, topk, w, h2, use_logfmt=True)
    assert len(rig.launches()) == n and _state(st2) == before
    assert Buffer.get_low_latency_rdma_size_hint(8, H, 2, E) == lay.lf_total


def test_wait_statistics_are_checked_before_launch_and_reach_the_kernels(rig, monkeypatch):
    params, _ = _record_launches(rig, monkeypatch)
    b, st = rig.ll_buffer()
    x, topk, w = _inputs()
    y = torch.zeros(E // 2, 2 * 8, H, dtype=torch.bfloat16)
    ds, cs = torch.zeros(2, dtype=torch.int64), torch.zeros(2, dtype=torch.int64)
    _, _, h, _, _ = b.low_latency_dispatch(x, topk, 8, E, use_fp8=False, dispatch_wait_recv_cost_stats=ds)
    b.low_latency_combine(y, topk, w, h, combine_wait_recv_cost_stats=cs)
    assert [p.wait_stats for _, p in params] == [ds.data_ptr(), cs.data_ptr()]
    b.low_latency_combine(y, topk, w, h)
    assert params[-1][1].wait_stats == 0 and st.template.wait_stats == 0
    n, before = len(rig.launches()), _state(st)
    for bad, exc, msg in ((torch.zeros(2, dtype=torch.int32), TypeError, "int64"),
                          (torch.zeros(3, dtype=torch.int64), ValueError, "shape"),
                          (torch.zeros(1, 2, dtype=torch.int64), ValueError, r"expected shape \(2,\), got \(1, 2\)"),
                          (np.zeros(2, dtype=np.int64), TypeError, "numpy array but x is a torch")):
        with pytest.raises(exc, match=msg):
            b.low_latency_dispatch(x, topk, 8, E, use_fp8=False, dispatch_wait_recv_cost_stats=bad)
        with pytest.raises(exc, match=msg):
            b.low_latency_combine(y, topk, w, h, combine_wait_recv_cost_stats=bad)
    assert len(rig.launches()) == n and _state(st) == before


def test_receive_hooks_keep_the_wait_statistics_alive(rig):
    import gc
    import weakref
    b, _ = rig.ll_buffer()
    x, topk, w = _inputs()
    y = torch.zeros(E // 2, 2 * 8, H, dtype=torch.bfloat16)
    ds = torch.zeros(2, dtype=torch.int64)
    ref = weakref.ref(ds)
    _, _, h, _, hook = b.low_latency_dispatch(x, topk, 8, E, use_fp8=False, return_recv_hook=True,
                                              dispatch_wait_recv_cost_stats=ds)
    del ds
    gc.collect()
    assert ref() is not None
    hook()
    cs = torch.zeros(2, dtype=torch.int64)
    cref = weakref.ref(cs)
    _, _, chook = b.low_latency_combine(y, topk, w, h, return_recv_hook=True, combine_wait_recv_cost_stats=cs)
    del cs
    gc.collect()
    assert cref() is not None
    del hook, chook
    gc.collect()
    assert ref() is None and cref() is None


def _fast_path_rig(rig, monkeypatch):
    """A low-latency Buffer whose CPU tensors pass the fast paths' tests, with the host index check
    off (production) and every launch's params recorded: (params, b, st, x, topk, w, y)."""
    import epcomm.envs as envs
    params, _ = _record_launches(rig, monkeypatch)
    b, st = rig.ll_buffer()
    x, topk, w = _inputs()
    y = torch.zeros(E // 2, 2 * 8, H, dtype=torch.bfloat16)
    monkeypatch.setenv("EPCOMM_CHECK_INDICES", "0")
    envs.CHECK_INDICES.get_memo()
    monkeypatch.setattr(st, "_torch", torch)
    st._tdev, st._get_device = "cpu", lambda: 0
    monkeypatch.setattr(torch.Tensor, "get_device", lambda self: 0)
    monkeypatch.setattr(K, "launch_prepared", lambda *a: rig.log.append(("launch", "prepared")))
    return params, b, st, x, topk, w, y


def test_fast_paths_leave_statistics_and_logfmt_calls_to_the_full_path(rig, monkeypatch):
    params, b, st, x, topk, w, y = _fast_path_rig(rig, monkeypatch)
    ds, cs = torch.zeros(2, dtype=torch.int64), torch.zeros(2, dtype=torch.int64)
    # Both slots get a plan (two rounds), then calls with the options go the full way.
    hs = []
    for _ in range(2):
        _, _, h, _, _ = b.low_latency_dispatch(x, topk, 8, E, use_fp8=False)
        b.low_latency_combine(y, topk, w, h)
        hs.append(h)
    for _ in range(2):
        _, _, h, _, _ = b.low_latency_dispatch(x, topk, 8, E, use_fp8=False, dispatch_wait_recv_cost_stats=ds)
        b.low_latency_combine(y, topk, w, h, combine_wait_recv_cost_stats=cs)
        b.low_latency_combine(y, topk, w, h, use_logfmt=True)
    assert st.fast_calls == 0
    assert [p.wait_stats for _, p in params[-6:]] == [ds.data_ptr(), cs.data_ptr(), 0] * 2
    # ...and a plain call after them is served by a plan made without them.
    _, _, h, _, _ = b.low_latency_dispatch(x, topk, 8, E, use_fp8=False)
    b.low_latency_combine(y, topk, w, h)
    assert st.fast_calls == 2


def test_buffer_numerics_is_checked_first_and_must_agree_across_ranks():
    class _Group(FakeGroup):
        def __init__(self, theirs):
            super().__init__(0, 2)
            self.theirs = theirs

        def allgather_bytes(self, b):
            return [b, self.theirs(b)]

        def broadcast_bytes(self, b, root=0):
            return b

    for bad, exc in (("cuda", ValueError), (None, TypeError), ("DeepEP", ValueError)):
        with pytest.raises(exc, match="numerics"):
            Buffer(_Group(lambda b: b), 0, 1 << 20, low_latency_mode=True, numerics=bad)
    ctx = fake_context(2, group=_Group(lambda b: b.replace(b"deepep", b"epcomm")))
    ctx.numerics = "deepep"
    b = Buffer._assemble(ctx)
    assert b.numerics == "deepep"
    with pytest.raises(ValueError, match=r"same sizes, mode, numerics and enable_shrink; "
                                         r".*0,1048576,1,deepep,0.*0,1048576,1,epcomm,0"):
        b._open_engines(0, 1 << 20, True)


def test_supplied_outputs_take_the_full_path_and_are_what_the_kernels_write(rig, monkeypatch):
    """A caller supplying its outputs (epcomm.torch_ops, epcomm.jax) gets kernels writing into
    them, also where a prepared plan of the Buffer's own results would serve an eager call."""
    from epcomm import interop
    from epcomm.context import CallerOutputs
    from epcomm.low_latency.handle import result_specs
    params, b, st, x, topk, w, y = _fast_path_rig(rig, monkeypatch)
    for _ in range(2):  # both slots get plans
        _, _, h, _, _ = b.low_latency_dispatch(x, topk, 8, E, use_fp8=False)
        b.low_latency_combine(y, topk, w, h)
    fast = st.fast_calls
    outs = {n: interop.empty("torch", s, d, "cpu", 0) for n, (s, d) in result_specs(2, 8, H, E, False, False).items()}
    with b.ctx.supplying(CallerOutputs(7, outs)):
        recv_x, _, h, _, _ = b.low_latency_dispatch(x, topk, 8, E, use_fp8=False)
    assert params[-1][1].recv_x == outs["x"][1].ptr and h.src_info.data_ptr() == outs["src_info"][0].data_ptr()
    assert recv_x.data_ptr() == outs["x"][0].data_ptr()
    # The handle (which epcomm.torch_ops' registry keeps past the call) holds none of the caller's
    # received rows: once the caller drops them, they are freed.
    import gc
    import weakref
    rx_ref = weakref.ref(outs["x"][0])
    del recv_x, outs["x"]
    gc.collect()
    assert rx_ref() is None and h.refs["keep"].x is None
    # No prepared dispatch plan holds the caller's outputs either: an eager call on the fast
    # path would write into them (memory the caller has freed).
    assert all(pl.out[2].data_ptr() != h.src_info.data_ptr() for k, pl in st._plans.items() if k[0] == "d")
    combined = interop.empty("torch", (x.shape[0], H), "bfloat16", "cpu", 0)
    with b.ctx.supplying(CallerOutputs(7, {"combined_x": combined})):
        b.low_latency_combine(y, topk, w, h)
    assert params[-1][1].out == combined[1].ptr and st.fast_calls == fast
    # ...and the combine left no plan behind for the caller's handle.
    assert not any(k[-1] == id(h.refs["keep"]) for k in st._plans if k[0] == "c")
    # Two later dispatches (the second into this one's slot): its handle is stale, also for a
    # caller supplying the combine's output.
    outs = {n: interop.empty("torch", s, d, "cpu", 0) for n, (s, d) in result_specs(2, 8, H, E, False, False).items()}
    with b.ctx.supplying(CallerOutputs(7, outs)):
        _, _, h2, _, _ = b.low_latency_dispatch(x, topk, 8, E, use_fp8=False)
    b.low_latency_dispatch(x, topk, 8, E, use_fp8=False)
    assert h2.slot != h.slot
    combined2 = interop.empty("torch", (x.shape[0], H), "bfloat16", "cpu", 0)
    with b.ctx.supplying(CallerOutputs(7, {"combined_x": combined2})):
        b.low_latency_combine(y, topk, w, h2)  # still the latest of its slot
        with pytest.raises(BufferStateError, match="overwritten by a later dispatch"):
            b.low_latency_combine(y, topk, w, h)


def test_a_call_of_another_layout_is_refused_while_a_receive_hook_is_pending(rig, monkeypatch):
    """Where a slot's messages and rows sit depends on (T, H, E): a call of another layout would
    write over what a pending receive, here or at a peer, has yet to read (tests/cpu/
    test_low_latency_order.py: two dispatches in flight).  The same layout goes on, and the fast
    paths leave every call to the full path while a hook is pending."""
    params, b, st, x, topk, w, y = _fast_path_rig(rig, monkeypatch)
    _, _, h, _, _ = b.low_latency_dispatch(x, topk, 8, E, use_fp8=False)      # plans for both slots
    b.low_latency_combine(y, topk, w, h)
    _, _, h, _, _ = b.low_latency_dispatch(x, topk, 8, E, use_fp8=False)
    b.low_latency_combine(y, topk, w, h)
    fast = st.fast_calls
    _, _, h0, _, dhook = b.low_latency_dispatch(x, topk, 8, E, use_fp8=False, return_recv_hook=True)
    n, before = len(rig.launches()), _state(st)
    x16 = torch.zeros(4, 2 * H, dtype=torch.bfloat16)
    for call in (lambda: b.low_latency_dispatch(x, topk, 16, E, use_fp8=False),            # another T
                 lambda: b.low_latency_dispatch(x16, topk, 8, E, use_fp8=False),           # another H
                 lambda: b.low_latency_dispatch(x, topk, 8, 2 * E, use_fp8=False)):        # another E
        with pytest.raises(BufferStateError, match="receive hook of a low_latency_dispatch with another shape"):
            call()
    assert len(rig.launches()) == n and _state(st) == before
    _, _, h1, _, _ = b.low_latency_dispatch(x, topk, 8, E, use_fp8=False)  # the same layout, other slot
    assert st.fast_calls == fast and len(rig.launches()) == n + 1         # not the prepared plan
    dhook()
    _, _, chook = b.low_latency_combine(y, topk, w, h0, return_recv_hook=True)
    n = len(rig.launches())
    with pytest.raises(BufferStateError, match="receive hook of a low_latency_combine with another shape"):
        b.low_latency_dispatch(x, topk, 16, E, use_fp8=False)
    assert len(rig.launches()) == n
    b.low_latency_combine(y, topk, w, h1)
    assert st.fast_calls == fast
    chook()
    assert st._hooks_pending == 0
    b.low_latency_dispatch(x, topk, 16, E, use_fp8=False)  # nothing pending: any layout
    _, _, h, _, _ = b.low_latency_dispatch(x, topk, 8, E, use_fp8=False)
    b.low_latency_combine(y, topk, w, h)
    assert st.fast_calls > fast  # the plans serve again
