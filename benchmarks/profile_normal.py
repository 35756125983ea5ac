"""Timeline of the normal-mode kernels (which side limits a dispatch or combine).

With EPCOMM_PROFILE=1 every block stamps its start and end (globaltimer); this script runs
dispatch (cached, BF16, FP8) and combine at the DeepSeek-V3 setting for several launch configs
and prints, per op, the CUDA-event time and the kernels' spans relative to the op's first
stamp: notify, send (first start, last end, median block busy time) and receive.  Compare
configs by the event time; read the spans to see which side finishes last.

    python benchmarks/profile_normal.py --json out.json

(the workers run with EPCOMM_PROFILE=1 and EPCOMM_CHECK_INDICES=0, :data:`ENV`).
"""
from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import statistics
import time
from types import SimpleNamespace

import numpy as np

import epcomm
from epcomm import interop
from epcomm.config import Config
from epcomm.jit import loader
from epcomm.kernels import intranode as K_intra
from epcomm.testing import random_topk
from epcomm.tools import spawn
from epcomm.tools.bench import WORKER_ENV, time_op, worker_setup

# The workers' environment: the benchmark's, with the kernels' timeline stamps on.
ENV = dict(WORKER_ENV, EPCOMM_PROFILE="1")


def _spans(stamps: dict) -> dict:
    """Spans relative to the first GPU stamp.  Host stamps (time.time_ns) are put on the same
    axis assuming %globaltimer counts Unix-epoch nanoseconds, which it does on the drivers we
    saw (check: 'launched' should precede the first kernel start by a few microseconds)."""
    host = stamps.pop("host", {})
    t0 = min(int(a[a[:, 0] > 0, 0].min()) for a in stamps.values() if (a[:, 0] > 0).any())
    out = {"host": {k: (v - t0) / 1e3 for k, v in host.items()}}
    sms = {}
    for k, a in stamps.items():
        a = a[a[:, 0] > 0]
        if not len(a):
            continue
        done = a[a[:, 1] > 0]
        sms[k] = set(int(v) for v in a[:, 2])
        out[k] = {"blocks": int(len(a)), "first_start_us": (int(a[:, 0].min()) - t0) / 1e3,
                  "last_start_us": (int(a[:, 0].max()) - t0) / 1e3,
                  "last_end_us": (int(done[:, 1].max()) - t0) / 1e3 if len(done) else float("nan"),
                  "median_busy_us": float(np.median(done[:, 1] - done[:, 0])) / 1e3 if len(done) else float("nan"),
                  # SM clock while the block ran: cycles / ns
                  "median_sm_mhz": float(np.median(done[:, 3] / np.maximum(done[:, 1] - done[:, 0], 1))) * 1e3
                  if len(done) else float("nan"),
                  "distinct_sms": len(sms[k])}
    # Blocks of the concurrent send and receive kernels on one SM share its issue slots.
    if "send" in sms and "recv" in sms:
        out["send"]["sms_shared_with_recv"] = len(sms["send"] & sms["recv"])
    return out


def _worker(rank, world, group, args):
    torch, dist, align = worker_setup(rank, world, group)
    N, H, K, E = 4096, 7168, 8, 256
    buf = epcomm.Buffer(group, epcomm.Buffer.get_nvl_buffer_size_hint(H, world, N, K))
    rng = np.random.default_rng(1234 + rank)
    topk = torch.from_numpy(random_topk(rng, N, E, K)).cuda()
    w = torch.rand(N, K, device="cuda")
    x = torch.randn(N, H, device="cuda").to(torch.bfloat16)
    xq = x.float().clamp(-448, 448).to(torch.float8_e4m3fn)
    if args["fp8_scales"] == "col":
        xs = (torch.rand(H // 128, N, device="cuda") + 0.5).t()  # column-major, as DeepGEMM wants
    else:
        xs = torch.rand(N, H // 128, device="cuda") + 0.5  # row-major, as `epcomm bench` uses
    ntr, _, nte, itr, _ = buf.get_dispatch_layout(topk, E)
    c = SimpleNamespace(rank=rank, world=world, torch=torch, align=align, buf=buf, x=x, xq=xq, xs=xs, N=N, E=E,
                        route=dict(num_tokens_per_rank=ntr, is_token_in_rank=itr, num_tokens_per_expert=nte,
                                   topk_idx=topk, topk_weights=w))
    res = []
    for sms, frac, chunk in args["configs"]:
        st = _profile_config(c, args, sms, frac, chunk, res)
    alloc = _alloc_costs(torch, rank, int(st["r"][0].shape[0]), H, K)
    prof = _host_profile(c)
    attrs = _kernel_attrs(world, H, rank)
    st = buf._intra
    counters = {"speculative_hits": st.spec_hits, "speculative_misses": st.spec_misses}
    dist.destroy_process_group()
    buf.destroy()
    return {"records": res, "cprofile": prof, "attrs": attrs, "alloc": alloc, "counters": counters}


def _profile_config(c, args, sms: int, frac: float, chunk: int, res: list) -> dict:
    """Every op of ``args["ops"]`` (default all) at one launch config: its event time, host time
    and the kernels' spans, appended to ``res``; returns the ops' last outputs."""
    buf, x, route, N, torch, align = c.buf, c.x, c.route, c.N, c.torch, c.align
    cfg = Config(num_sms=sms, send_fraction=frac, chunk_rows=chunk)
    st = {}

    def disp_bf16():
        st["r"] = buf.dispatch(x, **route, config=cfg)

    def disp_fp8():
        buf.dispatch((c.xq, c.xs), **route, config=cfg)

    def cached_alt():
        st["c"] = buf.dispatch(x, handle=handle, config=cfg)

    def disp_worst():
        # No CPU synchronisation at all: outputs sized for every token of every rank.
        st["r4"] = buf.dispatch(x, **route, config=cfg, num_worst_tokens=N * c.world)

    def disp_nospec():
        # No speculative outputs: the receive is launched after the host saw the counts.
        keep, buf._intra.speculation = buf._intra.speculation, -1.0
        try:
            disp_bf16()
        finally:
            buf._intra.speculation = keep

    def disp_reuse():
        st.pop("r2", None)
        st["r2"] = buf.dispatch(x, **route, config=cfg)
    disp_bf16()
    handle = st["r"][4]
    y = st["r"][0].clone()
    ops = {"dispatch_bf16": disp_bf16, "dispatch_fp8": disp_fp8,
           # Without top-k (no metadata in the rows): isolates what the top-k entries cost.
           "dispatch_bf16_notopk": lambda: buf.dispatch(x, num_tokens_per_rank=route["num_tokens_per_rank"],
                                                        is_token_in_rank=route["is_token_in_rank"],
                                                        num_experts=c.E, config=cfg),
           "cached_bf16": lambda: buf.dispatch(x, handle=handle, config=cfg),
           "dispatch_bf16_worst": disp_worst,
           "dispatch_bf16_nospec": disp_nospec,
           # Memory placement: the ops above either keep their last outputs alive while the
           # next call allocates (dispatch: two output blocks alternate, as in `epcomm
           # bench` and DeepEP's tests) or drop them at once (cached: one block reused).
           "cached_bf16_alternating": cached_alt,
           "dispatch_bf16_reusing": disp_reuse,
           "combine": lambda: buf.combine(y, handle, config=cfg)}
    for name, fn in ops.items():
        if args.get("ops") and name not in args["ops"]:
            continue
        ev = statistics.median(time_op(torch, fn, 20, 5, align))
        spans, host = [], []
        for _ in range(5):
            align()
            t = time.perf_counter()
            fn()
            host.append((time.perf_counter() - t) * 1e6)
            spans.append(_spans(buf.profile_stamps()))
        med = {}
        for k in spans[0]:
            med[k] = {f: statistics.median(s[k][f] for s in spans if k in s and f in s[k]) for f in spans[0][k]}
        res.append({"rank": c.rank, "sms": sms, "send_fraction": frac, "chunk_rows": chunk, "op": name,
                    "event_us": ev, "host_call_us": statistics.median(host), "spans": med})
    return st


def _alloc_costs(torch, rank: int, M: int, H: int, K: int) -> dict:
    """What one output allocation costs on this host (it sits on the CPU-synchronised path)."""
    alloc = {"PYTORCH_CUDA_ALLOC_CONF": os.environ.get("PYTORCH_CUDA_ALLOC_CONF", ""),
             "backend": torch.cuda.get_allocator_backend()}
    for nm, shape, dt in (("recv_x", (M, H), "bfloat16"), ("topk_idx", (M, K), "int64"),
                          ("src_idx", (M,), "int32")):
        keep = [interop.empty("torch", shape, dt, "cuda", rank) for _ in range(2)]
        t = time.perf_counter()
        for i in range(200):
            keep[i % 2] = interop.empty("torch", shape, dt, "cuda", rank)
        alloc[nm + "_interop_us"] = (time.perf_counter() - t) / 200 * 1e6
        t = time.perf_counter()
        for i in range(200):
            keep[i % 2] = torch.empty(shape, dtype=getattr(torch, dt), device="cuda")
        alloc[nm + "_torch_us"] = (time.perf_counter() - t) / 200 * 1e6
        del keep
    return alloc


def _host_profile(c) -> str:
    """Host cost: cProfile over full BF16 dispatches (both ranks call, rank 0 reports)."""
    buf, x = c.buf, c.x
    cfg = Config(num_sms=24, send_fraction=0.33)
    prof = cProfile.Profile()
    for i in range(25):
        c.align()
        if i >= 5:
            prof.enable()
        r = buf.dispatch(x, **c.route, config=cfg)
        buf.dispatch(x, handle=r[4], config=cfg)
        buf.combine(r[0], r[4], config=cfg)
        if i >= 5:
            prof.disable()
    sio = io.StringIO()
    pstats.Stats(prof, stream=sio).sort_stats("tottime").print_stats(30)
    return sio.getvalue()


def _kernel_attrs(world: int, H: int, rank: int) -> dict:
    """Resource usage of the kernels (registers, local memory = spills)."""
    attrs = {}
    for spec in (K_intra.IntranodeDispatchSpec(world, H, False), K_intra.IntranodeDispatchSpec(world, H, True),
                 K_intra.IntranodeCombineSpec(world, H)):
        mod = loader.load(spec, rank)
        for kd in spec.kernels():
            key = f"{spec.family}/{kd.short}/fp8={getattr(spec, 'fp8', None)}"
            try:
                from cuda.bindings import driver as drv
                f = mod.fn(kd.short)
                attrs[key] = {
                    "regs": drv.cuFuncGetAttribute(drv.CUfunction_attribute.CU_FUNC_ATTRIBUTE_NUM_REGS, f)[1],
                    "local_bytes": drv.cuFuncGetAttribute(
                        drv.CUfunction_attribute.CU_FUNC_ATTRIBUTE_LOCAL_SIZE_BYTES, f)[1]}
            except Exception as e:  # noqa: BLE001 - informational only
                attrs[key] = repr(e)
    return attrs


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--json")
    ap.add_argument("--configs", default="24:0.5:64,24:0.33:64,24:0.25:64,24:0.33:32,24:0.33:128,12:0.33:64")
    ap.add_argument("--fp8-scales", choices=("row", "col"), default="row",
                    help="layout of the FP8 input scales (column-major outputs are never speculative)")
    ap.add_argument("--ops", default="", help="comma-separated subset of the ops (default: all)")
    a = ap.parse_args()
    configs = [(int(s), float(f), int(c)) for s, f, c in (t.split(":") for t in a.configs.split(","))]
    world = spawn.gpu_count()
    if world < 2:
        raise SystemExit(f"profile_normal.py needs 2 or more GPUs (normal mode); {world} visible")
    out = spawn.run(_worker, world, {"configs": configs, "fp8_scales": a.fp8_scales,
                                           "ops": [o for o in a.ops.split(",") if o]}, timeout=500, env=ENV)
    print(out[0]["cprofile"])
    print(json.dumps(out[0]["attrs"]))
    print(json.dumps(out[0]["alloc"], indent=1))
    print("counters per rank:", [o["counters"] for o in out])
    for rec in (r for o in out for r in o["records"]):
        sp = rec["spans"]
        line = (f"r{rec.get('rank', '?')} sms={rec['sms']:2d} f={rec['send_fraction']:.2f} chunk={rec['chunk_rows']:3d} {rec['op']:14s} "
                f"event {rec['event_us']:7.1f} us host {rec['host_call_us']:6.1f} |")
        if sp.get("host"):
            line += " host " + " ".join(f"{k}={v:.0f}" for k, v in sp["host"].items()) + " |"
        for k in ("notify", "send", "recv", "combine"):
            if k in sp:
                s = sp[k]
                line += (f" {k} {s['first_start_us']:.0f}..{s['last_end_us']:.0f} "
                         f"(busy {s['median_busy_us']:.0f}, last start {s['last_start_us']:.0f}, "
                         f"{s['median_sm_mhz']:.0f} MHz, {s['distinct_sms']} SMs"
                         + (f", {s['sms_shared_with_recv']:.0f} shared with recv" if "sms_shared_with_recv" in s else "")
                         + ") |")
        print(line, flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
