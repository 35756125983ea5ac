"""Bytes each rank moves over the network and over NVLink in an internode normal dispatch."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from epcomm.reference._args import _I64, _array, _rank_list
from epcomm.validate import check_int

__all__ = ["InternodeTraffic", "internode_traffic"]


@dataclass(eq=False)
class InternodeTraffic:
    """Bytes of one dispatch per rank (result of :func:`internode_traffic`), int64 [R] each.

    Attributes:
        net_send, net_recv: bytes rank r sends / receives over the network.
        nvl_send, nvl_recv: bytes rank r sends / receives over NVLink.

    A combine moves the same rows the other way (its sends are the dispatch's receives, with
    its own row size): the node-first reduction returns one row per (token, remote node).
    """

    net_send: np.ndarray
    net_recv: np.ndarray
    nvl_send: np.ndarray
    nvl_recv: np.ndarray


def internode_traffic(is_token_in_rank_list, num_ranks_per_node, row_bytes) -> InternodeTraffic:
    """Bytes over the network and over NVLink of a dispatch along the internode route.

    Args:
        is_token_in_rank_list: list over source ranks s of bool [N_s, R]; token t of s goes to
            rank d iff entry [t, d] (as :attr:`Layout.is_token_in_rank`).
        num_ranks_per_node: P; rank r is local index r % P of node r // P.  P >= R: one node;
            otherwise R % P == 0 is required.
        row_bytes: bytes of one token's row (>= 1).

    The route: a token of rank s = (n, l) crosses the network once per destination node
    m != n (a node holding at least one rank it goes to), to rank (m, l), its forwarder there,
    which sends it over NVLink to every rank of node m it goes to except itself.  On its own
    node n the source is the forwarder: no network hop, and it sends over NVLink to the other
    ranks of node n it goes to.  A rank's own rows (the forwarder's, or the source's on its
    own node) are not counted on any link.

    Returns:
        an :class:`InternodeTraffic`.

    Raises:
        TypeError: not a list, an entry not a bool array, a non-int size.
        ValueError: wrong shapes, num_ranks_per_node or row_bytes < 1, R > P with R % P != 0.
    """
    tirs = _rank_list("is_token_in_rank_list", is_token_in_rank_list)
    R = len(tirs)
    for s, a in enumerate(tirs):
        _array(f"is_token_in_rank_list[{s}]", a, np.bool_, 2, (None, R))
    P = check_int("num_ranks_per_node", num_ranks_per_node, lo=1)
    B = check_int("row_bytes", row_bytes, lo=1)
    if P >= R:
        P = R
    elif R % P:
        raise ValueError(f"num_ranks={R} exceeds num_ranks_per_node={P} and is not a multiple of it")
    nodes = R // P
    net_send, net_recv, nvl_send, nvl_recv = (np.zeros(R, dtype=_I64) for _ in range(4))
    local = np.arange(R) % P
    for s, tir in enumerate(tirs):
        n, l = divmod(s, P)
        forwarders = np.arange(nodes) * P + l          # where the token enters each node
        per_node = tir.reshape(-1, nodes, P).any(axis=2).sum(axis=0, dtype=_I64)
        per_node[n] = 0                                 # its own node: no network hop
        net_send[s] += per_node.sum()
        net_recv[forwarders] += per_node
        # Rows to ranks of another local index go over NVLink from the node's forwarder.
        fwd = np.where(local != l, tir.sum(axis=0, dtype=_I64), 0)
        nvl_recv += fwd
        nvl_send[forwarders] += fwd.reshape(nodes, P).sum(axis=1)
    return InternodeTraffic(net_send * B, net_recv * B, nvl_send * B, nvl_recv * B)
