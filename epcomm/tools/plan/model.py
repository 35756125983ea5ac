"""``plan()``: draw a seeded routing, count its rows exactly (counting.py) and turn them into bytes
per GPU, lower-bound times and receive sizes of epcomm's hierarchical route and a flat all-to-all.

Bytes only of the rows (data, and FP8 scales): the routing metadata (expert indices, weights,
counts), which DeepEP's accounting also leaves out, is not counted.  The times are lower bounds of
a model: every link full duplex (a GPU sends and receives at once, each at the full bandwidth),
the network and NVLink busy at the same time (a forwarded row overlaps later arrivals), so an
operation takes at least the largest of (network bytes sent or received / NIC bandwidth, NVLink
bytes sent or received / NVLink bandwidth) over the GPUs."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

from epcomm.testing import random_expert_sets, random_topk_node_limited
from epcomm.tools.plan.counting import LINKS, ROUTES, Counter, RowCounts, receive_bound_rows
from epcomm.validate import FP8_GROUP, check_experts_divisible, check_hidden_size, check_int

DTYPES = ("bf16", "fp8")
ROUTINGS = ("uniform", "node-limited")
NIC_GBPS = 50.0       # 400 Gb/s per GPU (one CX7 NIC each, as on DeepEP's H800 nodes)
NVLINK_GBPS = 160.0   # per direction per GPU, H800 (H100/H200: ~450 in the spec)


def row_bytes(hidden: int, dtype: str) -> int:
    """Bytes of one token's row: BF16 2 * H; FP8 H of data + 4 bytes of float32 scale per 128."""
    return 2 * hidden if dtype == "bf16" else hidden + 4 * (hidden // FP8_GROUP)


@dataclass(frozen=True)
class LinkBytes:
    """Bytes per GPU over one kind of link in one direction: the largest over the GPUs, the mean."""
    max: int
    mean: float


@dataclass(frozen=True)
class Traffic:
    """One operation over one route: bytes per GPU, and its lower-bound time (microseconds) with
    the link that sets it ("network", "nvlink", or "none" when nothing moves)."""
    network_send: LinkBytes
    network_recv: LinkBytes
    nvlink_send: LinkBytes
    nvlink_recv: LinkBytes
    time_us: float
    bound_by: str


@dataclass(frozen=True)
class ReceiveSize:
    """Bytes one GPU receives over a kind of link in one operation: the largest over the GPUs for
    this routing, and the bound that holds for any routing of this shape (top-k, node limit).
    Bytes of the route's rows, not of an implementation's buffer layout."""
    routed: int
    any_routing: int


@dataclass(frozen=True)
class Buffers:
    dispatch_network: ReceiveSize
    dispatch_nvlink: ReceiveSize
    combine_network: ReceiveSize
    combine_nvlink: ReceiveSize


@dataclass(frozen=True)
class Plan:
    """What ``plan()`` computed (bytes, microseconds, GB/s = 1e9 bytes per second).

    dispatch_row_bytes / combine_row_bytes: one token's row (the dispatch's dtype; combine BF16).
    mean_nodes_per_token / mean_ranks_per_token: distinct destinations of a token, its own
    included.  epcomm_* / flat_*: the two routes.  deepep_rdma_bytes: mean per GPU of DeepEP's
    "RDMA" numerator ((token, destination node) pairs of the GPU's tokens, its own node included,
    times the dispatch row); deepep_rdma_gbps: that over epcomm's lower-bound dispatch time (None
    when that time is 0), the figure DeepEP would print if epcomm's route ran at the bound;
    deepep_combine_rdma_gbps: the same pairs of BF16 rows over the combine's lower bound."""
    nodes: int
    gpus_per_node: int
    tokens: int
    hidden: int
    topk: int
    experts: int
    dtype: str
    routing: str
    max_nodes: int | None
    nic_gbps: float
    nvlink_gbps: float
    seed: int
    dispatch_row_bytes: int
    combine_row_bytes: int
    mean_nodes_per_token: float
    mean_ranks_per_token: float
    epcomm_dispatch: Traffic
    epcomm_combine: Traffic
    flat_dispatch: Traffic
    flat_combine: Traffic
    epcomm_buffers: Buffers
    flat_buffers: Buffers
    deepep_rdma_bytes: float
    deepep_rdma_gbps: float | None
    deepep_combine_rdma_gbps: float | None

    def to_dict(self) -> dict:
        """Plain dicts, ints, floats, strings and None (JSON-ready)."""
        return asdict(self)


def _bandwidth(name: str, v) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)):
        raise TypeError(f"{name} must be a number, got {type(v).__name__}")
    if not (math.isfinite(v) and v > 0):
        raise ValueError(f"{name}={v} must be positive and finite")
    return float(v)


def _check(nodes, gpus_per_node, tokens, hidden, topk, experts, dtype, routing, max_nodes, seed) -> tuple:
    """The arguments of plan() checked (TypeError / ValueError naming the argument)."""
    N = check_int("nodes", nodes, lo=1)
    G = check_int("gpus_per_node", gpus_per_node, lo=1)
    T = check_int("tokens", tokens, lo=1)
    E = check_int("experts", experts, lo=1)
    K = check_int("topk", topk, lo=1, hi=E)
    check_int("seed", seed, lo=0)
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r} must be one of {', '.join(map(repr, DTYPES))}")
    H = check_hidden_size(check_int("hidden", hidden, lo=1), fp8=dtype == "fp8", name=None)
    check_experts_divisible(E, N * G, ranks_arg="nodes*gpus_per_node")
    if routing not in ROUTINGS:
        raise ValueError(f"routing={routing!r} must be one of {', '.join(map(repr, ROUTINGS))}")
    if routing == "uniform":
        if max_nodes is not None:
            raise ValueError("max_nodes applies to routing='node-limited' only")
        return N, G, T, H, K, E, None
    if max_nodes is None:
        raise ValueError("routing='node-limited' needs max_nodes (at most this many nodes per token)")
    M = check_int("max_nodes", max_nodes, lo=1)
    if K > min(M, N) * (E // N):
        raise ValueError(f"topk={K} exceeds the {min(M, N) * (E // N)} experts of max_nodes={M} nodes")
    return N, G, T, H, K, E, M


def _traffic(counts: RowCounts, route: str, op: str, row: int, nic: float, nvl: float) -> Traffic:
    """Bytes per GPU of one operation (a combine swaps send and receive) and its lower bound."""
    swap = {"send": "recv", "recv": "send"} if op == "combine" else {"send": "send", "recv": "recv"}
    b = {(k, d): counts.rows[route, k, swap[d]] * row for k in LINKS for d in ("send", "recv")}
    stats = {key: LinkBytes(int(v.max()), float(v.mean())) for key, v in b.items()}
    t_net = max(stats["network", "send"].max, stats["network", "recv"].max) / (nic * 1e3)
    t_nvl = max(stats["nvlink", "send"].max, stats["nvlink", "recv"].max) / (nvl * 1e3)
    bound = "none" if t_net == t_nvl == 0 else ("network" if t_net >= t_nvl else "nvlink")
    return Traffic(stats["network", "send"], stats["network", "recv"], stats["nvlink", "send"],
                   stats["nvlink", "recv"], max(t_net, t_nvl), bound)


def _buffers(dispatch: Traffic, combine: Traffic, bound_rows: dict, d_row: int, c_row: int) -> Buffers:
    return Buffers(ReceiveSize(dispatch.network_recv.max, bound_rows["dispatch", "network"] * d_row),
                   ReceiveSize(dispatch.nvlink_recv.max, bound_rows["dispatch", "nvlink"] * d_row),
                   ReceiveSize(combine.network_recv.max, bound_rows["combine", "network"] * c_row),
                   ReceiveSize(combine.nvlink_recv.max, bound_rows["combine", "nvlink"] * c_row))


def _gbps(nbytes: float, time_us: float) -> float | None:
    return nbytes / (time_us * 1e3) if time_us > 0 else None


def draw_and_count(nodes: int, gpus_per_node: int, tokens: int, topk: int, experts: int,
                   max_nodes: int | None, seed: int) -> RowCounts:
    """Draw each source GPU's routing in rank order from ``numpy.random.default_rng(seed)``
    (uniform: ``random_expert_sets``; max_nodes given: ``random_topk_node_limited``) and count it."""
    rng = np.random.default_rng(seed)
    c = Counter(nodes, gpus_per_node, experts)
    for src in range(nodes * gpus_per_node):
        if max_nodes is None:
            idx = random_expert_sets(rng, tokens, experts, topk)
        else:
            idx = random_topk_node_limited(rng, tokens, experts, topk, num_nodes=nodes, max_nodes=max_nodes)
        c.add(idx, src)
    return c.result()


def plan(nodes, gpus_per_node, tokens, hidden, topk, experts, dtype="bf16", routing="uniform", max_nodes=None,
         nic_gbps=NIC_GBPS, nvlink_gbps=NVLINK_GBPS, seed=0) -> Plan:
    """Bytes per GPU over the network and NVLink, lower-bound times and receive sizes of a
    dispatch (rows of ``dtype``) and a combine (BF16 rows), with epcomm's hierarchical route and
    with a flat all-to-all, on ``nodes`` x ``gpus_per_node`` GPUs, ``tokens`` tokens per GPU,
    counted exactly from a routing drawn with ``seed``.

    routing: "uniform" (each token's top-k distinct experts uniformly at random) or
    "node-limited" with ``max_nodes`` M (M nodes per token first, then its top-k among their
    experts: ``epcomm.testing.random_topk_node_limited``).  nic_gbps / nvlink_gbps: GB/s per GPU
    and direction.

    Raises TypeError / ValueError naming the argument: non-int sizes, sizes < 1, topk > experts,
    experts not a multiple of nodes * gpus_per_node, hidden not a multiple of 8 (BF16) or 128
    (FP8), an unknown dtype or routing, max_nodes missing for (or given to other than)
    "node-limited", topk more than the experts of max_nodes nodes, bandwidths not positive."""
    N, G, T, H, K, E, M = _check(nodes, gpus_per_node, tokens, hidden, topk, experts, dtype, routing,
                                 max_nodes, seed)
    nic, nvl = _bandwidth("nic_gbps", nic_gbps), _bandwidth("nvlink_gbps", nvlink_gbps)
    counts = draw_and_count(N, G, T, K, E, M, seed)
    d_row, c_row = row_bytes(H, dtype), row_bytes(H, "bf16")
    ops = {(route, op): _traffic(counts, route, op, d_row if op == "dispatch" else c_row, nic, nvl)
           for route in ROUTES for op in ("dispatch", "combine")}
    buffers = {route: _buffers(ops[route, "dispatch"], ops[route, "combine"],
                               receive_bound_rows(route, N, G, T, K, M), d_row, c_row) for route in ROUTES}
    pairs = float(counts.node_pairs.mean())
    t_d, t_c = ops["epcomm", "dispatch"].time_us, ops["epcomm", "combine"].time_us
    return Plan(N, G, T, H, K, E, dtype, routing, M, nic, nvl, int(seed), d_row, c_row,
                counts.token_nodes / counts.tokens, counts.token_ranks / counts.tokens,
                ops["epcomm", "dispatch"], ops["epcomm", "combine"], ops["flat", "dispatch"], ops["flat", "combine"],
                buffers["epcomm"], buffers["flat"], pairs * d_row, _gbps(pairs * d_row, t_d), _gbps(pairs * c_row, t_c))
