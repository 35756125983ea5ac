"""Benchmark helper kernels (``cuda_src/timing.cuh``): GPU-side waits measured in wall time,
used by :mod:`epcomm.bench` to start every rank's timed region at the same moment."""
from __future__ import annotations

import ctypes
from dataclasses import dataclass

from ..jit.spec import KernelDef, KernelSpec, ParamsStruct


class SpinParams(ParamsStruct):
    _cname_ = "epcomm::SpinParams"
    _fields_ = [("ns", ctypes.c_uint64), ("deadline", ctypes.c_uint64)]


@dataclass(frozen=True)
class SpinWaitSpec(KernelSpec):
    family = "timing"
    header = "timing.cuh"
    threads: int = 32

    def kernels(self):
        return (KernelDef("spin_wait_ns", "epcomm::spin_wait_ns", (self.threads,), SpinParams),
                KernelDef("deadline_stamp", "epcomm::deadline_stamp", (self.threads,), SpinParams))
