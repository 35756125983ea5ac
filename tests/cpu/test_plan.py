"""`epcomm plan`: exact row counts of epcomm's hierarchical route and of a flat all-to-all (hand
computed cases, a set-based recount of random routings, invariants), the seeded routing
generators, plan()'s bytes, times and receive bounds, its argument errors, and the CLI."""
from __future__ import annotations

import json
import time

import numpy as np
import pytest

from epcomm.testing import random_expert_sets, random_topk_node_limited
from epcomm.tools import cli
from epcomm.tools.plan import count_rows, format_table, plan, receive_bound_rows, row_bytes

KEYS = [(r, k, d) for r in ("epcomm", "flat") for k in ("network", "nvlink") for d in ("send", "recv")]


def _rows(c) -> dict:
    return {k: c.rows[k].tolist() for k in KEYS}


def _recount(topk_idx, G, E) -> dict:
    """The routes' rows, counted token by token with sets (the definition, written differently)."""
    R = topk_idx.shape[0]
    L = E // R
    out = {k: [0] * R for k in KEYS}

    def move(route, link, a, b):
        out[route, link, "send"][a] += 1
        out[route, link, "recv"][b] += 1

    for r in range(R):
        n, loc = divmod(r, G)
        for row in topk_idx[r]:
            ranks = {int(e) // L for e in row if e >= 0}
            for d in ranks - {r}:
                move("flat", "network" if d // G != n else "nvlink", r, d)
            for m in {d // G for d in ranks} - {n}:
                move("epcomm", "network", r, m * G + loc)
            for d in ranks:
                if d % G != loc:
                    move("epcomm", "nvlink", (d // G) * G + loc, d)
    return out


# ----------------------------------------------------------------------------- exact counts


def test_hand_computed_two_nodes_of_two_gpus():
    # ranks 0=(node 0, gpu 0), 1=(0, 1), 2=(1, 0), 3=(1, 1); expert e on rank e
    idx = np.full((4, 2, 2), -1)
    idx[0, 0] = [2, 3]   # rank 0 -> node 1 (ranks 2 and 3)
    idx[0, 1] = [0, 1]   # rank 0 -> itself and rank 1
    idx[3, 0] = [1, 3]   # rank 3 -> rank 1 (node 0) and itself
    c = count_rows(idx, gpus_per_node=2, experts=4)
    # flat: 0->2, 0->3, 3->1 over the network, 0->1 over NVLink
    # epcomm: 0->2 over the network, 2 forwards to 3; 0->1 over NVLink; 3->1 over the network, nothing forwarded
    assert _rows(c) == {
        ("flat", "network", "send"): [2, 0, 0, 1], ("flat", "network", "recv"): [0, 1, 1, 1],
        ("flat", "nvlink", "send"): [1, 0, 0, 0], ("flat", "nvlink", "recv"): [0, 1, 0, 0],
        ("epcomm", "network", "send"): [1, 0, 0, 1], ("epcomm", "network", "recv"): [0, 1, 1, 0],
        ("epcomm", "nvlink", "send"): [1, 0, 1, 0], ("epcomm", "nvlink", "recv"): [0, 1, 0, 1],
    }
    assert c.node_pairs.tolist() == [2, 0, 0, 2]
    assert (c.token_ranks, c.token_nodes, c.tokens) == (6, 4, 8)


def test_a_token_counts_once_per_destination_rank():
    # 2 experts per rank: experts 4 and 5 both live on rank 2
    idx = np.full((4, 1, 3), -1)
    idx[0, 0] = [4, 5, 7]
    c = count_rows(idx, gpus_per_node=2, experts=8)
    assert c.rows["flat", "network", "send"].tolist() == [2, 0, 0, 0]
    assert c.rows["flat", "network", "recv"].tolist() == [0, 0, 1, 1]
    assert c.rows["epcomm", "network", "recv"].tolist() == [0, 0, 1, 0]
    assert c.rows["epcomm", "nvlink", "recv"].tolist() == [0, 0, 0, 1]


@pytest.mark.parametrize("N,G,E,K,T", [(2, 2, 8, 3, 20), (3, 4, 24, 5, 16), (4, 1, 8, 2, 12), (1, 4, 8, 4, 10)])
def test_counts_match_a_token_by_token_recount(N, G, E, K, T):
    rng = np.random.default_rng(N * 100 + G)
    idx = np.stack([random_expert_sets(rng, T, E, K) for _ in range(N * G)])
    idx[rng.random(idx.shape) < 0.1] = -1
    assert _rows(count_rows(idx, G, E)) == _recount(idx, G, E)


@pytest.mark.parametrize("seed", range(5))
def test_invariants_of_the_routes(seed):
    rng = np.random.default_rng(seed)
    N, G, E, K, T = 4, 4, 32, 6, 50
    idx = np.stack([random_expert_sets(rng, T, E, K) for _ in range(N * G)])
    c = count_rows(idx, G, E)
    # the flat route crosses the network once per remote rank, epcomm's once per remote node
    assert (c.rows["flat", "network", "send"] >= c.rows["epcomm", "network", "send"]).all()
    assert c.rows["flat", "network", "send"].sum() > c.rows["epcomm", "network", "send"].sum()
    # every row sent is received
    for route in ("epcomm", "flat"):
        for link in ("network", "nvlink"):
            assert c.rows[route, link, "send"].sum() == c.rows[route, link, "recv"].sum()
    # flat: each distinct destination rank other than the source gets the row once
    others = sum(len({e // (E // (N * G)) for e in idx[r, t]} - {r}) for r in range(N * G) for t in range(T))
    assert c.rows["flat", "network", "recv"].sum() + c.rows["flat", "nvlink", "recv"].sum() == others
    own = sum(r in {e // (E // (N * G)) for e in idx[r, t]} for r in range(N * G) for t in range(T))
    assert c.token_ranks == others + own


def test_receive_bounds_are_reached_by_the_worst_routing():
    N, G, T, E = 3, 4, 5, 12
    # every token of every source to expert 0 (rank 0): dispatch receives reach the bound
    idx = np.zeros((N * G, T, 1), np.int64)
    c = count_rows(idx, G, E)
    for route in ("epcomm", "flat"):
        bound = receive_bound_rows(route, N, G, T, 1, None)
        for link in ("network", "nvlink"):
            assert c.rows[route, link, "recv"][0] == bound["dispatch", link]
            assert c.rows[route, link, "recv"].max() <= bound["dispatch", link]
    # the tokens of each node's GPU 0 to every other rank: rank 0's combine receives reach the bound
    # (it gets back rows from every other node and, as the entry of node 0, from each other GPU there)
    idx = np.full((N * G, T, N * G - 1), -1)
    for m in range(N):
        idx[m * G] = np.delete(np.arange(N * G), m * G)
    c = count_rows(idx, G, E)
    for route in ("epcomm", "flat"):
        bound = receive_bound_rows(route, N, G, T, N * G - 1, None)
        for link in ("network", "nvlink"):
            assert c.rows[route, link, "send"][0] == bound["combine", link]


def test_count_rows_rejects_bad_routings():
    with pytest.raises(TypeError, match="topk_idx"):
        count_rows(np.zeros((4, 2)), 2, 4)
    with pytest.raises(ValueError, match="gpus_per_node=3"):
        count_rows(np.zeros((4, 2, 1), np.int64), 3, 12)
    with pytest.raises(ValueError, match="expert index 4"):
        count_rows(np.full((4, 2, 1), 4), 2, 4)


# ----------------------------------------------------------------------------- routing generators


def test_random_expert_sets_are_distinct_uniform_and_seeded():
    a = random_expert_sets(np.random.default_rng(3), 60000, 6, 3)
    assert a.dtype == np.int64 and a.shape == (60000, 3) and a.min() >= 0 and a.max() < 6
    assert (np.sort(a, axis=1)[:, 1:] != np.sort(a, axis=1)[:, :-1]).all()
    _, counts = np.unique(np.sort(a, axis=1), axis=0, return_counts=True)
    assert len(counts) == 20 and abs(counts / 3000 - 1).max() < 0.1   # C(6, 3) subsets, 3000 expected each
    assert (random_expert_sets(np.random.default_rng(3), 100, 50, 8)
            == random_expert_sets(np.random.default_rng(3), 100, 50, 8)).all()
    assert (np.sort(random_expert_sets(np.random.default_rng(0), 4, 5, 5), axis=1) == np.arange(5)).all()
    with pytest.raises(ValueError, match="topk=4"):
        random_expert_sets(np.random.default_rng(0), 4, 3, 4)


@pytest.mark.parametrize("nodes,M,K", [(8, 4, 8), (8, 1, 8), (4, 2, 3), (2, 4, 8), (16, 4, 4)])
def test_node_limited_routing_stays_within_max_nodes(nodes, M, K):
    E = 256
    a = random_topk_node_limited(np.random.default_rng(1), 5000, E, K, num_nodes=nodes, max_nodes=M)
    assert a.shape == (5000, K) and a.min() >= 0 and a.max() < E
    srt = np.sort(a, axis=1)
    assert (srt[:, 1:] != srt[:, :-1]).all()
    used = np.sort(a // (E // nodes), axis=1)
    per_token = 1 + (used[:, 1:] != used[:, :-1]).sum(axis=1)
    assert per_token.max() == min(M, nodes, K)
    same = random_topk_node_limited(np.random.default_rng(1), 5000, E, K, num_nodes=nodes, max_nodes=M)
    assert (same == a).all()


def test_node_limited_routing_rejects_impossible_shapes():
    with pytest.raises(ValueError, match="topk=9"):
        random_topk_node_limited(np.random.default_rng(0), 4, 16, 9, num_nodes=4, max_nodes=2)
    with pytest.raises(ValueError, match="num_nodes=3"):
        random_topk_node_limited(np.random.default_rng(0), 4, 16, 2, num_nodes=3, max_nodes=2)
    with pytest.raises(ValueError, match="max_nodes=0"):
        random_topk_node_limited(np.random.default_rng(0), 4, 16, 2, num_nodes=4, max_nodes=0)


# ----------------------------------------------------------------------------- plan()

SHAPE = dict(nodes=4, gpus_per_node=4, tokens=256, hidden=512, topk=8, experts=64)


def test_row_bytes():
    assert row_bytes(7168, "bf16") == 14336
    assert row_bytes(7168, "fp8") == 7168 + 4 * 56


def test_plan_bytes_times_and_seeds():
    p = plan(**SHAPE, dtype="fp8", routing="node-limited", max_nodes=2, nic_gbps=40.0, nvlink_gbps=200.0, seed=5)
    assert p == plan(**SHAPE, dtype="fp8", routing="node-limited", max_nodes=2, nic_gbps=40.0, nvlink_gbps=200.0,
                     seed=5)
    assert p != plan(**SHAPE, dtype="fp8", routing="node-limited", max_nodes=2, nic_gbps=40.0, nvlink_gbps=200.0,
                     seed=6)
    assert (p.dispatch_row_bytes, p.combine_row_bytes) == (512 + 16, 1024)
    assert 1 < p.mean_nodes_per_token <= 2
    for t, nic, nvl in ((p.epcomm_dispatch, 40, 200), (p.flat_combine, 40, 200)):
        t_net = max(t.network_send.max, t.network_recv.max) / (nic * 1e3)
        t_nvl = max(t.nvlink_send.max, t.nvlink_recv.max) / (nvl * 1e3)
        assert t.time_us == max(t_net, t_nvl) and t.bound_by == ("network" if t_net >= t_nvl else "nvlink")
    assert p.flat_dispatch.network_send.mean > p.epcomm_dispatch.network_send.mean
    assert p.deepep_rdma_gbps == pytest.approx(p.deepep_rdma_bytes / (p.epcomm_dispatch.time_us * 1e3))
    assert p.deepep_combine_rdma_gbps == pytest.approx(p.deepep_rdma_bytes * 1024 / 528 / (p.epcomm_combine.time_us * 1e3))
    # DeepEP's pairs count the own node: more than the network rows, at most the nodes per token
    assert p.epcomm_dispatch.network_send.mean < p.deepep_rdma_bytes
    assert p.deepep_rdma_bytes == pytest.approx(p.mean_nodes_per_token * SHAPE["tokens"] * p.dispatch_row_bytes)


def test_combine_mirrors_dispatch_with_bf16_rows():
    for dtype in ("bf16", "fp8"):
        p = plan(**SHAPE, dtype=dtype, seed=1)
        scale = p.combine_row_bytes / p.dispatch_row_bytes
        for d, c in ((p.epcomm_dispatch, p.epcomm_combine), (p.flat_dispatch, p.flat_combine)):
            assert c.network_send.max == d.network_recv.max * scale and c.network_recv.max == d.network_send.max * scale
            assert c.nvlink_send.max == d.nvlink_recv.max * scale and c.nvlink_recv.max == d.nvlink_send.max * scale
            assert c.network_send.mean == pytest.approx(d.network_recv.mean * scale)
        if dtype == "bf16":
            assert p.epcomm_combine.time_us == p.epcomm_dispatch.time_us


def test_receive_sizes_hold_under_their_bounds():
    for routing, m in (("uniform", None), ("node-limited", 1), ("node-limited", 3)):
        p = plan(**SHAPE, routing=routing, max_nodes=m, seed=2)
        for b, t_d, t_c in ((p.epcomm_buffers, p.epcomm_dispatch, p.epcomm_combine),
                            (p.flat_buffers, p.flat_dispatch, p.flat_combine)):
            assert b.dispatch_network.routed == t_d.network_recv.max and b.combine_nvlink.routed == t_c.nvlink_recv.max
            for s in (b.dispatch_network, b.dispatch_nvlink, b.combine_network, b.combine_nvlink):
                assert 0 <= s.routed <= s.any_routing


def test_one_node_sends_nothing_over_the_network():
    p = plan(1, 8, 128, 256, 4, 32)
    for t in (p.epcomm_dispatch, p.epcomm_combine, p.flat_dispatch, p.flat_combine):
        assert t.network_send.max == t.network_recv.max == 0 and t.bound_by == "nvlink"
    assert p.epcomm_dispatch == p.flat_dispatch   # inside one node the routes agree
    p = plan(1, 1, 16, 256, 2, 4)
    assert p.epcomm_dispatch.time_us == 0 and p.epcomm_dispatch.bound_by == "none" and p.deepep_rdma_gbps is None
    assert p.deepep_combine_rdma_gbps is None


def test_max_nodes_one_crosses_the_network_at_most_once_per_token():
    p = plan(**dict(SHAPE, topk=4), routing="node-limited", max_nodes=1)
    assert p.mean_nodes_per_token == 1
    assert p.epcomm_dispatch.network_send.max <= SHAPE["tokens"] * p.dispatch_row_bytes


@pytest.mark.parametrize("kw,exc,match", [
    (dict(nodes=0), ValueError, "nodes=0"),
    (dict(gpus_per_node=2.0), TypeError, "gpus_per_node"),
    (dict(tokens=0), ValueError, "tokens=0"),
    (dict(hidden=100), ValueError, "hidden=100"),
    (dict(hidden=512 + 8, dtype="fp8"), ValueError, "FP8 hidden=520"),
    (dict(topk=65), ValueError, "topk=65"),
    (dict(experts=72), ValueError, "nodes\\*gpus_per_node=16"),
    (dict(dtype="fp16"), ValueError, "dtype='fp16'"),
    (dict(routing="zipf"), ValueError, "routing='zipf'"),
    (dict(routing="node-limited"), ValueError, "needs max_nodes"),
    (dict(max_nodes=2), ValueError, "max_nodes applies"),
    (dict(routing="node-limited", max_nodes=0), ValueError, "max_nodes=0"),
    (dict(routing="node-limited", max_nodes=1, topk=17), ValueError, "topk=17"),
    (dict(nic_gbps=0), ValueError, "nic_gbps=0"),
    (dict(nvlink_gbps="160"), TypeError, "nvlink_gbps"),
    (dict(seed=-1), ValueError, "seed=-1"),
])
def test_plan_argument_errors(kw, exc, match):
    with pytest.raises(exc, match=match):
        plan(**{**SHAPE, **kw})


def test_the_largest_shape_counts_in_seconds():
    t0 = time.perf_counter()
    p = plan(64, 8, 4096, 7168, 8, 512, dtype="fp8", routing="node-limited", max_nodes=4)
    assert time.perf_counter() - t0 < 15
    assert p.mean_nodes_per_token <= 4


# ----------------------------------------------------------------------------- CLI

ARGS = ["plan", "--nodes", "2", "--gpus-per-node", "4", "--tokens", "64", "--hidden", "256", "--topk", "4",
        "--experts", "16"]


def test_cli_prints_the_tables_and_writes_json(tmp_path, capsys):
    path = tmp_path / "plan.json"
    assert cli.main([*ARGS, "--dtype", "fp8", "--routing", "node-limited", "--max-nodes", "1", "--seed", "3",
                     "--nic-gbps", "25", "--json", str(path)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("epcomm plan: 2 nodes x 4 GPUs (8 ranks)")
    lines = out.splitlines()
    head = next(i for i, s in enumerate(lines) if s.startswith("route / op"))
    assert "lower bound us" in lines[head] and set(lines[head + 1]) <= {"-", " "}
    assert [s.split("  ")[0] for s in lines[head + 2:head + 6]] == ["epcomm dispatch", "epcomm combine",
                                                                    "flat dispatch", "flat combine"]
    want = plan(2, 4, 64, 256, 4, 16, dtype="fp8", routing="node-limited", max_nodes=1, nic_gbps=25, seed=3)
    assert json.loads(path.read_text()) == json.loads(json.dumps(want.to_dict()))
    assert format_table(want) in out


@pytest.mark.parametrize("extra,match", [(["--dtype", "e5m2"], "dtype='e5m2'"),
                                         (["--routing", "node-limited"], "needs max_nodes"),
                                         (["--nic-gbps", "-1"], "nic_gbps=-1")])
def test_cli_errors_are_one_line_and_exit_2(extra, match, capsys):
    assert cli.main([*ARGS, *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith("epcomm plan: ") and match in err and err.count("\n") == 1
