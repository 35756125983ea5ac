"""Random routings and activations for tests (CPU, numpy only).

Every generator takes an explicit ``numpy.random.Generator`` so a failing test can be rerun
with the same seed.
"""
from __future__ import annotations

import ml_dtypes
import numpy as np

from epcomm.validate import check_experts_divisible, check_int

__all__ = ["random_topk", "random_expert_sets", "random_topk_node_limited", "random_weights", "random_bf16"]


def random_topk(rng: np.random.Generator, num_tokens, num_experts, topk, *, drop_prob=0.0, num_ranks=None,
                only_rank=None) -> np.ndarray:
    """Random top-k routing.

    Args:
        rng: numpy Generator.
        num_tokens: N >= 0.
        num_experts: E >= 1.
        topk: K, 1 <= K <= E (K <= L = E // num_ranks with only_rank).
        drop_prob: probability in [0, 1] that an entry is independently replaced by -1.
        num_ranks: R, needed with only_rank (E % R == 0).
        only_rank: if given, every expert is drawn from that rank's experts
            [only_rank * L, (only_rank + 1) * L) (heavily imbalanced routing).

    Each row holds K distinct experts, a uniformly random subset in random order, before the
    drops.

    Returns:
        int64 [N, K].

    Raises:
        TypeError: non-int sizes.  ValueError: sizes out of range, drop_prob outside [0, 1],
        only_rank without num_ranks, E % R != 0, K > L with only_rank.
    """
    N = check_int("num_tokens", num_tokens, lo=0)
    E = check_int("num_experts", num_experts, lo=1)
    K = check_int("topk", topk, lo=1)
    if not 0.0 <= float(drop_prob) <= 1.0:
        raise ValueError(f"drop_prob={drop_prob} must be in [0, 1]")
    lo, pool = 0, E
    if only_rank is not None:
        if num_ranks is None:
            raise ValueError("only_rank needs num_ranks")
        R = check_int("num_ranks", num_ranks, lo=1)
        r = check_int("only_rank", only_rank, lo=0)
        pool = check_experts_divisible(E, R, ranks_arg="num_ranks")
        if r >= R:
            raise ValueError(f"only_rank={r} must be < num_ranks={R}")
        lo = r * pool
    if K > pool:
        raise ValueError(f"topk={K} exceeds the {pool} experts to choose from")
    # The K smallest of iid uniform keys form a uniform K-subset; sorting them by key gives a
    # uniformly random order as well.
    keys = rng.random((N, pool))
    pick = np.argpartition(keys, K - 1, axis=1)[:, :K] if K < pool else np.tile(np.arange(pool), (N, 1))
    order = np.argsort(np.take_along_axis(keys, pick, axis=1), axis=1)
    idx = np.take_along_axis(pick, order, axis=1).astype(np.int64) + lo
    if drop_prob > 0:
        idx[rng.random((N, K)) < drop_prob] = -1
    return idx


def random_expert_sets(rng: np.random.Generator, num_tokens, num_experts, topk) -> np.ndarray:
    """K distinct experts per token, a uniformly random subset of [0, num_experts), drawn in
    O(N * K^2) without the N x E keys of :func:`random_topk` (the planner draws millions of rows).

    The order within a row is not random (Floyd's algorithm fills column i from
    [0, E - K + i]): use :func:`random_topk` where the order matters.

    Returns int64 [N, K].  Raises TypeError for non-int sizes, ValueError unless N >= 0 and
    1 <= K <= E."""
    N = check_int("num_tokens", num_tokens, lo=0)
    E = check_int("num_experts", num_experts, lo=1)
    K = check_int("topk", topk, lo=1, hi=E)
    out = np.empty((N, K), dtype=np.int64)
    # Floyd: for j = E-K .. E-1 draw t in [0, j]; keep t, or j if t is already taken (j never is).
    for i, j in enumerate(range(E - K, E)):
        t = rng.integers(0, j + 1, size=N)
        taken = (out[:, :i] == t[:, None]).any(axis=1)
        out[:, i] = np.where(taken, j, t)
    return out


def random_topk_node_limited(rng: np.random.Generator, num_tokens, num_experts, topk, *, num_nodes,
                             max_nodes) -> np.ndarray:
    """Node-limited top-k routing (DeepSeek-V3 routes each token's 8 experts within at most 4
    nodes): per token, first M = min(max_nodes, num_nodes) distinct nodes uniformly at random,
    then K distinct experts uniformly among the M * E / num_nodes experts of those nodes (node
    n holds experts [n * E / num_nodes, (n + 1) * E / num_nodes)).  A token so reaches at most
    min(M, K) nodes; fewer when a chosen node gets none of its K experts.  Order within a row
    as in :func:`random_expert_sets`.

    Returns int64 [N, K].  Raises TypeError for non-int sizes; ValueError when E is not a
    multiple of num_nodes, max_nodes < 1, or K exceeds the M * E / num_nodes experts to choose
    from."""
    N = check_int("num_tokens", num_tokens, lo=0)
    E = check_int("num_experts", num_experts, lo=1)
    K = check_int("topk", topk, lo=1)
    nodes = check_int("num_nodes", num_nodes, lo=1)
    M = min(check_int("max_nodes", max_nodes, lo=1), nodes)
    per_node = check_experts_divisible(E, nodes, ranks_arg="num_nodes")
    if K > M * per_node:
        raise ValueError(f"topk={K} exceeds the {M * per_node} experts of max_nodes={M} nodes "
                         f"({per_node} per node)")
    chosen = random_expert_sets(rng, N, nodes, M)
    j = random_expert_sets(rng, N, M * per_node, K)  # positions among the chosen nodes' experts
    return np.take_along_axis(chosen, j // per_node, axis=1) * per_node + j % per_node


def random_weights(rng: np.random.Generator, topk_idx) -> np.ndarray:
    """Random positive top-k weights in [0.05, 1): float32 of topk_idx's shape, 0 where idx == -1."""
    idx = np.asarray(topk_idx)
    w = rng.uniform(0.05, 1.0, size=idx.shape).astype(np.float32)
    w[idx < 0] = 0.0
    return w


def random_bf16(rng: np.random.Generator, shape, scale=1.0) -> np.ndarray:
    """Standard normal values times ``scale`` as an ``ml_dtypes.bfloat16`` array of ``shape``.

    Raises ValueError if scale is not a positive finite number, or if every value underflowed
    to zero (a non-empty result is never all zeros).
    """
    scale = float(scale)
    if not (np.isfinite(scale) and scale > 0):
        raise ValueError(f"scale={scale} must be positive and finite")
    a = (rng.standard_normal(shape) * scale).astype(np.float32).astype(ml_dtypes.bfloat16)
    if a.size and not np.any(a.astype(np.float32)):
        raise ValueError(f"scale={scale} is so small that every bfloat16 value is zero")
    return a


_UINT_OF_WIDTH = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}


def bit_mismatch(name: str, got, want) -> str | None:
    """None if two host arrays are equal bit for bit (bf16/e4m3 included; integer arrays of
    different widths, e.g. JAX's int32 without x64, compared by value), else one line: how many
    elements differ and the first.  Used by the GPU tests and the benchmark's checks."""
    got, want = np.ascontiguousarray(np.asarray(got)), np.ascontiguousarray(np.asarray(want))
    if got.shape != want.shape:
        return f"{name}: shape {got.shape}, expected {want.shape}"
    if got.dtype.kind in "iub" and want.dtype.kind in "iub" and got.dtype != want.dtype:
        ne = got.astype(np.int64) != want.astype(np.int64)
    elif got.dtype.itemsize == want.dtype.itemsize:
        ne = got.view(_UINT_OF_WIDTH[got.dtype.itemsize]) != want.view(_UINT_OF_WIDTH[want.dtype.itemsize])
    else:
        return f"{name}: dtype {got.dtype}, expected {want.dtype}"
    n = int(ne.sum())
    if not n:
        return None
    first = tuple(int(v) for v in np.argwhere(ne)[0])
    return (f"{name}: {n} of {ne.size} elements differ from the reference (first at {list(first)}: got "
            f"{got[first]}, expected {want[first]})")
