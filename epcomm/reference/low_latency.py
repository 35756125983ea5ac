"""Low-latency dispatch (packed per-expert layout, optional FP8) and combine over all ranks at once."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from epcomm.reference._args import BF16, _F32, _I32, _I64, _array, _arrays, _rank_list, _same_width_list
from epcomm.reference._float import fma32
from epcomm.reference.fp8 import _check_ue8m0, fp8_quantize, pack_ue8m0
from epcomm.reference.logfmt import logfmt_round_trip
from epcomm.validate import (check_bool, check_expert_range, check_experts_divisible, check_hidden_size, check_int,
                             check_numerics, check_unique_experts)

__all__ = ["LowLatencyHandle", "LowLatencyDispatchResult", "low_latency_dispatch", "low_latency_combine"]


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


def _ll_inputs(x, topk_idx, T: int, E: int, check_x: bool = True):
    """(xs, idx, R, L, K) checked: x bf16 [N_r, H] (only its list when not check_x), topk_idx
    int64 [N_r, K] in [-1, E) without repeated experts, N_r <= T."""
    xs = _rank_list("x", x)
    R = len(xs)
    L = check_experts_divisible(E, R)

    def at_most_T(label, _, a):
        if a.shape[0] > T:
            raise ValueError(f"{label} has {a.shape[0]} tokens, more than num_max_tokens={T}")

    def routing_row(label, r, a):
        at_most_T(label, r, a)
        check_expert_range(label, a, E)
        check_unique_experts(label, a)

    if check_x:
        _same_width_list("x", xs, BF16, R, each=at_most_T)
    rows = [a.shape[0] for a in xs] if check_x else None
    idx = _same_width_list("topk_idx", topk_idx, _I64, R, rows, each=routing_row)
    return xs, idx, R, L, idx[0].shape[1]


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


def _ll_payload(xs: list, use_fp8: bool, round_scale: bool, use_ue8m0: bool, numerics: str):
    """(payload, scales) per source rank: what each token sends (scales None without FP8)."""
    if not use_fp8:
        return xs, None
    payload, scales = [], []
    for a in xs:
        q, s = fp8_quantize(a, round_scale=round_scale, use_ue8m0=use_ue8m0, numerics=numerics)
        payload.append(q)
        scales.append(pack_ue8m0(s) if use_ue8m0 else s)
    return payload, scales


def _ll_pack(d: int, payload: list, scales: list | None, entries: list, T: int) -> LowLatencyDispatchResult:
    """Destination d's result: every source's (token, expert) pairs of d's experts, packed."""
    R, H = len(payload), payload[0].shape[1]
    counts = np.stack([c for *_, c in entries])              # [R_src, E]
    begin = np.cumsum(counts, axis=0) - counts               # exclusive over source ranks
    L = counts.shape[1] // R
    recv_x = np.zeros((L, R * T, H), dtype=payload[0].dtype)
    recv_sc = (np.zeros((L, R * T, *scales[0].shape[1:]), dtype=scales[0].dtype)
               if scales is not None else None)
    src_info = np.full((L, R * T), -1, dtype=_I32)
    for s in range(R):
        t, _, e, pos, _ = entries[s]
        sel = (e // L) == d
        j, tok = e[sel] - d * L, t[sel]
        row = begin[s, e[sel]] + pos[sel]
        recv_x[j, row] = payload[s][tok]
        if scales is not None:
            recv_sc[j, row] = scales[s][tok]
        src_info[j, row] = tok
    mine = slice(d * L, (d + 1) * L)
    layout_range = np.stack([begin[:, mine].T, counts[:, mine].T], axis=-1).astype(_I32)
    recv_count = counts[:, mine].sum(axis=0).astype(_I32)
    handle = LowLatencyHandle(src_info, layout_range, T, counts.shape[1], H)
    return LowLatencyDispatchResult(recv_x, recv_sc, recv_count, handle)


def low_latency_dispatch(x, topk_idx, num_max_tokens, num_experts, *, use_fp8=True, round_scale=False,
                         use_ue8m0=False, numerics="epcomm") -> list[LowLatencyDispatchResult]:
    """Low-latency dispatch into a packed per-expert layout.

    Args:
        x: list over ranks of bfloat16 [N_r, H], N_r <= num_max_tokens.
        topk_idx: list of int64 [N_r, K] (one K), entries in [-1, E), no expert twice in a row.
        num_max_tokens: T >= 1, tokens per rank at most.
        num_experts: E, a multiple of R.
        use_fp8: quantise each token at the source with :func:`fp8_quantize` (needs H % 128 == 0).
        round_scale: power-of-two scales (FP8 only).
        use_ue8m0: scales packed with :func:`pack_ue8m0` (FP8 and round_scale only).
        numerics: "epcomm" or "deepep": the FP8 scales' arithmetic (:func:`fp8_quantize`).

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
    T = check_int("num_max_tokens", num_max_tokens, lo=1)
    E = check_int("num_experts", num_experts, lo=1)
    numerics = check_numerics(numerics)
    _check_ue8m0(round_scale, use_ue8m0)
    if (round_scale or use_ue8m0) and not use_fp8:
        raise ValueError("round_scale/use_ue8m0 apply to FP8 dispatch only (use_fp8=True)")
    xs, idx, R, _, _ = _ll_inputs(x, topk_idx, T, E)
    if use_fp8:
        check_hidden_size(xs[0].shape[1], fp8=True, name="x")
    payload, scales = _ll_payload(xs, use_fp8, round_scale, use_ue8m0, numerics)
    entries = [_ll_entries(a, E) for a in idx]
    return [_ll_pack(d, payload, scales, entries, T) for d in range(R)]


# --------------------------------------------------------------------------- combine


def _ll_combine_args(x, topk_idx, topk_weights, handles):
    """(xs, idx, w, hs) checked against each other; every handle has the same (T, E, H)."""
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
    L = check_experts_divisible(E, R)
    for d, a in enumerate(xs):
        _array(f"x[{d}]", a, BF16, 3, (L, R * T, H))
        _array(f"handles[{d}].src_info", hs[d].src_info, None, 2, (L, R * T))
        _array(f"handles[{d}].layout_range", hs[d].layout_range, None, 3, (L, R, 2))
    _, idx, _, _, _ = _ll_inputs(xs, topk_idx, T, E, check_x=False)
    w = _arrays("topk_weights", topk_weights, _F32, R, [a.shape for a in idx])
    return xs, idx, w, hs


def _ll_source_rows(s: int, idx: np.ndarray, hs: list, L: int):
    """(tok, k, d, j, row) int64 [P] of source s's (token, expert) pairs: the rank, local expert
    and packed row each pair was dispatched to.  ValueError if the handles disagree with idx."""
    R = len(hs)
    t, k, e, pos, count = _ll_entries(idx, R * L)
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
    return t, k, d_of, j_of, row


def _ll_groups(valid: np.ndarray, D_map: np.ndarray, R: int, partials: np.ndarray):
    """(in_part, first) bool [N, K]: the k travelling inside a partial (their rank d holds 2 or
    more of the token's experts and ``partials[d]``: d sends this source partials) and the
    lowest k of each such group."""
    in_part = np.zeros(valid.shape, dtype=bool)
    first = np.zeros(valid.shape, dtype=bool)
    for d in range(R):
        if partials[d]:
            on_d = valid & (D_map == d)
            grouped = on_d & (on_d.sum(axis=1, keepdims=True) >= 2)
            in_part |= grouped
            first |= grouped & (np.cumsum(grouped, axis=1) == 1)
    return in_part, first


def _ll_combine_source(s: int, xs: list, idx: np.ndarray, w: np.ndarray, hs: list, partials: np.ndarray,
                       fma: bool = False, logfmt: bool = False) -> np.ndarray:
    """bfloat16 [N, H]: the combine of source rank s, in the order of the contract (``partials``:
    bool [R], the expert-side ranks that send s partials)."""
    R, (L, _, H) = len(xs), xs[0].shape
    (N, K) = idx.shape
    t, k, d_of, j_of, row = _ll_source_rows(s, idx, hs, L)
    # [N, K] maps, -1 where the slot is unused.
    R_map = np.full((N, K), -1, dtype=_I64)
    D_map = np.full((N, K), -1, dtype=_I64)
    J_map = np.full((N, K), -1, dtype=_I64)
    R_map[t, k], D_map[t, k], J_map[t, k] = row, d_of, j_of

    def rows(kk, toks):
        """float32 [len(toks), H]: each token's expert row of slot kk (as the source receives it)."""
        vals = np.empty((toks.size, H), dtype=BF16)
        dk = D_map[toks, kk]
        for d in np.unique(dk):
            sub = dk == d
            vals[sub] = xs[int(d)][J_map[toks[sub], kk], R_map[toks[sub], kk]]
        return logfmt_round_trip(vals) if logfmt else vals.astype(_F32)

    def add(acc, kk, toks):
        """acc + w * row of slot kk for these tokens: the product rounded first, or one FMA."""
        wk = w[toks, kk][:, None]
        if fma:
            return fma32(rows(kk, toks), wk, acc)
        # Two separate float32 numpy ops: the product is rounded before the add.
        return acc + wk * rows(kk, toks)

    valid = idx >= 0
    in_part, first = _ll_groups(valid, D_map, R, partials)
    # Each (token, rank) partial, summed over k ascending (a token has one rank per k).
    part = np.zeros((N, R, H), dtype=_F32) if in_part.any() else None
    for kk in range(K):
        toks = np.flatnonzero(in_part[:, kk])
        if toks.size:
            d = D_map[toks, kk]
            part[toks, d] = add(part[toks, d], kk, toks)
    acc = np.zeros((N, H), dtype=_F32)
    for kk in range(K):
        toks = np.flatnonzero(valid[:, kk] & ~in_part[:, kk])
        if toks.size:
            acc[toks] = add(acc[toks], kk, toks)
        lead = np.flatnonzero(first[:, kk])
        if lead.size:
            acc[lead] = acc[lead] + part[lead, D_map[lead, kk]]
    return acc.astype(BF16)


def low_latency_combine(x, topk_idx, topk_weights, handles, *, partials: bool | None = None, numerics="epcomm",
                        use_logfmt=False) -> list[np.ndarray]:
    """Low-latency combine: weighted sum of each token's expert outputs on its source rank.

    Args:
        x: list over ranks d of bfloat16 [L, R*T, H], expert outputs in the packed layout of
            :func:`low_latency_dispatch`.
        topk_idx: list over source ranks of int64 [N_s, K], the routing used at dispatch.
        topk_weights: list of float32 [N_s, K].
        handles: list over ranks of the :class:`LowLatencyHandle` from the dispatch.

        partials: model the expert-side partial sums (EPCOMM_LL_COMBINE_PARTIALS, between ranks
            linked by NVLink); False: one row per (token, expert), as with NVSHMEM puts.  Or a
            bool [R, R] array: ``partials[s, d]``, whether expert-side rank d sends source s
            partials (the kernels make them only between ranks that reach each other over
            NVLink: with nodes, declared ones included, not across nodes).  None (default): True
            with numerics="epcomm" and without use_logfmt, else False (the kernels make no
            partials then, and True, or any True entry, raises ValueError).
        numerics: "epcomm", or "deepep": DeepEP V1's sum, ``acc = fma(x, w, acc)`` over k
            ascending (nvcc contracts its ``accum += x * weight`` into one fused multiply-add).
        use_logfmt: each expert row reaches the source as :func:`epcomm.reference.logfmt_round_trip`
            of it (LogFMT-10, see :mod:`epcomm.reference.logfmt`); the sum is then the same.

    Order of operations (part of the contract): for source s and token t, with for each k
    (e = topk_idx[s][t, k] >= 0) d = e // L, j = e % L, row the packed row of (s, t) in expert
    j of rank d and p_k = float32(float32(w[t, k]) * float32(x[d][j, row])) (the product is
    rounded before any sum: no fused multiply-add):
    if ``partials`` and rank d holds 2 or more of the token's experts, those k form a group
    whose partial is P = float32 0, then P = float32(P + p_k) over the group's k ascending.
    Then acc = float32 0 and for k = 0..K-1: acc = float32(acc + p_k) for k in no group,
    acc = float32(acc + P) at the lowest k of a group, nothing at its other k.  The output is
    bfloat16(acc); tokens without experts give 0.  With one rank (or partials=False) this is
    the plain k-ascending sum.  With numerics="deepep" it is that sum with
    acc = fma(float32(x[d][j, row]), w[t, k], acc) (one rounding per k); with use_logfmt, x's row
    is replaced by its LogFMT round trip (float32) in either form.

    Returns:
        bfloat16 [N_s, H] per rank.

    Raises:
        TypeError: wrong containers, arrays, dtypes or handle types.
        ValueError: wrong lengths or shapes, handles that disagree with each other or with
            topk_idx (the routing is not the one dispatched), index/duplicate errors as in
            dispatch, partials=True with numerics="deepep" or use_logfmt.
    """
    fma = check_numerics(numerics) == "deepep"
    logfmt = check_bool("use_logfmt", use_logfmt)
    xs, idx, w, hs = _ll_combine_args(x, topk_idx, topk_weights, handles)
    pairs = _partial_pairs(partials, len(xs), fma or logfmt)
    return [_ll_combine_source(s, xs, idx[s], w[s], hs, pairs[s], fma, logfmt) for s in range(len(xs))]


def _partial_pairs(partials, R: int, none_allowed: bool) -> np.ndarray:
    """low_latency_combine's ``partials`` as bool [R, R] (source, expert-side rank); TypeError or
    ValueError naming it; ``none_allowed``: the numerics make no partials (deepep, LogFMT)."""
    if partials is None:
        return np.full((R, R), not none_allowed)
    if isinstance(partials, (bool, np.bool_)):
        pairs = np.full((R, R), bool(partials))
    else:
        pairs = np.asarray(partials)
        if pairs.dtype != np.bool_ or pairs.shape != (R, R):
            raise TypeError(f"partials: expected a bool or a bool array of shape ({R}, {R}) (source, expert-side "
                            f"rank), got {type(partials).__name__} {getattr(pairs, 'dtype', '')} "
                            f"{getattr(pairs, 'shape', '')}")
    if none_allowed and pairs.any():
        raise ValueError("partials=True models epcomm's expert-side sums, which the kernels make neither with "
                         "numerics='deepep' (DeepEP adds every row at the source) nor with use_logfmt "
                         "(every row travels encoded)")
    return pairs
