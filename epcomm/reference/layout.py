"""Routing counts of one rank's tokens: the reference of ``get_dispatch_layout``."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from epcomm.reference._args import _I32, _I64
from epcomm.validate import check_expert_range, check_experts_divisible, check_int

__all__ = ["Layout", "get_dispatch_layout"]


@dataclass(eq=False)
class Layout:
    """Routing counts of one rank's tokens (result of :func:`get_dispatch_layout`).

    Attributes:
        num_tokens_per_rank: int32 [R]; entry d = tokens of this rank that go to rank d (a
            token counts once per rank even if several of its experts live there).
        num_tokens_per_rdma_rank: int32 [R // num_ranks_per_node], the same per node (a token
            counts once per node); None when R <= num_ranks_per_node.
        num_tokens_per_expert: int32 [E]; entry e = number of top-k slots holding e (equal to
            the number of tokens choosing e when experts are distinct within a row).
        is_token_in_rank: bool [N, R]; token t goes to rank d.
    """

    num_tokens_per_rank: np.ndarray
    num_tokens_per_rdma_rank: np.ndarray | None
    num_tokens_per_expert: np.ndarray
    is_token_in_rank: np.ndarray


def _token_in_rank(topk_idx: np.ndarray, num_ranks: int, experts_per_rank: int) -> np.ndarray:
    """bool [N, R]: token t has an expert on rank d (int64 indices, -1 unused)."""
    tir = np.zeros((topk_idx.shape[0], num_ranks), dtype=bool)
    t, k = np.nonzero(topk_idx >= 0)
    tir[t, topk_idx[t, k] // experts_per_rank] = True
    return tir


def get_dispatch_layout(topk_idx, num_experts, num_ranks, num_ranks_per_node=8) -> Layout:
    """Routing counts of ONE rank's tokens.

    Args:
        topk_idx: integer array [N, K] (any integer dtype); -1 marks an unused slot.
        num_experts: E, a multiple of ``num_ranks``.
        num_ranks: R >= 1.
        num_ranks_per_node: ranks per node; when R exceeds it, R must be a multiple of it and
            per-node counts are returned.

    Returns:
        a :class:`Layout`.

    Raises:
        ValueError: topk_idx not a 2-D integer array, an entry outside [-1, E), E % R != 0,
            R > num_ranks_per_node with R % num_ranks_per_node != 0, non-positive sizes.
        TypeError: a size argument that is not an int.
    """
    if not isinstance(topk_idx, np.ndarray) or topk_idx.ndim != 2 or topk_idx.dtype.kind not in "iu":
        desc = (f"{topk_idx.dtype.name} array of shape {topk_idx.shape}" if isinstance(topk_idx, np.ndarray)
                else type(topk_idx).__name__)
        raise ValueError(f"topk_idx must be a 2-D integer array, got {desc}")
    E = check_int("num_experts", num_experts, lo=1)
    R = check_int("num_ranks", num_ranks, lo=1)
    P = check_int("num_ranks_per_node", num_ranks_per_node, lo=1)
    L = check_experts_divisible(E, R, ranks_arg="num_ranks")
    if R > P and R % P != 0:
        raise ValueError(f"num_ranks={R} exceeds num_ranks_per_node={P} and is not a multiple of it")
    idx = topk_idx.astype(_I64, copy=False)
    check_expert_range("topk_idx", idx, E)

    tir = _token_in_rank(idx, R, L)
    per_rank = tir.sum(axis=0, dtype=_I64).astype(_I32)
    per_rdma = None
    if R > P:
        per_rdma = tir.reshape(tir.shape[0], R // P, P).any(axis=2).sum(axis=0, dtype=_I64).astype(_I32)
    per_expert = np.bincount(idx[idx >= 0], minlength=E).astype(_I32)
    return Layout(per_rank, per_rdma, per_expert, tir)
