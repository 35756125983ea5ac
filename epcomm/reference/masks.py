"""Rank masks (shrink mode) in the reference: the routing that masked ranks leave.

A masked rank is neither sent to nor heard from, so every operation of the surviving ranks
equals the same operation on the routing this module returns: every top-k entry naming an
expert of a masked rank becomes -1, and a masked rank's own tokens go nowhere (all -1).  Pass
the result to :func:`epcomm.reference.dispatch` (or ``get_dispatch_layout``) and
:func:`epcomm.reference.low_latency_dispatch`, then compare only the surviving ranks' results.
"""
from __future__ import annotations

import numpy as np

from epcomm.reference._args import _rank_list, _topk_list
from epcomm.validate import check_int


def check_masked_ranks(masked_ranks, num_ranks: int) -> frozenset:
    """``masked_ranks`` (an iterable of ints in [0, R)) as a frozenset; TypeError/ValueError
    naming ``masked_ranks`` otherwise."""
    if isinstance(masked_ranks, (str, bytes)) or not hasattr(masked_ranks, "__iter__"):
        raise TypeError(f"masked_ranks must be an iterable of ints, got {type(masked_ranks).__name__}")
    return frozenset(check_int("masked_ranks", r, lo=0, hi=num_ranks - 1) for r in masked_ranks)


def mask_routing(topk_idx, num_experts: int, masked_ranks) -> list[np.ndarray]:
    """The routing of the surviving ranks once ``masked_ranks`` are masked.

    Args:
        topk_idx: list over R ranks of int64 [N_r, K] (-1 = none), indices in [-1, E).
        num_experts: E, a positive multiple of R.
        masked_ranks: iterable of ranks in [0, R).

    Returns a new list of int64 [N_r, K]: entries of experts on masked ranks (e // (E / R) in
    ``masked_ranks``) and every entry of a masked rank's tokens set to -1; the others unchanged.
    Raises TypeError/ValueError naming the argument.
    """
    topk_idx = _rank_list("topk_idx", topk_idx)
    R = len(topk_idx)
    E = check_int("num_experts", num_experts, lo=1)
    if E % R:
        raise ValueError(f"num_experts={E} must be a multiple of the rank count {R}")
    topk_idx = _topk_list("topk_idx", topk_idx, R, [a.shape[0] if isinstance(a, np.ndarray) else 0
                                                    for a in topk_idx], E)
    masked = check_masked_ranks(masked_ranks, R)
    dead = np.zeros(R, dtype=bool)
    dead[list(masked)] = True
    L = E // R
    out = []
    for r, idx in enumerate(topk_idx):
        if dead[r]:
            out.append(np.full_like(idx, -1))
            continue
        gone = (idx >= 0) & dead[np.clip(idx, 0, E - 1) // L]
        out.append(np.where(gone, np.int64(-1), idx))
    return out
