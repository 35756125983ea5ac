"""NVSHMEM path smoke test on 2+ GPUs: bootstrap through epcomm's group abstraction, symmetric heap,
an NVSHMEM-linked kernel (puts + signals) and a plain peer-store kernel (CUDA IPC)."""
from __future__ import annotations

import pytest

from epcomm import selftest, spawn

pytestmark = [pytest.mark.gpu, pytest.mark.multigpu]


@pytest.mark.skipif(spawn.gpu_count() < 2, reason="needs 2 or more NVIDIA GPUs (GPU test)")
def test_peer_store_nvshmem_and_layout_on_all_gpus():
    res = spawn.run(selftest._smoke_worker, spawn.gpu_count(), timeout=300)
    for rank, r in enumerate(res):
        assert r["ipc_peer_store"] is True, (rank, r)
        assert r["nvshmem_put_signal"] is True, (rank, r)
        assert r["nvshmem_ptr_nvlink"] is True, (rank, r)
        assert r["layout"] is True or str(r["layout"]).startswith("skipped"), (rank, r)


def _spin_worker(rank, world, group):
    import torch

    from epcomm.jit import loader
    from epcomm.jit.launch import launch
    from epcomm.kernels.timing import SpinParams, SpinWaitSpec
    torch.cuda.set_device(rank)
    torch.zeros(1, device="cuda")  # torch's context current on this thread
    fn = loader.load(SpinWaitSpec(), rank).fn("spin_wait_ns")
    out = {}
    for us in (200, 2000):
        p = SpinParams()
        p.ns = us * 1000
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        launch(fn, 1, 32, torch.cuda.current_stream().cuda_stream, p)
        b.record()
        b.synchronize()
        out[us] = a.elapsed_time(b) * 1e3
    return out


@pytest.mark.gpu
@pytest.mark.skipif(spawn.gpu_count() < 1, reason="needs an NVIDIA GPU (GPU test)")
def test_benchmark_wait_kernel_waits_the_requested_wall_time():
    # epcomm.bench's aligner relies on it: the wait must not end early, nor run long.
    res = spawn.run(_spin_worker, 1, timeout=120)[0]
    for us, got in res.items():
        assert us <= got < us + 500, (us, got)
