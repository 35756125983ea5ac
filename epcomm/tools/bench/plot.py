"""The benchmark's picture (``epcomm bench --plot``, ``epcomm report --plot``), drawn from a
result dict (a fresh run's or a stored JSON file's) with matplotlib (the ``plot`` extra).

One panel per mode in the result: normal mode, GB/s against SMs for each operation (mean over
ranks, the band their min-max) with the NCCL baselines of the same payload (dashed, in the
colour of their operation) and the peer copy's GB/s (dotted); low-latency mode, each timing in
microseconds (bars: mean over ranks, whiskers: min-max; NCCL's in grey); internode, GB/s per
operation.
"""
from __future__ import annotations

from epcomm.errors import ToolchainError
from epcomm.tools.bench.report import INTERNODE_OPS, LL_FIELDS, NORMAL_OPS, over_ranks, sms_counts, sms_entry

# NCCL all_to_all_single of the same payload, per operation it is the baseline of.
_NCCL_OF = {"dispatch_bf16": "nccl_dispatch_bf16_GBps", "dispatch_fp8": "nccl_dispatch_fp8_GBps",
            "combine": "nccl_combine_GBps"}
_PEER_COPY = (("unidirectional_GBps", "peer copy, one rank"), ("all_ranks_at_once_GBps_per_gpu", "peer copy, all ranks"))


def require_matplotlib():
    """matplotlib.pyplot with the file-only Agg backend; ToolchainError naming the extra when
    matplotlib is not installed."""
    try:
        import matplotlib
    except ImportError:
        raise ToolchainError("--plot needs matplotlib: pip install 'epcomm[plot]' (or matplotlib)") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _ranks(res: dict, key: str) -> list[dict]:
    return [r for r in (res.get(key) or {}).get("ranks") or () if r]


def _normal(ax, res: dict) -> None:
    entry, ranks = res["normal"], _ranks(res, "normal")
    sms = sms_counts(entry)
    colours = {}
    for op in NORMAL_OPS:
        pts = [(s, over_ranks([sms_entry(r, s).get(f"{op}_GBps") for r in ranks])) for s in sms]
        pts = [(s, m) for s, m in pts if m is not None]
        if not pts:
            continue
        x = [s for s, _ in pts]
        line, = ax.plot(x, [m[0] for _, m in pts], marker="o", label=op.replace("_", " "))
        ax.fill_between(x, [m[1] for _, m in pts], [m[2] for _, m in pts], color=line.get_color(), alpha=0.2)
        colours[op] = line.get_color()
    for op, field in _NCCL_OF.items():
        m = over_ranks([r.get(field) for r in ranks])
        if m is not None:
            ax.axhline(m[0], ls="--", lw=1, color=colours.get(op, "grey"), label=f"NCCL, {op.replace('_', ' ')}")
    for field, label in _PEER_COPY:
        m = over_ranks([(r.get("peer_copy") or {}).get(field) for r in ranks])
        if m is not None:
            ax.axhline(m[0], ls=":", lw=1.5, color="black" if "one" in label else "dimgrey", label=label)
    a = entry.get("args") or {}
    ax.set(xlabel="SMs", ylabel="GB/s per rank (received bytes / time)", xticks=sms,
           title=f"normal mode: {a.get('tokens')} tokens/rank, hidden {a.get('hidden')}, top-{a.get('topk')}")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")


def _bars(ax, labels: list, stats: list, colours: list, unit: str) -> None:
    """Horizontal bars (means) with min-max whiskers, the first label on top."""
    y = list(range(len(labels)))[::-1]
    means = [m[0] for m in stats]
    err = [[m[0] - m[1] for m in stats], [m[2] - m[0] for m in stats]]
    ax.barh(y, means, xerr=err, color=colours, capsize=2)
    ax.set_yticks(y, labels, fontsize=7)
    for yi, m in zip(y, stats):
        ax.text(m[2], yi, f" {m[0]:.1f}", va="center", fontsize=7)
    ax.set_xlabel(unit)
    ax.grid(axis="x", alpha=0.3)


def _low_latency(ax, res: dict) -> None:
    ranks = _ranks(res, "low_latency")
    rows = [(k, over_ranks([r.get(k) for r in ranks])) for k in LL_FIELDS if not k.startswith("host_")]
    rows = [(k, m) for k, m in rows if m is not None]
    _bars(ax, [k.replace("_us", "").replace("_", " ") for k, _ in rows], [m for _, m in rows],
          ["grey" if k.startswith("nccl") else "tab:blue" for k, _ in rows], "us per rank (median of the timed calls)")
    a = res["low_latency"].get("args") or {}
    ax.set_title(f"low-latency: {a.get('tokens')} tokens/rank, hidden {a.get('hidden')}, top-{a.get('topk')}")


def _internode(ax, res: dict) -> None:
    ranks = _ranks(res, "internode")
    rows = [(op, over_ranks([r.get(f"{op}_GBps") for r in ranks])) for op in INTERNODE_OPS]
    rows += [(f"NCCL {op}", over_ranks([r.get(f"nccl_{op}_GBps") for r in ranks])) for op in INTERNODE_OPS]
    rows = [(k, m) for k, m in rows if m is not None]
    _bars(ax, [k.replace("_", " ") for k, _ in rows], [m for _, m in rows],
          ["grey" if k.startswith("NCCL") else "tab:green" for k, _ in rows], "GB/s per rank")
    e = res["internode"]
    ax.set_title(f"internode: {e.get('nodes')} declared nodes of {e.get('ranks_per_node')} ranks"
                 + (" (ranks share a GPU: timings mean nothing)" if e.get("shares_gpu") else ""))


_PANELS = (("normal", _normal), ("low_latency", _low_latency), ("internode", _internode))


def figure(res: dict):
    """``(figure, modes drawn)`` of ``res``: one panel per mode with measured ranks.  ValueError
    when there is none; ToolchainError without matplotlib."""
    plt = require_matplotlib()
    keys = [k for k, _ in _PANELS if isinstance(res.get(k), dict) and _ranks(res, k)]
    if not keys:
        raise ValueError("nothing to plot: the result has no measured normal, low_latency or internode ranks")
    fig, axes = plt.subplots(1, len(keys), figsize=(6.5 * len(keys), 4.8), squeeze=False)
    for ax, key in zip(axes[0], keys):
        dict(_PANELS)[key](ax, res)
    m = res.get("meta") or {}
    fig.suptitle(f"epcomm bench on {m.get('gpus', '?')} (world {m.get('world_size', '?')}), "
                 f"commit {m.get('commit', '?')}", fontsize=10)
    fig.tight_layout()
    return fig, keys


def plot(res: dict, path: str) -> list[str]:
    """Draw ``res`` (:func:`figure`) into the image file ``path`` (its suffix picks the format:
    .png, .svg, .pdf); the modes drawn."""
    fig, keys = figure(res)
    try:
        fig.savefig(path, dpi=110)
    finally:
        require_matplotlib().close(fig)
    return keys
