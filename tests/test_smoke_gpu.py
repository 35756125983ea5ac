"""NVSHMEM path smoke test on 2+ ranks: bootstrap through epcomm's group abstraction, symmetric heap,
an NVSHMEM-linked kernel (puts + signals) and a plain peer-store kernel (CUDA IPC).

One rank per GPU runs ``epcomm selftest``'s own worker (which also checks the layout kernel).
Ranks sharing a GPU (EPCOMM_SHARE_GPU=1, e.g. 2 on a one-GPU machine; the rank count comes from
``normal_ranks``) run the same two peer steps here with each rank on its ``device_of`` GPU and
NVSHMEM in its multiple-PEs-per-GPU mode (selftest's worker puts rank r on GPU r)."""
from __future__ import annotations

import numpy as np
import pytest

from epcomm import selftest, spawn
from gpu_checks import device_of, needs_ranks, normal_ranks

pytestmark = [pytest.mark.gpu, pytest.mark.multigpu]


def _shared_gpu_smoke_worker(rank: int, world: int, group, n: int = 1 << 20) -> dict:
    """selftest._smoke_worker's steps 1 and 2 (CUDA IPC peer stores; NVSHMEM puts + signal and
    nvshmem_ptr), each rank on device_of(rank); the layout step is single-process and covered by
    test_layout_gpu.py."""
    from epcomm import _cuda, nvshmem_runtime as nvr
    from epcomm.jit import loader
    from epcomm.jit.launch import launch
    from epcomm.kernels.smoke import SmokeNvshmemSpec, SmokeParams, SmokePeerStoreSpec
    out: dict = {"layout": "skipped: ranks share a GPU (test_layout_gpu.py covers it)"}
    dev = device_of(rank)
    _cuda.init()
    _cuda.set_device(dev)
    stream = _cuda.stream_create()
    peer, src = (rank + 1) % world, (rank - 1) % world
    expect = lambda v: (v + np.arange(n, dtype=np.uint64)).astype(np.uint64)  # noqa: E731
    host = np.empty(n, np.uint64)

    spawn.phase("ipc peer store")
    base = _cuda.mem_alloc(n * 8)
    _cuda.memset_d8_async(base, 0, n * 8, stream)
    _cuda.stream_sync(stream)
    handles = group.allgather_bytes(_cuda.ipc_get_handle(base))
    peer_ptr = _cuda.ipc_open(handles[peer])
    launch(loader.load(SmokePeerStoreSpec(), dev).fn("peer_store"), 132, 256, stream,
           SmokeParams(base, peer_ptr, 0, 0, n, 1000 * (rank + 1), rank, peer))
    _cuda.stream_sync(stream)
    group.barrier()
    _cuda.memcpy_dtoh(host.ctypes.data, base, n * 8)
    out["ipc_peer_store"] = bool((host == expect(1000 * (src + 1))).all())
    group.barrier()
    _cuda.ipc_close(peer_ptr)
    _cuda.mem_free(base)

    spawn.phase("nvshmem init")
    nvr.init(group, dev, 64 << 20, shared_gpu=True)
    spawn.phase("nvshmem put/signal")
    buf, ptr = nvr.alloc(n * 8 + 64)
    sig = ptr + n * 8
    res = _cuda.mem_alloc(16)
    _cuda.memset_d8_async(ptr, 0, n * 8 + 64, stream)
    _cuda.memset_d8_async(res, 0, 16, stream)
    _cuda.stream_sync(stream)
    group.barrier()
    launch(loader.load(SmokeNvshmemSpec(), dev).fn("nvshmem_put"), 8, 256, stream,
           SmokeParams(ptr, 0, sig, res, n, 7 * (rank + 1), rank, peer))
    _cuda.stream_sync(stream)
    group.barrier()
    _cuda.memcpy_dtoh(host.ctypes.data, ptr, n * 8)
    r2 = np.empty(2, np.uint64)
    _cuda.memcpy_dtoh(r2.ctypes.data, res, 16)
    out["nvshmem_put_signal"] = bool((host == expect(7 * (src + 1))).all()) and int(r2[1]) == 1
    out["nvshmem_ptr_nvlink"] = int(r2[0]) == 1
    group.barrier()
    nvr.free(buf)
    _cuda.mem_free(res)
    return out


@needs_ranks
def test_peer_store_nvshmem_and_layout_on_all_gpus():
    n = normal_ranks()
    shared = len({device_of(r) for r in range(n)}) < n
    worker = _shared_gpu_smoke_worker if shared else selftest._smoke_worker
    res = spawn.run(worker, n, timeout=300)
    for rank, r in enumerate(res):
        assert r["ipc_peer_store"] is True, (rank, r)
        assert r["nvshmem_put_signal"] is True, (rank, r)
        assert r["nvshmem_ptr_nvlink"] is True, (rank, r)
        assert r["layout"] is True or str(r["layout"]).startswith("skipped"), (rank, r)
