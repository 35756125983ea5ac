"""Rank masks (shrink mode) on the CPU: the reference's masked routing, the shrink timeout knob,
the host's view of the mask words (on a fake driver), the Buffer's mask calls and their
argument checks, and the DeepEP names."""
from __future__ import annotations

import contextlib

import ml_dtypes
import numpy as np
import pytest

from epcomm import Buffer, envs, reference
from epcomm.errors import BufferStateError
from epcomm.reference.masks import check_masked_ranks
from epcomm.runtime import driver
from epcomm.runtime.rankmask import RankMask
from tests.helpers.fake_runtime import FakeGroup, fake_buffer, fake_context


def _routing(R=4, N=16, E=16, K=4, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(R):
        idx = np.stack([rng.permutation(E)[:K] for _ in range(N)]).astype(np.int64)
        idx[rng.random((N, K)) < 0.15] = -1
        out.append(idx)
    return out


# ---- the reference --------------------------------------------------------------------------
def test_mask_routing_removes_the_masked_ranks_experts_and_tokens():
    R, E = 4, 16
    topk = _routing(R, E=E)
    got = reference.mask_routing(topk, E, [2])
    L = E // R
    assert (got[2] == -1).all()  # a masked rank sends nothing
    for r in (0, 1, 3):
        on_masked = (topk[r] >= 0) & (topk[r] // L == 2)
        assert (got[r][on_masked] == -1).all()
        np.testing.assert_array_equal(got[r][~on_masked], topk[r][~on_masked])
    assert all((a == b).all() for a, b in zip(reference.mask_routing(topk, E, []), topk))
    assert all(a is not b for a, b in zip(got, topk))  # new arrays: the input is left alone


@pytest.mark.parametrize("args, err, match", [
    (("nope",), TypeError, "masked_ranks"),
    ((5,), TypeError, "masked_ranks"),
    (([4],), ValueError, "masked_ranks"),
    (([-1],), ValueError, "masked_ranks"),
    (([1.0],), TypeError, "masked_ranks"),
])
def test_mask_routing_rejects_bad_masked_ranks(args, err, match):
    with pytest.raises(err, match=match):
        reference.mask_routing(_routing(4), 16, *args)


def test_mask_routing_rejects_bad_routing():
    with pytest.raises(ValueError, match="multiple"):
        reference.mask_routing(_routing(4), 18, [1])
    with pytest.raises(TypeError, match="topk_idx"):
        reference.mask_routing([t.astype(np.int32) for t in _routing(4)], 16, [1])
    assert check_masked_ranks((np.int64(1), 3), 4) == frozenset({1, 3})


def test_reference_dispatch_and_combine_with_a_masked_rank():
    R, N, E, H, dead = 4, 16, 16, 128, 1
    rng = np.random.default_rng(3)
    x = [rng.standard_normal((N, H)).astype(ml_dtypes.bfloat16) for _ in range(R)]
    topk = reference.mask_routing(_routing(R, N, E), E, [dead])
    res = reference.dispatch(x, E, topk_idx=topk)
    for d in range(R):
        if d == dead:
            assert res[d].recv_x.shape[0] == 0 and sum(res[d].num_recv_tokens_per_expert_list) == 0
            continue
        prefix = res[d].handle.rank_prefix
        assert prefix[dead + 1] == prefix[dead]  # nothing from the masked rank
        # every received entry is a local expert of d (never one of the masked rank)
        assert ((res[d].recv_topk_idx == -1) | (res[d].recv_topk_idx < E // R)).all()
    out = reference.combine([r.recv_x for r in res], [r.handle for r in res])
    # a survivor's token whose every expert was on the masked rank comes back as zeros
    for r in (0, 2, 3):
        nowhere = (topk[r] == -1).all(axis=1)
        assert (out[r][0][nowhere].astype(np.float32) == 0).all()
        assert not res[r].handle.is_token_in_rank[:, dead].any()


def test_reference_low_latency_with_a_masked_rank():
    R, N, E, H, T, dead = 4, 8, 16, 128, 8, 3
    rng = np.random.default_rng(4)
    x = [rng.standard_normal((N, H)).astype(ml_dtypes.bfloat16) for _ in range(R)]
    topk = reference.mask_routing(_routing(R, N, E, K=3, seed=5), E, [dead])
    res = reference.low_latency_dispatch(x, topk, T, E, use_fp8=False)
    assert int(res[dead].recv_count.sum()) == 0
    # the survivors' received rows all come from survivors' tokens, and none for the masked rank's experts
    assert sum(int(res[r].recv_count.sum()) for r in range(R)) == sum(int((t >= 0).sum()) for t in topk)


# ---- the knob -------------------------------------------------------------------------------
def test_shrink_timeout_knob(monkeypatch):
    monkeypatch.delenv("EPCOMM_SHRINK_TIMEOUT_MS", raising=False)
    assert envs.SHRINK_TIMEOUT_MS.get() == 10000
    ctx = fake_context(2, timeout_s=7.0)
    assert ctx.kernel_timeout_s() == 7.0  # shrink off: EPCOMM_TIMEOUT_S
    ctx.shrink = True
    monkeypatch.setenv("EPCOMM_SHRINK_TIMEOUT_MS", "250")
    assert ctx.kernel_timeout_s() == 0.25
    # The first call of a kernel module on the Buffer waits EPCOMM_TIMEOUT_S (a peer may still be
    # compiling that module); later calls of it, the shrink timeout.
    assert [ctx.kernel_timeout_s(s) for s in ("notify", "notify", "combine", "combine")] == [7.0, 0.25, 7.0, 0.25]
    monkeypatch.setenv("EPCOMM_SHRINK_TIMEOUT_MS", "9000")
    assert ctx.kernel_timeout_s("ll") == 9.0  # never shorter than the shrink timeout
    monkeypatch.setenv("EPCOMM_SHRINK_TIMEOUT_MS", "250")
    for bad in ("0", "-3", "fast"):
        monkeypatch.setenv("EPCOMM_SHRINK_TIMEOUT_MS", bad)
        with pytest.raises(ValueError, match="EPCOMM_SHRINK_TIMEOUT_MS"):
            envs.SHRINK_TIMEOUT_MS.get()
    assert "EPCOMM_SHRINK_TIMEOUT_MS" in envs.table_markdown()


# ---- the host's view of the mask words, on a fake driver ------------------------------------
class FakeMemory:
    """Device memory as NumPy words by address; the driver calls RankMask makes."""

    def __init__(self, monkeypatch, addrs, num_ranks):
        self.words = {a: np.zeros(num_ranks, np.int32) for a in addrs}
        self.syncs = 0
        monkeypatch.setattr(driver, "memcpy_dtoh", self.dtoh)
        monkeypatch.setattr(driver, "memcpy_htod", self.htod)
        monkeypatch.setattr(driver, "device_sync", self.sync)
        monkeypatch.setattr(driver, "on_device", lambda dev: contextlib.nullcontext())

    def sync(self):
        self.syncs += 1

    def dtoh(self, host_ptr, src, nbytes):
        n = nbytes // 4
        np.ctypeslib.as_array((np.ctypeslib.ctypes.c_int32 * n).from_address(host_ptr))[:] = self.words[src][:n]

    def htod(self, dst, host_ptr, nbytes):  # dst: an array's address or one of its words
        n = nbytes // 4
        base = max(a for a in self.words if a <= dst)
        i = (dst - base) // 4
        assert i + n <= len(self.words[base]), "a write past the mask words"
        self.words[base][i:i + n] = np.ctypeslib.as_array((np.ctypeslib.ctypes.c_int32 * n).from_address(host_ptr))


def test_rank_mask_update_query_clean(monkeypatch):
    mem = FakeMemory(monkeypatch, [0x1000, 0x2000], 4)
    m = RankMask(0, rank=0, num_ranks=4, addrs=[0x1000, 0x2000])
    assert m.query().tolist() == [0, 0, 0, 0] and m.query().dtype == np.int32
    m.update(2)
    assert m.query().tolist() == [0, 0, 1, 0]
    assert all(w.tolist() == [0, 0, 1, 0] for w in mem.words.values())  # both engines' words
    mem.words[0x2000][3] = 1  # a kernel of one engine masked rank 3 (a timeout, or a peer's publication)
    assert m.masked_ranks() == [2, 3]
    assert mem.words[0x1000].tolist() == [0, 0, 1, 1]  # the union went back into both
    m.update(np.int64(2), masked=False)
    assert m.masked_ranks() == [3]
    m.clean()
    assert m.masked_ranks() == [] and mem.syncs > 0


@pytest.mark.parametrize("args, err, match", [
    ((4,), ValueError, "rank"), ((-1,), ValueError, "rank"), (("1",), TypeError, "rank"),
    ((0,), ValueError, "own rank"), ((1, "yes"), TypeError, "masked"),
])
def test_rank_mask_rejects_bad_arguments_before_writing(monkeypatch, args, err, match):
    mem = FakeMemory(monkeypatch, [0x1000], 4)
    m = RankMask(0, rank=0, num_ranks=4, addrs=[0x1000])
    with pytest.raises(err, match=match):
        m.update(*args)
    assert mem.words[0x1000].tolist() == [0, 0, 0, 0]


# ---- the Buffer's calls ------------------------------------------------------------------------
def test_buffer_mask_calls_need_shrink_mode_and_a_live_buffer(monkeypatch):
    b = fake_buffer()
    for call in (lambda: b.update_mask(1), b.query_mask, b.clean_mask):
        with pytest.raises(BufferStateError, match="enable_shrink"):
            call()
    FakeMemory(monkeypatch, [0x1000], 2)
    b.ctx.mask = RankMask(0, 0, 2, [0x1000])
    b.update_mask(1)
    assert b.query_mask().tolist() == [0, 1]
    b.clean_mask()
    assert b.query_mask().tolist() == [0, 0]
    with pytest.raises(ValueError, match="own rank"):
        b.update_mask(0)
    b.ctx.destroyed = True
    with pytest.raises(BufferStateError, match="destroyed"):
        b.query_mask()


def test_enable_shrink_is_checked_before_any_gpu_work(monkeypatch):
    monkeypatch.setattr(driver, "init", lambda: pytest.fail("the GPU was reached before enable_shrink was checked"))
    with pytest.raises(TypeError, match="enable_shrink"):
        Buffer(None, 1 << 20, enable_shrink="yes")


# ---- the DeepEP names ------------------------------------------------------------------------
def test_deep_ep_mask_buffer_calls():
    torch = pytest.importorskip("torch")
    from epcomm import deep_ep

    class Native:
        num_ranks, rank, internode = 4, 0, False

        def __init__(self):
            self.calls, self.mask = [], np.zeros(4, np.int32)

        def update_mask(self, rank, masked=True):
            self.calls.append(("update", rank, masked))
            self.mask[rank] = int(masked)

        def query_mask(self):
            return self.mask.copy()

        def clean_mask(self):
            self.calls.append(("clean",))
            self.mask[:] = 0

    native = Native()
    buf = deep_ep.Buffer._around(native, group="g", low_latency_mode=True, enable_shrink=True)
    buf.low_latency_update_mask_buffer(2, True)
    buf.low_latency_update_mask_buffer(3)  # DeepEP's default: mask=False, unmask
    assert native.calls == [("update", 2, True), ("update", 3, False)]
    status = torch.zeros(4, dtype=torch.int32)
    buf.low_latency_query_mask_buffer(status)
    assert status.tolist() == [0, 0, 1, 0]
    for bad, err in ((torch.zeros(4, dtype=torch.int64), ValueError), (torch.zeros(3, dtype=torch.int32), ValueError),
                     (np.zeros(4, np.int32), TypeError)):
        with pytest.raises(err, match="mask_status"):
            buf.low_latency_query_mask_buffer(bad)
    buf.low_latency_clean_mask_buffer()
    assert native.calls[-1] == ("clean",) and native.mask.tolist() == [0, 0, 0, 0]


# ---- the CPU's bounded wait for a dispatch's counts names the missing ranks -----------------
def test_counts_timeout_names_the_ranks_that_never_arrived():
    from epcomm.errors import EpcommTimeoutError
    from epcomm.normal.state import counts_timeout
    ctx = fake_context(4, rank=0, timeout_s=3.0)
    info = np.zeros(2 + 4, np.int32)
    info[2:6] = [0, 0, -1, -1]  # the notify kernel heard from ranks 0 and 1 only
    e = counts_timeout(info, ctx, "dispatch")
    assert isinstance(e, EpcommTimeoutError) and e.peer == 2 and e.rank == 0 and e.phase == "notify"
    assert "ranks [2, 3] never sent theirs" in str(e)
    info[2:6] = -1  # not even this rank: the kernel never ran
    e = counts_timeout(info, ctx, "dispatch")
    assert e.peer == -1 and "never ran" in str(e)


# ---- the shrink timeout reaches every launch, the fast paths' prepared ones included ---------
def test_fast_paths_launch_with_the_shrink_timeout_of_the_call(monkeypatch):
    """The prepared launches of the low-latency fast paths keep the params of the call that
    made them: a Buffer warmed up with a long EPCOMM_SHRINK_TIMEOUT_MS (as the fault-injection
    tests do, so a cold compile masks nobody) must wait only the short one afterwards."""
    torch = pytest.importorskip("torch")
    from epcomm.kernels import low_latency as K
    from fake_rig import FakeRuntime
    rig = FakeRuntime(monkeypatch)
    b, st = rig.ll_buffer()
    b.ctx.shrink = True
    H, E, N, Kt = 256, 8, 4, 2
    x = torch.zeros(N, H, dtype=torch.bfloat16)
    topk = (torch.arange(N * Kt).reshape(N, Kt) % E).to(torch.int64)
    w = torch.ones(N, Kt, dtype=torch.float32)
    y = torch.zeros(E // 2, 2 * 8, H, dtype=torch.bfloat16)
    monkeypatch.setenv("EPCOMM_CHECK_INDICES", "0")
    monkeypatch.setattr(st, "_torch", torch)
    st._tdev, st._get_device = "cpu", lambda: 0
    monkeypatch.setattr(torch.Tensor, "get_device", lambda self: 0)
    launched = []
    monkeypatch.setattr(K, "launch_plan", lambda fn, grid, stream, args, smem: launched.append(args))
    monkeypatch.setenv("EPCOMM_SHRINK_TIMEOUT_MS", "600000")
    for _ in range(2):  # both slots get a plan, made with the long timeout
        _, _, h, _, _ = b.low_latency_dispatch(x, topk, 8, E, use_fp8=False)
        b.low_latency_combine(y, topk, w, h)
    assert st.fast_calls == 0 and {p.p.timeout_ns for p in st._plans.values()} == {600 * 10**9}
    monkeypatch.setenv("EPCOMM_SHRINK_TIMEOUT_MS", "4000")
    for _ in range(2):
        _, _, h, _, _ = b.low_latency_dispatch(x, topk, 8, E, use_fp8=False)
        b.low_latency_combine(y, topk, w, h)
    assert st.fast_calls == 4 and len(launched) == 4
    assert {p.p.timeout_ns for p in st._plans.values()} == {4 * 10**9}


# ---- destroy(group=...) with ranks missing: no collective that waits for them -----------------
class _FakeLowLatency:
    """What destroy() asks of a LowLatencyState: free, and whether collectively (NVSHMEM's free
    of the symmetric heap waits for every PE of the Buffer)."""

    def __init__(self):
        self.frees = []

    def free(self, collective=True):
        self.frees.append(collective)


class _Group(FakeGroup):
    """The whole group protocol (destroy checks it); ``tags``: what the allgather returns
    (default: every rank's bytes are this rank's), or an exception it raises."""

    def __init__(self, rank, size, log, tags=None):
        super().__init__(rank, size, log)
        self.tags = tags

    def allgather_bytes(self, b):
        if isinstance(self.tags, Exception):
            raise self.tags
        return super().allgather_bytes(b) if self.tags is None else self.tags

    def broadcast_bytes(self, b, root=0):
        return b


def _destroy_rig(monkeypatch):
    """A low-latency Buffer of 4 ranks on a fake runtime, and what its heap's free was told."""
    monkeypatch.setattr(driver, "on_device", lambda dev: contextlib.nullcontext())
    monkeypatch.setattr(driver, "device_sync", lambda: None)
    ll = _FakeLowLatency()
    return fake_buffer(normal=False, num_ranks=4, low_latency=ll), ll


@pytest.mark.parametrize("group_size, shrink, collective", [
    (4, False, True),   # every rank of the Buffer meets: the heap is freed collectively
    (3, False, False),  # survivors of a dead rank, no shrink mode: the dead PE never joins
    (1, True, False),   # a rank leaving alone (LocalGroup) after its peers masked it
    (3, True, False),   # survivors, the dead rank masked
])
def test_destroy_frees_the_heap_collectively_only_with_every_rank(monkeypatch, group_size, shrink, collective):
    b, ll = _destroy_rig(monkeypatch)
    if shrink:  # a survivor's words hold the dead rank; a leaving rank is masked in its peers' only
        mem = FakeMemory(monkeypatch, [0x1000], 4)
        mem.words[0x1000][3] = int(group_size > 1)
        b.ctx.mask = RankMask(0, 0, 4, [0x1000])
    log = []
    b.destroy(group=_Group(0, group_size, log))
    assert log == [("allgather", b"epcomm.Buffer.destroy")] and ll.frees == [collective]


@pytest.mark.parametrize("elsewhere", ["barrier", "raises"])
def test_destroy_frees_alone_when_a_rank_is_not_destroying(monkeypatch, elsewhere):
    """A rank out of step (its barrier paired with this destroy's meeting), or a meeting that
    fails: no collective free (NVSHMEM's would wait for that rank forever), and a warning."""
    b, ll = _destroy_rig(monkeypatch)
    tag = b"epcomm.Buffer.destroy"
    tags = TimeoutError("rank 2 did not arrive") if elsewhere == "raises" else [tag, tag, b"", tag]
    with pytest.warns(RuntimeWarning, match=r"rank\(s\) \[2\] of the group are not destroying" if elsewhere == "barrier"
                      else "meeting the other ranks failed"):
        b.destroy(group=_Group(0, 4, [], tags))
    assert ll.frees == [False] and b.ctx.destroyed


def test_destroy_with_a_bad_group_raises_and_keeps_the_buffer(monkeypatch):
    monkeypatch.setattr(driver, "on_device", lambda dev: contextlib.nullcontext())
    ll = _FakeLowLatency()
    b = fake_buffer(normal=False, num_ranks=4, low_latency=ll)
    with pytest.raises(TypeError, match="group"):
        b.destroy(group=42)
    assert not b.ctx.destroyed and ll.frees == []


def test_the_cpu_waits_for_the_counts_at_least_as_long_as_the_shrink_timeout(monkeypatch):
    """A CPU that gave up before the notify kernel masked the missing peer would raise (and
    poison the Buffer) where shrink mode completes the call: with EPCOMM_SHRINK_TIMEOUT_MS
    longer than EPCOMM_TIMEOUT_S (a warm-up that must mask nobody) the CPU waits longer too."""
    from epcomm.errors import EpcommTimeoutError
    from epcomm.normal import state
    ctx = fake_context(2, timeout_s=3.0)
    monkeypatch.setenv("EPCOMM_SHRINK_TIMEOUT_MS", "600000")
    assert state.counts_wait_s(ctx) == 5.0  # shrink off: EPCOMM_TIMEOUT_S + 2
    ctx.shrink = True
    assert state.counts_wait_s(ctx) == 2402.0  # 4 shrink timeouts + 2
    monkeypatch.setenv("EPCOMM_SHRINK_TIMEOUT_MS", "500")
    assert state.counts_wait_s(ctx) == 5.0  # never shorter than EPCOMM_TIMEOUT_S
    # The wait itself: it gives up only after that bound (a fake clock), naming it.
    now = [0.0]
    monkeypatch.setattr(state.time, "monotonic", lambda: now[0])
    monkeypatch.setattr(state.time, "sleep", lambda s: None)
    info = np.zeros(2 + 2, np.int32)
    info[2:] = [0, -1]

    class Clock:
        def __getitem__(self, i):  # every read of the ready word advances the clock 1 ms
            now[0] += 0.001
            return info[i]

        def __setitem__(self, i, v):
            info[i] = v

    monkeypatch.setenv("EPCOMM_SHRINK_TIMEOUT_MS", "600000")
    with pytest.raises(EpcommTimeoutError, match="within 2402 s") as e:
        state.wait_counts(Clock(), ctx, "dispatch")
    assert 2402.0 <= now[0] < 2403.0 and e.value.peer == 1


def test_rank_mask_writes_leave_a_peers_concurrent_publication_alone(monkeypatch):
    """A peer's kernel publishes into this rank's words whenever it masks a rank (its calls do
    not wait for this host): query and update write back only the entries they change."""
    mem = FakeMemory(monkeypatch, [0x1000, 0x2000], 4)
    m = RankMask(0, rank=0, num_ranks=4, addrs=[0x1000, 0x2000])
    mem.words[0x2000][2] = 1
    read = mem.dtoh

    def dtoh_then_publish(host_ptr, src, nbytes):  # the peer's store lands after the host's read
        read(host_ptr, src, nbytes)
        if src == 0x1000:
            mem.words[0x1000][3] = 1

    monkeypatch.setattr(driver, "memcpy_dtoh", dtoh_then_publish)
    assert m.query().tolist() == [0, 0, 1, 0]  # what was read
    assert mem.words[0x1000].tolist() == [0, 0, 1, 1]  # the union went in, the peer's entry stayed
    mem.words[0x1000][3] = 0
    m.update(1)
    assert mem.words[0x1000].tolist() == [0, 1, 1, 1] and mem.words[0x2000].tolist() == [0, 1, 1, 0]


def test_clean_mask_leaves_a_peers_concurrent_publication_alone(monkeypatch):
    """clean clears only the entries it read as masked: a peer's publication landing between the
    host's read and its write (the peer's call does not wait for this host) stays, as with query
    and update; a whole-array write of zeros undid it."""
    mem = FakeMemory(monkeypatch, [0x1000, 0x2000], 4)
    m = RankMask(0, rank=0, num_ranks=4, addrs=[0x1000, 0x2000])
    mem.words[0x1000][1] = 1
    mem.words[0x2000][2] = 1
    read = mem.dtoh

    def dtoh_then_publish(host_ptr, src, nbytes):
        read(host_ptr, src, nbytes)
        if src == 0x2000:
            mem.words[0x1000][3] = 1

    monkeypatch.setattr(driver, "memcpy_dtoh", dtoh_then_publish)
    m.clean()
    assert mem.words[0x1000].tolist() == [0, 0, 0, 1] and mem.words[0x2000].tolist() == [0, 0, 0, 0]


# ---- which rank pairs a low-latency combine sends partial sums between --------------------------
def test_partial_pairs_follow_the_links_and_the_settings(monkeypatch):
    """LowLatencyState.partial_pairs: the Buffer's setting between ranks that reach each other
    over NVLink (one node, declared nodes included, both mapping the other's heap), never across
    nodes, between GPUs mapped one way only, nor with every peer through puts (what the kernels'
    ll_partial decides; the GPU tests and the soak take their expectation from it)."""
    import types
    from epcomm.low_latency.state import LowLatencyState, nvlink_links
    reach = [bytearray(b"\x01" * 4) for _ in range(4)]
    st = types.SimpleNamespace(partials=True, force_put=False, links=nvlink_links(reach))
    pairs = LowLatencyState.partial_pairs
    assert pairs(st).all() and not pairs(st, False).any()
    st.links = nvlink_links(reach, types.SimpleNamespace(spans_nodes=True, node_of=lambda r: r // 2))
    want = np.array([[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 1], [0, 0, 1, 1]], dtype=bool)
    assert np.array_equal(pairs(st), want) and not pairs(st, False).any()
    reach[3][1] = 0  # rank 3 cannot map rank 1's heap: puts both ways between them
    st.links = nvlink_links(reach)
    want = np.ones((4, 4), dtype=bool)
    want[1, 3] = want[3, 1] = False
    assert np.array_equal(pairs(st), want)
    st.force_put = True
    assert not pairs(st).any() and not pairs(st, True).any()
