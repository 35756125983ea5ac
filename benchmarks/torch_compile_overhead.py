"""The low-latency pair (dispatch, then combine of the received rows) compiled with torch.compile
against the eager calls: host time per call and GPU time per call, medians after warm-up.

Variants: ``eager`` (Buffer.low_latency_dispatch / low_latency_combine, their fast paths),
``ops_eager`` (epcomm.torch_ops called without compiling: the custom-operation dispatch cost),
``compiled`` (torch.compile(fullgraph=True), inductor) and ``reduce_overhead`` (mode=
"reduce-overhead": one CUDA graph replayed per call; its host time includes copying the inputs
into the graph's static ones).

* host time: batches of ``--calls`` pairs timed with perf_counter, the device drained between
  batches (a full launch queue would make the host wait for the GPU); per pair, median over
  batches;
* GPU time: CUDA events around one pair, the device drained and the ranks met before it; median.

EPCOMM_CHECK_INDICES=0 (as in ``epcomm bench``: the host check is a device sync per call).

    python benchmarks/torch_compile_overhead.py [--ranks R] [--T 128] [--H 7168] [--E 64] [--K 8] [--json out.json]
        [--timeout 900]

With one GPU the Buffer has one rank (NVSHMEM with a single PE), or R ranks sharing it under
EPCOMM_SHARE_GPU=1 (then the GPU times are not speeds).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

from epcomm.tools import spawn

WORKER_ENV = {"EPCOMM_CHECK_INDICES": "0"}
VARIANTS = ("eager", "ops_eager", "compiled", "reduce_overhead")


def _pairs(buf, T, E):
    """Each variant's pair: (x, topk_idx, topk_weights) -> combined bf16 [N, H]."""
    import torch

    from epcomm import torch_ops

    def eager(x, idx, w):
        rx, _, h, _, _ = buf.low_latency_dispatch(x, idx, T, E, use_fp8=False)
        return buf.low_latency_combine(rx, idx, w, h)[0]

    def ops(x, idx, w):
        rx, _, h = torch_ops.low_latency_dispatch(buf, x, idx, T, E, use_fp8=False)
        return torch_ops.low_latency_combine(buf, rx, idx, w, h)

    def ops_graphed(x, idx, w):  # its own code object: dynamo keeps one compiled entry per backend
        return ops(x, idx, w)

    return {"eager": eager, "ops_eager": ops, "compiled": torch.compile(ops, fullgraph=True),
            "reduce_overhead": torch.compile(ops_graphed, mode="reduce-overhead", fullgraph=True)}


def _time(fn, args, group, calls: int, batches: int) -> dict:
    import torch
    for _ in range(5):  # warm-up: compilation, the CUDA graph's capture, the fast paths' plans
        fn(*args)
    torch.cuda.synchronize()
    group.barrier()
    host = []
    for _ in range(batches):
        torch.cuda.synchronize()
        group.barrier()
        t0 = time.perf_counter()
        for _ in range(calls):
            fn(*args)
        host.append((time.perf_counter() - t0) / calls * 1e6)
    torch.cuda.synchronize()
    gpu = []
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    for _ in range(batches * 4):
        torch.cuda.synchronize()
        group.barrier()
        start.record()
        fn(*args)
        end.record()
        end.synchronize()
        gpu.append(start.elapsed_time(end) * 1e3)
    return {"host_us_per_pair": statistics.median(host), "gpu_us_per_pair": statistics.median(gpu)}


def worker(rank, world, group, T, H, E, K, calls, batches):
    import numpy as np
    import torch

    import epcomm
    from epcomm.testing import random_topk, random_weights
    torch.cuda.set_device(spawn.device_of(rank))
    buf = epcomm.Buffer(group, 0, epcomm.Buffer.get_low_latency_rdma_size_hint(T, H, world, E),
                        low_latency_mode=True)
    rng = np.random.default_rng(rank)
    idx = random_topk(rng, T, E, K)
    args = (torch.randn(T, H, device="cuda").to(torch.bfloat16), torch.from_numpy(idx).cuda(),
            torch.from_numpy(random_weights(rng, idx)).cuda())
    pairs = _pairs(buf, T, E)
    out = {name: _time(pairs[name], args, group, calls, batches) for name in VARIANTS}
    ref = pairs["eager"](*args)
    out["compiled_equals_eager"] = bool(torch.equal(pairs["compiled"](*args), ref)
                                        and torch.equal(pairs["reduce_overhead"](*args).clone(), ref))
    out["device"] = torch.cuda.get_device_name()
    torch.cuda.synchronize()
    buf.destroy()
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ranks", type=int, default=0, help="ranks to spawn (0: one per GPU)")
    ap.add_argument("--T", type=int, default=128, help="tokens per rank (num_max_dispatch_tokens_per_rank)")
    ap.add_argument("--H", type=int, default=7168, help="hidden size")
    ap.add_argument("--E", type=int, default=64, help="experts")
    ap.add_argument("--K", type=int, default=8, help="top-k")
    ap.add_argument("--calls", type=int, default=50, help="pairs per timed batch")
    ap.add_argument("--batches", type=int, default=20, help="timed batches")
    ap.add_argument("--json", default=None, help="write the results here")
    ap.add_argument("--timeout", type=float, default=900.0,
                    help="seconds the ranks may take before they are ended, naming where each one was waiting")
    a = ap.parse_args(argv)
    world = a.ranks or max(spawn.gpu_count(), 1)
    res = spawn.run(worker, world, a.T, a.H, a.E, a.K, a.calls, a.batches, timeout=a.timeout, env=WORKER_ENV)
    report = {"ranks": world, "T": a.T, "H": a.H, "E": a.E, "K": a.K, "calls": a.calls, "batches": a.batches,
              "per_rank": res}
    for name in VARIANTS:
        print(f"{name:16s} host " + " / ".join(f"{r[name]['host_us_per_pair']:7.1f}" for r in res)
              + " us   GPU " + " / ".join(f"{r[name]['gpu_us_per_pair']:7.1f}" for r in res) + " us  (per rank)")
    print("compiled == eager (bits):", all(r["compiled_equals_eager"] for r in res))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(report, f, indent=1)
    return 0 if all(r["compiled_equals_eager"] for r in res) else 1


if __name__ == "__main__":
    sys.exit(main())
