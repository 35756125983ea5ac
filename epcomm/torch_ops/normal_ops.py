"""The normal mode's fixed-shape calls as torch custom operations (namespace ``epcomm``): a
``num_worst_tokens`` dispatch, a cached dispatch, a combine, and the routing layout, each with a
fake implementation (its outputs' shapes and dtypes from its inputs', for tracing) and, for the
first three, autograd (:mod:`epcomm.torch_autograd`'s rules: a dispatch's backward is a combine
through its handle, a combine's backward a cached dispatch).

The handle travels as its route tensors (:data:`epcomm.normal.handle.ROUTE_FIELDS`) and two ints;
the Buffer as its id (:mod:`epcomm.torch_ops.registry`).  Each collective takes the order token
last (:mod:`epcomm.torch_ops.order`; None in eager calls), and its backward's collectives take the
same one.  Registered when this module is imported.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from epcomm import api
from epcomm.normal.handle import handle_from_route, route_arrays
from epcomm.torch_autograd import combine_backward, dispatch_backward
from epcomm.torch_ops.order import in_order, order_token
from epcomm.torch_ops.registry import lookup

_ROUTE = tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]


def _handle(buffer_id: int, route, hidden: int, num_experts: int, num_topk: int):
    """(the Buffer, the DispatchHandle its engine retraces) of route tensors."""
    buf = lookup(buffer_id)
    h = handle_from_route(route, serial=buffer_id, device_id=buf.device_id, rank=buf.rank, num_ranks=buf.num_ranks,
                          hidden=hidden, num_experts=num_experts, num_topk=num_topk)
    return buf, h


def _backward_order(ctx, grad: Tensor):
    """The order token of a backward's collective: the forward's when the forward was traced,
    else the device's when the backward alone is (compiled autograd), else None (eager)."""
    return ctx.order if ctx.order is not None else order_token(grad)


def _route_fake(x: Tensor, num_ranks: int, N, M) -> tuple:
    R, i32 = num_ranks, torch.int32
    return (x.new_empty((R + 1,), dtype=i32), x.new_empty((R, torch.sym_max(N, 1)), dtype=i32),
            x.new_empty((N, R), dtype=i32), x.new_empty((R,), dtype=i32), x.new_empty((N, R), dtype=torch.bool),
            x.new_empty((M,), dtype=i32))


# ---- dispatch (num_worst_tokens) ------------------------------------------------------------
@torch.library.custom_op("epcomm::dispatch", mutates_args=())
def dispatch_op(x: Tensor, topk_idx: Tensor, topk_weights: Tensor, buffer_id: int, num_ranks: int,
                num_experts: int, num_worst_tokens: int, order: Optional[Tensor] = None
                ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """:meth:`epcomm.Buffer.dispatch` with ``num_worst_tokens``: (recv_x bf16 [M, H],
    recv_topk_idx int64 [M, K], recv_topk_weights float32 [M, K], then the route tensors),
    M = num_worst_tokens."""
    buf = lookup(buffer_id)
    if buf.num_ranks != num_ranks:
        raise ValueError(f"num_ranks={num_ranks}: the Buffer has {buf.num_ranks} ranks")
    recv_x, recv_idx, recv_w, _, handle, _ = buf.dispatch(x, topk_idx=topk_idx, topk_weights=topk_weights,
                                                          num_experts=num_experts, num_worst_tokens=num_worst_tokens)
    return (recv_x, recv_idx, recv_w, *route_arrays(handle))


@dispatch_op.register_fake
def _dispatch_fake(x, topk_idx, topk_weights, buffer_id, num_ranks, num_experts, num_worst_tokens, order=None):
    M, (N, H), Kt = num_worst_tokens, x.shape, topk_idx.shape[1]
    return (x.new_empty((M, H)), x.new_empty((M, Kt), dtype=torch.int64),
            x.new_empty((M, Kt), dtype=torch.float32), *_route_fake(x, num_ranks, N, M))


def _dispatch_setup(ctx, inputs, output) -> None:
    # The token is an attribute, not saved: a traced backward writes it (order_after), which a
    # saved tensor's version check would refuse.
    ctx.buffer_id, ctx.num_experts, ctx.order = inputs[3], inputs[5], inputs[7]
    ctx.save_for_backward(output[1], *output[3:])  # recv_topk_idx, the route


def _dispatch_backward(ctx, grad_x, _grad_idx, grad_w, *_grad_route):
    recv_idx, *route = ctx.saved_tensors
    Kt = recv_idx.shape[1]
    gx, gw = dispatch_backward(
        lambda g, w: in_order(combine_op, _backward_order(ctx, g), g, w, *route, ctx.buffer_id, ctx.num_experts, Kt),
        grad_x, grad_w if ctx.needs_input_grad[2] else None, recv_idx)
    return gx, None, (gw if ctx.needs_input_grad[2] else None), None, None, None, None, None


dispatch_op.register_autograd(_dispatch_backward, setup_context=_dispatch_setup)


# ---- cached dispatch ------------------------------------------------------------------------
@torch.library.custom_op("epcomm::cached_dispatch", mutates_args=())
def cached_dispatch_op(x: Tensor, rank_prefix: Tensor, send_list: Tensor, send_pos: Tensor, send_count: Tensor,
                       is_token_in_rank: Tensor, recv_src_idx: Tensor, buffer_id: int, num_experts: int,
                       num_topk: int, order: Optional[Tensor] = None) -> Tensor:
    """:meth:`epcomm.Buffer.dispatch` with the handle of a ``num_worst_tokens`` dispatch: recv_x
    bf16 [M, H], M = recv_src_idx's length."""
    route = (rank_prefix, send_list, send_pos, send_count, is_token_in_rank, recv_src_idx)
    buf, h = _handle(buffer_id, route, x.shape[1], num_experts, num_topk)
    return buf.dispatch(x, handle=h)[0]


@cached_dispatch_op.register_fake
def _cached_dispatch_fake(x, rank_prefix, send_list, send_pos, send_count, is_token_in_rank, recv_src_idx,
                          buffer_id, num_experts, num_topk, order=None):
    return x.new_empty((recv_src_idx.shape[0], x.shape[1]))


def _cached_setup(ctx, inputs, output) -> None:
    ctx.buffer_id, ctx.num_experts, ctx.num_topk, ctx.order = inputs[7:11]
    ctx.save_for_backward(*inputs[1:7])


def _cached_backward(ctx, grad_x):
    route = ctx.saved_tensors
    gx, _ = dispatch_backward(lambda g, w: in_order(combine_op, _backward_order(ctx, g), g, w, *route, ctx.buffer_id,
                                                    ctx.num_experts, ctx.num_topk),
                              grad_x, None, None)
    return (gx,) + (None,) * 10


cached_dispatch_op.register_autograd(_cached_backward, setup_context=_cached_setup)


# ---- combine --------------------------------------------------------------------------------
@torch.library.custom_op("epcomm::combine", mutates_args=())
def combine_op(x: Tensor, topk_weights: Optional[Tensor], rank_prefix: Tensor, send_list: Tensor, send_pos: Tensor,
               send_count: Tensor, is_token_in_rank: Tensor, recv_src_idx: Tensor, buffer_id: int, num_experts: int,
               num_topk: int, order: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """:meth:`epcomm.Buffer.combine` through a ``num_worst_tokens`` dispatch's route: (combined_x
    bf16 [N, H], combined_topk_weights float32 [N, K], or [N, 0] without weights)."""
    route = (rank_prefix, send_list, send_pos, send_count, is_token_in_rank, recv_src_idx)
    buf, h = _handle(buffer_id, route, x.shape[1], num_experts, num_topk)
    out, out_w, _ = buf.combine(x, h, topk_weights=topk_weights)
    if out_w is None:
        out_w = out.new_empty((out.shape[0], 0), dtype=torch.float32)
    return out, out_w


@combine_op.register_fake
def _combine_fake(x, topk_weights, rank_prefix, send_list, send_pos, send_count, is_token_in_rank, recv_src_idx,
                  buffer_id, num_experts, num_topk, order=None):
    N = send_pos.shape[0]
    Kt = 0 if topk_weights is None else topk_weights.shape[1]
    return x.new_empty((N, x.shape[1])), x.new_empty((N, Kt), dtype=torch.float32)


def _combine_setup(ctx, inputs, output) -> None:
    ctx.buffer_id, ctx.num_experts, ctx.num_topk, ctx.order = inputs[8:12]
    ctx.save_for_backward(*inputs[2:8])


def _combine_backward(ctx, grad_out, _grad_w):
    route = ctx.saved_tensors
    gx = combine_backward(lambda g: in_order(cached_dispatch_op, _backward_order(ctx, g), g, *route, ctx.buffer_id,
                                             ctx.num_experts, ctx.num_topk), grad_out)
    return (gx,) + (None,) * 11


combine_op.register_autograd(_combine_backward, setup_context=_combine_setup)


# ---- layout ---------------------------------------------------------------------------------
@torch.library.custom_op("epcomm::get_dispatch_layout", mutates_args=())
def layout_op(topk_idx: Tensor, num_experts: int, num_ranks: int, num_ranks_per_node: int
              ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """:func:`epcomm.get_dispatch_layout`; the per-node counts are int32 [0] within one node."""
    rank, rdma, expert, in_rank = api.get_dispatch_layout(topk_idx, num_experts, num_ranks,
                                                          num_ranks_per_node=num_ranks_per_node)
    if rdma is None:
        rdma = rank.new_empty((0,))
    return rank, rdma, expert, in_rank


@layout_op.register_fake
def _layout_fake(topk_idx, num_experts, num_ranks, num_ranks_per_node):
    nodes = num_ranks // num_ranks_per_node if num_ranks > num_ranks_per_node else 0
    i32 = torch.int32
    return (topk_idx.new_empty((num_ranks,), dtype=i32), topk_idx.new_empty((nodes,), dtype=i32),
            topk_idx.new_empty((num_experts,), dtype=i32),
            topk_idx.new_empty((topk_idx.shape[0], num_ranks), dtype=torch.bool))
