"""Shared pytest configuration: the helper modules (tests/helpers) importable by name from every
test module and spawned worker, a fresh JIT cache directory per test (``cache_dir``), and the
hypothesis profiles of the fuzz tests (``epcomm-default``, loaded here: fast enough for CI;
``epcomm-long``: ``--hypothesis-profile=epcomm-long``, 20 times the examples).  SIGTERM is taken
as an interrupt (``pytest_configure``).  The markers are registered in pyproject.toml."""
import signal
import sys
import threading
from pathlib import Path

import pytest

HELPERS = str(Path(__file__).resolve().parent / "helpers")
if HELPERS not in sys.path:
    sys.path.insert(0, HELPERS)

try:
    from hypothesis import HealthCheck, settings
except ImportError:  # the fuzz tests skip without it
    pass
else:
    # No example database (nothing written into the tree), no deadline (a first call may
    # import a framework), and the fuzz tests' rig is a function-scoped fixture on purpose:
    # every example builds its own Buffers on it.
    _FUZZ = dict(deadline=None, database=None, print_blob=True,
                 suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
    settings.register_profile("epcomm-default", max_examples=150, **_FUZZ)
    settings.register_profile("epcomm-long", max_examples=3000, **_FUZZ)
    settings.load_profile("epcomm-default")


_SIGTERM_SET = False   # whether pytest_configure installed _interrupt


def _interrupt(signum, frame):
    # Once: `timeout` signals the command, then its whole process group (the command again), and
    # a second interrupt would break into the cleanup the first one started.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise KeyboardInterrupt(f"signal {signum}: ended from outside (e.g. a step's time limit)")


def pytest_configure(config):
    """SIGTERM (what ``timeout`` sends when a GPU step's limit is reached, benchmarks/gpu_steps.sh)
    raises KeyboardInterrupt in pytest's main thread: pytest then stops and still reports the
    failures of the tests that finished and where it was interrupted, and a spawn in progress
    ends its workers (epcomm.tools.spawn.run's cleanup).  Killed by SIGTERM itself, pytest
    would leave only its progress dots.  Not where SIGTERM already has a handler."""
    global _SIGTERM_SET
    if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        signal.signal(signal.SIGTERM, _interrupt)
        _SIGTERM_SET = True


def pytest_unconfigure(config):
    global _SIGTERM_SET
    if _SIGTERM_SET and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        _SIGTERM_SET = False


@pytest.fixture()
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("EPCOMM_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("EPCOMM_DISABLE_CACHE", raising=False)
    return tmp_path / "cache"
