"""Tests of epcomm.runtime.group on CPU: FileGroup, TorchGroup (gloo), JaxGroup, MPIGroup, as_group.

Multi-process tests spawn one process per rank; each rank checks its own results and
reports ("ok" | "fail" | "skip", detail) on a queue.  Every run has a hard deadline:
ranks still alive after it are killed and the test fails naming them.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import queue as queue_mod
import random
import socket
import sys
import time
import traceback

import pytest

from epcomm.errors import EpcommTimeoutError
from epcomm.runtime.group import FileGroup, LocalGroup, as_group, init_from_env

# --------------------------------------------------------------------------- harness


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(fn, rank, args, q):
    try:
        res = fn(rank, *args)
        q.put((rank, "ok", res))
    except _Skip as e:
        q.put((rank, "skip", str(e)))
    except BaseException:
        q.put((rank, "fail", traceback.format_exc()))


class _Skip(Exception):
    pass


def _run_ranks(fn, size, args=(), timeout=30.0):
    """Run fn(rank, *args) in `size` spawned processes; return {rank: result}.

    Fails the test if a rank raised, reported nothing, or hung past `timeout`; skips it
    if any rank raised _Skip.
    """
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_entry, args=(fn, r, args, q), daemon=True) for r in range(size)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + timeout
    reports = {}
    while len(reports) < size:
        left = deadline - time.monotonic()
        if left <= 0:
            break
        try:
            rank, status, detail = q.get(timeout=min(left, 0.5))
            reports[rank] = (status, detail)
        except queue_mod.Empty:
            # a rank that died without reporting will never report; stop waiting for it
            if all(not p.is_alive() for p in procs) and q.empty():
                break
    hung = []
    for r, p in enumerate(procs):
        p.join(timeout=max(0.1, deadline - time.monotonic()) if r not in reports else 5.0)
        if p.is_alive():
            hung.append(r)
            p.kill()
            p.join(5.0)
    failures = [f"rank {r}:\n{d}" for r, (s, d) in sorted(reports.items()) if s == "fail"]
    silent = [r for r in range(size) if r not in reports and r not in hung]
    msg = []
    if hung:
        msg.append(f"ranks {hung} hung (killed after {timeout:g} s)")
    if silent:
        codes = {r: procs[r].exitcode for r in silent}
        msg.append(f"ranks {silent} exited without reporting (exit codes {codes})")
    if failures:
        msg.append("\n".join(failures))
    if msg:
        pytest.fail("\n".join(msg))
    skips = [d for s, d in reports.values() if s == "skip"]
    if skips:
        pytest.skip(skips[0])
    return {r: d for r, (s, d) in reports.items()}


def _payload(seed: str, rnd: int, rank: int) -> bytes:
    # deterministic, so every rank knows what every other rank must have sent;
    # lengths differ per rank and round, and include 0
    rng = random.Random(f"{seed}/{rnd}/{rank}")
    return rng.randbytes(rng.choice([0, 1, 7, 64, 1000, 4096 + rank]))


def _check_collectives(g, seed: str, rounds: int = 3, root: int = 2):
    """Exercise a group the same way on every rank; raise AssertionError on any mismatch."""
    assert 0 <= g.rank < g.size
    for rnd in range(rounds):
        got = g.allgather_bytes(_payload(seed, rnd, g.rank))
        want = [_payload(seed, rnd, r) for r in range(g.size)]
        assert isinstance(got, list) and all(type(b) is bytes for b in got)
        assert got == want, f"allgather round {rnd} mismatch on rank {g.rank}"
    root = root % g.size
    msg = _payload(seed, 99, root)
    got = g.broadcast_bytes(msg if g.rank == root else None, root=root)
    assert type(got) is bytes and got == msg, f"broadcast from {root} mismatch on rank {g.rank}"
    g.barrier()
    got = g.allgather_bytes(bytes([g.rank]) * (g.rank + 1))
    assert got == [bytes([r]) * (r + 1) for r in range(g.size)]
    g.barrier()


# --------------------------------------------------------------------------- FileGroup


def _file_worker(rank, path, size, seed):
    g = FileGroup(path, rank, size, timeout_s=20)
    assert as_group(g) is g
    _check_collectives(g, seed)
    return g._seq


def test_file_group_four_processes(tmp_path):
    d = tmp_path / "grp"
    res = _run_ranks(_file_worker, 4, (str(d), 4, "file"), timeout=40)
    last = res[0] - 1
    assert set(res.values()) == {res[0]}
    # every round before the last barrier has been read by all ranks and must be gone; the
    # ranks' claim files stay (the directory belongs to this job)
    assert sorted(os.listdir(d)) == [f".rank{r}.claim" for r in range(4)] + [str(last)]


def test_file_group_timeout_names_rank_round_and_missing(tmp_path):
    g = FileGroup(tmp_path, 0, 2, timeout_s=0.3)
    t0 = time.monotonic()
    with pytest.raises(EpcommTimeoutError) as ei:
        g.allgather_bytes(b"hello")
    assert time.monotonic() - t0 < 3.0
    msg = str(ei.value)
    assert "rank 0" in msg and "group allgather round 0" in msg and "[1]" in msg, msg
    assert ei.value.rank == 0 and ei.value.peer == 1
    assert ei.value.phase == "group allgather round 0"
    assert isinstance(ei.value, TimeoutError)


def test_file_group_broadcast_timeout_and_env_default(tmp_path, monkeypatch):
    monkeypatch.setenv("EPCOMM_GROUP_TIMEOUT_S", "0.2")
    monkeypatch.setenv("EPCOMM_TIMEOUT_S", "1000")  # the kernels' timeout: not the groups'
    g = FileGroup(tmp_path, 0, 3)
    with pytest.raises(EpcommTimeoutError) as ei:
        g.broadcast_bytes(None, root=2)
    msg = str(ei.value)
    assert "rank 0" in msg and "round 0" in msg and "[2]" in msg, msg
    # the next call uses the next round, so a late root cannot be mistaken for it
    with pytest.raises(EpcommTimeoutError, match="group allgather round 1"):
        g.barrier()


def test_file_group_argument_errors(tmp_path):
    with pytest.raises(ValueError):
        FileGroup(tmp_path, 2, 2)
    g = FileGroup(tmp_path / "a", 0, 2, timeout_s=5)
    with pytest.raises(ValueError):
        g.broadcast_bytes(None, root=0)  # the root must supply data
    with pytest.raises(ValueError):
        g.broadcast_bytes(b"x", root=2)
    with pytest.raises(TypeError):
        g.allgather_bytes("not bytes")


def test_file_group_refuses_stale_directory(tmp_path):
    g = FileGroup(tmp_path, 0, 1)
    assert g.broadcast_bytes(b"x") == b"x"
    with pytest.raises(ValueError, match="earlier job"):
        FileGroup(tmp_path, 0, 1)


def test_file_group_size_one_cleans_up(tmp_path):
    g = FileGroup(tmp_path, 0, 1, timeout_s=1)
    for i in range(5):
        assert g.allgather_bytes(bytes([i])) == [bytes([i])]
    assert sorted(os.listdir(tmp_path)) == [".rank0.claim", "4"]


def test_file_group_refuses_a_second_job_in_the_same_directory(tmp_path):
    # Job A's rank 0 is up; job B (or a rerun, or a crashed job's leftovers) must not mix its
    # rounds with A's: its rank 0 refuses at once, before any data is read.
    FileGroup(tmp_path, 0, 2, timeout_s=1)
    with pytest.raises(ValueError, match="rank 0 .* already taken by another job"):
        FileGroup(tmp_path, 0, 2, timeout_s=1)
    FileGroup(tmp_path, 1, 2, timeout_s=1)  # job A's rank 1 joins fine
    with pytest.raises(ValueError, match="rank 1 .* already taken"):
        FileGroup(tmp_path, 1, 2, timeout_s=1)


def test_file_group_rank_and_size_are_ints(tmp_path):
    for rank, size, exc in ((1.7, 2, TypeError), (0, 2.5, TypeError), (True, 2, TypeError), ("0", 2, TypeError)):
        with pytest.raises(exc, match="FileGroup"):
            FileGroup(tmp_path / "x", rank, size)


# --------------------------------------------------------------------------- LocalGroup / as_group


def test_local_group():
    g = LocalGroup()
    assert (g.rank, g.size) == (0, 1)
    assert g.allgather_bytes(b"ab") == [b"ab"]
    assert g.allgather_bytes(bytearray(b"c")) == [b"c"]
    assert g.broadcast_bytes(b"z") == b"z"
    with pytest.raises(ValueError):
        g.broadcast_bytes(b"z", root=1)
    g.barrier()
    assert as_group(g) is g


def test_as_group_checks_the_rank_of_a_custom_group():
    class G(LocalGroup):
        pass
    for rank, size in ((5, 2), (-1, 2), (0, 0)):
        g = G()
        g.rank, g.size = rank, size
        with pytest.raises(ValueError, match=f"rank {rank} and size {size}"):
            as_group(g)


def test_as_group_rejects_int_listing_accepted():
    with pytest.raises(TypeError) as ei:
        as_group(3)
    msg = str(ei.value)
    for word in ("int", "ProcessGroup", "MPI.Intracomm", "'jax'", "allgather_bytes"):
        assert word in msg, (word, msg)
    with pytest.raises(TypeError, match="unknown group name"):
        as_group("nccl")


def test_as_group_none_without_default():
    if "torch" in sys.modules:
        import torch.distributed as dist
        if dist.is_available() and dist.is_initialized():
            pytest.skip("torch.distributed is initialized in the test process")
    with pytest.raises(RuntimeError, match="not initialized"):
        as_group(None)


def test_init_from_env(tmp_path, monkeypatch):
    for n in ("EPCOMM_GROUP_DIR", "RANK", "WORLD_SIZE"):
        monkeypatch.delenv(n, raising=False)
    with pytest.raises(RuntimeError, match="EPCOMM_GROUP_DIR"):
        init_from_env()
    monkeypatch.setenv("EPCOMM_GROUP_DIR", str(tmp_path))
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    g = init_from_env()
    assert isinstance(g, FileGroup) and (g.rank, g.size) == (0, 1)
    assert g.allgather_bytes(b"q") == [b"q"]
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(ValueError, match="WORLD_SIZE"):
        init_from_env()


# --------------------------------------------------------------------------- TorchGroup


def _torch_worker(rank, port, size):
    import torch.distributed as dist
    from epcomm.runtime.group import TorchGroup

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}",
                            rank=rank, world_size=size)
    try:
        g = TorchGroup()
        assert (g.rank, g.size) == (rank, size) and g._store is not None
        _check_collectives(g, "torch", root=1)
        # the fallback where torch offers no default store: the object collectives
        f = TorchGroup()
        f._store = None
        _check_collectives(f, "torch objects", root=1)
        d = as_group(None)
        assert isinstance(d, TorchGroup) and d.rank == rank
        assert d.broadcast_bytes(b"r0" if rank == 0 else None) == b"r0"
        assert isinstance(init_from_env(), TorchGroup)
        # a group holding only global rank 1: its group rank 0 is global rank 1, which
        # broadcast_object_list must be given as src
        sub = dist.new_group([1])
        if rank == 1:
            s = as_group(sub)
            assert isinstance(s, TorchGroup) and (s.rank, s.size) == (0, 1)
            assert s.broadcast_bytes(b"sub", root=0) == b"sub"
            assert s.allgather_bytes(b"a") == [b"a"]
            s.barrier()
        else:
            try:
                TorchGroup(sub)
            except ValueError:
                pass
            else:
                raise AssertionError("TorchGroup accepted a group this rank is not in")
        g.barrier()
    finally:
        dist.destroy_process_group()


def test_torch_group_gloo_two_processes():
    pytest.importorskip("torch.distributed")
    _run_ranks(_torch_worker, 2, (_free_port(), 2), timeout=50)


def _torch_missing_peer_worker(rank, port, size):
    import torch.distributed as dist
    from epcomm.runtime.group import TorchGroup

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=size)
    try:
        g = TorchGroup(timeout_s=2.0)
        assert g._store is not None, "this torch offers a default store: the bounded path must be used"
        assert g.allgather_bytes(b"x%d" % rank) == [b"x0", b"x1", b"x2"]
        if rank == 2:
            time.sleep(8)  # never joins the next collectives
            return "absent"
        t0 = time.monotonic()
        try:
            g.allgather_bytes(b"y")
        except EpcommTimeoutError as e:
            dt = time.monotonic() - t0
            assert dt < 6, f"took {dt:.1f} s for a 2 s timeout"
            assert e.rank == rank and "group allgather round 1" in str(e) and "[2]" in str(e), str(e)
        else:
            raise AssertionError("allgather returned without rank 2")
        if rank == 1:
            try:
                g.broadcast_bytes(None, root=2)
            except EpcommTimeoutError as e:
                assert "broadcast round 2 from rank 2" in str(e) and "[2]" in str(e), str(e)
            else:
                raise AssertionError("broadcast returned without its root")
        return "timed out as expected"
    finally:
        if rank != 2:
            time.sleep(7)  # let rank 2 wake up before the store's owner (rank 0) goes away
        dist.destroy_process_group()


def _torch_store_worker(rank, port, size):
    import torch.distributed as dist
    from torch.distributed import distributed_c10d as c10d

    from epcomm.errors import EpcommError
    from epcomm.runtime.group import TorchGroup

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=size)
    # A group made and never used on one rank (e.g. printed) does not shift the next one's keys.
    if rank == 1:
        repr(as_group(None))
    g = TorchGroup(timeout_s=20.0)
    assert g.allgather_bytes(b"%d" % rank) == [b"0", b"1"]

    class Placeholder:  # the MPI backend's store: every method present, none implemented
        def __getattr__(self, name):
            def fail(*a, **k):
                raise RuntimeError("Not implemented")
            return fail

    real = c10d._get_default_store
    c10d._get_default_store = lambda: Placeholder()
    try:
        f = TorchGroup()
        assert f._store is None, "a store whose calls fail must leave the object collectives"
    finally:
        c10d._get_default_store = real
    assert f.allgather_bytes(b"o%d" % rank) == [b"o0", b"o1"]
    g.barrier()
    if rank == 0:
        time.sleep(1)
        os._exit(0)  # the store's host goes away without a word
    time.sleep(3)
    t0 = time.monotonic()
    try:
        g.allgather_bytes(b"late")
    except EpcommTimeoutError as e:
        raise AssertionError(f"a dead store reported as a timeout: {e}")
    except EpcommError as e:
        assert "store failed" in str(e) and "rank 0 of the job" in str(e), str(e)
        assert time.monotonic() - t0 < 15
    else:
        raise AssertionError("allgather returned with the store's host gone")
    return "dead store named"


def test_torch_group_store_keys_survive_unused_groups_and_a_dead_store_is_named():
    pytest.importorskip("torch.distributed")
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_entry, args=(_torch_store_worker, r, (port, 2), q), daemon=True) for r in range(2)]
    for p in procs:
        p.start()
    reports = {}
    deadline = time.monotonic() + 60
    while 1 not in reports and time.monotonic() < deadline:
        try:
            rank, status, detail = q.get(timeout=0.5)
            reports[rank] = (status, detail)
        except queue_mod.Empty:
            if not procs[1].is_alive():
                break
    for p in procs:
        p.join(5)
        if p.is_alive():
            p.kill()
    # rank 0 leaves with os._exit (no report); rank 1 reports what it saw
    assert 0 not in reports, reports[0]
    assert reports.get(1) == ("ok", "dead store named"), reports


def test_torch_group_names_a_missing_rank_within_its_timeout():
    pytest.importorskip("torch.distributed")
    res = _run_ranks(_torch_missing_peer_worker, 3, (_free_port(), 3), timeout=60)
    assert res == {0: "timed out as expected", 1: "timed out as expected", 2: "absent"}


# --------------------------------------------------------------------------- JaxGroup


def _jax_worker(rank, port, size):
    os.environ["JAX_PLATFORMS"] = "cpu"
    import jax
    from epcomm.runtime.group import JaxGroup

    try:
        jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}",
                                   num_processes=size, process_id=rank,
                                   initialization_timeout=30)
    except Exception as e:  # pragma: no cover - depends on the jax build
        raise _Skip(f"jax.distributed.initialize does not work on CPU here: "
                    f"{type(e).__name__}: {e}")
    try:
        g = JaxGroup(timeout_s=20)
        assert (g.rank, g.size) == (rank, size)
        _check_collectives(g, "jax", root=1)
        for obj in ("jax", jax.distributed):
            a = as_group(obj)
            assert isinstance(a, JaxGroup) and a.rank == rank
        # every group of a process has its own keys: two live groups (two Buffers of one job,
        # e.g. normal and low-latency) interleave their rounds without colliding
        if rank == 1:
            repr(as_group("jax"))  # made and never used on one rank: must shift no keys
        a, a2 = as_group("jax"), as_group("jax")
        for i in range(3):
            assert a.allgather_bytes(b"a%d%d" % (i, rank)) == [b"a%d0" % i, b"a%d1" % i]
            assert a2.allgather_bytes(b"b%d%d" % (i, rank)) == [b"b%d0" % i, b"b%d1" % i]
        # jaxlibs without the *_bytes methods go through base64 strings; force that path
        b = JaxGroup(prefix="epcomm-b64", timeout_s=20)
        b._raw = False
        _check_collectives(b, "jax-b64", rounds=1, root=0)
        # a second group needs its own prefix; rank 1 never publishes the broadcast
        t = JaxGroup(prefix="epcomm-timeout", timeout_s=0.5)
        if rank == 0:
            try:
                t.broadcast_bytes(None, root=1)
            except EpcommTimeoutError as e:
                m = str(e)
                assert "rank 0" in m and "round 0" in m and "[1]" in m, m
            else:
                raise AssertionError("JaxGroup broadcast did not time out")
        g.barrier()
        assert g.allgather_bytes(b"end%d" % rank) == [b"end0", b"end1"]
    finally:
        jax.distributed.shutdown()


def test_jax_group_two_processes():
    pytest.importorskip("jax")
    _run_ranks(_jax_worker, 2, (_free_port(), 2), timeout=50)


# --------------------------------------------------------------------------- MPIGroup


def test_mpi_group_single_process():
    MPI = pytest.importorskip("mpi4py.MPI", reason="mpi4py is not installed")
    from epcomm.runtime.group import MPIGroup

    g = as_group(MPI.COMM_WORLD)
    assert isinstance(g, MPIGroup)
    assert g.allgather_bytes(b"m")[g.rank] == b"m"
    if g.size == 1:
        _check_collectives(g, "mpi", root=0)
