"""Host (CPU) time per call: low-latency dispatch and combine, and their parts; normal-mode dispatch.

Low latency (any number of GPUs, 1 works): the steady-state paths (torch, shapes seen before,
EPCOMM_CHECK_INDICES=0 as in `epcomm bench`): batches of calls timed with perf_counter, the GPU
drained between batches so the launch queue never fills (a full queue would make the host wait
for the GPU), median over batches.  Then the parts of a call, each timed the same way, so the
total can be attributed.

Normal mode (2 ranks or more; on one GPU 2 ranks share it, EPCOMM_SHARE_GPU=1): the wall time of
one Python call, median over iterations after warm-up, each call after a device sync: the
CPU-synchronised BF16 dispatch (layout given; its time includes waiting for the GPU's counts),
the cached dispatch (a handle) and the combine.

    python benchmarks/host_overhead.py [--gpus N] [--modes ll,normal] [--json out.json]
    python benchmarks/host_overhead.py --epcomm-path /path/to/other/checkout --json old.json

The script imports ``epcomm`` from ``--epcomm-path`` if given, else from sys.path (PYTHONPATH):
run it once per checkout to compare two versions; it works with the layout before
``epcomm.tools`` too (the spawn helper at ``epcomm.spawn``).  With one GPU the low-latency
buffer has one rank (NVSHMEM with a single PE): the host path is the same code as with more
ranks; only the kernels' GPU time differs, and that is not measured here.
"""
from __future__ import annotations

import argparse
import ctypes
import json
import os
import sys
import time


def _early_epcomm_path(argv) -> str | None:
    """``--epcomm-path`` from ``argv``, read before ``epcomm`` is imported (spawned workers
    re-run this module with the same argv and sys.path)."""
    ap = argparse.ArgumentParser(add_help=False)
    ap.add_argument("--epcomm-path", default=None)
    return ap.parse_known_args(argv)[0].epcomm_path


_PATH = _early_epcomm_path(sys.argv[1:])
if _PATH:
    sys.path.insert(0, os.path.abspath(_PATH))

import epcomm  # noqa: E402 - after --epcomm-path
from epcomm import envs, interop  # noqa: E402
from epcomm.jit import loader  # noqa: E402
from epcomm.jit.launch import launch  # noqa: E402
from epcomm.kernels import low_latency as K_ll  # noqa: E402
from epcomm.kernels import timing as K_t  # noqa: E402

try:  # the layout with epcomm.tools
    from epcomm.tools import spawn  # noqa: E402
except ImportError:  # the layout before it
    from epcomm import spawn  # noqa: E402
try:
    from epcomm.tools.bench.knobs import GIT_COMMIT  # noqa: E402
except ImportError:  # where the knob was one of epcomm.envs'
    GIT_COMMIT = envs.GIT_COMMIT

# The workers' environment: the fast paths (no host index check), as `epcomm bench` runs them.
WORKER_ENV = {"EPCOMM_CHECK_INDICES": "0"}

MIN_US: dict = {}  # name -> the fastest batch (see _batches)


def _batches(fn, calls: int, batches: int, sync, name: str = "") -> float:
    """Median over ``batches`` of the mean host time of ``calls`` back-to-back calls, in us.
    The fastest batch goes to MIN_US[name]: on a shared (virtualised) host other tenants and
    clock changes inflate some batches, and the minimum is the steadier comparison of two
    versions of the code (medians have moved by 1.5x between runs of the same code)."""
    ts = []
    for _ in range(batches):
        sync()
        t0 = time.perf_counter_ns()
        for _ in range(calls):
            fn()
        ts.append((time.perf_counter_ns() - t0) / calls / 1e3)
    ts.sort()
    if name:
        MIN_US[name] = ts[0]
    return ts[len(ts) // 2]


def _per_call(fn, iters: int, warmup: int, sync) -> tuple[float, float]:
    """(median, fastest) wall time in us of one call of fn(), each after sync(), over ``iters``
    calls after ``warmup`` untimed ones."""
    ts = []
    for i in range(warmup + iters):
        sync()
        t0 = time.perf_counter_ns()
        fn()
        t = (time.perf_counter_ns() - t0) / 1e3
        if i >= warmup:
            ts.append(t)
    ts.sort()
    return ts[len(ts) // 2], ts[0]


def _part(parts: dict, name: str, measure) -> None:
    """parts[name] = measure(), or why it could not run (a part reads internals that another
    version of the package may lack: the totals never depend on it)."""
    try:
        parts[name] = measure()
    except Exception as e:  # noqa: BLE001 - recorded, the other parts still run
        parts[name] = f"unavailable: {type(e).__name__}: {e}"


# ---------------------------------------------------------------------------- low latency


def _ll_worker(rank, world, group, T, H, K, E, calls, batches, profile=False):
    import torch
    torch.cuda.set_device(rank % torch.cuda.device_count())
    dev = torch.cuda.current_device()
    buf = epcomm.Buffer(group, 0, epcomm.Buffer.get_low_latency_rdma_size_hint(T, H, world, E),
                        low_latency_mode=True)
    g = torch.Generator(device="cuda").manual_seed(rank)
    x = torch.randn(T, H, device="cuda", generator=g).to(torch.bfloat16)
    topk = torch.stack([torch.randperm(E, device="cuda", generator=g)[:K] for _ in range(T)])
    w = torch.rand(T, K, device="cuda", generator=g)
    y = torch.randn(E // world, world * T, H, device="cuda", generator=g).to(torch.bfloat16)

    def sync():
        torch.cuda.synchronize()
        group.barrier()

    def disp():
        return buf.low_latency_dispatch(x, topk, T, E, use_fp8=True)

    state = {"h": None}

    def comb_disp():
        buf.low_latency_combine(y, topk, w, state["h"])
        state["h"] = disp()[2]

    # Compile, load, and record the fast-path plans of both slots, for both phases of (combine
    # slot, slot of the dispatch combined): two dispatches in a row switch the phase.
    for _ in range(3):
        state["h"] = disp()[2]
        buf.low_latency_combine(y, topk, w, state["h"])
    disp()
    for _ in range(3):
        state["h"] = disp()[2]
        buf.low_latency_combine(y, topk, w, state["h"])
    state["h"] = disp()[2]
    sync()
    out = {"rank": rank, "world": world}
    out["dispatch_us"] = _batches(disp, calls, batches, sync, "dispatch")
    state["h"] = disp()[2]
    out["combine_plus_dispatch_us"] = _batches(comb_disp, calls, batches, sync, "combine_plus_dispatch")
    out["combine_us"] = out["combine_plus_dispatch_us"] - out["dispatch_us"]
    out["min_dispatch_us"] = MIN_US["dispatch"]
    out["min_combine_plus_dispatch_us"] = MIN_US["combine_plus_dispatch"]
    ctx = dict(torch=torch, dev=dev, buf=buf, x=x, topk=topk, w=w, T=T, H=H, K=K, E=E, state=state,
               calls=calls, batches=batches, sync=sync)
    out["parts_us"] = {}
    _launch_parts(out["parts_us"], ctx)
    if profile:
        _profile(comb_disp, disp, state, sync)
    _host_parts(out["parts_us"], ctx)
    sync()
    buf.destroy()
    return out


def _launch_parts(parts: dict, c: dict) -> None:
    """Kernel launches alone: the dispatch kernel's (epcomm's launcher, raw ctypes, plain) and a
    trivial kernel's, to attribute the dispatch's host time."""
    calls, batches, sync = c["calls"], c["batches"], c["sync"]
    try:
        plan = next(v for k, v in c["buf"]._ll._plans.items() if k[0] == "d")
        if isinstance(plan, tuple):  # an older plan format
            p, fn, grid, smem = plan[0], plan[1], plan[2], plan[3]
        else:
            p, fn, grid, smem = plan.p, plan.fn, plan.grid, plan.smem
        stream = interop.current_stream("torch", c["dev"])
    except Exception as e:  # noqa: BLE001 - the buffer's private plans: another version may differ
        parts["launches"] = f"unavailable: {type(e).__name__}: {e}"
        return
    _part(parts, "launch_cooperative (epcomm.jit.launch)", lambda: _batches(
        lambda: launch(fn, grid, K_ll.THREADS, stream, p, smem=smem, cooperative=True), calls, batches, sync))
    try:
        lib = ctypes.CDLL("libcuda.so.1")
        f = lib.cuLaunchCooperativeKernel
        f.restype = ctypes.c_int
        f.argtypes = [ctypes.c_void_p] + [ctypes.c_uint] * 7 + [ctypes.c_void_p, ctypes.c_void_p]
        fh = int(fn)
        args = (ctypes.c_void_p * 1)(ctypes.addressof(p))

        def raw():
            r = f(fh, grid, 1, 1, K_ll.THREADS, 1, 1, smem, stream, args)
            if r:
                raise RuntimeError(f"cuLaunchCooperativeKernel: {r}")
        parts["launch_cooperative (ctypes, prebuilt args)"] = _batches(raw, calls, batches, sync)
    except OSError as e:
        parts["ctypes"] = f"unavailable: {e}"
    _part(parts, "launch_plain (epcomm.jit.launch, not cooperative)", lambda: _batches(
        lambda: launch(fn, grid, K_ll.THREADS, stream, p, smem=smem, cooperative=False), calls, batches, sync))
    spin_spec = K_t.SpinWaitSpec()
    sp = K_t.SpinParams()
    sp.ns = 0
    try:
        spin = loader.load(spin_spec, c["dev"]).fn("spin_wait_ns")
    except Exception as e:  # noqa: BLE001 - recorded, the other parts still run
        parts["spin_wait_ns"] = f"unavailable: {type(e).__name__}: {e}"
        spin = None
    for name, g, coop in (("launch_plain, 8-byte params, grid 1 (spin_wait_ns)", 1, False),
                          (f"launch_plain, 8-byte params, grid {grid} (spin_wait_ns)", grid, False),
                          (f"launch_cooperative, 8-byte params, grid {grid} (spin_wait_ns)", grid, True)):
        if spin is not None:
            _part(parts, name, lambda g=g, coop=coop: _batches(
                lambda: launch(spin, g, spin_spec.threads, stream, sp, cooperative=coop), calls, batches, sync))
    if smem == 0:
        _part(parts, "launch_plain of the dispatch kernel with its dynamic smem = 0", lambda: _batches(
            lambda: launch(fn, grid, K_ll.THREADS, stream, p, smem=0), calls, batches, sync))
    else:
        parts["launch_plain of the dispatch kernel with its dynamic smem = 0"] = f"skipped (the kernel needs {smem} bytes)"


def _host_parts(parts: dict, c: dict) -> None:
    """The Python steps of a call, each alone."""
    torch, dev, buf, x, topk, T, H, K, E = (c[k] for k in ("torch", "dev", "buf", "x", "topk", "T", "H", "K", "E"))
    calls, batches, sync = c["calls"], c["batches"], c["sync"]

    def add(name, fn):
        _part(parts, name, lambda: _batches(fn, calls, batches, sync))
    one = torch.zeros(1, device="cuda")
    add("torch: one.zero_() (torch's own launch path)", one.zero_)
    ll = buf._ll
    add("ll._fast_dispatch", lambda: ll._fast_dispatch(x, topk, T, E, True, False, False))
    add("interop.current_stream", lambda: interop.current_stream("torch", dev))
    add("torch.cuda.current_device", torch.cuda.current_device)
    add("x.device.index", lambda: x.device.index)
    add("x.is_contiguous", x.is_contiguous)
    add("x.data_ptr", x.data_ptr)
    add("envs.CHECK_INDICES.get", envs.CHECK_INDICES.get)
    if hasattr(envs.CHECK_INDICES, "get_memo"):
        add("envs.CHECK_INDICES.get_memo", envs.CHECK_INDICES.get_memo)
    add("torch.empty (T, H) bf16", lambda: torch.empty((T, H), dtype=torch.bfloat16, device=x.device))
    h = c["state"]["h"]
    add("LowLatencyHandle(...)", lambda: epcomm.LowLatencyHandle(0, 1, "torch", T, H, E, K, T, h.src_info,
                                                                 h.layout_range, refs=dict(h.refs)))
    add("EventOverlap(None)", lambda: epcomm.EventOverlap(None, "torch", dev))
    add("Buffer._ll_state", buf._ll_state)


def _profile(comb_disp, disp, state, sync) -> None:
    """Print a cProfile of 500 combine + dispatch pairs."""
    import cProfile
    import pstats
    state["h"] = disp()[2]
    sync()
    pr = cProfile.Profile()
    pr.enable()
    for _ in range(500):
        comb_disp()
    pr.disable()
    sync()
    pstats.Stats(pr).sort_stats("tottime").print_stats(22)


# ---------------------------------------------------------------------------- normal mode


def _normal_worker(rank, world, group, N, H, K, E, iters, warmup):
    """Host time of one normal-mode call: the CPU-synchronised BF16 dispatch (layout given), the
    cached dispatch and the combine; (median, fastest) us of each."""
    import torch
    torch.cuda.set_device(rank % torch.cuda.device_count())
    buf = epcomm.Buffer(group, epcomm.Buffer.get_nvl_buffer_size_hint(H, world, N, K))
    g = torch.Generator(device="cuda").manual_seed(rank)
    x = torch.randn(N, H, device="cuda", generator=g).to(torch.bfloat16)
    topk = torch.rand(N, E, device="cuda", generator=g).topk(K, dim=1).indices  # K distinct experts
    w = torch.rand(N, K, device="cuda", generator=g)
    ntr, _, nte, itr, _ = buf.get_dispatch_layout(topk, E)
    route = dict(num_tokens_per_rank=ntr, is_token_in_rank=itr, num_tokens_per_expert=nte, topk_idx=topk,
                 topk_weights=w)
    st = {}

    def dispatch():
        st["r"] = buf.dispatch(x, **route)

    def sync():
        # Every call waits for its peers' counts: the ranks keep in step without a host barrier.
        torch.cuda.synchronize()

    dispatch()
    torch.cuda.synchronize()
    group.barrier()
    out = {"rank": rank, "world": world}
    out["dispatch_us"], out["min_dispatch_us"] = _per_call(dispatch, iters, warmup, sync)
    recv_x, handle = st["r"][0], st["r"][4]
    out["cached_dispatch_us"], out["min_cached_dispatch_us"] = _per_call(
        lambda: buf.dispatch(x, handle=handle), iters, warmup, sync)
    out["combine_us"], out["min_combine_us"] = _per_call(lambda: buf.combine(recv_x, handle), iters, warmup, sync)
    torch.cuda.synchronize()
    group.barrier()
    buf.destroy()
    return out


# ---------------------------------------------------------------------------- driver


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--epcomm-path", default=None,
                    help="import epcomm from this checkout (default: sys.path, e.g. PYTHONPATH)")
    ap.add_argument("--modes", default="ll,normal", help="comma-separated: ll, normal (default both)")
    ap.add_argument("--gpus", type=int, default=0, help="ranks (default: every visible GPU; normal mode: 2 or more)")
    ap.add_argument("--tokens", type=int, default=128, help="tokens per rank, low latency")
    ap.add_argument("--normal-tokens", type=int, default=4096, help="tokens per rank, normal mode")
    ap.add_argument("--hidden", type=int, default=7168)
    ap.add_argument("--topk", type=int, default=8)
    ap.add_argument("--experts", type=int, default=256)
    ap.add_argument("--calls", type=int, default=100, help="calls per timed batch (low latency)")
    ap.add_argument("--batches", type=int, default=21, help="timed batches (low latency)")
    ap.add_argument("--iters", type=int, default=50, help="timed calls (normal mode)")
    ap.add_argument("--warmup", type=int, default=10, help="untimed calls first (normal mode)")
    ap.add_argument("--json")
    ap.add_argument("--profile", action="store_true", help="also print a cProfile of 500 combine+dispatch pairs")
    return ap


def _modes(text: str) -> list[str]:
    modes = [m.strip() for m in text.split(",") if m.strip()]
    bad = [m for m in modes if m not in ("ll", "normal")]
    if bad or not modes:
        raise SystemExit(f"--modes {text!r}: expected a comma-separated list of ll, normal")
    return modes


def _print(res: dict) -> None:
    for r in res.get("ranks", ()):
        print(f"rank {r['rank']}/{r['world']}: median: dispatch {r['dispatch_us']:.2f} us, combine "
              f"{r['combine_us']:.2f} us (combine + dispatch {r['combine_plus_dispatch_us']:.2f} us); fastest batch: "
              f"dispatch {r['min_dispatch_us']:.2f} us, combine + dispatch {r['min_combine_plus_dispatch_us']:.2f} us")
        for k, v in r["parts_us"].items():
            print(f"    {k:48s} {v if isinstance(v, str) else f'{v:7.2f} us'}")
    nm = res.get("normal")
    if nm:
        print(f"normal mode, {nm['world']} ranks{' sharing GPUs' if nm['shared_gpus'] else ''}, host time of one "
              f"call (median / fastest of {nm['iters']}):")
        for r in nm["ranks"]:
            print(f"  rank {r['rank']}: dispatch (CPU-synchronised, BF16) {r['dispatch_us']:.1f} / "
                  f"{r['min_dispatch_us']:.1f} us; cached dispatch {r['cached_dispatch_us']:.1f} / "
                  f"{r['min_cached_dispatch_us']:.1f} us; combine {r['combine_us']:.1f} / {r['min_combine_us']:.1f} us")


def main(argv=None) -> int:
    a = _parser().parse_args(argv)
    modes = _modes(a.modes)
    import torch
    visible = torch.cuda.device_count()
    n = a.gpus if a.gpus > 0 else visible
    if visible < 1 or n < 1:
        print("host_overhead.py needs a GPU", file=sys.stderr)
        return 2
    res = {"commit": GIT_COMMIT.get(), "epcomm": os.path.dirname(epcomm.__file__), "args": vars(a)}
    if "ll" in modes:
        res["ranks"] = spawn.run(_ll_worker, n, a.tokens, a.hidden, a.topk, a.experts, a.calls, a.batches, a.profile,
                                 timeout=300, env=WORKER_ENV)
    if "normal" in modes:
        nn = max(2, n)
        share = nn > visible  # ranks share GPUs (a host-time run: the kernels taking turns does not matter)
        env = dict(WORKER_ENV, EPCOMM_SHARE_GPU="1") if share else WORKER_ENV
        ranks = spawn.run(_normal_worker, nn, a.normal_tokens, a.hidden, a.topk, a.experts, a.iters, a.warmup,
                          timeout=300, env=env)
        res["normal"] = {"world": nn, "shared_gpus": share, "iters": a.iters, "ranks": ranks}
    _print(res)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
