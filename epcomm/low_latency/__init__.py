"""Low-latency mode of :class:`epcomm.Buffer` (decoding): state, host logic and hooks.

Kernels: ``cuda_src/low_latency.cuh`` via :mod:`epcomm.kernels.low_latency`.

Host cost matters here (a decode step is tens of microseconds), so the steady state allocates
little: the packed dispatch outputs are *double-buffered results* owned by the buffer (one set
per slot, reused every second dispatch), launch parameters are prebuilt, and a call is a single
kernel launch (two with the receive hook).  A dispatch of a shape already used, with int64
indices and EPCOMM_CHECK_INDICES=0, allocates no device memory (the default check copies the
indices and costs a device sync; int32 indices are widened into a copy; JAX results get new
storage every call); the combine allocates only its ``[N, H]`` output, which ``out=`` avoids
(not with JAX, whose arrays are read-only).
"""
from __future__ import annotations

import ctypes
import itertools
from dataclasses import dataclass, field

import numpy as np

from epcomm.runtime import driver
from epcomm import envs, interop
from epcomm.runtime import event as event_mod
from epcomm.validate import check_bool, check_event, check_int, check_topk_indices
from epcomm.errors import BufferStateError
from epcomm.runtime.event import EventOverlap
from epcomm.jit import loader
from epcomm.jit.launch import launch, launch_args, launch_prepared
from epcomm.kernels import low_latency as K

_SERIALS = itertools.count(1)
_DEFAULT_SMEM = 48 * 1024  # dynamic shared memory a kernel may use without opting in


class _Plan:
    """A prepared steady-state launch (fast path): its params (only the pointers change per
    call), kernel, grid and argument array, and for a dispatch the views it returns."""
    __slots__ = ("p", "fn", "grid", "smem", "args", "out")

    def __init__(self, p, fn, grid, smem, out=None):
        self.p, self.fn, self.grid, self.smem, self.out = p, fn, grid, smem, out
        self.args = launch_args(p)


@dataclass(eq=False)
class LowLatencyHandle:
    """Route of one low-latency dispatch, for its combine.

    ``src_info`` (int32 [L, R*T]): source token index of each packed row; ``layout_range``
    (int32 [L, R, 2]): (begin, count) of the rows from each source rank inside each local expert.
    Both are views of the buffer's double-buffered results of ``slot``: they stay valid until the
    second next dispatch (the combine checks this and raises if they were overwritten).
    """

    slot: int
    generation: int
    framework: str
    num_max_tokens: int
    hidden: int
    num_experts: int
    num_topk: int
    num_tokens: int
    src_info: object
    layout_range: object
    refs: dict = field(repr=False, default_factory=dict)


class _Results:
    """The packed outputs of one dispatch slot, in one framework, for one shape."""

    def __init__(self, st: "LowLatencyState", fw: str, T: int, H: int, E: int, fp8: bool, ue8m0: bool):
        R = st.num_ranks
        L = E // R
        RT = R * T
        G = H // 128
        self.key = (fw, T, H, E, fp8, ue8m0)
        self.owner = st.serial  # handles carry this object: which Buffer made them
        mk = st.empty
        self.x = mk(fw, (L, RT, H), "float8_e4m3fn" if fp8 else "bfloat16")
        self.scales = None
        if fp8:
            if ue8m0:
                nw = (G + 3) // 4
                self.scales = mk(fw, (L, nw, RT), "int32")
            else:
                self.scales = mk(fw, (L, G, RT), "float32")
        self.count = mk(fw, (L,), "int32")
        self.src_info = mk(fw, (L, RT), "int32")
        self.layout_range = mk(fw, (L, R, 2), "int32")
        self.src_k = mk(fw, (L, RT), "int32")
        # For the combine (not returned): each source token's packed rows by k, and the mask of
        # its k on this rank with the dispatch's tag (zeroed once: no stale entry can match).
        self.tok_rows = mk(fw, (RT, K.MAX_TOPK), "int32")
        self.tok_meta = mk(fw, (RT,), "int64")
        self.fresh = True
        self.fw = fw
        self._views = None if fw == "jax" else self._make_views(None)

    def _make_views(self, stream):
        fw = self.fw
        fin = lambda o: interop.finish(fw, o[0], stream)  # noqa: E731
        x = fin(self.x)
        scales = None
        if self.scales is not None:
            s = fin(self.scales)
            # Column-major in the last two dims: logical [L, R*T, G], memory [L][G][R*T].
            scales = s.transpose(1, 2) if fw == "torch" else s.transpose(0, 2, 1)
        return x, scales, fin(self.count), fin(self.src_info), fin(self.layout_range)

    def views(self, stream):
        """Caller-framework arrays (x, scales, count, src_info, layout_range).  JAX arrays are
        made after the kernel was queued, so JAX's stream is ordered after it."""
        return self._views if self._views is not None else self._make_views(stream)


def _check_hook_framework(return_recv_hook: bool, fw: str) -> None:
    if return_recv_hook and fw == "jax":
        raise ValueError("return_recv_hook=True with JAX arrays: JAX has no stream that could be ordered "
                         "after the hook's receive, so its outputs would be read before they are written; "
                         "use the default (one call) or async_finish=True")


class LowLatencyState:
    """Symmetric heap, peer pointers, control words and per-slot results of one Buffer."""

    @staticmethod
    def check_args(num_ranks: int, num_rdma_bytes: int) -> None:
        """ValueError for a rank count or heap size the low-latency mode cannot use."""
        if num_ranks > K.MAX_RANKS:
            raise ValueError(f"{num_ranks} ranks: the low-latency mode supports at most {K.MAX_RANKS}")
        if num_rdma_bytes <= 0:
            raise ValueError("low_latency_mode needs num_rdma_bytes > 0; see Buffer.get_low_latency_rdma_size_hint")

    def __init__(self, buf, num_rdma_bytes: int):
        self.check_args(buf.num_ranks, num_rdma_bytes)
        self.heap_obj, self.ctrl, self.prof = None, 0, 0  # what free() may find half made
        try:
            self._setup(buf, num_rdma_bytes)
        except BaseException:
            # A half-made state frees its private memory.  Not the symmetric heap: its free is
            # collective (a barrier), which the peers, stuck elsewhere or gone, would never
            # join; it stays until NVSHMEM is finalised.
            with driver.on_device(buf.device_id):
                self.free(collective=False)
            raise

    def _setup(self, buf, num_rdma_bytes: int) -> None:
        from epcomm.runtime import nvshmem as nvr
        self.buf = buf
        self.serial = next(_SERIALS)
        self.rank, self.num_ranks = buf.rank, buf.num_ranks
        self.device_id = buf.device_id
        self.num_rdma_bytes = num_rdma_bytes
        with driver.on_device(self.device_id):
            nvr.init(buf.group, self.device_id, num_rdma_bytes, shared_gpu=getattr(buf, "shares_gpu", False))
            self.heap_obj, self.heap = nvr.alloc(num_rdma_bytes)
            driver.memset_d8_async(self.heap, 0, num_rdma_bytes, buf._stream)
            self.ctrl = driver.mem_alloc(ctypes.sizeof(K.LLCtrl))
            driver.memset_d8_async(self.ctrl, 0, ctypes.sizeof(K.LLCtrl), buf._stream)
            driver.stream_sync(buf._stream)
            self.peers = [self.heap if r == self.rank else nvr.peer_ptr(self.heap_obj, r)
                          for r in range(self.num_ranks)]
        # Both ends of a pair must pick the same transport (the combine's row format depends on
        # it): a pair reachable over NVLink one way only uses puts both ways.  The all-gather
        # also orders every heap's zeroing before anyone writes into it.
        reach = buf.group.allgather_bytes(bytes(int(p != 0) for p in self.peers))
        for r in range(self.num_ranks):
            if r != self.rank and not reach[r][self.rank]:
                self.peers[r] = 0
        buf.group.barrier()
        self.force_put = bool(envs.LL_FORCE_NVSHMEM_PUT.get())
        self.partials = bool(envs.LL_COMBINE_PARTIALS.get())
        t = K.LLParams()
        for r, ptr in enumerate(self.peers):
            t.peer_base[r] = ptr
        t.heap, t.ctrl, t.err = self.heap, self.ctrl, buf._err.dev_ptr
        t.rank, t.num_ranks = self.rank, self.num_ranks
        t.hdr_bytes = K.HDR_BYTES
        t.force_put = int(self.force_put)
        t.any_put = int(self.force_put or any(p == 0 for p in self.peers))
        t.partials = int(self.partials)
        self.prof = 0
        if envs.PROFILE.get():
            self.prof_bytes = 2 * K.PROF_BLOCKS * K.PROF_SLOTS * 8
            with driver.on_device(self.device_id):
                self.prof = driver.mem_alloc(self.prof_bytes)
                driver.memset_d8_async(self.prof, 0, self.prof_bytes, buf._stream)
                driver.stream_sync(buf._stream)
            t.prof = self.prof
        self.template = t
        self.num_sms = driver.num_sms(self.device_id)
        self._disp_slot = 0
        self._comb_slot = 0
        self._disp_gen = [0, 0]
        self._disp_pending = [False, False]
        self._comb_pending = [False, False]
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
        import numpy as np
        host = np.zeros(self.prof_bytes // 8, dtype=np.int64)
        with driver.on_device(self.device_id):
            driver.device_sync()
            driver.memcpy_dtoh(host.ctypes.data, self.prof, self.prof_bytes)
            driver.memset_d8_async(self.prof, 0, self.prof_bytes, self.buf._stream)
            driver.stream_sync(self.buf._stream)
        host = host.reshape(2, K.PROF_BLOCKS, K.PROF_SLOTS)
        return {"dispatch": host[0], "combine": host[1]}

    def set_combine_partials(self, on: bool) -> None:
        """Switch the combine's expert-side partial sums (EPCOMM_LL_COMBINE_PARTIALS) for later
        calls, e.g. for an A/B benchmark.  Collective: every rank must switch between the same
        two calls, before a dispatch (its shape word carries the setting, and ranks that
        differ raise RankMismatchError there).  Drops the prepared plans; graphs captured
        before keep the old setting."""
        on = bool(on)
        if on != self.partials:
            self.partials = on
            self.template.partials = int(on)
            self._plans.clear()
            self._shapes_checked.clear()

    # ---- helpers ---------------------------------------------------------------------------
    def empty(self, fw, shape, dtype):
        return interop.empty(fw, tuple(int(s) for s in shape), dtype, "cuda", self.device_id)

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

    def _params(self, lay: K.HeapLayout, slot: int) -> K.LLParams:
        p = K.LLParams()
        ctypes.pointer(p)[0] = self.template
        p.disp_flag_off, p.comb_flag_off = lay.disp_flag_off, lay.comb_flag_off
        p.disp_ack_off, p.comb_ack_off = lay.disp_ack_off, lay.comb_ack_off
        p.disp_shape_off = lay.disp_shape_off
        p.comb_wflag_off, p.comb_w_off = lay.comb_wflag_off, lay.comb_w_off
        p.disp_region_off, p.comb_region_off = lay.disp_region_off, lay.comb_region_off
        p.disp_send_off, p.comb_send_off = lay.disp_send_off, lay.comb_send_off
        p.msg_bytes = lay.msg_bytes
        p.slot = slot
        p.timeout_ns = int(self.buf.timeout_s * 1e9)
        return p

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
            caller = interop.current_stream(fw, self.device_id)
            return caller, caller, driver.stream_is_capturing(caller)
        caller, cap = self.buf._begin(fw, previous_event, caller_work)
        return caller, self.buf._stream, bool(cap)

    def _order_caller_after(self, fw: str, stream: int) -> None:
        """A hook's receive ran on epcomm's stream (the call had a previous_event): the caller's
        current stream, where its results are read, waits for it, as the call's own event made
        it wait for the send half."""
        caller = interop.current_stream(fw, self.device_id)
        if stream == caller:
            return
        driver.event_record(self.buf._ev_start, stream)
        driver.stream_wait_event(caller, self.buf._ev_start)

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
        if event_mod._DEFERRED and not cap:
            event_mod.release_finished()
        keep = [o for r in refs if r is not None for o in (r.obj, r.keepalive) if o is not None]
        if fw == "torch":
            import torch
            cs = torch.cuda.ExternalStream(stream, device=self.device_id)
            for o in keep:
                if isinstance(o, torch.Tensor):
                    interop.record_stream(o, cs)
        return EventOverlap(ev, fw, self.device_id, extra=keep, capture=cap)

    # ---- dispatch ------------------------------------------------------------------------------
    def dispatch(self, x, topk_idx, num_max_dispatch_tokens_per_rank: int, num_experts: int, *,
                 cumulative_local_expert_recv_stats=None, use_fp8: bool = True, round_scale: bool = False,
                 use_ue8m0: bool = False, async_finish: bool = False, return_recv_hook: bool = False,
                 previous_event: EventOverlap | None = None):
        """Low-latency dispatch: one message per (token, destination rank), expanded by the
        receiver into the expert-major packed layout.

        Args:
            x: bf16 [N, H] with N <= ``num_max_dispatch_tokens_per_rank`` (T), H % 128 == 0.
            topk_idx: int64 (or int32) [N, K], K <= 32, -1 = none.
            num_experts: E, a multiple of the rank count.
            cumulative_local_expert_recv_stats: optional int32 [E/R]; received rows are added.
            use_fp8: cast to e4m3 with one float32 scale per token and 128 channels
               (scale = max(amax, 1e-4) / 448); ``round_scale``: scales rounded up to powers of
               two; ``use_ue8m0``: scales packed as exponent bytes, 4 per int32 (needs round_scale).
            return_recv_hook: only issue the sends and return; ``hook()`` launches the receive.
               Nothing occupies the GPU in between.

        Returns ``(recv_x, recv_count, handle, event, hook)``.  ``recv_x`` is bf16 [E/R, R*T, H]
        or, with FP8, ``(e4m3 [E/R, R*T, H], scales)`` with scales float32 [E/R, R*T, H/128]
        (or int32 [E/R, R*T, ceil(H/512)] with UE8M0) stored column-major in the last two dims.
        Rows of local expert j: ``[0, recv_count[j])``, ordered by source rank then source token.
        The results are views of this buffer's double-buffered storage: valid until the second
        next dispatch.  Each (slot, framework, shape, dtype) keeps its storage for the buffer's
        life, so graphs captured with different shapes stay replayable.  ``hook`` is None unless ``return_recv_hook``.  CUDA-graph capturable.
        """
        if (self._torch is not None and cumulative_local_expert_recv_stats is None and not async_finish
                and not return_recv_hook and previous_event is None):
            r = self._fast_dispatch(x, topk_idx, num_max_dispatch_tokens_per_rank, num_experts, use_fp8,
                                    round_scale, use_ue8m0)
            if r is not None:
                return r
        R = self.num_ranks
        b = self.buf
        check_event(previous_event)
        use_fp8, round_scale, use_ue8m0 = (check_bool("use_fp8", use_fp8), check_bool("round_scale", round_scale),
                                           check_bool("use_ue8m0", use_ue8m0))
        async_finish = check_bool("async_finish", async_finish)
        return_recv_hook = check_bool("return_recv_hook", return_recv_hook)
        xr = b._tensor(x, "x", dtype="bfloat16", ndim=2)
        N, H = xr.shape
        fw = xr.framework
        _check_hook_framework(return_recv_hook, fw)
        T = check_int("num_max_dispatch_tokens_per_rank", num_max_dispatch_tokens_per_rank, lo=1)
        if N > T:
            raise ValueError(f"x: {N} tokens exceed num_max_dispatch_tokens_per_rank={T}")
        if H % 128 or H == 0:
            raise ValueError(f"x: hidden size {H} must be a positive multiple of 128 for the low-latency kernels")
        E = check_int("num_experts", num_experts, lo=1)
        if E % R:
            raise ValueError(f"num_experts={E} must be a multiple of the number of ranks {R}")
        if E > 32767:
            raise ValueError(f"num_experts={E}: at most 32767 (expert ids travel as int16)")
        tr = b._tensor(topk_idx, "topk_idx", dtype="index", ndim=2, shape=(N, None), framework=fw,
                       previous_event=previous_event)
        Kt = tr.shape[1]
        if not 1 <= Kt <= K.MAX_TOPK:
            raise ValueError(f"topk_idx: top-k {Kt} must be in [1, {K.MAX_TOPK}]")
        if use_ue8m0 and not round_scale:
            raise ValueError("use_ue8m0=True needs round_scale=True (UE8M0 stores powers of two only)")
        if async_finish and return_recv_hook:
            raise ValueError("async_finish and return_recv_hook cannot both be set: with the hook, the receive "
                             "runs when hook() is called, on the stream of the send")
        if (round_scale or use_ue8m0) and not use_fp8:
            raise ValueError("round_scale/use_ue8m0 apply to FP8 dispatch only (use_fp8=True)")
        shape = K.shape_word(T, H, E, Kt, bool(use_fp8), bool(round_scale), bool(use_ue8m0), self.force_put,
                             self.partials)
        L = E // R
        stats = b._tensor(cumulative_local_expert_recv_stats, "cumulative_local_expert_recv_stats",
                          dtype="int32", ndim=1, shape=(L,), allow_none=True, framework=fw, writable=True)
        lay = self.layout(T, H, E)
        slot = self._disp_slot
        if self._disp_pending[slot]:
            raise BufferStateError(
                "low_latency_dispatch: the receive hook of the dispatch two calls ago (same buffer slot) "
                "was never called; call it before issuing another dispatch")
        mod = loader.load(K.LowLatencySpec(H, bool(use_fp8)), self.device_id)
        smem = K.dispatch_smem_bytes(R, T)
        with driver.on_device(self.device_id):
            if smem > _DEFAULT_SMEM:  # may raise: before anything below changes state
                self._allow_smem(mod, ("dispatch_send", "dispatch_recv", "dispatch_both"), smem)
            caller, stream, capturing = self._stream_for(fw, async_finish, previous_event, caller_work=tr.widened)
            # With the check on, the combine compares its top-k with this one: the host copy the
            # check read (callers may change theirs in place, e.g. to mask an expert, which
            # this combine cannot do).
            topk_copy = check_topk_indices(tr.obj, fw, E, capturing=capturing, unique=True,
                                           previous_event=previous_event)
            res = self._results[slot]
            key = (fw, T, H, E, bool(use_fp8), bool(use_ue8m0))
            if fw == "jax":
                # JAX arrays are immutable once handed out: every dispatch gets new storage.
                res = self._results[slot] = _Results(self, fw, T, H, E, bool(use_fp8), bool(use_ue8m0))
            elif res is None or res.key != key:
                # The results of every shape stay with the buffer: a CUDA graph captured with
                # another shape writes into them at every replay, and its prepared plans stay
                # valid.  Memory: one set per (slot, framework, shape, dtype) ever used.
                res = self._kept.get((slot, key))
                if res is None:
                    res = self._kept[(slot, key)] = _Results(self, fw, T, H, E, bool(use_fp8), bool(use_ue8m0))
                self._results[slot] = res
            p = self._params(lay, slot)
            p.x, p.topk_idx = xr.ptr, tr.ptr
            p.recv_x = res.x[1].ptr
            p.recv_scales = res.scales[1].ptr if res.scales is not None else 0
            p.recv_count, p.recv_src_info = res.count[1].ptr, res.src_info[1].ptr
            p.recv_layout_range, p.recv_src_k = res.layout_range[1].ptr, res.src_k[1].ptr
            p.recv_tok_rows, p.recv_tok_meta = res.tok_rows[1].ptr, res.tok_meta[1].ptr
            if res.fresh:
                # Zeroed on the kernel's stream before its first dispatch; under capture the
                # memset is only in the graph, so the next eager dispatch zeroes again.
                driver.memset_d8_async(res.tok_meta[1].ptr, 0, R * T * 8, stream)
                res.fresh = capturing
            p.cumulative_stats = stats.ptr if stats is not None else 0
            p.num_tokens, p.num_topk, p.num_experts, p.max_tokens = N, Kt, E, T
            p.round_scale, p.use_ue8m0 = int(round_scale), int(use_ue8m0)
            # Ranks must agree on the shape: the receive compares every source's word with ours
            # on the first dispatch of each shape in each slot (outside graph capture).
            p.shape_word = shape
            p.check_shape = int(not capturing and (slot, shape) not in self._shapes_checked)
            send_blocks = max(1, min(self.num_sms, N))
            recv_blocks = max(1, min(self.num_sms, L))
            fn = grid = None
            if return_recv_hook:
                launch(mod.fn("dispatch_send"), send_blocks, K.THREADS, stream, p, smem=smem)
                self._disp_pending[slot] = True
            else:
                fn = mod.fn("dispatch_both")
                grid = min(max(send_blocks, recv_blocks), self._coop_blocks(fn, smem))
                launch(fn, grid, K.THREADS, stream, p, smem=smem, cooperative=True)
            if p.check_shape:
                self._shapes_checked.add((slot, shape))
            self._disp_slot ^= 1
            self._disp_gen[slot] += 1
            gen = self._disp_gen[slot]
            ev = self._event(fw, caller, stream, async_finish, (xr, tr, stats))
        vx, vscales, vcount, vsrc, vrange = res.views(stream)
        handle = LowLatencyHandle(slot, gen, fw, T, H, E, Kt, N, vsrc, vrange,
                                  refs={"count": res.count[1], "range": res.layout_range[1],
                                        "src_info": res.src_info[1], "src_k": res.src_k[1],
                                        "tok_rows": res.tok_rows[1], "tok_meta": res.tok_meta[1], "keep": res,
                                        "topk": topk_copy})
        hook = None
        if return_recv_hook:
            def hook(_p=p, _stream=stream, _slot=slot, _mod=mod, _grid=recv_blocks, _smem=smem, _keep=(stats,)):
                """Launch the receive half of the dispatch (on the stream of its send); it adds
                into cumulative_local_expert_recv_stats, kept alive until then."""
                if self.buf._destroyed:
                    raise BufferStateError("low_latency_dispatch receive hook: the Buffer was destroyed")
                if not self._disp_pending[_slot]:
                    raise BufferStateError("this dispatch's receive hook was already called")
                with driver.on_device(self.device_id):
                    launch(_mod.fn("dispatch_recv"), _grid, K.THREADS, _stream, _p, smem=_smem)
                    self._order_caller_after(fw, _stream)
                self._disp_pending[_slot] = False
        recv_x = (vx, vscales) if use_fp8 else vx
        # Not while the results are still to be zeroed (a capture's memset runs only at replay):
        # the fast path skips that.
        if (fw == "torch" and stats is None and not async_finish and not return_recv_hook and previous_event is None
                and tr.dtype == "int64" and tr.obj is topk_idx and not res.fresh):
            self._enable_fast_paths()
            p.check_shape = 0  # launched already; the plan's later launches need no check
            self._plans[("d", N, H, Kt, T, E, bool(use_fp8), bool(round_scale), bool(use_ue8m0), slot)] = _Plan(
                p, fn, grid, smem, out=(recv_x, vcount, vsrc, vrange, handle.refs))
        return recv_x, vcount, handle, ev, hook

    def _enable_fast_paths(self) -> None:
        if self._torch is None:
            import torch
            self._tdev = torch.device("cuda", self.device_id)
            self._get_device = getattr(torch._C, "_cuda_getDevice", torch.cuda.current_device)
            self._torch = torch

    def _fast_dispatch(self, x, topk_idx, T, E, use_fp8, round_scale, use_ue8m0):
        """The steady-state path: torch tensors, shapes seen before, default flags.  Returns None
        whenever anything differs (the full path then validates and raises as usual).  Every
        check here is one the full path makes too; measured host cost: benchmarks/host_overhead.py."""
        t = self._torch
        tensor, dev = t.Tensor, self.device_id
        if (type(x) is not tensor or type(topk_idx) is not tensor or type(T) is not int or type(E) is not int
                or type(use_fp8) is not bool or type(round_scale) is not bool or type(use_ue8m0) is not bool
                or envs.CHECK_INDICES.get_memo()):
            return None  # anything unusual: the full path validates it
        xs, ts = x.shape, topk_idx.shape
        if (len(xs) != 2 or len(ts) != 2 or ts[0] != xs[0] or x.dtype is not t.bfloat16
                or topk_idx.dtype is not t.int64 or not x.is_contiguous() or not topk_idx.is_contiguous()):
            return None
        slot = self._disp_slot
        plan = self._plans.get(("d", xs[0], xs[1], ts[1], T, E, use_fp8, round_scale, use_ue8m0, slot))
        # No error-record check here: Buffer._ll_state, the only way in, made it just before.
        if (plan is None or self._disp_pending[slot] or x.get_device() != dev
                or topk_idx.get_device() != dev or self._get_device() != dev):
            return None
        p = plan.p
        p.x, p.topk_idx = x.data_ptr(), topk_idx.data_ptr()
        launch_prepared(plan.fn, plan.grid, K.THREADS, interop.current_stream("torch", dev), plan.args, plan.smem,
                        True)
        self._disp_slot = slot ^ 1
        self.fast_calls += 1
        gen = self._disp_gen[slot] = self._disp_gen[slot] + 1
        recv_x, vcount, vsrc, vrange, refs = plan.out
        self._results[slot] = refs["keep"]  # the slot may have served another shape since
        handle = LowLatencyHandle(slot, gen, "torch", T, xs[1], E, ts[1], xs[0], vsrc, vrange, refs=refs)
        return recv_x, vcount, handle, self._no_event, None

    # ---- combine ---------------------------------------------------------------------------------
    def _check_handle(self, handle, what: str) -> None:
        """The handle must come from this Buffer's dispatch whose results are still in place."""
        if not isinstance(handle, LowLatencyHandle):
            raise TypeError(f"handle: expected a LowLatencyHandle, got {type(handle).__name__}")
        keep = handle.refs.get("keep")
        if getattr(keep, "owner", None) != self.serial:
            raise ValueError("handle: was made by another Buffer's low_latency_dispatch")
        if self._disp_gen[handle.slot] != handle.generation or keep is not self._results[handle.slot]:
            raise BufferStateError(
                f"{what}: the handle's dispatch results were overwritten by a later dispatch in the same slot "
                "(at most two low-latency dispatches may be in flight), or by clean_low_latency_buffer")

    def next_combine_buffer(self, handle: LowLatencyHandle):
        """The bf16 [E/R, R*T, H] tensor the next combine reads when ``zero_copy=True``: write the
        expert outputs straight into it (it is this rank's symmetric send buffer for that slot).
        Raises TypeError/ValueError for a handle not made by this Buffer, BufferStateError for a
        handle whose dispatch results were overwritten."""
        self._check_handle(handle, "get_next_low_latency_combine_buffer")
        lay = self.layout(handle.num_max_tokens, handle.hidden, handle.num_experts)
        R = self.num_ranks
        L = handle.num_experts // R
        RT = R * handle.num_max_tokens
        slot = self._comb_slot
        ptr = self.heap + lay.comb_send_off + slot * L * RT * handle.hidden * 2
        return interop.wrap_pointer(handle.framework, ptr, (L, RT, handle.hidden), "bfloat16", "cuda",
                                    self.device_id, owner=self)

    def combine(self, x, topk_idx, topk_weights, handle: LowLatencyHandle, *, zero_copy: bool = False,
                async_finish: bool = False, return_recv_hook: bool = False, out=None,
                previous_event: EventOverlap | None = None):
        """Low-latency combine: every source token gets the **weighted** sum of its K experts'
        output rows (fp32, no FMA), written bf16.  A rank that holds 2 or more of a token's
        experts and reaches its source over NVLink sums them first and sends one fp32 partial
        (EPCOMM_LL_COMBINE_PARTIALS, on by default: fewer NVLink bytes); the order of every
        addition is fixed (``epcomm.reference.low_latency_combine``), so results are bitwise
        reproducible.  With partials the send half (the call with ``return_recv_hook``) also waits until every
        NVLink peer's combine has started (it publishes the weights the partials need).

        Args:
            x: bf16 [E/R, R*T, H] expert outputs in the dispatch's packed layout (with
               ``zero_copy=True``, the tensor from :meth:`next_combine_buffer`).
            topk_idx, topk_weights: int64 / float32 [N, K] of this rank's tokens (as dispatched).
            handle: the dispatch's handle (must not have been overwritten by later dispatches).
            out: optional bf16 [N, H] output tensor.

        Returns ``(combined_x, event, hook)``.  CUDA-graph capturable.
        """
        if (self._torch is not None and not zero_copy and not async_finish and not return_recv_hook
                and previous_event is None and type(handle) is LowLatencyHandle):
            r = self._fast_combine(x, topk_idx, topk_weights, handle, out)
            if r is not None:
                return r
        self._check_handle(handle, "low_latency_combine")
        check_event(previous_event)
        zero_copy, async_finish = check_bool("zero_copy", zero_copy), check_bool("async_finish", async_finish)
        return_recv_hook = check_bool("return_recv_hook", return_recv_hook)
        if self._disp_pending[handle.slot]:
            raise BufferStateError("low_latency_combine: call the dispatch's receive hook first")
        R = self.num_ranks
        b = self.buf
        T, H, E = handle.num_max_tokens, handle.hidden, handle.num_experts
        L = E // R
        xr = b._tensor(x, "x", dtype="bfloat16", ndim=3, shape=(L, R * T, H))
        fw = xr.framework
        _check_hook_framework(return_recv_hook, fw)
        N = handle.num_tokens
        tr = b._tensor(topk_idx, "topk_idx", dtype="index", ndim=2, shape=(N, handle.num_topk), framework=fw,
                       previous_event=previous_event)
        wr = b._tensor(topk_weights, "topk_weights", dtype="float32", ndim=2, shape=(N, handle.num_topk),
                       framework=fw)
        Kt = handle.num_topk
        lay = self.layout(T, H, E)
        slot = self._comb_slot
        if zero_copy:
            expect = self.heap + lay.comb_send_off + slot * L * R * T * H * 2
            if xr.ptr != expect:
                raise ValueError("x: with zero_copy=True, pass the tensor from get_next_low_latency_combine_buffer() "
                                 "(and write the expert outputs into it)")
        if self._comb_pending[slot]:
            raise BufferStateError("low_latency_combine: the receive hook of the combine two calls ago was never called")
        if async_finish and return_recv_hook:
            raise ValueError("async_finish and return_recv_hook cannot both be set")
        o = b._tensor(out, "out", dtype="bfloat16", ndim=2, shape=(N, H), allow_none=True, framework=fw,
                      writable=True)
        mod = loader.load(K.LowLatencySpec(H, False), self.device_id)
        with driver.on_device(self.device_id):
            caller, stream, capturing = self._stream_for(fw, async_finish, previous_event, caller_work=tr.widened)
            # The same indices as the dispatch's: a repeated or out-of-range one would garble
            # the token's sum (one device sync; EPCOMM_CHECK_INDICES=0 skips it).
            mine = check_topk_indices(tr.obj, fw, E, capturing=capturing, unique=True, previous_event=previous_event)
            sent = handle.refs.get("topk")
            if sent is not None and mine is not None and not np.array_equal(mine, sent):
                raise ValueError("topk_idx: differs from the dispatch's that made this handle; the combine "
                                 "must get the same expert indices (its partial sums and rows were routed by "
                                 "them). To drop an expert's contribution, give it weight 0 instead "
                                 "(EPCOMM_CHECK_INDICES=1 checks this; it costs a device sync)")
            if o is None:
                out_obj, o = self.empty(fw, (N, H), "bfloat16")
            else:
                out_obj = out
            p = self._params(lay, slot)
            p.x, p.topk_idx, p.topk_weights = xr.ptr, tr.ptr, wr.ptr
            refs = handle.refs
            p.h_count, p.h_range = refs["count"].ptr, refs["range"].ptr
            p.h_src_info, p.h_src_k = refs["src_info"].ptr, refs["src_k"].ptr
            p.h_tok_rows, p.h_tok_meta = refs["tok_rows"].ptr, refs["tok_meta"].ptr
            p.h_slot = handle.slot
            p.out = o.ptr
            p.num_tokens, p.num_topk, p.num_experts, p.max_tokens = N, Kt, E, T
            p.zero_copy = int(zero_copy)
            smem = K.combine_smem_bytes(R, T)
            if smem > _DEFAULT_SMEM:
                self._allow_smem(mod, ("combine_send", "combine_recv", "combine_both"), smem)
            send_blocks = self.num_sms
            recv_blocks = self.num_sms
            fn = grid = None
            if return_recv_hook:
                launch(mod.fn("combine_send"), send_blocks, K.THREADS, stream, p, smem=smem)
                self._comb_pending[slot] = True
            else:
                fn = mod.fn("combine_both")
                grid = min(send_blocks, self._coop_blocks(fn, smem))
                launch(fn, grid, K.THREADS, stream, p, smem=smem, cooperative=True)
            self._comb_slot ^= 1
            # zero_copy: x is this buffer's own heap, not the caller's allocator's to track.
            ev = self._event(fw, caller, stream, async_finish, (None if zero_copy else xr, tr, wr, o))
        hook = None
        if return_recv_hook:
            def hook(_p=p, _stream=stream, _slot=slot, _mod=mod, _grid=recv_blocks, _smem=smem, _keep=(tr, wr)):
                """Launch the receive half of the combine (on the stream of its send)."""
                if self.buf._destroyed:
                    raise BufferStateError("low_latency_combine receive hook: the Buffer was destroyed")
                if not self._comb_pending[_slot]:
                    raise BufferStateError("this combine's receive hook was already called")
                with driver.on_device(self.device_id):
                    launch(_mod.fn("combine_recv"), _grid, K.THREADS, _stream, _p, smem=_smem)
                    self._order_caller_after(fw, _stream)
                self._comb_pending[_slot] = False
        if (fw == "torch" and not zero_copy and not async_finish and not return_recv_hook and previous_event is None
                and tr.dtype == "int64" and tr.obj is topk_idx):
            self._enable_fast_paths()
            self._plans[("c", N, Kt, slot, handle.slot, id(handle.refs["keep"]))] = _Plan(p, fn, grid, smem,
                                                                                        out=(L, R * T, H))
        return interop.finish(fw, out_obj, stream), ev, hook

    def _fast_combine(self, x, topk_idx, topk_weights, handle, out):
        """Steady-state combine (torch, shapes seen before, default flags); None otherwise."""
        t = self._torch
        tensor, dev = t.Tensor, self.device_id
        if (type(x) is not tensor or type(topk_idx) is not tensor or type(topk_weights) is not tensor
                or envs.CHECK_INDICES.get_memo()):
            return None  # anything unusual, or the host index check on: the full path
        hs = handle.slot
        if self._disp_gen[hs] != handle.generation or self._disp_pending[hs]:
            return None
        slot = self._comb_slot
        N, Kt = handle.num_tokens, handle.num_topk
        # The dispatch results object identifies T, H and E (plans are dropped when it changes).
        plan = self._plans.get(("c", N, Kt, slot, hs, id(handle.refs["keep"])))
        if plan is None or self._comb_pending[slot]:  # the error record: checked by Buffer._ll_state
            return None
        ks = (N, Kt)
        if (x.dtype is not t.bfloat16 or topk_idx.dtype is not t.int64 or topk_weights.dtype is not t.float32
                or x.shape != plan.out or topk_idx.shape != ks or topk_weights.shape != ks
                or not x.is_contiguous() or not topk_idx.is_contiguous() or not topk_weights.is_contiguous()
                or x.get_device() != dev or topk_idx.get_device() != dev or topk_weights.get_device() != dev
                or self._get_device() != dev):
            return None
        H = plan.out[2]
        if out is None:
            out = t.empty((N, H), dtype=t.bfloat16, device=self._tdev)
        elif (type(out) is not tensor or out.dtype is not t.bfloat16 or out.shape != (N, H)
              or not out.is_contiguous() or out.get_device() != dev):
            return None
        p = plan.p
        p.x, p.topk_idx, p.topk_weights, p.out = x.data_ptr(), topk_idx.data_ptr(), topk_weights.data_ptr(), out.data_ptr()
        launch_prepared(plan.fn, plan.grid, K.THREADS, interop.current_stream("torch", dev), plan.args, plan.smem,
                        True)
        self._comb_slot = slot ^ 1
        self.fast_calls += 1
        return out, self._no_event, None

    def clean(self, T: int, H: int, E: int) -> None:
        """Reset all low-latency flags and sequence numbers (collective; no call may be in flight).

        ``T, H, E``: the largest shape the next calls use (as for the size hint).  Raises
        TypeError/ValueError for a shape the kernels cannot run or the heap cannot hold, and
        BufferStateError while a receive hook is pending (call it first): the checks run before
        the collective, so every rank raises alike.  Handles of earlier dispatches become stale.
        """
        T, H, E, _ = K.check_shape(T, H, E, self.num_ranks)
        lay = self.layout(T, H, E)
        if any(self._disp_pending) or any(self._comb_pending):
            raise BufferStateError("clean_low_latency_buffer: a low-latency receive hook is pending; call it first")
        # Message tags restart: zero the dispatch regions of every shape used so far too.
        end = max([lay.comb_region_off] + [ly.comb_region_off for ly in self._layouts.values()])
        b = self.buf
        with driver.on_device(self.device_id):
            # The whole device, not only the comm stream: low-latency kernels usually run on the
            # caller's streams, and one still queued there (here or, past the barrier, at a
            # peer) would write flags and rows after they are zeroed.
            driver.device_sync()
            b.group.barrier()
            # Flags, acknowledgements and the dispatch regions (whose message tags restart too).
            driver.memset_d8_async(self.heap, 0, end, b._stream)
            driver.memset_d8_async(self.ctrl, 0, ctypes.sizeof(K.LLCtrl), b._stream)
            driver.stream_sync(b._stream)
            b.group.barrier()
            # Dispatch tags restart: the combine records of earlier dispatches could match them.
            for res in {id(r): r for r in (*self._results, *self._kept.values()) if r is not None}.values():
                driver.memset_d8_async(res.tok_meta[1].ptr, 0, res.tok_meta[1].nbytes, b._stream)
            driver.stream_sync(b._stream)
        self._disp_slot = self._comb_slot = 0
        # Handles of earlier dispatches refer to records just erased: combines with them raise.
        self._disp_gen = [g + 1 for g in self._disp_gen]
        self._plans.clear()
        self._shapes_checked.clear()
        self._disp_pending = [False, False]
        self._comb_pending = [False, False]

    def free(self, collective: bool = True) -> None:
        """Free the control words and profile stamps, and with ``collective`` (every rank
        calls it: Buffer.destroy) the symmetric heap."""
        from epcomm.runtime import nvshmem as nvr
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
        self.heap_obj = None
