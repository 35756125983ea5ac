"""The start aligners: every rank's timed region starts at the same moment on the GPUs
(:class:`Aligner`), or, for ranks sharing a GPU, after a host barrier (:class:`HostAligner`)."""
from __future__ import annotations

from epcomm.jit import loader
from epcomm.kernels import timing as K
from epcomm.runtime import driver
from epcomm.tools.bench.defaults import ALIGNER_MODES
from epcomm.tools.bench.timing import median


def clock_failed(aligned_per_rank: list[int], barriers: int) -> bool:
    """The 'clock' start barrier is judged failed when some rank saw fewer than half of the first
    ``barriers`` barriers align (each failure costs the barrier's 200 ms cap)."""
    return min(aligned_per_rank) * 2 < barriers


class Aligner:
    """Start every rank's timed region at the same moment on the GPUs.

    Host barriers leave ranks milliseconds apart, and a collective op then measures the wait
    for the slowest host.  Instead the GPUs wait, on the caller's stream, long enough for every
    host to queue the timed call before the start event is reached (1.5 ms: a normal dispatch's
    Python before its first launch took up to ~350 us on a busy host; what the host does after
    the GPU started, such as the CPU synchronisation inside a dispatch, stays inside the
    timing).  How every GPU knows when to leave is the mode:

    * "clock" (default): epcomm::start_barrier.  Rank 0 measures every GPU's %globaltimer offset
      against its own over peer memory (NTP-style, about 1 us of error over NVLink), picks
      a start 1.5 ms ahead and sends it to every GPU in that GPU's clock.  The clocks of the
      GPUs do not agree (about 0.5 ms apart on 2x H200), so a deadline in one clock cannot be
      shared as is.  Needs CUDA IPC between the ranks (one node).
    * "wall": a 1-element NCCL all-reduce, then a fixed 1.5 ms %globaltimer wait: the GPUs leave
      as unevenly as the all-reduce ended (tens of us apart on 2x H200; the late rank's op then
      measures only its own part, the early rank's also the wait).  Kept to measure that.

    Fallback ("clock" with ``fallback``): the barrier gives up a wait after 200 ms and the call
    goes on unaligned, so a barrier that never aligns would add 200 ms to every timed
    iteration.  After the first :attr:`PROBE_BARRIERS` barriers every rank learns how many
    aligned on each rank (an all-gather over the epcomm group, so all ranks decide alike) and,
    if some rank saw fewer than half align, all switch to "wall" (which needs ``dist``); the
    decision is in :meth:`summary`.  Every rank must call the aligner the same number of times.

    Raises ValueError for an unknown ``mode``, or "clock" without ``group``, before any GPU work.
    """

    MODES = ALIGNER_MODES
    PROBE_BARRIERS = 4

    def __init__(self, torch, dist, group=None, sleep_us: float = 1500.0, mode: str = "clock",
                 fallback: bool = True):
        if mode not in self.MODES:
            raise ValueError(f"aligner mode {mode!r}: expected one of {self.MODES}")
        if mode == "clock" and group is None:
            raise ValueError("aligner mode 'clock' needs the epcomm group (CUDA IPC handles are exchanged)")
        self.torch, self.dist, self.group, self.mode, self.requested = torch, dist, group, mode, mode
        self._launch = K.launch_one_block
        self._sleep_us = sleep_us
        self._mod = loader.load(K.SpinWaitSpec(), torch.cuda.current_device())
        self.fallback: dict | None = None
        self.reports: list[tuple[int, int, int]] = []
        self.opened: list = []
        self.chan = 0
        self._probe = 0
        if mode == "wall":
            self._use_wall()
            return
        self._open_channels(torch, group, sleep_us)
        self._probe = self.PROBE_BARRIERS if fallback else 0
        group.barrier()  # every channel zeroed before anyone pings

    def _open_channels(self, torch, group, sleep_us: float) -> None:
        """The 'clock' barrier's state: this rank's zeroed channel, every peer's opened over
        CUDA IPC, the report words and the kernel's parameters."""
        self._cuda = driver
        self._fn, self._threads = self._mod.fn("start_barrier"), K.ALIGN_THREADS
        self.chan = driver.mem_alloc(K.ALIGN_CHANNEL_BYTES)
        driver.memset_d8_async(self.chan, 0, K.ALIGN_CHANNEL_BYTES, torch.cuda.current_stream().cuda_stream)
        torch.cuda.synchronize()
        handles = group.allgather_bytes(driver.ipc_get_handle(self.chan))
        p = K.AlignParams()
        for r, h in enumerate(handles):
            if r == group.rank:
                p.chan[r] = self.chan
            else:
                p.chan[r] = driver.ipc_open(h)
                self.opened.append(p.chan[r])
        self.report = torch.zeros(3, dtype=torch.int64, device="cuda")
        p.lead_ns, p.cap_ns = int(sleep_us * 1e3), 200_000_000
        p.report = self.report.data_ptr()
        p.rank, p.num_ranks = group.rank, group.size
        self._p = p

    def _use_wall(self) -> None:
        self.mode = "wall"
        self.t = self.torch.zeros(1, device="cuda")
        self._fn, self._threads = self._mod.fn("spin_wait_ns"), K.SpinWaitSpec().threads
        self._p = K.SpinParams()
        self._p.ns = int(self._sleep_us * 1e3)

    def _judge(self) -> None:
        n = len(self.reports)
        mine = sum(r[2] for r in self.reports)
        counts = [int(b.decode()) for b in self.group.allgather_bytes(str(mine).encode())]
        if not clock_failed(counts, n):
            return
        self.fallback = {"after_barriers": n, "aligned_per_rank": counts}
        if self.dist is None:
            self.fallback["switched_to"] = None
            self.fallback["why_not"] = "no NCCL group for the 'wall' aligner"
            return
        self.fallback["switched_to"] = "wall"
        self._use_wall()

    def __call__(self):
        torch = self.torch
        torch.cuda.synchronize()
        if self.mode == "clock":
            if self._p.seq:
                self.reports.append(tuple(int(v) for v in self.report.tolist()))
            if self._probe and len(self.reports) >= self._probe:
                self._probe = 0
                self._judge()
        stream = torch.cuda.current_stream().cuda_stream
        if self.mode == "wall":
            self.dist.all_reduce(self.t)
        else:
            self._p.seq += 1
        self._launch(self._fn, self._threads, stream, self._p)

    def summary(self) -> dict:
        """The mode used (and a fallback from 'clock'); for 'clock' barriers: this GPU's clock
        offset vs rank 0's, best round trip and how many barriers aligned."""
        out: dict = {"mode": self.mode}
        if self.requested != self.mode:
            out["requested"] = self.requested
        if self.fallback:
            out["fallback"] = self.fallback
        if self.reports:
            offs = [r[0] for r in self.reports if r[2]]
            rtts = [r[1] for r in self.reports if r[2]]
            out.update({"barriers": len(self.reports), "aligned": sum(r[2] for r in self.reports),
                        "clock_offset_us_vs_rank0": median(offs) / 1e3 if offs else None,
                        "clock_offset_spread_us": (max(offs) - min(offs)) / 1e3 if offs else None,
                        "round_trip_us": median(rtts) / 1e3 if rtts else None})
        return out

    def close(self) -> None:
        if self.chan:
            self.torch.cuda.synchronize()
            for ptr in self.opened:
                self._cuda.ipc_close(ptr)
            self._cuda.mem_free(self.chan)
            self.opened, self.chan = [], 0


class HostAligner:
    """The start of each timed call for ranks that share a GPU: this process's device work
    finished, then a barrier of the epcomm group.

    Ranks sharing a GPU take turns on it (their kernels do not run at once), so the 'clock'
    barrier (kernels of every rank spinning together) cannot align and the 'wall' one needs
    NCCL, which refuses two ranks on one GPU.  Their timings mean nothing anyway; this keeps
    the calls of every rank in step.  Same interface as :class:`Aligner`."""

    mode = "host"

    def __init__(self, torch, group):
        self.torch, self.group = torch, group

    def __call__(self):
        self.torch.cuda.synchronize()
        self.group.barrier()

    def summary(self) -> dict:
        return {"mode": self.mode, "why": "ranks share a GPU: a host barrier before each timed call"}

    def close(self) -> None:
        pass
