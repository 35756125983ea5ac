"""CPU tests of the reference's node dimension: the combine's node-first summation order
(``num_ranks_per_node``), ``get_dispatch_layout``'s per-node counts and ``internode_traffic``.

Expected values come from per-token loops written here from the contract, from exact sums of
small integers, from hand-counted routings, or from ``epcomm plan``'s independent counting.
"""
from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest

from epcomm import reference as ref
from epcomm.testing import random_bf16, random_expert_sets, random_topk, random_topk_node_limited, random_weights
from epcomm.tools.plan import count_rows, plan, row_bytes

BF16 = ml_dtypes.bfloat16
F32 = np.float32


def bits(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a).view(f"u{a.dtype.itemsize}")


def assert_bits_equal(a, b, what=""):
    assert a.dtype == b.dtype and a.shape == b.shape, (what, a.dtype, b.dtype, a.shape, b.shape)
    np.testing.assert_array_equal(bits(a), bits(b), err_msg=what)


def routing(rng, R, E, K, Ns, drop_prob=0.3):
    return [random_topk(rng, n, E, K, drop_prob=drop_prob) for n in Ns]


def token_ranks(idx_row, L):
    """Sorted distinct ranks a token (one row of topk_idx) goes to."""
    return sorted({int(e) // L for e in idx_row if e >= 0})


def received_row(handle, s, t):
    """Row of destination ``handle`` holding token t of source s, found by its source index."""
    lo, hi = int(handle.rank_prefix[s]), int(handle.rank_prefix[s + 1])
    pos = np.flatnonzero(handle.recv_src_idx[lo:hi] == t)
    assert pos.size == 1, (s, t, pos)
    return lo + int(pos[0])


def spec_combine(xs, ws, biases, results, idx, L, P):
    """The combine's order of operations, one token at a time: per node ascending, the node's
    ranks ascending into a float32 partial, partials into acc, then the biases."""
    R = len(results)
    P = R if P is None or P >= R else P
    out = []
    for s in range(R):
        N, H = idx[s].shape[0], xs[0].shape[1]
        cx = np.zeros((N, H), dtype=BF16)
        cw = np.zeros((N, ws[0].shape[1]), dtype=F32) if ws is not None else None
        for t in range(N):
            dests = token_ranks(idx[s][t], L)
            acc = np.zeros(H, dtype=F32)
            wacc = np.zeros(cw.shape[1], dtype=F32) if ws is not None else None
            for m in range(R // P):
                mine = [d for d in dests if d // P == m]
                if not mine:
                    continue
                part = np.zeros(H, dtype=F32)
                wpart = np.zeros_like(wacc) if ws is not None else None
                for d in mine:
                    row = received_row(results[d].handle, s, t)
                    part = part + xs[d][row].astype(F32)
                    if ws is not None:
                        wpart = wpart + ws[d][row]
                acc = acc + part
                if ws is not None:
                    wacc = wacc + wpart
            for b in biases:
                acc = acc + b[s][t].astype(F32)
            cx[t] = acc.astype(BF16)
            if ws is not None:
                cw[t] = wacc
        out.append((cx, cw))
    return out


def random_case(seed, R, E, K, H, Ns, nbias=2):
    """(results, idx, expert outputs, their weights, biases) of a dispatch of a random routing."""
    rng = np.random.default_rng(seed)
    idx = routing(rng, R, E, K, Ns)
    w = [random_weights(rng, a) for a in idx]
    x = [random_bf16(rng, (n, H)) for n in Ns]
    res = ref.dispatch(x, E, topk_idx=idx, topk_weights=w)
    ys = [random_bf16(rng, r.recv_x.shape) for r in res]
    yw = [rng.uniform(0.05, 1.0, r.recv_topk_weights.shape).astype(F32) for r in res]
    biases = tuple([random_bf16(rng, (n, H)) for n in Ns] for _ in range(nbias))
    return res, idx, ys, yw, biases


# --------------------------------------------------------------------------- combine order


@pytest.mark.parametrize("P", [None, 4, 5, 8, 64])
def test_combine_one_node_is_the_flat_order(P):
    R, E, K, H = 4, 16, 3, 24
    res, idx, ys, yw, biases = random_case(11, R, E, K, H, [13, 0, 7, 21])
    hs = [r.handle for r in res]
    flat = ref.combine(ys, hs, topk_weights=yw, bias=biases)
    got = ref.combine(ys, hs, topk_weights=yw, bias=biases, num_ranks_per_node=P)
    want = spec_combine(ys, yw, biases, res, idx, E // R, None)
    for s in range(R):
        assert_bits_equal(got[s][0], flat[s][0], f"x[{s}] vs flat")
        assert_bits_equal(got[s][1], flat[s][1], f"w[{s}] vs flat")
        assert_bits_equal(got[s][0], want[s][0], f"x[{s}] vs spec")
        assert_bits_equal(got[s][1], want[s][1], f"w[{s}] vs spec")


@pytest.mark.parametrize("P", [1, 2, 4])
def test_combine_node_first_matches_the_spec_loop(P):
    R, E, K, H = 8, 32, 5, 16
    res, idx, ys, yw, biases = random_case(100 + P, R, E, K, H, [9, 17, 0, 4, 12, 1, 20, 6])
    got = ref.combine(ys, [r.handle for r in res], topk_weights=yw, bias=biases, num_ranks_per_node=P)
    want = spec_combine(ys, yw, biases, res, idx, E // R, P)
    for s in range(R):
        assert_bits_equal(got[s][0], want[s][0], f"x[{s}] P={P}")
        assert_bits_equal(got[s][1], want[s][1], f"w[{s}] P={P}")


@pytest.mark.parametrize("P", [1, 2, 4])
@pytest.mark.parametrize("seed", [0, 1])
def test_combine_of_unchanged_rows_is_x_times_ranks_reached(P, seed):
    R, E, K, H = 8, 16, 4, 32
    rng = np.random.default_rng(seed)
    Ns = [int(n) for n in rng.integers(0, 24, size=R)]
    idx = routing(rng, R, E, K, Ns, drop_prob=0.35)
    # Small integers: every sum of at most 8 of them is exact in float32 and bfloat16.
    x = [rng.integers(-8, 9, size=(n, H)).astype(F32).astype(BF16) for n in Ns]
    w = [random_weights(rng, a) for a in idx]
    res = ref.dispatch(x, E, topk_idx=idx, topk_weights=w)
    out = ref.combine([r.recv_x for r in res], [r.handle for r in res],
                      topk_weights=[r.recv_topk_weights for r in res], num_ranks_per_node=P)
    L = E // R
    for s in range(R):
        reached = np.array([len(token_ranks(row, L)) for row in idx[s]], dtype=F32)
        # + 0: a token reaching no rank combines to +0, where a negative x times 0 is -0.
        want = (x[s].astype(F32) * reached[:, None] + F32(0)).astype(BF16)
        assert_bits_equal(out[s][0], want, f"x[{s}]")
        # Each slot's weight comes back from the one rank holding its expert, zeros elsewhere.
        assert_bits_equal(out[s][1], np.where(idx[s] >= 0, w[s], F32(0)).astype(F32), f"w[{s}]")
    assert any((len(token_ranks(row, L)) > 1) for a in idx for row in a)
    assert any((row < 0).any() for a in idx for row in a)


def all_ranks_case(R, H):
    """One token per rank going to every rank (one expert per rank), so a combine input that is
    the same value v[d] on every row of rank d sums v over d for every token."""
    idx = [np.arange(R, dtype=np.int64)[None, :] for _ in range(R)]
    x = [np.zeros((1, H), dtype=BF16) for _ in range(R)]
    return ref.dispatch(x, R, topk_idx=idx, topk_weights=[np.ones((1, R), F32) for _ in range(R)]), idx


def test_combine_node_first_order_changes_the_bits():
    # Flat: ((2^24 + 1) + 1) - 2^24 = 0 (each +1 is a tie to even, lost); node-first with two
    # nodes: (2^24 + 1) + (1 - 2^24) = 2^24 - (2^24 - 1) = 1 (1 - 2^24 is exact).
    R, H = 4, 8
    v = [2.0 ** 24, 1.0, 1.0, -(2.0 ** 24)]
    res, idx = all_ranks_case(R, H)
    ys = [np.full(r.recv_x.shape, v[d], dtype=F32).astype(BF16) for d, r in enumerate(res)]
    hs = [r.handle for r in res]
    for P, want in [(None, 0.0), (1, 0.0), (2, 1.0), (4, 0.0)]:
        out = ref.combine(ys, hs, num_ranks_per_node=P)
        spec = spec_combine(ys, None, (), res, idx, 1, P)
        for s in range(R):
            assert_bits_equal(out[s][0], np.full((1, H), want, dtype=F32).astype(BF16), f"P={P} s={s}")
            assert_bits_equal(out[s][0], spec[s][0], f"P={P} s={s} vs spec")


def test_combine_weights_follow_the_node_first_order():
    # Flat: 1 + 2^-24 + 2^-24 + 2^-24 = 1 (every add a tie to even); two nodes:
    # (1 + 2^-24) + (2^-24 + 2^-24) = 1 + 2^-23.
    R, H = 4, 8
    tiny = 2.0 ** -24
    v = [1.0, tiny, tiny, tiny]
    res, idx = all_ranks_case(R, H)
    ys = [r.recv_x for r in res]
    yw = [np.full(r.recv_topk_weights.shape, v[d], dtype=F32) for d, r in enumerate(res)]
    hs = [r.handle for r in res]
    for P, want in [(None, F32(1.0)), (1, F32(1.0)), (2, F32(1.0) + F32(2.0 ** -23)), (4, F32(1.0))]:
        out = ref.combine(ys, hs, topk_weights=yw, num_ranks_per_node=P)
        spec = spec_combine(ys, yw, (), res, idx, 1, P)
        for s in range(R):
            assert_bits_equal(out[s][1], np.full((1, R), want, dtype=F32), f"P={P} s={s}")
            assert_bits_equal(out[s][1], spec[s][1], f"P={P} s={s} vs spec")
    assert F32(1.0) + F32(2.0 ** -23) != F32(1.0)


@pytest.mark.parametrize("P, exc", [(0, ValueError), (-2, ValueError), (3, ValueError), (5, ValueError),
                                    (6, ValueError), ("2", TypeError), (2.0, TypeError), (True, TypeError)])
def test_combine_rejects_bad_num_ranks_per_node(P, exc):
    res, _ = all_ranks_case(8, 8)
    ys = [r.recv_x for r in res]
    with pytest.raises(exc, match="num_ranks_per_node"):
        ref.combine(ys, [r.handle for r in res], num_ranks_per_node=P)


def test_combine_accepts_numpy_int_num_ranks_per_node():
    res, _ = all_ranks_case(4, 8)
    ys = [r.recv_x for r in res]
    hs = [r.handle for r in res]
    for a, b in zip(ref.combine(ys, hs, num_ranks_per_node=np.int64(2)), ref.combine(ys, hs, num_ranks_per_node=2)):
        assert_bits_equal(a[0], b[0])


# --------------------------------------------------------------------------- layout per node


@pytest.mark.parametrize("P", [1, 2, 4])
def test_layout_tokens_per_node_brute_force(P):
    R, E, K = 8, 32, 6
    rng = np.random.default_rng(40 + P)
    idx = random_topk(rng, 300, E, K, drop_prob=0.3)
    idx[:5] = -1                                   # tokens going nowhere
    lay = ref.get_dispatch_layout(idx, E, R, num_ranks_per_node=P)
    L = E // R
    want = np.zeros(R // P, dtype=np.int32)
    for row in idx.tolist():
        for m in {(e // L) // P for e in row if e >= 0}:
            want[m] += 1
    assert lay.num_tokens_per_rdma_rank.dtype == np.int32
    np.testing.assert_array_equal(lay.num_tokens_per_rdma_rank, want)
    assert ref.get_dispatch_layout(idx, E, R, num_ranks_per_node=R).num_tokens_per_rdma_rank is None


# --------------------------------------------------------------------------- traffic


def hand_case():
    """4 ranks on nodes {0, 1} and {2, 3}; is_token_in_rank per source."""
    tir = [np.zeros((n, 4), dtype=bool) for n in (3, 1, 0, 1)]
    tir[0][0, [1]] = True          # own node only: NVLink 0 -> 1
    tir[0][1, [0, 2, 3]] = True    # own rank free; network 0 -> 2, NVLink 2 -> 3
    tir[0][2, [3]] = True          # network 0 -> 2, NVLink 2 -> 3 (2 is no destination)
    tir[3][0, [0, 1, 2]] = True    # network 3 -> 1, NVLink 1 -> 0; own node: NVLink 3 -> 2
    return tir                     # rank 1's token goes nowhere, rank 2 has none


@pytest.mark.parametrize("P, want", [
    (2, dict(net_send=[2, 0, 0, 1], net_recv=[0, 1, 2, 0], nvl_send=[1, 1, 2, 1], nvl_recv=[1, 1, 1, 2])),
    (4, dict(net_send=[0, 0, 0, 0], net_recv=[0, 0, 0, 0], nvl_send=[4, 0, 0, 3], nvl_recv=[1, 2, 2, 2])),
    (9, dict(net_send=[0, 0, 0, 0], net_recv=[0, 0, 0, 0], nvl_send=[4, 0, 0, 3], nvl_recv=[1, 2, 2, 2])),
    (1, dict(net_send=[4, 0, 0, 3], net_recv=[1, 2, 2, 2], nvl_send=[0, 0, 0, 0], nvl_recv=[0, 0, 0, 0])),
])
def test_traffic_hand_counted(P, want):
    got = ref.internode_traffic(hand_case(), P, 10)
    for name, rows in want.items():
        a = getattr(got, name)
        assert a.dtype == np.int64 and a.shape == (4,), name
        np.testing.assert_array_equal(a, np.array(rows) * 10, err_msg=f"{name} P={P}")


def test_traffic_rejects_bad_arguments():
    tir = hand_case()
    with pytest.raises(TypeError, match="is_token_in_rank_list"):
        ref.internode_traffic(np.stack([tir[0]]), 2, 1)
    with pytest.raises(TypeError, match=r"is_token_in_rank_list\[1\]"):
        ref.internode_traffic([tir[0], tir[1].astype(np.int8), tir[2], tir[3]], 2, 1)
    with pytest.raises(ValueError, match=r"is_token_in_rank_list\[0\]"):
        ref.internode_traffic([t[:, :2] for t in tir], 2, 1)
    with pytest.raises(ValueError, match="num_ranks_per_node"):
        ref.internode_traffic(tir, 3, 1)
    with pytest.raises(ValueError, match="num_ranks_per_node"):
        ref.internode_traffic(tir, 0, 1)
    with pytest.raises(ValueError, match="row_bytes"):
        ref.internode_traffic(tir, 2, 0)
    with pytest.raises(TypeError, match="row_bytes"):
        ref.internode_traffic(tir, 2, 1.5)


def node_limited(rng, T, E, K, nodes):
    return random_topk_node_limited(rng, T, E, K, num_nodes=nodes, max_nodes=2)


@pytest.mark.parametrize("G", [1, 2, 4, 8])
@pytest.mark.parametrize("kind", ["drops", "node-limited"])
def test_traffic_matches_the_planners_counts(G, kind):
    R, E, K, T, B = 8, 32, 4, 60, 7
    rng = np.random.default_rng(G)
    if kind == "drops":
        idx = np.stack(routing(rng, R, E, K, [T] * R, drop_prob=0.3))
    else:
        idx = np.stack([node_limited(rng, T, E, K, R // G) for _ in range(R)])
    tirs = [ref.get_dispatch_layout(a, E, R, num_ranks_per_node=G).is_token_in_rank for a in idx]
    got = ref.internode_traffic(tirs, G, B)
    rows = count_rows(idx, G, E).rows
    for name, key in [("net_send", ("network", "send")), ("net_recv", ("network", "recv")),
                      ("nvl_send", ("nvlink", "send")), ("nvl_recv", ("nvlink", "recv"))]:
        np.testing.assert_array_equal(getattr(got, name), rows[("epcomm",) + key] * B, err_msg=name)
    # Network rows are the per-node counts of get_dispatch_layout without the source's own node.
    for s, a in enumerate(idx):
        per_node = ref.get_dispatch_layout(a, E, R, num_ranks_per_node=G).num_tokens_per_rdma_rank
        remote = 0 if per_node is None else int(per_node.sum() - per_node[s // G])
        assert got.net_send[s] == remote * B
    if G < R:
        assert got.net_send.sum() > 0
    if G > 1:
        assert got.nvl_send.sum() > 0


@pytest.mark.parametrize("dtype, max_nodes", [("bf16", None), ("fp8", 2)])
def test_traffic_matches_plan(dtype, max_nodes):
    N, G, T, H, K, E, seed = 2, 4, 48, 256, 4, 32, 5
    p = plan(N, G, T, H, K, E, dtype=dtype, routing="uniform" if max_nodes is None else "node-limited",
             max_nodes=max_nodes, seed=seed)
    # plan() draws each GPU's tokens in rank order from default_rng(seed).
    rng = np.random.default_rng(seed)
    R = N * G
    idx = [random_expert_sets(rng, T, E, K) if max_nodes is None else
           random_topk_node_limited(rng, T, E, K, num_nodes=N, max_nodes=max_nodes) for _ in range(R)]
    tirs = [ref.get_dispatch_layout(a, E, R, num_ranks_per_node=G).is_token_in_rank for a in idx]
    d = ref.internode_traffic(tirs, G, row_bytes(H, dtype))
    c = ref.internode_traffic(tirs, G, row_bytes(H, "bf16"))
    # A combine moves the dispatch's rows back: its sends are the dispatch's receives.
    for traffic, op, swap in [(d, p.epcomm_dispatch, False), (c, p.epcomm_combine, True)]:
        pairs = [("network_send", "net_recv" if swap else "net_send"),
                 ("network_recv", "net_send" if swap else "net_recv"),
                 ("nvlink_send", "nvl_recv" if swap else "nvl_send"),
                 ("nvlink_recv", "nvl_send" if swap else "nvl_recv")]
        for planned, mine in pairs:
            a = getattr(traffic, mine)
            assert getattr(op, planned).max == int(a.max()), (planned, mine)
            assert getattr(op, planned).mean == pytest.approx(float(a.mean()), rel=1e-12), (planned, mine)
