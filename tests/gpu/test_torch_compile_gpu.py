"""epcomm.torch_ops on GPUs: torch.compile(fullgraph=True) of a MoE layer (dispatch with
num_worst_tokens, an expert, combine) forward and backward equal to eager calls bit for bit (and
eager equal to epcomm.torch_autograd on Buffer calls), torch.library.opcheck of every operation,
the low-latency pair compiled with mode="reduce-overhead" (a CUDA graph) replayed with new
routing, against epcomm.reference (also with one rank recording a token count of its own while
the others replay: every call must keep one buffer slot on every rank), and independent
collectives in one compiled function (two micro-batches on one Buffer, the low-latency pair on
another) with token counts that differ between ranks, which must run in program order on every
rank (epcomm.torch_ops.order).

The normal-mode data are exactly representable (bf16 integers in [-4, 4], weights multiples of
1/8): every sum, in any order, is exact, so compiled expert arithmetic (inductor's fused kernels)
and eager arithmetic agree to the bit, and a difference is epcomm's.

Marked gpu/multigpu: 2 ranks (2 GPUs, or one shared with EPCOMM_SHARE_GPU=1);
EPCOMM_TEST_RANKS=4 runs 4.  The low-latency part needs NVSHMEM (as tests/gpu/test_low_latency_gpu.py).
"""
from __future__ import annotations

import numpy as np
import pytest

from epcomm.tools import spawn
from gpu_checks import TEST_TIMEOUT, device_of, needs_ranks, normal_ranks, random_job, run_once

pytestmark = [pytest.mark.gpu, pytest.mark.multigpu]

N, H, K = 48, 512, 4        # normal mode: tokens per rank, hidden, top-k
T, HL, KL = 32, 1024, 4     # low-latency: tokens per rank, hidden, top-k
_R = f"-R{normal_ranks()}" if normal_ranks() else ""


def _exact_job(seed, world, E):
    """Every rank's (x bf16 integers in [-4, 4], top-k, weights multiples of 1/8 in [1/8, 1])."""
    import ml_dtypes

    from epcomm.testing import random_topk
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(world):
        idx = random_topk(rng, N, E, K, drop_prob=0.1)
        w = (rng.integers(1, 9, size=idx.shape) / 8.0).astype(np.float32) * (idx >= 0)
        x = rng.integers(-4, 5, size=(N, H)).astype(np.float32).astype(ml_dtypes.bfloat16)
        out.append((x, idx, w))
    return out


def _up(a, **kw):
    import torch

    from epcomm import interop
    return interop.from_numpy("torch", a, "cuda", torch.cuda.current_device()).requires_grad_(kw.get("grad", False))


def _received_rows(job, rank, E, world):
    """Rows rank ``rank`` receives (tokens of any rank with an expert on it)."""
    L = E // world
    return sum(int(((idx >= rank * L) & (idx < (rank + 1) * L)).any(1).sum()) for _, idx, _ in job)


def _layer(buf, E, M):
    import torch

    from epcomm import torch_ops

    def layer(x, idx, w):
        rx, ridx, rw, h = torch_ops.dispatch(buf, x, idx, w, E, M)
        y = (rx.float() * (1.0 + rw[:, :1])).to(torch.bfloat16)
        return torch_ops.combine(buf, y, h)[0]
    return layer


def _autograd_layer(buf, E, M):
    import torch

    from epcomm import torch_autograd

    def layer(x, idx, w):
        rx, ridx, rw, _, h = torch_autograd.dispatch(buf, x, idx, w, E, num_worst_tokens=M)
        y = (rx.float() * (1.0 + rw[:, :1])).to(torch.bfloat16)
        return torch_autograd.combine(buf, y, h)
    return layer


def _run_layer(fn, x, idx, w, g):
    out = fn(x, idx, w)
    out.backward(g)
    res = (out.detach().clone(), x.grad.clone(), w.grad.clone())
    x.grad = w.grad = None
    return res


def _compile_normal(rank, world, buf, E):
    """Eager torch_ops = torch_autograd = compiled (inductor, fullgraph), forward and backward,
    over three routings (the compiled layer is traced once)."""
    import torch

    from epcomm.testing import bit_mismatch
    M = N * world
    compiled = torch.compile(_layer(buf, E, M), fullgraph=True)
    fails = []
    for it in range(3):
        spawn.phase(f"compiled normal layer, routing {it}")
        x, idx, w = _exact_job(100 + it, world, E)[rank]
        x, idx, w = _up(x, grad=True), _up(idx), _up(w, grad=True)
        g = torch.randint(-2, 3, (N, H), device="cuda").to(torch.bfloat16)
        eager = _run_layer(_layer(buf, E, M), x, idx, w, g)
        ref = _run_layer(_autograd_layer(buf, E, M), x, idx, w, g)
        comp = _run_layer(compiled, x, idx, w, g)
        for what, other in (("torch_autograd", ref), ("compiled", comp)):
            for name, a, b in zip(("out", "x.grad", "w.grad"), eager, other):
                bad = bit_mismatch(f"routing {it} {what} {name}", b.cpu().float().numpy(), a.cpu().float().numpy())
                if bad:
                    fails.append(bad)
    return fails


def _opcheck(rank, world, buf, llbuf, E):
    """torch.library.opcheck of every operation on the GPU.  The normal outputs have exactly the
    received rows (no unwritten padding to compare); the low-latency ones hold rows past the
    counts that no call writes, so only their schema and fake implementation are checked."""
    import torch
    from torch_standin import fake_mismatch
    ops = torch.ops.epcomm
    job = _exact_job(7, world, E)
    x, idx, w = job[rank]
    x, idx, w = _up(x, grad=True), _up(idx), _up(w, grad=True)
    M = _received_rows(job, rank, E, world)
    bid = buf.ctx.serial
    fails = []

    def check(name, op, args, utils=("test_schema", "test_autograd_registration", "test_faketensor",
                                     "test_aot_dispatch_dynamic")):
        spawn.phase(f"opcheck {name}")
        try:
            torch.library.opcheck(op, args, test_utils=utils)
        except Exception as e:  # noqa: BLE001 - reported, and the ranks go on in step
            fails.append(f"opcheck {name}: {type(e).__name__}: {e}")

    # Not test_aot_dispatch_dynamic: it compares two calls' outputs, and send_list past each
    # rank's count is unwritten memory (tests/cpu/test_torch_ops.py shows it); _compile_normal
    # compares what a compiled program reads.
    check("dispatch", ops.dispatch.default, (x, idx, w, bid, world, E, M),
          ("test_schema", "test_autograd_registration", "test_faketensor"))
    out = ops.dispatch.default(x, idx, w, bid, world, E, M)
    route = [t.detach() for t in out[3:]]
    rx = out[0].detach().requires_grad_()
    check("combine", ops.combine.default, (rx, out[2].detach(), *route, bid, E, K))
    check("combine without weights", ops.combine.default, (rx, None, *route, bid, E, K))
    check("cached_dispatch", ops.cached_dispatch.default, (x, *route, bid, E, K))
    check("get_dispatch_layout", ops.get_dispatch_layout.default, (idx, E, world, 8))
    lid = llbuf.ctx.serial
    xl = torch.randn(T, HL, device="cuda").to(torch.bfloat16)
    il = torch.stack([torch.randperm(E, device="cuda")[:KL] for _ in range(T)])
    wl = torch.rand(T, KL, device="cuda")
    for fp8 in (False, True):
        check(f"low_latency_dispatch fp8={fp8}", ops.low_latency_dispatch.default,
              (xl, il, lid, world, T, E, fp8, False, False), ("test_schema", "test_faketensor"))
    d = ops.low_latency_dispatch.default(xl, il, lid, world, T, E, False, False, False)
    # Not opcheck: it runs the combine on copies of its arguments, and the handle is found by
    # src_info's address (epcomm.torch_ops.registry); the fake against the real call instead.
    spawn.phase("fake low_latency_combine")
    bad = fake_mismatch(ops.low_latency_combine.default, (d[0].clone(), il, wl, *d[2:8], lid))
    if bad:
        fails.append(f"low_latency_combine: {bad}")
    torch.cuda.synchronize()
    return fails


def _reduce_overhead_low_latency(rank, world, llbuf, E):
    """The low-latency pair compiled with mode="reduce-overhead": a warm-up call, the capture,
    then replays, each with new routing, against the reference; the replays run no Python of
    the operations (the dispatch generations do not move)."""
    import ml_dtypes
    import torch

    from torch._dynamo.utils import counters

    from epcomm import reference, torch_ops
    from epcomm.testing import bit_mismatch
    ll = llbuf._ll
    skips = counters["inductor"]["cudagraph_skips"]
    partials = ll.partials and not ll.force_put

    def pair(x, idx, w):
        rx, count, h = torch_ops.low_latency_dispatch(llbuf, x, idx, T, E, use_fp8=False)
        y = (rx.float() * 3.0).to(torch.bfloat16)
        return torch_ops.low_latency_combine(llbuf, y, idx, w, h)

    compiled = torch.compile(pair, mode="reduce-overhead", fullgraph=True)
    fails = []
    for it in range(6):
        spawn.phase(f"reduce-overhead low-latency pair, call {it}")
        xs, tks, ws = random_job(np.random.default_rng(500 + it), world, T, HL, E, KL, 0.1)
        ref = reference.low_latency_dispatch(xs, tks, T, E, use_fp8=False)
        ys = [(r.recv_x.astype(np.float32) * 3.0).astype(ml_dtypes.bfloat16) for r in ref]
        want = reference.low_latency_combine(ys, tks, ws, [r.handle for r in ref], partials=partials)[rank]
        gens = list(ll._disp_gen)
        got = compiled(_up(xs[rank]), _up(tks[rank]), _up(ws[rank]))
        torch.cuda.synchronize()
        bad = bit_mismatch(f"call {it} combined", got.cpu().view(torch.int16).numpy().view(ml_dtypes.bfloat16), want)
        if bad:
            fails.append(bad)
        if it >= 3 and list(ll._disp_gen) != gens:
            fails.append(f"call {it}: the dispatch ran Python (generations {gens} -> {ll._disp_gen}): not a replay")
        llbuf.group.barrier()
    if counters["inductor"]["cudagraph_skips"] != skips:  # e.g. a mutated input that is not static
        fails.append("Inductor skipped the CUDA graph (see the 'skipping cudagraphs' log line)")
    return fails


def _reduce_overhead_ranks_apart(rank, world, llbuf, E):
    """The low-latency pair compiled with mode="reduce-overhead" (dynamic shapes: no recompile)
    where rank 1 sends fewer tokens from the fourth call on: CUDA graph trees warm up and record
    that shape on rank 1, running the operations in Python, while the other ranks replay their
    graph.  Each call must still take one buffer slot on every rank (the dispatch's argument, not
    the engine's alternation, which a replay does not move): against the reference."""
    import ml_dtypes
    import torch

    from epcomm import reference, torch_ops
    from epcomm.testing import bit_mismatch
    ll = llbuf._ll
    partials = ll.partials and not ll.force_put

    def pair(x, idx, w):
        rx, _, h = torch_ops.low_latency_dispatch(llbuf, x, idx, T, E, use_fp8=False)
        return torch_ops.low_latency_combine(llbuf, (rx.float() * 3.0).to(torch.bfloat16), idx, w, h)

    compiled = torch.compile(pair, mode="reduce-overhead", fullgraph=True, dynamic=True)
    fails = []
    for it in range(6):
        spawn.phase(f"reduce-overhead low-latency pair, rank 1 apart, call {it}")
        xs, tks, ws = random_job(np.random.default_rng(900 + it), world, T, HL, E, KL, 0.1)
        if it >= 3:  # a new shape on rank 1 only
            xs[1], tks[1], ws[1] = xs[1][:T - 4], tks[1][:T - 4], ws[1][:T - 4]
        ref = reference.low_latency_dispatch(xs, tks, T, E, use_fp8=False)
        ys = [(r.recv_x.astype(np.float32) * 3.0).astype(ml_dtypes.bfloat16) for r in ref]
        want = reference.low_latency_combine(ys, tks, ws, [r.handle for r in ref], partials=partials)[rank]
        got = compiled(_up(xs[rank]), _up(tks[rank]), _up(ws[rank]))
        torch.cuda.synchronize()
        bad = bit_mismatch(f"call {it} combined", got.cpu().view(torch.int16).numpy().view(ml_dtypes.bfloat16), want)
        if bad:
            fails.append(bad)
        llbuf.group.barrier()
    return fails


def _program_order(rank, world, buf, llbuf, E):
    """Two independent normal MoE layers and the low-latency pair in one compiled function
    (inductor, fullgraph), the layers' token counts swapped between rank 0 and the others (Inductor
    places independent collectives by buffer sizes: without the order token the ranks issued them
    in different orders and hung): forward and backward equal to eager calls bit for bit."""
    import torch

    from epcomm import torch_ops
    from epcomm.testing import bit_mismatch
    layer = _layer(buf, E, N * world)

    def ll_pair(x, idx, w):
        rx, _, h = torch_ops.low_latency_dispatch(llbuf, x, idx, T, E, use_fp8=False)
        return torch_ops.low_latency_combine(llbuf, (rx.float() * 3.0).to(torch.bfloat16), idx, w, h)

    def step(a, b, ll):
        return layer(*a), layer(*b), ll_pair(*ll)

    def batch(seed, n):
        x, idx, w = _exact_job(seed, world, E)[rank]
        return _up(x[:n], grad=True), _up(idx[:n]), _up(w[:n], grad=True)

    counts = (8, N) if rank == 0 else (N, 8)
    xs, tks, ws = random_job(np.random.default_rng(700), world, T, HL, E, KL, 0.1)
    ll = (_up(xs[rank]), _up(tks[rank]), _up(ws[rank]))
    grads = [torch.randint(-2, 3, (n, H), device="cuda").to(torch.bfloat16) for n in counts]

    def run(fn):
        a, b = batch(300, counts[0]), batch(301, counts[1])
        outs = fn(a, b, ll)
        torch.autograd.backward(outs[:2], grads)
        return [o.detach().clone() for o in outs] + [t.grad.clone() for t in (a[0], a[2], b[0], b[2])]

    compiled = torch.compile(step, fullgraph=True)
    names = ("out a", "out b", "out ll", "x.grad a", "w.grad a", "x.grad b", "w.grad b")
    fails = []
    for it in range(2):
        spawn.phase(f"two micro-batches and the low-latency pair, call {it}")
        eager = run(step)
        comp = run(compiled)
        torch.cuda.synchronize()
        for name, want, got in zip(names, eager, comp):
            bad = bit_mismatch(f"call {it} {name}", got.cpu().float().numpy(), want.cpu().float().numpy())
            if bad:
                fails.append(bad)
    return fails


def _worker(rank, world, group):
    import torch

    import epcomm
    import epcomm.torch_ops  # noqa: F401 - registers the operations
    torch.cuda.set_device(device_of(rank))
    E = 4 * world
    buf = epcomm.Buffer(group, epcomm.Buffer.get_nvl_buffer_size_hint(H, world, N, K))
    rdma = epcomm.Buffer.get_low_latency_rdma_size_hint(T, HL, world, E)
    llbuf = epcomm.Buffer(group, 0, rdma, low_latency_mode=True)
    results = {}
    for name, fn in (("compile_normal", lambda: _compile_normal(rank, world, buf, E)),
                     ("opcheck", lambda: _opcheck(rank, world, buf, llbuf, E)),
                     ("reduce_overhead_ll", lambda: _reduce_overhead_low_latency(rank, world, llbuf, E)),
                     ("program_order", lambda: _program_order(rank, world, buf, llbuf, E)),
                     # Last: its failure (ranks in different slots) ends in a kernel timeout.
                     ("reduce_overhead_ranks_apart", lambda: _reduce_overhead_ranks_apart(rank, world, llbuf, E))):
        try:
            fails = fn()
            results[name] = "ok" if not fails else "FAIL: " + "; ".join(fails)
        except Exception as e:  # noqa: BLE001 - reported per check
            results[name] = f"FAIL: {type(e).__name__}: {e}"
        group.barrier()
    buf.destroy()
    llbuf.destroy()
    return results


@run_once
def _results():
    return spawn.run(_worker, normal_ranks(), timeout=TEST_TIMEOUT.get())


@needs_ranks
@pytest.mark.parametrize("check", ["compile_normal", "opcheck", "reduce_overhead_ll", "program_order",
                                   "reduce_overhead_ranks_apart"], ids=lambda c: c + _R)
def test_torch_compile(check):
    from torch_standin import torch_ops_or_skip
    torch_ops_or_skip()  # a torch older than epcomm.torch_ops needs: skip, naming the version
    bad = [f"rank {r}: {v[check]}" for r, v in enumerate(_results()) if v[check] != "ok"]
    assert not bad, "\n".join(bad)
