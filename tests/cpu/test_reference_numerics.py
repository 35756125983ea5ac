"""The reference's numerics="deepep" arithmetic and the LogFMT-10 format: crafted values where
DeepEP V1's operations differ from epcomm's, exact float32 FMA emulation, the LogFMT round trip
against its stated error bound, and the constants the kernels hold (parsed from cuda_src)."""
from __future__ import annotations

import re
from decimal import Decimal, getcontext
from fractions import Fraction
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

from epcomm import reference
from epcomm.reference import logfmt as LF
from epcomm.reference._float import fma32
from epcomm.testing import random_bf16, random_topk, random_weights

BF16 = ml_dtypes.bfloat16
CUDA_SRC = Path(__file__).resolve().parents[2] / "cuda_src"


def _bits(a):
    return np.ascontiguousarray(a).view(np.uint32 if a.dtype == np.float32 else np.uint16)


# --------------------------------------------------------------------------- FP8 scales


def test_fp8_scale_deepep_differs_in_the_last_bit_for_amax_3():
    x = np.zeros((1, 128), dtype=BF16)
    x[0, 5] = 3.0
    q_e, s_e = reference.fp8_quantize(x)
    q_d, s_d = reference.fp8_quantize(x, numerics="deepep")
    # 3/448 = 0.00669642857...: one correctly rounded quotient gives 0x3BDB6DB7; DeepEP's
    # 3 * float32(1/448) (csrc/kernels/legacy/utils.cuh, calculate_fp8_scales) rounds twice.
    assert _bits(s_e)[0, 0] == 0x3BDB6DB7 and _bits(s_d)[0, 0] == 0x3BDB6DB8
    assert reference.fp8.FP8_INV_MAX_DEEPEP.view(np.uint32) == 0x3B124925
    # The multiplier is 448 / amax in both: the e4m3 bytes agree.
    assert np.array_equal(q_e.view(np.uint8), q_d.view(np.uint8))


def test_fp8_deepep_scales_over_every_bf16_amax():
    """Every positive finite bf16 amax (with the 1e-4 floor): about half the scales differ in the
    last bit without round_scale, none with it, and the FP8 bytes never."""
    b = np.arange(1, 0x7F80, dtype=np.uint32)
    vals = np.unique(np.maximum((b << 16).view(np.float32), np.float32(1e-4)))
    G = -(-vals.size // 1)
    x = np.zeros((G, 128), dtype=np.float32)
    x[:, 0] = vals
    x[:, 1:] = -vals[:, None] * np.linspace(0, 1, 127, dtype=np.float32)[None, :]
    x = x.astype(BF16)
    q_e, s_e = reference.fp8_quantize(x)
    q_d, s_d = reference.fp8_quantize(x, numerics="deepep")
    differ = _bits(s_e) != _bits(s_d)
    assert 0.4 < differ.mean() < 0.7
    assert np.abs(_bits(s_e).astype(np.int64) - _bits(s_d).astype(np.int64)).max() == 1  # one ulp at most
    assert np.array_equal(q_e.view(np.uint8), q_d.view(np.uint8))
    for kw in (dict(round_scale=True), dict(round_scale=True, use_ue8m0=True)):
        q_e, s_e = reference.fp8_quantize(x, **kw)
        q_d, s_d = reference.fp8_quantize(x, numerics="deepep", **kw)
        assert np.array_equal(_bits(s_e), _bits(s_d)) and np.array_equal(q_e.view(np.uint8), q_d.view(np.uint8))


def test_ll_dispatch_passes_numerics_to_the_scales():
    rng = np.random.default_rng(5)
    xs = [random_bf16(rng, (16, 256)) for _ in range(2)]
    tks = [random_topk(rng, 16, 8, 2) for _ in range(2)]
    a = reference.low_latency_dispatch(xs, tks, 16, 8)
    b = reference.low_latency_dispatch(xs, tks, 16, 8, numerics="deepep")
    for ra, rb in zip(a, b):
        assert np.array_equal(ra.recv_x.view(np.uint8), rb.recv_x.view(np.uint8))
        np.testing.assert_allclose(ra.recv_x_scales, rb.recv_x_scales, rtol=2**-23)
    with pytest.raises(ValueError, match="numerics='cuda'"):
        reference.low_latency_dispatch(xs, tks, 16, 8, numerics="cuda")
    with pytest.raises(TypeError, match="numerics must be a str"):
        reference.fp8_quantize(xs[0], numerics=1)


# --------------------------------------------------------------------------- fused multiply-add


def test_fma32_rounds_once_where_float64_rounds_twice():
    # exact: 1 + 2**-23 + 2**-24 - 2**-70, just below the midpoint of 1 + 2**-23 and 1 + 2**-22
    a, b, c = np.float32(1 + 2**-23), np.float32(2**-24 * (1 - 2**-23)), np.float32(1 + 2**-23)
    assert fma32(a, b, c) == c
    assert np.float32(np.float64(a) * np.float64(b) + np.float64(c)) != c  # float64 then float32 ties up


def test_fma32_matches_exact_rational_rounding():
    rng = np.random.default_rng(3)
    n = 3000
    a = (rng.standard_normal(n) * 2.0 ** rng.integers(-30, 30, n)).astype(np.float32)
    b = rng.standard_normal(n).astype(np.float32)
    c = (-(a.astype(np.float64) * b) * (1 + rng.standard_normal(n) * 2.0 ** -rng.integers(1, 40, n))).astype(np.float32)
    got = fma32(a, b, c)
    for i in range(n):
        exact = Fraction(float(a[i])) * Fraction(float(b[i])) + Fraction(float(c[i]))
        f = np.float32(float(exact))
        cands = [f, np.nextafter(f, np.float32(np.inf)), np.nextafter(f, np.float32(-np.inf))]
        want = min(cands, key=lambda v: (abs(Fraction(float(v)) - exact), int(np.float32(v).view(np.uint32)) & 1))
        assert got[i] == want or (got[i] == 0 and want == 0), i


# --------------------------------------------------------------------------- low-latency combine


def _ll_case(seed, R=2, T=12, H=256, E=8, K=4):
    rng = np.random.default_rng(seed)
    xs = [random_bf16(rng, (T, H)) for _ in range(R)]
    tks = [random_topk(rng, T, E, K, drop_prob=0.2) for _ in range(R)]
    ws = [random_weights(rng, t) for t in tks]
    disp = reference.low_latency_dispatch(xs, tks, T, E, use_fp8=False)
    L = E // R
    ys = [(d.recv_x.astype(np.float32) * np.float32(1.5 + r) *
           (1 + np.arange(L, dtype=np.float32) / 7)[:, None, None]).astype(BF16) for r, d in enumerate(disp)]
    return ys, tks, ws, [d.handle for d in disp]


def _scalar_combine(ys, tks, ws, hs, s, fma, rows=lambda v: v.astype(np.float32)):
    """The plain k-ascending loop of one source, row by row (no partials)."""
    L = ys[0].shape[0]
    N, K = tks[s].shape
    out = np.zeros((N, ys[0].shape[2]), dtype=np.float32)
    for t in range(N):
        acc = np.zeros(ys[0].shape[2], dtype=np.float32)
        for k in range(K):
            e = int(tks[s][t, k])
            if e < 0:
                continue
            d, j = e // L, e % L
            beg, cnt = hs[d].layout_range[j, s]
            row = beg + int(np.flatnonzero(hs[d].src_info[j, beg:beg + cnt] == t)[0])
            v = rows(ys[d][j, row][None, :])[0]
            w = np.float32(ws[s][t, k])
            acc = fma32(v, w, acc) if fma else (acc + w * v).astype(np.float32)
        out[t] = acc
    return out.astype(BF16)


def test_ll_combine_deepep_is_one_fma_per_row_in_k_order():
    ys, tks, ws, hs = _ll_case(11)
    got = reference.low_latency_combine(ys, tks, ws, hs, numerics="deepep")
    ours = reference.low_latency_combine(ys, tks, ws, hs, partials=False)
    for s in range(len(ys)):
        assert np.array_equal(_bits(got[s]), _bits(_scalar_combine(ys, tks, ws, hs, s, True)))
        assert np.array_equal(_bits(ours[s]), _bits(_scalar_combine(ys, tks, ws, hs, s, False)))
    # The float32 sums differ in about a third of the elements; after the bf16 rounding about
    # 5e-5 of the outputs do (so a larger case shows some).
    ys, tks, ws, hs = _ll_case(12, T=256, H=2048, E=16, K=8)
    got = reference.low_latency_combine(ys, tks, ws, hs, numerics="deepep")
    ours = reference.low_latency_combine(ys, tks, ws, hs, partials=False)
    differs = sum(int((_bits(a) != _bits(b)).sum()) for a, b in zip(got, ours))
    assert 0 < differs < 2e-4 * 2 * 256 * 2048


def test_ll_combine_partials_follow_numerics_and_logfmt():
    ys, tks, ws, hs = _ll_case(12)
    default = reference.low_latency_combine(ys, tks, ws, hs)
    explicit = reference.low_latency_combine(ys, tks, ws, hs, partials=True)
    assert all(np.array_equal(_bits(a), _bits(b)) for a, b in zip(default, explicit))
    for kw in (dict(numerics="deepep"), dict(use_logfmt=True)):
        with pytest.raises(ValueError, match="partials=True"):
            reference.low_latency_combine(ys, tks, ws, hs, partials=True, **kw)
    with pytest.raises(TypeError, match="use_logfmt must be a bool"):
        reference.low_latency_combine(ys, tks, ws, hs, use_logfmt="yes")


@pytest.mark.parametrize("numerics", ["epcomm", "deepep"])
def test_ll_combine_with_logfmt_sums_the_decoded_rows(numerics):
    ys, tks, ws, hs = _ll_case(13)
    # Some groups of the expert rows at or above 1 (sent as bf16), most below (LogFMT).
    ys = [(y.astype(np.float32) * np.float32(0.01)).astype(BF16) for y in ys]
    ys[0][:, :, :128] = (ys[0][:, :, :128].astype(np.float32) * 1000).astype(BF16)
    got = reference.low_latency_combine(ys, tks, ws, hs, numerics=numerics, use_logfmt=True)
    for s in range(len(ys)):
        want = _scalar_combine(ys, tks, ws, hs, s, numerics == "deepep", rows=reference.logfmt_round_trip)
        assert np.array_equal(_bits(got[s]), _bits(want))


# --------------------------------------------------------------------------- normal combine


def _normal_case(seed, R=4, N=10, H=64, E=16, K=4):
    """Rows and biases with magnitudes spread over 2**-24 .. 2**24: bf16 summands within about
    2**16 of each other add exactly in float32, in any order, so the order shows only with
    such spreads (or where a node's part is rounded to bf16)."""
    rng = np.random.default_rng(seed)

    def wide(shape):
        return (random_bf16(rng, shape).astype(np.float32) * 2.0 ** rng.integers(-24, 25, shape)).astype(BF16)

    xs = [wide((N, H)) for _ in range(R)]
    tks = [random_topk(rng, N, E, K, drop_prob=0.1) for _ in range(R)]
    disp = reference.dispatch(xs, E, topk_idx=tks)
    # Every rank's rows differ (as expert outputs do).
    ys = [(d.recv_x.astype(np.float32) * np.float32(1.5 + 0.37 * r)).astype(BF16) for r, d in enumerate(disp)]
    biases = tuple([wide((N, H)) for _ in range(R)] for _ in range(2))
    return xs, ys, [d.handle for d in disp], biases


@pytest.mark.parametrize("P", [None, 2])
def test_normal_combine_deepep_adds_the_biases_first(P):
    xs, ys, hs, (b0, b1) = _normal_case(21)
    R = len(ys)
    got = reference.combine(ys, hs, bias=(b0, b1), num_ranks_per_node=P, numerics="deepep")
    for s in range(R):
        h = hs[s]
        N, H = b0[s].shape
        want = np.empty((N, H), dtype=np.float32)
        for t in range(N):
            acc = (b0[s][t].astype(np.float32) + b1[s][t].astype(np.float32)).astype(np.float32)
            step = P or R
            for first in range(0, R, step):
                part, hit = np.zeros(H, dtype=np.float32), False
                for d in range(first, first + step):
                    if h.is_token_in_rank[t, d]:
                        row = int(hs[d].rank_prefix[s]) + int(h.send_pos[t, d])
                        part = (part + ys[d][row].astype(np.float32)).astype(np.float32)
                        hit = True
                if hit:
                    if P:  # DeepEP's forwarder sends each node's part as bf16
                        part = part.astype(BF16).astype(np.float32)
                    acc = (acc + part).astype(np.float32)
            want[t] = acc
        assert np.array_equal(_bits(got[s][0]), _bits(want.astype(BF16)))
    # Some bf16 outputs differ from epcomm's order.
    xs, ys, hs, bias = _normal_case(23, N=64, H=256)
    got = reference.combine(ys, hs, bias=bias, num_ranks_per_node=P, numerics="deepep")
    ours = reference.combine(ys, hs, bias=bias, num_ranks_per_node=P)
    assert sum(int((_bits(a[0]) != _bits(b[0])).sum()) for a, b in zip(got, ours)) > 0


def test_normal_combine_deepep_reads_a_missing_bias_as_plus_zero():
    xs, ys, hs, (b0, _) = _normal_case(22, R=2, E=8)
    neg0 = [np.full_like(b, -0.0) for b in b0]
    with_one = reference.combine(ys, hs, bias=(neg0,), numerics="deepep")
    without = reference.combine(ys, hs, numerics="deepep")
    ours = reference.combine(ys, hs, bias=(neg0,))
    for s in range(2):
        # -0 + 0 = +0 first, so a -0 bias changes nothing; tokens that went nowhere give +0.
        assert np.array_equal(_bits(with_one[s][0]), _bits(without[s][0]))
        unsent = ~hs[s].is_token_in_rank.any(axis=1)
        assert np.all(_bits(with_one[s][0])[~unsent] == _bits(ours[s][0])[~unsent])


# --------------------------------------------------------------------------- LogFMT-10


def _groups_of_every_kind(rng, rows=256):
    """bf16 rows [rows, 1024] whose 128-channel groups span scales 2**-95 .. 2**1 and dynamic
    ranges of 0 to 12 octaves, with zeros, subnormals, constant groups and sign mixes."""
    G = rows * 8
    scale = 2.0 ** rng.uniform(-95, 1, G)
    spread = rng.uniform(0, 12, G)
    mag = scale[:, None] * 2.0 ** (-spread[:, None] * rng.random((G, 128)))
    x = mag * rng.choice([-1.0, 1.0], (G, 128))
    x[rng.random((G, 128)) < 0.01] = 0.0
    x[:8] = 0.25
    x[8:16, ::2] = 1e-40
    return x.astype(BF16).reshape(rows, 1024)


def test_logfmt_round_trip_stays_within_the_bound_and_comes_close_to_it():
    rng = np.random.default_rng(7)
    worst = 0.0
    for x in (_groups_of_every_kind(rng), (rng.standard_normal((512, 1024)) * 0.05).astype(BF16)):
        y = reference.logfmt_round_trip(x)
        err = np.abs(y.astype(np.float64) - x.astype(np.float64))
        bound = reference.logfmt_error_bound(x)
        assert np.all(err <= bound), float((err - bound).max())
        worst = max(worst, float((err / np.where(bound > 0, bound, 1)).max()))
    assert worst > 0.97  # the bound is nearly reached (midpoints of the widest grids)


def test_logfmt_relative_error_of_the_widest_grid():
    rng = np.random.default_rng(8)
    x = (rng.standard_normal((256, 1024)) * 0.05).astype(BF16)
    x[:, ::64] = 0  # a zero in every group: la = log2(amax) - 32, the widest step 32/510
    y = reference.logfmt_round_trip(x)
    xa = np.abs(x.astype(np.float64))
    big = xa > np.repeat(np.abs(x.astype(np.float64)).reshape(256, 8, 128).max(-1), 128, -1) * 2.0**-30
    rel = np.abs(y.astype(np.float64) - x.astype(np.float64))[big] / xa[big]
    assert rel.max() <= LF.LOGFMT_MAX_REL_ERROR < 0.0221
    assert rel.max() > 0.0217  # tanh(ln2 * 16/510) = 0.02175 at a midpoint


def test_logfmt_groups_that_are_not_cast_come_back_exactly():
    x = np.zeros((1, 768), dtype=np.float32)
    x[0, 0:128] = np.linspace(-2, 2, 128)          # amax >= 1
    x[0, 128:256] = 0.5                             # all magnitudes equal
    x[0, 256:384] = 2.0**-90                        # amax below 2**-88
    x[0, 384:512] = 0.0                             # all zero
    x[0, 512:640] = np.linspace(-0.5, 0.5, 128)
    x[0, 520], x[0, 521] = np.inf, np.nan           # inf/nan make amax >= 1
    x[0, 640:768] = np.linspace(0.01, 0.9, 128)     # cast
    xb = x.astype(BF16)
    words, meta = reference.logfmt_encode(xb)
    assert list(meta[0] != 0) == [False, False, False, False, False, True]
    y = reference.logfmt_round_trip(xb)
    raw = (xb.view(np.uint16).astype(np.uint32) << 16)[0, :640]
    assert np.array_equal(y.view(np.uint32)[0, :640], raw)
    assert np.array_equal(words[0, :640], xb.view(np.uint16)[0, :640])
    assert np.all(reference.logfmt_error_bound(xb)[0, :640] == 0)


def test_logfmt_words_meta_and_signs():
    rng = np.random.default_rng(9)
    x = (rng.standard_normal((64, 256)) * 0.1).astype(BF16)
    x[0, 0], x[0, 1] = -0.0, 0.0
    words, meta = reference.logfmt_encode(x)
    assert words.dtype == np.uint16 and meta.dtype == np.uint32 and meta.shape == (64, 2)
    assert np.all(meta != 0) and words.max() < 1024
    amax = np.abs(x.astype(np.float32)).reshape(64, 2, 128).max(-1).astype(BF16).view(np.uint16)
    assert np.array_equal(meta & 0xFFFF, amax)
    assert np.all((words >> 9) == (x.view(np.uint16) >> 15))  # the sign bit travels as is
    assert np.all((words & 511)[x.astype(np.float32) != 0] > 0)
    y = reference.logfmt_decode(words, meta)
    assert _bits(y)[0, 0] == 0x80000000 and _bits(y)[0, 1] == 0  # -0.0 and +0.0 come back
    # the largest magnitude of each group is code 511, within the bound of itself
    assert np.all((words & 511).reshape(64, 2, 128).max(-1) == 511)
    with pytest.raises(TypeError, match="bfloat16"):
        reference.logfmt_encode(x.astype(np.float32))
    with pytest.raises(ValueError, match="multiple of 128"):
        reference.logfmt_encode(x[:, :100])
    with pytest.raises(ValueError, match="do not match"):
        reference.logfmt_decode(words, meta[:, :1])


def test_logfmt_log2_table_is_correctly_rounded():
    getcontext().prec = 50
    ln2 = Decimal(2).ln()
    for f, t in enumerate(LF.LOG2_TABLE):
        exact = (Decimal(128 + f) / 128).ln() / ln2
        err = abs(Decimal(float(t)) - exact)
        for nb in (np.nextafter(t, np.float32(2)), np.nextafter(t, np.float32(-1))):
            assert err <= abs(Decimal(float(nb)) - exact), f


def test_logfmt_exp2_polynomial_error():
    r = np.unique(np.linspace(0, 1, 1 << 21, endpoint=False).astype(np.float32))
    p = LF._exp2(r)  # n = 0: P(r) itself
    rel = np.abs(p.astype(np.float64) / np.exp2(r.astype(np.float64)) - 1)
    assert rel.max() < 3.1e-6
    assert p.min() >= 1 and p.max() < 2  # P(r) in [1, 2): its exponent bits take 2**n exactly


def _cuh_hex_list(text: str, name: str) -> list[int]:
    body = text.split(name, 1)[1].split("};", 1)[0]
    return [int(h, 16) for h in re.findall(r"0x([0-9a-fA-F]{8})u", body)]


def test_kernels_hold_the_reference_constants():
    text = (CUDA_SRC / "logfmt.cuh").read_text()
    assert _cuh_hex_list(text, "kLogfmtLog2Bits[128] = {") == [int(v) for v in LF.LOG2_TABLE.view(np.uint32)]
    consts = dict(re.findall(r"constexpr float (kLogfmt\w+) = (0x[0-9a-fA-Fp.+-]+)f;", text))
    assert [np.float32(float.fromhex(consts[f"kLogfmtC{i}"])) for i in (1, 2, 3, 4)] == list(LF.EXP2_POLY)
    assert np.float32(float.fromhex(consts["kLogfmtLn2Div8"])) == LF.LN2_8
    assert LF.LN2_8 == np.float32(np.log(2) / 8)
    common = (CUDA_SRC / "epcomm_common.cuh").read_text()
    assert "constexpr float kFp8InvMaxDeepep = 1 / 448.0f;" in common
