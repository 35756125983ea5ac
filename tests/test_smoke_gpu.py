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

