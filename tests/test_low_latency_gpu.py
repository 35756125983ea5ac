"""Low-latency dispatch/combine on every visible GPU, against epcomm.reference.

One process per GPU, all cases in one spawn; every rank derives all ranks' inputs from the
case seed and checks its own outputs bit for bit: packed rows (FP8 bytes and scales included),
counts, source indices, ranges and combined values.  Each case runs three rounds with new data,
so both buffer slots are used and reused.  Marked gpu/multigpu.  With one GPU the tests run
with one rank, or with 2 sharing it under EPCOMM_SHARE_GPU=1 (correctness only);
EPCOMM_TEST_RANKS picks another number of ranks.
"""
from __future__ import annotations

import zlib
import os

import numpy as np
import pytest

from epcomm import spawn
from gpu_checks import (assert_bits as _assert_bits, assert_every_rank_ok, device_of, ll_ranks as _world,
                        needs_ll_ranks, needs_two_ll_ranks, run_once, to_np as _np)

pytestmark = [pytest.mark.gpu, pytest.mark.multigpu]


def _case(name, **kw):
    base = dict(name=name, T=128, N=None, H=7168, E=64, K=8, fp8=True, round_scale=False, ue8m0=False,
                hook=False, async_=False, zero_copy=False, out=False, stats=False, drop=0.1)
    base.update(kw)
    return base


CASES = [
    _case("fp8_t128_h7168_e256_k8", E=256),
    _case("fp8_t128_h7168_e288_k8_hook", E=288, hook=True),
    _case("bf16_t128_h4096_e64_k8", H=4096, fp8=False),
    _case("fp8_round_scale_t256_h2048", T=256, H=2048, round_scale=True),
    _case("fp8_ue8m0_t256_h7168", T=256, round_scale=True, ue8m0=True, E=128),
    _case("fp8_t1_k1", T=1, K=1, E=32),
    _case("fp8_t1_k16_e32", T=1, K=16, E=32),
    _case("bf16_k16_e32_hook", K=16, E=32, fp8=False, hook=True),
    _case("fp8_async", E=64, async_=True),
    _case("fp8_partial_batch_n50_t128", N=50, E=64, stats=True),
    _case("fp8_zero_copy_out", E=64, zero_copy=True, out=True),
    _case("fp8_out", E=64, out=True),
    _case("fp8_heavy_drop", E=64, drop=0.6),
    _case("bf16_t256_h2048_e288_k16", T=256, H=2048, E=288, K=16, fp8=False),
]


def _up(a):
    import ml_dtypes
    import torch
    a = np.ascontiguousarray(a)
    if a.dtype == ml_dtypes.bfloat16:
        return torch.from_numpy(a.view(np.int16)).cuda().view(torch.bfloat16)
    return torch.from_numpy(a).cuda()


def _round(rank, world, buf, case, it, stats):
    import ml_dtypes
    import torch

    from epcomm import reference
    from epcomm.testing import random_bf16, random_topk, random_weights
    T, H, E, K = case["T"], case["H"], case["E"], case["K"]
    L = E // world
    rng = np.random.default_rng((zlib.crc32(case["name"].encode()) + 7919 * it) % 2**32)
    xs, tks, ws = [], [], []
    for r in range(world):
        n = case["N"] if case["N"] is not None else T
        tk = random_topk(rng, n, E, K, drop_prob=case["drop"])
        tks.append(tk)
        ws.append(random_weights(rng, tk))
        xs.append(random_bf16(rng, (n, H)))
    ref = reference.low_latency_dispatch(xs, tks, T, E, use_fp8=case["fp8"], round_scale=case["round_scale"],
                                         use_ue8m0=case["ue8m0"])
    x, topk, w = _up(xs[rank]), _up(tks[rank]), _up(ws[rank])
    recv, cnt, handle, ev, hook = buf.low_latency_dispatch(
        x, topk, T, E, use_fp8=case["fp8"], round_scale=case["round_scale"], use_ue8m0=case["ue8m0"],
        async_finish=case["async_"], return_recv_hook=case["hook"], cumulative_local_expert_recv_stats=stats)
    if case["hook"]:
        hook()
    if case["async_"]:
        ev.current_stream_wait()
    rr = ref[rank]
    got_cnt = _np(cnt)
    _assert_bits("recv_count", got_cnt, rr.recv_count)
    _assert_bits("layout_range", _np(handle.layout_range), rr.handle.layout_range)
    src = _np(handle.src_info)
    gx = _np(recv[0] if case["fp8"] else recv)
    gs = _np(recv[1]) if case["fp8"] else None
    for j in range(L):
        c = int(rr.recv_count[j])
        _assert_bits(f"src_info[{j}]", src[j, :c], rr.handle.src_info[j, :c])
        _assert_bits(f"recv_x[{j}]", gx[j, :c], rr.recv_x[j, :c])
        if case["fp8"]:
            _assert_bits(f"recv_x_scales[{j}]", gs[j, :c], rr.recv_x_scales[j, :c])
    # Expert outputs: y_d[j] = bf16(float32(expert input) * (d + 1.5) * (1 + j / 64)): every
    # expert's row differs, so the order of a combine's additions shows.
    ys = []
    fac = (1 + np.arange(L, dtype=np.float32) / 64)[:, None, None]
    for d in range(world):
        r = ref[d]
        base = r.recv_x.astype(np.float32)
        if case["fp8"]:
            sc = r.recv_x_scales
            if case["ue8m0"]:
                sc = reference.unpack_ue8m0(sc, H // 128)
            base = base * np.repeat(sc.astype(np.float32), 128, axis=-1)
        ys.append((base * np.float32(d + 1.5) * fac).astype(ml_dtypes.bfloat16))
    from epcomm import envs
    partials = envs.LL_COMBINE_PARTIALS.get() and not envs.LL_FORCE_NVSHMEM_PUT.get()
    cref = reference.low_latency_combine(ys, tks, ws, [r.handle for r in ref], partials=partials)[rank]
    if case["zero_copy"]:
        y = buf.get_next_low_latency_combine_buffer(handle)
        y.copy_(_up(ys[rank]))
    else:
        y = _up(ys[rank])
    out = torch.empty(xs[rank].shape, dtype=torch.bfloat16, device="cuda") if case["out"] else None
    comb, ev2, hook2 = buf.low_latency_combine(y, topk, w, handle, zero_copy=case["zero_copy"], out=out,
                                               async_finish=case["async_"], return_recv_hook=case["hook"])
    if case["hook"]:
        hook2()
    if case["async_"]:
        ev2.current_stream_wait()
    if out is not None:
        assert comb.data_ptr() == out.data_ptr(), "out= was not used"
    _assert_bits("combined", _np(comb), cref)
    return rr.recv_count


def _worker(rank, world, group, cases, rounds=3):
    import torch

    import epcomm
    torch.cuda.set_device(device_of(rank))
    need = max(epcomm.Buffer.get_low_latency_rdma_size_hint(c["T"], c["H"], world, c["E"]) for c in cases)
    buf = epcomm.Buffer(group, 0, need, low_latency_mode=True)
    results = {}
    for case in cases:
        spawn.phase(case["name"])
        try:
            stats = torch.zeros(case["E"] // world, dtype=torch.int32, device="cuda") if case["stats"] else None
            total = 0
            fast0 = buf._ll.fast_calls
            for it in range(rounds):
                total = total + _round(rank, world, buf, case, it, stats)
            results["fast_calls:" + case["name"]] = buf._ll.fast_calls - fast0
            if stats is not None:
                _assert_bits("cumulative stats", stats.cpu().numpy(), total.astype(np.int32))
            results[case["name"]] = "ok"
        except AssertionError as e:
            results[case["name"]] = f"FAIL: {e}"
        except Exception as e:
            import traceback
            results[case["name"]] = f"ERROR: {type(e).__name__}: {e}\n{traceback.format_exc()}"
        torch.cuda.synchronize()
        group.barrier()
        if results[case["name"]].startswith("ERROR"):
            break
    buf.destroy()
    return results


PUT_CASES = ["fp8_t128_h7168_e256_k8", "bf16_k16_e32_hook", "fp8_zero_copy_out", "fp8_ue8m0_t256_h7168"]
ROWS_CASES = ["fp8_t128_h7168_e256_k8", "bf16_k16_e32_hook", "fp8_zero_copy_out", "fp8_t1_k16_e32"]


@run_once
def _results(mode: str):
    """mode: "nvlink" (defaults), "put" (EPCOMM_LL_FORCE_NVSHMEM_PUT=1) or "rows"
    (EPCOMM_LL_COMBINE_PARTIALS=0: one combine row per (token, expert) over NVLink)."""
    env = {"EPCOMM_LL_FORCE_NVSHMEM_PUT": "1" if mode == "put" else "0",
           "EPCOMM_LL_COMBINE_PARTIALS": "0" if mode == "rows" else "1"}
    names = {"put": PUT_CASES, "rows": ROWS_CASES}.get(mode)
    cases = CASES if names is None else [c for c in CASES if c["name"] in names]
    return spawn.run(_worker, _world(), cases, timeout=float(os.environ.get("EPCOMM_TEST_TIMEOUT", 480)), env=env)


# The steady-state fast paths (torch, default flags, shapes seen before) serve calls only with
# EPCOMM_CHECK_INDICES=0 (as in `epcomm bench` and in production); 4 rounds: the first two
# prepare both slots, the last two (one per slot) go through the fast paths.
FAST_CASES = ["fp8_t128_h7168_e256_k8", "bf16_t128_h4096_e64_k8", "fp8_ue8m0_t256_h7168", "fp8_t1_k1",
              "fp8_out", "bf16_t256_h2048_e288_k16"]


@run_once
def _results_fast():
    cases = [c for c in CASES if c["name"] in FAST_CASES]
    return spawn.run(_worker, _world(), cases, 4, timeout=float(os.environ.get("EPCOMM_TEST_TIMEOUT", 480)),
                     env={"EPCOMM_CHECK_INDICES": "0"})


@needs_ll_ranks
@pytest.mark.parametrize("name", FAST_CASES)
def test_low_latency_fast_paths_against_reference(name):
    for rank, r in enumerate(_results_fast()):
        v = r.get(name, "not run (an earlier case crashed)")
        assert v == "ok", f"rank {rank}: {v}"
        # rounds 3 and 4: dispatch and combine each through the fast path
        assert r["fast_calls:" + name] == 4, f"rank {rank}: {r['fast_calls:' + name]} fast-path calls, expected 4"


@needs_ll_ranks
@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_low_latency_against_reference(case):
    for rank, r in enumerate(_results("nvlink")):
        v = r.get(case["name"], "not run (an earlier case crashed)")
        assert v == "ok", f"rank {rank}: {v}"


@needs_ll_ranks
@pytest.mark.parametrize("name", PUT_CASES)
def test_low_latency_nvshmem_put_path(name):
    """EPCOMM_LL_FORCE_NVSHMEM_PUT=1: every peer through NVSHMEM puts/signals (the RDMA code path)."""
    for rank, r in enumerate(_results("put")):
        v = r.get(name, "not run (an earlier case crashed)")
        assert v == "ok", f"rank {rank}: {v}"


@needs_ll_ranks
@pytest.mark.parametrize("name", ROWS_CASES)
def test_low_latency_combine_without_partials(name):
    """EPCOMM_LL_COMBINE_PARTIALS=0: the combine sends one bf16 row per (token, expert) over
    NVLink and the source adds them in k order."""
    for rank, r in enumerate(_results("rows")):
        v = r.get(name, "not run (an earlier case crashed)")
        assert v == "ok", f"rank {rank}: {v}"


def _overlap_worker(rank, world, group):
    """Two micro-batches in flight with hooks, then CUDA graphs replayed with new routing."""
    import ml_dtypes
    import torch

    import epcomm
    from epcomm import reference
    from epcomm.testing import random_bf16, random_topk, random_weights
    torch.cuda.set_device(device_of(rank))
    T, H, E, K = 64, 2048, 64, 8
    buf = epcomm.Buffer(group, 0, epcomm.Buffer.get_low_latency_rdma_size_hint(T, H, world, E), low_latency_mode=True)
    fails = []

    def data(seed):
        rng = np.random.default_rng(seed)
        xs, tks, ws = [], [], []
        for r in range(world):
            tk = random_topk(rng, T, E, K, drop_prob=0.1)
            tks.append(tk); ws.append(random_weights(rng, tk)); xs.append(random_bf16(rng, (T, H)))
        return xs, tks, ws

    def expected(xs, tks, ws):
        ref = reference.low_latency_dispatch(xs, tks, T, E, use_fp8=False)
        ys = [(r.recv_x.astype(np.float32) * 3.0).astype(ml_dtypes.bfloat16) for r in ref]
        return ref, reference.low_latency_combine(ys, tks, ws, [r.handle for r in ref])[rank]

    spawn.phase("two micro-batches")
    mbs = [data(11), data(12)]
    dev = [(_up(xs[rank]), _up(tks[rank]), _up(ws[rank])) for xs, tks, ws in mbs]
    d = [buf.low_latency_dispatch(x, t, T, E, use_fp8=False, return_recv_hook=True) for x, t, _ in dev]
    d[0][4]()
    d[1][4]()
    ys = [(dd[0].float() * 3.0).to(torch.bfloat16) for dd in d]
    c = [buf.low_latency_combine(ys[i], dev[i][1], dev[i][2], d[i][2], return_recv_hook=True) for i in range(2)]
    c[1][2]()
    c[0][2]()
    for i in range(2):
        ref, cref = expected(*mbs[i])
        try:
            _assert_bits(f"micro-batch {i} combined", _np(c[i][0]), cref)
        except AssertionError as e:
            fails.append(str(e))
    torch.cuda.synchronize()
    group.barrier()
    spawn.phase("graph capture")
    sx = torch.zeros(T, H, dtype=torch.bfloat16, device="cuda")
    st = torch.full((T, K), -1, dtype=torch.int64, device="cuda")
    sw = torch.zeros(T, K, dtype=torch.float32, device="cuda")
    s = torch.cuda.Stream()
    holder = {}

    def body():
        rx, _, h, _, _ = buf.low_latency_dispatch(sx, st, T, E, use_fp8=False)
        y = (rx.float() * 3.0).to(torch.bfloat16)
        holder["o"] = buf.low_latency_combine(y, st, sw, h)[0]

    with torch.cuda.stream(s):
        body()
        body()
    torch.cuda.synchronize()
    group.barrier()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g, stream=s):
        body()
    torch.cuda.synchronize()
    group.barrier()
    for it in range(4):
        spawn.phase(f"graph replay {it}")
        xs, tks, ws = data(100 + it)
        sx.copy_(_up(xs[rank])); st.copy_(_up(tks[rank])); sw.copy_(_up(ws[rank]))
        torch.cuda.synchronize()
        group.barrier()
        g.replay()
        torch.cuda.synchronize()
        _, cref = expected(xs, tks, ws)
        try:
            _assert_bits(f"graph replay {it}", _np(holder["o"]), cref)
        except AssertionError as e:
            fails.append(str(e))
        group.barrier()
    buf.destroy()
    return fails


@needs_ll_ranks
def test_two_micro_batches_with_hooks_and_graph_replays():
    for rank, fails in enumerate(spawn.run(_overlap_worker, _world(), timeout=240)):
        assert not fails, f"rank {rank}: {fails}"


def _unique_topk(n, E, K):
    """Random top-k rows without repeated experts (the low-latency host check rejects repeats)."""
    import torch
    return torch.rand(n, E, device="cuda").argsort(dim=1)[:, :K].contiguous()


def _failure_worker(rank, world, group):
    import time

    import torch

    import epcomm
    from epcomm.errors import EpcommTimeoutError
    torch.cuda.set_device(device_of(rank))
    T, H, E, K = 32, 2048, 32, 4
    buf = epcomm.Buffer(group, 0, epcomm.Buffer.get_low_latency_rdma_size_hint(T, H, world, E), low_latency_mode=True)
    x = torch.randn(T, H, device="cuda").to(torch.bfloat16)
    topk = _unique_topk(T, E, K)
    out = {}
    try:
        buf.low_latency_dispatch(torch.randn(T + 1, H, device="cuda").to(torch.bfloat16),
                                 _unique_topk(T + 1, E, K), T, E)
        out["too_many_tokens"] = "no error"
    except ValueError as e:
        out["too_many_tokens"] = "ok" if "exceed" in str(e) else str(e)
    bad = topk.clone()
    bad[3, 1] = E
    try:
        buf.low_latency_dispatch(x, bad, T, E)
        out["index_out_of_range"] = "no error"
    except ValueError as e:
        out["index_out_of_range"] = "ok" if "outside [-1," in str(e) else str(e)
    try:
        buf.low_latency_dispatch(x, topk, 4 * T, 4 * E)
        out["too_small"] = "no error"
    except ValueError as e:
        out["too_small"] = "ok" if "need num_rdma_bytes >=" in str(e) else str(e)
    group.barrier()
    if rank == 0:
        t0 = time.monotonic()
        buf.low_latency_dispatch(x, topk, T, E)  # the peer never sends: the kernel gives up
        try:
            buf.synchronize()
            out["timeout"] = "no error"
        except EpcommTimeoutError as e:
            dt = time.monotonic() - t0
            ok = "rank 0" in str(e) and "low_latency_dispatch" in str(e) and dt < 30
            out["timeout"] = "ok" if ok else f"bad: {dt:.1f}s {e}"
    else:
        time.sleep(10)
    group.barrier()
    return out


@needs_two_ll_ranks
def test_low_latency_bad_input_and_missing_peer():
    res = spawn.run(_failure_worker, _world(), timeout=180, env={"EPCOMM_TIMEOUT_S": "4"})
    for rank, r in enumerate(res):
        for k, v in r.items():
            assert v == "ok", f"rank {rank} {k}: {v}"
    assert "timeout" in res[0]


def _shape_mismatch_worker(rank, world, group):
    import time

    import torch

    import epcomm
    from epcomm.errors import BufferStateError, RankMismatchError
    torch.cuda.set_device(device_of(rank))
    T, H, E, K = 32, 2048, 32, 4
    last = world - 1  # passes twice the T of the others
    buf = epcomm.Buffer(group, 0, epcomm.Buffer.get_low_latency_rdma_size_hint(2 * T, H, world, E),
                        low_latency_mode=True)
    x = torch.randn(T, H, device="cuda").to(torch.bfloat16)
    topk = _unique_topk(T, E, K)
    out = {}
    t0 = time.monotonic()
    try:
        buf.low_latency_dispatch(x, topk, 2 * T if rank == last else T, E)
        buf.synchronize()  # the receive found the mismatch; the host raises at the next check
        out["mismatch"] = "no error"
    except RankMismatchError as e:
        dt = time.monotonic() - t0
        ok = (e.field == "num_max_dispatch_tokens_per_rank" and e.rank == rank and dt < 20
              and (rank == last or e.peer == last) and f"is {2 * T if rank == last else T} here" in str(e))
        out["mismatch"] = "ok" if ok else f"bad: {dt:.1f}s field={e.field} peer={e.peer}: {e}"
    try:
        buf.low_latency_dispatch(x, topk, T, E)
        out["poisoned"] = "no error"
    except BufferStateError:
        out["poisoned"] = "ok"
    group.barrier()
    buf.destroy()
    return out


@needs_two_ll_ranks
def test_low_latency_ranks_with_different_shapes_raise_naming_the_field():
    res = spawn.run(_shape_mismatch_worker, _world(), timeout=180, env={"EPCOMM_TIMEOUT_S": "60"})
    assert_every_rank_ok(res)


def _partials_mismatch_worker(rank, world, group):
    import time

    import torch

    import epcomm
    from epcomm.errors import RankMismatchError
    torch.cuda.set_device(device_of(rank))
    T, H, E, K = 32, 2048, 32, 4
    buf = epcomm.Buffer(group, 0, epcomm.Buffer.get_low_latency_rdma_size_hint(T, H, world, E),
                        low_latency_mode=True)
    buf._ll.set_combine_partials(rank != 0)  # rank 0 alone sends one row per (token, expert)
    x = torch.randn(T, H, device="cuda").to(torch.bfloat16)
    topk = _unique_topk(T, E, K)
    out = {}
    t0 = time.monotonic()
    try:
        buf.low_latency_dispatch(x, topk, T, E)
        buf.synchronize()
        out["mismatch"] = "no error"
    except RankMismatchError as e:
        dt = time.monotonic() - t0
        ok = e.field == "EPCOMM_LL_COMBINE_PARTIALS" and dt < 20 and (rank == 0 or e.peer == 0)
        out["mismatch"] = "ok" if ok else f"bad: {dt:.1f}s field={e.field} peer={e.peer}: {e}"
    group.barrier()
    buf.destroy()
    return out


@needs_two_ll_ranks
def test_low_latency_ranks_with_different_combine_settings_raise_at_the_dispatch():
    """The combine's row format depends on EPCOMM_LL_COMBINE_PARTIALS: ranks that differ must
    not combine; the dispatch's shape word carries the setting and every rank raises."""
    res = spawn.run(_partials_mismatch_worker, _world(), timeout=180, env={"EPCOMM_TIMEOUT_S": "60"})
    assert_every_rank_ok(res)


def _bad_index_worker(rank, world, group):
    """Rank 0 passes an out-of-range expert id with the host check off: the kernels skip it as
    if it were -1, every rank completes, and rank 0's next check names the kernel and token."""
    import ml_dtypes
    import torch

    import epcomm
    from epcomm import reference
    from epcomm.testing import random_bf16, random_topk, random_weights
    torch.cuda.set_device(device_of(rank))
    T, H, E, K = 32, 2048, 8 * world, 4
    rng = np.random.default_rng(5)
    tks = [random_topk(rng, T, E, K) for _ in range(world)]
    ws = [random_weights(rng, t) for t in tks]
    xs = [random_bf16(rng, (T, H)) for _ in range(world)]
    skipped = [t.copy() for t in tks]
    skipped[0][3, 1] = -1
    bad = tks[rank].copy()
    if rank == 0:
        bad[3, 1] = E + 5
    buf = epcomm.Buffer(group, 0, epcomm.Buffer.get_low_latency_rdma_size_hint(T, H, world, E), low_latency_mode=True)
    out = {}
    ref = reference.low_latency_dispatch(xs, skipped, T, E, use_fp8=False)
    recv, cnt, handle, _, _ = buf.low_latency_dispatch(_up(xs[rank]), _up(bad), T, E, use_fp8=False)
    torch.cuda.synchronize()
    try:
        rr = ref[rank]
        _assert_bits("recv_count", _np(cnt), rr.recv_count)
        gx = _np(recv)
        for j in range(E // world):
            c = int(rr.recv_count[j])
            _assert_bits(f"recv_x[{j}]", gx[j, :c], rr.recv_x[j, :c])
        out["dispatch"] = "ok"
    except AssertionError as e:
        out["dispatch"] = str(e)
    for name, kernel in (("dispatch_report", "low_latency_dispatch"), ("combine_report", "low_latency_combine")):
        if name == "combine_report":
            ys = [(r.recv_x.astype(np.float32) * np.float32(d + 1.5)).astype(ml_dtypes.bfloat16) for d, r in enumerate(ref)]
            cref = reference.low_latency_combine(ys, skipped, ws, [r.handle for r in ref],
                                                 partials=buf._ll.partials and not buf._ll.force_put)[rank]
            comb, _, _ = buf.low_latency_combine(_up(ys[rank]), _up(bad), _up(ws[rank]), handle)
            torch.cuda.synchronize()
            try:
                _assert_bits("combined", _np(comb), cref)
                out["combine"] = "ok"
            except AssertionError as e:
                out["combine"] = str(e)
        try:
            buf.check()
            out[name] = "ok" if rank != 0 else "no error"
        except ValueError as e:
            msg = str(e)
            ok = rank == 0 and msg.startswith(kernel) and f"expert index {E + 5} (token 3)" in msg
            out[name] = "ok" if ok else f"bad: {msg}"
        group.barrier()
    # The buffer stays usable: a clean round trip.
    recv, cnt, handle, _, _ = buf.low_latency_dispatch(_up(xs[rank]), _up(tks[rank]), T, E, use_fp8=False)
    torch.cuda.synchronize()
    out["usable"] = "ok" if int(_np(cnt).sum()) == int(reference.low_latency_dispatch(
        xs, tks, T, E, use_fp8=False)[rank].recv_count.sum()) else "bad counts"
    group.barrier()
    buf.destroy()
    return out


@needs_ll_ranks
def test_low_latency_bad_expert_index_seen_on_the_device_is_reported_and_skipped():
    res = spawn.run(_bad_index_worker, _world(), timeout=180,
                    env={"EPCOMM_CHECK_INDICES": "0", "EPCOMM_TIMEOUT_S": "20"})
    assert_every_rank_ok(res)
