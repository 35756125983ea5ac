"""Timeline of the low-latency kernels (where a decode-size dispatch or combine spends its time).

With EPCOMM_PROFILE=1 every block stamps the end of each phase (globaltimer, see
``epcomm.kernels.low_latency.PROF_PHASES``).  This script runs the fused dispatch (FP8) and
combine at 128 tokens, hidden 7168, top-8 of 256 experts on every visible GPU (one rank per
GPU; one GPU works, with local traffic only), and prints per phase the median over calls of
the time since the call's first block started: the median block and the last block.  The
combine runs with the expert-side partials on and off.  Also the CUDA-event time of each call.

    python benchmarks/profile_low_latency.py --json out.json

(the workers run with EPCOMM_PROFILE=1 and EPCOMM_CHECK_INDICES=0, :data:`ENV`).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys

import numpy as np

import epcomm
from epcomm.kernels.low_latency import PROF_PHASES
from epcomm.testing import random_topk
from epcomm.tools import spawn
from epcomm.tools.bench import WORKER_ENV, worker_setup

# The workers' environment: the benchmark's, with the kernels' timeline stamps on.
ENV = dict(WORKER_ENV, EPCOMM_PROFILE="1")


def _phases(a, names) -> dict:
    """Per phase: (median block, last block) microseconds after the first block started."""
    a = a[a[:, 0] > 0]
    t0 = int(a[:, 0].min())
    out = {}
    for i, n in enumerate(names):
        col = a[:, i]
        col = col[col > 0]
        if len(col):
            out[n] = (float(np.median(col - t0)) / 1e3, float(col.max() - t0) / 1e3, int(len(col)))
    return out


def _worker(rank, world, group, args):
    torch, dist, align = worker_setup(rank, world, group)
    T, H, K, E = args["tokens"], args["hidden"], args["topk"], args["experts"]
    buf = epcomm.Buffer(group, 0, epcomm.Buffer.get_low_latency_rdma_size_hint(T, H, world, E),
                        low_latency_mode=True)
    ll = buf._ll
    rng = np.random.default_rng(99 + rank)
    topk = torch.from_numpy(random_topk(rng, T, E, K)).cuda()
    w = torch.rand(T, K, device="cuda")
    x = torch.randn(T, H, device="cuda").to(torch.bfloat16)
    y = torch.randn(E // world, world * T, H, device="cuda").to(torch.bfloat16)
    res = {"rank": rank}
    default = ll.partials
    for partials in (True, False):
        ll.set_combine_partials(partials)
        rows = {"dispatch": [], "combine": []}
        ev_us = {"dispatch": [], "combine": []}
        for it in range(args["iters"] + 5):
            for op in ("dispatch", "combine"):
                torch.cuda.synchronize()
                align()
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                if op == "dispatch":
                    h = buf.low_latency_dispatch(x, topk, T, E, use_fp8=True)[2]
                else:
                    buf.low_latency_combine(y, topk, w, h)
                b.record()
                b.synchronize()
                st = ll.profile_stamps()[op]
                if it >= 5:
                    rows[op].append(_phases(st, PROF_PHASES[op]))
                    ev_us[op].append(a.elapsed_time(b) * 1e3)
        key = "partials" if partials else "rows"
        for op in ("dispatch", "combine"):
            if op == "dispatch" and not partials:
                continue
            ph = {}
            for n in PROF_PHASES[op]:
                got = [r[n] for r in rows[op] if n in r]
                if got:
                    ph[n] = {"median_block_us": statistics.median(g[0] for g in got),
                             "last_block_us": statistics.median(g[1] for g in got),
                             "blocks": statistics.median(g[2] for g in got)}
            res[f"{op}_{key}" if op == "combine" else op] = {"event_us": statistics.median(ev_us[op]),
                                                                 "phases": ph}
        spawn.phase(f"partials={partials} done")
    ll.set_combine_partials(default)
    align.close()
    dist.destroy_process_group()
    buf.destroy()
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gpus", type=int, default=0)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--hidden", type=int, default=7168)
    ap.add_argument("--topk", type=int, default=8)
    ap.add_argument("--experts", type=int, default=256)
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--json", default="")
    a = ap.parse_args()
    visible = spawn.gpu_count()
    n = a.gpus or visible
    if visible == 0:
        print("profile_low_latency.py needs a GPU; none visible", file=sys.stderr)
        return 2
    if not 1 <= n <= visible:
        print(f"profile_low_latency.py: --gpus {a.gpus}: {visible} GPU(s) visible (one rank per GPU)", file=sys.stderr)
        return 2
    args = dict(tokens=a.tokens, hidden=a.hidden, topk=a.topk, experts=a.experts, iters=a.iters)
    out = spawn.run(_worker, n, args, timeout=400, env=ENV)
    for r in out:
        print(f"rank {r['rank']}")
        for op in ("dispatch", "combine_partials", "combine_rows"):
            d = r[op]
            print(f"  {op}: event {d['event_us']:.1f} us (median of {a.iters}); per phase: median block / last block us")
            for n, v in d["phases"].items():
                print(f"    {n:36s} {v['median_block_us']:7.2f} {v['last_block_us']:7.2f}  ({v['blocks']:.0f} blocks)")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"args": args, "ranks": out}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
