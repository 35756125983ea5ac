"""NVSHMEM path smoke test on 2+ ranks (``epcomm selftest``'s worker): bootstrap through epcomm's
group abstraction, CUDA IPC peer stores, the symmetric heap, an NVSHMEM-linked kernel (puts +
signals) and the layout kernel.  The rank count comes from ``normal_ranks``: one per GPU, or
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
        assert r["ipc_peer_store"] is True, (rank, r)
        assert r["nvshmem_put_signal"] is True, (rank, r)
        assert r["nvshmem_ptr_nvlink"] is True, (rank, r)
        assert r["layout"] is True or str(r["layout"]).startswith("skipped: cupy"), (rank, r)
