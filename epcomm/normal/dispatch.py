"""Normal-mode dispatch: every token goes once to each rank holding one of its experts.

The call is three steps: check every argument (:mod:`epcomm.normal.dispatch_args`, all before
any launch), launch the count exchange and the send on the comm stream (:func:`_launch_front`),
then receive (:class:`_Receive`): on outputs allocated before the counts are known when the shape
was seen before (speculative), else on exact outputs once the host has the counts.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

from epcomm import interop
from epcomm.errors import BufferStateError
from epcomm.interop.indices import check_topk_indices
from epcomm.jit import loader
from epcomm.kernels import intranode as K_intra
from epcomm.normal.dispatch_args import DispatchArgs, check_args
from epcomm.normal.handle import DispatchHandle, ptr
from epcomm.normal.layout import layout_on_comm
from epcomm.normal.shapes import recv_specs, route_specs
from epcomm.runtime import driver
from epcomm.runtime.event import check_event

# The receive's outputs, in the order _Receive.allocate returns them.
RECV_OUTPUTS = ("recv_x", "recv_scales", "recv_topk_idx", "recv_topk_weights", "recv_src_idx")


def _chunk_rows(ctx, st, a: DispatchArgs) -> int:
    """The call's chunk rows; ValueError (with the size needed) if N tokens do not fit, or if
    num_worst_tokens exceeds the rows every rank together can send."""
    lay = st.layout
    need_row = K_intra.max_row_bytes(a.H, max(a.Kt, 0))
    cap = lay.capacity_rows(need_row)
    if a.N > cap:
        need = K_intra.nvl_buffer_size_hint(a.H, ctx.num_ranks, a.N, a.Kt)
        raise ValueError(f"Buffer too small: {a.N} tokens of hidden {a.H} need num_nvl_bytes >= {need} "
                         f"(this buffer holds {cap} tokens per rank, {lay.total_bytes} bytes)")
    if a.num_worst_tokens > ctx.num_ranks * cap:
        # No rank receives more (every source sends at most cap rows), and the outputs are
        # allocated after the count exchange and send were launched: refuse it before them.
        raise ValueError(f"num_worst_tokens={a.num_worst_tokens}: more rows than {ctx.num_ranks} ranks can send "
                         f"through this buffer ({cap} tokens each, at most {ctx.num_ranks * cap})")
    return K_intra.dispatch_chunk_rows(a.cfg.chunk_rows, cap, ctx.num_ranks)


@dataclass(slots=True)
class _Route:
    """The send plan's tensors: a cached dispatch's from its handle, else new ones (and the
    layout's, when the call computes it)."""
    rank_prefix: object
    send_list: object
    send_pos: object
    send_count: object
    itr_obj: object
    refs: dict
    ner: object = None
    keep: tuple = ()


def _route(ctx, a: DispatchArgs) -> _Route:
    if a.cached:
        h = a.handle
        return _Route(h.rank_prefix, h.send_list, h.send_pos, h.send_count, h.is_token_in_rank, h.refs)
    fw, N, R = a.fw, a.N, ctx.num_ranks
    itr, ner, keep = a.itr, a.ner, []
    if a.needs_layout:
        lay_outs = layout_on_comm(ctx, a.tr, a.E, 0)
        keep = [o[0] for o in lay_outs if o]  # the notify kernel reads them
        if itr is None:
            itr = lay_outs[3][1]
        if ner is None:
            ner = lay_outs[2][1]
    outs = {k: ctx.empty(fw, shape, dt, name=k) for k, (shape, dt) in route_specs(N, R).items()}
    refs = {k: o[1] for k, o in outs.items()}
    refs["is_token_in_rank"] = itr
    return _Route(outs["rank_prefix"][0], outs["send_list"][0], outs["send_pos"][0], outs["send_count"][0],
                  itr.obj, refs, ner, tuple(keep))


def _params(ctx, st, spec, a: DispatchArgs, r: _Route, chunk_rows: int) -> K_intra.IntraParams:
    p = st.params(ctx.kernel_timeout_s(spec))
    p.x = a.xr.ptr
    if a.fp8:
        p.x_scales, p.scale_st, p.scale_sg = a.sr.ptr, a.sr.strides[0], a.sr.strides[1]
    p.topk_idx = ptr(a.tr)
    p.topk_weights = ptr(a.wr)
    p.is_token_in_rank = r.refs["is_token_in_rank"].ptr
    p.num_tokens_per_expert = ptr(r.ner)
    p.send_list, p.send_pos = r.refs["send_list"].ptr, r.refs["send_pos"].ptr
    p.send_count, p.rank_prefix = r.refs["send_count"].ptr, r.refs["rank_prefix"].ptr
    p.num_tokens, p.num_topk, p.num_experts = a.N, a.Kt, a.E
    p.expert_alignment = a.expert_alignment
    p.chunk_rows = chunk_rows
    p.row_bytes = K_intra.dispatch_row_bytes(a.H, a.fp8, a.Kt)
    p.hidden, p.fp8 = a.H, int(a.fp8)
    p.cached = int(a.cached)
    p.write_host = int(not a.num_worst_tokens and not a.cached)
    return p


def dispatch(ctx, st, default_config, x, handle=None, num_tokens_per_rank=None, num_tokens_per_rdma_rank=None,
             is_token_in_rank=None, num_tokens_per_expert=None, topk_idx=None, topk_weights=None,
             expert_alignment: int = 1, num_worst_tokens: int = 0, config=None, previous_event=None,
             async_finish: bool = False, allocate_on_comm_stream: bool = False, *, num_experts=None):
    """See :meth:`epcomm.Buffer.dispatch` (``ctx``: the Buffer's CommContext, ``st``: its
    NvlinkState or None, ``default_config``: its dispatch Config)."""
    # Destroyed first: destroy() also drops the NVLink state, which would otherwise be reported
    # as a Buffer created without one.
    ctx.check_usable("dispatch", collective=True)
    if st is None:
        raise BufferStateError("dispatch needs a Buffer created with num_nvl_bytes > 0")
    t_enter = time.time_ns() if st.prof else 0  # EPCOMM_PROFILE: host side of the timeline
    check_event(previous_event)
    route = dict(topk_idx=topk_idx, topk_weights=topk_weights, is_token_in_rank=is_token_in_rank,
                 num_tokens_per_rank=num_tokens_per_rank, num_tokens_per_rdma_rank=num_tokens_per_rdma_rank,
                 num_tokens_per_expert=num_tokens_per_expert, num_experts=num_experts)
    a = check_args(ctx, default_config, x, handle, route, expert_alignment, num_worst_tokens, config,
                   previous_event)
    chunk_rows = _chunk_rows(ctx, st, a)
    spec = K_intra.IntranodeDispatchSpec(ctx.num_ranks, a.H, a.fp8)
    spec.validate()
    hs = st.host_stamps if st.prof else None
    if hs is not None:
        hs.clear()
        hs["enter"] = t_enter
    async_finish = ctx.call_flags(async_finish, allocate_on_comm_stream)
    with driver.on_device(ctx.device_id):
        mod = loader.load(spec, ctx.device_id)
        caller, cap = begin_dispatch(ctx, a, previous_event)
        r = _route(ctx, a)
        p = _params(ctx, st, spec, a, r, chunk_rows)
        _launch_front(ctx, st, mod, p, a)
        if hs is not None:
            hs["launched"] = time.time_ns()
        recv = _Receive(ctx, st, mod, a, p, r, caller, cap, async_finish, hs)
        return recv.run()


def begin_dispatch(ctx, a: DispatchArgs, previous_event) -> tuple[int, int]:
    """The start of a dispatch on the device (inside ``driver.on_device``): refuse a CUDA-graph
    capture of a CPU-synchronised dispatch, order the comm stream after the caller
    (``ctx.begin``), and check the top-k indices on the host (EPCOMM_CHECK_INDICES).  Returns
    (the caller's stream, its capture id)."""
    # Before begin(): it makes the comm stream wait for the caller's, which under capture
    # joins it to the capture, and a capture left with a forked stream is lost.
    caller, cap = ctx.caller_stream(a.fw)
    if not a.num_worst_tokens and not a.cached and cap:
        raise ValueError("dispatch: CUDA-graph capture needs num_worst_tokens > 0 (or a handle): the "
                         "default path synchronises with the CPU to size its outputs")
    caller, cap = ctx.begin(a.fw, previous_event, caller_work=a.tr is not None and a.tr.widened,
                            caller=caller, cap=cap)
    if a.tr is not None:
        check_topk_indices(a.tr.obj, a.fw, a.E, capturing=bool(cap), previous_event=previous_event)
    return caller, cap


def _launch_front(ctx, st, mod, p, a: DispatchArgs) -> None:
    """The count exchange and the send on the comm stream; the receive stream (stream2) is
    ordered after the count exchange."""
    if p.write_host:
        st.info[0] = 0
        st.info[2:2 + ctx.num_ranks] = -1  # the notify kernel writes each source's entry once it arrived
    K_intra.launch_notify(mod, ctx.stream, p, ctx.num_ranks, a.cached)
    driver.event_record(ctx.ev_mid, ctx.stream)
    K_intra.launch_send(mod, ctx.stream, p, a.send_blocks)
    driver.stream_wait_event(ctx.stream2, ctx.ev_mid)


class _Receive:
    """The receive half of one dispatch: outputs, the receive kernel, the event, the handle."""

    def __init__(self, ctx, st, mod, a: DispatchArgs, p, r: _Route, caller: int, cap: int, async_finish: bool,
                 hs):
        self.ctx, self.st, self.mod, self.a, self.p, self.r = ctx, st, mod, a, p, r
        self.caller, self.cap, self.async_finish, self.hs = caller, cap, async_finish, hs
        self.G = a.H // 128
        self.col_major_scales = a.fp8 and a.sr.strides[0] == 1 and a.sr.shape[1] > 1 and a.N > 1
        self.spec_key = (a.N, a.E)
        # Everything the kernels read, kept alive and recorded on the comm streams: a cached
        # dispatch reads the handle's tensors (autograd drops the handle right after the
        # call), and notify reads the caller's num_tokens_per_expert.
        tr = a.tr
        self.ins = [a.xr.obj, a.sr.obj if a.sr else None, tr.obj if tr else None, a.wr.obj if a.wr else None,
                    tr.keepalive if tr else None, getattr(r.ner, "obj", None),
                    r.rank_prefix, r.send_list, r.send_pos, r.send_count, r.itr_obj, *r.keep]

    def allocate(self, M: int) -> list:
        """The outputs for M rows ((obj, ref) pairs, None where absent); fills their pointers into p."""
        ctx, a, p, G = self.ctx, self.a, self.p, self.G
        fw = a.fw
        spec = recv_specs(M, a.H, a.fp8, a.Kt, a.wr is not None, a.cached)
        if self.col_major_scales:
            spec["recv_scales"] = ((G, M), "float32")
        rx, rs, rti, rtw, rsrc = (ctx.empty(fw, *spec[k], name=k) if k in spec else None for k in RECV_OUTPUTS)
        rs_st, rs_sg = ((1, M) if self.col_major_scales else (G, 1)) if a.fp8 else (0, 0)
        p.recv_x = rx[1].ptr
        p.recv_scales, p.rscale_st, p.rscale_sg = (rs[1].ptr if rs else 0), rs_st, rs_sg
        p.recv_topk_idx = rti[1].ptr if rti else 0
        p.recv_topk_weights = rtw[1].ptr if rtw else 0
        p.recv_src_idx = rsrc[1].ptr if rsrc else 0
        p.out_rows = M
        p.worst_mode = int(a.num_worst_tokens > 0)
        if self.hs is not None:
            self.hs["allocated"] = time.time_ns()
        return [rx, rs, rti, rtw, rsrc]

    def order_after_recv(self, outputs):
        """Join the receive stream into the comm stream, then the event and the caller's wait
        (``ctx.finish``) for the receive launched last, on ``outputs``."""
        ctx = self.ctx
        driver.event_record(ctx.ev_recv, ctx.stream2)
        driver.stream_wait_event(ctx.stream, ctx.ev_recv)
        return ctx.finish(self.a.fw, self.caller, self.async_finish, [o[0] for o in outputs if o is not None],
                          self.ins, self.cap)

    def _launch_recv(self) -> None:
        K_intra.launch_recv(self.mod, self.ctx.stream2, self.p, self.a.recv_blocks)

    def run(self):
        a, st, p = self.a, self.st, self.p
        spec_rows = st.speculative_rows(self.spec_key) if p.write_host else 0
        outputs = ev = None
        if spec_rows:
            # Speculative outputs, sized from the last calls of this shape, and the receive
            # launched on them now, before the counts exist: the receive starts copying as soon
            # as the counts cross, with no host round trip in between.  If the rows do not fit it
            # leaves without writing; the host sees the same counts below.  (The outputs travel
            # as kernel arguments: a receive that read them from host-mapped memory made the
            # concurrent send ~20% slower, docs/design.md.)
            outputs = self.allocate(spec_rows)
            p.speculative = 1
            self._launch_recv()
            p.speculative = 0
            # The stream joins, the event and the record_stream calls do not depend on the
            # counts, so they are done while the notify kernel runs: after the counts the host
            # only narrows the outputs and builds the handle.  Column-major scales are packed
            # after the counts (below), so their order is made then.
            if not self.col_major_scales:
                ev = self.order_after_recv(outputs)
        M, num_recv, recv_counts, expert_list = self._rows(outputs)
        if spec_rows and M <= spec_rows:
            st.spec_hits += 1
            rx, rs, rti, rtw, rsrc, ev = self._narrow_speculative(outputs, M, spec_rows, ev)
        else:
            if spec_rows:
                # The speculative receive stood down without writing; ``ev`` (if already made)
                # orders nothing of the exact receive, so the order is made again below.
                st.spec_misses += 1
            outputs = self.allocate(M)
            self._launch_recv()
            ev = self.order_after_recv(outputs)
            rx, rs, rti, rtw, rsrc = outputs
        if self.hs is not None:
            self.hs["outputs_ready"] = time.time_ns()
        handle = a.handle if a.cached else self._handle(M, num_recv, recv_counts, rsrc)
        return self._results(rx, rs, rti, rtw) + (expert_list, handle, ev)

    def _rows(self, outputs):
        """(rows of the outputs, received rows or None, rows per source or None, per-expert
        counts): known up front in the num_worst_tokens and cached modes, else from the host
        record once the notify kernel published it."""
        a, st, R = self.a, self.st, self.ctx.num_ranks
        if a.num_worst_tokens:
            return a.num_worst_tokens, None, None, []
        if a.cached:
            h = a.handle
            return (h.num_recv_tokens if h.num_recv_tokens is not None else h.out_rows), h.num_recv_tokens, \
                h.recv_counts, []
        try:
            st.wait_counts(self.ctx, "dispatch")
        except BaseException:
            if outputs is not None:
                # The speculative receive is queued on these outputs and may still write them
                # once the counts arrive: they must outlive it.
                st.orphans.append(outputs)
            raise
        if self.hs is not None:
            self.hs["counts_seen"] = time.time_ns()
        info = st.info
        num_recv = int(info[1])
        recv_counts = tuple(info[2:2 + R].tolist())
        expert_list = info[2 + R:2 + R + a.E // R].tolist() if a.tr is not None else []
        st.remember_rows(self.spec_key, num_recv)
        return num_recv, num_recv, recv_counts, expert_list

    def _narrow_speculative(self, outputs, M: int, spec_rows: int, ev):
        """Row views of the speculative outputs (column-major scales packed into [G, M])."""
        rx, rs, rti, rtw, rsrc = outputs
        if self.col_major_scales:
            # The receive wrote [G, spec_rows]; the caller gets [G, M] (leading dimension M, as
            # from exact outputs), packed on the receive's stream.
            rs = self._compact_scales(rs, M, spec_rows)
            ev = self.order_after_recv(outputs + [rs])  # the [G, spec_rows] array lives until then
            rs = (rs[0],)
        else:
            rs = None if rs is None else (interop.narrow_obj(rs[0], M),)
        # Only the handle needs a TensorRef of its row view; the rest are the caller's.
        rx, rti, rtw = (None if o is None else (interop.narrow_obj(o[0], M),) for o in (rx, rti, rtw))
        rsrc = None if rsrc is None else interop.narrow_rows(rsrc, M)
        return rx, rs, rti, rtw, rsrc, ev

    def _compact_scales(self, scratch, M: int, ld: int):
        """A new float32 [G, M] array (ctx.empty's (obj, ref) pair) holding the first M columns
        of ``scratch`` ([G, ld], written by the speculative receive), filled by a kernel queued on
        the receive's stream."""
        ctx = self.ctx
        out = ctx.empty(self.a.fw, (self.G, M), "float32")
        K_intra.launch_compact_scales(self.mod, ctx.stream2, scratch[1].ptr, out[1].ptr, ld, M, self.G,
                                      ctx.device_sm_count())
        return out

    def _handle(self, M: int, num_recv, recv_counts, rsrc) -> DispatchHandle:
        ctx, a, r = self.ctx, self.a, self.r
        r.refs["recv_src_idx"] = rsrc[1]
        return DispatchHandle(
            buffer_id=ctx.serial, framework=a.fw, device_id=ctx.device_id, num_ranks=ctx.num_ranks, rank=ctx.rank,
            num_tokens=a.N, hidden=a.H, num_experts=a.E, num_topk=a.Kt, num_worst_tokens=a.num_worst_tokens,
            out_rows=M, num_recv_tokens=num_recv, recv_counts=recv_counts, rank_prefix=r.rank_prefix,
            send_list=r.send_list, send_pos=r.send_pos, send_count=r.send_count, is_token_in_rank=r.itr_obj,
            recv_src_idx=interop.finish(a.fw, rsrc[0], ctx.stream), refs=r.refs)

    def _results(self, rx, rs, rti, rtw) -> tuple:
        """(recv_x in the form of x, recv_topk_idx, recv_topk_weights) in the caller's framework."""
        fw, stream = self.a.fw, self.ctx.stream
        fin = lambda o: None if o is None else interop.finish(fw, o[0], stream)  # noqa: E731
        recv_x = fin(rx)
        if self.a.fp8:
            scales = fin(rs)
            if self.col_major_scales:
                scales = scales.T
            recv_x = (recv_x, scales)
        return recv_x, fin(rti), fin(rtw)
