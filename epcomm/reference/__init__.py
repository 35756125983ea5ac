"""NumPy reference of every epcomm communication operation: the executable specification.

Every function simulates all R ranks of an expert-parallel group at once: per-rank arguments
are Python lists (or tuples) indexed by rank, and results come back as lists indexed by rank.
The GPU tests compare the kernels with these functions, bit for bit where the contract says
so, so the order of floating-point operations written here is part of the specification.

Notation
    R  ranks (the length of the per-rank lists)
    E  experts, L = E // R local experts per rank (E % R == 0 is required); expert e lives on
       rank e // L with local index e % L
    N_r  tokens on rank r, H hidden size, K top-k, T max tokens per rank (low-latency mode)
    topk_idx  int64 [N, K], -1 marks an unused slot; topk_weights float32 [N, K]

Dtypes: activations are ``ml_dtypes.bfloat16`` (or ``ml_dtypes.float8_e4m3fn`` with float32
scales, one per token and 128 channels).  Only numpy and ml_dtypes are used.

Errors: a wrong Python type or array dtype raises TypeError, a wrong shape, length or value
raises ValueError; messages name the argument (and the rank, as ``x[3]``).
"""
from __future__ import annotations

from dataclasses import dataclass

import ml_dtypes
import numpy as np

__all__ = [
    "Layout", "get_dispatch_layout",
    "DispatchHandle", "DispatchResult", "dispatch", "combine",
    "fp8_quantize", "fp8_dequantize", "pack_ue8m0", "unpack_ue8m0",
    "LowLatencyHandle", "LowLatencyDispatchResult", "low_latency_dispatch", "low_latency_combine",
    "BF16", "FP8", "FP8_MAX", "FP8_GROUP",
]

BF16 = np.dtype(ml_dtypes.bfloat16)
FP8 = np.dtype(ml_dtypes.float8_e4m3fn)
#: Largest finite float8_e4m3fn value.
FP8_MAX = 448.0
#: Channels sharing one FP8 scale.
FP8_GROUP = 128

_F32 = np.float32
_I32 = np.int32
_I64 = np.int64


# --------------------------------------------------------------------------- validation helpers


def _int_arg(name: str, v, *, lo: int | None = None) -> int:
    # bool is an int subclass, but passing True as a count is always a bug.
    if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(v).__name__}")
    v = int(v)
    if lo is not None and v < lo:
        raise ValueError(f"{name}={v} must be >= {lo}")
    return v


def _rank_list(name: str, v, num_ranks: int | None = None) -> list:
    if not isinstance(v, (list, tuple)):
        raise TypeError(f"{name} must be a list over ranks, got {type(v).__name__}")
    if num_ranks is None and len(v) == 0:
        raise ValueError(f"{name} must hold at least one rank")
    if num_ranks is not None and len(v) != num_ranks:
        raise ValueError(f"{name} has {len(v)} entries, expected one per rank ({num_ranks})")
    return list(v)


def _array(name: str, a, dtype, ndim: int, shape: tuple | None = None) -> np.ndarray:
    """Check one array; ``shape`` entries that are None are free."""
    if not isinstance(a, np.ndarray):
        raise TypeError(f"{name} must be a numpy array, got {type(a).__name__}")
    if dtype is not None and a.dtype != np.dtype(dtype):
        raise TypeError(f"{name} must have dtype {np.dtype(dtype).name}, got {a.dtype.name}")
    if a.ndim != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {a.shape}")
    if shape is not None:
        for want, got in zip(shape, a.shape):
            if want is not None and want != got:
                raise ValueError(f"{name} has shape {a.shape}, expected "
                                 f"{tuple('*' if w is None else w for w in shape)}")
    return a


def _experts_per_rank(num_experts: int, num_ranks: int) -> int:
    if num_experts % num_ranks != 0:
        raise ValueError(f"num_experts={num_experts} must be a multiple of the number of ranks ({num_ranks})")
    return num_experts // num_ranks


def _check_index_range(name: str, idx: np.ndarray, num_experts: int) -> None:
    if idx.size == 0:
        return
    lo, hi = int(idx.min()), int(idx.max())
    if lo < -1 or hi >= num_experts:
        bad = lo if lo < -1 else hi
        raise ValueError(f"{name} holds expert index {bad}, outside [-1, {num_experts}) "
                         f"(num_experts={num_experts}); -1 marks an unused slot")


def _check_no_duplicates(name: str, idx: np.ndarray) -> None:
    if idx.shape[0] == 0 or idx.shape[1] < 2:
        return
    srt = np.sort(idx, axis=1)
    dup = (srt[:, 1:] == srt[:, :-1]) & (srt[:, 1:] >= 0)
    if dup.any():
        t = int(np.flatnonzero(dup.any(axis=1))[0])
        raise ValueError(f"{name} row {t} lists the same expert twice: {idx[t].tolist()}")


def _topk_list(name: str, v, num_ranks: int, num_tokens: list[int], num_experts: int) -> list[np.ndarray]:
    """int64 [N_r, K] per rank, one K for all ranks, indices in [-1, E)."""
    v = _rank_list(name, v, num_ranks)
    k = None
    for r, a in enumerate(v):
        _array(f"{name}[{r}]", a, _I64, 2, (num_tokens[r], k))
        k = a.shape[1]
        _check_index_range(f"{name}[{r}]", a, num_experts)
    return v


def _weights_list(name: str, v, num_ranks: int, shapes: list[tuple]) -> list[np.ndarray]:
    v = _rank_list(name, v, num_ranks)
    for r, a in enumerate(v):
        _array(f"{name}[{r}]", a, _F32, 2, shapes[r])
    return v


def _token_in_rank(topk_idx: np.ndarray, num_ranks: int, experts_per_rank: int) -> np.ndarray:
    tir = np.zeros((topk_idx.shape[0], num_ranks), dtype=bool)
    t, k = np.nonzero(topk_idx >= 0)
    tir[t, topk_idx[t, k] // experts_per_rank] = True
    return tir


# --------------------------------------------------------------------------- layout


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
    E = _int_arg("num_experts", num_experts, lo=1)
    R = _int_arg("num_ranks", num_ranks, lo=1)
    P = _int_arg("num_ranks_per_node", num_ranks_per_node, lo=1)
    L = _experts_per_rank(E, R)
    if R > P and R % P != 0:
        raise ValueError(f"num_ranks={R} exceeds num_ranks_per_node={P} and is not a multiple of it")
    idx = topk_idx.astype(_I64, copy=False)
    _check_index_range("topk_idx", idx, E)

    tir = _token_in_rank(idx, R, L)
    per_rank = tir.sum(axis=0, dtype=_I64).astype(_I32)
    per_rdma = None
    if R > P:
        per_rdma = tir.reshape(tir.shape[0], R // P, P).any(axis=2).sum(axis=0, dtype=_I64).astype(_I32)
    per_expert = np.bincount(idx[idx >= 0], minlength=E).astype(_I32)
    return Layout(per_rank, per_rdma, per_expert, tir)


# --------------------------------------------------------------------------- normal dispatch / combine


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
    xs = _rank_list("x", x)
    R = len(xs)
    E = _int_arg("num_experts", num_experts, lo=1)
    L = _experts_per_rank(E, R)
    align = _int_arg("expert_alignment", expert_alignment, lo=1)
    worst = _int_arg("num_worst_tokens", num_worst_tokens, lo=0)

    _array("x[0]", xs[0], None, 2)
    dt, H = xs[0].dtype, xs[0].shape[1]
    if dt not in (BF16, FP8):
        raise TypeError(f"x[0] must have dtype bfloat16 or float8_e4m3fn, got {dt.name}")
    for r, a in enumerate(xs):
        _array(f"x[{r}]", a, dt, 2, (None, H))
    Ns = [a.shape[0] for a in xs]

    fp8 = dt == FP8
    scales = None
    if fp8:
        if H % FP8_GROUP:
            raise ValueError(f"x: FP8 hidden size {H} must be a multiple of {FP8_GROUP}")
        if x_scales is None:
            raise ValueError("x_scales is required with float8_e4m3fn x")
        scales = _weights_list("x_scales", x_scales, R, [(n, H // FP8_GROUP) for n in Ns])
    elif x_scales is not None:
        raise ValueError("x_scales is only accepted with float8_e4m3fn x")

    idx = w = None
    if topk_idx is not None:
        idx = _topk_list("topk_idx", topk_idx, R, Ns, E)
        tir = [_token_in_rank(a, R, L) for a in idx]
        if is_token_in_rank is not None:
            given = _rank_list("is_token_in_rank", is_token_in_rank, R)
            for r, a in enumerate(given):
                _array(f"is_token_in_rank[{r}]", a, np.bool_, 2, (Ns[r], R))
                if not np.array_equal(a, tir[r]):
                    raise ValueError(f"is_token_in_rank[{r}] disagrees with the routing of topk_idx[{r}]")
        if topk_weights is not None:
            w = _weights_list("topk_weights", topk_weights, R, [a.shape for a in idx])
    else:
        if topk_weights is not None:
            raise ValueError("topk_weights needs topk_idx")
        if is_token_in_rank is None:
            raise ValueError("dispatch needs topk_idx or is_token_in_rank")
        tir = _rank_list("is_token_in_rank", is_token_in_rank, R)
        for r, a in enumerate(tir):
            _array(f"is_token_in_rank[{r}]", a, np.bool_, 2, (Ns[r], R))
    K = idx[0].shape[1] if idx is not None else 0

    # sent[s][d]: tokens of rank s going to rank d, ascending, which is both the send order
    # and the receive order within source s.
    sent = [[np.flatnonzero(col) for col in tir[s].T] for s in range(R)]
    counts = np.array([[sent[s][d].size for d in range(R)] for s in range(R)], dtype=_I64).reshape(R, R)
    recv_total = counts.sum(axis=0)
    if worst:
        for d in range(R):
            if recv_total[d] > worst:
                raise ValueError(f"num_worst_tokens={worst} is too small: rank {d} receives "
                                 f"M={int(recv_total[d])} rows")
    send_pos = [np.where(t, np.cumsum(t, axis=0, dtype=_I64) - 1, -1).astype(_I32) for t in tir]

    results = []
    for d in range(R):
        M = int(recv_total[d])
        rows = worst if worst else M
        prefix = np.zeros(R + 1, dtype=_I64)
        np.cumsum(counts[:, d], out=prefix[1:])
        recv_x = np.zeros((rows, H), dtype=dt)
        recv_scales = np.zeros((rows, H // FP8_GROUP), dtype=_F32) if fp8 else None
        src_idx = np.full(rows, -1, dtype=_I32)
        raw_idx = np.full((rows, K), -1, dtype=_I64) if idx is not None else None
        raw_w = np.zeros((rows, K), dtype=_F32) if w is not None else None
        for s in range(R):
            a, b = int(prefix[s]), int(prefix[s + 1])
            toks = sent[s][d]
            np.take(xs[s], toks, axis=0, out=recv_x[a:b])
            src_idx[a:b] = toks
            if fp8:
                np.take(scales[s], toks, axis=0, out=recv_scales[a:b])
            if idx is not None:
                raw_idx[a:b] = idx[s][toks]
            if w is not None:
                raw_w[a:b] = w[s][toks]

        recv_idx = recv_w = None
        count_list: list = []
        if idx is not None:
            local = raw_idx - d * L
            # raw -1 gives local < 0, so padding and unused slots fall out with foreign experts.
            keep = (local >= 0) & (local < L)
            recv_idx = np.where(keep, local, -1).astype(_I64)
            if w is not None:
                recv_w = np.where(keep, raw_w, _F32(0)).astype(_F32)
            if not worst:
                # Per top-k slot, as get_dispatch_layout counts num_tokens_per_expert (which the
                # kernel sums over sources) and as DeepEP does: a row naming a local expert twice
                # counts twice.
                per_expert = np.bincount(recv_idx[:M][keep[:M]], minlength=L).astype(_I64)
                count_list = [int(c) for c in (per_expert + align - 1) // align * align]

        handle = DispatchHandle(rank_prefix=prefix.astype(_I32), send_pos=send_pos[d],
                                is_token_in_rank=tir[d].copy(), recv_src_idx=src_idx, num_recv_tokens=M)
        results.append(DispatchResult(recv_x, recv_scales, recv_idx, recv_w, count_list, handle))
    return results


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


def _take_rows(a: np.ndarray, rows: np.ndarray) -> np.ndarray:
    # Handles made by dispatch address consecutive rows; a slice then avoids a gathered copy.
    if rows.size and int(rows[-1]) - int(rows[0]) + 1 == rows.size and np.all(np.diff(rows) == 1):
        return a[int(rows[0]):int(rows[-1]) + 1]
    return a[rows]


def combine(x, handles, *, topk_weights=None, bias=()) -> list[tuple[np.ndarray, np.ndarray | None]]:
    """Normal combine: sum each token's expert outputs back on its source rank.

    Args:
        x: list over ranks d of bfloat16 [rows_d, H], rows in the receive order of dispatch on
            rank d; rows_d >= handles[d].num_recv_tokens, rows past it are ignored.
        handles: list over ranks of the :class:`DispatchHandle` from :func:`dispatch`.
        topk_weights: optional list of float32 [rows_d, K] (one K), combined like x.
        bias: tuple of 0, 1 or 2 lists over ranks s of bfloat16 [N_s, H], added after the sum.

    Order of operations (part of the contract; GPU kernels match it bit for bit): for source
    rank s and token t, acc = float32 0; for d = 0..R-1 where the token went to d,
    acc = float32(acc + float32(row of x[d])); then acc = float32(acc + float32(bias_i[s][t]))
    for each bias in order; the output is bfloat16(acc), round to nearest even.  Combined
    weights follow the same sum over d (no bias) and stay float32.

    Returns:
        per rank s, (combined_x bfloat16 [N_s, H], combined_topk_weights float32 [N_s, K] or None).

    Raises:
        TypeError: wrong container, array or dtype.
        ValueError: wrong lengths or shapes, more than 2 biases, too few rows in x[d], or a
            handle pointing outside its rank's received rows.
    """
    xs = _rank_list("x", x)
    R = len(xs)
    hs = _check_handles(handles, R)
    _array("x[0]", xs[0], BF16, 2)
    H = xs[0].shape[1]
    for d, a in enumerate(xs):
        _array(f"x[{d}]", a, BF16, 2, (None, H))
        if a.shape[0] < hs[d].num_recv_tokens:
            raise ValueError(f"x[{d}] has {a.shape[0]} rows, fewer than the {hs[d].num_recv_tokens} "
                             f"rows rank {d} received")
    Ns = [h.is_token_in_rank.shape[0] for h in hs]

    w = None
    if topk_weights is not None:
        w = _rank_list("topk_weights", topk_weights, R)
        _array("topk_weights[0]", w[0], _F32, 2)
        K = w[0].shape[1]
        for d, a in enumerate(w):
            _array(f"topk_weights[{d}]", a, _F32, 2, (xs[d].shape[0], K))

    if not isinstance(bias, (tuple, list)):
        raise TypeError(f"bias must be a tuple of 0, 1 or 2 lists over ranks, got {type(bias).__name__}")
    if len(bias) > 2:
        raise ValueError(f"bias holds {len(bias)} tensors, at most 2 are accepted")
    biases = []
    for i, bl in enumerate(bias):
        bl = _rank_list(f"bias[{i}]", bl, R)
        for s, a in enumerate(bl):
            _array(f"bias[{i}][{s}]", a, BF16, 2, (Ns[s], H))
        biases.append(bl)

    out = []
    for s in range(R):
        h = hs[s]
        acc = np.zeros((Ns[s], H), dtype=_F32)
        wacc = np.zeros((Ns[s], w[0].shape[1]), dtype=_F32) if w is not None else None
        # Loop over d, never a reduction over an axis: np.sum may use pairwise summation, and
        # the kernels add the ranks' contributions one after another in ascending rank order.
        for d in range(R):
            toks = np.flatnonzero(h.is_token_in_rank[:, d])
            if toks.size == 0:
                continue
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
            if w is not None:
                wacc[toks] += _take_rows(w[d], rows)
        for bl in biases:
            acc += bl[s].astype(_F32)
        out.append((acc.astype(BF16), wacc))
    return out


# --------------------------------------------------------------------------- FP8 helpers


def _round_scale_up(s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Round positive normal float32 scales up to powers of two; return (scale, exact inverse)."""
    b = s.view(np.uint32).astype(_I64)
    b = np.where((b & 0x7FFFFF) != 0, (b & 0xFF800000) + 0x800000, b)
    s2 = b.astype(np.uint32).view(_F32)
    # 1/2**(e-127) = 2**(127-e): biased exponent 254 - e, built from bits so it is exact.
    inv = ((254 - (b >> 23)) << 23).astype(np.uint32).view(_F32)
    return s2, inv


def fp8_quantize(x_bf16, *, round_scale=False, use_ue8m0=False) -> tuple[np.ndarray, np.ndarray]:
    """Per-token FP8 (e4m3) quantisation, one float32 scale per 128 channels.

    Args:
        x_bf16: bfloat16 (or float32) array [..., H], H % 128 == 0; values must be finite.
        round_scale: round every scale up to a power of two (its inverse is then exact).
        use_ue8m0: the scales are meant for UE8M0 packing; needs round_scale.  The result is
            the same as with round_scale alone (pack with :func:`pack_ue8m0`).

    Recipe, float32 IEEE operations throughout (GPU kernels reproduce it bit for bit), per
    group of 128 channels v = float32(x): amax = max(max|v|, float32(1e-4));
    s = float32(amax / 448); with round_scale, s is rounded up to a power of two and
    inv = 1/s exactly, else inv = float32(448 / amax); q = e4m3(clip(float32(v * inv), -448, 448))
    rounded to nearest even.

    Returns:
        (q float8_e4m3fn [..., H], scales float32 [..., H // 128]); x ~= q * scale.

    Raises:
        TypeError: x not a bfloat16/float32 array.
        ValueError: H % 128 != 0, or use_ue8m0 without round_scale.
    """
    if not isinstance(x_bf16, np.ndarray):
        raise TypeError(f"x_bf16 must be a numpy array, got {type(x_bf16).__name__}")
    if x_bf16.dtype not in (BF16, np.dtype(_F32)):
        raise TypeError(f"x_bf16 must have dtype bfloat16 or float32, got {x_bf16.dtype.name}")
    if x_bf16.ndim < 1 or x_bf16.shape[-1] % FP8_GROUP:
        raise ValueError(f"x_bf16: hidden size (last dim of shape {x_bf16.shape}) must be a multiple of {FP8_GROUP}")
    if use_ue8m0 and not round_scale:
        raise ValueError("use_ue8m0=True needs round_scale=True (UE8M0 stores powers of two only)")
    lead, H = x_bf16.shape[:-1], x_bf16.shape[-1]
    G = H // FP8_GROUP
    v = x_bf16.astype(_F32).reshape(*lead, G, FP8_GROUP)
    amax = np.abs(v).max(axis=-1, initial=_F32(0))
    amax = np.maximum(amax, _F32(1e-4))
    s = (amax / _F32(FP8_MAX)).astype(_F32)
    if round_scale:
        s, inv = _round_scale_up(s)
    else:
        inv = (_F32(FP8_MAX) / amax).astype(_F32)
    scaled = (v * inv[..., None]).astype(_F32)
    q = np.clip(scaled, _F32(-FP8_MAX), _F32(FP8_MAX)).astype(FP8)
    return q.reshape(*lead, H), s


def fp8_dequantize(q, scales) -> np.ndarray:
    """float32(q) * scale of its 128-channel group.

    Args:
        q: float8_e4m3fn [..., H], H % 128 == 0.
        scales: float32 [..., H // 128], same leading shape.

    Returns:
        float32 [..., H].

    Raises:
        TypeError: wrong array types or dtypes.  ValueError: mismatched shapes.
    """
    if not isinstance(q, np.ndarray) or q.dtype != FP8:
        raise TypeError(f"q must be a float8_e4m3fn array, got {getattr(q, 'dtype', type(q).__name__)}")
    if q.ndim < 1 or q.shape[-1] % FP8_GROUP:
        raise ValueError(f"q: hidden size (last dim of shape {q.shape}) must be a multiple of {FP8_GROUP}")
    G = q.shape[-1] // FP8_GROUP
    _array("scales", scales, _F32, q.ndim, (*q.shape[:-1], G))
    v = q.astype(_F32).reshape(*q.shape[:-1], G, FP8_GROUP)
    return (v * scales[..., None]).reshape(q.shape)


def pack_ue8m0(scales) -> np.ndarray:
    """Pack power-of-two float32 scales as UE8M0 exponent bytes, 4 per int32.

    Args:
        scales: float32 [..., G], every entry a positive normal power of two.

    The byte of a group is its biased float32 exponent, (bits >> 23) & 0xFF.  Word w holds
    groups 4w..4w+3, group 4w+i in bits 8i..8i+7; missing groups of the last word are 0.

    Returns:
        int32 [..., ceil(G / 4)].

    Raises:
        TypeError: not a float32 array.  ValueError: an entry that is not a positive normal power of two.
    """
    if not isinstance(scales, np.ndarray) or scales.dtype != np.dtype(_F32):
        raise TypeError(f"scales must be a float32 array, got {getattr(scales, 'dtype', type(scales).__name__)}")
    if scales.ndim < 1:
        raise ValueError("scales must have at least one dimension")
    b = np.ascontiguousarray(scales).view(np.uint32)
    expo = (b >> 23) & 0xFF
    bad = ((b & 0x807FFFFF) != 0) | (expo == 0) | (expo == 0xFF)
    if bad.any():
        raise ValueError(f"scales holds {scales[bad].ravel()[0]!r}, not a positive normal power of two "
                         "(round_scale=True produces those)")
    G = scales.shape[-1]
    W = -(-G // 4)
    byts = np.zeros((*scales.shape[:-1], W * 4), dtype=np.uint32)
    byts[..., :G] = expo
    byts = byts.reshape(*scales.shape[:-1], W, 4)
    words = byts[..., 0] | (byts[..., 1] << 8) | (byts[..., 2] << 16) | (byts[..., 3] << 24)
    return words.astype(np.uint32).view(_I32)


def unpack_ue8m0(packed, num_groups) -> np.ndarray:
    """Inverse of :func:`pack_ue8m0`.

    Args:
        packed: int32 [..., ceil(num_groups / 4)].
        num_groups: G >= 0.

    Returns:
        float32 [..., G] with scale 2**(byte - 127); a 0 byte decodes as 0.0 and 0xFF as inf
        (pack_ue8m0 never produces either).

    Raises:
        TypeError: not an int32 array.  ValueError: last dim != ceil(G / 4).
    """
    G = _int_arg("num_groups", num_groups, lo=0)
    if not isinstance(packed, np.ndarray) or packed.dtype != np.dtype(_I32):
        raise TypeError(f"packed must be an int32 array, got {getattr(packed, 'dtype', type(packed).__name__)}")
    W = -(-G // 4)
    if packed.ndim < 1 or packed.shape[-1] != W:
        raise ValueError(f"packed has shape {packed.shape}, its last dim must be ceil({G}/4) = {W}")
    u = np.ascontiguousarray(packed).view(np.uint32)
    byts = (u[..., None] >> np.array([0, 8, 16, 24], dtype=np.uint32)) & 0xFF
    byts = byts.reshape(*packed.shape[:-1], W * 4)[..., :G]
    return (byts.astype(np.uint32) << 23).view(_F32)


# --------------------------------------------------------------------------- low-latency mode


@dataclass(eq=False)
class LowLatencyHandle:
    """What one rank keeps from a low-latency dispatch.

    Attributes:
        src_info: int32 [L, R*T]; source token index of every packed row, -1 past recv_count
            (here; the GPU results are reused slots, unspecified past recv_count).
        layout_range: int32 [L, R, 2]; (begin, count) of the rows from source rank s inside
            local expert j.
        num_max_tokens: T.  num_experts: E.  hidden: H.
    """

    src_info: np.ndarray
    layout_range: np.ndarray
    num_max_tokens: int
    num_experts: int
    hidden: int


@dataclass(eq=False)
class LowLatencyDispatchResult:
    """One rank's output of :func:`low_latency_dispatch`.

    Attributes:
        recv_x: [L, R*T, H], bfloat16, or float8_e4m3fn with use_fp8; rows past recv_count are 0
            here (unspecified on the GPU).
        recv_x_scales: float32 [L, R*T, H // 128] with use_fp8, int32 [L, R*T, ceil(H / 512)]
            (packed UE8M0) with use_ue8m0, else None; rows past recv_count are 0 here (unspecified
            on the GPU).
        recv_count: int32 [L], rows received per local expert.
        handle: the :class:`LowLatencyHandle` for :func:`low_latency_combine`.
    """

    recv_x: np.ndarray
    recv_x_scales: np.ndarray | None
    recv_count: np.ndarray
    handle: LowLatencyHandle


def _ll_inputs(x, topk_idx, T: int, E: int, hidden: int | None = None, check_x: bool = True):
    xs = _rank_list("x", x)
    R = len(xs)
    L = _experts_per_rank(E, R)
    if check_x:
        _array("x[0]", xs[0], BF16, 2)
        H = xs[0].shape[1]
        for r, a in enumerate(xs):
            _array(f"x[{r}]", a, BF16, 2, (None, H))
            if a.shape[0] > T:
                raise ValueError(f"x[{r}] has {a.shape[0]} tokens, more than num_max_tokens={T}")
    idx = _rank_list("topk_idx", topk_idx, R)
    _array("topk_idx[0]", idx[0], _I64, 2)
    K = idx[0].shape[1]
    for r, a in enumerate(idx):
        _array(f"topk_idx[{r}]", a, _I64, 2, (xs[r].shape[0] if check_x else None, K))
        if a.shape[0] > T:
            raise ValueError(f"topk_idx[{r}] has {a.shape[0]} tokens, more than num_max_tokens={T}")
        _check_index_range(f"topk_idx[{r}]", a, E)
        _check_no_duplicates(f"topk_idx[{r}]", a)
    return xs, idx, R, L, K


def _ll_entries(idx: np.ndarray, E: int):
    """The (token, expert) pairs of one source rank and each pair's rank among the tokens of
    that source choosing that expert.

    Returns (tok, k, e, pos, count) with tok, k, e, pos int64 [P] in (token, k) order and
    count int64 [E] the pairs per expert.
    """
    t, k = np.nonzero(idx >= 0)
    e = idx[t, k]
    count = np.bincount(e, minlength=E).astype(_I64)
    # nonzero yields pairs in token order, so a stable sort by expert keeps tokens ascending
    # within each expert: exactly the packing order.
    order = np.argsort(e, kind="stable")
    start = np.zeros(E, dtype=_I64)
    np.cumsum(count[:-1], out=start[1:])
    pos = np.empty_like(e)
    pos[order] = np.arange(e.size, dtype=_I64) - start[e[order]]
    return t.astype(_I64), k.astype(_I64), e, pos, count


def low_latency_dispatch(x, topk_idx, num_max_tokens, num_experts, *, use_fp8=True, round_scale=False,
                         use_ue8m0=False) -> list[LowLatencyDispatchResult]:
    """Low-latency dispatch into a packed per-expert layout.

    Args:
        x: list over ranks of bfloat16 [N_r, H], N_r <= num_max_tokens.
        topk_idx: list of int64 [N_r, K] (one K), entries in [-1, E), no expert twice in a row.
        num_max_tokens: T >= 1, tokens per rank at most.
        num_experts: E, a multiple of R.
        use_fp8: quantise each token at the source with :func:`fp8_quantize` (needs H % 128 == 0).
        round_scale: power-of-two scales (FP8 only).
        use_ue8m0: scales packed with :func:`pack_ue8m0` (FP8 and round_scale only).

    Layout on rank d, local expert j (global expert d*L + j): rows from source rank 0 first,
    then 1, ...; within a source, tokens ascending; one row per (token, selected expert).

    Returns:
        one :class:`LowLatencyDispatchResult` per rank.

    Raises:
        TypeError: wrong containers, arrays, dtypes or int arguments.
        ValueError: wrong lengths or shapes, N_r > T, index outside [-1, E), duplicate expert
            in a row, E % R != 0, H % 128 != 0 with FP8, use_ue8m0 without round_scale,
            round_scale or use_ue8m0 without use_fp8.
    """
    T = _int_arg("num_max_tokens", num_max_tokens, lo=1)
    E = _int_arg("num_experts", num_experts, lo=1)
    if use_ue8m0 and not round_scale:
        raise ValueError("use_ue8m0=True needs round_scale=True (UE8M0 stores powers of two only)")
    if (round_scale or use_ue8m0) and not use_fp8:
        raise ValueError("round_scale/use_ue8m0 apply to FP8 dispatch only (use_fp8=True)")
    xs, idx, R, L, K = _ll_inputs(x, topk_idx, T, E)
    H = xs[0].shape[1]
    if use_fp8 and H % FP8_GROUP:
        raise ValueError(f"x: FP8 hidden size {H} must be a multiple of {FP8_GROUP}")

    payload, pay_scales = [], []
    for a in xs:
        if use_fp8:
            q, s = fp8_quantize(a, round_scale=round_scale, use_ue8m0=use_ue8m0)
            payload.append(q)
            pay_scales.append(pack_ue8m0(s) if use_ue8m0 else s)
        else:
            payload.append(a)
    entries = [_ll_entries(a, E) for a in idx]
    counts = np.stack([c for *_, c in entries])              # [R_src, E]
    begin = np.cumsum(counts, axis=0) - counts               # exclusive over source ranks

    out_dt = FP8 if use_fp8 else BF16
    if use_fp8:
        sc_shape, sc_dt = ((-(-H // 512),), _I32) if use_ue8m0 else ((H // FP8_GROUP,), _F32)
    results = []
    for d in range(R):
        recv_x = np.zeros((L, R * T, H), dtype=out_dt)
        recv_sc = np.zeros((L, R * T, *sc_shape), dtype=sc_dt) if use_fp8 else None
        src_info = np.full((L, R * T), -1, dtype=_I32)
        for s in range(R):
            t, _, e, pos, _ = entries[s]
            sel = (e // L) == d
            j, tok = e[sel] - d * L, t[sel]
            row = begin[s, e[sel]] + pos[sel]
            recv_x[j, row] = payload[s][tok]
            if use_fp8:
                recv_sc[j, row] = pay_scales[s][tok]
            src_info[j, row] = tok
        mine = slice(d * L, (d + 1) * L)
        layout_range = np.stack([begin[:, mine].T, counts[:, mine].T], axis=-1).astype(_I32)
        recv_count = counts[:, mine].sum(axis=0).astype(_I32)
        handle = LowLatencyHandle(src_info, layout_range, T, E, H)
        results.append(LowLatencyDispatchResult(recv_x, recv_sc, recv_count, handle))
    return results


def low_latency_combine(x, topk_idx, topk_weights, handles, *, partials: bool = True) -> list[np.ndarray]:
    """Low-latency combine: weighted sum of each token's expert outputs on its source rank.

    Args:
        x: list over ranks d of bfloat16 [L, R*T, H], expert outputs in the packed layout of
            :func:`low_latency_dispatch`.
        topk_idx: list over source ranks of int64 [N_s, K], the routing used at dispatch.
        topk_weights: list of float32 [N_s, K].
        handles: list over ranks of the :class:`LowLatencyHandle` from the dispatch.

        partials: model the expert-side partial sums (EPCOMM_LL_COMBINE_PARTIALS, between ranks
            linked by NVLink); False: one row per (token, expert), as with NVSHMEM puts.

    Order of operations (part of the contract): for source s and token t, with for each k
    (e = topk_idx[s][t, k] >= 0) d = e // L, j = e % L, row the packed row of (s, t) in expert
    j of rank d and p_k = float32(float32(w[t, k]) * float32(x[d][j, row])) (the product is
    rounded before any sum: no fused multiply-add):
    if ``partials`` and rank d holds 2 or more of the token's experts, those k form a group
    whose partial is P = float32 0, then P = float32(P + p_k) over the group's k ascending.
    Then acc = float32 0 and for k = 0..K-1: acc = float32(acc + p_k) for k in no group,
    acc = float32(acc + P) at the lowest k of a group, nothing at its other k.  The output is
    bfloat16(acc); tokens without experts give 0.  With one rank (or partials=False) this is
    the plain k-ascending sum.

    Returns:
        bfloat16 [N_s, H] per rank.

    Raises:
        TypeError: wrong containers, arrays, dtypes or handle types.
        ValueError: wrong lengths or shapes, handles that disagree with each other or with
            topk_idx (the routing is not the one dispatched), index/duplicate errors as in dispatch.
    """
    xs = _rank_list("x", x)
    R = len(xs)
    hs = _rank_list("handles", handles, R)
    for r, h in enumerate(hs):
        if not isinstance(h, LowLatencyHandle):
            raise TypeError(f"handles[{r}] must be a LowLatencyHandle, got {type(h).__name__}")
    T, E, H = hs[0].num_max_tokens, hs[0].num_experts, hs[0].hidden
    for r, h in enumerate(hs):
        if (h.num_max_tokens, h.num_experts, h.hidden) != (T, E, H):
            raise ValueError(f"handles[{r}] has (T, E, H) = {(h.num_max_tokens, h.num_experts, h.hidden)}, "
                             f"handles[0] has {(T, E, H)}")
    L = _experts_per_rank(E, R)
    for d, a in enumerate(xs):
        _array(f"x[{d}]", a, BF16, 3, (L, R * T, H))
        _array(f"handles[{d}].src_info", hs[d].src_info, None, 2, (L, R * T))
        _array(f"handles[{d}].layout_range", hs[d].layout_range, None, 3, (L, R, 2))
    _, idx, _, _, K = _ll_inputs(xs, topk_idx, T, E, check_x=False)
    w = _weights_list("topk_weights", topk_weights, R, [a.shape for a in idx])

    out = []
    for s in range(R):
        N = idx[s].shape[0]
        t, k, e, pos, count = _ll_entries(idx[s], E)
        d_of, j_of = e // L, e % L
        begin = np.empty_like(e)
        for d in range(R):
            sel = d_of == d
            rng_ = hs[d].layout_range[j_of[sel], s].astype(_I64)
            if np.any(rng_[:, 1] != count[e[sel]]):
                raise ValueError(f"topk_idx[{s}] does not match handles[{d}].layout_range: the routing "
                                 "differs from the one dispatched")
            begin[sel] = rng_[:, 0]
        row = begin + pos
        for d in range(R):
            sel = d_of == d
            if np.any(hs[d].src_info[j_of[sel], row[sel]] != t[sel]):
                raise ValueError(f"topk_idx[{s}] does not match handles[{d}].src_info: the routing "
                                 "differs from the one dispatched")
        # [N, K] maps, -1 where the slot is unused.
        R_map = np.full((N, K), -1, dtype=_I64)
        D_map = np.full((N, K), -1, dtype=_I64)
        J_map = np.full((N, K), -1, dtype=_I64)
        R_map[t, k], D_map[t, k], J_map[t, k] = row, d_of, j_of

        def product(kk, toks):
            vals = np.empty((toks.size, H), dtype=_F32)
            dk = D_map[toks, kk]
            for d in np.unique(dk):
                sub = dk == d
                vals[sub] = xs[int(d)][J_map[toks[sub], kk], R_map[toks[sub], kk]].astype(_F32)
            # Two separate float32 numpy ops: the product is rounded before the add.
            return w[s][toks, kk][:, None] * vals

        # Which k travel inside a partial: their rank holds 2 or more of the token's experts.
        valid = idx[s] >= 0
        in_part = np.zeros((N, K), dtype=bool)
        first = np.zeros((N, K), dtype=bool)
        if partials:
            for d in range(R):
                on_d = valid & (D_map == d)
                grouped = on_d & (on_d.sum(axis=1, keepdims=True) >= 2)
                in_part |= grouped
                first |= grouped & (np.cumsum(grouped, axis=1) == 1)
        # Each (token, rank) partial, summed over k ascending (a token has one rank per k).
        part = np.zeros((N, R, H), dtype=_F32) if in_part.any() else None
        for kk in range(K):
            toks = np.flatnonzero(in_part[:, kk])
            if toks.size:
                d = D_map[toks, kk]
                part[toks, d] = part[toks, d] + product(kk, toks)
        acc = np.zeros((N, H), dtype=_F32)
        for kk in range(K):
            toks = np.flatnonzero(valid[:, kk] & ~in_part[:, kk])
            if toks.size:
                acc[toks] = acc[toks] + product(kk, toks)
            lead = np.flatnonzero(first[:, kk])
            if lead.size:
                acc[lead] = acc[lead] + part[lead, D_map[lead, kk]]
        out.append(acc.astype(BF16))
    return out
