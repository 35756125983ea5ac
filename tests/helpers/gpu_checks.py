"""Helpers shared by the GPU test modules (imported in spawned workers too): the GPU count, the
rank counts the tests spawn and their skip markers (never an error at collection: a count that
cannot run skips, saying why), bit-exact comparisons."""
from __future__ import annotations

import contextlib
import functools
import os

import pytest

from epcomm import envs
from epcomm.tools import spawn

# The GPU tests' environment variables (not the library's: declared here with its Knob type).
KNOBS: dict = {}
TEST_RANKS = envs.knob("EPCOMM_TEST_RANKS", 0, envs.parse_int,
                       "GPU tests: ranks to spawn (0: one per GPU, or 2 on a one-GPU machine with "
                       "EPCOMM_SHARE_GPU=1). More ranks than GPUs needs EPCOMM_SHARE_GPU=1.", "0", registry=KNOBS)
TEST_TIMEOUT = envs.knob("EPCOMM_TEST_TIMEOUT", 480.0, envs.parse_float,
                         "GPU tests: seconds one multi-rank spawn may take before it is ended and the "
                         "ranks still running are named.", registry=KNOBS)
TEST_FUZZ_SEED = envs.knob("EPCOMM_TEST_FUZZ_SEED", 1, envs.parse_int,
                           "GPU tests: the seed of tests/gpu/test_fuzz_gpu.py's sequence of calls (a failure "
                           "repeats with the same seed).", registry=KNOBS)
TEST_LOG_DIR = envs.knob("EPCOMM_TEST_LOG_DIR", "", envs.parse_str,
                         "GPU tests: a directory where each multi-rank spawn's failures are written as "
                         "soon as the spawn ends (they survive a pytest killed by an outer time limit).",
                         "'' (off)", registry=KNOBS)


@functools.lru_cache(maxsize=None)
def world() -> int:
    """GPUs visible to the tests (probed once, in a subprocess)."""
    return spawn.gpu_count()


needs_gpu = pytest.mark.skipif(world() < 1, reason="needs an NVIDIA GPU (GPU test)")
needs_gpus = pytest.mark.skipif(world() < 2, reason="needs 2 or more NVIDIA GPUs (GPU test)")


def normal_ranks() -> int:
    """Ranks the normal-mode GPU tests spawn: EPCOMM_TEST_RANKS if set, else one per GPU, or 2
    sharing the only GPU when EPCOMM_SHARE_GPU=1.  Ranks that share a GPU take turns on it:
    a correctness run (e.g. 4 or 8 ranks on a smaller machine), never a speed one.  0 (the
    tests skip, saying why: see ``needs_ranks``) when EPCOMM_TEST_RANKS exceeds the GPUs
    without EPCOMM_SHARE_GPU, as ``ll_ranks`` does: an error here would be one at collection."""
    return _ranks()


def _ranks() -> int:
    """EPCOMM_TEST_RANKS if set and runnable (0 if it exceeds the GPUs without EPCOMM_SHARE_GPU),
    else one per GPU, or 2 sharing the only GPU under EPCOMM_SHARE_GPU=1; 0 without a GPU."""
    n, want, share = world(), TEST_RANKS.get(), envs.SHARE_GPU.get()
    if n == 0:
        return 0
    if want > 0:
        return want if want <= n or share else 0
    return 2 if n == 1 and share else n


def _reason(need: int) -> str:
    want = TEST_RANKS.get()
    if want > world() > 0 and not envs.SHARE_GPU.get():
        return f"EPCOMM_TEST_RANKS={want} exceeds the {world()} visible GPUs: set EPCOMM_SHARE_GPU=1 to share them"
    if 0 < want < need:
        return f"EPCOMM_TEST_RANKS={want}: needs {need} or more ranks"
    return ("needs an NVIDIA GPU (GPU test)" if need == 1 else
            f"needs {need} or more NVIDIA GPUs, or 1 with EPCOMM_SHARE_GPU=1 (GPU test)")


needs_ranks = pytest.mark.skipif(normal_ranks() < 2, reason=_reason(2))


def ll_ranks() -> int:
    """Ranks the low-latency GPU tests spawn: EPCOMM_TEST_RANKS if set, else one per GPU.  A
    single GPU runs them with one rank (one PE: the host paths and the kernels' local stores), or
    with 2 ranks sharing it under EPCOMM_SHARE_GPU=1 (NVSHMEM's limited multiple-PEs-per-GPU
    mode: the peer paths, the NVSHMEM puts and the hand-offs between ranks run, their kernels
    taking turns on the GPU; a correctness run, never a speed one)."""
    return _ranks()


needs_ll_ranks = pytest.mark.skipif(ll_ranks() < 1, reason=_reason(1))
needs_two_ll_ranks = pytest.mark.skipif(ll_ranks() < 2, reason=_reason(2))


def device_of(rank: int) -> int:
    """The GPU of a spawned worker (ranks share GPUs round-robin under EPCOMM_SHARE_GPU)."""
    return spawn.device_of(rank)


def _log_spawn(name, args, ok, value) -> None:
    """Write what went wrong in a spawn to EPCOMM_TEST_LOG_DIR at once: pytest reports failures
    only at its end, which an outer time limit may never let it reach."""
    d = TEST_LOG_DIR.get()
    if not d:
        return
    if ok:
        bad = [f"rank {r} {k}: {v}" for r, res in enumerate(value if isinstance(value, list) else [])
               if isinstance(res, dict) for k, v in res.items() if isinstance(v, str) and v != "ok"]
        if not bad:
            return
        text = "\n".join(bad)
    else:
        text = f"{type(value).__name__}: {value}"
    os.makedirs(d, exist_ok=True)
    tag = "".join(c if c.isalnum() else "_" for c in f"{name}{args}")[:120]
    with open(os.path.join(d, f"spawn-{tag}.txt"), "w") as f:
        f.write(text + "\n")


@contextlib.contextmanager
def env_var(name: str, value: str | None):
    """Set (or, with None, leave untouched) one environment variable inside the block, then
    restore it as it was."""
    if value is None:
        yield
        return
    old = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old


def run_once(fn):
    """Like functools.lru_cache, but also remembers an exception: the cases of one spawn are
    checked by many tests, and a spawn that failed (a rank crashed or timed out) must fail each
    of them at once, not run again for every one (a hanging spawn would then cost its timeout
    once per test)."""
    memo = {}

    @functools.wraps(fn)
    def wrapper(*args):
        if args not in memo:
            try:
                memo[args] = (True, fn(*args))
            except Exception as e:  # noqa: BLE001 - re-raised below, for every caller
                memo[args] = (False, e)
            _log_spawn(fn.__name__, args, *memo[args])
        ok, value = memo[args]
        if not ok:
            raise value
        return value
    return wrapper


def to_np(obj):
    """Host numpy copy of any framework's array."""
    from epcomm import interop
    return interop.to_numpy(obj)


def assert_bits(name, got, want):
    from epcomm.testing import bit_mismatch
    bad = bit_mismatch(name, got, want)
    assert bad is None, bad


def assert_every_rank_ok(res):
    """``res``: one {check: "ok" or what went wrong} per rank (a spawned worker's results)."""
    bad = [f"rank {rank} {k}: {v}" for rank, r in enumerate(res) for k, v in r.items() if v != "ok"]
    assert not bad, "\n".join(bad)


def random_job(rng, world, N, H, E, K, drop_prob):
    """Every rank's bf16 tokens, top-k indices and weights, in the order the tests draw them."""
    from epcomm.testing import random_bf16, random_topk, random_weights
    xs, tks, ws = [], [], []
    for _ in range(world):
        tk = random_topk(rng, N, E, K, drop_prob=drop_prob)
        tks.append(tk)
        ws.append(random_weights(rng, tk))
        xs.append(random_bf16(rng, (N, H)))
    return xs, tks, ws
