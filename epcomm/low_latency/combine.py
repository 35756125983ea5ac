"""Low-latency combine: every source token gets the weighted sum of its K experts' rows."""
from __future__ import annotations

import numpy as np

from epcomm import interop
from epcomm.errors import BufferStateError
from epcomm.interop.indices import check_topk_indices
from epcomm.jit import loader
from epcomm.kernels import low_latency as K
from epcomm.low_latency.dispatch import DEFAULT_SMEM
from epcomm.low_latency.handle import LowLatencyHandle, _Plan, _check_hook_framework
from epcomm.low_latency.hooks import receive_hook
from epcomm.runtime import driver
from epcomm.runtime.event import EventOverlap
from epcomm.validate import check_bool
from epcomm.runtime.event import check_event


class CombineOps:
    """The combine of :class:`epcomm.low_latency.state.LowLatencyState`."""

    def _check_handle(self, handle, what: str) -> None:
        """The handle must come from this Buffer's dispatch whose results are still in place."""
        if not isinstance(handle, LowLatencyHandle):
            raise TypeError(f"handle: expected a LowLatencyHandle, got {type(handle).__name__}")
        keep = handle.refs.get("keep")
        if getattr(keep, "owner", None) != self.serial:
            raise ValueError("handle: was made by another Buffer's low_latency_dispatch")
        if self.ctx.sink is not None and handle.generation is None:
            return  # a compiled JAX program's handle: its arrays come with the call (see epcomm.jax)
        # A caller's outputs (epcomm.torch_ops) are not the slot's results: the generation alone
        # says whether a later dispatch wrote into the slot.
        stale_results = self.ctx.sink is None and keep is not self._results[handle.slot]
        if self._disp_gen[handle.slot] != handle.generation or stale_results:
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


    def combine(self, x, topk_idx, topk_weights, handle: LowLatencyHandle, *, use_logfmt: bool = False,
                zero_copy: bool = False, async_finish: bool = False, return_recv_hook: bool = False, out=None,
                combine_wait_recv_cost_stats=None, previous_event: EventOverlap | None = None):
        """Low-latency combine: every source token gets the **weighted** sum of its K experts'
        output rows (fp32, no FMA), written bf16.  A rank that holds 2 or more of a token's
        experts and reaches its source over NVLink sums them first and sends one fp32 partial
        (EPCOMM_LL_COMBINE_PARTIALS, on by default: fewer NVLink bytes); the order of every
        addition is fixed (``epcomm.reference.low_latency_combine``), so results are bitwise
        reproducible.  With partials the send half (the call with ``return_recv_hook``) also
        waits until every NVLink peer's combine has started (it publishes the weights the
        partials need).  With the Buffer's ``numerics="deepep"``: DeepEP V1's sum, one fused
        multiply-add per row in top-k order, every row sent as it is (no partials).

        Args:
            x: bf16 [E/R, R*T, H] expert outputs in the dispatch's packed layout (with
               ``zero_copy=True``, the tensor from :meth:`next_combine_buffer`).
            topk_idx, topk_weights: int64 / float32 [N, K] of this rank's tokens (as dispatched).
            handle: the dispatch's handle (must not have been overwritten by later dispatches).
            use_logfmt: send every row in LogFMT-10 (DeepEP's ``use_logfmt``): per 128 channels
               with max magnitude below 1 (and at least 2**-88, and not all equal), 10 bits per
               value on a log scale instead of 16 (the row's 128-channel groups take 160 bytes
               instead of 256); other groups go as bf16.  Lossy: each value of a cast group comes
               back within 2.21% (plus 2**-32 of its group's max), see
               :mod:`epcomm.reference.logfmt`; no expert-side partials then.  Every rank must
               pass the same value (not checked); not with ``zero_copy``.
            out: optional bf16 [N, H] output tensor.
            combine_wait_recv_cost_stats: optional int64 [R]; the receive adds the nanoseconds
               (GPU globaltimer) it waited for each rank's rows, once per call and rank (DeepEP:
               clock cycles, once per expert).  Without it the kernels only test a null pointer.

        Returns ``(combined_x, event, hook)``; until ``hook()`` is called, a low-latency call of
        another (T, H, E) raises BufferStateError.  CUDA-graph capturable.
        """
        if (self._torch is not None and self.ctx.sink is None and not zero_copy and not async_finish
                and not return_recv_hook
                and previous_event is None and use_logfmt is False and combine_wait_recv_cost_stats is None
                and type(handle) is LowLatencyHandle):
            r = self._fast_combine(x, topk_idx, topk_weights, handle, out)
            if r is not None:
                return r
        self._check_handle(handle, "low_latency_combine")
        check_event(previous_event)
        zero_copy, async_finish = check_bool("zero_copy", zero_copy), check_bool("async_finish", async_finish)
        return_recv_hook = check_bool("return_recv_hook", return_recv_hook)
        use_logfmt = check_bool("use_logfmt", use_logfmt)
        if use_logfmt and zero_copy:
            raise ValueError("use_logfmt=True encodes the rows on the way out: it cannot send them from the "
                             "zero-copy buffer (DeepEP refuses the pair too); pass zero_copy=False")
        if self._disp_pending[handle.slot]:
            raise BufferStateError("low_latency_combine: call the dispatch's receive hook first")
        xr, tr, wr, o, lay, slot = self._combine_args(x, topk_idx, topk_weights, handle, zero_copy, async_finish,
                                                     return_recv_hook, out, previous_event)
        fw, N, Kt = xr.framework, handle.num_tokens, handle.num_topk
        R, (T, H, E) = self.num_ranks, (handle.num_max_tokens, handle.hidden, handle.num_experts)
        ws = self.wait_stats_arg(combine_wait_recv_cost_stats, "combine_wait_recv_cost_stats", fw)
        if use_logfmt and lay.lf_total > self.num_rdma_bytes:
            raise ValueError(f"Buffer too small for use_logfmt=True with num_max_dispatch_tokens_per_rank={T}, "
                             f"hidden={H}, num_experts={E}: need num_rdma_bytes >= {lay.lf_total}, have "
                             f"{self.num_rdma_bytes} (Buffer.get_low_latency_rdma_size_hint includes it)")
        spec = K.LowLatencySpec(H, False, deepep=self.numerics == "deepep", logfmt=use_logfmt)
        mod = loader.load(spec, self.device_id)
        with driver.on_device(self.device_id):
            caller, stream, capturing = self._stream_for(fw, async_finish, previous_event, caller_work=tr.widened)
            self._check_same_indices(tr, fw, E, capturing, previous_event, handle)
            if o is None:
                out_obj, o = self.empty(fw, (N, H), "bfloat16", name="combined_x")
            else:
                out_obj = out
            p = self._combine_params(lay, slot, handle, xr, tr, wr, o, zero_copy, spec)
            p.wait_stats = ws.ptr if ws is not None else 0
            if use_logfmt:  # every row travels encoded: the kernels make no partials
                p.partials = 0
            fn, grid, blocks, smem = self._launch_combine(mod, p, slot, stream, return_recv_hook, R, T, H)
            # zero_copy: x is this buffer's own heap, not the caller's allocator's to track.
            ev = self._event(fw, caller, stream, async_finish, (None if zero_copy else xr, tr, wr, o, ws))
        hook = None
        if return_recv_hook:
            hook = receive_hook(self, "combine", slot, mod, "combine_recv", blocks, stream, p, smem, fw,
                                keep=(tr, wr, ws))
        # The fast path serves the default format without statistics (it checks for both), and
        # only handles of the Buffer's own results (a caller's outputs live for its call only).
        if (fw == "torch" and self.ctx.sink is None and not zero_copy and not async_finish and not return_recv_hook and previous_event is None
                and not use_logfmt and ws is None and tr.dtype == "int64" and tr.obj is topk_idx):
            self._enable_fast_paths()
            self._plans[("c", N, Kt, slot, handle.slot, id(handle.refs["keep"]))] = _Plan(p, fn, grid, smem,
                                                                                        out=(E // R, R * T, H))
        return interop.finish(fw, out_obj, stream), ev, hook

    def _launch_combine(self, mod, p, slot: int, stream: int, return_recv_hook: bool, R: int, T: int, H: int):
        """The send half alone (a receive hook follows) or send and receive in one cooperative
        grid; returns (the fused kernel or None, its grid or None, blocks, shared memory)."""
        smem = K.combine_smem_bytes(R, T)
        if smem > DEFAULT_SMEM:
            self._allow_smem(mod, ("combine_send", "combine_recv", "combine_both"), smem)
        blocks = self.num_sms
        fn = grid = None
        if return_recv_hook:
            K.launch_half(mod, "combine_send", blocks, stream, p, smem)
            self.hook_pending("combine", slot, T, H, p.num_experts)
        else:
            fn = mod.fn("combine_both")
            grid = min(blocks, self._coop_blocks(fn, smem))
            K.launch_both(fn, grid, stream, p, smem)
        self._comb_slot = slot ^ 1
        return fn, grid, blocks, smem

    def _combine_args(self, x, topk_idx, topk_weights, handle, zero_copy, async_finish, return_recv_hook, out,
                      previous_event):
        """(x, topk_idx, topk_weights, out refs, heap layout, slot), each argument checked."""
        ctx, R = self.ctx, self.num_ranks
        T, H, E = handle.num_max_tokens, handle.hidden, handle.num_experts
        L = E // R
        xr = ctx.tensor(x, "x", dtype="bfloat16", ndim=3, shape=(L, R * T, H))
        fw = xr.framework
        _check_hook_framework(return_recv_hook, fw)
        N = handle.num_tokens
        tr = ctx.tensor(topk_idx, "topk_idx", dtype="index", ndim=2, shape=(N, handle.num_topk), framework=fw,
                        previous_event=previous_event)
        wr = ctx.tensor(topk_weights, "topk_weights", dtype="float32", ndim=2, shape=(N, handle.num_topk),
                        framework=fw)
        lay = self.layout(T, H, E)
        slot = self.call_slot(self._comb_slot)
        if zero_copy:
            expect = self.heap + lay.comb_send_off + slot * L * R * T * H * 2
            if xr.ptr != expect:
                raise ValueError("x: with zero_copy=True, pass the tensor from get_next_low_latency_combine_buffer() "
                                 "(and write the expert outputs into it)")
        if self._comb_pending[slot]:
            raise BufferStateError("low_latency_combine: the receive hook of the combine two calls ago was never called")
        self.check_hooks("low_latency_combine", T, H, E)
        if async_finish and return_recv_hook:
            raise ValueError("async_finish and return_recv_hook cannot both be set")
        o = ctx.tensor(out, "out", dtype="bfloat16", ndim=2, shape=(N, H), allow_none=True, framework=fw,
                       writable=True)
        return xr, tr, wr, o, lay, slot

    @staticmethod
    def _check_same_indices(tr, fw: str, E: int, capturing: bool, previous_event, handle) -> None:
        """The same indices as the dispatch's: a repeated or out-of-range one would garble the
        token's sum (one device sync; EPCOMM_CHECK_INDICES=0 skips it)."""
        mine = check_topk_indices(tr.obj, fw, E, capturing=capturing, unique=True, previous_event=previous_event)
        sent = handle.refs.get("topk")
        if sent is not None and mine is not None and not np.array_equal(mine, sent):
            raise ValueError("topk_idx: differs from the dispatch's that made this handle; the combine "
                             "must get the same expert indices (its partial sums and rows were routed by "
                             "them). To drop an expert's contribution, give it weight 0 instead "
                             "(EPCOMM_CHECK_INDICES=1 checks this; it costs a device sync)")

    def _combine_params(self, lay, slot: int, handle, xr, tr, wr, o, zero_copy: bool, spec=None):
        p = self._params(lay, slot, spec)
        p.x, p.topk_idx, p.topk_weights = xr.ptr, tr.ptr, wr.ptr
        refs = handle.refs
        p.h_count, p.h_range = refs["count"].ptr, refs["range"].ptr
        p.h_src_info, p.h_src_k = refs["src_info"].ptr, refs["src_k"].ptr
        p.h_tok_rows, p.h_tok_meta = refs["tok_rows"].ptr, refs["tok_meta"].ptr
        p.h_slot = handle.slot
        p.out = o.ptr
        p.num_tokens, p.num_topk = handle.num_tokens, handle.num_topk
        p.num_experts, p.max_tokens = handle.num_experts, handle.num_max_tokens
        p.zero_copy = int(zero_copy)
        return p
