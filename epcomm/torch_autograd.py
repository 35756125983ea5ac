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


def dispatch_backward(combine, grad_recv_x, grad_recv_w, recv_topk_idx):
    """The gradients of a dispatch's inputs ``(grad_x, grad_topk_weights)``: a combine through its
    handle, ``combine(grad_rows, grad_weights) -> (grad_x, grad_topk_weights)``, of the received
    rows' gradient and of the received weights' gradient (None: the dispatch had no weights, or
    they got none), the latter zeroed where the received index is -1 (those entries were zeros,
    not copies of a weight).  The rule of every differentiable dispatch of epcomm."""
    if grad_recv_w is not None:
        grad_recv_w = grad_recv_w.masked_fill(recv_topk_idx < 0, 0.0).contiguous()
    return combine(grad_recv_x.contiguous(), grad_recv_w)


def combine_backward(cached_dispatch, grad_out):
    """The gradient of a combine's input rows: ``cached_dispatch(grad_out)``, a dispatch of the
    output's gradient along the combine's handle (each token's gradient goes to every row that
    was summed into it)."""
    return cached_dispatch(grad_out.contiguous())


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
        gx, gw = dispatch_backward(lambda g, w: ctx.buffer.combine(g, ctx.handle, topk_weights=w)[:2],
                                   grad_x, grad_w if ctx.has_w else None, recv_idx)
        return gx, gw, None, None, None, None


class _Combine(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, buffer, handle):
        out, _, _ = buffer.combine(x, handle)
        ctx.buffer, ctx.handle = buffer, handle
        return out

    @staticmethod
    def backward(ctx, grad_out):
        return combine_backward(lambda g: ctx.buffer.dispatch(g, handle=ctx.handle)[0], grad_out), None, None


def dispatch(buffer, x, topk_idx, topk_weights, num_experts: int, **kwargs):
    """Differentiable :meth:`epcomm.Buffer.dispatch` (BF16 ``x``; gradients flow to ``x`` and
    ``topk_weights``).  Returns ``(recv_x, recv_topk_idx, recv_topk_weights,
    num_recv_tokens_per_expert_list, handle)``; extra keyword arguments go to ``dispatch``.

    With gradients disabled (``torch.no_grad()``, inference) or when neither ``x`` nor
    ``topk_weights`` requires grad, this is a plain ``Buffer.dispatch`` with the same return
    value and nothing recorded for backward, like any torch operation; a model can then run
    the same code in training and evaluation.

    Raises, before anything is dispatched: TypeError if ``x`` is not a torch tensor (an FP8
    ``(data, scales)`` pair has no gradient: use ``Buffer.dispatch`` for it), ValueError for
    ``async_finish=True`` (autograd uses the outputs on the current stream at once and has no
    place for the event: use ``Buffer.dispatch`` to overlap), and what ``Buffer.dispatch`` raises.
    """
    if isinstance(x, (tuple, list)):
        raise TypeError("x: epcomm.torch_autograd.dispatch takes a bf16 tensor; an FP8 (data, scales) pair "
                        "is not differentiable: dispatch it with Buffer.dispatch")
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x: expected a torch.Tensor, got {type(x).__name__}")
    if kwargs.get("async_finish"):
        raise ValueError("async_finish: not supported by epcomm.torch_autograd.dispatch (its outputs are used "
                         "on the current stream at once and the event would be lost); use Buffer.dispatch "
                         "with async_finish=True to overlap communication")
    needs_grad = torch.is_grad_enabled() and (
        x.requires_grad or (isinstance(topk_weights, torch.Tensor) and topk_weights.requires_grad))
    if not needs_grad:
        recv_x, recv_idx, recv_w, counts, handle, _ = buffer.dispatch(
            x, topk_idx=topk_idx, topk_weights=topk_weights, num_experts=num_experts, **kwargs)
        return recv_x, recv_idx, recv_w, counts, handle
    recv_x, recv_idx, recv_w = _Dispatch.apply(x, topk_weights, buffer, topk_idx, num_experts, kwargs)
    counts, handle = recv_x.grad_fn.extra  # some input requires grad: recv_x has the graph node
    return recv_x, recv_idx, recv_w, counts, handle


def combine(buffer, x, handle):
    """Differentiable :meth:`epcomm.Buffer.combine` (unweighted sum of each token's rows); with
    gradients disabled, a plain combine."""
    return _Combine.apply(x, buffer, handle)
