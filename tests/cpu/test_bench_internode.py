"""`epcomm bench internode` without a GPU: its arguments (rank count, --ranks-per-node, ranks
sharing a GPU), the route's rows and GB/s for a small routing counted by hand, the JSON entry and
the table of a fake run, the check gathering over the epcomm group, the node-first combine check
and the host start barrier of ranks sharing a GPU."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from epcomm import interop, reference
from epcomm.testing import random_topk
from epcomm.tools import bench, cli, spawn
from epcomm.tools.bench import defaults, driver
from epcomm.tools.bench.internode import OPS
from epcomm.tools.bench.report import report

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def gpus(monkeypatch):
    """Pretend ``n`` GPUs are visible, with EPCOMM_SHARE_GPU and EPCOMM_RANKS_PER_NODE unset."""
    monkeypatch.setenv("EPCOMM_GIT_COMMIT", "feedbeef")
    monkeypatch.setattr(driver, "gpu_name", lambda: "1x fake")
    monkeypatch.delenv("EPCOMM_SHARE_GPU", raising=False)
    monkeypatch.delenv("EPCOMM_RANKS_PER_NODE", raising=False)

    def set_visible(n: int):
        monkeypatch.setenv("EPCOMM_VISIBLE_GPUS", str(n))
    return set_visible


# ----------------------------------------------------------------------------- arguments


def test_cli_parses_internode_with_its_rank_count_and_node_size(monkeypatch):
    seen = []
    monkeypatch.setattr(driver, "main", lambda a: seen.append(a) or 0)
    assert cli.main(["bench", "internode", "--ranks", "4", "--ranks-per-node", "2", "--json", "x.json"]) == 0
    a = seen[-1]
    assert (a.what, a.gpus, a.ranks_per_node, a.iters, a.json) == ("internode", 4, 2, None, "x.json")
    assert cli.main(["bench", "internode"]) == 0  # defaults: every GPU, the node size decided by the driver
    assert (seen[-1].gpus, seen[-1].ranks_per_node) == (0, None)
    assert cli.main(["bench", "normal", "--gpus", "2"]) == 0 and seen[-1].gpus == 2  # the old spelling
    with pytest.raises(SystemExit):
        cli.main(["bench", "internode", "--ranks-per-node", "two"])


def test_internode_ranks_and_node_size(monkeypatch, gpus):
    ir = driver.internode_ranks
    # One rank per GPU; the default node size is half the ranks, at least 1.
    assert ir(0, 4, None) == (4, 2, False)
    assert ir(0, 2, None) == (2, 1, False)
    assert ir(0, 8, 4) == (8, 4, False) and ir(6, 8, 3) == (6, 3, False)
    monkeypatch.setenv("EPCOMM_RANKS_PER_NODE", "1")  # the environment's declaration, unless given
    assert ir(4, 4, None) == (4, 1, False) and ir(4, 4, 2) == (4, 2, False)
    monkeypatch.delenv("EPCOMM_RANKS_PER_NODE")
    # More ranks than GPUs only when sharing them is allowed; then they share.
    with pytest.raises(ValueError, match=r"--ranks 4: 1 GPU\(s\) visible.*EPCOMM_SHARE_GPU=1"):
        ir(4, 1, 2)
    with pytest.raises(ValueError, match="2 or more ranks"):
        ir(0, 1, None)
    monkeypatch.setenv("EPCOMM_SHARE_GPU", "1")
    assert ir(4, 1, 2) == (4, 2, True) and ir(4, 1, None) == (4, 2, True) and ir(4, 2, None) == (4, 2, True)
    assert ir(8, 1, 4) == (8, 4, True)
    for P, words in ((4, "one node"), (3, "does not divide"), (0, "ranks_per_node"), (5, "does not divide")):
        with pytest.raises(ValueError, match=f"--ranks-per-node {P} with 4 ranks: .*{words}"):
            ir(4, 1, P)
    with pytest.raises(ValueError, match="--ranks 32: the checks .* at most 16 ranks"):
        ir(32, 1, 4)  # the checks' exact combine input (NormalCheck) stops there
    with pytest.raises(ValueError, match="--ranks -1"):
        ir(-1, 1, None)
    with pytest.raises(ValueError, match="no GPU visible"):
        ir(4, 0, 2)


def test_run_refuses_internode_arguments_before_spawning(monkeypatch, gpus):
    gpus(1)
    monkeypatch.setattr(spawn, "run", lambda *a, **k: pytest.fail("spawned"))
    with pytest.raises(ValueError, match="--ranks 4: 1 GPU"):
        bench.run("internode", 4, ranks_per_node=2)
    with pytest.raises(ValueError, match="--ranks-per-node: only `epcomm bench internode`"):
        bench.run("normal", 0, ranks_per_node=2)
    monkeypatch.setenv("EPCOMM_SHARE_GPU", "1")
    with pytest.raises(ValueError, match="--ranks-per-node 3 with 4 ranks"):
        bench.run("internode", 4, ranks_per_node=3)
    with pytest.raises(ValueError, match="--iters 0"):
        bench.run("internode", 4, ranks_per_node=2, iters=0)


def test_cli_refuses_more_ranks_than_gpus_without_sharing(tmp_path):
    pytest.importorskip("torch")  # without it `epcomm bench` stops first, saying it needs torch
    env = {k: v for k, v in os.environ.items() if k not in ("EPCOMM_SHARE_GPU", "EPCOMM_RANKS_PER_NODE")}
    env.update(EPCOMM_CACHE_DIR=str(tmp_path / "c"), EPCOMM_VISIBLE_GPUS="1", PYTHONPATH=str(ROOT))
    r = subprocess.run([sys.executable, "-m", "epcomm.tools.cli", "bench", "internode", "--ranks", "4",
                        "--ranks-per-node", "2"], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 2 and "--ranks 4: 1 GPU(s) visible" in r.stderr, r.stdout + r.stderr


# ----------------------------------------------------------------------------- the route's bytes

# 4 ranks in 2 nodes of 2, 8 experts (rank r holds experts 2r and 2r + 1), 3 tokens each, top-2.
_TOPK = [np.array(t, dtype=np.int64) for t in (
    [[0, 2], [4, 6], [1, 7]],      # rank 0: to ranks {0,1}, {2,3}, {0,3}
    [[5, -1], [-1, -1], [3, 4]],   # rank 1: {2}, none, {1,2}
    [[0, 6], [2, 3], [4, 5]],      # rank 2: {0,3}, {1}, {2}
    [[7, -1], [0, 1], [2, 6]],     # rank 3: {3}, {0}, {1,3}
)]
# Counted by hand along the route: a token crosses to another node once, to the rank of its
# sender's local index there, which forwards it over NVLink to the other ranks of that node it
# goes to; inside its own node the sender forwards it.  Each sender's tokens cross to the other
# node twice; e.g. rank 2's NVLink sends: rank 0's tokens 1 and 2 forwarded to rank 3, and its
# own token 0 to rank 3.
_ROWS = {"recv": [4, 4, 4, 5], "deepep_rdma": [4, 3, 4, 4], "net_send": [2, 2, 2, 2], "net_recv": [2, 2, 2, 2],
         "nvl_send": [2, 1, 3, 2], "nvl_recv": [1, 2, 2, 3]}


def test_route_rows_of_a_small_routing():
    got = bench.internode_route_rows(_TOPK, 8, 2)
    assert {k: v.tolist() for k, v in got.items()} == _ROWS
    # One node per rank: everything crosses between nodes, nothing is forwarded over NVLink.
    flat = bench.internode_route_rows(_TOPK, 8, 1)
    assert flat["nvl_send"].tolist() == [0, 0, 0, 0] == flat["nvl_recv"].tolist()
    assert flat["net_recv"].tolist() == [r - o for r, o in zip(_ROWS["recv"], (2, 1, 1, 2))]  # less the own rows
    with pytest.raises(ValueError):
        bench.internode_route_rows(_TOPK, 8, 3)  # 3 does not divide 4 ranks


def test_op_rates_in_each_accounting_and_the_combine_reverses_the_links():
    rank3 = {k: v[3] for k, v in _ROWS.items()}
    d = bench.internode_op_rates(rank3, 1000, 2.0)  # 1000-byte rows in 2 us: 0.5 GB/s per row
    assert d["route_bytes"] == {"net_send": 2000, "net_recv": 2000, "nvl_send": 2000, "nvl_recv": 3000}
    assert (d["GBps"], d["rdma_GBps"], d["net_GBps"], d["nvl_GBps"]) == (2.5, 2.0, 1.0, 1.5)
    c = bench.internode_op_rates(rank3, 1000, 2.0, combine=True)
    assert c["route_bytes"] == {"net_send": 2000, "net_recv": 2000, "nvl_send": 3000, "nvl_recv": 2000}
    assert (c["GBps"], c["rdma_GBps"], c["nvl_GBps"]) == (2.5, 2.0, 1.5)
    rank1 = bench.internode_op_rates({k: v[1] for k, v in _ROWS.items()}, 1000, 2.0)
    assert rank1["route_bytes"]["nvl_send"] == 1000 and rank1["nvl_GBps"] == 1.0 and rank1["rdma_GBps"] == 1.5
    assert np.isnan(bench.internode_op_rates(rank3, 1000, float("nan"))["GBps"])


# ----------------------------------------------------------------------------- JSON and table


def _fake_rank(rank: int, P: int, check_combine: str = "ok") -> dict:
    """What internode_worker returns, with made-up times."""
    rows = {k: v[rank] for k, v in _ROWS.items()}
    out = {"rank": rank, "ranks_per_node": P, "nodes": 4 // P, "shares_gpu": True, "nvl_bytes": 240_000_000,
           "rdma_bytes": 720_000_000, "num_sms": 24, "env": {"EPCOMM_RANKS_PER_NODE": str(P)},
           "route_rows": rows, "recv_rows": rows["recv"], "nccl_skipped": "not run: ranks share a GPU",
           "aligner": {"mode": "host"},
           "check": {"dispatch_bf16": "ok", "dispatch_fp8": "ok", "combine": check_combine}}
    for i, (name, fmt, comb) in enumerate(OPS):
        us = 1000.0 + 100 * i + rank
        out[f"{name}_us"] = us
        rates = bench.internode_op_rates(rows, bench.normal_row_bytes(7168)[fmt], us, comb)
        out.update({f"{name}_{k}": v for k, v in rates.items()})
    return out


def test_a_run_on_ranks_sharing_a_gpu_is_recorded_and_printed_as_such(tmp_path, monkeypatch, gpus, capsys):
    gpus(1)
    monkeypatch.setenv("EPCOMM_SHARE_GPU", "1")
    calls = []

    def fake_run(fn, n, args, timeout, env):
        calls.append((fn, n, dict(args), env))
        return [_fake_rank(r, args["ranks_per_node"]) for r in range(n)]
    monkeypatch.setattr(spawn, "run", fake_run)
    path = tmp_path / "bench.json"
    res = bench.run("internode", 4, ranks_per_node=2, json_path=str(path), report=report)
    (fn, n, args, env), = calls
    assert fn is bench.internode_worker and n == 4
    assert env == {"EPCOMM_CHECK_INDICES": "0", "EPCOMM_RANKS_PER_NODE": "2"}
    assert (args["ranks_per_node"], args["nodes"], args["share_gpu"], args["iters"], args["tokens"]) == (
        2, 2, True, defaults.SHARED_GPU_ITERS, defaults.NORMAL_TOKENS)
    got = json.loads(path.read_text())
    assert got == json.loads(json.dumps(res, default=str)) and set(got) == {"meta", "internode"}
    e = got["internode"]
    assert (e["ranks_per_node"], e["nodes"], e["shares_gpu"]) == (2, 2, True)
    assert e["note"] == bench.SHARED_GPU_NOTE and "mean nothing" in e["note"]
    assert e["check"] == {"dispatch_bf16": "ok", "dispatch_fp8": "ok", "combine": "ok"}
    assert e["ranks"][3]["dispatch_bf16_route_bytes"]["nvl_recv"] == 3 * 14336
    assert got["meta"]["worker_env"]["internode"] == {"EPCOMM_RANKS_PER_NODE": "2"}
    out = capsys.readouterr().out
    assert "internode (2 declared nodes of 2 ranks): 4096 tokens/rank" in out
    assert f"!!! {bench.SHARED_GPU_NOTE}" in out
    line = next(ln for ln in out.splitlines() if ln.startswith("dispatch_bf16 "))
    assert "1001.5 [1000.0-1003.0]" in line  # mean [min-max] of the ranks' medians
    assert "route bytes per rank, MB" in out and "NCCL baseline: not run" in out
    assert "aligner: rank 0: host" in out and "check against epcomm.reference: ok" in out


def test_internode_on_one_gpu_per_rank_and_a_failed_check(tmp_path, monkeypatch, gpus, capsys):
    pytest.importorskip("torch")  # without it `epcomm bench` stops first, saying it needs torch
    gpus(2)
    seen = []

    def fake_run(fn, n, args, timeout, env):
        seen.append((args, env))
        return [dict(_fake_rank(r, 1, "combined_x: 1 of 9 elements differ" if r else "ok"), shares_gpu=False)
                for r in range(n)]
    monkeypatch.setattr(spawn, "run", fake_run)
    path = tmp_path / "b.json"
    a = SimpleNamespace(what="internode", gpus=0, tokens=None, hidden=7168, topk=8, experts=256, sms=(24,), iters=None,
                        timeout=60.0, aligner="clock", ranks_per_node=None, json=str(path))
    assert driver.main(a) == 1  # a failed check fails the run
    args, env = seen[0]
    assert (args["ranks_per_node"], args["share_gpu"], args["iters"]) == (1, False, defaults.ITERS)
    assert env["EPCOMM_RANKS_PER_NODE"] == "1"
    e = json.loads(path.read_text())["internode"]
    assert e["shares_gpu"] is False and "note" not in e and (e["ranks_per_node"], e["nodes"]) == (1, 2)
    assert e["check"]["combine"] == "rank 1: combined_x: 1 of 9 elements differ"
    captured = capsys.readouterr()
    assert "!!! CHECK FAILED internode combine" in captured.out and "mean nothing" not in captured.out
    assert "internode failed or did not pass its checks" in captured.err


# ----------------------------------------------------------------------------- checks, aligner


class _TwoRanks:
    """The epcomm group of rank ``rank`` of 2, whose peer publishes ``peer``'s bytes."""

    def __init__(self, rank: int, peer: dict):
        self.rank, self.size, self.peer = rank, 2, peer

    def allgather_bytes(self, data: bytes) -> list[bytes]:
        other = self.peer.pop(0)
        return [data, other] if self.rank == 0 else [other, data]


def test_checks_gather_over_the_group_without_nccl():
    torch = pytest.importorskip("torch")
    mine = [torch.randn(5, 256).to(torch.bfloat16), torch.arange(10, dtype=torch.int64).reshape(5, 2),
            torch.rand(5, 2), torch.randn(5, 256).to(torch.float8_e4m3fn).view(torch.uint8)]
    theirs = [t.clone() + 1 if t.dtype != torch.uint8 else t.clone() ^ 3 for t in mine]
    for rank in (0, 1):
        gather = bench.gatherer(torch, None, _TwoRanks(rank, [bytes(t.reshape(-1).view(torch.uint8).numpy())
                                                               for t in theirs]))
        for a, b in zip(mine, theirs):
            got = gather("t", a)
            assert got.dtype == a.dtype and tuple(got.shape) == (2, *a.shape)
            want = torch.stack([a, b] if rank == 0 else [b, a])
            assert torch.equal(got.view(torch.uint8), want.view(torch.uint8))


def test_normal_check_across_nodes_expects_the_node_first_combine():
    torch = pytest.importorskip("torch")
    R, P, N, H, E, K, rank = 4, 2, 40, 256, 8, 3, 2
    rng = np.random.default_rng(5)
    gen = torch.Generator().manual_seed(5)
    per = []
    for _ in range(R):
        x = torch.randn(N, H, generator=gen).to(torch.bfloat16)
        per.append(dict(x=x, xq=x.float().to(torch.float8_e4m3fn), xs=torch.rand(N, H // 128, generator=gen) + 0.5,
                        topk=torch.from_numpy(random_topk(rng, N, E, K)), w=torch.rand(N, K, generator=gen)))

    def gather(name, t):
        return torch.stack([p[name].view(torch.uint8) if name == "xq" else p[name] for p in per])
    me = per[rank]
    chk = bench.NormalCheck(torch, gather, rank, R, me["x"], me["xq"], me["xs"], me["topk"], me["w"], E,
                            num_ranks_per_node=P)
    assert chk.error is None and chk.rpn == P
    assert np.array_equal(chk.topk_all, np.stack([p["topk"].numpy() for p in per]))
    ref = reference.dispatch([interop.to_numpy(p["x"]) for p in per], E, topk_idx=[p["topk"].numpy() for p in per],
                             topk_weights=[p["w"].numpy() for p in per])
    ys = [(r.recv_x.astype(np.float32) * np.float32(2.0 ** d)).astype(reference.BF16) for d, r in enumerate(ref)]
    comb = reference.combine(ys, [r.handle for r in ref], num_ranks_per_node=P)[rank][0]
    got = interop.from_numpy("torch", comb, "cpu")
    assert chk.combine(got) == "ok"
    got.view(torch.int16)[1, 3] ^= 1
    assert chk.combine(got).startswith("combined_x: 1 of")


def test_host_aligner_synchronises_then_waits_for_every_rank():
    steps = []
    torch = SimpleNamespace(cuda=SimpleNamespace(synchronize=lambda: steps.append("sync")))
    al = bench.HostAligner(torch, SimpleNamespace(barrier=lambda: steps.append("barrier")))
    al()
    al()
    assert steps == ["sync", "barrier"] * 2
    assert al.summary()["mode"] == "host" and "share a GPU" in al.summary()["why"]
    al.close()
