"""CPU tests of epcomm.reference (the oracle of the GPU tests) and epcomm.testing.

Expected values come from slow per-token loops written independently of the vectorised
reference, or from algebraic properties (counts adding up, exact sums of small multiples of
1/8), never from hard-coded outputs of the reference itself.
"""
from __future__ import annotations

import struct

import ml_dtypes
import numpy as np
import pytest

from epcomm import reference as ref
from epcomm.testing import random_bf16, random_topk, random_weights

BF16 = ml_dtypes.bfloat16
FP8 = ml_dtypes.float8_e4m3fn


def bits(a: np.ndarray) -> np.ndarray:
    """Raw bits of an array, so comparisons are bit for bit (NaN and -0 included)."""
    return np.ascontiguousarray(a).view(f"u{a.dtype.itemsize}")


def assert_bits_equal(a, b, what=""):
    assert a.dtype == b.dtype, (what, a.dtype, b.dtype)
    assert a.shape == b.shape, (what, a.shape, b.shape)
    np.testing.assert_array_equal(bits(a), bits(b), err_msg=what)


def grid_bf16(rng, shape, lim=16):
    """bf16 multiples of 1/8 in [-lim/8, lim/8]: sums of a few of them are exact in float32 and bf16."""
    return (rng.integers(-lim, lim + 1, size=shape) / 8).astype(np.float32).astype(BF16)


def make_routing(rng, R, E, K, Ns, drop_prob=0.2):
    return [random_topk(rng, n, E, K, drop_prob=drop_prob) for n in Ns]


def routed_inputs(rng, R, E, K, H, Ns, drop_prob=0.2, make_x=random_bf16):
    """(x, idx): make_x(rng, (N_r, H)) per rank, then a random routing (drawn in that order)."""
    x = [make_x(rng, (n, H)) for n in Ns]
    return x, make_routing(rng, R, E, K, Ns, drop_prob)


# --------------------------------------------------------------------------- testing.py


def test_random_topk_properties():
    rng = np.random.default_rng(1)
    idx = random_topk(rng, 2000, 32, 6)
    assert idx.dtype == np.int64 and idx.shape == (2000, 6)
    assert idx.min() >= 0 and idx.max() < 32
    assert all(len(set(row)) == 6 for row in idx.tolist())
    # Uniform: every expert is picked about N*K/E = 375 times.
    counts = np.bincount(idx.ravel(), minlength=32)
    assert counts.min() > 250 and counts.max() < 500
    # Random order: the first column is not sorted.
    assert not np.all(idx[:, 0] <= idx[:, 1])

    dropped = random_topk(rng, 2000, 32, 6, drop_prob=0.3)
    frac = np.mean(dropped == -1)
    assert 0.25 < frac < 0.35

    only = random_topk(rng, 500, 32, 4, num_ranks=4, only_rank=2)
    assert only.min() >= 16 and only.max() < 24
    assert all(len(set(row)) == 4 for row in only.tolist())
    with pytest.raises(ValueError, match="topk"):
        random_topk(rng, 10, 32, 9, num_ranks=4, only_rank=0)
    with pytest.raises(ValueError, match="num_ranks"):
        random_topk(rng, 10, 32, 2, only_rank=0)


def test_random_weights_and_bf16():
    rng = np.random.default_rng(2)
    idx = random_topk(rng, 300, 16, 4, drop_prob=0.25)
    w = random_weights(rng, idx)
    assert w.dtype == np.float32 and w.shape == idx.shape
    assert np.all(w[idx < 0] == 0) and np.all(w[idx >= 0] > 0)
    x = random_bf16(rng, (7, 256), scale=0.01)
    assert x.dtype == BF16 and x.shape == (7, 256) and np.any(x.astype(np.float32) != 0)
    with pytest.raises(ValueError):
        random_bf16(rng, (3,), scale=0.0)


# --------------------------------------------------------------------------- layout


def brute_layout(idx, E, R, P):
    L = E // R
    N = idx.shape[0]
    per_rank = np.zeros(R, np.int64)
    per_node = np.zeros(max(R // P, 1), np.int64)
    per_expert = np.zeros(E, np.int64)
    in_rank = np.zeros((N, R), bool)
    for t in range(N):
        ranks, nodes = set(), set()
        for e in idx[t]:
            if e < 0:
                continue
            per_expert[e] += 1
            ranks.add(e // L)
            nodes.add(e // L // P)
        for r in ranks:
            per_rank[r] += 1
            in_rank[t, r] = True
        for n in nodes:
            per_node[n] += 1
    return per_rank, per_node, per_expert, in_rank


@pytest.mark.parametrize("R,L,K", [(2, 3, 4), (8, 4, 8), (16, 2, 6), (64, 4, 8)])
def test_layout_matches_bruteforce(R, L, K):
    rng = np.random.default_rng(R)
    E = R * L
    idx = random_topk(rng, 300, E, K, drop_prob=0.2)
    lay = ref.get_dispatch_layout(idx, E, R)
    per_rank, per_node, per_expert, in_rank = brute_layout(idx, E, R, 8)
    assert lay.num_tokens_per_rank.dtype == np.int32 and lay.num_tokens_per_expert.dtype == np.int32
    assert lay.is_token_in_rank.dtype == bool and lay.is_token_in_rank.shape == (300, R)
    np.testing.assert_array_equal(lay.num_tokens_per_rank, per_rank)
    np.testing.assert_array_equal(lay.num_tokens_per_expert, per_expert)
    np.testing.assert_array_equal(lay.is_token_in_rank, in_rank)
    if R <= 8:
        assert lay.num_tokens_per_rdma_rank is None
    else:
        assert lay.num_tokens_per_rdma_rank.dtype == np.int32
        assert lay.num_tokens_per_rdma_rank.shape == (R // 8,)
        np.testing.assert_array_equal(lay.num_tokens_per_rdma_rank, per_node)


def test_layout_rdma_with_other_node_size():
    rng = np.random.default_rng(3)
    idx = random_topk(rng, 200, 48, 5, drop_prob=0.1)
    lay = ref.get_dispatch_layout(idx, 48, 12, num_ranks_per_node=4)
    np.testing.assert_array_equal(lay.num_tokens_per_rdma_rank, brute_layout(idx, 48, 12, 4)[1])


def test_layout_errors():
    idx = np.zeros((4, 2), np.int64)
    with pytest.raises(ValueError, match="topk_idx"):
        ref.get_dispatch_layout(idx[0], 8, 2)
    with pytest.raises(ValueError, match="topk_idx"):
        ref.get_dispatch_layout(idx.astype(np.float32), 8, 2)
    with pytest.raises(ValueError, match="topk_idx"):
        ref.get_dispatch_layout(idx + 8, 8, 2)
    with pytest.raises(ValueError, match="topk_idx"):
        ref.get_dispatch_layout(idx - 2, 8, 2)
    with pytest.raises(ValueError, match="num_experts"):
        ref.get_dispatch_layout(idx, 9, 2)
    with pytest.raises(ValueError, match="num_ranks_per_node"):
        ref.get_dispatch_layout(idx, 12, 12)


# --------------------------------------------------------------------------- normal dispatch


def slow_dispatch(x, idx, w, E, scales=None):
    """Per-destination, per-source, per-token loop (the spec written out literally)."""
    R = len(x)
    L = E // R
    out = []
    for d in range(R):
        rows, src, tk, tw, sc, prefix = [], [], [], [], [], [0]
        for s in range(R):
            for t in range(x[s].shape[0]):
                if not any(e >= 0 and e // L == d for e in idx[s][t]):
                    continue
                rows.append(x[s][t])
                src.append(t)
                if scales is not None:
                    sc.append(scales[s][t])
                tk.append([e - d * L if (e >= 0 and e // L == d) else -1 for e in idx[s][t]])
                tw.append([w[s][t][k] if tk[-1][k] >= 0 else 0.0 for k in range(len(idx[s][t]))])
            prefix.append(len(rows))
        K = idx[0].shape[1]
        H = x[0].shape[1]
        per_expert = [sum(1 for row in tk if j in row) for j in range(L)]
        out.append(dict(
            recv_x=np.array(rows, dtype=x[0].dtype).reshape(-1, H),
            src=np.array(src, np.int32),
            topk=np.array(tk, np.int64).reshape(-1, K),
            w=np.array(tw, np.float32).reshape(-1, K),
            scales=None if scales is None else np.array(sc, np.float32).reshape(-1, H // 128),
            prefix=np.array(prefix, np.int32),
            per_expert=per_expert,
        ))
    return out


@pytest.mark.parametrize("R,E,K", [(4, 16, 4), (2, 2, 2), (8, 64, 6)])
def test_dispatch_matches_slow_loop(R, E, K):
    rng = np.random.default_rng(10 + R)
    Ns = [int(n) for n in rng.integers(0, 40, size=R)]
    Ns[0] = 0  # a rank without tokens
    H = 64
    x, idx = routed_inputs(rng, R, E, K, H, Ns)
    w = [random_weights(rng, a) for a in idx]
    res = ref.dispatch(x, E, topk_idx=idx, topk_weights=w)
    exp = slow_dispatch(x, idx, w, E)
    for d in range(R):
        r, e = res[d], exp[d]
        assert_bits_equal(r.recv_x, e["recv_x"], f"recv_x[{d}]")
        assert_bits_equal(r.recv_topk_idx, e["topk"], f"recv_topk_idx[{d}]")
        assert_bits_equal(r.recv_topk_weights, e["w"], f"recv_topk_weights[{d}]")
        assert r.recv_x_scales is None
        np.testing.assert_array_equal(r.handle.recv_src_idx, e["src"])
        assert r.handle.recv_src_idx.dtype == np.int32
        np.testing.assert_array_equal(r.handle.rank_prefix, e["prefix"])
        assert r.handle.rank_prefix.dtype == np.int32
        assert r.handle.num_recv_tokens == len(e["src"])
        assert r.num_recv_tokens_per_expert_list == e["per_expert"]
        assert all(type(c) is int for c in r.num_recv_tokens_per_expert_list)
        # send_pos: index of t among the tokens sent to each rank, in token order.
        h = r.handle
        for dd in range(R):
            sent = np.flatnonzero(h.is_token_in_rank[:, dd])
            np.testing.assert_array_equal(h.send_pos[sent, dd], np.arange(sent.size))
            assert np.all(h.send_pos[~h.is_token_in_rank[:, dd], dd] == -1)
        assert h.send_pos.dtype == np.int32


def test_dispatch_counts_add_up_and_alignment():
    rng = np.random.default_rng(20)
    R, E, K, H = 4, 32, 5, 32
    Ns = [50, 37, 64, 3]
    x, idx = routed_inputs(rng, R, E, K, H, Ns, drop_prob=0.3)
    L = E // R
    res = ref.dispatch(x, E, topk_idx=idx)
    lays = [ref.get_dispatch_layout(a, E, R) for a in idx]
    reached = sum(int(lay.is_token_in_rank.sum()) for lay in lays)
    assert sum(r.handle.num_recv_tokens for r in res) == reached
    for d in range(R):
        assert res[d].handle.num_recv_tokens == sum(int(lay.num_tokens_per_rank[d]) for lay in lays)
        from_layout = sum(lay.num_tokens_per_expert[d * L:(d + 1) * L] for lay in lays)
        assert res[d].num_recv_tokens_per_expert_list == [int(c) for c in from_layout]
        assert res[d].recv_topk_weights is None  # no weights given
    for align in (2, 7, 128):
        res_a = ref.dispatch(x, E, topk_idx=idx, expert_alignment=align)
        for d in range(R):
            got = res_a[d].num_recv_tokens_per_expert_list
            for c, c1 in zip(got, res[d].num_recv_tokens_per_expert_list):
                assert c % align == 0 and c1 <= c < c1 + align


def test_dispatch_with_is_token_in_rank_only():
    rng = np.random.default_rng(21)
    R, E, H = 3, 6, 16
    Ns = [10, 0, 7]
    x = [random_bf16(rng, (n, H)) for n in Ns]
    tir = [rng.random((n, R)) < 0.5 for n in Ns]
    res = ref.dispatch(x, E, is_token_in_rank=tir)
    for d in range(R):
        exp = np.concatenate([x[s][tir[s][:, d]] for s in range(R)])
        assert_bits_equal(res[d].recv_x, exp)
        assert res[d].recv_topk_idx is None and res[d].recv_topk_weights is None
        assert res[d].num_recv_tokens_per_expert_list == []
    # With topk_idx too, is_token_in_rank must agree with it.
    idx = make_routing(rng, R, E, 2, Ns)
    good = [ref.get_dispatch_layout(a, E, R).is_token_in_rank for a in idx]
    ref.dispatch(x, E, topk_idx=idx, is_token_in_rank=good)
    bad = [g.copy() for g in good]
    bad[2][0] = ~bad[2][0]
    with pytest.raises(ValueError, match=r"is_token_in_rank\[2\]"):
        ref.dispatch(x, E, topk_idx=idx, is_token_in_rank=bad)


def test_fp8_dispatch_moves_bytes_unchanged():
    rng = np.random.default_rng(22)
    R, E, K, H = 4, 8, 3, 256
    Ns = [20, 5, 31, 12]
    # Every byte value, NaN patterns included: the copy must be bit exact.
    x = [rng.integers(0, 256, size=(n, H), dtype=np.uint8).view(FP8) for n in Ns]
    sc = [rng.standard_normal((n, H // 128)).astype(np.float32) for n in Ns]
    idx = make_routing(rng, R, E, K, Ns)
    res = ref.dispatch(x, E, topk_idx=idx, x_scales=sc)
    exp = slow_dispatch(x, idx, [random_weights(rng, a) for a in idx], E, scales=sc)
    for d in range(R):
        assert res[d].recv_x.dtype == FP8
        assert_bits_equal(res[d].recv_x, exp[d]["recv_x"])
        assert_bits_equal(res[d].recv_x_scales, exp[d]["scales"])


def test_num_worst_tokens_padding_and_overflow():
    rng = np.random.default_rng(23)
    R, E, K, H = 4, 16, 4, 128
    Ns = [30, 25, 0, 40]
    x = [random_bf16(rng, (n, H)).astype(np.float32).astype(FP8) for n in Ns]
    sc = [rng.random((n, 1), dtype=np.float32) for n in Ns]
    idx = make_routing(rng, R, E, K, Ns)
    w = [random_weights(rng, a) for a in idx]
    plain = ref.dispatch(x, E, topk_idx=idx, topk_weights=w, x_scales=sc)
    Ms = [r.handle.num_recv_tokens for r in plain]
    W = max(Ms) + 5
    padded = ref.dispatch(x, E, topk_idx=idx, topk_weights=w, x_scales=sc, num_worst_tokens=W)
    for d in range(R):
        p, q, M = padded[d], plain[d], Ms[d]
        assert p.recv_x.shape == (W, H) and p.recv_x_scales.shape == (W, 1)
        assert p.recv_topk_idx.shape == (W, K) and p.recv_topk_weights.shape == (W, K)
        assert p.handle.recv_src_idx.shape == (W,)
        assert p.handle.num_recv_tokens == M
        assert p.num_recv_tokens_per_expert_list == []
        assert_bits_equal(p.recv_x[:M], q.recv_x)
        assert_bits_equal(p.recv_x_scales[:M], q.recv_x_scales)
        assert_bits_equal(p.recv_topk_idx[:M], q.recv_topk_idx)
        assert_bits_equal(p.recv_topk_weights[:M], q.recv_topk_weights)
        assert not bits(p.recv_x[M:]).any() and not bits(p.recv_x_scales[M:]).any()
        assert np.all(p.recv_topk_idx[M:] == -1) and not bits(p.recv_topk_weights[M:]).any()
        assert np.all(p.handle.recv_src_idx[M:] == -1)
        np.testing.assert_array_equal(p.handle.recv_src_idx[:M], q.handle.recv_src_idx)
    # Exactly enough is fine; one row short names the rank that overflows and its M.
    ref.dispatch(x, E, topk_idx=idx, x_scales=sc, num_worst_tokens=max(Ms))
    worst_rank = int(np.argmax(Ms))
    with pytest.raises(ValueError, match=rf"num_worst_tokens.*rank {worst_rank}.*M={max(Ms)}"):
        ref.dispatch(x, E, topk_idx=idx, x_scales=sc, num_worst_tokens=max(Ms) - 1)


# --------------------------------------------------------------------------- normal combine


def slow_combine(x, handles, w=None, bias=()):
    """Per-token loop over destinations in ascending order, float32 adds one after another."""
    R = len(x)
    out = []
    for s in range(R):
        h = handles[s]
        N, H = h.is_token_in_rank.shape[0], x[0].shape[1]
        cx = np.zeros((N, H), BF16)
        cw = None if w is None else np.zeros((N, w[0].shape[1]), np.float32)
        for t in range(N):
            acc = np.zeros(H, np.float32)
            wacc = None if w is None else np.zeros(w[0].shape[1], np.float32)
            for d in range(R):
                if h.is_token_in_rank[t, d]:
                    row = handles[d].rank_prefix[s] + h.send_pos[t, d]
                    acc = (acc + x[d][row].astype(np.float32)).astype(np.float32)
                    if w is not None:
                        wacc = (wacc + w[d][row]).astype(np.float32)
            for b in bias:
                acc = (acc + b[s][t].astype(np.float32)).astype(np.float32)
            cx[t] = acc.astype(BF16)
            if w is not None:
                cw[t] = wacc
        out.append((cx, cw))
    return out


def test_combine_of_dispatch_is_x_times_rank_count():
    rng = np.random.default_rng(30)
    R, E, K, H = 8, 32, 4, 96
    Ns = [int(n) for n in rng.integers(1, 50, size=R)]
    x, idx = routed_inputs(rng, R, E, K, H, Ns, drop_prob=0.4, make_x=grid_bf16)
    res = ref.dispatch(x, E, topk_idx=idx)
    out = ref.combine([r.recv_x for r in res], [r.handle for r in res])
    assert any(not r.handle.is_token_in_rank.any(axis=1).all() for r in res)  # some tokens go nowhere
    for s in range(R):
        n_ranks = ref.get_dispatch_layout(idx[s], E, R).is_token_in_rank.sum(axis=1)
        # "+ 0" because the sum starts at +0: a token reaching no rank gives +0, not x * 0 = -0.
        exp = (x[s].astype(np.float32) * n_ranks[:, None] + np.float32(0)).astype(BF16)
        cx, cw = out[s]
        assert cw is None
        assert_bits_equal(cx, exp, f"combined x of rank {s}")


def test_combine_with_weights_and_bias_matches_slow_loop():
    rng = np.random.default_rng(31)
    R, E, K, H = 4, 8, 4, 40
    Ns = [25, 0, 18, 33]
    x, idx = routed_inputs(rng, R, E, K, H, Ns, drop_prob=0.3)
    res = ref.dispatch(x, E, topk_idx=idx)
    handles = [r.handle for r in res]
    # Expert outputs and weights of very different magnitudes, so the order of additions shows.
    y = [random_bf16(rng, (r.handle.num_recv_tokens, H), scale=10.0 ** rng.integers(-3, 4)) for r in res]
    w = [rng.standard_normal((r.handle.num_recv_tokens, K)).astype(np.float32) for r in res]
    b0 = [random_bf16(rng, (n, H), scale=100.0) for n in Ns]
    b1 = [random_bf16(rng, (n, H), scale=0.01) for n in Ns]
    for bias in [(), (b0,), (b0, b1)]:
        got = ref.combine(y, handles, topk_weights=w, bias=bias)
        exp = slow_combine(y, handles, w, bias)
        for s in range(R):
            assert_bits_equal(got[s][0], exp[s][0], f"x, rank {s}, {len(bias)} biases")
            assert_bits_equal(got[s][1], exp[s][1], f"weights, rank {s}")
    # Rows past num_recv_tokens (num_worst_tokens mode) are ignored.
    y_pad = [np.concatenate([a, random_bf16(rng, (3, H))]) for a in y]
    got = ref.combine(y_pad, handles)
    exp = ref.combine(y, handles)
    for s in range(R):
        assert_bits_equal(got[s][0], exp[s][0])


def test_combine_adds_ranks_in_ascending_order():
    # One token reaching all 4 ranks with contributions 1, 2**-8, 2**-24, 2**-24:
    # ((1 + 2**-8) + 2**-24) + 2**-24 stays 1 + 2**-8 in float32 (ties to even), a bf16 tie
    # that rounds to 1.0; descending or pairwise order adds 2**-24 + 2**-24 first, reaches
    # 1 + 2**-8 + 2**-23 and rounds to 1 + 2**-7.
    E, H = 4, 8
    x = [np.ones((1, H), BF16)] + [np.zeros((0, H), BF16)] * 3
    idx = [np.array([[0, 1, 2, 3]], np.int64)] + [np.zeros((0, 4), np.int64)] * 3
    res = ref.dispatch(x, E, topk_idx=idx)
    vals = [1.0, 2.0 ** -8, 2.0 ** -24, 2.0 ** -24]
    y = [np.full((1, H), v, np.float32).astype(BF16) for v in vals]
    out = ref.combine(y, [r.handle for r in res])
    assert np.all(out[0][0].astype(np.float32) == 1.0)
    y_rev = y[::-1]
    out = ref.combine(y_rev, [r.handle for r in res])
    assert np.all(out[0][0].astype(np.float32) == 1.0 + 2.0 ** -7)


# --------------------------------------------------------------------------- FP8 helpers


def slow_quantize_group(v, round_scale):
    """One group of 128 float32 values, scalar float32 arithmetic and explicit bit twiddling."""
    f32 = np.float32
    amax = f32(0)
    for a in v:
        amax = max(amax, abs(f32(a)))
    amax = max(amax, f32(1e-4))
    s = f32(amax / f32(448))
    if round_scale:
        b = struct.unpack("<I", struct.pack("<f", s))[0]
        if b & 0x7FFFFF:
            b = (b & 0xFF800000) + 0x800000
        s = f32(struct.unpack("<f", struct.pack("<I", b))[0])
        inv = f32(struct.unpack("<f", struct.pack("<I", (254 - (b >> 23)) << 23))[0])
    else:
        inv = f32(f32(448) / amax)
    q = [min(max(f32(f32(a) * inv), f32(-448)), f32(448)) for a in v]
    return np.array(q, np.float32).astype(FP8), s


@pytest.mark.parametrize("round_scale", [False, True])
def test_fp8_quantize_matches_scalar_recipe(round_scale):
    rng = np.random.default_rng(40)
    G = 3
    x = random_bf16(rng, (4, G * 128))
    x[0, :128] = 0                              # amax clamps to 1e-4
    x[1, 128:256] = x[1, 128:256] * 1e-6        # tiny group, below the clamp
    x[2, 256:] = x[2, 256:] * 3e4               # large values
    q, s = ref.fp8_quantize(x, round_scale=round_scale)
    assert q.dtype == FP8 and q.shape == x.shape and s.dtype == np.float32 and s.shape == (4, G)
    xf = x.astype(np.float32)
    for n in range(4):
        for g in range(G):
            eq, es = slow_quantize_group(xf[n, g * 128:(g + 1) * 128], round_scale)
            assert_bits_equal(q[n, g * 128:(g + 1) * 128], eq, f"token {n} group {g}")
            assert bits(np.array([s[n, g]])) == bits(np.array([es]))


def test_fp8_rounds_to_nearest_even():
    # amax = 448 gives scale 1 and inverse 1 exactly, so q is x rounded to e4m3.
    x = np.zeros((1, 128), np.float32)
    x[0, :6] = [448.0, 1.0625, 1.1875, -1.0625, 1.5 * 2 ** -9, 2.5 * 2 ** -9]
    q, s = ref.fp8_quantize(x.astype(BF16))
    assert s[0, 0] == 1.0
    np.testing.assert_array_equal(q[0, :6].astype(np.float32),
                                  [448.0, 1.0, 1.25, -1.0, 2 * 2 ** -9, 2 * 2 ** -9])


def test_fp8_inverse_is_448_over_amax_not_one_over_scale():
    # Without round_scale the recipe multiplies by float32(448 / amax).  Search bf16 pairs
    # (amax, v) where that and float32(1 / s) quantise v differently, and check the recipe.
    f32 = np.float32
    amaxes = np.arange(0x3F80, 0x4000, dtype=np.uint16).view(BF16).astype(np.float32)    # [1, 2)
    vals = np.arange(0x3B00, 0x3F80, dtype=np.uint16).view(BF16).astype(np.float32)      # [2**-9, 1)
    cases = []
    for a in amaxes:
        inv = f32(448) / a
        inv_alt = f32(1) / f32(a / f32(448))
        q = (vals * inv).astype(FP8)
        q_alt = (vals * inv_alt).astype(FP8)
        diff = np.flatnonzero(bits(q) != bits(q_alt))
        cases += [(a, vals[i], q[i]) for i in diff]
    assert cases, "no distinguishing case found"
    x = np.zeros((len(cases), 128), np.float32)
    x[:, 0] = [a for a, _, _ in cases]
    x[:, 1] = [v for _, v, _ in cases]
    q, _ = ref.fp8_quantize(x.astype(BF16))
    assert_bits_equal(q[:, 1], np.array([c for _, _, c in cases], dtype=FP8))


@pytest.mark.parametrize("round_scale", [False, True])
def test_fp8_round_trip_error_bounds(round_scale):
    rng = np.random.default_rng(41)
    N, H = 64, 1024
    x = random_bf16(rng, (N, H))
    # Groups of very different magnitudes, including all-zero and sub-clamp ones.
    mag = (10.0 ** rng.integers(-8, 5, size=(N, H // 128))).astype(np.float32)
    x = (x.astype(np.float32) * np.repeat(mag, 128, axis=1)).astype(BF16)
    x[3, :128] = 0
    q, s = ref.fp8_quantize(x, round_scale=round_scale)
    deq = ref.fp8_dequantize(q, s)
    assert deq.dtype == np.float32 and deq.shape == (N, H)
    xf = x.astype(np.float32)
    err = np.abs(deq - xf)
    bound = np.abs(xf) * 2.0 ** -4 + np.repeat(s, 128, axis=1) * 2.0 ** -9
    assert np.all(err <= bound)
    assert np.all(np.abs(q.astype(np.float32)) <= 448)
    amax = np.maximum(np.abs(xf).reshape(N, -1, 128).max(axis=2), np.float32(1e-4))
    if round_scale:
        m, _ = np.frexp(s)
        assert np.all(m == 0.5)  # powers of two
        assert np.all(s >= amax / 448) and np.all(s < 2 * amax / 448)
    else:
        np.testing.assert_array_equal(s, (amax / np.float32(448)).astype(np.float32))
        # The largest element of every group maps to +-448.
        qa = np.abs(q.astype(np.float32)).reshape(N, -1, 128).max(axis=2)
        big = np.abs(xf).reshape(N, -1, 128).max(axis=2) >= 1e-4
        assert np.all(qa[big] == 448)


def test_fp8_use_ue8m0_same_as_round_scale_and_errors():
    rng = np.random.default_rng(42)
    x = random_bf16(rng, (5, 256))
    q1, s1 = ref.fp8_quantize(x, round_scale=True)
    q2, s2 = ref.fp8_quantize(x, round_scale=True, use_ue8m0=True)
    assert_bits_equal(q1, q2)
    assert_bits_equal(s1, s2)
    with pytest.raises(ValueError, match="use_ue8m0"):
        ref.fp8_quantize(x, use_ue8m0=True)
    with pytest.raises(ValueError, match="128"):
        ref.fp8_quantize(random_bf16(rng, (2, 100)))
    with pytest.raises(TypeError, match="x_bf16"):
        ref.fp8_quantize(x.astype(np.float16))


@pytest.mark.parametrize("G", [1, 4, 5, 7, 56])
def test_ue8m0_pack_unpack(G):
    rng = np.random.default_rng(43 + G)
    x = random_bf16(rng, (6, G * 128), scale=float(10.0 ** rng.integers(-6, 6)))
    _, s = ref.fp8_quantize(x, round_scale=True, use_ue8m0=True)
    packed = ref.pack_ue8m0(s)
    W = -(-G // 4)
    assert packed.dtype == np.int32 and packed.shape == (6, W)
    u = packed.view(np.uint32)
    for n in range(6):
        for g in range(4 * W):
            byte = (int(u[n, g // 4]) >> (8 * (g % 4))) & 0xFF
            want = (int(bits(s[n:n + 1, g])[0]) >> 23) & 0xFF if g < G else 0
            assert byte == want, (n, g)
    back = ref.unpack_ue8m0(packed, G)
    assert_bits_equal(back, s)
    with pytest.raises(ValueError, match="power of two"):
        ref.pack_ue8m0(np.array([[1.0, 3.0]], np.float32))
    with pytest.raises(ValueError, match="packed"):
        ref.unpack_ue8m0(packed, 4 * W + 1)


# --------------------------------------------------------------------------- low latency


def slow_ll_layout(idx, E, R, T):
    """Per (rank, local expert): rows as (source, token), source-major then token order."""
    L = E // R
    rows = {}
    for d in range(R):
        for j in range(L):
            e = d * L + j
            rows[d, j] = [(s, t) for s in range(R) for t in range(idx[s].shape[0]) if e in idx[s][t]]
    return rows


@pytest.mark.parametrize("mode", ["bf16", "fp8", "ue8m0"])
def test_ll_dispatch_layout_matches_bruteforce(mode):
    rng = np.random.default_rng(50)
    R, E, K, T, H = 4, 16, 4, 24, 640
    L = E // R
    Ns = [24, 0, 17, 9]
    x, idx = routed_inputs(rng, R, E, K, H, Ns, drop_prob=0.25)
    kw = dict(bf16=dict(use_fp8=False), fp8=dict(), ue8m0=dict(round_scale=True, use_ue8m0=True))[mode]
    res = ref.low_latency_dispatch(x, idx, T, E, **kw)
    rows = slow_ll_layout(idx, E, R, T)
    quant = [ref.fp8_quantize(a, round_scale=mode == "ue8m0") for a in x]
    for d in range(R):
        r = res[d]
        assert r.recv_x.shape == (L, R * T, H)
        assert r.recv_count.dtype == np.int32 and r.handle.src_info.dtype == np.int32
        assert r.handle.layout_range.dtype == np.int32 and r.handle.layout_range.shape == (L, R, 2)
        assert (r.handle.num_max_tokens, r.handle.num_experts, r.handle.hidden) == (T, E, H)
        if mode == "bf16":
            assert r.recv_x.dtype == BF16 and r.recv_x_scales is None
        elif mode == "fp8":
            assert r.recv_x.dtype == FP8 and r.recv_x_scales.dtype == np.float32
            assert r.recv_x_scales.shape == (L, R * T, H // 128)
        else:
            assert r.recv_x.dtype == FP8 and r.recv_x_scales.dtype == np.int32
            assert r.recv_x_scales.shape == (L, R * T, -(-H // 512))
        for j in range(L):
            lst = rows[d, j]
            n = len(lst)
            assert r.recv_count[j] == n
            np.testing.assert_array_equal(r.handle.src_info[j, :n], [t for _, t in lst])
            assert np.all(r.handle.src_info[j, n:] == -1)
            for s in range(R):
                begin = next((i for i, (ss, _) in enumerate(lst) if ss == s), None)
                count = sum(1 for ss, _ in lst if ss == s)
                assert r.handle.layout_range[j, s, 1] == count
                if count:
                    assert r.handle.layout_range[j, s, 0] == begin
                else:  # empty range: begins where the next source would
                    assert r.handle.layout_range[j, s, 0] == sum(1 for ss, _ in lst if ss < s)
            for i, (s, t) in enumerate(lst):
                if mode == "bf16":
                    assert_bits_equal(r.recv_x[j, i], x[s][t])
                else:
                    assert_bits_equal(r.recv_x[j, i], quant[s][0][t])
                    sc = quant[s][1][t]
                    want = ref.pack_ue8m0(sc) if mode == "ue8m0" else sc
                    assert_bits_equal(r.recv_x_scales[j, i], want)
            assert not bits(r.recv_x[j, n:]).any()
            if r.recv_x_scales is not None:
                assert not bits(r.recv_x_scales[j, n:]).any()
    # Every (token, expert) pair lands exactly once.
    assert sum(int(r.recv_count.sum()) for r in res) == sum(int((a >= 0).sum()) for a in idx)


def slow_ll_combine(y, idx, w, handles, partials=True):
    """``partials``: a bool, or bool [R, R] (source, expert-side rank)."""
    R = len(y)
    pairs = np.full((R, R), partials) if isinstance(partials, bool) else np.asarray(partials)
    E = handles[0].num_experts
    L = E // R
    out = []
    for s in range(R):
        N, H = idx[s].shape[0], y[0].shape[2]
        o = np.zeros((N, H), BF16)
        for t in range(N):
            prods, groups = {}, {}
            for k in range(idx[s].shape[1]):
                e = int(idx[s][t, k])
                if e < 0:
                    continue
                d, j = e // L, e % L
                b, c = handles[d].layout_range[j, s]
                (row,) = [b + i for i in range(c) if handles[d].src_info[j, b + i] == t]
                prods[k] = (np.float32(w[s][t, k]) * y[d][j, row].astype(np.float32)).astype(np.float32)
                groups.setdefault(d, []).append(k)
            acc = np.zeros(H, np.float32)
            for k in sorted(prods):
                g = groups[int(idx[s][t, k]) // L]
                if not pairs[s, int(idx[s][t, k]) // L] or len(g) == 1:
                    acc = (acc + prods[k]).astype(np.float32)
                elif k == g[0]:  # the expert side's partial enters at its lowest k
                    part = np.zeros(H, np.float32)
                    for kk in g:
                        part = (part + prods[kk]).astype(np.float32)
                    acc = (acc + part).astype(np.float32)
            o[t] = acc.astype(BF16)
        out.append(o)
    return out


def test_ll_combine_of_dispatch_is_x_times_weight_sum():
    rng = np.random.default_rng(51)
    R, E, K, T, H = 4, 32, 6, 32, 256
    Ns = [32, 11, 0, 25]
    x, idx = routed_inputs(rng, R, E, K, H, Ns, drop_prob=0.2)
    idx[1][0] = -1  # a token without experts
    w = [random_weights(rng, a) for a in idx]
    res = ref.low_latency_dispatch(x, idx, T, E, use_fp8=False)
    out = ref.low_latency_combine([r.recv_x for r in res], idx, w, [r.handle for r in res])
    for s in range(R):
        assert out[s].dtype == BF16 and out[s].shape == (Ns[s], H)
        exp = x[s].astype(np.float64) * w[s].astype(np.float64).sum(axis=1, keepdims=True)
        err = np.abs(out[s].astype(np.float64) - exp)
        assert np.all(err <= np.abs(exp) * 2.0 ** -7 + 1e-30)
    assert not bits(out[1][0]).any()


def test_ll_combine_matches_scalar_loop():
    rng = np.random.default_rng(52)
    R, E, K, T, H = 4, 8, 3, 16, 64
    L = E // R
    Ns = [16, 7, 12, 0]
    x, idx = routed_inputs(rng, R, E, K, H, Ns, drop_prob=0.2)
    w = [rng.standard_normal(a.shape).astype(np.float32) for a in idx]
    res = ref.low_latency_dispatch(x, idx, T, E, use_fp8=False)
    handles = [r.handle for r in res]
    y = [random_bf16(rng, (L, R * T, H), scale=float(10.0 ** rng.integers(-2, 3))) for _ in range(R)]
    for partials in (True, False):
        got = ref.low_latency_combine(y, idx, w, handles, partials=partials)
        exp = slow_ll_combine(y, idx, w, handles, partials=partials)
        for s in range(R):
            assert_bits_equal(got[s], exp[s], f"rank {s} partials={partials}")


def test_ll_combine_partials_per_rank_pair_as_with_declared_nodes():
    # Nodes {0, 1} and {2, 3}: partials only within a node, one row per (token, expert) across
    # (the kernels' rule, ll_partial).  Random data: the scalar loop agrees.
    rng = np.random.default_rng(53)
    R, E, K, T, H = 4, 16, 8, 16, 64
    L = E // R
    x, idx = routed_inputs(rng, R, E, K, H, [16, 9, 0, 16], drop_prob=0.1)
    w = [rng.standard_normal(a.shape).astype(np.float32) for a in idx]
    res = ref.low_latency_dispatch(x, idx, T, E, use_fp8=False)
    handles = [r.handle for r in res]
    y = [random_bf16(rng, (L, R * T, H), scale=float(10.0 ** rng.integers(-2, 3))) for _ in range(R)]
    node = np.arange(R) // 2
    pairs = node[:, None] == node[None, :]
    got = ref.low_latency_combine(y, idx, w, handles, partials=pairs)
    exp = slow_ll_combine(y, idx, w, handles, partials=pairs)
    for s in range(R):
        assert_bits_equal(got[s], exp[s], f"rank {s} partials within nodes")
    assert_bits_equal(ref.low_latency_combine(y, idx, w, handles, partials=np.ones((R, R), bool))[3],
                      ref.low_latency_combine(y, idx, w, handles, partials=True)[3], "all pairs")
    with pytest.raises(TypeError, match="partials"):
        ref.low_latency_combine(y, idx, w, handles, partials=np.ones((R, R - 1), bool))
    with pytest.raises(ValueError, match="partials"):
        ref.low_latency_combine(y, idx, w, handles, partials=pairs, use_logfmt=True)


def test_ll_combine_partials_within_nodes_differ_from_both_uniform_settings():
    # Experts 2r, 2r + 1 on rank r.  Sources 0 and 2 each have one token picking experts 4, 2,
    # 5 (ranks 2, 1, 2) with outputs 1, 2**-30, -1.  Source 0 (node 0) gets rank 2's rows
    # one by one: 1 + 2**-30 rounds to 1, the sum is 0.  Source 2 (node 1, as rank 2) gets
    # rank 2's partial 1 + (-1) = 0 at k = 0, then 2**-30.  Uniform partials get one of the
    # two right only, so a check with a uniform setting fails across declared nodes.
    R, E = 4, 8
    x = [np.ones((1, 8), BF16) for _ in range(R)]
    tok = np.array([[4, 2, 5]], np.int64)
    none = np.full((1, 3), -1, np.int64)
    idx = [tok, none, tok, none]
    res = ref.low_latency_dispatch(x, idx, 1, E, use_fp8=False)
    hs = [r.handle for r in res]
    y = [np.zeros((2, R, 8), np.float32) for _ in range(R)]
    for s in (0, 2):
        y[2][0, hs[2].layout_range[0, s, 0]] = 1.0
        y[2][1, hs[2].layout_range[1, s, 0]] = -1.0
        y[1][0, hs[1].layout_range[0, s, 0]] = 2.0 ** -30
    y = [a.astype(BF16) for a in y]
    w = [np.ones((1, 3), np.float32) for _ in range(R)]
    node = np.arange(R) // 2
    got = ref.low_latency_combine(y, idx, w, hs, partials=node[:, None] == node[None, :])
    assert np.all(got[0].astype(np.float32) == 0.0) and np.all(got[2].astype(np.float32) == 2.0 ** -30)
    for uniform in (True, False):
        other = ref.low_latency_combine(y, idx, w, hs, partials=uniform)
        assert not (np.array_equal(bits(other[0]), bits(got[0])) and np.array_equal(bits(other[2]), bits(got[2])))


def test_ll_combine_partials_sum_each_ranks_experts_first():
    # Experts 0, 1 on rank 0 and 2, 3 on rank 1; the token picks 0, 2, 1 (ranks 0, 1, 0) with
    # outputs 1, 2**-30, -1.  In k order 1 + 2**-30 rounds to 1 and the result is 0; with the
    # expert side's partials rank 0 sends 1 + (-1) = 0 (entering at k = 0), then 2**-30 is added.
    x = [np.ones((1, 8), BF16), np.ones((1, 8), BF16)]
    idx = [np.array([[0, 2, 1]], np.int64), np.full((1, 3), -1, np.int64)]
    res = ref.low_latency_dispatch(x, idx, 1, 4, use_fp8=False)
    hs = [r.handle for r in res]
    y = [np.zeros((2, 2, 8), np.float32), np.zeros((2, 2, 8), np.float32)]
    y[0][0, hs[0].layout_range[0, 0, 0]] = 1.0
    y[0][1, hs[0].layout_range[1, 0, 0]] = -1.0
    y[1][0, hs[1].layout_range[0, 0, 0]] = 2.0 ** -30
    y = [a.astype(BF16) for a in y]
    w = [np.ones((1, 3), np.float32), np.ones((1, 3), np.float32)]
    with_p = ref.low_latency_combine(y, idx, w, hs)[0]
    without = ref.low_latency_combine(y, idx, w, hs, partials=False)[0]
    assert np.all(with_p.astype(np.float32) == 2.0 ** -30)
    assert np.all(without.astype(np.float32) == 0.0)


def test_ll_combine_rounds_product_before_sum():
    # Token with two experts: outputs 1.0 (weight 1) and 1 + 2**-7 (weight w), with w chosen so
    # that the exact product p is just above 2**-8 + 2**-24 but rounds to it in float32.  Rounded
    # product: 1 + 2**-8 + 2**-24 is a float32 tie -> 1 + 2**-8, a bf16 tie -> 1.0.  A fused
    # multiply-add would see the excess and end at 1 + 2**-7.
    target = 2.0 ** -8 + 2.0 ** -24
    yv = 1.0 + 2.0 ** -7
    w = np.float32(target / yv)
    while not (float(w) * yv > target and np.float32(float(w) * yv) == np.float32(target)):
        w = np.nextafter(w, np.float32(1))
        assert float(w) * yv < target + 2.0 ** -30
    H = 8
    x = [np.ones((1, H), BF16)]
    idx = [np.array([[0, 1]], np.int64)]
    res = ref.low_latency_dispatch(x, idx, 1, 2, use_fp8=False)
    y = np.zeros((2, 1, H), np.float32)
    y[0, 0], y[1, 0] = 1.0, yv
    weights = [np.array([[1.0, w]], np.float32)]
    out = ref.low_latency_combine([y.astype(BF16)], idx, weights, [res[0].handle])
    assert np.all(out[0].astype(np.float32) == 1.0)


# --------------------------------------------------------------------------- validation


def _normal_inputs(rng, R=2, E=4, K=2, H=128, Ns=(5, 3)):
    return routed_inputs(rng, R, E, K, H, Ns)


def test_dispatch_validation_errors():
    rng = np.random.default_rng(60)
    x, idx = _normal_inputs(rng)
    with pytest.raises(TypeError, match=r"x\[0\]"):
        ref.dispatch([a.astype(np.float32) for a in x], 4, topk_idx=idx)
    with pytest.raises(TypeError, match=r"x\[1\]"):
        ref.dispatch([x[0], x[1].astype(np.float32)], 4, topk_idx=idx)
    with pytest.raises(ValueError, match=r"x\[1\]"):
        ref.dispatch([x[0], x[1][:, :64]], 4, topk_idx=idx)
    with pytest.raises(ValueError, match="topk_idx"):
        ref.dispatch(x, 4, topk_idx=idx[:1])
    with pytest.raises(ValueError, match=r"topk_idx\[1\]"):
        ref.dispatch(x, 4, topk_idx=[idx[0], idx[1][:2]])
    with pytest.raises(TypeError, match=r"topk_idx\[0\]"):
        ref.dispatch(x, 4, topk_idx=[idx[0].astype(np.int32), idx[1]])
    bad = [idx[0].copy(), idx[1]]
    bad[0][1, 0] = 4
    with pytest.raises(ValueError, match=r"topk_idx\[0\].*4"):
        ref.dispatch(x, 4, topk_idx=bad)
    with pytest.raises(ValueError, match="num_experts"):
        ref.dispatch(x, 5, topk_idx=idx)
    with pytest.raises(TypeError, match=r"topk_weights\[0\]"):
        ref.dispatch(x, 4, topk_idx=idx, topk_weights=[a.astype(np.float64) for a in idx])
    with pytest.raises(ValueError, match="topk_weights"):
        ref.dispatch(x, 4, topk_weights=[np.zeros(a.shape, np.float32) for a in idx],
                     is_token_in_rank=[np.ones((a.shape[0], 2), bool) for a in idx])
    with pytest.raises(ValueError, match="is_token_in_rank"):
        ref.dispatch(x, 4)
    with pytest.raises(ValueError, match="expert_alignment"):
        ref.dispatch(x, 4, topk_idx=idx, expert_alignment=0)
    with pytest.raises(ValueError, match="num_worst_tokens"):
        ref.dispatch(x, 4, topk_idx=idx, num_worst_tokens=-1)
    with pytest.raises(ValueError, match="x_scales"):
        ref.dispatch([a.astype(FP8) for a in x], 4, topk_idx=idx)
    with pytest.raises(ValueError, match="x_scales"):
        ref.dispatch(x, 4, topk_idx=idx, x_scales=[np.ones((a.shape[0], 1), np.float32) for a in x])
    with pytest.raises(ValueError, match=r"x_scales\[1\]"):
        ref.dispatch([a.astype(FP8) for a in x], 4, topk_idx=idx,
                     x_scales=[np.ones((5, 1), np.float32), np.ones((3, 2), np.float32)])
    with pytest.raises(ValueError, match="128"):
        ref.dispatch([a[:, :64].astype(FP8) for a in x], 4, topk_idx=idx,
                     x_scales=[np.ones((a.shape[0], 0), np.float32) for a in x])
    with pytest.raises(TypeError, match="x"):
        ref.dispatch(x[0], 4, topk_idx=idx)


def test_combine_validation_errors():
    rng = np.random.default_rng(61)
    x, idx = _normal_inputs(rng)
    res = ref.dispatch(x, 4, topk_idx=idx)
    y = [r.recv_x for r in res]
    hs = [r.handle for r in res]
    with pytest.raises(TypeError, match=r"x\[0\]"):
        ref.combine([a.astype(np.float32) for a in y], hs)
    with pytest.raises(ValueError, match="handles"):
        ref.combine(y, hs[:1])
    with pytest.raises(TypeError, match=r"handles\[1\]"):
        ref.combine(y, [hs[0], object()])
    short = [a[:-1] if a.shape[0] else a for a in y]
    with pytest.raises(ValueError, match=r"x\[\d\]"):
        ref.combine(short, hs)
    with pytest.raises(ValueError, match=r"bias\[0\]\[1\]"):
        ref.combine(y, hs, bias=([random_bf16(rng, (5, 128)), random_bf16(rng, (4, 128))],))
    with pytest.raises(ValueError, match="bias"):
        ref.combine(y, hs, bias=([a for a in x],) * 3)
    with pytest.raises(ValueError, match=r"topk_weights\[0\]"):
        ref.combine(y, hs, topk_weights=[np.zeros((a.shape[0] + 1, 2), np.float32) for a in y])


def test_low_latency_validation_errors():
    rng = np.random.default_rng(62)
    x, idx = _normal_inputs(rng, Ns=(6, 4))
    with pytest.raises(ValueError, match=r"x\[0\].*num_max_tokens"):
        ref.low_latency_dispatch(x, idx, 5, 4)
    dup = [idx[0].copy(), idx[1]]
    dup[0][2] = [1, 1]
    with pytest.raises(ValueError, match=r"topk_idx\[0\].*twice"):
        ref.low_latency_dispatch(x, dup, 8, 4)
    ok_dup = [idx[0].copy(), idx[1]]
    ok_dup[0][2] = [-1, -1]  # repeated -1 is not a duplicate expert
    ref.low_latency_dispatch(x, ok_dup, 8, 4)
    with pytest.raises(ValueError, match="use_ue8m0"):
        ref.low_latency_dispatch(x, idx, 8, 4, use_ue8m0=True)
    with pytest.raises(ValueError, match="use_fp8"):
        ref.low_latency_dispatch(x, idx, 8, 4, use_fp8=False, round_scale=True)
    with pytest.raises(TypeError, match=r"x\[1\]"):
        ref.low_latency_dispatch([x[0], x[1].astype(np.float32)], idx, 8, 4)
    with pytest.raises(ValueError, match=r"topk_idx\[1\]"):
        ref.low_latency_dispatch(x, [idx[0], idx[1][:2]], 8, 4)
    with pytest.raises(ValueError, match=r"topk_idx\[1\]"):
        ref.low_latency_dispatch(x, [idx[0], idx[1] - 2], 8, 4)
    with pytest.raises(ValueError, match="128"):
        ref.low_latency_dispatch([a[:, :96] for a in x], idx, 8, 4)
    with pytest.raises(ValueError, match="num_max_tokens"):
        ref.low_latency_dispatch(x, idx, 0, 4)

    res = ref.low_latency_dispatch(x, idx, 8, 4, use_fp8=False)
    y = [r.recv_x for r in res]
    hs = [r.handle for r in res]
    w = [random_weights(rng, a) for a in idx]
    with pytest.raises(ValueError, match=r"x\[0\]"):
        ref.low_latency_combine([y[0][:, :-1], y[1]], idx, w, hs)
    with pytest.raises(TypeError, match=r"topk_weights\[1\]"):
        ref.low_latency_combine(y, idx, [w[0], w[1].astype(np.float64)], hs)
    # Token 0 of rank 0 now names an expert it was not dispatched to.
    other = [idx[0].copy(), idx[1]]
    other[0][0] = [next(e for e in range(4) if e not in idx[0][0]), -1]
    with pytest.raises(ValueError, match=r"topk_idx\[0\].*dispatched"):
        ref.low_latency_combine(y, other, w, hs)


# ---- each test below fails if the check it names is removed or loosened ----


def test_dispatch_rejects_topk_widths_that_differ_between_ranks():
    rng = np.random.default_rng(70)
    x, idx = _normal_inputs(rng)
    with pytest.raises(ValueError, match=r"topk_idx\[1\]"):
        ref.dispatch(x, 4, topk_idx=[idx[0], np.concatenate([idx[1], np.full((3, 1), -1, np.int64)], axis=1)])


def test_combine_rejects_a_send_pos_pointing_at_the_next_sources_rows():
    # Both ranks send token rows to rank 1; bump rank 0's last send_pos to rank 1 by one: it
    # then names the first row rank 1 received from rank 1, inside rank 1's received rows.
    x = [np.ones((2, 8), BF16), np.ones((2, 8), BF16)]
    idx = [np.array([[2], [3]], np.int64), np.array([[2], [3]], np.int64)]
    res = ref.dispatch(x, 4, topk_idx=idx)
    hs = [r.handle for r in res]
    assert hs[1].rank_prefix.tolist() == [0, 2, 4]
    hs[0].send_pos[1, 1] += 1
    with pytest.raises(ValueError, match="send_pos"):
        ref.combine([r.recv_x for r in res], hs)


def test_pack_ue8m0_rejects_inf_nan_and_subnormals():
    for v in (np.inf, np.nan, 2.0 ** -130, 0.0, -2.0):
        with pytest.raises(ValueError, match="power of two"):
            ref.pack_ue8m0(np.array([[1.0, v]], np.float32))


def test_ll_combine_group_partial_enters_at_its_lowest_k():
    # R=3, L=2.  Token picks experts 0 (rank 0), 2 (rank 1), 4 (rank 2), 1 (rank 0): k=0 and k=3
    # form rank 0's partial P = 1 + 2**-8, the others give 2**-24 each.  Contract: P enters at
    # k=0: ((P + 2**-24) + 2**-24) = 1 + 2**-8 -> bf16 tie -> 1.0.  Entering at k=3 instead
    # adds 2**-24 + 2**-24 first and ends at 1 + 2**-7.
    x = [np.ones((1, 8), BF16)] + [np.zeros((0, 8), BF16)] * 2
    idx = [np.array([[0, 2, 4, 1]], np.int64)] + [np.zeros((0, 4), np.int64)] * 2
    res = ref.low_latency_dispatch(x, idx, 1, 6, use_fp8=False)
    hs = [r.handle for r in res]
    y = [np.zeros((2, 3, 8), np.float32) for _ in range(3)]
    y[0][0, hs[0].layout_range[0, 0, 0]] = 1.0
    y[0][1, hs[0].layout_range[1, 0, 0]] = 2.0 ** -8
    y[1][0, hs[1].layout_range[0, 0, 0]] = 2.0 ** -24
    y[2][0, hs[2].layout_range[0, 0, 0]] = 2.0 ** -24
    y = [a.astype(BF16) for a in y]
    w = [np.ones((1, 4), np.float32)] + [np.zeros((0, 4), np.float32)] * 2
    out = ref.low_latency_combine(y, idx, w, hs)[0]
    assert np.all(out.astype(np.float32) == 1.0)


def _ll_two_rank_dispatch():
    # R=2, E=2 (one expert per rank), T=2: rank 0's token 0 and rank 1's token 1 pick expert 0.
    x = [np.ones((2, 128), BF16), np.ones((2, 128), BF16)]
    idx = [np.array([[0], [-1]], np.int64), np.array([[-1], [0]], np.int64)]
    res = ref.low_latency_dispatch(x, idx, 2, 2, use_fp8=False)
    return idx, [r.recv_x for r in res], [r.handle for r in res]


def test_ll_combine_rejects_a_routing_with_other_counts_even_if_src_info_agrees():
    idx, y, hs = _ll_two_rank_dispatch()
    w = [np.ones((2, 1), np.float32)] * 2
    ref.low_latency_combine(y, idx, w, hs)
    # Rank 0 now claims both its tokens chose expert 0: rows 0 and 1 of expert 0, whose
    # src_info is [0, 1], but row 1 came from rank 1 (layout_range count is 1, not 2).
    other = [np.array([[0], [0]], np.int64), idx[1]]
    with pytest.raises(ValueError, match=r"topk_idx\[0\].*dispatched"):
        ref.low_latency_combine(y, other, w, hs)


def test_ll_combine_rejects_tokens_swapped_between_experts():
    # Same counts per expert, other tokens: only src_info can tell.
    x = [np.ones((2, 128), BF16), np.zeros((0, 128), BF16)]
    idx = [np.array([[0], [1]], np.int64), np.zeros((0, 1), np.int64)]
    res = ref.low_latency_dispatch(x, idx, 2, 2, use_fp8=False)
    y, hs = [r.recv_x for r in res], [r.handle for r in res]
    w = [np.ones((2, 1), np.float32), np.zeros((0, 1), np.float32)]
    swapped = [np.array([[1], [0]], np.int64), idx[1]]
    with pytest.raises(ValueError, match=r"topk_idx\[0\].*dispatched"):
        ref.low_latency_combine(y, swapped, w, hs)


def test_ll_combine_rejects_more_tokens_than_num_max_tokens():
    idx, y, hs = _ll_two_rank_dispatch()
    longer = [np.concatenate([idx[0], [[-1]]]), idx[1]]
    w = [np.ones((3, 1), np.float32), np.ones((2, 1), np.float32)]
    with pytest.raises(ValueError, match=r"topk_idx\[0\].*num_max_tokens"):
        ref.low_latency_combine(y, longer, w, hs)


def test_ll_combine_rejects_handles_of_another_hidden_size():
    import dataclasses
    idx, y, hs = _ll_two_rank_dispatch()
    w = [np.ones((2, 1), np.float32)] * 2
    bad = [hs[0], dataclasses.replace(hs[1], hidden=256)]
    with pytest.raises(ValueError, match=r"handles\[1\]"):
        ref.low_latency_combine(y, idx, w, bad)


@pytest.mark.parametrize("align", [1, 4])
def test_dispatch_count_list_counts_top_k_slots_like_the_layout(align):
    # A row naming a local expert twice counts twice: the kernel sums the layout's
    # num_tokens_per_expert (per slot) over the sources, as DeepEP does.
    E, R, H = 8, 2, 128
    tk = [np.array([[0, 0, 5, -1], [1, 2, 3, 4]]), np.array([[4, 4, 4, 1]])]
    xs = [np.zeros((len(t), H), dtype=ml_dtypes.bfloat16) for t in tk]
    res = ref.dispatch(xs, E, topk_idx=tk, expert_alignment=align)
    lays = [ref.get_dispatch_layout(t, E, R) for t in tk]
    L = E // R
    for d in range(R):
        want = sum(lay.num_tokens_per_expert[d * L:(d + 1) * L] for lay in lays)
        want = (want + align - 1) // align * align
        assert res[d].num_recv_tokens_per_expert_list == [int(c) for c in want]
    assert res[1].num_recv_tokens_per_expert_list[:2] == ([4, 1] if align == 1 else [4, 4])


def test_bit_mismatch_compares_bits_and_integer_values():
    import ml_dtypes

    from epcomm.testing import bit_mismatch
    a = np.array([1.0, -0.0, 2.5], dtype=ml_dtypes.bfloat16)
    assert bit_mismatch("x", a, a.copy()) is None
    b = a.copy()
    b[1] = 0.0  # equal as numbers, not as bits
    assert "1 of 3 elements differ" in bit_mismatch("x", b, a) and "[1]" in bit_mismatch("x", b, a)
    assert bit_mismatch("i", np.array([3, -1], np.int32), np.array([3, -1], np.int64)) is None
    assert "shape" in bit_mismatch("s", np.zeros((2, 3)), np.zeros((3, 2)))
    assert "dtype" in bit_mismatch("d", np.zeros(2, np.float32), np.zeros(2, np.float64))
    n = np.array([np.nan], np.float32)
    assert bit_mismatch("n", n, n.copy()) is None  # the same NaN bits are equal


def test_shared_rules_the_reference_uses():
    from epcomm.validate import (check_expert_range, check_experts_divisible, check_hidden_size,
                                 check_unique_experts)
    assert check_experts_divisible(12, 4) == 3
    with pytest.raises(ValueError, match=r"^num_experts=10 must be a multiple of the number of ranks 4$"):
        check_experts_divisible(10, 4)
    with pytest.raises(ValueError, match=r"^num_experts=10 must be a multiple of num_ranks=4$"):
        check_experts_divisible(10, 4, ranks_arg="num_ranks")
    assert check_hidden_size(2880) == 2880 and check_hidden_size(0) == 0
    for h, kw, msg in [(100, {}, "x: hidden size 100 must be a multiple of 8 (16-byte rows)"),
                       (100, dict(name=None), "hidden=100 must be a multiple of 8 (16-byte rows)"),
                       (2880, dict(fp8=True, name="x[0]"),
                        "x[0]: FP8 hidden size 2880 must be a multiple of 128 (one scale per 128 channels)"),
                       (0, dict(low_latency=True),
                        "x: hidden size 0 must be a positive multiple of 128 for the low-latency kernels")]:
        with pytest.raises(ValueError) as ei:
            check_hidden_size(h, **kw)
        assert str(ei.value) == msg
    check_expert_range("t", np.zeros((0, 2), np.int64), 4)
    check_expert_range("t", np.array([[-1, 3]]), 4)
    with pytest.raises(ValueError, match=r"^t holds expert index -2, outside \[-1, 4\)"):
        check_expert_range("t", np.array([[-2, 3]]), 4)
    check_unique_experts("t", np.array([[-1, -1], [0, 1]]))
    with pytest.raises(ValueError, match=r"^t row 1 lists the same expert twice \(\[2, 2\]\)"):
        check_unique_experts("t", np.array([[0, 1], [2, 2]]))
