"""Low-latency mode engine: the symmetric heap, peer pointers, control words and per-slot results
of one Buffer, with the call-level plumbing its dispatch, combine and fast paths share."""
from __future__ import annotations

import ctypes
from typing import NamedTuple

import numpy as np

from epcomm import envs, interop
from epcomm.errors import BufferStateError
from epcomm.kernels import low_latency as K
from epcomm.low_latency.combine import CombineOps
from epcomm.low_latency.dispatch import DispatchOps
from epcomm.low_latency.fast import FastPaths
from epcomm.low_latency.handle import SERIALS, _Results
from epcomm.runtime import driver, streams
from epcomm.runtime import event as event_mod
from epcomm.runtime import nvshmem as nvr
from epcomm.runtime.event import EventOverlap
from epcomm.runtime.topology import Topology


class HeapResources(NamedTuple):
    """What a low-latency engine runs on: NVSHMEM's buffer object (None for a heap not from
    NVSHMEM), the heap's address, this rank's control words, each peer's heap address (0:
    reached by NVSHMEM puts) and every pair's transport (:func:`nvlink_links`)."""
    heap_obj: object
    heap: int
    ctrl: int
    peers: list
    links: np.ndarray


def nvlink_links(reach, topology: Topology | None = None) -> np.ndarray:
    """bool [R, R]: ``[r, q]`` whether ranks r and q reach each other's heap over NVLink (else
    NVSHMEM puts, both ways).  ``reach[r][q]``: rank r maps rank q's heap.  A pair on two nodes
    of ``topology`` (declared nodes on one host included) or mapped one way only uses puts: both
    ends of a pair pick the same transport, as the combine's row format depends on it."""
    m = np.array([[bool(b) for b in row] for row in reach], dtype=bool)
    links = m & m.T
    if topology is not None and topology.spans_nodes:
        R = len(reach)
        node = np.array([topology.node_of(r) for r in range(R)])
        links &= node[:, None] == node[None, :]
    np.fill_diagonal(links, True)
    return links


class _Pending(tuple):
    """A pending receive's heap layout (T, H, E); compared by value, told apart by identity."""
    __slots__ = ()


class LowLatencyState(DispatchOps, CombineOps, FastPaths):
    """Symmetric heap, peer pointers, control words and per-slot results of one Buffer."""

    @staticmethod
    def check_args(num_ranks: int, num_rdma_bytes: int) -> None:
        """ValueError for a rank count or heap size the low-latency mode cannot use."""
        if num_ranks > K.MAX_RANKS:
            raise ValueError(f"{num_ranks} ranks: the low-latency mode supports at most {K.MAX_RANKS}")
        if num_rdma_bytes <= 0:
            raise ValueError("low_latency_mode needs num_rdma_bytes > 0; see Buffer.get_low_latency_rdma_size_hint")

    def __init__(self, ctx, num_rdma_bytes: int, *, resources: "HeapResources | None" = None):
        """Collective (every rank of ``ctx.group``): initialises NVSHMEM and allocates the symmetric
        heap, unless ``resources`` gives a heap already made (tests give a fake one)."""
        self.check_args(ctx.num_ranks, num_rdma_bytes)
        self.ctx = ctx
        self.serial = next(SERIALS)
        self.rank, self.num_ranks = ctx.rank, ctx.num_ranks
        self.device_id = ctx.device_id
        self.num_rdma_bytes = num_rdma_bytes
        self.heap_obj, self.ctrl, self.prof = None, 0, 0  # what free() may find half made
        try:
            if resources is None:
                resources = self._allocate(ctx, num_rdma_bytes)
            self.heap_obj, self.heap, self.ctrl, self.peers, self.links = resources
            self.force_put = bool(envs.LL_FORCE_NVSHMEM_PUT.get())
            # DeepEP's numerics add every row at the source, in k order: no expert-side partials.
            self.numerics = ctx.numerics
            self.partials = bool(envs.LL_COMBINE_PARTIALS.get()) and self.numerics == "epcomm"
            self.template = self._template(ctx)
            self._alloc_profile(ctx)
        except BaseException:
            # A half-made state frees its private memory.  Not the symmetric heap: its free is
            # collective (a barrier), which the peers, stuck elsewhere or gone, would never
            # join; it stays until NVSHMEM is finalised.
            with driver.on_device(ctx.device_id):
                self.free(collective=False)
            raise
        self.num_sms = ctx.device_sm_count()
        self._reset_slots()

    def _allocate(self, ctx, num_rdma_bytes: int) -> "HeapResources":
        """NVSHMEM's heap, this rank's control words and the peers' heap pointers (0 where
        :func:`nvlink_links` says puts)."""
        with driver.on_device(self.device_id):
            nvr.init(ctx.group, self.device_id, num_rdma_bytes, shared_gpu=ctx.shares_gpu)
            self.heap_obj, heap = nvr.alloc(num_rdma_bytes)
            driver.memset_d8_async(heap, 0, num_rdma_bytes, ctx.stream)
            self.ctrl = driver.mem_alloc(ctypes.sizeof(K.LLCtrl))
            driver.memset_d8_async(self.ctrl, 0, ctypes.sizeof(K.LLCtrl), ctx.stream)
            driver.stream_sync(ctx.stream)
            peers = [heap if r == self.rank else nvr.peer_ptr(self.heap_obj, r) for r in range(self.num_ranks)]
        # The all-gather also orders every heap's zeroing before anyone writes into it.
        reach = ctx.group.allgather_bytes(bytes(int(p != 0) for p in peers))
        links = nvlink_links(reach, ctx.topology)
        peers = [p if links[self.rank, r] else 0 for r, p in enumerate(peers)]
        ctx.group.barrier()
        return HeapResources(self.heap_obj, heap, self.ctrl, peers, links)

    def _template(self, ctx) -> K.LLParams:
        t = K.LLParams()
        for r, ptr in enumerate(self.peers):
            t.peer_base[r] = ptr
        t.heap, t.ctrl, t.err = self.heap, self.ctrl, ctx.err.dev_ptr
        t.rank, t.num_ranks = self.rank, self.num_ranks
        t.hdr_bytes = K.HDR_BYTES
        t.force_put = int(self.force_put)
        t.any_put = int(self.force_put or any(p == 0 for p in self.peers))
        t.partials = int(self.partials)
        t.mask_off, t.shrink = K.mask_offset(self.num_ranks), int(ctx.shrink)
        return t

    @property
    def mask_addr(self) -> int:
        """Device address of this rank's mask words (int32 [R], in the symmetric heap)."""
        return self.heap + K.mask_offset(self.num_ranks)

    def _alloc_profile(self, ctx) -> None:
        """EPCOMM_PROFILE: per-block phase stamps, read by :meth:`profile_stamps`."""
        if not envs.PROFILE.get():
            return
        self.prof_bytes = 2 * K.PROF_BLOCKS * K.PROF_SLOTS * 8
        with driver.on_device(self.device_id):
            self.prof = driver.mem_alloc(self.prof_bytes)
            driver.memset_d8_async(self.prof, 0, self.prof_bytes, ctx.stream)
            driver.stream_sync(ctx.stream)
        self.template.prof = self.prof

    def _reset_slots(self) -> None:
        """The per-call state of a new engine: slots, generations, pending hooks, memos."""
        self._disp_slot = 0
        self._comb_slot = 0
        self._disp_gen = [0, 0]
        # Each slot's receive hook not yet called: its call's heap layout (T, H, E), else False.
        self._disp_pending = [False, False]
        self._comb_pending = [False, False]
        self._hooks_pending = 0  # how many of the four (the fast paths' one test)
        self._results: list[_Results | None] = [None, None]   # each slot's latest dispatch's
        self._kept: dict = {}   # (slot, results key) -> _Results, for every shape used (not JAX's)
        self._layouts: dict = {}
        self._coop_limit: dict = {}
        self._smem_ok: set = set()
        # Fast path (torch, default flags): prepared launches keyed by shapes and slot, so a
        # steady-state decode call only sets two pointers and launches.
        self._plans: dict = {}
        self._torch = None
        self._tdev = None            # torch.device of this buffer (fast path allocations)
        self._get_device = None      # torch's current-device query
        self._no_event = EventOverlap(None, "torch", self.device_id)  # what a synchronous call returns
        self.fast_calls = 0          # calls served by the fast paths (tests check they are taken)
        self._shapes_checked: set = set()  # (slot, shape word) whose receive compared the sources' shapes

    def profile_stamps(self) -> dict | None:
        """Per-block phase stamps of the last low-latency kernels (EPCOMM_PROFILE=1 at Buffer
        creation; otherwise None): ``{"dispatch"|"combine": int64 [blocks, 8]}`` of globaltimer
        ns, phases in ``epcomm.kernels.low_latency.PROF_PHASES``, 0 where a block did not get
        there.  Synchronises the device and clears the stamps."""
        if not self.prof:
            return None
        host = self.ctx.drain(self.prof, self.prof_bytes)
        host = host.reshape(2, K.PROF_BLOCKS, K.PROF_SLOTS)
        return {"dispatch": host[0], "combine": host[1]}

    def set_combine_partials(self, on: bool) -> None:
        """Switch the combine's expert-side partial sums (EPCOMM_LL_COMBINE_PARTIALS) for later
        calls, e.g. for an A/B benchmark.  Collective: every rank must switch between the same
        two calls, before a dispatch (its shape word carries the setting, and ranks that
        differ raise RankMismatchError there).  Drops the prepared plans; graphs captured
        before keep the old setting.  ValueError for on=True with the Buffer's
        numerics="deepep", which sums every row at the source."""
        on = bool(on)
        if on and self.numerics == "deepep":
            raise ValueError("set_combine_partials(True): this Buffer has numerics='deepep', whose combine adds "
                             "every row at the source in top-k order (no expert-side partial sums)")
        if on != self.partials:
            self.partials = on
            self.template.partials = int(on)
            self._plans.clear()
            self._shapes_checked.clear()

    def partial_pairs(self, on: bool | None = None) -> np.ndarray:
        """bool [R, R]: ``[s, d]`` whether expert-side rank d sends source rank s partial sums in
        a combine, with the setting ``on`` (default the Buffer's): only between ranks that reach
        each other over NVLink (:func:`nvlink_links`), so never across nodes (declared ones
        included), between GPUs that cannot map each other, nor with
        EPCOMM_LL_FORCE_NVSHMEM_PUT.  What ``reference.low_latency_combine(partials=...)`` takes."""
        on = (self.partials if on is None else bool(on)) and not self.force_put
        return self.links & on

    # ---- helpers ---------------------------------------------------------------------------
    def empty(self, fw, shape, dtype, name: str | None = None):
        """A new ``fw`` array on this GPU ((obj, TensorRef)); the caller's output ``name``
        inside ``ctx.supplying`` (CommContext.empty)."""
        shape = tuple(int(s) for s in shape)
        if self.ctx.sink is not None:
            return self.ctx.sink.take(name, shape, dtype)
        return interop.empty(fw, shape, dtype, "cuda", self.device_id)

    def call_slot(self, alternating: int) -> int:
        """The slot of this call: the caller's (``ctx.supplying`` with a slot), else the
        engine's alternation ``alternating``."""
        sink = self.ctx.sink
        return alternating if sink is None or sink.slot is None else sink.slot

    def wait_stats_arg(self, obj, name: str, fw: str):
        """A wait-statistics argument checked: None, or int64 [R] on this device, in the call's
        framework ``fw``, writable (the kernels add into it)."""
        return self.ctx.tensor(obj, name, dtype="int64", ndim=1, shape=(self.num_ranks,), allow_none=True,
                               framework=fw, writable=True)

    def pending(self, op: str) -> list:
        """Each slot's pending receive of ``op`` ("dispatch" or "combine"): its entry, else False."""
        return self._disp_pending if op == "dispatch" else self._comb_pending

    def hook_pending(self, op: str, slot: int, T: int, H: int, E: int) -> None:
        """The send half of ``op`` into ``slot`` was launched; its receive waits for the hook.
        The entry is a new object per call: a hook knows its own (hooks.receive_hook)."""
        self.pending(op)[slot] = _Pending((T, H, E))
        self._hooks_pending += 1

    def hook_called(self, op: str, slot: int) -> None:
        """The receive half of ``op`` into ``slot`` was launched."""
        self.pending(op)[slot] = False
        self._hooks_pending -= 1

    def check_hooks(self, what: str, T: int, H: int, E: int) -> None:
        """BufferStateError if a receive hook of a call with another heap layout (T, H, E) is
        pending.  Where the regions sit depends on the layout, so a call's messages or rows can
        land where the pending receive, here or at a peer, has yet to read (the kernels' own
        wait for a layout change, ll_wait_layout_quiet, covers receives that ended)."""
        if not self._hooks_pending:
            return
        for op, pending in (("dispatch", self._disp_pending), ("combine", self._comb_pending)):
            for slot, held in enumerate(pending):
                if held and held != (T, H, E):
                    raise BufferStateError(
                        f"{what}: the receive hook of a low_latency_{op} with another shape is pending "
                        f"(num_max_dispatch_tokens_per_rank, hidden, num_experts {held} here {(T, H, E)}); "
                        f"its messages would be overwritten: call the hook first")

    def layout(self, T, H, E) -> K.HeapLayout:
        key = (T, H, E)
        lay = self._layouts.get(key)
        if lay is None:
            lay = K.HeapLayout.make(T, H, E, self.num_ranks)
            if lay.total > self.num_rdma_bytes:
                raise ValueError(
                    f"Buffer too small for low-latency calls with num_max_dispatch_tokens_per_rank={T}, hidden={H}, "
                    f"num_experts={E}: need num_rdma_bytes >= {lay.total}, have {self.num_rdma_bytes} "
                    f"(Buffer.get_low_latency_rdma_size_hint)")
            self._layouts[key] = lay
        return lay

    def _params(self, lay: K.HeapLayout, slot: int, spec=None) -> K.LLParams:
        p = K.LLParams()
        ctypes.pointer(p)[0] = self.template
        p.disp_flag_off, p.comb_flag_off = lay.disp_flag_off, lay.comb_flag_off
        p.disp_ack_off, p.comb_ack_off = lay.disp_ack_off, lay.comb_ack_off
        p.disp_shape_off = lay.disp_shape_off
        p.comb_wflag_off, p.comb_w_off = lay.comb_wflag_off, lay.comb_w_off
        p.disp_region_off, p.comb_region_off = lay.disp_region_off, lay.comb_region_off
        p.disp_send_off, p.comb_send_off = lay.disp_send_off, lay.comb_send_off
        p.lf_meta_off, p.lf_stage_off = lay.lf_meta_off, lay.lf_stage_off
        p.msg_bytes = lay.msg_bytes
        p.slot = slot
        p.timeout_ns = self._timeout_ns(spec)
        return p

    def _timeout_ns(self, spec=None) -> int:
        """How long this call's kernels (of module ``spec``) wait for a peer
        (:meth:`CommContext.kernel_timeout_s`: read at each call, so a prepared launch of the
        fast paths is given it again)."""
        return int(self.ctx.kernel_timeout_s(spec) * 1e9)

    def _allow_smem(self, mod, names, smem: int) -> None:
        """Let the kernels ``names`` of ``mod`` use ``smem`` bytes of dynamic shared memory (above
        the 48 KiB every kernel gets); ValueError if the device has less per block."""
        key = (id(mod), tuple(names), smem)
        if key in self._smem_ok:
            return
        cap = driver.device_attr(self.device_id, "CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN")
        if smem > cap:
            raise ValueError(f"low-latency {names[0].split('_')[0]}: num_ranks * num_max_dispatch_tokens_per_rank is "
                             f"too large: the kernel needs {smem} bytes of shared memory per block, the device "
                             f"has {cap}")
        d = driver.drv()
        attr = d.CUfunction_attribute.CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES
        for n in names:
            driver.check(d.cuFuncSetAttribute(mod.fn(n), attr, smem), f"cuFuncSetAttribute({n}, smem={smem})")
        self._smem_ok.add(key)

    def _coop_blocks(self, fn, smem: int) -> int:
        key = (int(fn), smem)
        n = self._coop_limit.get(key)
        if n is None:
            d = driver.drv()
            per_sm = driver.check(d.cuOccupancyMaxActiveBlocksPerMultiprocessor(fn, K.THREADS, smem),
                                 "cuOccupancyMaxActiveBlocksPerMultiprocessor")
            n = self._coop_limit[key] = max(1, int(per_sm)) * self.num_sms
        return n

    def _stream_for(self, fw: str, async_finish: bool, previous_event,
                    caller_work: bool = False) -> tuple[int, int, bool]:
        """(caller stream, kernel stream, capturing): the caller's own stream, or with
        ``async_finish`` or ``previous_event`` the comm stream, ordered as in Buffer._begin;
        ``capturing``: the caller's stream is in a CUDA-graph capture."""
        if not async_finish and previous_event is None:
            caller, cap = self.ctx.caller_stream(fw)
            return caller, caller, bool(cap)
        caller, cap = self.ctx.begin(fw, previous_event, caller_work)
        return caller, self.ctx.stream, bool(cap)

    def _order_caller_after(self, fw: str, stream: int) -> None:
        """A hook's receive ran on epcomm's stream (the call had a previous_event): the caller's
        current stream, where its results are read, waits for it, as the call's own event made
        it wait for the send half."""
        caller = streams.current_stream(fw, self.device_id)
        if stream == caller:
            return
        driver.event_record(self.ctx.ev_start, stream)
        driver.stream_wait_event(caller, self.ctx.ev_start)

    def _event(self, fw: str, caller: int, stream: int, async_finish: bool, refs=()) -> EventOverlap:
        """The call's event.  With ``async_finish`` the kernel still reads ``refs`` (TensorRefs of
        the inputs, e.g. an int32 topk_idx widened into a temporary) after the call returns:
        the event keeps them alive, and torch's allocator is told they are in use on ``stream``."""
        if stream == caller:
            return EventOverlap(None, fw, self.device_id)
        ev = driver.event_create()
        driver.event_record(ev, stream)
        cap = driver.capture_id(stream)
        if not async_finish:
            driver.stream_wait_event(caller, ev)
            return EventOverlap(ev, fw, self.device_id, capture=cap)
        event_mod.release_deferred(cap)
        keep = [o for r in refs if r is not None for o in (r.obj, r.keepalive) if o is not None]
        if fw == "torch":
            interop.record_on_stream(keep, stream, self.device_id)
        return EventOverlap(ev, fw, self.device_id, extra=keep, capture=cap)

    # ---- lifecycle ---------------------------------------------------------------------------
    def clean(self, T: int, H: int, E: int) -> None:
        """Reset all low-latency flags and sequence numbers (collective; no call may be in flight).

        ``T, H, E``: the largest shape the next calls use (as for the size hint).  Raises
        TypeError/ValueError for a shape the kernels cannot run or the heap cannot hold, and
        BufferStateError while a receive hook is pending (call it first): the checks run before
        the collective, so every rank raises alike.  Handles of earlier dispatches become stale.
        """
        T, H, E, _ = K.check_shape(T, H, E, self.num_ranks)
        self.layout(T, H, E)  # raises for a heap too small; kept among the shapes used
        if any(self._disp_pending) or any(self._comb_pending):
            raise BufferStateError("clean_low_latency_buffer: a low-latency receive hook is pending; call it first")
        # Message tags restart: zero everything that holds message headers, of every shape
        # used so far (this one among them): the dispatch regions and, up to its end, the put
        # staging.  A later shape's messages may sit where those headers are, and one left
        # there would match a restarted tag (ll_msg_tag in low_latency.cuh).
        end = max(ly.disp_send_end for ly in self._layouts.values())
        ctx = self.ctx
        with driver.on_device(self.device_id):
            # The whole device, not only the comm stream: low-latency kernels usually run on the
            # caller's streams, and one still queued there (here or, past the barrier, at a
            # peer) would write flags and rows after they are zeroed.
            driver.device_sync()
            ctx.group.barrier()
            # Flags, acknowledgements and the regions up to `end` (whose message tags restart
            # too); not the rank mask between them (clean_mask clears it).
            m0 = K.mask_offset(self.num_ranks)
            m1 = m0 + 4 * self.num_ranks
            driver.memset_d8_async(self.heap, 0, m0, ctx.stream)
            driver.memset_d8_async(self.heap + m1, 0, end - m1, ctx.stream)
            driver.memset_d8_async(self.ctrl, 0, ctypes.sizeof(K.LLCtrl), ctx.stream)
            driver.stream_sync(ctx.stream)
            ctx.group.barrier()
            # Dispatch tags restart: the combine records of earlier dispatches could match them.
            for res in {id(r): r for r in (*self._results, *self._kept.values()) if r is not None}.values():
                driver.memset_d8_async(res.tok_meta[1].ptr, 0, res.tok_meta[1].nbytes, ctx.stream)
            driver.stream_sync(ctx.stream)
        self._disp_slot = self._comb_slot = 0
        # Handles of earlier dispatches refer to records just erased: combines with them raise.
        self._disp_gen = [g + 1 for g in self._disp_gen]
        self._plans.clear()
        self._shapes_checked.clear()
        self._disp_pending = [False, False]
        self._comb_pending = [False, False]
        self._hooks_pending = 0

    def free(self, collective: bool = True) -> None:
        """Free the control words and profile stamps, and with ``collective`` (every rank
        calls it: Buffer.destroy) the symmetric heap."""
        for ptr in (self.ctrl, self.prof):
            try:
                if ptr:
                    driver.mem_free(ptr)
            except Exception:
                pass
        self.ctrl = self.prof = 0
        if not collective:
            return
        try:
            if self.heap_obj is not None:
                nvr.free(self.heap_obj)
        except Exception:
            pass
