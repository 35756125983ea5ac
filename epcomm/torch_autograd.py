"""PyTorch autograd for normal-mode dispatch and combine.

* The backward of dispatch is a combine with the same handle: every copy of a token received
  by some rank sends its gradient back and the copies' gradients are summed (the same for the
  top-k weights, whose gradient is masked where the received index is -1: those entries were
  zeros, not copies of the weight).
* The backward of combine is a cached dispatch: each token's output gradient goes to every
  rank that contributed a row.
"""
from __future__ import annotations

import torch


class _Dispatch(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, topk_weights, buffer, topk_idx, num_experts, kwargs):
        recv_x, recv_idx, recv_w, counts, handle, _ = buffer.dispatch(
            x, topk_idx=topk_idx, topk_weights=topk_weights, num_experts=num_experts, **kwargs)
        ctx.buffer, ctx.handle = buffer, handle
        ctx.save_for_backward(recv_idx)
        ctx.mark_non_differentiable(recv_idx)
        ctx.has_w = topk_weights is not None
        ctx.extra = (counts, handle)
        return recv_x, recv_idx, recv_w

    @staticmethod
    def backward(ctx, grad_x, _grad_idx, grad_w):
        (recv_idx,) = ctx.saved_tensors
        if grad_w is not None and ctx.has_w:
            grad_w = grad_w.masked_fill(recv_idx < 0, 0.0).contiguous()
        else:
            grad_w = None
        gx, gw, _ = ctx.buffer.combine(grad_x.contiguous(), ctx.handle, topk_weights=grad_w)
        return gx, gw, None, None, None, None


class _Combine(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, buffer, handle):
        out, _, _ = buffer.combine(x, handle)
        ctx.buffer, ctx.handle = buffer, handle
        return out

    @staticmethod
    def backward(ctx, grad_out):
        grad_x = ctx.buffer.dispatch(grad_out.contiguous(), handle=ctx.handle)[0]
        return grad_x, None, None


def dispatch(buffer, x, topk_idx, topk_weights, num_experts: int, **kwargs):
    """Differentiable :meth:`epcomm.Buffer.dispatch` (BF16 ``x``; gradients flow to ``x`` and
    ``topk_weights``).  Returns ``(recv_x, recv_topk_idx, recv_topk_weights,
    num_recv_tokens_per_expert_list, handle)``; extra keyword arguments go to ``dispatch``."""
    f = _Dispatch.apply(x, topk_weights, buffer, topk_idx, num_experts, kwargs)
    recv_x, recv_idx, recv_w = f
    counts, handle = recv_x.grad_fn.extra if recv_x.grad_fn is not None else (None, None)
    if handle is None:  # no input needed gradients: the Function ran without a graph node
        raise RuntimeError("epcomm.torch_autograd.dispatch: use Buffer.dispatch when nothing needs gradients")
    return recv_x, recv_idx, recv_w, counts, handle


def combine(buffer, x, handle):
    """Differentiable :meth:`epcomm.Buffer.combine` (unweighted sum of each token's rows)."""
    return _Combine.apply(x, buffer, handle)
