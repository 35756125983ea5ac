"""Launch configuration of the normal (high-throughput) kernels."""
from __future__ import annotations

import numbers
from dataclasses import dataclass, replace

from epcomm import envs
from epcomm.validate import check_int
from epcomm.kernels.intranode import MAX_CHUNK_ROWS


@dataclass(frozen=True)
class Config:
    """SM budget and pipelining of one normal-mode operation.

    * ``num_sms``: SMs the operation may occupy in total (sending + receiving blocks, one block
      per SM).  The send and receive kernels of a dispatch run concurrently and share it.
    * ``chunk_rows``: rows per arrival flag; smaller chunks start the receiver earlier,
      larger ones cost fewer flag round trips.  Raised automatically if a call has more than
      1024 chunks per source.  Across nodes it is the rows of one network put (the NVLink hop
      is pulled by each receiver out of the forwarder's region, with no chunks of its own).
    * ``send_fraction``: share of ``num_sms`` given to sending blocks.  A third: the receivers
      copy twice the rows the senders do (the rank's own rows too), and 8 sending SMs already
      saturate NVLink between two H200s (benchmarks/nvlink_probe.py; profile_normal.py sweeps
      this: 0.33 was fastest at 12, 24 and 32 SMs for dispatch and combine, 2x H200; the
      per-rank-count defaults below use 0.5 from 4 ranks on).

    Raises TypeError if ``num_sms`` or ``chunk_rows`` is not an int (NumPy ints are accepted and
    stored as int) or ``send_fraction`` not a real number, ValueError if ``num_sms`` < 2,
    ``chunk_rows`` is outside [1, 2**24] (a 32-bit kernel field; see MAX_CHUNK_ROWS) or
    ``send_fraction`` outside (0, 1).  A ``num_sms`` above the GPU's SM count is rejected when a
    call uses the config (the device is not known here).
    """

    num_sms: int = 24
    chunk_rows: int = 64
    send_fraction: float = 0.33

    def __post_init__(self):
        # Store plain Python numbers: the values end up in ctypes fields and launch grids, which
        # reject NumPy scalars (after other kernels of the same call were launched).
        n = check_int("Config.num_sms", self.num_sms)
        if n < 2:
            raise ValueError(f"Config.num_sms={n}: needs at least 2 (one sending, one receiving block)")
        c = check_int("Config.chunk_rows", self.chunk_rows, lo=1, hi=MAX_CHUNK_ROWS)
        f = self.send_fraction
        if isinstance(f, bool) or not isinstance(f, numbers.Real):
            raise TypeError(f"Config.send_fraction must be a real number, got {type(f).__name__}")
        f = float(f)
        if not 0.0 < f < 1.0:  # also rejects NaN
            raise ValueError(f"Config.send_fraction={f}: must be in (0, 1)")
        object.__setattr__(self, "num_sms", n)  # frozen dataclass
        object.__setattr__(self, "chunk_rows", c)
        object.__setattr__(self, "send_fraction", f)

    def split(self) -> tuple[int, int]:
        s = min(self.num_sms - 1, max(1, round(self.num_sms * self.send_fraction)))
        return s, self.num_sms - s

    def with_sms(self, n: int) -> "Config":
        return replace(self, num_sms=n)


def _send_fraction(num_ranks: int) -> float:
    # Measured with benchmarks/profile_normal.py at 24 SMs: a third was fastest on 2x H200; on
    # 4x H200 (three peers to write to, the receivers' share of own rows smaller) the sweep in
    # benchmarks/results/profile-normal-h200-x4.json (rank 0, dispatch BF16 / FP8 / combine, us):
    # 0.4 714 / 457 / 608, 0.5 667 / 428 / 567, 0.6 670 / 413 / 633.  Mean of the
    # 4 ranks: 0.4 slower for every operation, 0.6 slower for the combine (686 vs 605) but about
    # equal for BF16 (697 vs 700) and faster for FP8 (442 vs 458): 0.5 is the compromise.
    # 8 ranks: not measured, the 4-rank choice is kept.
    return 0.33 if num_ranks <= 2 else 0.5


def _chunk_rows(num_ranks: int, op: str) -> int:
    # benchmarks/profile_normal.py, 24 SMs, outputs allocated ahead (dispatch BF16 / FP8 / combine),
    # rank 0 of benchmarks/results/profile-normal-h200-x2.json / -x4.json:
    # 2x H200: 64-row chunks 342 / 271 / 269 us, 128-row 324 / 238 / 217 (one run); an earlier
    #   run (no result file kept): 64 349 / 260 / 224, 128 349 / 249 / 212, 256 377 / 263 / 240.
    # 4x H200 (send share 0.5): 64 667 / 428 / 567, 128 650 / 396 / 578: the dispatch gains,
    #   the combine does not (within the run-to-run noise), so it keeps 64 there.
    # 8 ranks: not measured; smaller chunks keep the first arrival early with more sources.
    if num_ranks <= 2:
        return 128
    if num_ranks <= 4:
        return 128 if op == "dispatch" else 64
    return 32


# Across nodes, ``chunk_rows`` is the rows of one network put (one signal each): a chunk's rows
# become readable only when the whole put arrived, so smaller chunks let the receivers start
# sooner.  Not measured on a cluster (no machine with RDMA NICs at hand); 32 rows of 14 KB
# (H 7168, BF16) are ~0.46 MB per put.  The SMs are split evenly (send and receive kernels run
# one after the other on the comm stream, so each may use the whole budget: see
# epcomm.internode).
INTERNODE_CHUNK_ROWS = 32


def default_dispatch_config(num_ranks: int, num_nodes: int = 1) -> Config:
    """Default dispatch config per rank and node count (EPCOMM_NUM_SMS sets the SM budget)."""
    if num_nodes > 1:
        return Config(num_sms=envs.NUM_SMS.get(), chunk_rows=INTERNODE_CHUNK_ROWS, send_fraction=0.5)
    return Config(num_sms=envs.NUM_SMS.get(), chunk_rows=_chunk_rows(num_ranks, "dispatch"),
                  send_fraction=_send_fraction(num_ranks))


def default_combine_config(num_ranks: int, num_nodes: int = 1) -> Config:
    if num_nodes > 1:
        return Config(num_sms=envs.NUM_SMS.get(), chunk_rows=INTERNODE_CHUNK_ROWS, send_fraction=0.5)
    return Config(num_sms=envs.NUM_SMS.get(), chunk_rows=_chunk_rows(num_ranks, "combine"),
                  send_fraction=_send_fraction(num_ranks))
