"""Internode combine: the inverse route of a dispatch.  Every rank stages its rows; the forwarder
of each (source, node) pair adds that node's rows of a token in fp32 (ascending rank) and puts
one partial to the source; the source adds the partials (ascending node), then the biases, and
writes bf16 (the order of ``epcomm.reference.combine`` with ``num_ranks_per_node``; with the
Buffer's numerics="deepep", DeepEP's: each partial rounded to bf16, the biases first)."""
from __future__ import annotations

from epcomm import interop
from epcomm.errors import BufferStateError
from epcomm.internode.handle import InternodeHandle
from epcomm.jit import loader
from epcomm.kernels import internode as K
from epcomm.normal.combine import check_combine_args
from epcomm.normal.handle import ptr
from epcomm.runtime import driver


def _internode_handle(handle) -> None:
    if not isinstance(handle, InternodeHandle):
        raise ValueError("handle: comes from a dispatch inside one node, not from this Buffer's internode dispatch")


def combine(ctx, st, default_config, x, handle, topk_weights=None, bias=None, config=None, previous_event=None,
            async_finish: bool = False, allocate_on_comm_stream: bool = False):
    """See :meth:`epcomm.Buffer.combine` (``st``: the Buffer's InternodeState or None).  Raises
    ValueError, before any launch, if the rows to stage exceed ``num_nvl_bytes``."""
    ctx.check_usable("combine", collective=True)
    if st is None:
        raise BufferStateError("combine needs a Buffer created with num_nvl_bytes > 0 and num_rdma_bytes > 0")
    c = check_combine_args(ctx, default_config, x, handle, topk_weights, bias, config, previous_event,
                           check_kind=_internode_handle)
    xr, fw, wr, Kt, biases, cfg = c.xr, c.fw, c.wr, c.Kt, c.biases, c.cfg
    H, N = handle.hidden, handle.num_tokens
    lay = st.layout(H)
    if handle.out_rows > lay.stage_rows:
        raise ValueError(f"Buffer too small for this combine: {handle.out_rows} rows to stage need num_nvl_bytes >= "
                         f"{K.nvl_size_hint(H, handle.out_rows)} (this buffer stages {lay.stage_rows} rows)")
    spec = K.InternodeSpec(H, False, deepep=ctx.numerics == "deepep")
    async_finish = ctx.call_flags(async_finish, allocate_on_comm_stream)
    with driver.on_device(ctx.device_id):
        mod = loader.load(spec, ctx.device_id)
        caller, cap = ctx.begin(fw, previous_event)
        out = ctx.empty(fw, (N, H), "bfloat16")
        outw = ctx.empty(fw, (N, Kt), "float32") if wr is not None else None
        p = st.params(lay, ctx.timeout_s)
        refs = handle.refs
        p.x, p.topk_weights = xr.ptr, ptr(wr)
        for k in ("node_pos", "recv_offsets", "fwd_count", "fwd_pos"):
            setattr(p, k, refs[k].ptr)
        p.out, p.out_weights = out[1].ptr, (outw[1].ptr if outw else 0)
        p.bias0 = biases[0].ptr if len(biases) > 0 else 0
        p.bias1 = biases[1].ptr if len(biases) > 1 else 0
        p.num_tokens, p.num_topk, p.num_experts, p.hidden = N, Kt, handle.num_experts, H
        p.chunk_rows = handle.chunk_rows  # the dispatch's, which every rank agreed on
        # Rows to stage: known on the host, except after a num_worst_tokens dispatch (the
        # kernel then reads the received count its notify kept).
        p.comb_rows = handle.num_recv_tokens if handle.num_recv_tokens is not None else -1
        K.launch_combine(mod, ctx.stream, p, cfg.num_sms)
        outs = [out[0]] + ([outw[0]] if outw else [])
        ev = ctx.finish(fw, caller, async_finish, outs,
                        [xr.obj, wr.obj if wr else None, handle]
                        + [b.obj for b in biases], cap)
    return (interop.finish(fw, out[0], ctx.stream),
            (interop.finish(fw, outw[0], ctx.stream) if outw else None), ev)
