"""The routing counts of one rank's tokens on the comm stream (``Buffer.get_dispatch_layout``,
and the layout a dispatch computes when the caller gave none)."""
from __future__ import annotations

from epcomm import interop
from epcomm.interop.indices import check_topk_indices
from epcomm.kernels import layout as K_layout
from epcomm.runtime import driver
from epcomm.runtime.event import EventOverlap
from epcomm.validate import check_int
from epcomm.runtime.event import check_event


def get_dispatch_layout(ctx, topk_idx, num_experts: int, previous_event: EventOverlap | None = None,
                        async_finish: bool = False, allocate_on_comm_stream: bool = False,
                        ranks_per_node: int | None = None):
    """See :meth:`epcomm.Buffer.get_dispatch_layout` (``ctx``: the Buffer's CommContext;
    ``ranks_per_node``: the Buffer's node size when it spans nodes, else None)."""
    ctx.check_usable("get_dispatch_layout")
    check_event(previous_event)
    tr = ctx.tensor(topk_idx, "topk_idx", dtype="index", ndim=2, previous_event=previous_event)
    num_experts = check_int("num_experts", num_experts, lo=1)
    # One NVLink domain: ranks_per_node = R, so no per-node counts (num_nodes = 0), as in dispatch.
    P = ranks_per_node or ctx.num_ranks
    num_nodes = K_layout.check_layout_args(tr.shape[0], num_experts, ctx.num_ranks, P)
    async_finish = ctx.call_flags(async_finish, allocate_on_comm_stream)
    fw = tr.framework
    with driver.on_device(ctx.device_id):
        caller, cap = ctx.begin(fw, previous_event, caller_work=tr.widened)
        check_topk_indices(tr.obj, fw, num_experts, capturing=bool(cap), previous_event=previous_event)
        outs = layout_on_comm(ctx, tr, num_experts, num_nodes, P)
        ev = ctx.finish(fw, caller, async_finish, [o[0] for o in outs if o], [tr.obj, tr.keepalive], cap)
    res = [interop.finish(fw, o[0], ctx.stream) if o else None for o in outs]
    return (*res, ev)


# The layout's outputs, in the order get_dispatch_layout returns them.
LAYOUT_OUTPUTS = ("num_tokens_per_rank", "num_tokens_per_rdma_rank", "num_tokens_per_expert", "is_token_in_rank")


def layout_specs(N: int, R: int, num_experts: int, num_nodes: int) -> dict:
    """name -> (shape, dtype) of the layout's outputs for N tokens (the per-node counts only
    with ``num_nodes`` > 0)."""
    spec = {"num_tokens_per_rank": ((R,), "int32"), "num_tokens_per_rdma_rank": ((num_nodes,), "int32"),
            "num_tokens_per_expert": ((num_experts,), "int32"), "is_token_in_rank": ((N, R), "bool")}
    if not num_nodes:
        del spec["num_tokens_per_rdma_rank"]
    return spec


def layout_on_comm(ctx, tr, num_experts: int, num_nodes: int, ranks_per_node: int | None = None) -> list:
    """Allocate the four layout outputs (interop (obj, ref) pairs; the per-node one None when
    ``num_nodes`` is 0) and launch the layout kernel on the comm stream (``ranks_per_node``:
    default one node of every rank)."""
    fw = tr.framework
    N = tr.shape[0]
    R = ctx.num_ranks
    spec = layout_specs(N, R, num_experts, num_nodes)
    rank_o, rdma_o, exp_o, in_o = (ctx.empty(fw, *spec[k], name=k) if k in spec else None for k in LAYOUT_OUTPUTS)
    K_layout.launch_layout(ctx.stream, ctx.device_id, tr, num_experts, R, num_nodes, ranks_per_node or R, rank_o[1],
                           rdma_o[1] if rdma_o else None, exp_o[1], in_o[1], ctx.err.dev_ptr)
    return [rank_o, rdma_o, exp_o, in_o]
