"""``epcomm bench``'s driver: checks the arguments, runs each mode in its own spawn, writes the
JSON after each mode and reports it."""
from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import tempfile
import time

from epcomm import envs
from epcomm.kernels import internode as K_inter
from epcomm.tools import messages, spawn
from epcomm.tools.bench import defaults as D
from epcomm.tools.bench.accounting import nvl_buffer_sizes
from epcomm.tools.bench.checks import NormalCheck, record_check
from epcomm.tools.bench.internode import internode_worker
from epcomm.tools.bench.knobs import BENCH_KIND, GIT_COMMIT
from epcomm.tools.bench.low_latency import ll_worker
from epcomm.tools.bench.normal import normal_worker
from epcomm.tools.bench.plot import plot, require_matplotlib
from epcomm.tools.bench.report import SHARED_GPU_NOTE, write_json
from epcomm.tools.bench.report import report as print_report
from epcomm.tools.bench.worker import WORKER_ENV, read_partials


def gpu_name() -> str:
    """'<count>x <name>' of the visible GPUs (nvidia-smi), or 'unknown'."""
    try:
        r = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                           text=True, timeout=20)
        names = [n.strip() for n in r.stdout.splitlines() if n.strip()]
        return f"{len(names)}x {names[0]}" if names else "unknown"
    except Exception:
        return "unknown"


def commit() -> str:
    """EPCOMM_GIT_COMMIT, else this checkout's ``git rev-parse --short=12 HEAD``, else 'unknown'."""
    c = GIT_COMMIT.get()
    if c:
        return c
    try:
        return subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], capture_output=True, text=True,
                              cwd=os.path.dirname(os.path.abspath(__file__)), timeout=10).stdout.strip() or "unknown"
    except Exception:
        return "unknown"


def summarize_mode(res: dict, key: str) -> None:
    """Mode-level summaries: checks over ranks ("ok" or the failing ranks) and the workers'
    environment (rank 0's) in ``meta``."""
    entry = res[key]
    ranks = [r for r in entry.get("ranks") or () if r]
    checks: dict = {}
    for r in ranks:
        for op, v in (r.get("check") or {}).items():
            record_check(checks, op, v, f"rank {r.get('rank')}")
    if checks:
        entry["check"] = checks
    if ranks and "env" in ranks[0]:
        res["meta"].setdefault("worker_env", {})[key] = ranks[0]["env"]


def internode_ranks(ranks: int, visible: int, ranks_per_node: int | None) -> tuple[int, int, bool]:
    """``(R, P, shares_gpu)`` of ``epcomm bench internode``: R ranks (``ranks``, 0: one per visible
    GPU) in nodes of P (``ranks_per_node``; None: EPCOMM_RANKS_PER_NODE if set, else R // 2, at
    least 1).  More ranks than GPUs only with EPCOMM_SHARE_GPU=1; they then share the GPUs
    (``shares_gpu``).  Raises ValueError for counts the internode mode cannot run (fewer than 2
    ranks, more than the checks handle, P not dividing R, one node: P = R)."""
    share_ok = envs.SHARE_GPU.get()
    if ranks < 0:
        raise ValueError(f"--ranks {ranks}: expected >= 2 (0 = one per visible GPU)")
    if visible < 1:
        raise ValueError("no GPU visible")
    n = ranks or visible
    if n > visible and not share_ok:
        raise ValueError(f"--ranks {n}: {visible} GPU(s) visible (one rank per GPU; EPCOMM_SHARE_GPU=1 lets ranks "
                         "share them: results checked, timings meaningless)")
    if n < 2:
        raise ValueError(f"the internode benchmark needs 2 or more ranks; {visible} GPU visible (with "
                         "EPCOMM_SHARE_GPU=1, e.g. --ranks 4 --ranks-per-node 2 runs 4 ranks sharing it)")
    if n > NormalCheck.MAX_RANKS:
        raise ValueError(f"--ranks {n}: the checks against epcomm.reference are exact for at most "
                         f"{NormalCheck.MAX_RANKS} ranks (see NormalCheck)")
    P = ranks_per_node if ranks_per_node is not None else (envs.RANKS_PER_NODE.get() or max(1, n // 2))
    try:
        K_inter.check_topology(n, P)
    except (ValueError, TypeError) as e:
        raise ValueError(f"--ranks-per-node {P} with {n} ranks: {e}") from None
    return n, P, n > visible


def _check_args(what: str, gpus: int, tokens, sms: list, iters, aligner: str,
                ranks_per_node=None) -> tuple[int, int | None, bool]:
    """``(ranks, ranks per node, ranks share GPUs)`` to run (the last two: internode's,
    :func:`internode_ranks`; else None and False), or ValueError for arguments that cannot
    run."""
    if tokens is not None and tokens < 1:
        raise ValueError(f"--tokens {tokens}: expected >= 1 (omit it for the defaults: {D.NORMAL_TOKENS} normal and "
                         f"internode, {D.LL_TOKENS} low-latency)")
    if aligner not in D.ALIGNER_MODES:
        raise ValueError(f"--aligner {aligner!r}: expected one of {', '.join(D.ALIGNER_MODES)}")
    if iters is not None and iters < 1:
        raise ValueError(f"--iters {iters}: expected >= 1")
    if ranks_per_node is not None and what != "internode":
        raise ValueError(f"--ranks-per-node: only `epcomm bench internode` declares nodes, not {what!r}")
    if what == "internode":
        return internode_ranks(gpus, spawn.gpu_count(), ranks_per_node)
    visible = spawn.gpu_count()
    if gpus < 0 or gpus > visible:
        raise ValueError(f"--gpus {gpus}: {visible} GPU(s) visible (one rank per GPU; 0 = all)")
    if what in ("normal", "all") and (not sms or min(sms) < 1):
        raise ValueError(f"--sms {','.join(map(str, sms))}: expected one or more SM counts >= 1")
    n = gpus or visible
    if n < 2 and what != "low-latency":
        raise ValueError(f"the normal-mode benchmark needs 2 or more GPUs; {n} visible "
                         f"(`epcomm bench low-latency` runs one rank on one GPU: local traffic only)")
    if n < 1:
        raise ValueError("no GPU visible")
    return n, None, False


def _run_mode(key: str, fn, args: dict, n: int, timeout: float, env: dict = WORKER_ENV) -> dict:
    """One mode in its own spawn (workers get ``env``): ``{"args", "ranks", "wall_s"}``, or for a
    spawn that failed ``{"args", "error", "partial": True, "ranks": what its ranks had saved,
    "wall_s"}``."""
    part = tempfile.mkdtemp(prefix="epcomm-bench-")
    t0 = time.monotonic()
    try:
        entry = {"args": args, "ranks": spawn.run(fn, n, dict(args, partial_dir=part), timeout=timeout, env=env)}
    except Exception as e:  # noqa: BLE001 - recorded; the next mode still runs
        entry = {"args": args, "error": f"{type(e).__name__}: {e}", "partial": True,
                 "ranks": read_partials(part, key, n)}
    finally:
        shutil.rmtree(part, ignore_errors=True)
    entry["wall_s"] = time.monotonic() - t0
    return entry


def summarize_internode(entry: dict) -> None:
    """The internode entry's own summary: ``ranks_per_node`` and ``nodes`` (from its args), and
    ``shares_gpu`` (the driver's decision, or any rank's Buffer finding its GPU shared) with
    :data:`~epcomm.tools.bench.report.SHARED_GPU_NOTE` in ``note`` when set."""
    a = entry.get("args") or {}
    entry["ranks_per_node"] = a.get("ranks_per_node")
    entry["nodes"] = a.get("nodes")
    entry["shares_gpu"] = bool(a.get("share_gpu")) or any(r.get("shares_gpu") for r in entry.get("ranks") or () if r)
    if entry["shares_gpu"]:
        entry["note"] = SHARED_GPU_NOTE


def run(what: str, gpus: int, *, tokens=None, hidden=D.HIDDEN, topk=D.TOPK, experts=D.EXPERTS, sms=D.DEFAULT_SMS,
        iters=None, timeout=D.SPAWN_TIMEOUT_S, aligner: str = "clock", ranks_per_node: int | None = None,
        json_path: str | None = None, report=None) -> dict:
    """Run the benchmark of ``what`` ("normal", "low-latency", "internode", or "all": normal and
    low-latency) on ``gpus`` ranks (0: one per visible GPU).

    ``iters``: timed iterations per operation (None: :data:`~epcomm.tools.bench.defaults.ITERS`,
    or :data:`~epcomm.tools.bench.defaults.SHARED_GPU_ITERS` for internode ranks sharing a GPU).
    ``ranks_per_node``: internode only (:func:`internode_ranks`), passed to its workers as
    EPCOMM_RANKS_PER_NODE.  Each mode runs in its own spawn (``timeout`` seconds each), its
    workers spawned with :data:`~epcomm.tools.bench.worker.WORKER_ENV`.  After each mode the
    JSON is written to ``json_path`` (when given) and ``report(res, key)`` is called (the CLI
    prints the table there).  A mode that fails is recorded as ``{"args", "error", "ranks":
    what its ranks had saved, "partial": True}`` and the next mode still runs.  Raises
    ValueError for arguments that cannot run, before anything starts."""
    sms = list(sms)
    n, P, share = _check_args(what, gpus, tokens, sms, iters, aligner, ranks_per_node)
    if iters is None:
        iters = D.SHARED_GPU_ITERS if share else D.ITERS
    meta = {"gpus": gpu_name(), "world_size": n, "commit": commit(),
            "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "kind": BENCH_KIND.get(), "aligner": aligner, "spawn_timeout_s": timeout}
    res: dict = {"meta": meta}
    modes = []  # (key, worker, args, the workers' environment)
    if what in ("normal", "all"):
        modes.append(("normal", normal_worker,
                      dict(tokens=tokens or D.NORMAL_TOKENS, hidden=hidden, topk=topk, experts=experts, sms=sms,
                           iters=iters, aligner=aligner), WORKER_ENV))
    if what in ("low-latency", "all"):
        modes.append(("low_latency", ll_worker,
                      dict(tokens=tokens or D.LL_TOKENS, hidden=hidden, topk=topk, experts=experts, iters=iters,
                           aligner=aligner), WORKER_ENV))
    if what == "internode":
        modes.append(("internode", internode_worker,
                      dict(tokens=tokens or D.NORMAL_TOKENS, hidden=hidden, topk=topk, experts=experts, iters=iters,
                           aligner=aligner, ranks_per_node=P, nodes=n // P, share_gpu=share),
                      dict(WORKER_ENV, **{envs.RANKS_PER_NODE.name: str(P)})))
    for key, fn, args, env in modes:
        entry = _run_mode(key, fn, args, n, timeout, env)
        if key == "normal":
            entry["nvl_buffer"] = nvl_buffer_sizes(args)
        if key == "internode":
            summarize_internode(entry)
        res[key] = entry
        summarize_mode(res, key)
        if json_path:
            write_json(res, json_path)
        if report is not None:
            report(res, key)
    return res


def main(a) -> int:
    """``epcomm bench`` with the parsed arguments ``a``: 0 when every mode ran and passed its
    checks, 1 otherwise (or without torch, or matplotlib for ``--plot``), 2 for arguments that
    cannot run."""
    plot_path = getattr(a, "plot", None)
    if plot_path:
        require_matplotlib()  # before minutes of benchmark, not after
    if importlib.util.find_spec("torch") is None:
        messages.error("bench", "needs torch (CUDA events and the NCCL baseline): pip install torch, built for the "
                       "CUDA major of epcomm's extra (see `epcomm info`)")
        return messages.FAILED
    res = run(a.what, a.gpus, tokens=a.tokens, hidden=a.hidden, topk=a.topk, experts=a.experts, sms=a.sms,
              iters=a.iters, timeout=a.timeout, aligner=getattr(a, "aligner", "clock"),
              ranks_per_node=getattr(a, "ranks_per_node", None), json_path=a.json, report=print_report)
    if a.json:
        print()
        messages.status("bench", f"wrote {a.json}")
    if plot_path:
        try:
            plot(res, plot_path)
            messages.status("bench", f"drew {plot_path}")
        except ValueError as e:  # nothing measured: the error below says why
            messages.warning("bench", f"--plot: {e}")
    failed = [k for k in ("normal", "low_latency", "internode") if isinstance(res.get(k), dict)
              and (res[k].get("error") or any(v != "ok" for v in (res[k].get("check") or {}).values()))]
    if failed:
        messages.error("bench", f"{', '.join(failed)} failed or did not pass its checks (see above)")
        return messages.FAILED
    return messages.OK
