"""Timing of one operation: CUDA events around each call on the caller's stream, each call
started by a start barrier (``align``, see :mod:`epcomm.tools.bench.aligner`), the median of
the iterations.  ``torch`` is passed in (the module is imported without it)."""
from __future__ import annotations

import statistics
import time

import numpy as np

from epcomm.tools.bench.accounting import gbps


def median(xs) -> float:
    """The median of ``xs``; NaN when empty."""
    return statistics.median(xs) if xs else float("nan")


def events(torch, n: int = 2) -> list:
    """``n`` CUDA events that record timing."""
    return [torch.cuda.Event(enable_timing=True) for _ in range(n)]


def elapsed_us(start, end) -> float:
    """Microseconds between two recorded (and completed) events."""
    return start.elapsed_time(end) * 1e3


def time_op(torch, fn, iters: int, warmup: int, align, host: list | None = None) -> list[float]:
    """Per-iteration event timings (us) of fn() on the current stream, each started aligned.
    ``host``: a list that receives each timed call's host time (us, perf_counter around fn():
    for a CPU-synchronised dispatch this includes the wait for the GPU's counts)."""
    for _ in range(warmup):
        align()
        fn()
    torch.cuda.synchronize()
    out = []
    for _ in range(iters):
        align()
        s, e = events(torch)
        s.record()
        t0 = time.perf_counter()
        fn()
        t1 = time.perf_counter()
        e.record()
        e.synchronize()
        out.append(elapsed_us(s, e))
        if host is not None:
            host.append((t1 - t0) * 1e6)
    return out


def measure(torch, res: dict, name: str, fn, iters: int, warmup: int, align, nbytes=None) -> None:
    """Time fn() (:func:`time_op`) into ``res``: ``{name}_us`` (the median), ``{name}_us_p90``,
    ``{name}_host_us`` (median host time per call) and, with ``nbytes``, ``{name}_GBps``; or only
    ``{name}_error`` if fn raised ValueError/TypeError (argument errors, raised before any launch
    and alike on every rank, so every rank goes on with the same calls)."""
    host: list[float] = []
    try:
        ts = time_op(torch, fn, iters, warmup, align, host)
    except (ValueError, TypeError) as e:
        res[f"{name}_error"] = f"{type(e).__name__}: {e}"
        return
    t = median(ts)
    res[f"{name}_us"] = t
    # For the rank-to-rank spread of the CPU-synchronised dispatch (whose end waits for the
    # host): the slowest iterations and the host's time per call, in the JSON only.
    res[f"{name}_us_p90"] = float(np.percentile(ts, 90))
    res[f"{name}_host_us"] = median(host)
    if nbytes is not None:
        res[f"{name}_GBps"] = gbps(nbytes, t)


def back_to_back(torch, fn, iters: int, align, n: int = 20) -> float:
    """Mean time per call (us) of ``n`` calls of fn() queued behind one aligned start, so the
    ranks pace each other as in a decode loop and no start skew is left in the mean; the median
    over max(5, iters // 3) such runs after 2 warm-up runs."""
    ts = []
    for i in range(max(5, iters // 3) + 2):
        align()
        a, b = events(torch)
        a.record()
        for _ in range(n):
            fn()
        b.record()
        b.synchronize()
        if i >= 2:
            ts.append(elapsed_us(a, b) / n)
    return median(ts)

