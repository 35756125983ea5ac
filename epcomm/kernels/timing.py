"""Benchmark helper kernels (``cuda_src/timing.cuh``): GPU-side waits measured in wall time,
used by :mod:`epcomm.tools.bench` to start every rank's timed region at the same moment."""
from __future__ import annotations

import ctypes
from dataclasses import dataclass

from epcomm.jit.launch import launch
from epcomm.jit.spec import KernelDef, KernelSpec, ParamsStruct


class SpinParams(ParamsStruct):
    _cname_ = "epcomm::SpinParams"
    _fields_ = [("ns", ctypes.c_uint64)]


ALIGN_MAX_RANKS = 72   # kAlignMaxRanks
ALIGN_THREADS = 128    # start_barrier's block: one leader thread per peer
ALIGN_CHANNEL_BYTES = 8 * (8 + 2 * ALIGN_MAX_RANKS)


class AlignParams(ParamsStruct):
    _cname_ = "epcomm::AlignParams"
    _fields_ = [("chan", ctypes.c_uint64 * ALIGN_MAX_RANKS), ("lead_ns", ctypes.c_uint64),
                ("cap_ns", ctypes.c_uint64), ("seq", ctypes.c_uint64), ("report", ctypes.c_uint64),
                ("rank", ctypes.c_int32), ("num_ranks", ctypes.c_int32)]


@dataclass(frozen=True)
class SpinWaitSpec(KernelSpec):
    family = "timing"
    header = "timing.cuh"
    threads: int = 32

    def kernels(self):
        return (KernelDef("spin_wait_ns", "epcomm::spin_wait_ns", (self.threads,), SpinParams),
                KernelDef("start_barrier", "epcomm::start_barrier", (ALIGN_THREADS,), AlignParams))


def launch_one_block(kernel, threads: int, stream: int, p) -> None:
    """One block of ``kernel`` (``spin_wait_ns`` with SpinParams, ``start_barrier`` with
    AlignParams and ALIGN_THREADS threads) on ``stream``."""
    launch(kernel, 1, threads, stream, p)
