"""Shared pytest configuration: marker registration that does not depend on pytest.ini, and a
fresh JIT cache directory per test (``cache_dir``)."""
import pytest


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs an NVIDIA GPU")
    config.addinivalue_line("markers", "multigpu: needs 2+ GPUs")


@pytest.fixture()
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("EPCOMM_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("EPCOMM_DISABLE_CACHE", raising=False)
    return tmp_path / "cache"
