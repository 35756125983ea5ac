"""Shared pytest configuration: marker registration that does not depend on pytest.ini."""


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs an NVIDIA GPU")
    config.addinivalue_line("markers", "multigpu: needs 2+ GPUs")
