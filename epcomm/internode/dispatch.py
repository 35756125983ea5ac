"""Internode dispatch: every token crosses the network at most once per destination node, then
reaches each rank of that node holding one of its experts over NVLink.

The arguments are checked by the normal mode's rules (:func:`epcomm.normal.dispatch_args.check_args`)
plus the internode kernels' limits, all before any launch.  Kernels, all on the comm stream:
prep (the send plan; not for a cached dispatch), send, notify (counts and receive offsets), then
receive into outputs sized by the host once the counts arrived, or by ``num_worst_tokens``
(no CPU synchronisation, graph-capturable), or by the handle (cached).
"""
from __future__ import annotations

from epcomm import interop
from epcomm.errors import BufferStateError
from epcomm.internode.handle import InternodeHandle
from epcomm.jit import loader
from epcomm.kernels import internode as K
from epcomm.normal.dispatch import begin_dispatch
from epcomm.normal.dispatch_args import DispatchArgs, check_args
from epcomm.normal.handle import ptr
from epcomm.normal.layout import layout_on_comm
from epcomm.runtime import driver
from epcomm.runtime.event import check_event


def _check_limits(ctx, st, a: DispatchArgs) -> K.InterLayout:
    """The internode kernels' limits for this call; returns the heap layout of its hidden size."""
    R = ctx.num_ranks
    if a.cached and not isinstance(a.handle, InternodeHandle):
        raise ValueError("handle: comes from a dispatch inside one node, not from this Buffer's internode dispatch")
    if a.nrr is not None and a.nrr.shape[0] != st.num_nodes:
        raise ValueError(f"num_tokens_per_rdma_rank: has {a.nrr.shape[0]} entries, expected one per node "
                         f"({st.num_nodes} nodes of {st.rpn} ranks)")
    if a.Kt > K.MAX_TOPK:
        raise ValueError(f"topk_idx: {a.Kt} columns; the internode kernels carry at most {K.MAX_TOPK}")
    if a.E // R > K.MAX_LOCAL_EXPERTS:
        raise ValueError(f"{a.E // R} experts per rank: the internode kernels support at most {K.MAX_LOCAL_EXPERTS}")
    lay = st.layout(a.H)
    if a.N > lay.ncap:
        need = K.rdma_size_hint(a.H, R, st.rpn, a.N)
        raise ValueError(f"Buffer too small: {a.N} tokens of hidden {a.H} need num_rdma_bytes >= {need} "
                         f"(this buffer holds {lay.ncap} tokens per rank at this hidden size)")
    if a.num_worst_tokens and a.num_worst_tokens > lay.stage_rows:
        raise ValueError(f"num_worst_tokens={a.num_worst_tokens}: the combine of these rows needs num_nvl_bytes >= "
                         f"{K.nvl_size_hint(a.H, a.num_worst_tokens)} (this buffer stages {lay.stage_rows} rows)")
    return lay


_ROUTE_KEYS = ("rank_pos", "node_pos", "node_list", "rank_count", "node_count", "is_token_in_rank")


def _route(ctx, st, a: DispatchArgs) -> dict:
    """The send plan's (obj, ref) pairs: a cached dispatch's from its handle, else new ones
    (and the layout's, when the call computes it)."""
    R, M, N, fw = ctx.num_ranks, st.num_nodes, a.N, a.fw
    if a.cached:
        # The handle keeps the arrays alive (it is among the call's inputs); only refs are needed.
        return {k: (None, a.handle.refs[k]) for k in _ROUTE_KEYS}
    out = {"rank_pos": ctx.empty(fw, (N, R), "int32"), "node_pos": ctx.empty(fw, (N, M), "int32"),
           "node_list": ctx.empty(fw, (M, max(N, 1)), "int32"), "rank_count": ctx.empty(fw, (R,), "int32"),
           "node_count": ctx.empty(fw, (M,), "int32")}
    itr, ner = a.itr, a.ner
    keep = []
    if a.needs_layout:
        lay_outs = layout_on_comm(ctx, a.tr, a.E, M, st.rpn)
        keep = [o[0] for o in lay_outs if o]
        itr = itr if itr is not None else lay_outs[3][1]
        ner = ner if ner is not None else lay_outs[2][1]
    out["is_token_in_rank"] = (itr.obj, itr)
    out["ner"] = (None, ner)
    out["keep"] = (keep, None)
    return out


def _params(ctx, st, lay, a: DispatchArgs, route: dict, chunk_rows: int) -> K.InterParams:
    p = st.params(lay, ctx.timeout_s)
    p.x = a.xr.ptr
    if a.fp8:
        p.x_scales, p.scale_st, p.scale_sg = a.sr.ptr, a.sr.strides[0], a.sr.strides[1]
    p.topk_idx, p.topk_weights = ptr(a.tr), ptr(a.wr)
    p.is_token_in_rank = route["is_token_in_rank"][1].ptr
    p.num_tokens_per_expert = ptr(route.get("ner", (None, None))[1])
    for k in ("rank_pos", "node_pos", "node_list", "rank_count", "node_count"):
        setattr(p, k, route[k][1].ptr)
    p.num_tokens, p.num_topk, p.num_experts, p.hidden, p.fp8 = a.N, a.Kt, a.E, a.H, int(a.fp8)
    p.expert_alignment = a.expert_alignment
    p.chunk_rows = chunk_rows
    p.shape_word = K.shape_word(a.H, a.fp8, a.Kt, a.E, chunk_rows)
    p.write_host = int(not a.num_worst_tokens and not a.cached)
    p.worst_mode = int(a.num_worst_tokens > 0)
    return p


def dispatch(ctx, st, default_config, x, handle=None, num_tokens_per_rank=None, num_tokens_per_rdma_rank=None,
             is_token_in_rank=None, num_tokens_per_expert=None, topk_idx=None, topk_weights=None,
             expert_alignment: int = 1, num_worst_tokens: int = 0, config=None, previous_event=None,
             async_finish: bool = False, allocate_on_comm_stream: bool = False, *, num_experts=None):
    """See :meth:`epcomm.Buffer.dispatch` (``st``: the Buffer's InternodeState or None)."""
    ctx.check_usable("dispatch", collective=True)
    if st is None:
        raise BufferStateError("dispatch needs a Buffer created with num_nvl_bytes > 0 and num_rdma_bytes > 0")
    check_event(previous_event)
    route_args = dict(topk_idx=topk_idx, topk_weights=topk_weights, is_token_in_rank=is_token_in_rank,
                      num_tokens_per_rank=num_tokens_per_rank, num_tokens_per_rdma_rank=num_tokens_per_rdma_rank,
                      num_tokens_per_expert=num_tokens_per_expert, num_experts=num_experts)
    a = check_args(ctx, default_config, x, handle, route_args, expert_alignment, num_worst_tokens, config,
                   previous_event)
    lay = _check_limits(ctx, st, a)
    chunk_rows = a.handle.chunk_rows if a.cached else st.chunk_rows(lay, a.cfg.chunk_rows)
    spec = K.InternodeSpec(a.H, a.fp8)
    spec.validate()
    async_finish = ctx.call_flags(async_finish, allocate_on_comm_stream)
    with driver.on_device(ctx.device_id):
        mod = loader.load(spec, ctx.device_id)
        caller, cap = begin_dispatch(ctx, a, previous_event)
        route = _route(ctx, st, a)
        p = _params(ctx, st, lay, a, route, chunk_rows)
        recv = _recv_state(ctx, st, lay, a)
        p.recv_offsets, p.fwd_count, p.fwd_pos = (recv[k][1].ptr for k in ("recv_offsets", "fwd_count", "fwd_pos"))
        if p.write_host:
            st.info[0] = 0
        p.out_rows = a.num_worst_tokens  # notify checks the received rows against it
        if not a.cached:
            K.launch_prep(mod, ctx.stream, p)
        K.launch_send(mod, ctx.stream, p, a.cfg.num_sms)
        K.launch_notify(mod, ctx.stream, p)
        M, num_recv, recv_counts, expert_list = _rows(ctx, st, a)
        outs, col_major = _allocate(ctx, a, p, M)
        K.launch_recv(mod, ctx.stream, p, a.cfg.num_sms)
        tr = a.tr
        ins = [a.xr.obj, a.sr.obj if a.sr else None, tr.obj if tr else None, a.wr.obj if a.wr else None,
               tr.keepalive if tr else None, a.handle] + [o[0] for o in route.values() if o[0] is not None]
        ev = ctx.finish(a.fw, caller, async_finish, [o[0] for o in list(outs.values()) + list(recv.values()) if o],
                        ins, cap)
    h = a.handle if a.cached else _handle(ctx, st, a, M, num_recv, recv_counts, route, recv, outs, chunk_rows)
    return _results(ctx, a, outs, col_major) + (expert_list, h, ev)


def _recv_state(ctx, st, lay, a: DispatchArgs) -> dict:
    """What the receive side keeps for the combine: the handle's own for a cached dispatch
    (rewritten with the same values), else new."""
    if a.cached:
        h = a.handle
        return {"recv_offsets": (h.rank_prefix, h.refs["recv_offsets"]), "fwd_count": (None, h.refs["fwd_count"]),
                "fwd_pos": (h.fwd_pos, h.refs["fwd_pos"])}
    fw, M = a.fw, st.num_nodes
    return {"recv_offsets": ctx.empty(fw, (ctx.num_ranks + 1,), "int32"), "fwd_count": ctx.empty(fw, (M,), "int32"),
            "fwd_pos": ctx.empty(fw, (M, max(lay.ncap, 1), st.rpn), "int32")}


def _rows(ctx, st, a: DispatchArgs):
    """(rows of the outputs, received rows or None, rows per source or None, per-expert counts)."""
    R = ctx.num_ranks
    if a.num_worst_tokens:
        return a.num_worst_tokens, None, None, []
    if a.cached:
        h = a.handle
        return (h.num_recv_tokens if h.num_recv_tokens is not None else h.out_rows), h.num_recv_tokens, \
            h.recv_counts, []
    st.wait_counts(ctx, "dispatch")
    info = st.info
    num_recv = int(info[1])
    counts = tuple(info[2:2 + R].tolist())
    experts = info[2 + R:2 + R + a.E // R].tolist() if a.tr is not None else []
    return num_recv, num_recv, counts, experts


def _allocate(ctx, a: DispatchArgs, p, M: int) -> tuple[dict, bool]:
    """The outputs for M rows ((obj, ref) pairs, None where absent; their pointers go into p),
    and whether the scales are column-major ([G, M], returned transposed)."""
    fw, G = a.fw, a.H // 128
    out = {"x": ctx.empty(fw, (M, a.H), "float8_e4m3fn" if a.fp8 else "bfloat16"), "scales": None,
           "topk_idx": ctx.empty(fw, (M, a.Kt), "int64") if a.Kt else None,
           "topk_weights": ctx.empty(fw, (M, a.Kt), "float32") if (a.Kt and a.wr is not None) else None,
           "src_idx": None if a.cached else ctx.empty(fw, (M,), "int32")}
    col_major = a.fp8 and a.sr.strides[0] == 1 and a.sr.shape[1] > 1 and a.N > 1
    if a.fp8:
        out["scales"] = ctx.empty(fw, (G, M) if col_major else (M, G), "float32")
        p.rscale_st, p.rscale_sg = (1, M) if col_major else (G, 1)
        p.recv_scales = out["scales"][1].ptr
    p.recv_x = out["x"][1].ptr
    p.recv_topk_idx = ptr(out["topk_idx"] and out["topk_idx"][1])
    p.recv_topk_weights = ptr(out["topk_weights"] and out["topk_weights"][1])
    p.recv_src_idx = ptr(out["src_idx"] and out["src_idx"][1])
    p.out_rows = M
    return out, col_major


def _handle(ctx, st, a, M, num_recv, recv_counts, route, recv, outs, chunk_rows) -> InternodeHandle:
    refs = {k: route[k][1] for k in _ROUTE_KEYS}
    refs.update({k: v[1] for k, v in recv.items()})
    refs["recv_src_idx"] = outs["src_idx"][1]
    fin = lambda o: interop.finish(a.fw, o, ctx.stream)  # noqa: E731
    return InternodeHandle(
        buffer_id=ctx.serial, framework=a.fw, device_id=ctx.device_id, num_ranks=ctx.num_ranks, rank=ctx.rank,
        num_tokens=a.N, hidden=a.H, num_experts=a.E, num_topk=a.Kt, num_worst_tokens=a.num_worst_tokens,
        out_rows=M, num_recv_tokens=num_recv, recv_counts=recv_counts, rank_prefix=recv["recv_offsets"][0],
        send_list=route["node_list"][0], send_pos=route["rank_pos"][0], send_count=route["rank_count"][0],
        is_token_in_rank=route["is_token_in_rank"][0], recv_src_idx=fin(outs["src_idx"][0]), refs=refs,
        ranks_per_node=st.rpn, chunk_rows=chunk_rows, node_pos=route["node_pos"][0], fwd_pos=recv["fwd_pos"][0])


def _results(ctx, a: DispatchArgs, outs: dict, col_major: bool) -> tuple:
    """(recv_x in the form of x, recv_topk_idx, recv_topk_weights) in the caller's framework."""
    fin = lambda o: None if o is None else interop.finish(a.fw, o[0], ctx.stream)  # noqa: E731
    recv_x = fin(outs["x"])
    if a.fp8:
        scales = fin(outs["scales"])
        recv_x = (recv_x, scales.T if col_major else scales)
    return recv_x, fin(outs["topk_idx"]), fin(outs["topk_weights"])
