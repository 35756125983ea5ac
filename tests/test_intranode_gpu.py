"""Normal-mode (intranode) dispatch and combine on every visible GPU, against epcomm.reference.

One process per GPU.  All cases run inside one spawn (a spawn costs seconds); each rank builds
every rank's inputs from a shared seed, so it can compute the reference of the whole job and
check its own outputs: every received row, index, weight, count and combined value, bit for
bit.  Outputs are poisoned before each case (the caching allocator hands back 0xFF-filled
memory).  Marked gpu/multigpu: skipped on machines with fewer than 2 GPUs, unless
EPCOMM_SHARE_GPU=1, which runs 2 ranks on a single GPU (correctness only: their kernels take turns).
"""
from __future__ import annotations

import zlib
import os

import numpy as np
import pytest

from epcomm import spawn
from gpu_checks import (assert_bits as _assert_bits, assert_every_rank_ok, device_of, needs_ranks,
                        normal_ranks as _world, random_job, run_once, to_np as _np)

pytestmark = [pytest.mark.gpu, pytest.mark.multigpu]


def _case(name, **kw):
    base = dict(name=name, N=512, H=2048, E=64, K=8, fp8=False, scales="row", routing="random", weights=True,
                alignment=1, worst=0, async_=False, prev_event=False, layout="given", bias=0, comb_weights=True,
                cached=True, sms=None, framework="torch")
    base.update(kw)
    return base


CASES = [
    _case("bf16_h7168_4096tok", N=4096, H=7168, E=256),
    _case("bf16_h7168_8192tok_async", N=8192, H=7168, E=256, async_=True, bias=2),
    _case("bf16_h4096_internal_layout", N=1000, H=4096, E=128, layout="internal", prev_event=True),
    _case("bf16_h2880", N=777, H=2880, E=64, bias=1),
    _case("bf16_h2048_one_token", N=1, H=2048, E=64),
    _case("bf16_rank0_has_no_tokens", N=300, routing="empty_rank", E=64),
    _case("bf16_all_to_rank0_experts", N=2048, H=4096, E=64, routing="one_rank"),
    _case("bf16_heavy_drop", N=600, routing="drop50"),
    _case("bf16_no_topk", N=700, routing="no_topk", cached=False, comb_weights=False),
    _case("bf16_alignment128", N=900, alignment=128),
    _case("bf16_no_weights", N=512, weights=False, comb_weights=False),
    _case("bf16_8sms", N=4096, H=7168, E=256, sms=8),
    _case("bf16_worst_tokens", N=1024, H=4096, E=64, worst=1),
    _case("fp8_h7168_row_scales", N=4096, H=7168, E=256, fp8=True),
    _case("fp8_h4096_col_scales", N=2000, H=4096, E=128, fp8=True, scales="col"),
    _case("fp8_h2048_worst_col", N=513, H=2048, E=64, fp8=True, scales="col", worst=1),
    _case("fp8_one_rank_async", N=1500, H=7168, E=256, fp8=True, routing="one_rank", async_=True),
    _case("bf16_cupy", N=600, H=2048, E=64, framework="cupy", bias=1),
    _case("bf16_jax", N=400, H=2048, E=64, framework="jax", layout="internal"),
    # Speculative outputs (allocated before the counts, sized from the last calls of the shape):
    # every rank but 0 receives nothing, then a random routing (more rows than guessed: exact
    # outputs and a second receive), then nothing again (rows fit, with room).  FP8: two random
    # routings (the second fits), then every token to rank 0 (rank 0 must miss: with top-2 a
    # random routing reaches rank 0 with ~3/4 of the tokens of 2 ranks; with top-8 almost all).
    _case("bf16_speculative_outputs", N=1111, H=4096, E=64, sequence=("one_rank", "random", "one_rank")),
    _case("fp8_speculative_outputs", N=1500, H=7168, E=256, K=2, fp8=True, sequence=("random", "random", "one_rank")),
]


def _inputs(case, world):
    """Every rank's inputs, from the case's seed (identical in every process)."""
    import ml_dtypes

    from epcomm import reference
    from epcomm.testing import random_bf16, random_topk, random_weights
    rng = np.random.default_rng(zlib.crc32(case["name"].encode()))
    E, K, H = case["E"], case["K"], case["H"]
    ins = []
    for r in range(world):
        N = 0 if (case["routing"] == "empty_rank" and r == 0) else case["N"]
        if case["routing"] == "one_rank":
            topk = random_topk(rng, N, E, min(K, E // world), num_ranks=world, only_rank=0)
        else:
            topk = random_topk(rng, N, E, K, drop_prob=0.5 if case["routing"] == "drop50" else 0.1)
        w = random_weights(rng, topk)
        if case["fp8"]:
            q = rng.standard_normal((N, H)).astype(np.float32).clip(-448, 448).astype(ml_dtypes.float8_e4m3fn)
            s = (rng.random((N, H // 128)).astype(np.float32) + 0.25)
            x = (q, s)
        else:
            x = random_bf16(rng, (N, H))
        lay = reference.get_dispatch_layout(topk, E, world)
        ins.append(dict(N=N, topk=topk, w=w, x=x, lay=lay))
    return ins


def _fw(case):
    if case["framework"] == "torch":
        import torch
        up = lambda a: torch.from_numpy(np.ascontiguousarray(a)).cuda()  # noqa: E731

        def up_any(a):
            import ml_dtypes
            if a.dtype == ml_dtypes.bfloat16:
                return up(a.view(np.int16)).view(torch.bfloat16)
            if a.dtype == ml_dtypes.float8_e4m3fn:
                return up(a.view(np.uint8)).view(torch.float8_e4m3fn)
            return up(a)
        return up_any
    from epcomm import interop
    return lambda a: interop.from_numpy(case["framework"], a, "cuda", _DEV[0])


_DEV = [0]


def _run_case(rank, world, buf, case):
    import ml_dtypes

    from epcomm import reference
    up = _fw(case)
    ins = _inputs(case, world)
    me = ins[rank]
    E, H = case["E"], case["H"]
    fw = case["framework"]
    if fw == "torch":
        import torch
        torch.empty(512 << 20, dtype=torch.uint8, device="cuda").fill_(0xFF)  # poison the allocator's pool
    # ---- reference of the whole job ----
    xs = [i["x"][0] if case["fp8"] else i["x"] for i in ins]

    def ref_dispatch(worst_rows):
        return reference.dispatch(
            xs, E, topk_idx=None if case["routing"] == "no_topk" else [i["topk"] for i in ins],
            topk_weights=[i["w"] for i in ins] if case["weights"] and case["routing"] != "no_topk" else None,
            x_scales=[i["x"][1] for i in ins] if case["fp8"] else None,
            is_token_in_rank=[i["lay"].is_token_in_rank for i in ins],
            expert_alignment=case["alignment"], num_worst_tokens=worst_rows)

    ref = ref_dispatch(0)
    worst = (max(r.handle.num_recv_tokens for r in ref) + 17) if case["worst"] else 0
    if worst:
        ref = ref_dispatch(worst)
    rr = ref[rank]
    # ---- device inputs ----
    if case["fp8"]:
        q, s = me["x"]
        sd = up(s) if case["scales"] == "row" else up(np.ascontiguousarray(s.T))
        if case["scales"] == "col":
            sd = sd.T
        x = (up(q), sd)
    else:
        x = up(me["x"])
    no_topk = case["routing"] == "no_topk"
    topk = None if no_topk else up(me["topk"])
    w = up(me["w"]) if case["weights"] and not no_topk else None
    kw = dict(topk_idx=topk, topk_weights=w, expert_alignment=case["alignment"], num_worst_tokens=worst)
    if case["layout"] == "given" or no_topk:
        if no_topk:
            kw.update(is_token_in_rank=up(me["lay"].is_token_in_rank),
                      num_tokens_per_rank=up(me["lay"].num_tokens_per_rank), num_experts=E)
        else:
            ntr, _, nte, itr, _ = buf.get_dispatch_layout(topk, E)
            _assert_bits("layout.num_tokens_per_rank", _np(ntr), me["lay"].num_tokens_per_rank)
            _assert_bits("layout.is_token_in_rank", _np(itr).astype(bool), me["lay"].is_token_in_rank)
            kw.update(num_tokens_per_rank=ntr, is_token_in_rank=itr, num_tokens_per_expert=nte)
    else:
        kw.update(num_experts=E)
    if case["prev_event"]:
        import torch

        from epcomm._cuda import event_create, event_record
        from epcomm.event import EventOverlap
        e = event_create()
        event_record(e, torch.cuda.current_stream().cuda_stream)
        kw["previous_event"] = EventOverlap(e, "torch", device_of(rank))
    cfg = None
    if case["sms"]:
        from epcomm import Config
        cfg = Config(num_sms=case["sms"])
    recv_x, rtopk, rw, counts, handle, ev = buf.dispatch(x, config=cfg, async_finish=case["async_"], **kw)
    if case["async_"]:
        ev.current_stream_wait()
    # ---- check dispatch ----
    M = worst or rr.handle.num_recv_tokens
    n_real = rr.handle.num_recv_tokens
    if case["fp8"]:
        gx, gs = _np(recv_x[0]), _np(recv_x[1])
        _assert_bits("recv_x (fp8)", gx[:n_real], rr.recv_x[:n_real])
        _assert_bits("recv_x_scales", gs[:n_real], rr.recv_x_scales[:n_real])
        assert gs.shape == (M, H // 128)
        if case["scales"] == "col":
            assert recv_x[1].stride()[0] == 1 if fw == "torch" else True, "column-major scales in, column-major out"
    else:
        gx = _np(recv_x)
        assert gx.shape == (M, H), f"recv_x shape {gx.shape}, expected {(M, H)}"
        _assert_bits("recv_x", gx[:n_real], rr.recv_x[:n_real])
    if no_topk:
        assert rtopk is None and rw is None
    else:
        _assert_bits("recv_topk_idx", _np(rtopk), rr.recv_topk_idx)
        if case["weights"]:
            _assert_bits("recv_topk_weights", _np(rw), rr.recv_topk_weights)
    if worst:
        assert counts == [] and handle.num_recv_tokens is None
    else:
        assert counts == list(rr.num_recv_tokens_per_expert_list), f"expert counts {counts} != {rr.num_recv_tokens_per_expert_list}"
    _assert_bits("handle.recv_src_idx", _np(handle.recv_src_idx), rr.handle.recv_src_idx)
    # Deterministic: the same dispatch again gives the same bits.
    again = buf.dispatch(x, **kw)[0]
    if case["fp8"]:
        _assert_bits("repeat recv_x", _np(again[0])[:n_real], gx[:n_real])
    else:
        _assert_bits("repeat recv_x", _np(again)[:n_real], gx[:n_real])
    # ---- combine: expert d's output row = bf16(float32(row) * (d + 1.5)) ----
    ys = []
    for d in range(world):
        base = ref[d].recv_x
        if case["fp8"]:
            base = base.astype(np.float32)
        yd = (base.astype(np.float32) * np.float32(d + 1.5)).astype(ml_dtypes.bfloat16)
        ys.append(yd)
    cw = None
    if case["comb_weights"] and not no_topk and case["weights"]:
        cw = [r.recv_topk_weights for r in ref]
    biases = []
    rng = np.random.default_rng(7)
    for bi in range(case["bias"]):
        biases.append([np.asarray(rng.standard_normal((ins[r]["N"], H)), np.float32).astype(ml_dtypes.bfloat16)
                       for r in range(world)])
    cref = reference.combine(ys, [r.handle for r in ref], topk_weights=cw, bias=tuple(biases))[rank]
    bias_arg = None
    if biases:
        bias_arg = tuple(up(b[rank]) for b in biases)
        if len(bias_arg) == 1:
            bias_arg = bias_arg[0]
    out, outw, ev2 = buf.combine(up(ys[rank]), handle, topk_weights=up(cw[rank]) if cw else None, bias=bias_arg,
                                 config=cfg, async_finish=case["async_"])
    if case["async_"]:
        ev2.current_stream_wait()
    _assert_bits("combined_x", _np(out), cref[0])
    if cw:
        _assert_bits("combined_topk_weights", _np(outw), cref[1])
    else:
        assert outw is None
    again = buf.combine(up(ys[rank]), handle, topk_weights=up(cw[rank]) if cw else None, bias=bias_arg)[0]
    _assert_bits("repeat combined_x", _np(again), _np(out))
    # ---- cached dispatch (the backward of combine) with new data ----
    if case["cached"]:
        x2s = [(np.asarray(i["x"][0] if case["fp8"] else i["x"]).astype(np.float32) * np.float32(-0.5)).astype(
            ml_dtypes.float8_e4m3fn if case["fp8"] else ml_dtypes.bfloat16) for i in ins]
        ref2 = reference.dispatch(x2s, E, is_token_in_rank=[i["lay"].is_token_in_rank for i in ins],
                                  x_scales=[i["x"][1] for i in ins] if case["fp8"] else None,
                                  num_worst_tokens=worst)[rank]
        x2 = (up(x2s[rank]), x[1]) if case["fp8"] else up(x2s[rank])
        r2 = buf.dispatch(x2, handle=handle)
        got = _np(r2[0][0] if case["fp8"] else r2[0])
        _assert_bits("cached dispatch recv_x", got[:n_real], ref2.recv_x[:n_real])
        assert r2[1] is None and r2[2] is None and r2[4] is handle


def _host_memory_shortfall(case, world):
    """Why this host cannot hold the case's reference in every rank's process, or "".

    Each rank builds the whole job's reference (all ranks' inputs and receives, their combine
    inputs, the cached dispatch's inputs): measured peak ~3.5 x world^2 x N x H x 2 bytes per
    process (CPU, 2 and 4 ranks, 4096 tokens, H 7168).  8 ranks of 8192 tokens need ~26 GB each,
    more than a 128 GB host holds for 8 processes (a rank was killed, EPCOMM_TEST_RANKS=8 on one
    GPU).  The decision only depends on the case and MemTotal, so every rank makes the same one.
    """
    per_rank = 3.5 * world * world * case["N"] * case["H"] * 2
    try:
        with open("/proc/meminfo") as f:
            total = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemTotal:"))
    except (OSError, StopIteration):
        return ""
    if world * per_rank <= 0.6 * total:
        return ""
    return (f"the reference of {world} ranks x {case['N']} tokens x hidden {case['H']} needs ~"
            f"{world * per_rank / 2**30:.0f} GiB of host memory for {world} processes; this host has "
            f"{total / 2**30:.0f} GiB")


def _worker(rank, world, group, cases):
    import torch

    import epcomm
    torch.cuda.set_device(device_of(rank))
    _DEV[0] = device_of(rank)
    if any(c["framework"] == "jax" for c in cases):
        os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    need = max(epcomm.Buffer.get_nvl_buffer_size_hint(c["H"], world, c["N"], c["K"]) for c in cases)
    buf = epcomm.Buffer(group, need)
    results = {}
    for case in cases:
        spawn.phase(case["name"])
        try:
            if case["framework"] == "cupy":
                import cupy  # noqa: F401
            if case["framework"] == "jax":
                import jax  # noqa: F401
        except ImportError as e:
            results[case["name"]] = f"SKIP: {e}"
            group.barrier()
            continue
        too_big = _host_memory_shortfall(case, world)
        if too_big:
            results[case["name"]] = f"SKIP: {too_big}"
            group.barrier()
            continue
        hits0, misses0 = buf._intra.spec_hits, buf._intra.spec_misses
        try:
            for i, routing in enumerate(case.get("sequence", (case["routing"],))):
                _run_case(rank, world, buf, dict(case, routing=routing, name=f"{case['name']}/{i}")
                          if "sequence" in case else case)
            if "sequence" in case:
                hits, misses = buf._intra.spec_hits - hits0, buf._intra.spec_misses - misses0
                assert hits >= 1, "no dispatch used speculative outputs"
                if case["sequence"][0] == "one_rank":
                    if rank == 0:
                        assert misses == 0, f"rank 0 receives fewer rows after its first call, yet {misses} misses"
                    else:
                        assert misses >= 1, "the random routing's receive fit outputs sized for zero rows"
                elif rank == 0:
                    assert misses >= 1, "rank 0's receive of every token fit outputs sized for a random routing"
            results[case["name"]] = "ok"
        except AssertionError as e:
            results[case["name"]] = f"FAIL: {e}"
        except Exception as e:  # a crash in one case must not hide the others
            import traceback
            results[case["name"]] = f"ERROR: {type(e).__name__}: {e}\n{traceback.format_exc()}"
        torch.cuda.synchronize()
        group.barrier()
        if not results[case["name"]].startswith(("ok", "SKIP", "FAIL")):
            break  # an error may leave the buffer out of step with the peers
    buf.destroy()
    return results


@run_once
def _results():
    return spawn.run(_worker, _world(), CASES, timeout=float(os.environ.get("EPCOMM_TEST_TIMEOUT", 480)))


@needs_ranks
@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_dispatch_combine_against_reference(case):
    res = _results()
    got = [r.get(case["name"], "not run (an earlier case crashed)") for r in res]
    if any(v.startswith("SKIP") for v in got):
        pytest.skip(next(v for v in got if v.startswith("SKIP")))
    bad = [f"rank {rank}: {v}" for rank, v in enumerate(got) if v != "ok"]
    assert not bad, "\n".join(bad)


# ---- CUDA graph capture of layout + dispatch(num_worst_tokens) + combine, replayed with new routing ----
def _graph_worker(rank, world, group):
    import ml_dtypes
    import torch

    import epcomm
    from epcomm import reference
    torch.cuda.set_device(device_of(rank))
    N, H, E, K = 512, 4096, 64, 8
    buf = epcomm.Buffer(group, epcomm.Buffer.get_nvl_buffer_size_hint(H, world, N, K))
    worst = N * world
    sx = torch.zeros(N, H, dtype=torch.bfloat16, device="cuda")
    st = torch.zeros(N, K, dtype=torch.int64, device="cuda") - 1
    sw = torch.zeros(N, K, dtype=torch.float32, device="cuda")
    s = torch.cuda.Stream()
    outs = {}

    def body():
        ntr, _, nte, itr, _ = buf.get_dispatch_layout(st, E)
        rx, rt, rw, _, h, _ = buf.dispatch(sx, num_tokens_per_rank=ntr, is_token_in_rank=itr, num_tokens_per_expert=nte,
                                           topk_idx=st, topk_weights=sw, num_worst_tokens=worst)
        y = (rx.float() * 2.0).to(torch.bfloat16)
        o, ow, _ = buf.combine(y, h, topk_weights=rw)
        outs.update(rx=rx, rt=rt, rw=rw, o=o, ow=ow, src=h.recv_src_idx)

    spawn.phase("graph warmup")
    with torch.cuda.stream(s):
        body()
    torch.cuda.synchronize()
    group.barrier()
    spawn.phase("graph capture")
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g, stream=s):
        body()
    torch.cuda.synchronize()
    group.barrier()
    fails = []
    for it in range(4):
        spawn.phase(f"graph replay {it}")
        xs, tks, ws = random_job(np.random.default_rng(1000 + it), world, N, H, E, K, 0.2)
        sx.copy_(torch.from_numpy(xs[rank].view(np.int16)).cuda().view(torch.bfloat16))
        st.copy_(torch.from_numpy(tks[rank]).cuda())
        sw.copy_(torch.from_numpy(ws[rank]).cuda())
        torch.cuda.synchronize()
        group.barrier()
        g.replay()
        torch.cuda.synchronize()
        group.barrier()
        ref = reference.dispatch(xs, E, topk_idx=tks, topk_weights=ws, num_worst_tokens=worst)
        n = ref[rank].handle.num_recv_tokens
        try:
            _assert_bits("graph recv_x", outs["rx"].view(torch.int16).cpu().numpy()[:n], ref[rank].recv_x.view(np.int16)[:n])
            _assert_bits("graph recv_topk_idx", outs["rt"].cpu().numpy(), ref[rank].recv_topk_idx)
            _assert_bits("graph recv_src_idx", outs["src"].cpu().numpy(), ref[rank].handle.recv_src_idx)
            ys = [(r.recv_x.astype(np.float32) * 2.0).astype(ml_dtypes.bfloat16) for r in ref]
            cref = reference.combine(ys, [r.handle for r in ref], topk_weights=[r.recv_topk_weights for r in ref])[rank]
            _assert_bits("graph combined", outs["o"].view(torch.int16).cpu().numpy(), cref[0].view(np.int16))
            _assert_bits("graph combined weights", outs["ow"].cpu().numpy(), cref[1])
        except AssertionError as e:
            fails.append(f"replay {it}: {e}")
    buf.destroy()
    return fails


@needs_ranks
def test_graph_captured_dispatch_combine_replays_with_new_routing():
    res = spawn.run(_graph_worker, _world(), timeout=240)
    for rank, fails in enumerate(res):
        assert not fails, f"rank {rank}: {fails}"


# ---- failure behaviour ----
def _timeout_worker(rank, world, group):
    import time

    import torch

    import epcomm
    from epcomm.errors import BufferStateError, EpcommTimeoutError
    torch.cuda.set_device(device_of(rank))
    N, H, E = 64, 2048, 64
    buf = epcomm.Buffer(group, epcomm.Buffer.get_nvl_buffer_size_hint(H, world, N, 8))
    x = torch.randn(N, H, device="cuda").to(torch.bfloat16)
    topk = torch.randint(0, E, (N, 8), device="cuda")
    out = {}
    # Buffer too small: every rank raises before launching, with the size needed.
    try:
        buf.dispatch(torch.randn(N * 64, H, device="cuda").to(torch.bfloat16), topk_idx=torch.randint(0, E, (N * 64, 8), device="cuda"), num_experts=E)
        out["too_small"] = "no error"
    except ValueError as e:
        out["too_small"] = "ok" if "need num_nvl_bytes >=" in str(e) else f"wrong message: {e}"
    group.barrier()
    if rank == 0:
        t0 = time.monotonic()
        try:
            buf.dispatch(x, topk_idx=topk, num_experts=E)
            out["timeout"] = "no error"
        except EpcommTimeoutError as e:
            dt = time.monotonic() - t0
            msg = str(e)
            ok = "rank 0" in msg and ("notify" in msg or "counts" in msg) and dt < 30
            out["timeout"] = "ok" if ok else f"bad: {dt:.1f}s {msg}"
        try:
            buf.dispatch(x, topk_idx=topk, num_experts=E)
            out["poisoned"] = "no error"
        except BufferStateError:
            out["poisoned"] = "ok"
    else:
        time.sleep(12)  # never calls dispatch: rank 0 must give up, naming where
    group.barrier()
    torch.cuda.synchronize()
    return out


@needs_ranks
def test_missing_peer_times_out_with_rank_and_phase_and_too_small_buffer_raises():
    res = spawn.run(_timeout_worker, _world(), timeout=180, env={"EPCOMM_TIMEOUT_S": "4"})
    for rank, r in enumerate(res):
        for k, v in r.items():
            assert v == "ok", f"rank {rank} {k}: {v}"
    assert "timeout" in res[0] and "poisoned" in res[0]


def _mismatch_worker(rank, world, group):
    import time

    import torch

    import epcomm
    from epcomm.errors import BufferStateError, RankMismatchError
    torch.cuda.set_device(device_of(rank))
    torch.manual_seed(rank)
    N, E = 256, 64
    size = epcomm.Buffer.get_nvl_buffer_size_hint(4096, world, N, 8)
    last = world - 1  # the rank that calls with a different shape
    # (what differs, kwargs of every rank, kwargs of the last rank, CPU-synchronised?)
    cases = [
        ("num_topk", dict(H=2048, K=8), dict(H=2048, K=4), True),
        ("hidden", dict(H=2048, K=8), dict(H=4096, K=8), True),
        ("chunk_rows", dict(H=2048, K=8, chunk=64), dict(H=2048, K=8, chunk=32), False),
    ]
    out = {}
    for field, kw, kw_last, sync in cases:
        a = kw_last if rank == last else kw
        H, K = a["H"], a["K"]
        cfg = epcomm.Config(num_sms=8, chunk_rows=a.get("chunk", 64))
        buf = epcomm.Buffer(group, size)
        x = torch.randn(N, H, device="cuda").to(torch.bfloat16)
        topk = torch.randint(0, E, (N, K), device="cuda")
        t0 = time.monotonic()
        try:
            buf.dispatch(x, topk_idx=topk, num_experts=E, config=cfg,
                         num_worst_tokens=0 if sync else N * world)
            buf.synchronize()  # the num_worst_tokens path reports device errors here
            out[field] = "no error"
        except RankMismatchError as e:
            dt = time.monotonic() - t0
            ok = e.field == field and e.rank == rank and dt < 20 and (rank == last or e.peer == last)
            out[field] = "ok" if ok else f"bad: {dt:.1f}s field={e.field} rank={e.rank} peer={e.peer}: {e}"
        except Exception as e:  # noqa: BLE001 - reported per rank below
            out[field] = f"{type(e).__name__}: {e}"
        try:
            buf.dispatch(x, topk_idx=topk, num_experts=E, config=cfg)
            out[field + "_poisoned"] = "no error"
        except BufferStateError:
            out[field + "_poisoned"] = "ok"
        buf.destroy()
        group.barrier()
    # A fresh Buffer with matching shapes works after all that.
    buf = epcomm.Buffer(group, size)
    x = torch.randn(N, 2048, device="cuda").to(torch.bfloat16)
    topk = torch.randint(0, E, (N, 8), device="cuda")
    rx, *_ = buf.dispatch(x, topk_idx=topk, num_experts=E)
    torch.cuda.synchronize()
    out["fresh_buffer"] = "ok" if rx.shape[1] == 2048 else f"bad shape {tuple(rx.shape)}"
    buf.destroy()
    group.barrier()
    return out


@needs_ranks
def test_ranks_calling_dispatch_with_different_shapes_all_raise_naming_the_field():
    # EPCOMM_TIMEOUT_S large: the error must come from the shape check, not from a timeout.
    res = spawn.run(_mismatch_worker, _world(), timeout=240, env={"EPCOMM_TIMEOUT_S": "60"})
    assert_every_rank_ok(res)
    assert len(res[0]) == 7


def _bad_index_worker(rank, world, group):
    import torch

    from epcomm import reference

    import epcomm
    torch.cuda.set_device(device_of(rank))
    N, H, E, K = 128, 2048, 64, 8
    xs, tks, ws = random_job(np.random.default_rng(11), world, N, H, E, K, 0.1)
    up = lambda a: torch.from_numpy(np.ascontiguousarray(a)).cuda()  # noqa: E731
    x = up(xs[rank].view(np.int16)).view(torch.bfloat16)
    bt = int(np.nonzero(tks[0][:, 2] >= 0)[0][0])  # a token whose third choice is an expert
    bad = tks[rank].copy()
    if rank == 0:
        bad[bt, 2] = E  # out of range, seen only on the device (EPCOMM_CHECK_INDICES=0)
    buf = epcomm.Buffer(group, epcomm.Buffer.get_nvl_buffer_size_hint(H, world, N, K))
    out = {}
    # The kernels skip the index as if it were -1, and every rank completes the call.
    skipped = [t.copy() for t in tks]
    skipped[0][bt, 2] = -1
    for name, topk, ref_topk in (("with_bad_index", bad, skipped), ("next_call", tks[rank], tks)):
        rx, rt, rw, _, _, _ = buf.dispatch(x, topk_idx=up(topk), topk_weights=up(ws[rank]), num_experts=E)
        torch.cuda.synchronize()
        ref = reference.dispatch(xs, E, topk_idx=ref_topk, topk_weights=ws)[rank]
        try:
            _assert_bits(f"{name} recv_x", rx.view(torch.int16).cpu().numpy(), ref.recv_x.view(np.int16))
            _assert_bits(f"{name} recv_topk_idx", rt.cpu().numpy(), ref.recv_topk_idx)
            out[name] = "ok"
        except AssertionError as e:
            out[name] = str(e)
        if name == "with_bad_index":
            try:
                buf.check()
                out["reported"] = "no error" if rank == 0 else "ok"
            except ValueError as e:
                out["reported"] = "ok" if rank == 0 and f"expert index 64 (token {bt})" in str(e) else f"{e}"
    buf.destroy()
    return out


@needs_ranks
def test_bad_expert_index_seen_on_the_device_is_reported_and_the_call_completes_everywhere():
    res = spawn.run(_bad_index_worker, _world(), timeout=120, env={"EPCOMM_CHECK_INDICES": "0", "EPCOMM_TIMEOUT_S": "20"})
    assert_every_rank_ok(res)
