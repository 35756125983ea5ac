"""The rank mask of a Buffer made with ``enable_shrink=True`` (shrink mode).

Each mode engine keeps the mask as ``int32 [R]`` in memory its peers can write (the NVLink
buffer's header, or the symmetric heap), because the kernels publish there the ranks they mask
(see docs/design.md, "Rank masks").  :class:`RankMask` is the host's view of those words: one
device address per engine, read and written between calls, after this device's work is done.
"""
from __future__ import annotations

import numpy as np

from epcomm.runtime import driver
from epcomm.validate import check_bool, check_int


class RankMask:
    """The mask words of one Buffer: ``addrs`` (one device address of ``int32 [num_ranks]`` per
    engine), on ``device_id``; ``rank``: this process's rank, which cannot be masked."""

    def __init__(self, device_id: int, rank: int, num_ranks: int, addrs: list[int]):
        self.device_id, self.rank, self.num_ranks = device_id, rank, num_ranks
        self.addrs = list(addrs)

    def _read(self, addr: int) -> np.ndarray:
        host = np.zeros(self.num_ranks, dtype=np.int32)
        driver.memcpy_dtoh(host.ctypes.data, addr, host.nbytes)
        return host

    def _store(self, words: np.ndarray, seen: list) -> None:
        """Write into each engine the entries of ``words`` that differ from what was read there
        (``seen``), one word each: a peer's kernel may publish into the other entries meanwhile
        (its calls do not wait for this rank's host), and a whole-array write would undo that."""
        words = np.ascontiguousarray(words, dtype=np.int32)
        for addr, old in zip(self.addrs, seen):
            for i in np.flatnonzero(words != old):
                driver.memcpy_htod(addr + 4 * int(i), words[i:i + 1].ctypes.data, 4)

    def _union(self) -> tuple[np.ndarray, list]:
        """The union of the engines' words and what was read of each (device synchronised)."""
        driver.device_sync()
        seen = [self._read(addr) for addr in self.addrs]
        union = np.zeros(self.num_ranks, dtype=np.int32)
        for words in seen:
            union |= (words != 0).astype(np.int32)
        return union, seen

    def query(self) -> np.ndarray:
        """``int32 [R]``: 1 for every masked rank (the union of the engines' words, written back
        into each so that the modes agree), after this device's work is done."""
        with driver.on_device(self.device_id):
            union, seen = self._union()
            self._store(union, seen)
        return union

    def update(self, rank, masked=True) -> None:
        """Mask (``masked=True``) or unmask ``rank``.  TypeError/ValueError for a rank that is not
        an int in [0, R), this process's own rank, or a ``masked`` that is not a bool."""
        rank = check_int("rank", rank, lo=0, hi=self.num_ranks - 1)
        check_bool("masked", masked)
        if rank == self.rank:
            raise ValueError(f"rank={rank} is this process's own rank: a rank cannot mask itself "
                             f"(the others mask it; to leave, stop calling and destroy the Buffer)")
        with driver.on_device(self.device_id):
            union, seen = self._union()
            union[rank] = 1 if masked else 0
            self._store(union, seen)

    def clean(self) -> None:
        """Unmask every rank masked when the words are read (as :meth:`_store`: a peer's
        publication landing after the read is kept)."""
        with driver.on_device(self.device_id):
            _, seen = self._union()
            self._store(np.zeros(self.num_ranks, dtype=np.int32), seen)

    def masked_ranks(self) -> list[int]:
        """The masked ranks, ascending (:meth:`query` as a list)."""
        return [int(r) for r in np.flatnonzero(self.query())]
