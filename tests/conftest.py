"""Shared pytest configuration: the helper modules (tests/helpers) importable by name from every
test module and spawned worker, and a fresh JIT cache directory per test (``cache_dir``).  The
markers are registered in pyproject.toml."""
import sys
from pathlib import Path

import pytest

HELPERS = str(Path(__file__).resolve().parent / "helpers")
if HELPERS not in sys.path:
    sys.path.insert(0, HELPERS)


@pytest.fixture()
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("EPCOMM_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("EPCOMM_DISABLE_CACHE", raising=False)
    return tmp_path / "cache"
