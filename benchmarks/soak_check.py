"""The soak's cases and checks (benchmarks/soak.py), free of any GPU: tests/cpu/test_soak.py runs
them on CPU tensors.

A case is one shape and routing (mode, tokens per rank, hidden, top-k, experts, FP8 or BF16,
...), its inputs derived from its seed, so every rank builds every rank's inputs and the
reference.  The first call of a case is compared with ``epcomm.reference`` bit for bit
(:func:`verify_normal`, :func:`verify_ll`); the hashes of that verified result are kept, and
every later call of the case (cached dispatch, hook, CUDA-graph replay, the same call again)
must hash to the same values (:class:`Tracker`).  Hashes are computed where the outputs are
(:func:`hash_parts`, torch on the GPU): one reduction per output, no copy to the host.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from epcomm import reference
from epcomm.reference import BF16, FP8

HIDDEN = (2048, 2880, 4096, 7168)
LL_HIDDEN = tuple(h for h in HIDDEN if h % 128 == 0)  # the low-latency kernels need multiples of 128
LL_T = (128, 256)


@dataclass(frozen=True)
class Case:
    """One shape and routing; every input derives from ``seed`` (see :func:`case_inputs`)."""
    index: int
    mode: str           # "normal" (intranode) or "ll" (low-latency)
    seed: int
    Ns: tuple           # tokens per rank (different per rank)
    H: int
    K: int              # top-k width (1..8); ``drop`` of the slots are -1
    E: int
    fp8: bool
    drop: float
    col_scales: bool = False   # normal FP8: column-major scales
    worst: int = 0             # normal: num_worst_tokens (0: the CPU-synchronised dispatch)
    T: int = 0                 # low-latency: max tokens per rank
    round_scale: bool = False
    ue8m0: bool = False


def make_case(rng: np.random.Generator, index: int, R: int, mode: str, max_tokens: int = 4096) -> Case:
    """A random case for R ranks: tokens per rank uniform in [0, max_tokens] (normal) or [0, T]
    (low-latency), hidden from HIDDEN, top-k 1..8, FP8 where the hidden size allows it."""
    seed = int(rng.integers(1 << 31))
    K = int(rng.integers(1, 9))
    drop = float(rng.choice([0.0, 0.1, 0.5]))
    if mode == "normal":
        H = int(rng.choice(HIDDEN))
        E = R * int(rng.choice([4, 8, 16, 32]))
        fp8 = H % 128 == 0 and bool(rng.integers(2))
        Ns = tuple(int(n) for n in rng.integers(0, max_tokens + 1, R))
        worst = 0 if rng.random() < 0.75 else R * max(max(Ns), 1)
        return Case(index, mode, seed, Ns, H, K, max(E, K), fp8, drop, col_scales=fp8 and bool(rng.integers(2)),
                    worst=worst)
    T = int(rng.choice(LL_T))
    H = int(rng.choice(LL_HIDDEN))
    E = R * int(rng.choice([2, 4, 8, 16]))
    fp8 = bool(rng.integers(2))
    rs = fp8 and bool(rng.integers(2))
    Ns = tuple(int(n) for n in rng.integers(0, T + 1, R))
    return Case(index, mode, seed, Ns, H, min(K, E), E, fp8, drop, T=T, round_scale=rs,
                ue8m0=rs and bool(rng.integers(2)))


def _routing(rng: np.random.Generator, N: int, K: int, E: int, drop: float) -> np.ndarray:
    """int64 [N, K]: K distinct experts per token, each slot -1 with probability ``drop``."""
    idx = np.argsort(rng.random((N, E)), axis=1)[:, :K].astype(np.int64)
    idx[rng.random((N, K)) < drop] = -1
    return idx


def case_inputs(case: Case, R: int) -> dict:
    """Every rank's inputs (NumPy): x (bf16, or FP8 data with float32 ``scales``), ``idx``,
    ``w``; the combine's inputs ``y`` are made with the reference (their rows depend on it)."""
    rng = np.random.default_rng(case.seed)
    xs, scales, idx, w = [], [], [], []
    for n in case.Ns:
        x = rng.standard_normal((n, case.H), dtype=np.float32)
        if case.fp8 and case.mode == "normal":
            xs.append((x * 16).astype(FP8))
            scales.append(rng.random((n, case.H // 128), dtype=np.float32) + 0.5)
        else:
            xs.append(x.astype(BF16))
        idx.append(_routing(rng, n, case.K, case.E, case.drop))
        w.append(rng.random((n, case.K), dtype=np.float32) + 0.25)
    return dict(xs=xs, scales=scales or None, idx=idx, w=w)


def _combine_inputs(case: Case, rows: list) -> list:
    """bf16 combine inputs per rank, shapes ``rows[d]`` (random, no zeros: +0 and -0 would
    otherwise both be right answers of a sum)."""
    rng = np.random.default_rng(case.seed ^ 0x5EED)
    out = []
    for shape in rows:
        v = rng.random(shape, dtype=np.float32) + 0.5
        out.append(np.where(rng.random(shape) < 0.5, -v, v).astype(BF16))
    return out


def normal_reference(case: Case, R: int, inp: dict) -> dict:
    """The reference of a normal-mode case: ``dispatch`` (per rank), the combine inputs ``y`` and
    ``combine`` (per rank: (x, weights))."""
    disp = reference.dispatch(inp["xs"], case.E, topk_idx=inp["idx"], topk_weights=inp["w"], x_scales=inp["scales"],
                              num_worst_tokens=case.worst)
    ys = _combine_inputs(case, [(r.recv_x.shape[0], case.H) for r in disp])
    comb = reference.combine(ys, [r.handle for r in disp], topk_weights=[r.recv_topk_weights for r in disp])
    return dict(dispatch=disp, y=ys, combine=comb)


def ll_reference(case: Case, R: int, inp: dict, partials) -> dict:
    """The reference of a low-latency case: ``dispatch`` (per rank), ``y`` and ``combine``;
    ``partials``: as reference.low_latency_combine takes it (LowLatencyState.partial_pairs())."""
    disp = reference.low_latency_dispatch(inp["xs"], inp["idx"], case.T, case.E, use_fp8=case.fp8,
                                          round_scale=case.round_scale, use_ue8m0=case.ue8m0)
    ys = _combine_inputs(case, [r.recv_x.shape for r in disp])
    comb = reference.low_latency_combine(ys, inp["idx"], inp["w"], [r.handle for r in disp], partials=partials)
    return dict(dispatch=disp, y=ys, combine=comb)


# --------------------------------------------------------------------------- the outputs' parts


def normal_parts(res, rows: int) -> dict:
    """The checked parts of a normal dispatch's results (``rows``: the received rows M; padding
    rows past it are unspecified in recv_x), by name."""
    recv_x, rti, rtw, experts = res[0], res[1], res[2], res[3]
    parts = {}
    if isinstance(recv_x, tuple):
        parts["recv_x"], parts["recv_scales"] = recv_x[0][:rows], recv_x[1][:rows]
    else:
        parts["recv_x"] = recv_x[:rows]
    if rti is not None:
        parts["recv_topk_idx"] = rti[:rows]
    if rtw is not None:
        parts["recv_topk_weights"] = rtw[:rows]
    parts["experts"] = list(experts)
    return parts


def layout_parts(num_tokens_per_rank, num_tokens_per_expert, is_token_in_rank) -> dict:
    """The checked parts of a ``get_dispatch_layout`` (the outputs :func:`reference_layout`
    gives too; ``num_tokens_per_rdma_rank`` is None inside one node)."""
    return {"layout_per_rank": num_tokens_per_rank, "layout_per_expert": num_tokens_per_expert,
            "layout_in_rank": is_token_in_rank}


def reference_layout(case: Case, R: int, inp: dict, rank: int, device="cuda") -> dict:
    """:func:`layout_parts` of the reference's layout of ``rank``'s routing, as torch tensors on
    ``device`` (hashed there like the GPU's: :func:`hash_parts` reads values, not dtypes)."""
    lay = reference.get_dispatch_layout(inp["idx"][rank], case.E, R)
    return layout_parts(*(to_torch(a, device) for a in (lay.num_tokens_per_rank, lay.num_tokens_per_expert,
                                                         lay.is_token_in_rank)))


def ll_parts(recv_x, count, handle_src, handle_range) -> dict:
    """The checked parts of a low-latency dispatch (rows past each expert's count are
    unspecified: :func:`hash_parts` and :func:`verify_ll` mask them)."""
    parts = {"count": count, "src_info": handle_src, "layout_range": handle_range}
    if isinstance(recv_x, tuple):
        parts["recv_x"], parts["recv_scales"] = recv_x
    else:
        parts["recv_x"] = recv_x
    return parts


def to_torch(a: np.ndarray, device="cuda", col_major: bool = False):
    """NumPy array ``a`` (bf16 / FP8 as ml_dtypes) as a torch tensor on ``device``; with
    ``col_major`` a 2-D array gets strides (1, rows) (column-major FP8 scales)."""
    import torch
    if a.dtype == BF16:
        out = torch.from_numpy(np.ascontiguousarray(a).view(np.int16)).view(torch.bfloat16)
    elif a.dtype == FP8:
        out = torch.from_numpy(np.ascontiguousarray(a).view(np.uint8)).view(torch.float8_e4m3fn)
    else:
        out = torch.from_numpy(np.ascontiguousarray(a))
    if col_major:
        return out.T.contiguous().to(device).T
    return out.to(device)


def _words(t):
    """``t`` as int64 words (torch), bit for bit."""
    import torch
    if t.dtype == torch.bfloat16 or t.dtype == torch.float16:
        return t.contiguous().view(torch.int16).to(torch.int64)
    if t.dtype in (torch.float8_e4m3fn, torch.uint8):
        return t.contiguous().view(torch.uint8).to(torch.int64)
    if t.dtype == torch.float32:
        return t.contiguous().view(torch.int32).to(torch.int64)
    return t.to(torch.int64)


def _row_mask(parts: dict):
    """[L, R*T] bool: the packed rows a low-latency dispatch wrote (None for normal parts)."""
    import torch
    if "count" not in parts:
        return None
    c = parts["count"]
    rt = parts["recv_x"].shape[1]
    return torch.arange(rt, device=c.device)[None, :] < c.to(torch.int64)[:, None]


def hash_parts(parts: dict) -> dict:
    """name -> an int hash of each part's bits (low-latency rows past their count excluded):
    the sum of every word times a weight depending on its position, modulo 2**64 (so its value
    does not depend on the order of the GPU's reduction)."""
    import torch
    mask = _row_mask(parts)
    hs, names = [], []
    for name, t in parts.items():
        if isinstance(t, list):
            t = torch.tensor(t, dtype=torch.int64, device=parts[next(iter(parts))].device)
        v = _words(t)
        if mask is not None and name in ("recv_x", "recv_scales", "src_info"):
            m = mask.reshape(mask.shape + (1,) * (v.dim() - 2))
            v = torch.where(m, v, 0)
        v = v.flatten()
        pos = torch.arange(v.numel(), device=v.device, dtype=torch.int64)
        hs.append(((v + 0x1F) * ((pos * 0x9E3779B1 + 0x7F4A7C15) | 1)).sum() + v.numel())
        names.append(name)
    vals = torch.stack(hs).tolist() if hs else []
    return dict(zip(names, vals))


# --------------------------------------------------------------------------- comparing with the reference


def to_numpy(t) -> np.ndarray:
    """A torch tensor (any device) as NumPy, bf16 / FP8 as ml_dtypes."""
    import torch
    t = t.detach().cpu()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(BF16)
    if t.dtype == torch.float8_e4m3fn:
        return t.view(torch.uint8).numpy().view(FP8)
    return t.numpy()


def _same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    a, b = np.ascontiguousarray(a), np.ascontiguousarray(b)
    return a.shape == b.shape and a.dtype.itemsize == b.dtype.itemsize and \
        np.array_equal(a.view(np.uint8), b.view(np.uint8))


def verify_normal(parts: dict, combined, ref: dict, rank: int) -> list:
    """Names of the parts (and "combined_x", "combined_topk_weights") that differ from the
    reference of ``rank``; empty when every bit agrees."""
    d = ref["dispatch"][rank]
    M = d.handle.num_recv_tokens
    want = {"recv_x": d.recv_x[:M], "recv_scales": None if d.recv_x_scales is None else d.recv_x_scales[:M],
            "recv_topk_idx": None if d.recv_topk_idx is None else d.recv_topk_idx[:M],
            "recv_topk_weights": None if d.recv_topk_weights is None else d.recv_topk_weights[:M]}
    bad = [k for k, v in want.items() if (v is None) != (k not in parts)
           or (v is not None and not _same_bits(to_numpy(parts[k]), v))]
    if list(parts["experts"]) != list(d.num_recv_tokens_per_expert_list):
        bad.append("experts")
    cx, cw = ref["combine"][rank]
    if not _same_bits(to_numpy(combined[0]), cx):
        bad.append("combined_x")
    if (cw is None) != (combined[1] is None) or (cw is not None and not _same_bits(to_numpy(combined[1]), cw)):
        bad.append("combined_topk_weights")
    return bad


def verify_ll(parts: dict, combined, ref: dict, rank: int) -> list:
    """As :func:`verify_normal` for a low-latency case (rows past each count not compared)."""
    d = ref["dispatch"][rank]
    count = to_numpy(parts["count"])
    bad = [] if np.array_equal(count, d.recv_count) else ["count"]
    rows = np.arange(d.recv_x.shape[1])[None, :] < d.recv_count[:, None]
    for name, want in (("recv_x", d.recv_x), ("recv_scales", d.recv_x_scales), ("src_info", d.handle.src_info)):
        if want is None:
            if name in parts:
                bad.append(name)
            continue
        got = to_numpy(parts[name])
        m = rows.reshape(rows.shape + (1,) * (want.ndim - 2))
        if got.shape != want.shape or not _same_bits(np.where(m, got, 0).astype(want.dtype),
                                                      np.where(m, want, 0).astype(want.dtype)):
            bad.append(name)
    if not _same_bits(to_numpy(parts["layout_range"]), d.handle.layout_range):
        bad.append("layout_range")
    if not _same_bits(to_numpy(combined), ref["combine"][rank]):
        bad.append("combined_x")
    return bad


# --------------------------------------------------------------------------- what differs, in detail

DETAIL_ITEMS = 8   # differing elements (and rows) a detail lists per part


def _bits(a: np.ndarray) -> np.ndarray:
    """``a``'s elements as unsigned integers of their width (bf16, FP8 and floats by their bits)."""
    a = np.ascontiguousarray(a)
    return a.view(f"u{a.dtype.itemsize}") if a.dtype.itemsize in (1, 2, 4, 8) else a


def _show(a: np.ndarray, flat: int):
    """Element ``flat`` (flat index) of ``a`` for a JSON record: an int, or "value (0xbits)"."""
    v = a.reshape(-1)[flat]
    if a.dtype.kind in "iub":
        return int(v)
    b = int(_bits(a).reshape(-1)[flat])
    return f"{float(v)!r} (0x{b:0{2 * a.dtype.itemsize}x})"


def diff_arrays(got: np.ndarray, want: np.ndarray, mask=None, limit: int = DETAIL_ITEMS) -> dict | None:
    """How two NumPy arrays differ bit for bit, for a JSON record: ``shape``, ``differ`` (how
    many elements), ``first`` ([index, got, want] of the first ``limit``) and, for arrays of
    three or more dimensions, ``rows`` (the leading two indices of the first ``limit`` rows
    with a difference); None if they agree.  ``mask`` (bool, broadcast to the arrays): the
    elements compared.  Arrays of different shapes: only both shapes."""
    got, want = np.asarray(got), np.asarray(want)
    if got.shape != want.shape:
        return {"shape": [list(got.shape), list(want.shape)]}
    ne = _bits(got) != _bits(want)
    if mask is not None:
        ne &= np.broadcast_to(mask, ne.shape)
    flat = np.flatnonzero(ne)
    if not len(flat):
        return None
    out = {"shape": list(got.shape), "differ": int(len(flat)),
           "first": [[[int(i) for i in np.unravel_index(f, got.shape)], _show(got, f), _show(want, f)]
                     for f in flat[:limit]]}
    if got.ndim >= 3:
        rows = np.argwhere(ne.reshape(ne.shape[:2] + (-1,)).any(axis=2))
        out["rows"] = [[int(j), int(r)] for j, r in rows[:limit]]
    return out


def _detail(pairs) -> dict:
    """{name: diff_arrays(...)} of (name, got, want, mask) items, the parts that differ only."""
    out = {}
    for name, got, want, mask in pairs:
        if (got is None) != (want is None):
            out[name] = {"present": [got is not None, want is not None]}
        elif got is not None:
            d = diff_arrays(got, want, mask)
            if d is not None:
                out[name] = d
    return out


def diff_ll(parts: dict, combined, ref: dict, rank: int) -> dict:
    """What differs between a low-latency call's parts (any subset of :func:`ll_parts`'s) and
    combined output, copied to the host, and the reference of ``rank``: {part: diff_arrays
    record}, plus ``counts`` ([expert, got, want] of each expert whose count differs).  Rows
    are compared up to the larger of the two counts of their expert (rows past the call's own
    count hold whatever was there; past the reference's, zeros)."""
    d = ref["dispatch"][rank]
    want_c = d.recv_count.astype(np.int64)
    got_c = to_numpy(parts["count"]).astype(np.int64) if "count" in parts else want_c
    rows = np.arange(d.recv_x.shape[1])[None, :] < np.maximum(got_c, want_c)[:, None]
    pairs = [("count", got_c, want_c, None)] if "count" in parts else []
    for name, want in (("recv_x", d.recv_x), ("recv_scales", d.recv_x_scales), ("src_info", d.handle.src_info)):
        if name not in parts and (want is None or "recv_x" not in parts):
            continue  # in neither, or no part of this call
        got = to_numpy(parts[name]) if name in parts else None
        pairs.append((name, got, want, None if want is None else rows.reshape(rows.shape + (1,) * (want.ndim - 2))))
    if "layout_range" in parts:
        pairs.append(("layout_range", to_numpy(parts["layout_range"]), d.handle.layout_range, None))
    if combined is not None:
        pairs.append(("combined_x", to_numpy(combined), ref["combine"][rank], None))
    out = _detail(pairs)
    if "count" in out:
        out["counts"] = [[int(j), int(got_c[j]), int(want_c[j])] for j in np.flatnonzero(got_c != want_c)]
    return out


def diff_normal(parts: dict, combined, ref: dict, rank: int) -> dict:
    """As :func:`diff_ll` for a normal-mode call: its parts (any subset of :func:`normal_parts`'s,
    rows past the received count already cut) and combined (x, weights) or None."""
    d = ref["dispatch"][rank]
    M = d.handle.num_recv_tokens
    want = {"recv_x": d.recv_x[:M], "recv_scales": None if d.recv_x_scales is None else d.recv_x_scales[:M],
            "recv_topk_idx": None if d.recv_topk_idx is None else d.recv_topk_idx[:M],
            "recv_topk_weights": None if d.recv_topk_weights is None else d.recv_topk_weights[:M],
            "experts": np.asarray(d.num_recv_tokens_per_expert_list, dtype=np.int64)}
    pairs = []
    for name, w in want.items():
        if name not in parts:
            continue
        got = parts[name]
        got = np.asarray(list(got), dtype=np.int64) if isinstance(got, list) else to_numpy(got)
        pairs.append((name, got, w, None))
    if combined is not None:
        cx, cw = ref["combine"][rank]
        pairs.append(("combined_x", to_numpy(combined[0]), cx, None))
        pairs.append(("combined_topk_weights", None if combined[1] is None else to_numpy(combined[1]), cw, None))
    return _detail(pairs)


# --------------------------------------------------------------------------- repeats and memory


class Tracker:
    """The verified hashes of each case and the soak's counts."""

    def __init__(self):
        self.hashes: dict = {}       # (case, what) -> {part: hash}
        self.calls = 0
        self.mismatches: list = []   # (call index, case, what, parts that differ)
        self.verified = 0

    def first(self, key, hashes: dict, bad: list, call: int) -> None:
        """The hashes of a case's first (reference-checked) result; ``bad``: the parts that
        differed from the reference."""
        self.hashes[key] = dict(hashes)
        self.verified += 1
        if bad:
            self.mismatches.append((call, key[0], key[1], sorted(bad)))

    def repeat(self, key, hashes: dict, call: int) -> list:
        """A later result of the same case: every part must hash as the verified one did.
        Returns the parts that did not (recorded as a mismatch)."""
        want = self.hashes[key]
        bad = sorted(k for k, v in hashes.items() if want.get(k) != v)
        if bad:
            self.mismatches.append((call, key[0], key[1], bad))
        return bad


def drift(samples: list) -> float:
    """Relative growth of a sampled quantity after warm-up: (last - first) / first (0 if fewer
    than two samples or a first sample of 0)."""
    if len(samples) < 2 or not samples[0]:
        return 0.0
    return (samples[-1] - samples[0]) / samples[0]


MAX_DRIFT = 0.01   # "memory flat after warm-up": every sampled quantity within 1% of its first sample


def verdict(calls_done: int, target: int, mismatches: int, hangs: int, max_drift: dict, complete: bool) -> dict:
    """Whether a soak passed, and each condition: the run completed, every rank made ``target``
    collective calls, no mismatch, no hang, every drift within :data:`MAX_DRIFT`."""
    out = dict(complete=bool(complete), target_reached=calls_done >= target, no_mismatch=mismatches == 0,
               no_hang=hangs == 0, drift_ok=all(abs(v) <= MAX_DRIFT for v in max_drift.values()))
    out["passed"] = all(out.values())
    return out
