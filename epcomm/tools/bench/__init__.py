"""``epcomm bench normal|low-latency|internode|all``: timings in DeepEP's accounting, baselines
measured in the same run, and every output checked against the reference.

Method: random data (never zeros), random routing, warm-up, then per iteration: device sync,
a start barrier that lets every GPU leave at the same wall time (:class:`Aligner`), CUDA events
around one call on the caller's stream; per rank the median of the iterations.  The JSON keeps
every rank's medians; the table shows the mean over ranks and the per-rank minimum and maximum.

GB/s, DeepEP's accounting (README "Performance"; the project guide ../shared/GUIDE.md, section 5):
* normal dispatch: bytes of all received rows (the rank's own included) / time; a BF16 row is 2H
  bytes, an FP8 row H + 4H/128 (data plus scales, no top-k): :func:`normal_row_bytes`;
* normal combine: bytes of the rows sent back (= the dispatch's received rows, BF16) / time;
* low-latency: selections this rank sends ((token, expert) pairs) x bytes per selection / time,
  H + 4H/128 + 16 for the FP8 dispatch and 2H for the BF16 combine: :func:`ll_row_bytes`;
* internode (the normal mode across nodes): the normal mode's GB/s, DeepEP's internode "RDMA"
  GB/s ((token, destination node) pairs of the rank's tokens, its own node included, x row /
  time), and the bytes of the route per rank, between nodes and over NVLink inside a node
  (epcomm.reference.internode_traffic on this run's routing), each link's busier direction /
  time: :func:`internode_route_rows`, :func:`internode_op_rates`.

Baselines, same run: NCCL ``all_to_all_single`` of the same payload (uneven splits from this run's
routing, the same row bytes, the same GB/s accounting: ``nccl_dispatch_*``, ``nccl_combine_*``),
the even split of N x H bf16 kept for comparison with older runs and the guide's section 3
(``nccl_even_a2a_*``), and the copy engine's peer bandwidth (the internode mode: the first only).

Checks, after the timings (never inside a timed loop): every rank gathers all ranks' inputs once
and compares its outputs bit for bit with epcomm.reference (:class:`NormalCheck`, the internode
combine in node-first order; :class:`LLCheck`); ``ranks[i]["check"][op]`` is "ok" or a short
description of the first difference.  A failed check is recorded and printed, never raised.

Nodes on one host: ``epcomm bench internode`` declares nodes of ``--ranks-per-node`` ranks
(EPCOMM_RANKS_PER_NODE in its workers), so the route across nodes runs wherever 2+ ranks run;
its "network" hop then goes over NVLink.  With EPCOMM_SHARE_GPU=1 it may run more ranks than
GPUs: they share them, take turns on them, and run without NCCL (which refuses two ranks on one
GPU: host barriers start the calls, :class:`HostAligner`; the checks gather over the epcomm
group); results are checked and the timings are marked as meaningless (``shares_gpu``).

Robustness: each mode runs in its own spawn, and the JSON (and the table) are written after each
mode; a mode that fails is recorded as ``{"error": ...}`` with what its ranks had measured
before the failure (each rank saves its results after every section, :class:`Progress`).
Requires torch (CUDA events, NCCL).

Modules: :mod:`.defaults` (shape, iterations, SM sweep), :mod:`.knobs` (the benchmark's
environment variables), :mod:`.accounting` (bytes, GB/s, size hints), :mod:`.timing` (event
timing), :mod:`.aligner` (the start barrier), :mod:`.baselines` (NCCL, peer copy),
:mod:`.checks`, :mod:`.worker` (what every worker shares), :mod:`.normal`,
:mod:`.low_latency` and :mod:`.internode` (the workers), :mod:`.report` (table, JSON),
:mod:`.driver` (:func:`run`, :func:`main`).  The names below load lazily, so
``import epcomm.tools.bench`` (the CLI's) costs nothing.
"""
from __future__ import annotations

import importlib

from epcomm.tools.bench.defaults import DEFAULT_SMS

_LAZY = {
    # accounting
    "FP8_GROUP": "accounting", "normal_row_bytes": "accounting", "ll_row_bytes": "accounting",
    "gbps": "accounting", "deepep_ll_rdma_size_hint": "accounting", "deepep_nvl_buffer_size_hint": "accounting",
    "heap_breakdown": "accounting", "nvl_buffer_sizes": "accounting", "parse_size": "accounting",
    "internode_route_rows": "accounting", "internode_op_rates": "accounting",
    # timing and the start aligner
    "median": "timing", "events": "timing", "elapsed_us": "timing", "time_op": "timing",
    "back_to_back": "timing", "measure": "timing", "Aligner": "aligner", "HostAligner": "aligner",
    "clock_failed": "aligner",
    # baselines, checks, workers
    "nccl_init": "baselines", "nccl_a2a_rows": "baselines", "nccl_even_a2a": "baselines", "peer_copy": "baselines",
    "nccl_same_payload": "baselines",
    "NormalCheck": "checks", "LLCheck": "checks", "diff": "checks", "record_check": "checks",
    "gatherer": "checks", "WORKER_ENV": "worker", "worker_setup": "worker", "env_seen": "worker",
    "Progress": "worker", "normal_inputs": "worker", "normal_worker": "normal", "ll_worker": "low_latency",
    "internode_worker": "internode",
    # the table, the JSON, the driver
    "print_table": "report", "write_json": "report", "sms_entry": "report", "sms_counts": "report",
    "SHARED_GPU_NOTE": "report",
    "run": "driver", "main": "driver", "summarize_mode": "driver", "summarize_internode": "driver",
    "internode_ranks": "driver",
}
_ALIASES = {"_Aligner": "Aligner"}  # the name tests/test_timing*.py import

__all__ = ["DEFAULT_SMS", *_LAZY]


def __getattr__(name: str):
    attr = _ALIASES.get(name, name)
    try:
        mod = _LAZY[attr]
    except KeyError:
        raise AttributeError(f"module 'epcomm.tools.bench' has no attribute {name!r}") from None
    val = getattr(importlib.import_module(f"epcomm.tools.bench.{mod}"), attr)
    globals()[name] = val
    return val


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
