"""The autograd wiring of epcomm.torch_autograd, on the CPU, with a one-rank stand-in buffer whose
dispatch/combine follow epcomm.reference (the GPU kernels are checked against the same reference)."""
from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from epcomm import reference  # noqa: E402
from epcomm.torch_autograd import combine, dispatch  # noqa: E402


class _Handle:
    def __init__(self, h):
        self.h = h


class OneRankBuffer:
    """R = 1: dispatch sends each routed token to this rank once; combine sums back."""

    def dispatch(self, x, handle=None, topk_idx=None, topk_weights=None, num_experts=None, **kw):
        if handle is not None:
            keep = torch.from_numpy(handle.h.recv_src_idx.astype(np.int64))
            return x[keep], None, None, [], handle, None
        idx = topk_idx.numpy()
        import ml_dtypes
        r = reference.dispatch([x.detach().float().numpy().astype(ml_dtypes.bfloat16)], num_experts, topk_idx=[idx],
                               topk_weights=[topk_weights.detach().numpy()] if topk_weights is not None else None)[0]
        keep = torch.from_numpy(r.handle.recv_src_idx.astype(np.int64))
        recv_w = topk_weights[keep].masked_fill(torch.from_numpy(r.recv_topk_idx) < 0, 0.0)
        return x[keep], torch.from_numpy(r.recv_topk_idx), recv_w, r.num_recv_tokens_per_expert_list, _Handle(r.handle), None

    def combine(self, x, handle, topk_weights=None, bias=None):
        src = torch.from_numpy(handle.h.recv_src_idx.astype(np.int64))
        n = handle.h.send_pos.shape[0]
        out = torch.zeros(n, x.shape[1], dtype=x.dtype).index_add(0, src, x)
        w = None
        if topk_weights is not None:
            w = torch.zeros(n, topk_weights.shape[1]).index_add(0, src, topk_weights)
        return out, w, None


def test_gradients_flow_through_dispatch_and_combine():
    rng = np.random.default_rng(0)
    N, H, E, K = 16, 8, 8, 2
    idx = torch.from_numpy(np.stack([rng.choice(E, K, replace=False) for _ in range(N)]))
    idx[3] = -1  # a token routed nowhere
    x = torch.randn(N, H, requires_grad=True)
    w = torch.rand(N, K, requires_grad=True)
    buf = OneRankBuffer()
    rx, ridx, rw, counts, handle = dispatch(buf, x, idx, w, E)
    y = rx * rw.sum(1, keepdim=True)           # a toy expert
    out = combine(buf, y, handle)
    out.sum().backward()
    routed = (idx >= 0).any(1)
    # d out / d x = weight sum on routed tokens, 0 on the token routed nowhere.
    want_gx = (w.detach() * (idx >= 0)).sum(1, keepdim=True).expand(N, H) * routed[:, None]
    assert torch.allclose(x.grad, want_gx)
    want_gw = (x.detach().sum(1, keepdim=True) * (idx >= 0)) * routed[:, None]
    assert torch.allclose(w.grad, want_gw)
    assert sum(counts) == int((idx >= 0).sum())


class _CountingBuffer(OneRankBuffer):
    def __init__(self):
        self.dispatches = 0

    def dispatch(self, x, **kw):
        self.dispatches += 1
        return super().dispatch(x, **kw)


def test_without_gradients_dispatch_is_a_plain_dispatch():
    idx = torch.tensor([[0, 1], [1, -1], [-1, -1]])
    w = torch.rand(3, 2)
    for x, grad in ((torch.randn(3, 8), True), (torch.randn(3, 8, requires_grad=True), False)):
        buf = _CountingBuffer()
        with torch.set_grad_enabled(grad):
            rx, ridx, rw, counts, handle = dispatch(buf, x, idx, w, 4)
        assert buf.dispatches == 1 and rx.grad_fn is None and handle is not None
        assert rx.shape == (2, 8) and sum(counts) == 3
        assert combine(buf, rx, handle).shape == (3, 8)


def test_unsupported_arguments_raise_before_the_collective():
    buf = _CountingBuffer()
    idx = torch.tensor([[0, 1]])
    x = torch.randn(1, 128, requires_grad=True)
    with pytest.raises(ValueError, match="async_finish: not supported"):
        dispatch(buf, x, idx, None, 4, async_finish=True)  # the event would be lost
    with pytest.raises(TypeError, match="an FP8 \\(data, scales\\) pair is not differentiable"):
        dispatch(buf, (x.detach(), torch.ones(1, 1, requires_grad=True)), idx, None, 4)
    with pytest.raises(TypeError, match="x: expected a torch.Tensor"):
        dispatch(buf, x.detach().numpy(), idx, None, 4)
    assert buf.dispatches == 0
