"""TorchGroup: a torch.distributed process group, exchanging bytes through the job's store."""
from __future__ import annotations

import datetime
import hashlib
from typing import Any

from epcomm.errors import EpcommError
from epcomm.runtime.group.protocol import (
    KeyValueGroup, as_bytes, cause_text, check_root, root_payload,
)

_TORCH_GROUPS: dict = {}  # global ranks of a group -> TorchGroups made for them in this process


class TorchGroup(KeyValueGroup):
    """A torch.distributed process group (any backend: gloo, nccl, ...).

    ``pg=None`` means the default group.  The bytes travel through the job's store (the
    TCPStore or FileStore that ``init_process_group`` set up), not through the backend: no
    communicator is created for them, no GPU is involved, and every wait is bounded by
    ``timeout_s`` (default ``EPCOMM_GROUP_TIMEOUT_S``): a rank that never arrives makes the others
    raise EpcommTimeoutError naming it, instead of waiting for torch's process-group timeout
    (10 to 30 minutes; NCCL's watchdog may abort the process instead).  Keys are
    ``epcomm/torch/<group>/<n>/<round>/<rank>``, ``<n>`` counting the TorchGroups of the same
    ranks used in this process (taken at the first collective; ranks use them in the same
    order, as they create Buffers collectively); each rank deletes its keys once every rank
    has read them.  Where torch offers no usable default store (a private torch API; the MPI
    backend's placeholder), the object collectives are used, bounded by torch's own timeout.
    A store that fails (its host exited) raises EpcommError saying so.

    Raises RuntimeError if torch.distributed is not initialized, ValueError if this
    process is not a member of ``pg``.
    """

    def __init__(self, pg: Any = None, timeout_s: float | None = None):
        import torch.distributed as dist
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError("TorchGroup: torch.distributed is not initialized "
                               "(call torch.distributed.init_process_group first)")
        if pg is dist.GroupMember.NON_GROUP_MEMBER:
            raise ValueError("TorchGroup: this process is not a member of the given group "
                             "(torch.distributed.new_group returned NON_GROUP_MEMBER here)")
        super().__init__(dist.get_rank(pg), dist.get_world_size(pg), timeout_s)
        self.pg = pg
        if self.rank < 0:
            raise ValueError("TorchGroup: this process is not a member of the given group")
        self._store = None
        try:
            from torch.distributed import distributed_c10d as c10d
            store = c10d._get_default_store()
            if pg is None or pg is dist.GroupMember.WORLD:
                ranks = tuple(range(dist.get_world_size()))
            else:
                ranks = tuple(int(r) for r in dist.get_process_group_ranks(pg))
            # A real call, not hasattr: the MPI backend's placeholder store has every method
            # and implements none.
            store.check(["epcomm/torch/probe"])
        except Exception:
            return  # the object collectives
        self._ranks = ranks
        self._tag = hashlib.sha1(",".join(map(str, ranks)).encode()).hexdigest()[:12]
        self._store = store

    # ---- the store's primitives ----
    def _new_prefix(self) -> str:
        # the n-th TorchGroup of these ranks *used* in this process
        n = _TORCH_GROUPS.get(self._ranks, 0)
        _TORCH_GROUPS[self._ranks] = n + 1
        return f"epcomm/torch/{self._tag}/{n}"

    def _set(self, key: str, value: bytes) -> None:
        self._store.set(key, value)

    def _get(self, key: str, timeout_s: float) -> bytes:
        self._store.wait([key], datetime.timedelta(seconds=timeout_s))
        return bytes(self._store.get(key))

    def _present(self, key: str) -> bool:
        return bool(self._store.check([key]))

    def _delete(self, key: str) -> None:
        self._store.delete_key(key)

    def _store_failed(self, exc: Exception, where: str) -> Exception:
        # DistStoreError / RuntimeError, by torch version
        return EpcommError(f"rank {self.rank}: torch.distributed's store failed in {where} "
                           f"({cause_text(exc)}); is the process that hosts it (rank 0 of the job) "
                           "still running?")

    # ---- the collectives: the store's rounds, else torch's object collectives ----
    def allgather_bytes(self, data: bytes) -> list[bytes]:
        """Return every rank's ``data``, indexed by group rank.

        Raises EpcommTimeoutError if some rank does not contribute within the timeout.
        """
        if self._store is not None:
            return super().allgather_bytes(data)
        import torch.distributed as dist
        data = as_bytes(data, "allgather_bytes")
        out: list[Any] = [None] * self.size
        dist.all_gather_object(out, data, group=self.pg)
        return [bytes(b) for b in out]

    def broadcast_bytes(self, data: bytes | None, root: int = 0) -> bytes:
        """Return ``data`` of group rank ``root`` on every rank.

        Raises EpcommTimeoutError on a non-root if the root does not publish in time.
        """
        if self._store is not None:
            return super().broadcast_bytes(data, root)
        import torch.distributed as dist
        check_root(root, self.size)
        box = [root_payload(data, self.rank, root)]
        # object collectives take the *global* rank as src
        if self.pg is None or self.pg is dist.GroupMember.WORLD:
            src = root
        else:
            src = dist.get_global_rank(self.pg, root)
        dist.broadcast_object_list(box, src=src, group=self.pg)
        return bytes(box[0])

    def barrier(self) -> None:
        """Return once every rank of the group has entered the barrier.

        Raises EpcommTimeoutError naming the ranks that did not arrive within the timeout.
        """
        if self._store is not None:
            return super().barrier()
        import torch.distributed as dist
        dist.barrier(group=self.pg)

    def __repr__(self) -> str:
        how = "store" if self._store is not None else "object collectives"
        return f"TorchGroup(rank={self.rank}, size={self.size}, {how})"
