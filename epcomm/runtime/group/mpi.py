"""MPIGroup: an mpi4py intra-communicator, through its own collectives."""
from __future__ import annotations

from typing import Any

from epcomm.runtime.group.protocol import as_bytes, check_root, root_payload


class MPIGroup:
    """An mpi4py intra-communicator.  Collectives block as the underlying MPI calls do."""

    def __init__(self, comm: Any):
        self.comm = comm
        self.rank = int(comm.Get_rank())
        self.size = int(comm.Get_size())

    def allgather_bytes(self, data: bytes) -> list[bytes]:
        """Return every rank's ``data``, indexed by rank in ``comm``."""
        return [bytes(b) for b in self.comm.allgather(as_bytes(data, "allgather_bytes"))]

    def broadcast_bytes(self, data: bytes | None, root: int = 0) -> bytes:
        """Return ``data`` of rank ``root`` on every rank."""
        check_root(root, self.size)
        return bytes(self.comm.bcast(root_payload(data, self.rank, root), root=root))

    def barrier(self) -> None:
        """Return once every rank of ``comm`` has entered the barrier."""
        self.comm.Barrier()

    def __repr__(self) -> str:
        return f"MPIGroup(rank={self.rank}, size={self.size})"
