"""epcomm.tools.spawn on the CPU: failures come back fast and precise, and nothing outlives a run.

The workers here need no GPU (the GPU tests use the same runner with one process per GPU).
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from epcomm.tools import spawn


def _raise_on_rank0(rank, world, group):
    if rank == 0:
        raise RuntimeError("boom on rank 0")
    spawn.phase("waiting for rank 0")
    group.barrier()  # never completes: rank 0 is gone
    return "unreachable"


def test_a_failing_rank_ends_the_run_soon_with_its_traceback():
    t0 = time.monotonic()
    with pytest.raises(spawn.SpawnError) as ei:
        spawn.run(_raise_on_rank0, 2, timeout=120)
    dt = time.monotonic() - t0
    msg = str(ei.value)
    assert "rank 0 failed: RuntimeError: boom on rank 0" in msg and "Traceback" in msg
    assert "rank 1 still running in phase 'waiting for rank 0'" in msg
    assert dt < 60, f"took {dt:.0f} s: the run waited for the timeout instead of stopping after the failure"


def _unpicklable(rank, world, group):
    return lambda: rank


def test_an_unpicklable_result_is_reported_as_such():
    with pytest.raises(spawn.SpawnError, match="result cannot be sent to the parent"):
        spawn.run(_unpicklable, 1, timeout=60)


def _exit_silently(rank, world, group):
    spawn.phase("about to exit")
    os._exit(0)


def test_a_worker_that_exits_without_a_result_is_not_taken_for_a_hang():
    t0 = time.monotonic()
    with pytest.raises(spawn.SpawnError, match="exited with code 0 without reporting a result, in phase 'about to exit'"):
        spawn.run(_exit_silently, 1, timeout=120)
    assert time.monotonic() - t0 < 60


def _kill_self(rank, world, group):
    os.kill(os.getpid(), signal.SIGKILL)


def test_a_killed_worker_names_the_signal():
    with pytest.raises(spawn.SpawnError, match="was killed by SIGKILL"):
        spawn.run(_kill_self, 1, timeout=60)


def _rank1_dies_the_others_go_on(rank, world, group):
    group.barrier()
    if rank == 1:
        spawn.die()
    return rank * 10


def test_a_rank_allowed_to_die_gives_none_and_the_others_their_results():
    assert spawn.run(_rank1_dies_the_others_go_on, 3, timeout=120, may_die=(1,)) == [0, None, 20]
    with pytest.raises(spawn.SpawnError, match="rank 1.*killed by SIGKILL"):
        spawn.run(_rank1_dies_the_others_go_on, 3, timeout=120, may_die=(2,))
    with pytest.raises(ValueError, match="may_die"):
        spawn.run(_rank1_dies_the_others_go_on, 3, timeout=120, may_die=(3,))


def _start_child_and_hang(rank, world, group, pid_file):
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    with open(pid_file, "w") as f:
        f.write(str(child.pid))
    spawn.phase("hanging")
    time.sleep(120)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie still answers kill(0): look at its state
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="process groups and /proc (Linux)")
def test_a_timed_out_worker_and_what_it_started_are_killed(tmp_path):
    pid_file = str(tmp_path / "child.pid")
    with pytest.raises(spawn.SpawnError, match="rank 0 did not finish within 5s: stalled in phase 'hanging'"):
        spawn.run(_start_child_and_hang, 1, pid_file, timeout=5)
    pid = int(open(pid_file).read())
    for _ in range(50):
        if not _alive(pid):
            break
        time.sleep(0.1)
    assert not _alive(pid), "the worker's child process outlived the run"


def _blocked_in_a_named_wait(rank, world, group):
    spawn.phase("waiting")
    if rank == 1:
        return "done"
    time.sleep(120)


def test_a_stalled_rank_says_where_its_code_waits():
    """The error shows the stalled rank's innermost Python frames (faulthandler on SIGUSR1)."""
    with pytest.raises(spawn.SpawnError) as ei:
        spawn.run(_blocked_in_a_named_wait, 2, timeout=6)
    msg = str(ei.value)
    assert "rank 0 did not finish within 6s: stalled in phase 'waiting'" in msg
    assert "rank 0 was waiting in (innermost first):" in msg and "in _blocked_in_a_named_wait" in msg
    assert "rank 1 did not finish" not in msg


def test_world_size_is_checked():
    with pytest.raises(ValueError, match="world_size=0"):
        spawn.run(_unpicklable, 0)
    with pytest.raises(TypeError, match="world_size"):
        spawn.run(_unpicklable, 2.0)


@pytest.mark.parametrize("gpus, share, min_ranks, want", [
    ("4", "0", 2, 4), ("2", "0", 2, 2), ("1", "1", 2, 2), ("1", "1", 1, 2), ("1", "0", 1, 1),
    ("2", "1", 4, 4), ("8", "1", 2, 8),
])
def test_example_world_runs_one_rank_per_gpu_or_shares_under_the_knob(monkeypatch, gpus, share, min_ranks, want):
    monkeypatch.setenv("EPCOMM_VISIBLE_GPUS", gpus)
    monkeypatch.setenv("EPCOMM_SHARE_GPU", share)
    assert spawn.example_world(min_ranks) == want
    assert [spawn.device_of(r) for r in range(want)] == [r % int(gpus) for r in range(want)]


@pytest.mark.parametrize("gpus, divides, want", [("8", 16, 8), ("7", 16, 4), ("6", 16, 4), ("3", 64, 2), ("5", 64, 4)])
def test_example_world_keeps_the_expert_count_divisible(monkeypatch, gpus, divides, want):
    monkeypatch.setenv("EPCOMM_VISIBLE_GPUS", gpus)
    monkeypatch.setenv("EPCOMM_SHARE_GPU", "0")
    assert spawn.example_world(2, divides=divides) == want


@pytest.mark.parametrize("gpus, min_ranks, words", [("0", 2, "needs an NVIDIA GPU"), ("1", 2, "EPCOMM_SHARE_GPU=1"),
                                                     ("2", 4, "4 ranks but 2 GPUs are visible")])
def test_example_world_says_what_is_missing(monkeypatch, gpus, min_ranks, words):
    monkeypatch.setenv("EPCOMM_VISIBLE_GPUS", gpus)
    monkeypatch.setenv("EPCOMM_SHARE_GPU", "0")
    with pytest.raises(SystemExit, match=words):
        spawn.example_world(min_ranks)


@pytest.mark.parametrize("oks, code, verdict", [((True, True), 0, "PASS"), ((True, False), 1, "FAIL")])
def test_run_example_prints_every_rank_and_the_verdict(monkeypatch, capsys, oks, code, verdict):
    seen = {}

    def fake_run(worker, world, timeout):
        seen.update(world=world, timeout=timeout)
        return [{"rank": r, "ok": ok} for r, ok in enumerate(oks)]

    monkeypatch.setattr(spawn, "run", fake_run)
    monkeypatch.setattr(spawn, "example_world", lambda min_ranks, divides=0: 2)
    assert spawn.run_example(lambda *a: None, 2, divides=8, timeout=7) == code
    lines = capsys.readouterr().out.splitlines()
    assert lines[-1] == verdict and len(lines) == 3 and seen == {"world": 2, "timeout": 7}
