"""The handle of an internode dispatch: what its combine (or a cached dispatch) retraces."""
from __future__ import annotations

from dataclasses import dataclass

from epcomm.normal.handle import DispatchHandle


@dataclass(eq=False)
class InternodeHandle(DispatchHandle):
    """A :class:`epcomm.normal.DispatchHandle` (``rank_prefix``: the receive offsets per
    source rank, int32 [R + 1]; ``send_pos``: int32 [N, R], each token's index among this rank's
    tokens to each rank, -1 where not sent) plus the route across nodes: ``node_pos`` int32
    [N, nodes] (a token's slot at each node's forwarder, -1 if not sent there), ``fwd_pos``
    int32 [nodes, slots, ranks_per_node] (for the tokens this rank forwards, the row each rank
    of its node received them at, -1 if none), and the chunk rows every rank agreed on."""

    ranks_per_node: int = 0
    chunk_rows: int = 0
    node_pos: object = None
    fwd_pos: object = None
