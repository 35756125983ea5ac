"""epcomm.jit.launch on the CPU: what reaches the driver, with a stand-in for cuda.bindings."""
from __future__ import annotations

import ctypes

import pytest

from epcomm.runtime import driver
from epcomm.errors import EpcommError
from epcomm.jit import launch as L


class _Params(ctypes.Structure):
    _fields_ = [("a", ctypes.c_uint64), ("b", ctypes.c_int32)]


class _FakeDriver:
    class CUresult:
        CUDA_SUCCESS = 0

    def __init__(self, result=0):
        self.calls, self.result = [], result

    def CUstream(self, s):  # noqa: N802 - the driver's name
        return ("stream", s)

    def _record(self, name, args):
        kernel, *dims, smem, st, argp = args[:10]
        # the argument array holds the address of the params struct
        addr = ctypes.cast(argp, ctypes.POINTER(ctypes.c_void_p))[0]
        self.calls.append((name, kernel, tuple(dims), smem, st, addr))
        return (self.result,)

    def cuLaunchKernel(self, *a):  # noqa: N802
        return self._record("plain", a)

    def cuLaunchCooperativeKernel(self, *a):  # noqa: N802
        return self._record("coop", a)

    def cuGetErrorName(self, err):  # noqa: N802
        return (0, b"CUDA_ERROR_INVALID_VALUE")


@pytest.fixture
def fake(monkeypatch):
    d = _FakeDriver()
    monkeypatch.setattr(driver, "drv", lambda: d)
    monkeypatch.setattr(L, "_SUCCESS", [None])
    return d


def test_launch_and_launch_prepared_pass_the_same_arguments(fake):
    p = _Params(7, 3)
    L.launch("k", 24, 512, 99, p, smem=656, cooperative=True)
    L.launch("k", (2, 3, 1), (32, 4, 1), 5, p)
    args = L.launch_args(p)
    L.launch_prepared("k", 24, 512, 99, args, 656, True)
    addr = ctypes.addressof(p)
    assert fake.calls == [
        ("coop", "k", (24, 1, 1, 512, 1, 1), 656, ("stream", 99), addr),
        ("plain", "k", (2, 3, 1, 32, 4, 1), 0, ("stream", 5), addr),
        ("coop", "k", (24, 1, 1, 512, 1, 1), 656, ("stream", 99), addr),
    ]


def test_a_driver_error_raises_with_the_launch_shape(fake):
    fake.result = 1
    with pytest.raises(EpcommError, match=r"launch\(grid=4, block=128, smem=0, coop=False\)"):
        L.launch_prepared("k", 4, 128, 0, L.launch_args(_Params()), 0, False)
