"""NVSHMEM path smoke test on 2+ ranks (``epcomm selftest``'s worker): bootstrap through epcomm's
group abstraction, peer stores (memory shared with CUDA IPC, and with virtual memory below), the
symmetric heap, an NVSHMEM-linked kernel (puts + signals) and the layout kernel.  The rank count comes from ``normal_ranks``: one per GPU, or
ranks sharing a GPU under EPCOMM_SHARE_GPU=1 (NVSHMEM then runs several PEs per GPU)."""
from __future__ import annotations

import pytest

from epcomm.tools import selftest, spawn
from gpu_checks import needs_ranks, normal_ranks

pytestmark = [pytest.mark.gpu, pytest.mark.multigpu]


@needs_ranks
def test_peer_store_nvshmem_and_layout_on_all_gpus():
    res = spawn.run(selftest._smoke_worker, normal_ranks(), timeout=300)
    for rank, r in enumerate(res):
        assert r["peer_store"] is True, (rank, r)
        assert r["nvshmem_put_signal"] is True, (rank, r)
        assert r["nvshmem_ptr_nvlink"] is True, (rank, r)
        assert r["layout"] is True or str(r["layout"]).startswith("skipped: cupy"), (rank, r)


@needs_ranks
def test_peer_store_with_virtual_memory_and_file_descriptors():
    """EPCOMM_PEER_MEMORY=vmm: cuMemCreate memory, its handles passed over Unix sockets."""
    res = spawn.run(selftest._smoke_worker, normal_ranks(), timeout=300, env={"EPCOMM_PEER_MEMORY": "vmm"})
    for rank, r in enumerate(res):
        assert (r["peer_memory"], r["peer_store"]) == ("vmm", True), (rank, r)
