"""Exact per-GPU row counts of one dispatch, from a routing: epcomm's hierarchical route and a
flat all-to-all (NumPy, vectorised over the tokens of a source GPU).

Ranks r = node * G + local; expert e lives on rank e // (E / R).  A token counts once per
destination rank, however many of its experts live there; its own rank costs nothing.

- flat: the source sends the token to each destination rank directly: over NVLink inside its
  node, over the network to another node.
- epcomm (hierarchical): a token of rank (n, l) crosses the network once per destination node
  m != n, to rank (m, l), which forwards it over NVLink to the other ranks of node m that hold
  one of its experts; inside node n the source sends it over NVLink to those ranks directly.
  So in both cases the token enters node m at local index l, and every destination rank of
  another local index gets it over NVLink from there.

A combine moves the same rows the other way (what a GPU sends in the dispatch it receives in the
combine): with the node-first reduction one row per (token, destination node) crosses the network.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from epcomm.validate import check_expert_range, check_experts_divisible, check_int

ROUTES = ("epcomm", "flat")
LINKS = ("network", "nvlink")
DIRECTIONS = ("send", "recv")


@dataclass(frozen=True)
class RowCounts:
    """Rows of one dispatch per GPU (a combine: the same with send and receive swapped).

    rows: ``(route, link, direction) -> int64 [R]`` for route in ROUTES, link in LINKS,
        direction in DIRECTIONS (rows GPU r sends / receives over that kind of link).
    node_pairs: int64 [R]: (token, destination node) pairs of each source GPU, its own node
        included: the rows of DeepEP's "RDMA bandwidth" accounting.
    token_ranks, token_nodes: over all tokens, the sum of distinct destination ranks and nodes
        (the source's own included).
    tokens: the number of tokens counted (all sources)."""
    rows: dict
    node_pairs: np.ndarray
    token_ranks: int
    token_nodes: int
    tokens: int


class Counter:
    """Accumulates :class:`RowCounts` over batches of tokens (``add``), then ``result()``."""

    def __init__(self, nodes: int, gpus_per_node: int, experts: int):
        self.G = gpus_per_node
        self.R = nodes * gpus_per_node
        self.per_rank = experts // self.R
        self.rows = {(r, k, d): np.zeros(self.R, np.int64) for r in ROUTES for k in LINKS for d in DIRECTIONS}
        self.node_pairs = np.zeros(self.R, np.int64)
        self.token_ranks = self.token_nodes = self.tokens = 0

    def _bump(self, key, where, mask) -> None:
        self.rows[key] += np.bincount(where[mask], minlength=self.R)

    def add(self, topk_idx: np.ndarray, src: int) -> None:
        """Count the tokens ``topk_idx`` (int [T, K], -1 = unused slot) of source rank ``src``."""
        G = self.G
        dr = np.where(topk_idx >= 0, topk_idx // self.per_rank, -1)
        dr.sort(axis=1)
        new = np.ones(dr.shape, bool)
        new[:, 1:] = dr[:, 1:] != dr[:, :-1]
        rank = new & (dr >= 0)            # one entry per distinct destination rank
        dn = dr // G                      # sorted as dr is, so equal nodes are adjacent too
        new[:, 1:] = dn[:, 1:] != dn[:, :-1]
        node = new & (dr >= 0)            # one entry per distinct destination node
        sn, sl = divmod(src, G)
        remote = dn != sn
        entry = dn * G + sl               # where the token enters node dn
        direct = rank & (dr != src)
        for link, mask in (("network", direct & remote), ("nvlink", direct & ~remote)):
            self.rows["flat", link, "send"][src] += int(mask.sum())
            self._bump(("flat", link, "recv"), dr, mask)
        net = node & remote
        self.rows["epcomm", "network", "send"][src] += int(net.sum())
        self._bump(("epcomm", "network", "recv"), entry, net)
        fwd = rank & (dr % G != sl)
        self._bump(("epcomm", "nvlink", "send"), entry, fwd)
        self._bump(("epcomm", "nvlink", "recv"), dr, fwd)
        n_nodes = int(node.sum())
        self.node_pairs[src] += n_nodes
        self.token_nodes += n_nodes
        self.token_ranks += int(rank.sum())
        self.tokens += topk_idx.shape[0]

    def result(self) -> RowCounts:
        return RowCounts(rows={k: v.copy() for k, v in self.rows.items()}, node_pairs=self.node_pairs.copy(),
                         token_ranks=self.token_ranks, token_nodes=self.token_nodes, tokens=self.tokens)


def count_rows(topk_idx, gpus_per_node: int, experts: int) -> RowCounts:
    """Exact row counts of a dispatch of the routing ``topk_idx``: int [R, T, K], source rank
    major (row ``[r, t]``: the experts of token t of rank r; -1 marks an unused slot), on
    R / gpus_per_node nodes of ``gpus_per_node`` GPUs holding ``experts`` experts.

    Raises TypeError / ValueError (naming the argument) for a non-3-D or non-integer array, R
    not a multiple of gpus_per_node, experts not a multiple of R, or an index outside
    [-1, experts)."""
    a = np.asarray(topk_idx)
    if a.ndim != 3 or a.dtype.kind not in "iu":
        raise TypeError(f"topk_idx must be an int array [R, T, K], got {a.dtype} of shape {a.shape}")
    G = check_int("gpus_per_node", gpus_per_node, lo=1)
    E = check_int("experts", experts, lo=1)
    R = a.shape[0]
    if R == 0 or R % G:
        raise ValueError(f"topk_idx has {R} source ranks, not a positive multiple of gpus_per_node={G}")
    check_experts_divisible(E, R, ranks_arg="R")
    check_expert_range("topk_idx", a, E)
    c = Counter(R // G, G, E)
    for r in range(R):
        c.add(a[r].astype(np.int64), r)
    return c.result()


def receive_bound_rows(route: str, nodes: int, gpus_per_node: int, tokens: int, topk: int,
                       max_nodes: int | None) -> dict:
    """Rows a GPU can receive in the worst case of ANY routing with ``topk`` experts per token
    (and at most ``max_nodes`` nodes per token; None: no limit): ``(op, link) -> rows`` for op in
    ("dispatch", "combine"), link in LINKS.

    Dispatch: every token of every source that can reach this GPU over that link comes to it
    (epcomm's route: the same-index rank of each other node sends it all its tokens, and each other
    rank of its node forwards the tokens of every node's same-index rank).  Combine: a token
    returns one row per remote node (epcomm's route) or per remote rank (flat), and per other
    rank of its node, at most top-k of each."""
    if route not in ROUTES:
        raise ValueError(f"route={route!r} must be one of {', '.join(map(repr, ROUTES))}")
    N, G, T, K = nodes, gpus_per_node, tokens, topk
    M = N if max_nodes is None else min(max_nodes, N)
    remote_nodes = min(K, M, N - 1)
    if route == "epcomm":
        return {("dispatch", "network"): (N - 1) * T, ("dispatch", "nvlink"): (G - 1) * N * T,
                ("combine", "network"): T * remote_nodes, ("combine", "nvlink"): N * T * min(K, G - 1)}
    return {("dispatch", "network"): (N - 1) * G * T, ("dispatch", "nvlink"): (G - 1) * T,
            ("combine", "network"): T * min(K, min(M, N - 1) * G), ("combine", "nvlink"): T * min(K, G - 1)}
