"""Low-latency dispatch: one message per (token, destination rank), expanded by the receiver into
the expert-major packed layout [E/R, R*T, H]."""
from __future__ import annotations

from dataclasses import dataclass

from epcomm.errors import BufferStateError
from epcomm.interop.indices import check_topk_indices
from epcomm.jit import loader
from epcomm.kernels import low_latency as K
from epcomm.low_latency.handle import LowLatencyHandle, _Plan, _Results, _check_hook_framework
from epcomm.low_latency.hooks import receive_hook
from epcomm.runtime import driver
from epcomm.runtime.event import EventOverlap
from epcomm.validate import check_bool, check_hidden_size, check_int
from epcomm.runtime.event import check_event

DEFAULT_SMEM = 48 * 1024  # dynamic shared memory a kernel may use without opting in


@dataclass
class _DispatchArgs:
    fw: str
    xr: object
    tr: object
    stats: object
    wait_stats: object
    N: int
    H: int
    T: int
    E: int
    Kt: int
    use_fp8: bool
    round_scale: bool
    use_ue8m0: bool
    async_finish: bool
    return_recv_hook: bool


def check_format(use_fp8, round_scale, use_ue8m0) -> tuple[bool, bool, bool]:
    """The dispatch's format flags checked (TypeError for a non-bool, ValueError for a
    combination the kernels lack); returned as bools."""
    use_fp8, round_scale, use_ue8m0 = (check_bool("use_fp8", use_fp8), check_bool("round_scale", round_scale),
                                       check_bool("use_ue8m0", use_ue8m0))
    if use_ue8m0 and not round_scale:
        raise ValueError("use_ue8m0=True needs round_scale=True (UE8M0 stores powers of two only)")
    if (round_scale or use_ue8m0) and not use_fp8:
        raise ValueError("round_scale/use_ue8m0 apply to FP8 dispatch only (use_fp8=True)")
    return use_fp8, round_scale, use_ue8m0


def check_sizes(N: int, H: int, T, E, R: int) -> tuple[int, int, int]:
    """(T, H, E) of a dispatch of x [N, H] checked: N <= T and the kernels' limits (the shape
    word's, kernels.low_latency.check_shape); ValueError / TypeError naming the argument."""
    T = check_int("num_max_dispatch_tokens_per_rank", T, lo=1)
    if N > T:
        raise ValueError(f"x: {N} tokens exceed num_max_dispatch_tokens_per_rank={T}")
    check_hidden_size(H, low_latency=True)
    T, H, E, _ = K.check_shape(T, H, E, R)
    return T, H, E


def check_topk_width(Kt: int) -> int:
    """``Kt``, the top-k width of topk_idx, if the kernels take it (1..MAX_TOPK); ValueError."""
    if not 1 <= Kt <= K.MAX_TOPK:
        raise ValueError(f"topk_idx: top-k {Kt} must be in [1, {K.MAX_TOPK}]")
    return Kt


def _handle(a: _DispatchArgs, slot: int, gen: int, res: _Results, vsrc, vrange, topk_copy) -> LowLatencyHandle:
    """The handle of a dispatch into ``res``: its views, and the refs its combine reads."""
    return LowLatencyHandle(slot, gen, a.fw, a.T, a.H, a.E, a.Kt, a.N, vsrc, vrange,
                            refs={"count": res.count[1], "range": res.layout_range[1],
                                  "src_info": res.src_info[1], "src_k": res.src_k[1],
                                  "tok_rows": res.tok_rows[1], "tok_meta": res.tok_meta[1], "keep": res,
                                  "topk": topk_copy})


class DispatchOps:
    """The dispatch of :class:`epcomm.low_latency.state.LowLatencyState`."""

    def dispatch(self, x, topk_idx, num_max_dispatch_tokens_per_rank: int, num_experts: int, *,
                 cumulative_local_expert_recv_stats=None, dispatch_wait_recv_cost_stats=None, use_fp8: bool = True,
                 round_scale: bool = False, use_ue8m0: bool = False, async_finish: bool = False,
                 return_recv_hook: bool = False, previous_event: EventOverlap | None = None):
        """Low-latency dispatch: one message per (token, destination rank), expanded by the
        receiver into the expert-major packed layout.

        Args:
            x: bf16 [N, H] with N <= ``num_max_dispatch_tokens_per_rank`` (T), H % 128 == 0.
            topk_idx: int64 (or int32) [N, K], K <= 32, -1 = none.
            num_experts: E, a multiple of the rank count.
            cumulative_local_expert_recv_stats: optional int32 [E/R]; received rows are added.
            dispatch_wait_recv_cost_stats: optional int64 [R] (the rank count); the receive adds
               the nanoseconds (GPU globaltimer) it waited for each source rank's tokens to arrive,
               measured once per call and source (DeepEP: clock cycles, once per local expert).
               Without it the kernels only test a null pointer.
            use_fp8: cast to e4m3 with one float32 scale per token and 128 channels
               (scale = max(amax, 1e-4) / 448, or DeepEP's ``amax * float32(1/448)`` with the
               Buffer's ``numerics="deepep"``); ``round_scale``: scales rounded up to powers of
               two; ``use_ue8m0``: scales packed as exponent bytes, 4 per int32 (needs round_scale).
            return_recv_hook: only issue the sends and return; ``hook()`` launches the receive.
               Nothing occupies the GPU in between.  Until it is called, a low-latency call of
               another (T, H, E) raises BufferStateError (its messages could overwrite ours).

        Returns ``(recv_x, recv_count, handle, event, hook)``.  ``recv_x`` is bf16 [E/R, R*T, H]
        or, with FP8, ``(e4m3 [E/R, R*T, H], scales)`` with scales float32 [E/R, R*T, H/128]
        (or int32 [E/R, R*T, ceil(H/512)] with UE8M0) stored column-major in the last two dims.
        Rows of local expert j: ``[0, recv_count[j])``, ordered by source rank then source token.
        The results are views of this buffer's double-buffered storage: valid until the second
        next dispatch.  Each (slot, framework, shape, dtype) keeps its storage for the buffer's
        life, so graphs captured with different shapes stay replayable.  ``hook`` is None unless
        ``return_recv_hook``.  CUDA-graph capturable.
        """
        # The fast path writes into the Buffer's own results: not for a caller supplying its outputs.
        if (self._torch is not None and self.ctx.sink is None and cumulative_local_expert_recv_stats is None
                and dispatch_wait_recv_cost_stats is None and not async_finish and not return_recv_hook
                and previous_event is None):
            r = self._fast_dispatch(x, topk_idx, num_max_dispatch_tokens_per_rank, num_experts, use_fp8,
                                    round_scale, use_ue8m0)
            if r is not None:
                return r
        check_event(previous_event)
        a = self._dispatch_args(x, topk_idx, num_max_dispatch_tokens_per_rank, num_experts,
                                cumulative_local_expert_recv_stats, dispatch_wait_recv_cost_stats, use_fp8,
                                round_scale, use_ue8m0, async_finish, return_recv_hook, previous_event)
        R, L = self.num_ranks, a.E // self.num_ranks
        shape = K.shape_word(a.T, a.H, a.E, a.Kt, a.use_fp8, a.round_scale, a.use_ue8m0, self.force_put,
                             self.partials)
        lay = self.layout(a.T, a.H, a.E)
        slot = self.call_slot(self._disp_slot)
        if self._disp_pending[slot]:
            raise BufferStateError(
                "low_latency_dispatch: the receive hook of the dispatch two calls ago (same buffer slot) "
                "was never called; call it before issuing another dispatch")
        self.check_hooks("low_latency_dispatch", a.T, a.H, a.E)
        # DeepEP's arithmetic differs only in the FP8 scales: a BF16 dispatch uses the default module.
        spec = K.LowLatencySpec(a.H, a.use_fp8, deepep=a.use_fp8 and self.numerics == "deepep")
        mod = loader.load(spec, self.device_id)
        smem = K.dispatch_smem_bytes(R, a.T)
        with driver.on_device(self.device_id):
            if smem > DEFAULT_SMEM:  # may raise: before anything below changes state
                self._allow_smem(mod, ("dispatch_send", "dispatch_recv", "dispatch_both"), smem)
            caller, stream, capturing = self._stream_for(a.fw, a.async_finish, previous_event,
                                                         caller_work=a.tr.widened)
            # With the check on, the combine compares its top-k with this one: the host copy the
            # check read (callers may change theirs in place, e.g. to mask an expert, which
            # this combine cannot do).
            topk_copy = check_topk_indices(a.tr.obj, a.fw, a.E, capturing=capturing, unique=True,
                                           previous_event=previous_event)
            res = self._slot_results(a, slot, capturing)
            p = self._dispatch_params(a, lay, slot, res, stream, capturing, shape, spec)
            fn, grid, recv_blocks = self._launch_dispatch(mod, p, slot, stream, a, smem, L)
            gen = self._advance_slot(slot, shape if p.check_shape else None)
            ev = self._event(a.fw, caller, stream, a.async_finish, (a.xr, a.tr, a.stats, a.wait_stats))
        vx, vscales, vcount, vsrc, vrange = res.views(stream)
        handle = _handle(a, slot, gen, res, vsrc, vrange, topk_copy)
        if self.ctx.sink is not None:
            res.drop_payload()  # the caller's received rows: returned now, not kept by the handle
        hook = None
        if a.return_recv_hook:
            # The receive adds into the statistics tensors: kept alive until then.
            hook = receive_hook(self, "dispatch", slot, mod, "dispatch_recv", recv_blocks, stream, p, smem, a.fw,
                                keep=(a.stats, a.wait_stats))
        recv_x = (vx, vscales) if a.use_fp8 else vx
        if self._plan_allowed(a, topk_idx, previous_event, res):
            self._remember_dispatch_plan(a, slot, _Plan(p, fn, grid, smem, out=(recv_x, vcount, vsrc, vrange,
                                                                                handle.refs)))
        return recv_x, vcount, handle, ev, hook

    def _launch_dispatch(self, mod, p, slot: int, stream: int, a: _DispatchArgs, smem: int, L: int):
        """The send half alone (a receive hook follows) or send and receive in one cooperative
        grid; returns (the fused kernel or None, its grid or None, the receive's blocks)."""
        send_blocks = max(1, min(self.num_sms, a.N))
        recv_blocks = max(1, min(self.num_sms, L))
        fn = grid = None
        if a.return_recv_hook:
            K.launch_half(mod, "dispatch_send", send_blocks, stream, p, smem)
            self.hook_pending("dispatch", slot, a.T, a.H, a.E)
        else:
            fn = mod.fn("dispatch_both")
            grid = min(max(send_blocks, recv_blocks), self._coop_blocks(fn, smem))
            K.launch_both(fn, grid, stream, p, smem)
        return fn, grid, recv_blocks

    def _plan_allowed(self, a: _DispatchArgs, topk_idx, previous_event, res: _Results) -> bool:
        """Whether this dispatch's launch may serve later calls as a prepared plan (the fast
        path): a torch call with the fast path's own flags, into the Buffer's results once they
        are zeroed (a capture's memset runs only at replay; the fast path skips it), never into a
        caller's outputs (a later eager call would write into memory the caller owns)."""
        return (self.ctx.sink is None and a.fw == "torch" and a.stats is None and a.wait_stats is None
                and not a.async_finish and not a.return_recv_hook and previous_event is None
                and a.tr.dtype == "int64" and a.tr.obj is topk_idx and not res.fresh)

    def _remember_dispatch_plan(self, a: _DispatchArgs, slot: int, plan: _Plan) -> None:
        """The fast path's prepared launch of this dispatch's shape and flags in ``slot``."""
        self._enable_fast_paths()
        plan.p.check_shape = 0  # launched already; the plan's later launches need no check
        self._plans[("d", a.N, a.H, a.Kt, a.T, a.E, a.use_fp8, a.round_scale, a.use_ue8m0, slot)] = plan

    def _advance_slot(self, slot: int, checked_shape) -> int:
        """After a launch into ``slot``: the next dispatch takes the other slot; returns this one's
        new generation.  ``checked_shape``: the shape word the receive compared, if it did."""
        if checked_shape is not None:
            self._shapes_checked.add((slot, checked_shape))
        self._disp_slot = slot ^ 1
        self._disp_gen[slot] += 1
        return self._disp_gen[slot]

    def _dispatch_args(self, x, topk_idx, T, E, stats, wait_stats, use_fp8, round_scale, use_ue8m0, async_finish,
                       return_recv_hook, previous_event) -> _DispatchArgs:
        """Every argument of a dispatch checked (TypeError / ValueError naming it)."""
        ctx = self.ctx
        use_fp8, round_scale, use_ue8m0 = check_format(use_fp8, round_scale, use_ue8m0)
        async_finish = check_bool("async_finish", async_finish)
        return_recv_hook = check_bool("return_recv_hook", return_recv_hook)
        xr = ctx.tensor(x, "x", dtype="bfloat16", ndim=2)
        N, H = xr.shape
        fw = xr.framework
        _check_hook_framework(return_recv_hook, fw)
        T, H, E = check_sizes(N, H, T, E, self.num_ranks)
        L = E // self.num_ranks
        tr = ctx.tensor(topk_idx, "topk_idx", dtype="index", ndim=2, shape=(N, None), framework=fw,
                        previous_event=previous_event)
        Kt = check_topk_width(tr.shape[1])
        if async_finish and return_recv_hook:
            raise ValueError("async_finish and return_recv_hook cannot both be set: with the hook, the receive "
                             "runs when hook() is called, on the stream of the send")
        stats = ctx.tensor(stats, "cumulative_local_expert_recv_stats", dtype="int32", ndim=1, shape=(L,),
                           allow_none=True, framework=fw, writable=True)
        wait_stats = self.wait_stats_arg(wait_stats, "dispatch_wait_recv_cost_stats", fw)
        return _DispatchArgs(fw, xr, tr, stats, wait_stats, N, H, T, E, Kt, use_fp8, round_scale, use_ue8m0,
                             async_finish, return_recv_hook)

    def _slot_results(self, a: _DispatchArgs, slot: int, capturing: bool = False) -> _Results:
        """The results this dispatch writes into: the slot's, for this framework and shape."""
        res = self._results[slot]
        key = (a.fw, a.T, a.H, a.E, a.use_fp8, a.use_ue8m0)
        if self.ctx.sink is not None:
            # A caller's outputs are its own and live for its call only (a compiled program's
            # buffers): nothing keeps them past it, or clean_low_latency_buffer would zero
            # their tag records in memory the program has since reused.  The slot's earlier
            # results are overwritten on the device: their handles are stale (generation).
            self._results[slot] = None
            return _Results(self, *key)
        if a.fw == "jax":
            # JAX arrays are immutable once handed out: every such dispatch gets new storage.
            res = self._results[slot] = _Results(self, *key)
        elif res is None or res.key != key:
            # The results of every shape stay with the buffer: a CUDA graph captured with
            # another shape writes into them at every replay, and its prepared plans stay
            # valid.  Memory: one set per (slot, framework, shape, dtype) ever used.
            res = self._kept.get((slot, key))
            if res is None:
                # Both slots' at once (outside a capture): a CUDA graph captured at the next call,
                # as torch.compile's mode="reduce-overhead" does after one warm-up call, then
                # allocates nothing inside the capture (memory the graph's pool would own).
                for s in ((slot,) if capturing else (slot, slot ^ 1)):
                    if (s, key) not in self._kept:
                        self._kept[(s, key)] = _Results(self, *key)
                res = self._kept[(slot, key)]
            self._results[slot] = res
        return res

    def _dispatch_params(self, a: _DispatchArgs, lay, slot: int, res: _Results, stream: int, capturing: bool,
                         shape: int, spec=None):
        R = self.num_ranks
        p = self._params(lay, slot, spec)
        p.x, p.topk_idx = a.xr.ptr, a.tr.ptr
        p.recv_x = res.x[1].ptr
        p.recv_scales = res.scales[1].ptr if res.scales is not None else 0
        p.recv_count, p.recv_src_info = res.count[1].ptr, res.src_info[1].ptr
        p.recv_layout_range, p.recv_src_k = res.layout_range[1].ptr, res.src_k[1].ptr
        p.recv_tok_rows, p.recv_tok_meta = res.tok_rows[1].ptr, res.tok_meta[1].ptr
        if res.fresh:
            # Zeroed on the kernel's stream before its first dispatch; under capture the
            # memset is only in the graph, so the next eager dispatch zeroes again.
            driver.memset_d8_async(res.tok_meta[1].ptr, 0, R * a.T * 8, stream)
            res.fresh = capturing
        p.cumulative_stats = a.stats.ptr if a.stats is not None else 0
        p.wait_stats = a.wait_stats.ptr if a.wait_stats is not None else 0
        p.num_tokens, p.num_topk, p.num_experts, p.max_tokens = a.N, a.Kt, a.E, a.T
        p.round_scale, p.use_ue8m0 = int(a.round_scale), int(a.use_ue8m0)
        # Ranks must agree on the shape: the receive compares every source's word with ours
        # on the first dispatch of each shape in each slot (outside graph capture).
        p.shape_word = shape
        p.check_shape = int(not capturing and (slot, shape) not in self._shapes_checked)
        return p
