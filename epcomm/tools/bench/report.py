"""The benchmark's table (printed from a result dict: a fresh run's or a stored JSON file's) and
its JSON file."""
from __future__ import annotations

import json
import math
import os
import statistics
import sys

from epcomm.tools import messages
from epcomm.tools.bench.accounting import deepep_ll_rdma_size_hint

# What the internode entry (and its table) says when its ranks share a GPU.
SHARED_GPU_NOTE = ("ranks share a GPU: their kernels take turns on it, so these timings and GB/s mean nothing "
                   "(the checks against epcomm.reference are the result)")


def sms_entry(rank: dict, sms) -> dict:
    """A rank's results at ``sms`` SMs (JSON keys are strings, a fresh run's ints); {} if none."""
    d = rank.get("sms") or {}
    return d.get(sms) or d.get(str(sms)) or {}


def sms_counts(entry: dict) -> list[int]:
    """The SM counts a normal-mode entry asked for or has results at, sorted."""
    ks = set((entry.get("args") or {}).get("sms") or ())
    for r in entry.get("ranks") or ():
        if r:
            ks.update(int(k) for k in (r.get("sms") or {}))
    return sorted(ks)


def _nums(vals) -> list[float]:
    return [v for v in vals if isinstance(v, (int, float)) and not isinstance(v, bool) and not math.isnan(v)]


def over_ranks(vals) -> tuple[float, float, float] | None:
    """(mean, min, max) of the measured values among ``vals`` (one per rank; None, NaN and
    missing ones skipped), or None when nothing was measured."""
    v = _nums(vals)
    return (statistics.mean(v), min(v), max(v)) if v else None


def _stat(vals, fmt: str = ".1f") -> str:
    """'mean [min-max]' over ranks ('-' when nothing was measured)."""
    m = over_ranks(vals)
    if m is None:
        return "-"
    mean, lo, hi = m
    if lo == hi:
        return f"{mean:{fmt}}"
    return f"{mean:{fmt}} [{lo:{fmt}}-{hi:{fmt}}]"


def _print_error(key: str, entry: dict) -> None:
    if entry.get("error"):
        first = str(entry["error"]).strip().splitlines()
        print(f"!!! {key} FAILED: {' | '.join(first[:6])}")
        if entry.get("partial"):
            print(f"!!! {key}: what {len(entry.get('ranks') or [])} rank(s) measured before the failure follows")


def _print_checks(key: str, entry: dict) -> None:
    ranks = [r for r in entry.get("ranks") or () if r]
    checks = entry.get("check")
    if checks is None:
        if not any("check" in r for r in ranks):
            return  # an older file: no checks were made
        checks = {}
    bad = {op: v for op, v in checks.items() if v != "ok"}
    if not checks:
        print(f"!!! {key}: no result was checked")
    elif bad:
        for op, v in bad.items():
            print(f"!!! CHECK FAILED {key} {op}: {v}")
    else:
        print(f"check against epcomm.reference: ok ({', '.join(checks)})")


def _print_aligner(ranks: list) -> None:
    parts = []
    for r in ranks:
        a = r.get("aligner") or {}
        if not a:
            continue
        s = f"rank {r.get('rank')}: {a.get('mode', 'clock')}"
        if "barriers" in a:
            s += f" {a.get('aligned')}/{a.get('barriers')} aligned"
        if a.get("fallback"):
            s += f" (fell back: {a['fallback']})"
        parts.append(s)
    if parts:
        print("aligner: " + "; ".join(parts))


NORMAL_OPS = ("dispatch_bf16", "cached_dispatch_bf16", "dispatch_fp8", "dispatch_fp8_colmajor",
               "cached_dispatch_fp8", "combine")


def _print_mode_header(res: dict, key: str, title: str, detail: str) -> tuple[dict, list]:
    """Print a mode's heading (shape, ``detail``) and its error if any; (entry, ranks)."""
    e = res[key]
    a = e.get("args") or {}
    ranks = [r for r in e.get("ranks") or () if r]
    print(f"\n{title}: {a.get('tokens')} tokens/rank, hidden {a.get('hidden')}, top-{a.get('topk')}, "
          f"{a.get('experts')} experts{detail}; mean [min-max] over {len(ranks)} rank(s)")
    _print_error(key, e)
    return e, ranks


def _print_nccl_same_payload(ranks: list) -> None:
    if any("nccl_dispatch_bf16_us" in r for r in ranks):
        print("NCCL all_to_all_single, same payload (this routing's splits), us and GB/s in the same accounting:")
        for nm in ("dispatch_bf16", "dispatch_fp8", "combine"):
            print(f"  {nm:14s} {_stat([r.get(f'nccl_{nm}_us') for r in ranks]):>24s} us "
                  f"{_stat([r.get(f'nccl_{nm}_GBps') for r in ranks], '.0f'):>20s} GB/s")


def _print_normal(res: dict) -> None:
    iters = (res["normal"].get("args") or {}).get("iters")
    e, ranks = _print_mode_header(res, "normal", "normal mode", f"; per rank the median of {iters} iterations")
    if not ranks:
        return
    print(f"{'SMs':>4} {'operation':24s} {'us':>24s} {'GB/s':>20s}")
    for s in sms_counts(e):
        for op in NORMAL_OPS:
            us = [sms_entry(r, s).get(f"{op}_us") for r in ranks]
            if not _nums(us):
                errs = {sms_entry(r, s).get(f"{op}_error") for r in ranks} - {None}
                if errs:
                    print(f"{s:>4} {op:24s} error: {errs.pop()}")
                continue
            g = [sms_entry(r, s).get(f"{op}_GBps") for r in ranks]
            print(f"{s:>4} {op:24s} {_stat(us):>24s} {_stat(g, '.0f'):>20s}")
    r0 = ranks[0]
    line = (f"layout: {_stat([r.get('layout_us') for r in ranks])} us; NVLink buffer "
            f"{r0.get('nvl_buffer_bytes', 0) / 1e6:.0f} MB/rank")
    nvl = e.get("nvl_buffer") or {}
    if nvl:
        ep, dp = nvl["epcomm_bytes_by_ranks"], nvl["deepep_hint_bytes_by_ranks"]
        line += (f" (this shape at R=2/4/8: {' / '.join(f'{v / 1e6:.0f}' for v in ep.values())} MB; DeepEP's "
                 f"hint, 20 SMs: {' / '.join(f'{v / 1e6:.0f}' for v in dp.values())} MB)")
    print(line)
    _print_nccl_same_payload(ranks)
    even_us = [r.get("nccl_even_a2a_us", r.get("nccl_all_to_all_us")) for r in ranks]
    even_g = [r.get("nccl_even_a2a_offrank_GBps", r.get("nccl_all_to_all_offrank_GBps")) for r in ranks]
    if _nums(even_us):
        label = ("even split of N x H bf16" if "nccl_even_a2a_us" in r0
                 else "older runs' 'same payload' (N x H bf16, even split)")
        print(f"NCCL all_to_all_single, {label}: {_stat(even_us)} us ({_stat(even_g, '.0f')} GB/s off-rank)")
    pc = [r.get("peer_copy") or {} for r in ranks]
    if any(pc):
        alone = _stat([p.get("unidirectional_GBps") for p in pc], ".0f")
        both = _stat([p.get("all_ranks_at_once_GBps_per_gpu") for p in pc], ".0f")
        print(f"peer copy (copy engine, 1 GiB): rank 0 alone {alone} GB/s; all ranks at once {both} GB/s per GPU")
    spec = [r.get("speculative_outputs") for r in ranks if r.get("speculative_outputs")]
    if spec:
        print("speculative outputs (hits/misses per rank): " + ", ".join(f"{d['hits']}/{d['misses']}" for d in spec))
    _print_aligner(ranks)
    _print_checks("normal", e)


LL_FIELDS = ("dispatch_us", "dispatch_us_wall_aligner", "dispatch_us_cycles_aligner", "dispatch_graph_us",
              "dispatch_graph_us_back_to_back", "dispatch_send_us", "dispatch_recv_us", "combine_us",
              "combine_graph_us", "combine_graph_us_back_to_back", "combine_send_us", "combine_recv_us",
              "combine_rows_us", "combine_rows_graph_us_back_to_back", "combine_rows_send_us",
              "combine_rows_recv_us", "combine_partials_us", "combine_partials_graph_us_back_to_back",
              "combine_partials_send_us", "combine_partials_recv_us", "host_us_per_dispatch", "host_us_per_combine",
              "host_us_per_combine_plus_dispatch", "host_us_per_dispatch_check_indices_on",
              "nccl_dispatch_us", "nccl_combine_us", "nccl_even_a2a_us", "nccl_all_to_all_us")


def _print_ll(res: dict) -> None:
    e, ranks = _print_mode_header(res, "low_latency", "low-latency", ", FP8 dispatch, BF16 combine; per rank the median")
    if not ranks:
        return
    a = e.get("args") or {}
    for k in LL_FIELDS:
        vals = [r.get(k) for r in ranks]
        if not _nums(vals):
            continue
        g = k.replace("_us", "_GBps")
        extra = f"  {_stat([r.get(g) for r in ranks], '.0f')} GB/s" if any(g in r for r in ranks) else ""
        print(f"  {k:40s} {_stat(vals):>22s}{extra}")
    heap = ranks[0].get("heap") or {}
    hint = heap.get("deepep_rdma_size_hint")
    if hint is None and all(k in a for k in ("tokens", "hidden", "experts")):
        hint = deepep_ll_rdma_size_hint(a["tokens"], a["hidden"], len(ranks), a["experts"])
    line = f"  symmetric heap: buffer {ranks[0].get('rdma_bytes', 0) / 1e6:.1f} MB/rank"
    if heap.get("nvshmem_symmetric_size"):
        line += f", NVSHMEM_SYMMETRIC_SIZE {heap['nvshmem_symmetric_size'] / 1e6:.1f} MB"
    if hint:
        line += f"; DeepEP's hint for this shape {hint / 1e6:.1f} MB"
    print(line)
    if heap.get("layout"):
        print("  heap layout (MB): " + ", ".join(f"{k.split(' ')[0]} {v / 1e6:.1f}" for k, v in heap["layout"].items()
                                                if k not in ("total", "message_bytes")))
    if ranks[0].get("ll_grid"):
        print(f"  kernel grids: {ranks[0]['ll_grid']}")
    _print_aligner(ranks)
    _print_checks("low_latency", e)


INTERNODE_OPS = ("dispatch_bf16", "dispatch_fp8", "combine")
_INTERNODE_RATES = ("GBps", "rdma_GBps", "net_GBps", "nvl_GBps")


def _print_internode(res: dict) -> None:
    e = res["internode"]
    a = e.get("args") or {}
    P, M = e.get("ranks_per_node", a.get("ranks_per_node")), e.get("nodes", a.get("nodes"))
    e, ranks = _print_mode_header(res, "internode", f"internode ({M} declared nodes of {P} ranks)",
                                  f"; per rank the median of {a.get('iters')} iterations")
    if e.get("shares_gpu"):
        print(f"!!! {SHARED_GPU_NOTE}")
    if not ranks:
        return
    sms = {r.get("num_sms") for r in ranks} - {None}
    print(f"{'operation':16s} {'us':>24s} {'GB/s':>14s} {'RDMA GB/s':>14s} {'net GB/s':>14s} {'NVLink GB/s':>14s}"
          + (f"   ({'/'.join(map(str, sorted(sms)))} SMs)" if sms else ""))
    for op in INTERNODE_OPS:
        us = [r.get(f"{op}_us") for r in ranks]
        if not _nums(us):
            errs = {r.get(f"{op}_error") for r in ranks} - {None}
            if errs:
                print(f"{op:16s} error: {errs.pop()}")
            continue
        print(f"{op:16s} {_stat(us):>24s} "
              + " ".join(f"{_stat([r.get(f'{op}_{k}') for r in ranks], '.0f'):>14s}" for k in _INTERNODE_RATES))
    print("  GB/s: received rows (combine: rows sent back) / time, as the normal mode.  RDMA GB/s: DeepEP's internode\n"
          "  accounting, (token, node) pairs of the rank's tokens, its own node included.  net / NVLink GB/s: the\n"
          "  route's bytes between declared nodes / inside a node, busier direction (on one host the 'network' hop\n"
          "  runs over NVLink too)")
    routes = [(op, [r.get(f"{op}_route_bytes") or {} for r in ranks]) for op in INTERNODE_OPS]
    routes = [(op, rb) for op, rb in routes if any(rb)]
    if routes:
        print("route bytes per rank, MB (rows of the accounting's size):")
        for op, rb in routes:
            print(f"  {op:14s} " + "  ".join(
                f"{label} {_stat([b.get(k, float('nan')) / 1e6 for b in rb])}"
                for label, k in (("net send", "net_send"), ("net recv", "net_recv"), ("NVLink send", "nvl_send"),
                                 ("NVLink recv", "nvl_recv"))))
    r0 = ranks[0]
    if "nvl_bytes" in r0:
        print(f"Buffer: num_nvl_bytes {r0['nvl_bytes'] / 1e6:.0f} MB, num_rdma_bytes "
              f"{r0.get('rdma_bytes', 0) / 1e6:.0f} MB per rank")
    _print_nccl_same_payload(ranks)
    skipped = {r.get("nccl_skipped") for r in ranks} - {None}
    if skipped:
        print(f"NCCL baseline: {skipped.pop()}")
    _print_aligner(ranks)
    _print_checks("internode", e)


_PRINTERS = {"normal": _print_normal, "low_latency": _print_ll, "internode": _print_internode}


def print_table(res: dict, modes=None) -> None:
    """Print the results (this version's JSON or an older one's): per mode the medians as mean
    [min-max] over ranks, baselines, heap, aligner and checks (FAIL lines, and the internode
    mode's note that ranks shared a GPU, start with '!!!').  ``modes``: only these keys
    ("normal", "low_latency", "internode")."""
    m = res.get("meta") or {}
    print(f"# epcomm bench on {m.get('gpus', '?')} (world {m.get('world_size', '?')}), commit {m.get('commit', '?')}"
          + (f", kind {m['kind']}" if m.get("kind") else ""))
    keys = [k for k in (modes or tuple(_PRINTERS)) if isinstance(res.get(k), dict)]
    for k in keys:
        _PRINTERS[k](res)


def report(res: dict, key: str) -> None:
    """Print mode ``key``'s table after it ran (:func:`run`'s ``report``); a failure to print is
    reported on stderr, never raised (the JSON is written already)."""
    try:
        print_table(res, modes=(key,))
    except Exception as e:  # noqa: BLE001 - the JSON is written already; never lose the run here
        messages.warning("bench", f"printing the {key} table failed: {type(e).__name__}: {e}")
    sys.stdout.flush()


def write_json(res: dict, path: str) -> None:
    """Write ``res`` to ``path`` through a temporary file and a rename: a run killed while
    writing leaves the previous complete file."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(res, f, indent=1, default=str)
    os.replace(tmp, path)
