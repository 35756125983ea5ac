"""Device memory of one rank that every rank of its group maps: the NVLink buffer's storage.

Two ways, chosen by ``EPCOMM_PEER_MEMORY`` (the same on every rank):

- ``ipc``: ``cuMemAlloc`` and legacy CUDA IPC handles, gathered through the group.
- ``vmm``: ``cuMemCreate`` with file-descriptor handles passed over Unix sockets
  (:mod:`epcomm.runtime.fdpass`); each mapping holds a reference to the physical memory, so a
  rank that dies leaves its memory mapped, and writable, in the survivors
  (:mod:`epcomm.runtime.vmm` says why that matters).

Made in two steps so the owner can initialise its memory before peers see it:
``PeerMemory(device_id, nbytes)`` allocates (not collective), :meth:`share` maps every peer's
(collective).  :meth:`free` undoes whatever was done, in any state.
"""
from __future__ import annotations

import os

from epcomm import envs
from epcomm.runtime import driver, fdpass, vmm

# The longest the descriptor exchange waits by default (all ranks are past a barrier by then).
EXCHANGE_TIMEOUT_S = 60.0


class PeerMemory:
    """``nbytes`` of device memory on ``device_id``, and after :meth:`share` the addresses of
    every rank's: ``ptrs[r]`` (``ptrs[rank]`` is :attr:`local`)."""

    def __init__(self, device_id: int, nbytes: int, kind: str | None = None):
        self.kind = kind or envs.PEER_MEMORY.get()
        if self.kind not in ("ipc", "vmm"):
            raise ValueError(f"PeerMemory: kind must be 'ipc' or 'vmm', got {self.kind!r}")
        self.device_id = device_id
        self.nbytes = int(nbytes)
        self.ptrs: list[int] = []
        self._handle = 0                       # vmm: this rank's allocation
        self._peers: list[tuple[int, int, int]] = []  # what share() mapped: (address, vmm handle or 0, bytes)
        if self.kind == "ipc":
            self.local = driver.mem_alloc(self.nbytes)
            self.size = self.nbytes
        else:
            vmm.check_supported(device_id)
            self.size = vmm.rounded(self.nbytes, device_id)
            self._handle = vmm.create(self.size, device_id)
            try:
                self.local = vmm.map_rw(self._handle, self.size, device_id)
            except BaseException:
                vmm.release(self._handle)
                self._handle = 0
                raise

    def share(self, group, timeout_s: float | None = None) -> list[int]:
        """Map every rank's memory (collective over ``group``, whose ranks share one host);
        returns :attr:`ptrs`.  ``timeout_s`` bounds the descriptor exchange of ``vmm`` (default
        the shorter of ``EPCOMM_GROUP_TIMEOUT_S`` and 60 s: every rank has reached the exchange
        when it starts, so a rank that cannot pass its handle is found out in seconds).  ValueError if the ranks chose different kinds;
        on any error what this rank mapped is unmapped by :meth:`free`, not here."""
        kinds = [k.decode() for k in group.allgather_bytes(self.kind.encode())]
        if len(set(kinds)) != 1:
            raise ValueError(f"EPCOMM_PEER_MEMORY must agree on all ranks, got {kinds} (by rank)")
        ptrs = [0] * group.size
        ptrs[group.rank] = self.local
        if self.kind == "ipc":
            handles = group.allgather_bytes(driver.ipc_get_handle(self.local))
            for r in range(group.size):
                if r != group.rank:
                    ptrs[r] = driver.ipc_open(handles[r])
                    self._peers.append((ptrs[r], 0, 0))
        else:
            self._share_vmm(group, ptrs, timeout_s)
        self.ptrs = ptrs
        return ptrs

    def _share_vmm(self, group, ptrs: list[int], timeout_s: float | None) -> None:
        sizes = [int(s) for s in group.allgather_bytes(str(self.size).encode())]
        wait = min(float(envs.GROUP_TIMEOUT_S.get()), EXCHANGE_TIMEOUT_S) if timeout_s is None else timeout_s
        fd = vmm.export_fd(self._handle)
        try:
            got = fdpass.exchange_fds(group, fd, range(group.size), "peer-memory", wait)
        finally:
            os.close(fd)
        try:
            for r, peer_fd in sorted(got.items()):
                handle = vmm.import_fd(peer_fd)
                try:
                    ptrs[r] = vmm.map_rw(handle, sizes[r], self.device_id)
                except BaseException:
                    vmm.release(handle)
                    raise
                self._peers.append((ptrs[r], handle, sizes[r]))
        finally:
            for f in got.values():
                os.close(f)

    def free(self) -> None:
        """Unmap the peers' memory, then free this rank's (errors ignored: teardown goes on)."""
        for ptr, handle, size in self._peers:
            _quietly(lambda: driver.ipc_close(ptr) if self.kind == "ipc" else vmm.unmap(ptr, size))
            if handle:
                _quietly(lambda: vmm.release(handle))
        self._peers = []
        self.ptrs = []
        if getattr(self, "local", 0):
            if self.kind == "ipc":
                _quietly(lambda: driver.mem_free(self.local))
            else:
                _quietly(lambda: vmm.unmap(self.local, self.size))
            self.local = 0
        if self._handle:
            _quietly(lambda: vmm.release(self._handle))
            self._handle = 0


def _quietly(step) -> None:
    try:
        step()
    except Exception:
        pass
