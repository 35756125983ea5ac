"""Host time per call and time per step of a low-latency dispatch + combine pair from JAX: the
jitted epcomm.jax pair (one XLA program, command buffers allowed), the same functions called
op by op (no jit), and the Buffer's eager API on JAX arrays (DLPack, the host synchronises
every output).

* ``host_us``: the time the call takes to return, batches of ``--batch`` calls timed with
  perf_counter, the device drained between batches (a full launch queue would make the host
  wait), median over batches;
* ``step_us``: one call plus ``block_until_ready`` of its output, median over iterations: the
  latency a decode step sees (host, launch and GPU time together).

All after ``--warmup`` calls; medians over ``--iters``.  One rank per GPU (1 works); with
EPCOMM_SHARE_GPU=1 ranks may share a GPU (then the times are not speeds).

    python benchmarks/jax_jit_overhead.py [--gpus N] [--tokens 128] [--hidden 7168] [--experts 64]
        [--topk 8] [--fp8] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import numpy as np


def _args(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gpus", type=int, default=0, help="ranks (default: one per visible GPU)")
    ap.add_argument("--tokens", type=int, default=128, help="tokens per rank (T = N)")
    ap.add_argument("--hidden", type=int, default=7168, help="hidden size")
    ap.add_argument("--experts", type=int, default=64, help="experts in all")
    ap.add_argument("--topk", type=int, default=8, help="experts per token")
    ap.add_argument("--fp8", action="store_true", help="FP8 dispatch (default BF16)")
    ap.add_argument("--warmup", type=int, default=20, help="calls before timing")
    ap.add_argument("--iters", type=int, default=50, help="timed iterations / batches")
    ap.add_argument("--batch", type=int, default=20, help="calls per host-time batch")
    ap.add_argument("--json", default="", help="write the results here")
    return ap.parse_args(argv)


def _time(fn, block, a) -> dict:
    """host_us and step_us of ``fn()`` (``block(out)`` waits for its output)."""
    for _ in range(a.warmup):
        block(fn())
    host = []
    for _ in range(a.iters):
        t0 = time.perf_counter()
        for _ in range(a.batch):
            out = fn()
        host.append((time.perf_counter() - t0) / a.batch * 1e6)
        block(out)
    step = []
    for _ in range(a.iters):
        t0 = time.perf_counter()
        block(fn())
        step.append((time.perf_counter() - t0) * 1e6)
    return {"host_us": statistics.median(host), "step_us": statistics.median(step)}


def _worker(rank, world, group, a):
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    import jax

    import epcomm
    import epcomm.jax as ej
    from epcomm.tools import spawn
    from epcomm.testing import random_bf16, random_topk, random_weights
    T, H, E, K = a.tokens, a.hidden, a.experts, a.topk
    dev = [d for d in jax.devices("gpu") if d.local_hardware_id == spawn.device_of(rank)][0]
    buf = epcomm.Buffer(group, 0, epcomm.Buffer.get_low_latency_rdma_size_hint(T, H, world, E),
                        low_latency_mode=True, device=spawn.device_of(rank))
    rng = np.random.default_rng(rank)
    tk = random_topk(rng, T, E, K)
    put = lambda v: jax.device_put(v, dev)  # noqa: E731
    x, t, w = put(random_bf16(rng, (T, H))), put(tk.astype(np.int32)), put(random_weights(rng, tk))
    y = put(random_bf16(rng, (E // world, world * T, H)))

    def pair(x, t, w, y):
        _, _, h = ej.low_latency_dispatch(buf, x, t, num_max_dispatch_tokens_per_rank=T, num_experts=E,
                                          use_fp8=a.fp8)
        return ej.low_latency_combine(buf, y, t, w, h)

    jitted = jax.jit(pair)

    def eager_api():
        _, _, h, _, _ = buf.low_latency_dispatch(x, t, T, E, use_fp8=a.fp8)
        return buf.low_latency_combine(y, t, w, h)[0]

    block = lambda o: o.block_until_ready()  # noqa: E731
    res = {}
    with jax.default_device(dev):
        for name, fn in (("jit", lambda: jitted(x, t, w, y)), ("op_by_op", lambda: pair(x, t, w, y)),
                         ("buffer_api", eager_api)):
            group.barrier()
            res[name] = _time(fn, block, a)
    buf.destroy()
    return res


def main(argv=None):
    a = _args(argv if argv is not None else sys.argv[1:])
    os.environ.setdefault("EPCOMM_CHECK_INDICES", "0")  # as `epcomm bench`: no host index check
    from epcomm.tools import spawn
    world = a.gpus or spawn.example_world(1)
    per_rank = spawn.run(_worker, world, a, timeout=900)
    out = {"config": {"ranks": world, "tokens": a.tokens, "hidden": a.hidden, "experts": a.experts,
                      "topk": a.topk, "fp8": a.fp8, "warmup": a.warmup, "iters": a.iters, "batch": a.batch},
           "per_rank": per_rank,
           "median_over_ranks": {k: {m: statistics.median(r[k][m] for r in per_rank) for m in ("host_us", "step_us")}
                                 for k in per_rank[0]}}
    text = json.dumps(out, indent=2)
    print(text)
    if a.json:
        with open(a.json, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
