"""The printed form of a :class:`Plan` and the ``epcomm plan`` subcommand."""
from __future__ import annotations

import json

from epcomm.tools import messages
from epcomm.tools.plan.model import Plan, Traffic, plan

_MB = 1e6


def _mb(v: float) -> str:
    return f"{v / _MB:.1f}"


def _aligned(header: list[str], rows: list[list[str]]) -> list[str]:
    """Columns padded to their widest cell, the first left-aligned, the others right-aligned."""
    w = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def fmt(r: list[str]) -> str:
        return "  ".join(c.ljust(w[i]) if i == 0 else c.rjust(w[i]) for i, c in enumerate(r))
    return [fmt(header), "  ".join("-" * x for x in w), *map(fmt, rows)]


def _traffic_row(label: str, t: Traffic) -> list[str]:
    cells = [f"{_mb(b.max)} / {_mb(b.mean)}" for b in (t.network_send, t.network_recv, t.nvlink_send, t.nvlink_recv)]
    return [label, *cells, f"{t.time_us:.0f}", t.bound_by]


def _header(p: Plan) -> list[str]:
    limit = "uniform" if p.max_nodes is None else f"node-limited, at most {p.max_nodes} nodes per token"
    return [
        f"epcomm plan: {p.nodes} nodes x {p.gpus_per_node} GPUs ({p.nodes * p.gpus_per_node} ranks), {p.tokens} "
        f"tokens per GPU, hidden {p.hidden}, top-{p.topk} of {p.experts} experts",
        f"routing {limit} (seed {p.seed}): {p.mean_nodes_per_token:.2f} nodes, {p.mean_ranks_per_token:.2f} "
        f"ranks per token on average (own included)",
        f"rows: dispatch {p.dtype} {p.dispatch_row_bytes} B, combine bf16 {p.combine_row_bytes} B (data and "
        f"scales; no routing metadata); NIC {p.nic_gbps:g} GB/s, NVLink {p.nvlink_gbps:g} GB/s per GPU and direction",
    ]


def format_table(p: Plan) -> str:
    """The plan as aligned text tables: bytes per GPU and lower-bound times, receive sizes, and
    DeepEP's RDMA accounting at epcomm's lower bound."""
    traffic = _aligned(
        ["route / op", "network send MB", "network recv MB", "NVLink send MB", "NVLink recv MB", "lower bound us",
         "bound by"],
        [_traffic_row("epcomm dispatch", p.epcomm_dispatch), _traffic_row("epcomm combine", p.epcomm_combine),
         _traffic_row("flat dispatch", p.flat_dispatch), _traffic_row("flat combine", p.flat_combine)])
    sizes = _aligned(
        ["route", "dispatch network MB", "dispatch NVLink MB", "combine network MB", "combine NVLink MB"],
        [[route, *(f"{_mb(s.routed)} / {_mb(s.any_routing)}" for s in
                   (b.dispatch_network, b.dispatch_nvlink, b.combine_network, b.combine_nvlink))]
         for route, b in (("epcomm", p.epcomm_buffers), ("flat", p.flat_buffers))])
    gbps = "/".join("n/a" if g is None else f"{g:.1f}" for g in (p.deepep_rdma_gbps, p.deepep_combine_rdma_gbps))
    return "\n".join([
        *_header(p), "",
        "bytes per GPU (max / mean over GPUs); lower bound: full-duplex links, network and NVLink overlapping",
        *traffic, "",
        "receive per GPU (largest for this routing / bound for any routing): bytes of the route's rows, "
        "not of a buffer layout",
        *sizes, "",
        f"DeepEP's RDMA accounting: (token, node) pairs, own node included, x row = {_mb(p.deepep_rdma_bytes)} MB "
        f"per GPU in the dispatch; over epcomm's lower-bound times: {gbps} GB/s (dispatch/combine; a model's "
        "bound, not a measurement)",
    ])


def main(a) -> int:
    """``epcomm plan``: prints the table (and writes ``a.json``); 0, or ValueError / TypeError
    for bad arguments (the CLI prints them and returns 2)."""
    p = plan(a.nodes, a.gpus_per_node, a.tokens, a.hidden, a.topk, a.experts, dtype=a.dtype, routing=a.routing,
             max_nodes=a.max_nodes, nic_gbps=a.nic_gbps, nvlink_gbps=a.nvlink_gbps, seed=a.seed)
    print(format_table(p))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(p.to_dict(), f, indent=2)
            f.write("\n")
        print()
        messages.status("plan", f"wrote {a.json}")
    return 0
