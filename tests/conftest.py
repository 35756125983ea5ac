"""Shared pytest configuration: the helper modules (tests/helpers) importable by name from every
test module and spawned worker, a fresh JIT cache directory per test (``cache_dir``), and the
hypothesis profiles of the fuzz tests (``epcomm-default``, loaded here: fast enough for CI;
``epcomm-long``: ``--hypothesis-profile=epcomm-long``, 20 times the examples).  The markers are
registered in pyproject.toml."""
import sys
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


@pytest.fixture()
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("EPCOMM_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("EPCOMM_DISABLE_CACHE", raising=False)
    return tmp_path / "cache"
