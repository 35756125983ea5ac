"""The communication buffer: normal (high-throughput) and low-latency expert-parallel
dispatch/combine.

``Buffer`` is created collectively by every rank of a group (one process per GPU).  The
normal mode uses an NVLink buffer (``num_nvl_bytes``) mapped into every peer with CUDA IPC;
the low-latency mode uses the NVSHMEM symmetric heap (see :mod:`epcomm.low_latency`).

Why CUDA IPC and not NVSHMEM peer pointers for the normal mode: it needs no NVSHMEM runtime
(the training path works where nvshmem4py is not installed), each Buffer owns memory of exactly
its requested size instead of sizing a process-wide symmetric heap up front, and the kernels
only ever use plain loads and stores through peer pointers, which both mechanisms provide.
"""
from __future__ import annotations

import atexit
import ctypes
import itertools
import time
import weakref
from dataclasses import dataclass, field

import numpy as np

from epcomm.runtime import driver
from epcomm import envs, interop
from epcomm.runtime import event as event_mod
from epcomm.runtime.errstate import ErrorState
from epcomm.validate import check_event, check_int, check_topk_indices
from epcomm.config import Config, default_combine_config, default_dispatch_config
from epcomm.errors import BufferStateError, EpcommTimeoutError
from epcomm.runtime.event import EventOverlap
from epcomm.runtime.group import as_group
from epcomm.jit import loader
from epcomm.jit.launch import launch
from epcomm.kernels import intranode as K_intra
from epcomm.kernels import layout as K_layout

_LIVE_BUFFERS: "weakref.WeakSet[Buffer]" = weakref.WeakSet()
# Every Buffer's number in this process, recorded in its handles: unlike id(), never reused by a
# later Buffer after this one is collected, so a stale handle cannot pass for one of its own.
_BUFFER_SERIALS = itertools.count(1)

# Comm streams of destroyed Buffers, per device, for the next Buffer.  Never destroyed: torch's
# allocator records an event on every stream a tensor was record_stream()ed on (async_finish
# does that with the comm streams) when the tensor is freed, which may be after the Buffer is
# gone; on a destroyed stream that fails inside a destructor and aborts the process.
_SPARE_STREAMS: dict[int, list[int]] = {}


def _take_stream(device: int) -> int:
    spare = _SPARE_STREAMS.get(device)
    return spare.pop() if spare else driver.stream_create()


@atexit.register
def _destroy_all() -> None:  # pragma: no cover - exercised at interpreter exit
    for b in list(_LIVE_BUFFERS):
        try:
            b.destroy()
        except Exception:
            pass


@dataclass(eq=False)
class DispatchHandle:
    """Everything a combine (or a cached dispatch) needs to retrace a dispatch.

    Opaque to users; keep it as long as the received tensors.  ``buffer_id`` is the serial of
    the Buffer that made it (``Buffer._serial``).  ``num_recv_tokens`` and
    ``recv_counts`` (rows per source rank) are None in ``num_worst_tokens`` mode, where they
    are known only on the GPU.  ``recv_src_idx`` (int32 [rows]) holds the source-token index
    of every received row (-1 for padding rows).
    """

    buffer_id: int
    framework: str
    device_id: int
    num_ranks: int
    rank: int
    num_tokens: int
    hidden: int
    num_experts: int
    num_topk: int
    num_worst_tokens: int
    out_rows: int
    num_recv_tokens: int | None
    recv_counts: tuple | None
    rank_prefix: object
    send_list: object
    send_pos: object
    send_count: object
    is_token_in_rank: object
    recv_src_idx: object
    refs: dict = field(repr=False, default_factory=dict)


def _ptr(ref) -> int:
    return 0 if ref is None else ref.ptr


class _IntraState:
    """This rank's NVLink buffer, its peers' mappings and the private control words."""

    def __init__(self, buf: "Buffer", num_nvl_bytes: int):
        R = buf.num_ranks
        self.layout = K_intra.BufferLayout.for_bytes(R, num_nvl_bytes)
        lay = self.layout
        dev = buf.device_id
        self.peers: list[int] = [0] * R
        self.opened: list[int] = []
        self.base = self.ctrl = self.prof = 0
        self.host_info = 0
        self.host_info_dev = 0
        try:
            self._setup(buf, lay, dev, R)
        except BaseException:
            with driver.on_device(dev):
                self.free()  # what was made so far: memory, pinned words, peers' mappings
            raise

    def _setup(self, buf: "Buffer", lay, dev: int, R: int) -> None:
        with driver.on_device(dev):
            self.base = driver.mem_alloc(lay.total_bytes)
            s = buf._stream
            driver.memset_d8_async(self.base, 0, lay.staging_off, s)
            self.ctrl = driver.mem_alloc(ctypes.sizeof(K_intra.IntraCtrl))
            driver.memset_d8_async(self.ctrl, 0, ctypes.sizeof(K_intra.IntraCtrl), s)
            n_info = 2 + R + K_intra.MAX_LOCAL_EXPERTS
            self.host_info, self.host_info_dev = driver.host_alloc_mapped(4 * n_info)
            ctypes.memset(self.host_info, 0, 4 * n_info)
            self.info = np.frombuffer((ctypes.c_int32 * n_info).from_address(self.host_info), dtype=np.int32)
            self.spec_hits = 0       # receives written into outputs allocated before the counts
            self.spec_misses = 0     # speculative outputs too small: that receive stood down, exact ones relaunched
            self.orphans: list = []  # speculative outputs of calls interrupted before the counts arrived
            # Receive rows of the last CPU-synchronised dispatches, per (tokens, experts): the
            # size of the next call's speculative outputs.
            self.recv_history: dict = {}
            self.speculation = float(envs.RECV_SPECULATION.get())
            driver.stream_sync(s)
            handle = driver.ipc_get_handle(self.base)
            handles = buf.group.allgather_bytes(handle)
            for r in range(R):
                if r == buf.rank:
                    self.peers[r] = self.base
                else:
                    self.peers[r] = driver.ipc_open(handles[r])
                    self.opened.append(self.peers[r])
        buf.group.barrier()
        t = K_intra.IntraParams()
        for r in range(R):
            t.peers[r] = self.peers[r]
        t.ctrl = self.ctrl
        t.err = buf._err.dev_ptr
        t.host_info = self.host_info_dev
        t.ack_off, t.mailbox_tag_off, t.mailbox_off = lay.ack_off, lay.mailbox_tag_off, lay.mailbox_off
        t.flags_off, t.staging_off, t.region_bytes = lay.flags_off, lay.staging_off, lay.region_bytes
        t.rank, t.num_ranks = buf.rank, R
        t.mailbox_ints, t.max_chunks = K_intra.MAILBOX_INTS, K_intra.MAX_CHUNKS
        self.prof = 0
        self.host_stamps: dict = {}
        if envs.PROFILE.get():
            self.prof_bytes = 8 * K_intra.PROF_SLOTS * K_intra.PROF_MAX_BLOCKS * len(K_intra.PROF_KERNELS)
            with driver.on_device(dev):
                self.prof = driver.mem_alloc(self.prof_bytes)
                driver.memset_d8_async(self.prof, 0, self.prof_bytes, buf._stream)
                driver.stream_sync(buf._stream)
            t.prof = self.prof
        self.template = t

    def params(self, timeout_s: float) -> K_intra.IntraParams:
        p = K_intra.IntraParams()
        ctypes.pointer(p)[0] = self.template
        p.timeout_ns = int(timeout_s * 1e9)
        return p

    def free(self) -> None:
        for ptr in self.opened:
            try:
                driver.ipc_close(ptr)
            except Exception:
                pass
        self.opened = []
        for attr in ("base", "ctrl", "prof"):
            ptr = getattr(self, attr)
            if ptr:
                try:
                    driver.mem_free(ptr)
                except Exception:
                    pass
                setattr(self, attr, 0)
        for attr in ("host_info",):
            ptr = getattr(self, attr, 0)
            if ptr:
                try:
                    driver.host_free(ptr)
                except Exception:
                    pass
                setattr(self, attr, 0)


class Buffer:
    """Expert-parallel communication buffer, created collectively by every rank of ``group``.

    Args:
        group: a torch.distributed group, an mpi4py communicator, ``"jax"`` (JAX's distributed
            runtime), any object with ``rank``/``size``/``allgather_bytes``/``barrier``, or None
            for the initialised torch.distributed default group.  Used only to exchange handles.
        num_nvl_bytes: bytes of NVLink buffer per rank for the normal mode (0: no normal mode).
            :meth:`get_nvl_buffer_size_hint` computes what a token count needs.
        num_rdma_bytes: bytes of NVSHMEM symmetric heap per rank for the low-latency mode
            (0: none); :meth:`get_low_latency_rdma_size_hint` computes it.
        low_latency_mode: create the low-latency (NVSHMEM) state.
        device: CUDA device ordinal; default: the current device, else ``rank % device_count``.

    Raises ValueError for bad sizes, and EpcommError if peer memory cannot be mapped.
    The buffer must be used by every rank with the same sequence of calls; :meth:`destroy`
    (also run at exit) releases it collectively.
    """

    def __init__(self, group=None, num_nvl_bytes: int = 0, num_rdma_bytes: int = 0, *,
                 low_latency_mode: bool = False, device: int | None = None):
        self._serial = next(_BUFFER_SERIALS)
        self.group = as_group(group)
        self.rank, self.num_ranks = self.group.rank, self.group.size
        check_int("num_nvl_bytes", num_nvl_bytes, lo=0)
        check_int("num_rdma_bytes", num_rdma_bytes, lo=0)
        if self.num_ranks < 1:
            raise ValueError("group has no ranks")
        n_dev = driver.init()
        if device is None:
            cur = driver.current_device()
            device = cur if cur >= 0 else self.rank % max(n_dev, 1)
        check_int("device", device, lo=0, hi=n_dev - 1)
        self.device_id = device
        self.timeout_s = float(envs.TIMEOUT_S.get())
        self._destroyed = False
        self._alloc_on_comm = False  # set per call by allocate_on_comm_stream (torch only)
        self._intra: _IntraState | None = None
        self._ll = None
        self._stream = self._stream2 = self._ev_start = self._ev_mid = self._ev_recv = 0
        self._err = None
        try:
            self._setup(device, num_nvl_bytes, num_rdma_bytes, low_latency_mode)
        except BaseException:
            # Nothing of a Buffer that never existed stays allocated (e.g. a 2 GiB NVLink buffer
            # and its peers' mappings, when the low-latency part then fails).
            self._destroyed = True
            with driver.on_device(device):
                self._free_local()
            raise
        _LIVE_BUFFERS.add(self)

    def _setup(self, device: int, num_nvl_bytes: int, num_rdma_bytes: int, low_latency_mode: bool) -> None:
        with driver.on_device(device):
            self._stream = _take_stream(device)
            self._stream2 = _take_stream(device)
            self._ev_start = driver.event_create()
            self._ev_mid = driver.event_create()
            self._ev_recv = driver.event_create()
        self._err = ErrorState(device)
        sizes = self.group.allgather_bytes(f"{num_nvl_bytes},{num_rdma_bytes},{int(low_latency_mode)}".encode())
        if len(set(sizes)) != 1:
            raise ValueError(f"every rank must create the Buffer with the same sizes and mode; got "
                             f"{[s.decode() for s in sizes]} (num_nvl_bytes,num_rdma_bytes,low_latency_mode)")
        buses = self.group.allgather_bytes(driver.pci_bus_id(device).encode())
        self.shares_gpu = len(set(buses)) != len(buses)
        if self.shares_gpu and not envs.SHARE_GPU.get():
            raise ValueError(f"two ranks share one GPU ({[b.decode() for b in buses]}); use one GPU per rank"
                             " (EPCOMM_SHARE_GPU=1 allows it for correctness tests)")
        if low_latency_mode or num_rdma_bytes > 0:
            from epcomm.low_latency import LowLatencyState
            LowLatencyState.check_args(self.num_ranks, num_rdma_bytes)  # before any allocation
        if num_nvl_bytes > 0:
            if self.num_ranks < 2:
                raise ValueError("the normal mode needs at least 2 ranks")
            if self.num_ranks > K_intra.MAX_RANKS:
                raise ValueError(f"{self.num_ranks} ranks: the NVLink normal mode supports at most "
                                 f"{K_intra.MAX_RANKS} ranks in one NVLink domain")
            self._intra = _IntraState(self, num_nvl_bytes)
        if low_latency_mode or num_rdma_bytes > 0:
            from epcomm.low_latency import LowLatencyState
            self._ll = LowLatencyState(self, num_rdma_bytes)
        self._dispatch_config = default_dispatch_config(self.num_ranks)
        self._combine_config = default_combine_config(self.num_ranks)

    # ---- configuration -------------------------------------------------------------------
    @property
    def comm_stream(self) -> int:
        """Raw handle (cudaStream_t) of the stream the normal-mode kernels run on."""
        return self._stream

    def set_num_sms(self, num_sms: int) -> None:
        """Bound the SMs of normal-mode dispatch and combine (sending + receiving blocks).

        ``num_sms``: an int (NumPy ints accepted) in [2, the device's SM count]; TypeError /
        ValueError otherwise, with the configs unchanged."""
        n = check_int("num_sms", num_sms, lo=2, hi=self._device_sm_count())
        self._dispatch_config = self._dispatch_config.with_sms(n)
        self._combine_config = self._combine_config.with_sms(n)

    def _device_sm_count(self) -> int:
        """SMs of this Buffer's GPU (queried once)."""
        n = getattr(self, "_device_sms", None)
        if n is None:
            n = self._device_sms = driver.num_sms(self.device_id)
        return n

    def _call_config(self, config, default: Config, what: str) -> Config:
        """The Config of one call: ``config`` or the default; TypeError for anything but a Config
        or None, ValueError if it asks for more SMs than the GPU has (the send and receive
        kernels run concurrently and the combine is a cooperative launch: blocks that cannot be
        resident would stall or fail the launch after other kernels of the call started)."""
        if config is None:
            config = default
        elif not isinstance(config, Config):
            raise TypeError(f"config: expected an epcomm.Config or None, got {type(config).__name__}")
        n = self._device_sm_count()
        if config.num_sms > n:
            raise ValueError(f"{what}: config.num_sms={config.num_sms} exceeds the {n} SMs of cuda:{self.device_id} "
                             f"(Buffer.set_num_sms / EPCOMM_NUM_SMS set the default)")
        return config

    def get_dispatch_config(self) -> Config:
        return self._dispatch_config

    def get_combine_config(self) -> Config:
        return self._combine_config

    def profile_stamps(self) -> dict | None:
        """Per-block stamps of the last normal-mode kernels.

        Only with ``EPCOMM_PROFILE=1`` at Buffer creation (otherwise returns None).  Returns
        ``{kernel: int64 array [blocks, 4]}`` for "notify", "send", "recv" and "combine", columns
        (start ns, end ns, SM id, SM clock cycles from start to end), globaltimer nanoseconds;
        rows of blocks that did not run are 0.  Synchronises the device; the stamps are cleared after
        reading so the next call's kernels start from zero.
        """
        st = self._intra
        if st is None or not st.prof:
            return None
        host = np.zeros(st.prof_bytes // 8, dtype=np.int64)
        with driver.on_device(self.device_id):
            driver.device_sync()
            driver.memcpy_dtoh(host.ctypes.data, st.prof, st.prof_bytes)
            driver.memset_d8_async(st.prof, 0, st.prof_bytes, self._stream)
            driver.stream_sync(self._stream)
        host = host.reshape(len(K_intra.PROF_KERNELS), K_intra.PROF_MAX_BLOCKS, K_intra.PROF_SLOTS)
        out = {k: host[i] for i, k in enumerate(K_intra.PROF_KERNELS)}
        out["host"] = dict(st.host_stamps)  # time.time_ns() of the last dispatch's host steps
        st.host_stamps.clear()
        return out

    @staticmethod
    def get_nvl_buffer_size_hint(hidden: int, num_ranks: int, num_max_tokens_per_rank: int,
                                 num_topk: int = 8) -> int:
        """Bytes of ``num_nvl_bytes`` needed to dispatch and combine up to
        ``num_max_tokens_per_rank`` tokens (BF16 or FP8) of ``hidden`` channels with ``num_topk``
        experts per token (0: dispatches without top-k).

        Raises TypeError for non-int arguments (NumPy ints are accepted), ValueError for
        ``hidden`` not a positive multiple of 8 (the dispatch's rule for BF16; FP8 needs
        multiples of 128), ``num_ranks`` outside [2, 72], ``num_max_tokens_per_rank`` < 1 or
        ``num_topk`` < 0."""
        hidden = check_int("hidden", hidden, lo=8)
        if hidden % 8:
            raise ValueError(f"hidden={hidden} must be a multiple of 8 (16-byte rows)")
        num_ranks = check_int("num_ranks", num_ranks, lo=2, hi=K_intra.MAX_RANKS)
        num_max_tokens_per_rank = check_int("num_max_tokens_per_rank", num_max_tokens_per_rank, lo=1)
        num_topk = check_int("num_topk", num_topk, lo=0)
        return K_intra.nvl_buffer_size_hint(hidden, num_ranks, num_max_tokens_per_rank, num_topk)

    @staticmethod
    def get_low_latency_rdma_size_hint(num_max_dispatch_tokens_per_rank: int, hidden: int,
                                       num_ranks: int, num_experts: int) -> int:
        """Symmetric-heap bytes (``num_rdma_bytes``) for low-latency calls of up to these sizes."""
        from epcomm.kernels.low_latency import rdma_size_hint
        return rdma_size_hint(num_max_dispatch_tokens_per_rank, hidden, num_ranks, num_experts)

    # ---- lifecycle ---------------------------------------------------------------------------
    def _check_usable(self, what: str, collective: bool = False) -> None:
        """Raise if destroyed or a kernel recorded an error.  ``collective``: the start of a call
        every rank makes, where a skipped bad index only warns (see ErrorState.check)."""
        if self._destroyed:
            raise BufferStateError(f"{what}: the Buffer was destroyed")
        self._err.check(what, collective=collective)

    def check(self) -> None:
        """Raise any error a kernel recorded (timeout, overflow, bad index) since the last call."""
        self._check_usable("check")

    def synchronize(self) -> None:
        """Wait for all work on this buffer's device (low-latency kernels run on the caller's
        streams), then raise any error a kernel recorded."""
        with driver.on_device(self.device_id):
            driver.check(driver.drv().cuCtxSynchronize(), "cuCtxSynchronize")
        self.check()

    def destroy(self) -> None:
        """Release the buffer's memory (collective: every rank must call it)."""
        if self._destroyed:
            return
        self._destroyed = True
        _LIVE_BUFFERS.discard(self)
        with driver.on_device(self.device_id):
            try:
                # Every stream of the device: low-latency kernels usually run on the caller's
                # streams, and a peer's still-queued one would write into memory freed below.
                driver.device_sync()
            except Exception:
                pass
            try:
                self.group.barrier()  # no peer may still write into memory we unmap
            except Exception as e:
                import warnings
                warnings.warn(f"Buffer.destroy on rank {self.rank}: the barrier with the other ranks failed "
                              f"({type(e).__name__}: {e}); releasing the memory anyway (a peer that still "
                              f"writes into it would fault)", RuntimeWarning, stacklevel=2)
            self._free_local()
            event_mod.release_finished()  # the device is idle: CuPy/JAX arrays of dropped events go

    def _free_local(self) -> None:
        """Release what this process holds: destroy()'s end (after its barrier), and what a
        constructor that raised had made so far (then without the symmetric heap, whose free is
        collective: see LowLatencyState.free)."""
        if self._intra is not None:
            self._intra.free()
            self._intra = None
        if self._ll is not None:
            self._ll.free()
            self._ll = None
        for ev in (self._ev_start, self._ev_mid, self._ev_recv):
            try:
                if ev:
                    driver.event_destroy(ev)
            except Exception:
                pass
        self._ev_start = self._ev_mid = self._ev_recv = 0
        spare = [s for s in (self._stream, self._stream2) if s]
        _SPARE_STREAMS.setdefault(self.device_id, []).extend(spare)
        self._stream = self._stream2 = 0
        if self._err is not None:
            self._err.free()

    def __del__(self):  # pragma: no cover - depends on GC timing
        pass  # memory is released by destroy() or at exit; unmapping here could race a peer

    # ---- helpers -------------------------------------------------------------------------
    def _tensor(self, obj, name, *, framework: str | None = None, writable: bool = False, previous_event=None, **kw):
        """A borrowed view of ``obj`` on this Buffer's GPU.  ``framework``: the framework of the
        call's first array (x); another one raises TypeError, since only that framework's stream
        is ordered with the kernels.  ``writable``: the kernel writes into it (read-only arrays,
        e.g. JAX's, raise ValueError).  ``previous_event``: the call's, which an int32 top-k's
        widening copy must wait for (``interop.as_index_tensor``)."""
        if kw.get("dtype") == "index":  # int64 expert indices, int32 widened
            kw.pop("dtype")
            if obj is None and kw.pop("allow_none", False):
                return None
            if framework is not None and obj is not None:
                self._same_framework(obj, name, framework)
            after = previous_event if isinstance(previous_event, EventOverlap) else None
            ref = interop.as_index_tensor(obj, name, device="cuda", after_event=after, **kw)
        else:
            if framework is not None and obj is not None:
                self._same_framework(obj, name, framework)
            ref = interop.as_tensor(obj, name, device="cuda", **kw)
        if ref is not None and ref.device_id != self.device_id:
            raise ValueError(f"{name}: is on cuda:{ref.device_id} but this Buffer uses cuda:{self.device_id}")
        if ref is not None and writable and ref.readonly:
            raise ValueError(f"{name}: is read-only (a {ref.framework} array) but is written in place")
        return ref

    @staticmethod
    def _same_framework(obj, name: str, framework: str) -> None:
        try:
            fw = interop.framework_of(obj)
        except (TypeError, ValueError):
            return  # not an array: as_tensor raises the usual TypeError
        if fw != framework:
            raise TypeError(f"{name}: is a {fw} array but x is a {framework} one; pass every array of a call "
                            f"in one framework")

    def _begin(self, fw: str, previous_event: EventOverlap | None, caller_work: bool = False,
               caller: int | None = None, cap: int | None = None) -> tuple[int, int]:
        """Order the comm stream after the caller's work (or only after ``previous_event``,
        unless ``caller_work``: epcomm queued work on the caller's stream for this call, e.g.
        an int32 top-k widened to int64); returns (caller stream, its capture id: 0 when not
        capturing, see driver.capture_id).  ``caller`` and ``cap``: both, if the call already
        read them (each is a driver query on the hot path)."""
        if caller is None or cap is None:
            caller = interop.current_stream(fw, self.device_id)
            cap = driver.capture_id(caller)
        waited = event_mod.wait_for(self._stream, previous_event, cap)
        # Under capture, a previous_event recorded before the capture began orders nothing
        # in the graph (wait_for skips it), and the comm stream would stay outside the capture:
        # the kernel would run once, now, and be missing from every replay.  Joining the
        # caller's stream brings the comm stream into the capture.
        if not waited or caller_work or (cap and driver.capture_id(self._stream) != cap):
            driver.event_record(self._ev_start, caller)
            driver.stream_wait_event(self._stream, self._ev_start)
        return caller, cap

    def _finish(self, fw: str, caller: int, async_finish: bool, outputs: list, inputs: list,
                cap: int | None = None) -> EventOverlap:
        """The call's event on the comm stream (the caller waits for it unless ``async_finish``).
        ``cap``: _begin's capture id of the call; 0 skips querying the comm stream's (which
        _begin left outside any capture then)."""
        ev = driver.event_create()
        driver.event_record(ev, self._stream)
        if cap != 0:
            cap = driver.capture_id(self._stream)
        if event_mod._DEFERRED and not cap:
            event_mod.release_finished()
        if self._alloc_on_comm and fw == "torch":
            import torch
            # Outputs allocated on the comm stream belong to its pool: once the caller frees
            # them, the next allocation there could reuse the memory while the caller's stream
            # still reads it (a call with previous_event does not wait for the caller's stream).
            # Recording the caller's stream makes the allocator wait for it, as DeepEP does.
            cur = torch.cuda.current_stream(self.device_id)
            for t in outputs:
                if t is not None and hasattr(t, "record_stream"):
                    interop.record_stream(t, cur)
        if async_finish and fw == "torch":
            import torch
            cs = torch.cuda.ExternalStream(self._stream, device=self.device_id)
            cs2 = torch.cuda.ExternalStream(self._stream2, device=self.device_id)
            for t in outputs + inputs:
                if t is not None and hasattr(t, "record_stream"):
                    interop.record_stream(t, cs)
                    interop.record_stream(t, cs2)
        if not async_finish:
            driver.stream_wait_event(caller, ev)
        return EventOverlap(ev, fw, self.device_id, extra=(outputs, inputs) if async_finish else None, capture=cap)

    def _empty(self, fw, shape, dtype):
        if self._alloc_on_comm and fw == "torch":
            import torch
            # torch's caching allocator ties a block to the stream it was allocated on.
            with torch.cuda.stream(torch.cuda.ExternalStream(self._stream, device=self.device_id)):
                return interop.empty(fw, tuple(int(s) for s in shape), dtype, "cuda", self.device_id)
        return interop.empty(fw, tuple(int(s) for s in shape), dtype, "cuda", self.device_id)

    # ---- layout --------------------------------------------------------------------------
    def get_dispatch_layout(self, topk_idx, num_experts: int, previous_event: EventOverlap | None = None,
                            async_finish: bool = False, allocate_on_comm_stream: bool = False):
        """Per-rank routing counts of this rank's tokens; see :func:`epcomm.get_dispatch_layout`.

        Args:
            topk_idx: int64 (or int32) [N, K] (-1 = no expert).
            num_experts: E, an int (NumPy ints accepted), a multiple of the rank count R, with
               E + R <= 12288 (the layout kernel's counters in 48 KiB of shared memory).

        Returns ``(num_tokens_per_rank int32 [R], num_tokens_per_rdma_rank, num_tokens_per_expert
        int32 [E], is_token_in_rank bool [N, R], event)``.  ``num_tokens_per_rdma_rank`` is always
        None: the normal mode runs within one NVLink domain of up to 72 ranks, which is one
        "node" in DeepEP's terms (DeepEP returns None within a node), whatever R is, so every R
        that :meth:`dispatch` accepts is accepted here.  Per-node counts for another partition:
        :func:`epcomm.get_dispatch_layout` with ``num_ranks_per_node``.

        Raises TypeError/ValueError before any launch (wrong dtype, shape, framework, an index
        outside [-1, E), or ``previous_event`` not an EventOverlap).
        """
        self._check_usable("get_dispatch_layout")
        check_event(previous_event)
        tr = self._tensor(topk_idx, "topk_idx", dtype="index", ndim=2, previous_event=previous_event)
        num_experts = check_int("num_experts", num_experts, lo=1)
        # One NVLink domain: ranks_per_node = R, so no per-node counts (num_nodes = 0), as in dispatch.
        num_nodes = K_layout.check_layout_args(tr.shape[0], num_experts, self.num_ranks, self.num_ranks)
        self._alloc_on_comm = bool(allocate_on_comm_stream)
        with driver.on_device(self.device_id):
            caller, cap = self._begin(tr.framework, previous_event, caller_work=tr.widened)
            check_topk_indices(tr.obj, tr.framework, num_experts, capturing=bool(cap), previous_event=previous_event)
            outs = self._layout_on_comm(tr, num_experts, num_nodes)
            ev = self._finish(tr.framework, caller, async_finish, [o[0] for o in outs if o], [tr.obj, tr.keepalive],
                              cap)
        res = [interop.finish(tr.framework, o[0], self._stream) if o else None for o in outs]
        return (*res, ev)

    def _layout_on_comm(self, tr, num_experts, num_nodes):
        fw = tr.framework
        N = tr.shape[0]
        R = self.num_ranks
        rank_o = self._empty(fw, (R,), "int32")
        rdma_o = self._empty(fw, (num_nodes,), "int32") if num_nodes else None
        exp_o = self._empty(fw, (num_experts,), "int32")
        in_o = self._empty(fw, (N, R), "bool")
        K_layout.launch_layout(self._stream, self.device_id, tr, num_experts, R, num_nodes, R, rank_o[1],
                               rdma_o[1] if rdma_o else None, exp_o[1], in_o[1], self._err.dev_ptr)
        return [rank_o, rdma_o, exp_o, in_o]

    # ---- normal dispatch ------------------------------------------------------------------
    def dispatch(self, x, handle: DispatchHandle | None = None, num_tokens_per_rank=None,
                 num_tokens_per_rdma_rank=None, is_token_in_rank=None, num_tokens_per_expert=None,
                 topk_idx=None, topk_weights=None, expert_alignment: int = 1, num_worst_tokens: int = 0,
                 config: Config | None = None, previous_event: EventOverlap | None = None,
                 async_finish: bool = False, allocate_on_comm_stream: bool = False, *,
                 num_experts: int | None = None):
        """Send every token once to each rank holding one of its experts (normal mode).

        Args:
            x: bf16 [N, H], or an FP8 pair ``(float8_e4m3fn [N, H], float32 scales [N, H/128])``
               whose scales may be row-major or column-major (any strides).  Every other array
               argument must be of the same framework as ``x`` (TypeError otherwise: only that
               framework's stream is ordered with the kernels).
            handle: a previous dispatch's handle (of this Buffer): repeat its route (no top-k, no
               count exchange, no CPU synchronisation; used for the backward of combine).  With a
               handle, every routing argument (``num_tokens_per_rank``,
               ``num_tokens_per_rdma_rank``, ``is_token_in_rank``, ``num_tokens_per_expert``,
               ``topk_idx``, ``topk_weights``, ``num_experts``) must be None and
               ``expert_alignment`` 1: the handle holds the route (ValueError otherwise).
            num_tokens_per_rank: None or int32 [R], from :meth:`get_dispatch_layout`.  Checked
               (dtype, shape, framework) but not read: the kernels count the rows per rank from
               ``is_token_in_rank``.
            num_tokens_per_rdma_rank: None (what :meth:`get_dispatch_layout` returns: one NVLink
               domain), or int32 [R / ranks_per_node] from :func:`epcomm.get_dispatch_layout`;
               checked like ``num_tokens_per_rank`` and not read (no RDMA ranks here).
            is_token_in_rank, num_tokens_per_expert: bool [N, R] and int32 [E] from
               :meth:`get_dispatch_layout` of the same ``topk_idx``; computed here if omitted
               (then E + R <= 12288, the layout kernel's shared memory).
            topk_idx: int64 (or int32) [N, K] (-1 = none); topk_weights: float32 [N, K].
            expert_alignment: int in [1, 2**20]: each per-expert count is rounded up to a
               multiple of it (the bound keeps the kernel's 32-bit rounding from overflowing).
            num_worst_tokens: if > 0, outputs have exactly this many rows, padding rows have
               top-k index -1; nothing synchronises with the CPU and the call can be captured
               in a CUDA graph; the count list is empty.
            num_experts: needed only when neither ``num_tokens_per_expert`` nor a handle says it.
            config: None (the Buffer's dispatch config) or a :class:`Config` whose ``num_sms``
               does not exceed the GPU's SM count.
            async_finish / previous_event / allocate_on_comm_stream: as in DeepEP
               (``previous_event``: None or an EventOverlap: the kernels wait for it instead of
               the caller's stream; the host index check (EPCOMM_CHECK_INDICES) first waits for
               it on the host, and an int32 top-k's widening copy on the caller's stream waits
               for it too); the last one (torch) allocates the outputs on :attr:`comm_stream`
               and records the caller's stream on them.

        Returns ``(recv_x, recv_topk_idx, recv_topk_weights, num_recv_tokens_per_expert_list,
        handle, event)`` with ``recv_x`` in the form of ``x``, rows ordered by source rank, then
        source token index; the count list counts top-k slots (a row naming a local expert
        twice counts twice, as in DeepEP), and with ``num_worst_tokens`` the padding rows of
        ``recv_x`` and its scales are unwritten.  In the CPU-synchronised path the outputs are usually row views of
        an allocation made before the counts were known (up to EPCOMM_RECV_SPECULATION more rows
        than the largest of the last four receives of this shape; its extra rows are never
        written).  Raises ValueError/TypeError for bad input (before any launch),
        ValueError if the buffer is too small (with the size needed), BufferStateError if the
        Buffer was destroyed or has no NVLink buffer, EpcommTimeoutError if a
        peer does not arrive within EPCOMM_TIMEOUT_S, RankMismatchError if another rank's call
        has a different hidden size, dtype, top-k width, num_experts or chunk_rows (every rank
        raises it and nothing is sent; the Buffer is unusable afterwards).  With
        ``num_worst_tokens`` these device-side errors are raised by the next call or
        :meth:`synchronize`.
        """
        # Destroyed first: destroy() also drops the NVLink state, which would otherwise be
        # reported as a Buffer created without one.
        self._check_usable("dispatch", collective=True)
        st = self._intra
        if st is None:
            raise BufferStateError("dispatch needs a Buffer created with num_nvl_bytes > 0")
        t_enter = time.time_ns() if st.prof else 0  # EPCOMM_PROFILE: host side of the timeline
        check_event(previous_event)
        R, rank = self.num_ranks, self.rank
        fp8 = isinstance(x, (tuple, list))
        if fp8:
            if len(x) != 2:
                raise ValueError("x: an FP8 input is a pair (data float8_e4m3fn [N, H], scales float32 [N, H/128])")
            xr = self._tensor(x[0], "x[0]", dtype="float8_e4m3fn", ndim=2)
            fw = xr.framework
            N, H = xr.shape
            if H % 128:
                raise ValueError(f"x[0]: FP8 hidden size {H} must be a multiple of 128 (one scale per 128 channels)")
            sr = self._tensor(x[1], "x[1]", dtype="float32", ndim=2, shape=(N, H // 128), contiguous=False,
                              framework=fw)
        else:
            xr = self._tensor(x, "x", dtype="bfloat16", ndim=2)
            fw = xr.framework
            N, H = xr.shape
            sr = None
            if H % 8:
                raise ValueError(f"x: hidden size {H} must be a multiple of 8 (16-byte rows)")
        expert_alignment = check_int("expert_alignment", expert_alignment, lo=1, hi=K_intra.MAX_EXPERT_ALIGNMENT)
        num_worst_tokens = check_int("num_worst_tokens", num_worst_tokens, lo=0)
        cfg = self._call_config(config, self._dispatch_config, "dispatch")
        S, Rv = cfg.split()
        cached = handle is not None
        tr = wr = None
        if cached:
            if not isinstance(handle, DispatchHandle):
                raise TypeError(f"handle: expected a DispatchHandle, got {type(handle).__name__}")
            if handle.buffer_id != self._serial:
                raise ValueError("handle: was made by another Buffer")
            if handle.num_tokens != N:
                raise ValueError(f"x: has {N} tokens but the handle's dispatch had {handle.num_tokens}")
            for nm, v in (("topk_idx", topk_idx), ("topk_weights", topk_weights), ("is_token_in_rank", is_token_in_rank),
                          ("num_tokens_per_rank", num_tokens_per_rank),
                          ("num_tokens_per_rdma_rank", num_tokens_per_rdma_rank),
                          ("num_tokens_per_expert", num_tokens_per_expert), ("num_experts", num_experts)):
                if v is not None:
                    raise ValueError(f"{nm}: must be None for a cached dispatch (the handle holds the route)")
            if expert_alignment != 1:
                raise ValueError(f"expert_alignment={expert_alignment}: a cached dispatch returns no per-expert "
                                 f"counts, so it must be 1 (the default)")
            E = handle.num_experts
            Kt = 0
        else:
            if topk_idx is not None:
                tr = self._tensor(topk_idx, "topk_idx", dtype="index", ndim=2, shape=(N, None), framework=fw,
                                  previous_event=previous_event)
                Kt = tr.shape[1]
                if Kt < 1:
                    raise ValueError("topk_idx: needs at least one column")
                wr = self._tensor(topk_weights, "topk_weights", dtype="float32", ndim=2, shape=(N, Kt),
                                  allow_none=True, framework=fw)
            else:
                Kt = 0
                if topk_weights is not None:
                    raise ValueError("topk_weights: given without topk_idx")
                if is_token_in_rank is None:
                    raise ValueError("is_token_in_rank: required when topk_idx is None")
            ner = self._tensor(num_tokens_per_expert, "num_tokens_per_expert", dtype="int32", ndim=1,
                               allow_none=True, framework=fw)
            if num_experts is None:
                if ner is None:
                    if tr is not None:
                        raise ValueError("num_experts: pass it, or num_tokens_per_expert (from get_dispatch_layout)")
                    num_experts = R
                else:
                    num_experts = ner.shape[0]
            E = check_int("num_experts", num_experts, lo=1)
            if E % R:
                raise ValueError(f"num_experts={E} must be a multiple of the number of ranks {R}")
            if ner is not None and ner.shape[0] != E:
                raise ValueError(f"num_tokens_per_expert: has {ner.shape[0]} entries, expected num_experts={E}")
            if E // R > K_intra.MAX_LOCAL_EXPERTS:
                raise ValueError(f"{E // R} experts per rank: at most {K_intra.MAX_LOCAL_EXPERTS} supported")
            itr = self._tensor(is_token_in_rank, "is_token_in_rank", dtype="bool", ndim=2, shape=(N, R),
                               allow_none=True, framework=fw)
            # Not read by the kernels (the notify kernel counts from is_token_in_rank), but a
            # wrong one is a caller's bug worth reporting rather than ignoring.
            self._tensor(num_tokens_per_rank, "num_tokens_per_rank", dtype="int32", ndim=1, shape=(R,),
                         allow_none=True, framework=fw)
            nrr = self._tensor(num_tokens_per_rdma_rank, "num_tokens_per_rdma_rank", dtype="int32", ndim=1,
                               allow_none=True, framework=fw)
            if nrr is not None and (nrr.shape[0] < 1 or R % nrr.shape[0]):
                raise ValueError(f"num_tokens_per_rdma_rank: has {nrr.shape[0]} entries, expected "
                                 f"num_ranks / ranks_per_node (num_ranks={R}), or None")
            if itr is None or (tr is not None and ner is None):
                K_layout.check_layout_smem(E, R)  # the layout kernel runs below
        lay = st.layout
        need_row = K_intra.max_row_bytes(H, max(Kt, 0))
        cap = lay.capacity_rows(need_row)
        if N > cap:
            need = K_intra.nvl_buffer_size_hint(H, R, N, Kt)
            raise ValueError(f"Buffer too small: {N} tokens of hidden {H} need num_nvl_bytes >= {need} "
                             f"(this buffer holds {cap} tokens per rank, {lay.total_bytes} bytes)")
        chunk_rows = K_intra.dispatch_chunk_rows(cfg.chunk_rows, lay.capacity_rows(need_row), R)
        spec = K_intra.IntranodeDispatchSpec(R, H, fp8)
        spec.validate()
        hs = st.host_stamps if st.prof else None
        if hs is not None:
            hs.clear()
            hs["enter"] = t_enter
        self._alloc_on_comm = bool(allocate_on_comm_stream)
        with driver.on_device(self.device_id):
            mod = loader.load(spec, self.device_id)
            worst = num_worst_tokens > 0
            # Before _begin: it makes the comm stream wait for the caller's, which under capture
            # joins it to the capture, and a capture left with a forked stream is lost.
            caller = interop.current_stream(fw, self.device_id)
            cap = driver.capture_id(caller)
            if not worst and not cached and cap:
                raise ValueError("dispatch: CUDA-graph capture needs num_worst_tokens > 0 (or a handle): the "
                                 "default path synchronises with the CPU to size its outputs")
            caller, cap = self._begin(fw, previous_event, caller_work=tr is not None and tr.widened,
                                      caller=caller, cap=cap)
            if tr is not None:
                check_topk_indices(tr.obj, fw, E, capturing=bool(cap), previous_event=previous_event)
            keep = []
            if cached:
                h = handle
                rank_prefix_o, send_list_o, send_pos_o, send_count_o = (h.rank_prefix, h.send_list, h.send_pos,
                                                                        h.send_count)
                refs = h.refs
                itr_obj = h.is_token_in_rank
                ner_ref = None
            else:
                if itr is None or (tr is not None and ner is None):
                    num_nodes = 0
                    lay_outs = self._layout_on_comm(tr, E, num_nodes)
                    keep += [o[0] for o in lay_outs if o]  # the notify kernel reads them
                    if itr is None:
                        itr = lay_outs[3][1]
                    if ner is None:
                        ner = lay_outs[2][1]
                itr_obj = itr.obj
                ner_ref = ner
                rank_prefix_o = self._empty(fw, (R + 1,), "int32")
                send_list_o = self._empty(fw, (R, max(N, 1)), "int32")
                send_pos_o = self._empty(fw, (N, R), "int32")
                send_count_o = self._empty(fw, (R,), "int32")
                refs = {"rank_prefix": rank_prefix_o[1], "send_list": send_list_o[1], "send_pos": send_pos_o[1],
                        "send_count": send_count_o[1], "is_token_in_rank": itr}
                rank_prefix_o, send_list_o, send_pos_o, send_count_o = (rank_prefix_o[0], send_list_o[0],
                                                                        send_pos_o[0], send_count_o[0])
            p = st.params(self.timeout_s)
            p.x = xr.ptr
            if fp8:
                p.x_scales, p.scale_st, p.scale_sg = sr.ptr, sr.strides[0], sr.strides[1]
            p.topk_idx = _ptr(tr)
            p.topk_weights = _ptr(wr)
            p.is_token_in_rank = refs["is_token_in_rank"].ptr
            p.num_tokens_per_expert = _ptr(ner_ref)
            p.send_list, p.send_pos = refs["send_list"].ptr, refs["send_pos"].ptr
            p.send_count, p.rank_prefix = refs["send_count"].ptr, refs["rank_prefix"].ptr
            p.num_tokens, p.num_topk, p.num_experts = N, Kt, E
            p.expert_alignment = expert_alignment
            p.chunk_rows = chunk_rows
            p.row_bytes = K_intra.dispatch_row_bytes(H, fp8, Kt)
            p.hidden, p.fp8 = H, int(fp8)
            p.cached = int(cached)
            p.write_host = int(not worst and not cached)
            if p.write_host:
                st.info[0] = 0
            launch(mod.fn("notify"), 1 if cached else R + 1, K_intra.NOTIFY_THREADS, self._stream, p,
                   cooperative=not cached)
            driver.event_record(self._ev_mid, self._stream)
            launch(mod.fn("send"), S, K_intra.THREADS, self._stream, p)
            driver.stream_wait_event(self._stream2, self._ev_mid)
            if hs is not None:
                hs["launched"] = time.time_ns()
            G = H // 128
            col_major_scales = fp8 and sr.strides[0] == 1 and sr.shape[1] > 1 and N > 1
            spec_key = (N, E)
            spec_rows = self._speculative_rows(st, spec_key) if p.write_host else 0

            def allocate(M):
                """The outputs for M rows; fills their pointers into p."""
                rx = self._empty(fw, (M, H), "float8_e4m3fn" if fp8 else "bfloat16")
                rs = None
                rs_st = rs_sg = 0
                if fp8:
                    if col_major_scales:
                        rs = self._empty(fw, (G, M), "float32")
                        rs_st, rs_sg = 1, M
                    else:
                        rs = self._empty(fw, (M, G), "float32")
                        rs_st, rs_sg = G, 1
                rti = self._empty(fw, (M, Kt), "int64") if Kt else None
                rtw = self._empty(fw, (M, Kt), "float32") if (Kt and wr is not None) else None
                rsrc = None if cached else self._empty(fw, (M,), "int32")
                p.recv_x = rx[1].ptr
                p.recv_scales, p.rscale_st, p.rscale_sg = (rs[1].ptr if rs else 0), rs_st, rs_sg
                p.recv_topk_idx = rti[1].ptr if rti else 0
                p.recv_topk_weights = rtw[1].ptr if rtw else 0
                p.recv_src_idx = rsrc[1].ptr if rsrc else 0
                p.out_rows = M
                p.worst_mode = int(worst)
                if hs is not None:
                    hs["allocated"] = time.time_ns()
                return [rx, rs, rti, rtw, rsrc]

            # Everything the kernels read, kept alive and recorded on the comm streams: a cached
            # dispatch reads the handle's tensors (autograd drops the handle right after the
            # call), and notify reads the caller's num_tokens_per_expert.
            ins = [xr.obj, sr.obj if sr else None, tr.obj if tr else None, wr.obj if wr else None,
                   tr.keepalive if tr else None, getattr(ner_ref, "obj", None),
                   rank_prefix_o, send_list_o, send_pos_o, send_count_o, itr_obj] + keep

            def order_after_recv(outputs) -> EventOverlap:
                """Join the receive stream into the comm stream, then the event and the caller's
                wait (``_finish``) for the receive launched last, on ``outputs``."""
                driver.event_record(self._ev_recv, self._stream2)
                driver.stream_wait_event(self._stream, self._ev_recv)
                return self._finish(fw, caller, async_finish, [o[0] for o in outputs if o is not None], ins, cap)

            outputs = ev = None
            if spec_rows:
                # Speculative outputs, sized from the last calls of this shape, and the receive
                # launched on them now, before the counts exist: the receive starts copying as
                # soon as the counts cross, with no host round trip in between.  If the rows do
                # not fit it leaves without writing; the host sees the same counts below.
                # (The outputs travel as kernel arguments: a receive that read them from
                # host-mapped memory made the concurrent send ~20% slower, docs/design.md.)
                outputs = allocate(spec_rows)
                p.speculative = 1
                launch(mod.fn("recv"), Rv, K_intra.THREADS, self._stream2, p)
                p.speculative = 0
                # The stream joins, the event and the record_stream calls do not depend on the
                # counts, so they are done while the notify kernel runs: after the counts the
                # host only narrows the outputs and builds the handle (the end of the call is
                # on the GPU's critical path when the kernels are quick, e.g. FP8).  Column-major
                # scales are packed after the counts (below), so their order is made then.
                if not col_major_scales:
                    ev = order_after_recv(outputs)
            # ---- the number of received rows ----
            expert_list: list[int] = []
            recv_counts = None
            if worst:
                M = num_worst_tokens
                num_recv = None
            elif cached:
                num_recv = handle.num_recv_tokens
                recv_counts = handle.recv_counts
                M = num_recv if num_recv is not None else handle.out_rows
            else:
                try:
                    self._wait_host_info("dispatch")
                except BaseException:
                    if outputs is not None:
                        # The speculative receive is queued on these outputs and may still
                        # write them once the counts arrive: they must outlive it.
                        st.orphans.append(outputs)
                    raise
                if hs is not None:
                    hs["counts_seen"] = time.time_ns()
                info = st.info
                num_recv = int(info[1])
                recv_counts = tuple(info[2:2 + R].tolist())
                if tr is not None:
                    expert_list = info[2 + R:2 + R + E // R].tolist()
                M = num_recv
                hist = st.recv_history.setdefault(spec_key, [])
                hist.append(M)
                del hist[:-4]
            # ---- outputs ----
            if spec_rows and M <= spec_rows:
                st.spec_hits += 1
                rx, rs, rti, rtw, rsrc = outputs
                if col_major_scales:
                    # The receive wrote [G, spec_rows]; the caller gets [G, M] (leading
                    # dimension M, as from exact outputs), packed on the receive's stream.
                    rs = self._compact_scales(fw, mod, rs, G, M, spec_rows)
                    ev = order_after_recv(outputs + [rs])  # the [G, spec_rows] array lives until then
                    rs = (rs[0],)
                else:
                    rs = None if rs is None else (interop.narrow_obj(rs[0], M),)
                # Only the handle needs a TensorRef of its row view; the rest are the caller's.
                rx, rti, rtw = (None if o is None else (interop.narrow_obj(o[0], M),) for o in (rx, rti, rtw))
                rsrc = None if rsrc is None else interop.narrow_rows(rsrc, M)
            else:
                if spec_rows:
                    # The speculative receive stood down without writing; ``ev`` (if already
                    # made) orders nothing of the exact receive, so the order is made again below.
                    st.spec_misses += 1
                outputs = allocate(M)
                launch(mod.fn("recv"), Rv, K_intra.THREADS, self._stream2, p)
                ev = order_after_recv(outputs)
                rx, rs, rti, rtw, rsrc = outputs
            if hs is not None:
                hs["outputs_ready"] = time.time_ns()
            if not cached:
                refs["recv_src_idx"] = rsrc[1]
                new_handle = DispatchHandle(
                    buffer_id=self._serial, framework=fw, device_id=self.device_id, num_ranks=R, rank=rank,
                    num_tokens=N, hidden=H, num_experts=E, num_topk=Kt, num_worst_tokens=num_worst_tokens,
                    out_rows=M, num_recv_tokens=num_recv, recv_counts=recv_counts, rank_prefix=rank_prefix_o,
                    send_list=send_list_o, send_pos=send_pos_o, send_count=send_count_o,
                    is_token_in_rank=itr_obj, recv_src_idx=interop.finish(fw, rsrc[0], self._stream), refs=refs)
            else:
                new_handle = handle
        fin = lambda o: None if o is None else interop.finish(fw, o[0], self._stream)  # noqa: E731
        recv_x = fin(rx)
        if fp8:
            scales = fin(rs)
            if col_major_scales:
                scales = scales.T
            recv_x = (recv_x, scales)
        return recv_x, fin(rti), fin(rtw), expert_list, new_handle, ev

    def _compact_scales(self, fw: str, mod, scratch, G: int, M: int, ld: int):
        """A new float32 [G, M] array (``_empty``'s (obj, ref) pair) holding the first M columns
        of ``scratch`` ([G, ld], written by the speculative receive), filled by a kernel queued
        on the receive's stream (nothing to queue when M is 0)."""
        out = self._empty(fw, (G, M), "float32")
        if M:
            cp = K_intra.CompactScalesParams(scratch[1].ptr, out[1].ptr, ld, M, G, 0)
            T = K_intra.COMPACT_THREADS
            grid = min(-(-(G * M) // T), 4 * self._device_sm_count())
            launch(mod.fn("compact_scales"), grid, T, self._stream2, cp)
        return out

    def _speculative_rows(self, st: "_IntraState", key) -> int:
        """Rows of the outputs to allocate before the counts are known: the largest of the last
        four receives of this shape plus EPCOMM_RECV_SPECULATION, rounded up to 64 rows; 0 (no
        speculation) for a shape not seen yet or with the knob negative."""
        hist = st.recv_history.get(key)
        if not hist or st.speculation < 0:
            return 0
        rows = int(max(hist) * (1.0 + st.speculation)) + 1
        return max(64, -(-rows // 64) * 64)

    def _wait_host_info(self, what: str) -> None:
        """Spin until the notify kernel published the counts (bounded by the timeout)."""
        info = self._intra.info
        if info[0]:
            return
        start = time.monotonic()
        deadline = start + self.timeout_s + 2.0
        spins = 0
        # Spin hard first: the receive kernel is launched only after this returns, so every
        # microsecond here is on the GPU's critical path (a 100 us sleep granularity cost about
        # that much per dispatch).  Back off to short sleeps only after 20 ms.
        while info[0] == 0:
            spins += 1
            if spins & 0xFF == 0:
                # Only an error that stops the kernels ends this wait: a bad index (skipped by
                # the kernels) is raised at the next call, after this one completed everywhere.
                if self._err.aborting():
                    self._err.check(what)
                if time.monotonic() > deadline:
                    exc = EpcommTimeoutError(
                        f"rank {self.rank}: {what}: the token counts of the peers never arrived within "
                        f"{self.timeout_s:.0f} s (phase notify); a peer did not call {what}, or the GPU is "
                        f"blocked by earlier work", rank=self.rank, phase="notify")
                    self._err.poisoned = exc
                    raise exc
                if time.monotonic() - start > 0.02:
                    time.sleep(0.00002)

    # ---- normal combine ---------------------------------------------------------------------
    def combine(self, x, handle: DispatchHandle, topk_weights=None, bias=None, config: Config | None = None,
                previous_event: EventOverlap | None = None, async_finish: bool = False,
                allocate_on_comm_stream: bool = False):
        """Reverse a dispatch: every token gets the **unweighted** sum (fp32, in ascending rank
        order, then the biases) of the rows that came from it, written as bf16.

        Args:
            x: bf16 [rows, H], rows in the dispatch's receive order (``rows`` = the dispatch's
               output rows; padding rows are ignored).
            handle: the dispatch's handle (of this Buffer).
            topk_weights: None, or float32 [rows, K] with K the dispatch's top-k width
               (``handle.num_topk``, as in DeepEP: the dispatch's ``recv_topk_weights`` or their
               gradient), reduced the same way.  A dispatch without top-k takes none.
            bias: None, one bf16 [N, H] tensor, or a pair of them (either may be None), added
               after the sum.
            config: None (the Buffer's combine config) or a :class:`Config` whose ``num_sms``
               does not exceed the GPU's SM count.
            previous_event: None or an EventOverlap.  Every array must be of ``x``'s framework.

        Returns ``(combined_x bf16 [N, H], combined_topk_weights float32 [N, K] or None, event)``.
        Graph-capturable.  Raises like :meth:`dispatch`, all before any launch.
        """
        self._check_usable("combine", collective=True)  # first: destroy() also drops the NVLink state
        st = self._intra
        if st is None:
            raise BufferStateError("combine needs a Buffer created with num_nvl_bytes > 0")
        check_event(previous_event)
        if not isinstance(handle, DispatchHandle):
            raise TypeError(f"handle: expected a DispatchHandle, got {type(handle).__name__}")
        if handle.buffer_id != self._serial:
            raise ValueError("handle: was made by another Buffer")
        R = self.num_ranks
        H = handle.hidden
        xr = self._tensor(x, "x", dtype="bfloat16", ndim=2, shape=(handle.out_rows, H))
        fw = xr.framework
        N = handle.num_tokens
        wr = self._tensor(topk_weights, "topk_weights", dtype="float32", ndim=2, shape=(handle.out_rows, None),
                          allow_none=True, framework=fw)
        Kt = wr.shape[1] if wr is not None else 0
        # The combine row carries K weights; the dispatch checked the buffer's capacity (and
        # every rank agreed) for its own K only, so any other width could overrun a peer's
        # staging region.
        if wr is not None and Kt != handle.num_topk:
            if handle.num_topk == 0:
                raise ValueError(f"topk_weights: has {Kt} columns but the dispatch had no top-k "
                                 f"(handle.num_topk=0): pass None")
            raise ValueError(f"topk_weights: has {Kt} columns but the dispatch's top-k width is "
                             f"handle.num_topk={handle.num_topk}; pass [rows, {handle.num_topk}]")
        biases = []
        if bias is not None:
            blist = list(bias) if isinstance(bias, (tuple, list)) else [bias]
            if len(blist) > 2:
                raise ValueError(f"bias: at most two tensors, got {len(blist)}")
            for i, b in enumerate(blist):
                if b is not None:  # DeepEP's pair may hold None in either place
                    biases.append(self._tensor(b, f"bias[{i}]", dtype="bfloat16", ndim=2, shape=(N, H),
                                               framework=fw))
        cfg = self._call_config(config, self._combine_config, "combine")
        S, Rv = cfg.split()
        lay = st.layout
        row = K_intra.combine_row_bytes(H, Kt)
        cap = lay.capacity_rows(row)
        # Rows sent to one source rank <= that rank's dispatched tokens, which its dispatch
        # checked against capacity_rows(max_row_bytes(H, K)) of the same layout (equal on every
        # rank), and max_row_bytes >= combine_row_bytes: this holds in the num_worst_tokens mode
        # too, where the counts are unknown here.  The check below repeats it where they are known.
        if handle.recv_counts is not None and max(handle.recv_counts, default=0) > cap:
            raise ValueError(f"Buffer too small for this combine: {max(handle.recv_counts)} rows from one rank, "
                             f"capacity {cap}; need num_nvl_bytes >= "
                             f"{K_intra.nvl_buffer_size_hint(H, R, max(handle.recv_counts), Kt)}")
        chunk_rows = max(cfg.chunk_rows, -(-lay.capacity_rows(K_intra.max_row_bytes(H, Kt)) // K_intra.MAX_CHUNKS))
        spec = K_intra.IntranodeCombineSpec(R, H)
        self._alloc_on_comm = bool(allocate_on_comm_stream)
        with driver.on_device(self.device_id):
            mod = loader.load(spec, self.device_id)
            caller, cap = self._begin(fw, previous_event)
            out = self._empty(fw, (N, H), "bfloat16")
            outw = self._empty(fw, (N, Kt), "float32") if wr is not None else None
            p = st.params(self.timeout_s)
            refs = handle.refs
            p.x = xr.ptr
            p.topk_weights = _ptr(wr)
            p.send_pos, p.rank_prefix = refs["send_pos"].ptr, refs["rank_prefix"].ptr
            p.out = out[1].ptr
            p.out_weights = outw[1].ptr if outw else 0
            p.bias0 = biases[0].ptr if len(biases) > 0 else 0
            p.bias1 = biases[1].ptr if len(biases) > 1 else 0
            p.num_tokens, p.num_topk, p.num_experts = N, Kt, handle.num_experts
            p.chunk_rows, p.row_bytes = chunk_rows, row
            p.num_send_blocks = S
            launch(mod.fn("combine"), S + Rv, K_intra.THREADS, self._stream, p, cooperative=True)
            outs = [out[0]] + ([outw[0]] if outw else [])
            ev = self._finish(fw, caller, async_finish, outs,
                              [xr.obj, wr.obj if wr else None, handle.send_pos, handle.rank_prefix]
                              + [b.obj for b in biases], cap)
        return (interop.finish(fw, out[0], self._stream),
                (interop.finish(fw, outw[0], self._stream) if outw else None), ev)

    # ---- low-latency mode (epcomm.low_latency) -------------------------------------------------
    def _ll_state(self):
        ll, err = self._ll, self._err
        if ll is not None and not self._destroyed and err.poisoned is None and not err.pending():
            return ll  # the common case, checked cheaply (a decode step is tens of microseconds)
        if self._destroyed:
            raise BufferStateError("low-latency call: the Buffer was destroyed")
        if ll is None:
            raise BufferStateError("low-latency calls need a Buffer created with low_latency_mode=True")
        self._check_usable("low-latency call", collective=True)
        return ll

    def low_latency_dispatch(self, x, topk_idx, num_max_dispatch_tokens_per_rank: int, num_experts: int,
                             **kw):
        """See :meth:`epcomm.low_latency.LowLatencyState.dispatch`."""
        return self._ll_state().dispatch(x, topk_idx, num_max_dispatch_tokens_per_rank, num_experts, **kw)

    def low_latency_combine(self, x, topk_idx, topk_weights, handle, **kw):
        """See :meth:`epcomm.low_latency.LowLatencyState.combine`."""
        return self._ll_state().combine(x, topk_idx, topk_weights, handle, **kw)

    def clean_low_latency_buffer(self, num_max_dispatch_tokens_per_rank: int, hidden: int, num_experts: int) -> None:
        self._ll_state().clean(num_max_dispatch_tokens_per_rank, hidden, num_experts)

    def get_next_low_latency_combine_buffer(self, handle):
        return self._ll_state().next_combine_buffer(handle)
