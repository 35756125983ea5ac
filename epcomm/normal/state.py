"""The NVLink engine's memory: this rank's buffer, its peers' mappings, the private control
words, the host-mapped count record, and the speculation history of the receive sizes.

Why memory of its own shared between processes (runtime.peer_memory: CUDA IPC, or the driver's
virtual memory with file-descriptor handles) and not NVSHMEM peer pointers: it needs no NVSHMEM
runtime (the training path works where nvshmem4py is not installed), each Buffer owns memory of
exactly its requested size instead of sizing a process-wide symmetric heap up front, and the
kernels only ever use plain loads and stores through peer pointers, which both mechanisms provide.
"""
from __future__ import annotations

import ctypes
import time

import numpy as np

from epcomm import envs
from epcomm.errors import EpcommTimeoutError
from epcomm.kernels import intranode as K_intra
from epcomm.runtime import driver
from epcomm.runtime.peer_memory import PeerMemory

# Receive sizes remembered per (tokens, experts) for the speculative outputs.
HISTORY = 4


class NvlinkState:
    """This rank's NVLink buffer, its peers' mappings and the private control words.

    Made collectively (every rank of ``ctx.group``); what was made is freed if a step raises.
    """

    def __init__(self, ctx, num_nvl_bytes: int):
        R = ctx.num_ranks
        self.layout = K_intra.BufferLayout.for_bytes(R, num_nvl_bytes)
        self.peers: list[int] = [0] * R
        self.memory: PeerMemory | None = None  # this rank's buffer, mapped by every rank
        self.base = self.ctrl = self.prof = 0
        self.host_info = 0
        self.host_info_dev = 0
        self.spec_hits = 0       # receives written into outputs allocated before the counts
        self.spec_misses = 0     # speculative outputs too small: that receive stood down, exact ones relaunched
        self.orphans: list = []  # speculative outputs of calls interrupted before the counts arrived
        # Receive rows of the last CPU-synchronised dispatches, per (tokens, experts): the
        # size of the next call's speculative outputs.
        self.recv_history: dict = {}
        self.speculation = float(envs.RECV_SPECULATION.get())
        self.host_stamps: dict = {}
        try:
            self._map_peers(ctx)
            self.template = self._template(ctx)
            self._alloc_profile(ctx)
        except BaseException:
            with driver.on_device(ctx.device_id):
                self.free()  # what was made so far: memory, pinned words, peers' mappings
            raise

    def _map_peers(self, ctx) -> None:
        lay, R, s = self.layout, ctx.num_ranks, ctx.stream
        with driver.on_device(ctx.device_id):
            self.memory = PeerMemory(ctx.device_id, lay.total_bytes)
            self.base = self.memory.local
            driver.memset_d8_async(self.base, 0, lay.staging_off, s)
            self.ctrl = driver.mem_alloc(ctypes.sizeof(K_intra.IntraCtrl))
            driver.memset_d8_async(self.ctrl, 0, ctypes.sizeof(K_intra.IntraCtrl), s)
            n_info = 2 + R + K_intra.MAX_LOCAL_EXPERTS
            self.host_info, self.host_info_dev = driver.host_alloc_mapped(4 * n_info)
            ctypes.memset(self.host_info, 0, 4 * n_info)
            self.info = np.frombuffer((ctypes.c_int32 * n_info).from_address(self.host_info), dtype=np.int32)
            driver.stream_sync(s)
            self.peers = self.memory.share(ctx.group)
        ctx.group.barrier()

    def _template(self, ctx) -> K_intra.IntraParams:
        lay = self.layout
        t = K_intra.IntraParams()
        for r in range(ctx.num_ranks):
            t.peers[r] = self.peers[r]
        t.ctrl = self.ctrl
        t.err = ctx.err.dev_ptr
        t.host_info = self.host_info_dev
        t.ack_off, t.mailbox_tag_off, t.mailbox_off = lay.ack_off, lay.mailbox_tag_off, lay.mailbox_off
        t.flags_off, t.staging_off, t.region_bytes = lay.flags_off, lay.staging_off, lay.region_bytes
        t.rank, t.num_ranks = ctx.rank, ctx.num_ranks
        t.mask_off, t.shrink = lay.mask_off, int(ctx.shrink)
        t.mailbox_ints, t.max_chunks = K_intra.MAILBOX_INTS, K_intra.MAX_CHUNKS
        return t

    def _alloc_profile(self, ctx) -> None:
        """EPCOMM_PROFILE: per-block stamps of every kernel, read by :meth:`profile_stamps`."""
        if not envs.PROFILE.get():
            return
        self.prof_bytes = 8 * K_intra.PROF_SLOTS * K_intra.PROF_MAX_BLOCKS * len(K_intra.PROF_KERNELS)
        with driver.on_device(ctx.device_id):
            self.prof = driver.mem_alloc(self.prof_bytes)
            driver.memset_d8_async(self.prof, 0, self.prof_bytes, ctx.stream)
            driver.stream_sync(ctx.stream)
        self.template.prof = self.prof

    def params(self, timeout_s: float) -> K_intra.IntraParams:
        """A fresh copy of the launch parameters' constant part, with the call's deadline."""
        p = K_intra.IntraParams()
        ctypes.pointer(p)[0] = self.template
        p.timeout_ns = int(timeout_s * 1e9)
        return p

    # ---- the counts of a CPU-synchronised dispatch --------------------------------------------
    def speculative_rows(self, key) -> int:
        """Rows of the outputs to allocate before the counts are known: the largest of the last
        HISTORY receives of this shape plus EPCOMM_RECV_SPECULATION, rounded up to 64 rows; 0
        (no speculation) for a shape not seen yet or with the knob negative."""
        hist = self.recv_history.get(key)
        if not hist or self.speculation < 0:
            return 0
        rows = int(max(hist) * (1.0 + self.speculation)) + 1
        return max(64, -(-rows // 64) * 64)

    def remember_rows(self, key, rows: int) -> None:
        hist = self.recv_history.setdefault(key, [])
        hist.append(rows)
        del hist[:-HISTORY]

    @property
    def mask_addr(self) -> int:
        """Device address of this rank's mask words (int32 [R], in the buffer's header)."""
        return self.base + self.layout.mask_off

    def wait_counts(self, ctx, what: str) -> None:
        """Spin until the notify kernel published the counts (bounded by the timeout)."""
        wait_counts(self.info, ctx, what)

    # ---- profiling and teardown --------------------------------------------------------------
    def profile_stamps(self, ctx) -> dict | None:
        """Per-block stamps of the last kernels (see Buffer.profile_stamps); None unless profiling."""
        if not self.prof:
            return None
        host = ctx.drain(self.prof, self.prof_bytes)
        host = host.reshape(len(K_intra.PROF_KERNELS), K_intra.PROF_MAX_BLOCKS, K_intra.PROF_SLOTS)
        out = {k: host[i] for i, k in enumerate(K_intra.PROF_KERNELS)}
        out["host"] = dict(self.host_stamps)  # time.time_ns() of the last dispatch's host steps
        self.host_stamps.clear()
        return out

    def free(self) -> None:
        """Unmap the peers and free this rank's memory (errors ignored: teardown goes on)."""
        if self.memory is not None:
            self.memory.free()  # the peers' mappings, then this rank's buffer
            self.memory = None
        self.base = 0
        for attr, free in (("ctrl", driver.mem_free), ("prof", driver.mem_free),
                           ("host_info", driver.host_free)):
            ptr = getattr(self, attr, 0)
            if ptr:
                try:
                    free(ptr)
                except Exception:
                    pass
                setattr(self, attr, 0)


# Shrink timeouts the notify (2: acknowledgements, then mailboxes) and the combine queued ahead of
# it (2: its receive role waits for rows its peers send after their acknowledgement waits) may
# take at most, each wait masking its peer at its deadline.
SHRINK_WAIT_TIMEOUTS = 4.0


def counts_wait_s(ctx) -> float:
    """How long the CPU waits for a dispatch's counts: EPCOMM_TIMEOUT_S, but in shrink mode at
    least SHRINK_WAIT_TIMEOUTS times the kernels' own timeout (EPCOMM_SHRINK_TIMEOUT_MS, which
    may be the longer), plus 2 s for the kernel to record why it stopped.  The notify masks a
    missing peer only at its mailbox deadline, two timeouts in (shrink_deadline in
    epcomm_common.cuh), and the combine ahead of it on the comm stream may have waited two."""
    wait = max(ctx.timeout_s, SHRINK_WAIT_TIMEOUTS * ctx.kernel_timeout_s()) if ctx.shrink else ctx.timeout_s
    return wait + 2.0


def wait_counts(info, ctx, what: str) -> None:
    """Spin until a notify kernel set ``info[0]`` (host-mapped; the host zeroed it before the
    launch), for at most :func:`counts_wait_s`; raises the kernels' recorded error, or
    EpcommTimeoutError (and poisons the context's error state)."""
    if info[0]:
        return
    start = time.monotonic()
    deadline = start + counts_wait_s(ctx)
    spins = 0
    # Spin hard first: the receive kernel is launched only after this returns, so every
    # microsecond here is on the GPU's critical path (a 100 us sleep granularity cost about
    # that much per dispatch).  Back off to short sleeps only after 20 ms.
    while info[0] == 0:
        spins += 1
        if spins & 0xFF == 0:
            # Only an error that stops the kernels ends this wait: a bad index (skipped by
            # the kernels) is raised at the next call, after this one completed everywhere.
            if ctx.err.aborting():
                ctx.err.check(what)
            if time.monotonic() > deadline:
                exc = counts_timeout(info, ctx, what)
                ctx.err.poisoned = exc
                raise exc
            if time.monotonic() - start > 0.02:
                time.sleep(0.00002)


def counts_timeout(info, ctx, what: str) -> EpcommTimeoutError:
    """The error of a CPU wait for the counts that outlived the kernels' own deadline: names the
    ranks whose counts never arrived (``info[2 + s]`` stays -1 until the notify kernel heard
    from source s), or says the notify kernel never ran."""
    missing = [s for s in range(ctx.num_ranks) if info[2 + s] < 0]
    if ctx.rank in missing:  # the kernel hears from this rank first: it never ran
        why = "the notify kernel never ran: the GPU is blocked by earlier work"
        peer = -1
    else:
        why = f"ranks {missing} never sent theirs: they died or did not call {what}"
        peer = missing[0] if missing else -1
    return EpcommTimeoutError(f"rank {ctx.rank}: {what}: the token counts of the peers did not arrive within "
                              f"{counts_wait_s(ctx):.0f} s (phase notify); {why}", rank=ctx.rank, phase="notify",
                              peer=peer)
