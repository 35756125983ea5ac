"""Smoke-test kernels (``cuda_src/smoke.cuh``): a plain peer-store kernel and an NVSHMEM-linked
put/signal kernel.  ``epcomm selftest`` and tests/test_smoke_gpu.py use them to prove on a new
machine that peer memory, NVRTC, nvJitLink and NVSHMEM work together."""
from __future__ import annotations

import ctypes
from dataclasses import dataclass

from epcomm.jit.launch import launch
from epcomm.jit.spec import KernelDef, KernelSpec, ParamsStruct


class SmokeParams(ParamsStruct):
    _cname_ = "epcomm::SmokeParams"
    _fields_ = [("local", ctypes.c_uint64), ("peer", ctypes.c_uint64), ("signal", ctypes.c_uint64),
                ("result", ctypes.c_uint64), ("count", ctypes.c_uint64), ("value", ctypes.c_uint64),
                ("rank", ctypes.c_int), ("peer_rank", ctypes.c_int)]


@dataclass(frozen=True)
class SmokePeerStoreSpec(KernelSpec):
    family = "smoke"
    header = "smoke.cuh"
    threads: int = 256

    def kernels(self):
        return (KernelDef("peer_store", "epcomm::smoke_peer_store", (self.threads,), SmokeParams),)


@dataclass(frozen=True)
class SmokeNvshmemSpec(KernelSpec):
    family = "smoke_nvshmem"
    header = "smoke.cuh"
    uses_nvshmem = True
    threads: int = 256

    def kernels(self):
        return (KernelDef("nvshmem_put", "epcomm::smoke_nvshmem_put", (self.threads,), SmokeParams),)


def launch_peer_store(mod, stream: int, p: SmokeParams, blocks: int = 132) -> None:
    """Every thread stores ``p.value + i`` into element i of the peer's buffer (``mod``: a loaded
    SmokePeerStoreSpec)."""
    launch(mod.fn("peer_store"), blocks, SmokePeerStoreSpec.threads, stream, p)


def launch_nvshmem_put(mod, stream: int, p: SmokeParams, blocks: int = 8) -> None:
    """NVSHMEM puts of ``p.count`` words to ``p.peer_rank`` and a signal (``mod``: a loaded
    SmokeNvshmemSpec)."""
    launch(mod.fn("nvshmem_put"), blocks, SmokeNvshmemSpec.threads, stream, p)
