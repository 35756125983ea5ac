"""Normal (high-throughput) dispatch and combine over all ranks at once."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from epcomm.reference._args import (BF16, FP8, FP8_GROUP, _F32, _I32, _I64, _array, _arrays, _rank_list,
                                    _same_width_list, _topk_list)
from epcomm.reference.layout import _token_in_rank
from epcomm.validate import check_experts_divisible, check_hidden_size, check_int, check_numerics

__all__ = ["DispatchHandle", "DispatchResult", "dispatch", "combine"]


@dataclass(eq=False)
class DispatchHandle:
    """What one rank keeps from a normal dispatch to combine later.

    Attributes:
        rank_prefix: int32 [R+1]; rows received from source rank s are the receive rows
            [rank_prefix[s], rank_prefix[s+1]).
        send_pos: int32 [N, R]; for local token t and destination d, the index of t among the
            tokens this rank sends to d (in token order), -1 if t does not go to d.
        is_token_in_rank: bool [N, R].
        recv_src_idx: int32 [rows]; source token index of every received row, -1 for padding
            rows (rows = num_worst_tokens in that mode, else num_recv_tokens).
        num_recv_tokens: M, the number of real received rows.
    """

    rank_prefix: np.ndarray
    send_pos: np.ndarray
    is_token_in_rank: np.ndarray
    recv_src_idx: np.ndarray
    num_recv_tokens: int


@dataclass(eq=False)
class DispatchResult:
    """One rank's output of :func:`dispatch`.

    Attributes:
        recv_x: [rows, H], dtype of x (rows = num_worst_tokens if given, else M).
        recv_x_scales: float32 [rows, H // 128] for FP8 input, else None.
        recv_topk_idx: int64 [rows, K] with local expert indices (-1 elsewhere), or None
            without topk_idx.
        recv_topk_weights: float32 [rows, K], or None without topk_weights.
        num_recv_tokens_per_expert_list: L Python ints (received top-k slots naming each local
            expert, i.e. rows, a row naming an expert twice counting twice; rounded up to
            expert_alignment); empty without topk_idx or with num_worst_tokens.
        handle: the :class:`DispatchHandle` for :func:`combine`.
    """

    recv_x: np.ndarray
    recv_x_scales: np.ndarray | None
    recv_topk_idx: np.ndarray | None
    recv_topk_weights: np.ndarray | None
    num_recv_tokens_per_expert_list: list
    handle: DispatchHandle


# --------------------------------------------------------------------------- dispatch


@dataclass(eq=False)
class _DispatchArgs:
    """Checked dispatch arguments; per-rank lists are indexed by source rank."""

    xs: list            # [N_s, H] of dtype dt
    L: int              # experts per rank
    align: int          # expert_alignment
    worst: int          # num_worst_tokens (0: off)
    scales: list | None  # float32 [N_s, H // 128] with FP8 x
    idx: list | None    # int64 [N_s, K]
    w: list | None      # float32 [N_s, K]
    tir: list           # bool [N_s, R]

    @property
    def K(self) -> int:
        return self.idx[0].shape[1] if self.idx is not None else 0


def _dispatch_x(x, x_scales):
    """(xs, scales): the payload list (all bf16 or all FP8, one H) and the FP8 scales or None."""
    xs = _rank_list("x", x)
    _array("x[0]", xs[0], None, 2)
    dt, H = xs[0].dtype, xs[0].shape[1]
    if dt not in (BF16, FP8):
        raise TypeError(f"x[0] must have dtype bfloat16 or float8_e4m3fn, got {dt.name}")
    _same_width_list("x", xs, dt, None)
    if dt != FP8:
        if x_scales is not None:
            raise ValueError("x_scales is only accepted with float8_e4m3fn x")
        return xs, None
    check_hidden_size(H, fp8=True, name="x")
    if x_scales is None:
        raise ValueError("x_scales is required with float8_e4m3fn x")
    return xs, _arrays("x_scales", x_scales, _F32, len(xs), [(a.shape[0], H // FP8_GROUP) for a in xs])


def _dispatch_routing(topk_idx, topk_weights, is_token_in_rank, Ns: list[int], E: int, L: int):
    """(idx, w, tir): the checked routing, tir derived from idx when idx is given."""
    R = len(Ns)
    if topk_idx is None:
        if topk_weights is not None:
            raise ValueError("topk_weights needs topk_idx")
        if is_token_in_rank is None:
            raise ValueError("dispatch needs topk_idx or is_token_in_rank")
        return None, None, _arrays("is_token_in_rank", is_token_in_rank, np.bool_, R, [(n, R) for n in Ns])
    idx = _topk_list("topk_idx", topk_idx, R, Ns, E)
    tir = [_token_in_rank(a, R, L) for a in idx]
    if is_token_in_rank is not None:
        given = _rank_list("is_token_in_rank", is_token_in_rank, R)
        for r, a in enumerate(given):
            _array(f"is_token_in_rank[{r}]", a, np.bool_, 2, (Ns[r], R))
            if not np.array_equal(a, tir[r]):
                raise ValueError(f"is_token_in_rank[{r}] disagrees with the routing of topk_idx[{r}]")
    w = None
    if topk_weights is not None:
        w = _arrays("topk_weights", topk_weights, _F32, R, [a.shape for a in idx])
    return idx, w, tir


def _dispatch_args(x, num_experts, topk_idx, topk_weights, x_scales, is_token_in_rank, expert_alignment,
                   num_worst_tokens) -> _DispatchArgs:
    R = len(_rank_list("x", x))
    E = check_int("num_experts", num_experts, lo=1)
    L = check_experts_divisible(E, R)
    align = check_int("expert_alignment", expert_alignment, lo=1)
    worst = check_int("num_worst_tokens", num_worst_tokens, lo=0)
    xs, scales = _dispatch_x(x, x_scales)
    idx, w, tir = _dispatch_routing(topk_idx, topk_weights, is_token_in_rank, [a.shape[0] for a in xs], E, L)
    return _DispatchArgs(xs, L, align, worst, scales, idx, w, tir)


def _send_plan(a: _DispatchArgs):
    """(sent, counts, send_pos): sent[s][d] the tokens of rank s going to rank d, ascending
    (both the send order and the receive order within source s); counts int64 [R_src, R_dst];
    send_pos[s] int32 [N_s, R] as in :class:`DispatchHandle`."""
    R = len(a.xs)
    sent = [[np.flatnonzero(col) for col in a.tir[s].T] for s in range(R)]
    counts = np.array([[sent[s][d].size for d in range(R)] for s in range(R)], dtype=_I64).reshape(R, R)
    if a.worst:
        for d, m in enumerate(counts.sum(axis=0)):
            if m > a.worst:
                raise ValueError(f"num_worst_tokens={a.worst} is too small: rank {d} receives M={int(m)} rows")
    send_pos = [np.where(t, np.cumsum(t, axis=0, dtype=_I64) - 1, -1).astype(_I32) for t in a.tir]
    return sent, counts, send_pos


def _local_topk(a: _DispatchArgs, d: int, M: int, raw_idx, raw_w):
    """(recv_topk_idx, recv_topk_weights, count_list) of destination d from the received raw rows."""
    local = raw_idx - d * a.L
    # raw -1 gives local < 0, so padding and unused slots fall out with foreign experts.
    keep = (local >= 0) & (local < a.L)
    recv_idx = np.where(keep, local, -1).astype(_I64)
    recv_w = np.where(keep, raw_w, _F32(0)).astype(_F32) if raw_w is not None else None
    count_list: list = []
    if not a.worst:
        # Per top-k slot, as get_dispatch_layout counts num_tokens_per_expert (which the
        # kernel sums over sources) and as DeepEP does: a row naming a local expert twice
        # counts twice.
        per_expert = np.bincount(recv_idx[:M][keep[:M]], minlength=a.L).astype(_I64)
        count_list = [int(c) for c in (per_expert + a.align - 1) // a.align * a.align]
    return recv_idx, recv_w, count_list


def _receive(a: _DispatchArgs, d: int, sent, counts, send_pos) -> DispatchResult:
    """Destination d's result: the rows of every source, source-major."""
    R, H, K = len(a.xs), a.xs[0].shape[1], a.K
    M = int(counts[:, d].sum())
    rows = a.worst if a.worst else M
    prefix = np.zeros(R + 1, dtype=_I64)
    np.cumsum(counts[:, d], out=prefix[1:])
    recv_x = np.zeros((rows, H), dtype=a.xs[0].dtype)
    recv_scales = np.zeros((rows, H // FP8_GROUP), dtype=_F32) if a.scales is not None else None
    src_idx = np.full(rows, -1, dtype=_I32)
    raw_idx = np.full((rows, K), -1, dtype=_I64) if a.idx is not None else None
    raw_w = np.zeros((rows, K), dtype=_F32) if a.w is not None else None
    for s in range(R):
        lo, hi = int(prefix[s]), int(prefix[s + 1])
        toks = sent[s][d]
        np.take(a.xs[s], toks, axis=0, out=recv_x[lo:hi])
        src_idx[lo:hi] = toks
        if recv_scales is not None:
            np.take(a.scales[s], toks, axis=0, out=recv_scales[lo:hi])
        if raw_idx is not None:
            raw_idx[lo:hi] = a.idx[s][toks]
        if raw_w is not None:
            raw_w[lo:hi] = a.w[s][toks]
    recv_idx, recv_w, count_list = (None, None, []) if raw_idx is None else _local_topk(a, d, M, raw_idx, raw_w)
    handle = DispatchHandle(rank_prefix=prefix.astype(_I32), send_pos=send_pos[d],
                            is_token_in_rank=a.tir[d].copy(), recv_src_idx=src_idx, num_recv_tokens=M)
    return DispatchResult(recv_x, recv_scales, recv_idx, recv_w, count_list, handle)


def dispatch(x, num_experts, *, topk_idx=None, topk_weights=None, x_scales=None, is_token_in_rank=None,
             expert_alignment=1, num_worst_tokens=0) -> list[DispatchResult]:
    """Normal (high-throughput) dispatch: every token goes once to every rank holding one of its experts.

    Args:
        x: list over ranks of [N_r, H] arrays, all ``ml_dtypes.bfloat16`` or all
            ``ml_dtypes.float8_e4m3fn`` (then x_scales is required and H % 128 == 0).
        num_experts: E, a multiple of R = len(x).
        topk_idx: list of int64 [N_r, K] (one K for all ranks), entries in [-1, E).  When given,
            token t goes to rank d iff one of its experts lives on d.
        topk_weights: list of float32 [N_r, K]; needs topk_idx.
        x_scales: list of float32 [N_r, H // 128]; only with FP8 x.
        is_token_in_rank: list of bool [N_r, R].  Required without topk_idx; with topk_idx it
            may be given but must equal the routing derived from topk_idx.
        expert_alignment: >= 1; each per-expert count is rounded up to a multiple of it.
        num_worst_tokens: if > 0, every output has exactly this many rows: the M real rows,
            then padding (-1 for indices and source indices, 0 for weights; x and scales are
            zeros here, but the kernels leave those padding rows unwritten, as DeepEP does:
            their contents are unspecified).

    On destination d, received rows are ordered by source rank, then by source token index.
    Data and scales are copied bit for bit.  recv_topk_idx keeps e - d*L for the experts of
    rank d and has -1 elsewhere; recv_topk_weights keeps the weights where the index is kept
    and has 0.0 elsewhere.

    Returns:
        one :class:`DispatchResult` per rank.

    Raises:
        TypeError: a non-list argument, non-array entry, wrong dtype, non-int size.
        ValueError: wrong list length or shape, H % 128 != 0 with FP8, index outside [-1, E),
            E % R != 0, missing routing, topk_weights without topk_idx, inconsistent
            is_token_in_rank, expert_alignment < 1, num_worst_tokens < 0, or a rank receiving
            more than num_worst_tokens rows.
    """
    a = _dispatch_args(x, num_experts, topk_idx, topk_weights, x_scales, is_token_in_rank, expert_alignment,
                       num_worst_tokens)
    sent, counts, send_pos = _send_plan(a)
    return [_receive(a, d, sent, counts, send_pos) for d in range(len(a.xs))]


# --------------------------------------------------------------------------- combine


def _check_handles(handles, num_ranks: int) -> list:
    hs = _rank_list("handles", handles, num_ranks)
    for r, h in enumerate(hs):
        if not isinstance(h, DispatchHandle):
            raise TypeError(f"handles[{r}] must be a DispatchHandle, got {type(h).__name__}")
        _array(f"handles[{r}].rank_prefix", h.rank_prefix, None, 1, (num_ranks + 1,))
        n = h.is_token_in_rank.shape[0] if isinstance(h.is_token_in_rank, np.ndarray) else None
        _array(f"handles[{r}].is_token_in_rank", h.is_token_in_rank, np.bool_, 2, (None, num_ranks))
        _array(f"handles[{r}].send_pos", h.send_pos, None, 2, (n, num_ranks))
    return hs


def _combine_args(x, handles, topk_weights, bias, num_ranks_per_node):
    """(xs, hs, w, biases, P) checked: w None or a list over ranks, biases a list of 0 to 2 lists,
    P the ranks per node (R for one node)."""
    xs = _rank_list("x", x)
    R = len(xs)
    P = R
    if num_ranks_per_node is not None:
        P = check_int("num_ranks_per_node", num_ranks_per_node, lo=1)
        if P >= R:
            P = R
        elif R % P:
            raise ValueError(f"num_ranks={R} exceeds num_ranks_per_node={P} and is not a multiple of it")
    hs = _check_handles(handles, R)

    def enough_rows(label, d, a):
        if a.shape[0] < hs[d].num_recv_tokens:
            raise ValueError(f"{label} has {a.shape[0]} rows, fewer than the {hs[d].num_recv_tokens} "
                             f"rows rank {d} received")

    _same_width_list("x", xs, BF16, R, each=enough_rows)
    H = xs[0].shape[1]
    Ns = [h.is_token_in_rank.shape[0] for h in hs]
    w = None
    if topk_weights is not None:
        w = _same_width_list("topk_weights", topk_weights, _F32, R, [a.shape[0] for a in xs])
    if not isinstance(bias, (tuple, list)):
        raise TypeError(f"bias must be a tuple of 0, 1 or 2 lists over ranks, got {type(bias).__name__}")
    if len(bias) > 2:
        raise ValueError(f"bias holds {len(bias)} tensors, at most 2 are accepted")
    biases = [_arrays(f"bias[{i}]", bl, BF16, R, [(n, H) for n in Ns]) for i, bl in enumerate(bias)]
    return xs, hs, w, biases, P


def _take_rows(a: np.ndarray, rows: np.ndarray) -> np.ndarray:
    # Handles made by dispatch address consecutive rows; a slice then avoids a gathered copy.
    if rows.size and int(rows[-1]) - int(rows[0]) + 1 == rows.size and np.all(np.diff(rows) == 1):
        return a[int(rows[0]):int(rows[-1]) + 1]
    return a[rows]


def _add_rank(s: int, d: int, xs: list, hs: list, w: list | None, acc: np.ndarray, wacc) -> np.ndarray:
    """acc[t] = float32(acc[t] + row of x[d]) (and wacc likewise) for every token t of source s
    that went to d; returns those tokens."""
    h = hs[s]
    toks = np.flatnonzero(h.is_token_in_rank[:, d])
    if toks.size == 0:
        return toks
    rows = int(hs[d].rank_prefix[s]) + h.send_pos[toks, d].astype(_I64)
    lo, hi = int(hs[d].rank_prefix[s]), int(hs[d].rank_prefix[s + 1])
    if rows.min() < lo or rows.max() >= hi or hi > hs[d].num_recv_tokens:
        raise ValueError(f"handles[{s}].send_pos points outside the rows rank {d} received "
                         f"from rank {s} ([{lo}, {hi}))")
    # bf16 -> float32 is exact, so a float32 add loop over the bf16 rows is the float32
    # sum of the contract; the ufunc converts in small chunks, which keeps it in cache.
    part = acc[toks]
    np.add(part, _take_rows(xs[d], rows), out=part, dtype=_F32)
    acc[toks] = part
    if wacc is not None:
        wacc[toks] += _take_rows(w[d], rows)
    return toks


def _combine_source(s: int, xs: list, hs: list, w: list | None, biases: list, P: int, deepep: bool = False):
    """(combined_x, combined_weights) of source rank s, in the order of the contract."""
    R, H = len(xs), xs[0].shape[1]
    N = hs[s].is_token_in_rank.shape[0]
    K = w[0].shape[1] if w is not None else 0
    acc = np.zeros((N, H), dtype=_F32)
    if deepep and biases:
        # DeepEP starts from bias_0 + bias_1, one addition with a missing bias read as +0 (so a
        # -0 bias alone gives +0), then adds the ranks.
        acc = biases[0][s].astype(_F32) + (biases[1][s].astype(_F32) if len(biases) > 1 else _F32(0))
    wacc = np.zeros((N, K), dtype=_F32) if w is not None else None
    # Loops over d, never a reduction over an axis: np.sum may use pairwise summation, and
    # the kernels add the ranks' contributions one after another in ascending rank order
    # (within each node, then the nodes' partial sums in ascending node order).
    if P == R:
        for d in range(R):
            _add_rank(s, d, xs, hs, w, acc, wacc)
    else:
        for first in range(0, R, P):
            part = np.zeros((N, H), dtype=_F32)
            wpart = np.zeros((N, K), dtype=_F32) if w is not None else None
            reached = np.zeros(N, dtype=bool)
            for d in range(first, first + P):
                reached[_add_rank(s, d, xs, hs, w, part, wpart)] = True
            if deepep:  # DeepEP's forwarder sends each node's sum as bfloat16
                part = part.astype(BF16).astype(_F32)
            # Only tokens that reached node m add its partial, as the contract says (a +0
            # partial would leave acc's bits unchanged too: acc is never -0).
            acc[reached] += part[reached]
            if w is not None:
                wacc[reached] += wpart[reached]
    if not deepep:
        for bl in biases:
            acc += bl[s].astype(_F32)
    return acc.astype(BF16), wacc


def combine(x, handles, *, topk_weights=None, bias=(), num_ranks_per_node: int | None = None,
            numerics="epcomm") -> list[tuple[np.ndarray, np.ndarray | None]]:
    """Normal combine: sum each token's expert outputs back on its source rank.

    Args:
        x: list over ranks d of bfloat16 [rows_d, H], rows in the receive order of dispatch on
            rank d; rows_d >= handles[d].num_recv_tokens, rows past it are ignored.
        handles: list over ranks of the :class:`DispatchHandle` from :func:`dispatch`.
        topk_weights: optional list of float32 [rows_d, K] (one K), combined like x.
        bias: tuple of 0, 1 or 2 lists over ranks s of bfloat16 [N_s, H], added after the sum.
        num_ranks_per_node: P, the ranks of one node (the node of rank r is r // P); None or
            P >= R: one node.  With several nodes R % P == 0 is required.
        numerics: "epcomm", or "deepep" (DeepEP V1's order, below).

    Order of operations (part of the contract; GPU kernels match it bit for bit): for source
    rank s and token t, acc = float32 0; for node m = 0..R/P-1 where the token went to at
    least one rank of m: part = float32 0, for d in node m ascending where the token went to
    d, part = float32(part + float32(row of x[d])), then acc = float32(acc + part).  With one
    node this is the flat sum over d = 0..R-1 (0 + part == part: part is never -0).  Then
    acc = float32(acc + float32(bias_i[s][t])) for each bias in order; the output is
    bfloat16(acc), round to nearest even.  Combined weights follow the same node-then-rank
    sum (no bias) and stay float32.

    With numerics="deepep" (DeepEP's intranode.cu and internode.cu ``combine``): acc starts as
    float32(float32(bias_0) + float32(bias_1)), a missing bias read as +0 (so +0 without
    biases, where the two orders agree), then the ranks (or nodes) are added as above, and with
    several nodes each node's part is rounded to bfloat16 before it is added (DeepEP's forwarder
    sends it as bfloat16); no bias after the sum.  Weights as above.

    Returns:
        per rank s, (combined_x bfloat16 [N_s, H], combined_topk_weights float32 [N_s, K] or None).

    Raises:
        TypeError: wrong container, array or dtype, or a num_ranks_per_node that is not an int.
        ValueError: wrong lengths or shapes, more than 2 biases, too few rows in x[d], a
            handle pointing outside its rank's received rows, num_ranks_per_node < 1, or
            R > num_ranks_per_node with R % num_ranks_per_node != 0.
    """
    deepep = check_numerics(numerics) == "deepep"
    xs, hs, w, biases, P = _combine_args(x, handles, topk_weights, bias, num_ranks_per_node)
    return [_combine_source(s, xs, hs, w, biases, P, deepep) for s in range(len(xs))]
