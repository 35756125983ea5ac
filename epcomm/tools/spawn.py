"""Run a function on N GPUs in N processes (tests, benchmarks, ``epcomm selftest``).

Each process gets ``rank``, ``world_size`` and a framework-free :class:`~epcomm.runtime.group.FileGroup`
bootstrap.  Workers announce what they are doing with :func:`phase`; if the run exceeds its
timeout, the error names every rank that had not finished, the phase it was in (and for how
long) and where its Python code was waiting (its innermost frames, dumped by faulthandler on
SIGUSR1), then all processes are killed: a hang never outlives its timeout.
"""
from __future__ import annotations

import faulthandler
import multiprocessing as mp
import os
import pickle
import queue as queue_mod
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback

from epcomm import envs
from epcomm.runtime.group import FileGroup
from epcomm.validate import check_int

# Never let a test or benchmark enable NVLink multicast: on shared hosts it can take the GPUs
# of the whole machine down.  Callers may still override explicitly.
SAFE_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}

_PHASE_FILE: str | None = None
_STACK_FILE = None       # where this worker's faulthandler writes its stacks on SIGUSR1
STACK_FRAMES = 12        # innermost frames of a stalled rank's main thread in a SpawnError


def phase(name: str) -> None:
    """Record what this worker is doing now (shown if the run times out)."""
    if _PHASE_FILE is None:
        return
    tmp = _PHASE_FILE + ".tmp"
    with open(tmp, "w") as f:
        f.write(f"{time.time()}\n{name}")
    os.replace(tmp, _PHASE_FILE)


def _read_phase(path: str) -> tuple[str, float]:
    try:
        with open(path) as f:
            ts, name = f.read().split("\n", 1)
        return name, time.time() - float(ts)
    except (OSError, ValueError):
        return "(starting: no phase reported yet)", 0.0


def _die_with_parent() -> None:
    """Leave no orphan: the worker gets SIGKILL when the parent dies (Linux), and leads its own
    process group, so the parent can kill what the worker started too (compilers, helpers)."""
    try:
        os.setpgid(0, 0)
    except OSError:
        pass
    try:
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, int(signal.SIGKILL), 0, 0, 0)  # PR_SET_PDEATHSIG
    except Exception:
        pass


def _worker(fn, rank, world, root, args, kwargs, q, env, group_timeout, parent_pid=None):
    global _PHASE_FILE
    _die_with_parent()
    if parent_pid is not None and os.getppid() != parent_pid:
        os._exit(1)  # the parent died before the death signal was armed
    os.environ.update(env)
    os.environ["RANK"], os.environ["WORLD_SIZE"], os.environ["LOCAL_RANK"] = str(rank), str(world), str(rank)
    _PHASE_FILE = os.path.join(root, f"phase.{rank}")
    _arm_stack_dump(root, rank)
    phase("starting")
    try:
        # The bootstrap group waits as long as the whole run may take, independently of
        # EPCOMM_TIMEOUT_S (tests shorten that one to provoke kernel timeouts).
        group = FileGroup(os.path.join(root, "group"), rank, world, timeout_s=group_timeout)
        res = fn(rank, world, group, *args, **kwargs)
        phase("done")
        try:
            pickle.dumps(res)  # the queue pickles in a thread, where a failure would be lost
        except Exception as e:
            raise TypeError(f"the worker's result cannot be sent to the parent: {type(e).__name__}: {e}") from e
        q.put((rank, "ok", res))
    except BaseException as e:  # noqa: BLE001 - everything is reported to the parent
        q.put((rank, "error", f"{type(e).__name__}: {e}\n{traceback.format_exc()}"))


def _arm_stack_dump(root: str, rank: int) -> None:
    """SIGUSR1 makes this worker write every thread's Python stack to ``stacks.<rank>`` (from
    the signal handler, so also while the main thread is blocked in C, e.g. a CUDA sync)."""
    global _STACK_FILE
    try:
        _STACK_FILE = open(os.path.join(root, f"stacks.{rank}"), "w")
        faulthandler.register(signal.SIGUSR1, file=_STACK_FILE, all_threads=True)
    except (OSError, AttributeError, ValueError):
        _STACK_FILE = None


def _stalled_stacks(procs, ranks, root: str) -> dict[int, str]:
    """Ask the stalled ``ranks`` for their stacks (SIGUSR1) and return each one's innermost
    frames of the thread that took the signal (the main thread), most recent first."""
    for r in ranks:
        try:
            os.kill(procs[r].pid, signal.SIGUSR1)
        except (ProcessLookupError, PermissionError, TypeError):
            pass
    time.sleep(1.0)
    out = {}
    for r in ranks:
        try:
            with open(os.path.join(root, f"stacks.{r}")) as f:
                text = f.read()
        except OSError:
            continue
        block = text.split("Current thread", 1)[-1].splitlines()[1:]
        frames = [ln.strip() for ln in block if ln.strip().startswith("File ")][:STACK_FRAMES]
        if frames:
            out[r] = "\n    ".join(frames)
    return out


class SpawnError(RuntimeError):
    pass


def die() -> None:
    """End this worker at once with SIGKILL, as a crashed GPU process ends (no cleanup, no
    result): fault-injection tests call it in a rank listed in ``run(..., may_die=...)``."""
    os.kill(os.getpid(), signal.SIGKILL)


def run(fn, world_size: int, *args, timeout: float = 300.0, env: dict | None = None, may_die=(),
        **kwargs) -> list:
    """Run ``fn(rank, world_size, group, *args, **kwargs)`` in ``world_size`` processes.

    ``may_die``: ranks that may end without a result (:func:`die`): theirs is None.

    ``fn`` must be importable (module level) and return something picklable.  Returns the list
    of results by rank.  Raises ValueError for ``world_size`` < 1, SpawnError with every failing
    rank's traceback (a few seconds after the first failure: the other ranks are then killed,
    since they may wait for the failed one), or, after ``timeout`` seconds, naming each rank
    that had not finished and its last phase.  Workers die with the parent, and the processes
    a worker started die with it.
    """
    world_size = check_int("world_size", world_size, lo=1)
    may_die = frozenset(check_int("may_die", r, lo=0, hi=world_size - 1) for r in may_die)
    ctx = mp.get_context("spawn")
    root = tempfile.mkdtemp(prefix="epcomm-spawn-")
    q = ctx.Queue()
    full_env = dict(SAFE_ENV)
    full_env.update({k: v for k, v in os.environ.items() if k.startswith("EPCOMM_")})
    full_env.update(env or {})
    procs = [ctx.Process(target=_worker, args=(fn, r, world_size, root, args, kwargs, q, full_env, timeout,
                                               os.getpid()), daemon=True)
             for r in range(world_size)]
    for p in procs:
        p.start()
    results: dict[int, tuple] = {}
    deadline = time.monotonic() + timeout
    try:
        while len(results) < world_size:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            try:
                rank, status, payload = q.get(timeout=min(left, 1.0))
                results[rank] = (status, payload)
                if status == "error":  # the others may wait for this rank: a short grace, then stop
                    deadline = min(deadline, time.monotonic() + _ERROR_GRACE_S)
            except queue_mod.Empty:
                if _collect_dead(procs, results, q, root, may_die):
                    break
        missing = [r for r in range(world_size) if r not in results]
        errors = {r: p for r, (s, p) in results.items() if s == "error"}
        if missing or errors:
            lines = []
            stacks = _stalled_stacks(procs, missing, root) if missing and not errors else {}
            for r in missing:
                name, age = _read_phase(os.path.join(root, f"phase.{r}"))
                lines.append(f"rank {r} did not finish within {timeout:.0f}s: stalled in phase {name!r} "
                             f"(for {age:.0f}s)" if not errors else
                             f"rank {r} still running in phase {name!r} when rank(s) {sorted(errors)} failed")
                if r in stacks:
                    lines.append(f"  rank {r} was waiting in (innermost first):\n    {stacks[r]}")
            for r, tb in sorted(errors.items()):
                lines.append(f"rank {r} failed: {tb}")
            raise SpawnError("\n".join(lines))
        return [results[r][1] for r in range(world_size)]
    finally:
        for p in procs:
            if p.pid is not None:
                try:  # the worker's process group: what it started goes too
                    os.killpg(p.pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError, OSError):
                    pass
            if p.is_alive():
                p.kill()
        for p in procs:
            p.join(timeout=5)
        shutil.rmtree(root, ignore_errors=True)


_ERROR_GRACE_S = 5.0


def _collect_dead(procs, results: dict, q, root: str, may_die) -> bool:
    """Results of workers that ended without one (exit code 0 included: e.g. os._exit, or
    killed): None for a rank in ``may_die``, else an error naming how it ended and its phase.
    Returns whether some rank failed."""
    dead = [r for r, p in enumerate(procs) if not p.is_alive() and r not in results]
    if not dead:
        return False
    time.sleep(0.5)  # let a final queue message arrive
    while True:
        try:
            rank, status, payload = q.get_nowait()
            results[rank] = (status, payload)
        except queue_mod.Empty:
            break
    for r in dead:
        if r not in results and r in may_die:
            results[r] = ("ok", None)
        elif r not in results:
            results[r] = ("error", f"process {_exit_reason(procs[r].exitcode)} without reporting a result, in "
                                   f"phase {_read_phase(os.path.join(root, f'phase.{r}'))[0]!r}")
    return any(s == "error" for s, _ in results.values())


def _exit_reason(code) -> str:
    if code is not None and code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        return f"was killed by {name}" + (" (out of memory?)" if -code == signal.SIGKILL else "")
    return f"exited with code {code}"


def gpu_count() -> int:
    """Visible CUDA devices, without initialising CUDA in this process (0 on failure).

    Asks a fresh interpreter (so a later fork/spawn starts from a process with no CUDA context)
    and remembers the answer in EPCOMM_VISIBLE_GPUS, which spawned workers inherit: test
    modules imported again inside a worker then need no second probe.
    """
    cached = envs.VISIBLE_GPUS.get()
    if cached.isdigit():
        return int(cached)
    try:
        r = subprocess.run([sys.executable, "-c", "from epcomm.runtime.driver import device_count; print(device_count())"],
                           capture_output=True, text=True, timeout=120)
        n = int(r.stdout.strip().splitlines()[-1])
    except Exception:
        n = 0
    os.environ["EPCOMM_VISIBLE_GPUS"] = str(n)
    return n


def device_of(rank: int) -> int:
    """The GPU of a spawned rank: rank modulo the visible GPUs (ranks share GPUs round-robin when
    there are more ranks than GPUs, under EPCOMM_SHARE_GPU=1)."""
    return rank % max(gpu_count(), 1)


def example_world(min_ranks: int = 2, divides: int = 0) -> int:
    """Ranks an example should spawn: one per visible GPU.  Under EPCOMM_SHARE_GPU=1, a single
    GPU or fewer GPUs than ``min_ranks`` run ``max(min_ranks, 2)`` ranks sharing them (their
    kernels take turns: a correctness run, not a speed one).

    ``divides``: the count must divide it (an example's expert count: experts are split evenly
    over the ranks), so 3, 5, 6 or 7 GPUs run the largest count below that does.

    Raises SystemExit with a message saying what is missing (no GPU, or too few GPUs and
    EPCOMM_SHARE_GPU unset) instead of letting a worker fail inside the Buffer.
    """
    n = gpu_count()
    if n == 0:
        raise SystemExit("this example needs an NVIDIA GPU: none is visible")
    share = envs.SHARE_GPU.get()
    if n >= min_ranks and not (share and n == 1):
        while divides and divides % n and n > min_ranks:
            n -= 1
        return n
    if share:
        return max(min_ranks, 2)
    raise SystemExit(f"this example needs {min_ranks} ranks but {n} GPU{'s' if n > 1 else ''} "
                     f"{'are' if n > 1 else 'is'} visible; set EPCOMM_SHARE_GPU=1 to run {min_ranks} ranks "
                     f"sharing {'them' if n > 1 else 'it'} (a correctness run, not a speed one)")


def run_example(worker, min_ranks: int = 2, divides: int = 0, timeout: float = 300) -> int:
    """An example's ``__main__``: run ``worker(rank, world, group)`` on :func:`example_world`'s
    ranks, print each rank's result dict and PASS or FAIL (every dict's ``"ok"``), and return
    the exit status (0 on PASS)."""
    res = run(worker, example_world(min_ranks, divides=divides), timeout=timeout)
    for r in res:
        print(r)
    ok = all(r["ok"] for r in res)
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1
