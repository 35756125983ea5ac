"""``epcomm report RESULTS.json [--plot FILE.png]``: a stored benchmark result's tables (as
``epcomm bench`` printed them) and, optionally, its picture."""
from __future__ import annotations

import json

from epcomm.tools import messages
from epcomm.tools.bench import plot as bench_plot
from epcomm.tools.bench.report import print_table


def load(path: str) -> dict:
    """The result dict stored at ``path``; ValueError naming the file when it cannot be read or
    is not an ``epcomm bench --json`` result."""
    try:
        with open(path) as f:
            res = json.load(f)
    except OSError as e:
        raise ValueError(f"{path}: {e.strerror or e}") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not JSON ({e})") from None
    if not isinstance(res, dict) or not any(isinstance(res.get(k), dict) for k in ("normal", "low_latency", "internode")):
        raise ValueError(f"{path}: not a result of `epcomm bench --json` (no normal, low_latency or internode entry)")
    return res


def main(a) -> int:
    """``epcomm report``: prints the tables; with ``--plot`` also draws them (0)."""
    if a.plot:
        bench_plot.require_matplotlib()  # before printing anything
    res = load(a.results)
    print_table(res)
    if a.plot:
        modes = bench_plot.plot(res, a.plot)
        messages.status("report", f"drew {', '.join(modes)} into {a.plot}")
    return messages.OK
