"""One-rank CPU stand-ins for an epcomm Buffer, for the CPU tests of epcomm.torch_ops: they run
the operations' real bodies (the registry lookup, the handle rebuilt from its route tensors,
the results' views) with host tensors.  R = 1: a dispatch sends each routed token to this rank
once (in token order), a combine sums each token's row back; the low-latency dispatch packs
each token's row under every expert it selected, the combine adds the rows times their weights.
The GPU kernels are checked against epcomm.reference by the GPU tests."""
from __future__ import annotations

import contextlib
import itertools

import pytest
import torch

from epcomm import interop
from epcomm.errors import EpcommError
from epcomm.low_latency.handle import LowLatencyHandle, handle_over, result_specs
from epcomm.normal.handle import DispatchHandle, handle_from_route

_SERIALS = itertools.count(10_000)
# Unwritten memory's contents: a generator of its own (torch.manual_seed, which opcheck calls
# before each run it compares, must not make two calls' garbage equal).
_GARBAGE = torch.Generator().manual_seed(12345)


class _Ctx:
    """The engine context's part the operations use: the serial, the caller-supplied outputs and
    whether the Buffer was destroyed."""

    def __init__(self):
        self.serial, self.sink, self.destroyed = next(_SERIALS), None, False

    @contextlib.contextmanager
    def supplying(self, sink):
        prev, self.sink = self.sink, sink
        try:
            yield sink
        finally:
            self.sink = prev


class OneRankBuffer:
    num_ranks, rank, device_id, internode = 1, 0, -1, False

    def __init__(self):
        self.ctx = _Ctx()
        self.calls: list[str] = []
        self._ll_results = {}
        self._ll_generation = 0

    # ---- normal mode -----------------------------------------------------------------------
    def dispatch(self, x, handle=None, topk_idx=None, topk_weights=None, num_experts=None, num_worst_tokens=0):
        assert isinstance(x, torch.Tensor) and x.device.type == "cpu"
        if handle is not None:
            assert isinstance(handle, DispatchHandle) and handle.buffer_id == self.ctx.serial
            self.calls.append("cached_dispatch")
            src = handle.recv_src_idx.long()
            return self._gather(x, src), None, None, [], handle, None
        self.calls.append("dispatch")
        N, K = topk_idx.shape
        M = num_worst_tokens
        routed = (topk_idx >= 0).any(1)
        tokens = routed.nonzero()[:, 0]
        n = tokens.numel()
        assert n <= M
        src = torch.full((M,), -1, dtype=torch.int64)
        src[:n] = tokens
        recv_idx = torch.full((M, K), -1, dtype=torch.int64)
        recv_idx[:n] = topk_idx[tokens]
        recv_w = torch.zeros(M, K)
        recv_w[:n] = topk_weights[tokens].masked_fill(topk_idx[tokens] < 0, 0.0)
        # [R, N]: the routed tokens first; the tail is not written (as the kernel leaves it): it
        # holds whatever the memory held, here arbitrary values that differ between calls.
        send_list = torch.randint(-2**31, 2**31 - 1, (1, max(N, 1)), dtype=torch.int32, generator=_GARBAGE)
        send_list[0, :n] = tokens.to(torch.int32)
        route = (torch.tensor([0, n], dtype=torch.int32), send_list,
                 torch.where(routed, routed.cumsum(0) - 1, -1).to(torch.int32).reshape(N, 1),
                 torch.tensor([n], dtype=torch.int32), routed.reshape(N, 1).clone(), src.to(torch.int32))
        h = handle_from_route(route, serial=self.ctx.serial, device_id=-1, rank=0, num_ranks=1, hidden=x.shape[1],
                              num_experts=num_experts, num_topk=K)
        return self._gather(x, src), recv_idx, recv_w, [], h, None

    @staticmethod
    def _gather(x, src):
        out = torch.zeros(src.numel(), x.shape[1], dtype=x.dtype)
        ok = src >= 0
        out[ok] = x[src[ok]]
        return out

    def combine(self, x, handle, topk_weights=None):
        assert isinstance(handle, DispatchHandle) and handle.buffer_id == self.ctx.serial
        self.calls.append("combine")
        src = handle.recv_src_idx.long()
        ok = src >= 0
        N = handle.num_tokens
        out = torch.zeros(N, x.shape[1], dtype=torch.float32).index_add(0, src[ok], x[ok].float()).to(x.dtype)
        w = None
        if topk_weights is not None:
            w = torch.zeros(N, topk_weights.shape[1]).index_add(0, src[ok], topk_weights[ok])
        return out, w, None

    # ---- low-latency mode ------------------------------------------------------------------------
    def low_latency_dispatch(self, x, topk_idx, T, E, use_fp8=True, round_scale=False, use_ue8m0=False):
        assert not use_fp8, "the stand-in packs bf16 only"
        self.calls.append("low_latency_dispatch")
        sink = self.ctx.sink
        # The caller's slot (epcomm.torch_ops passes one), else the engine's alternation.
        slot = sink.slot if sink is not None and sink.slot is not None else \
            len([c for c in self.calls if c == "low_latency_dispatch"]) % 2
        key = (slot, T, x.shape[1], E)
        names = ("x", "count", "src_info", "layout_range", "src_k", "tok_rows", "tok_meta")
        if sink is not None:  # the caller's outputs, as the engine writes them
            arrays = {n: sink.outputs[n][0] for n in names}
        else:
            if key not in self._ll_results:  # per slot and shape, for the Buffer's life (as the engine)
                self._ll_results[key] = {n: torch.zeros(shape, dtype=getattr(torch, dt)) for n, (shape, dt) in
                                         result_specs(1, T, x.shape[1], E, False, False).items()}
            arrays = self._ll_results[key]
        rx, count, src_info, layout_range = (arrays[n] for n in names[:4])
        for e in range(E):
            tokens = (topk_idx == e).any(1).nonzero()[:, 0]
            c = tokens.numel()
            count[e] = c
            src_info[e, :c] = tokens.to(torch.int32)
            rx[e, :c] = x[tokens]
            layout_range[e, 0] = torch.tensor([0, c], dtype=torch.int32)
        refs = {("range" if n == "layout_range" else n): interop.as_tensor(arrays[n], n, device="cpu")
                for n in names[1:]}
        sizes = LowLatencyHandle(slot, self._ll_generation, "torch", T, x.shape[1], E, topk_idx.shape[1],
                                 topk_idx.shape[0], None, None)
        self._ll_generation += 1
        return rx, count, handle_over(self.ctx.serial, sizes, refs, sizes.generation), None, None

    def low_latency_combine(self, x, topk_idx, topk_weights, handle):
        self.calls.append("low_latency_combine")
        N, K = topk_idx.shape
        out = torch.zeros(N, x.shape[2])
        for t in range(N):
            for k in range(K):
                e = int(topk_idx[t, k])
                if e < 0:
                    continue
                c = int(handle.layout_range[e, 0, 1])
                row = int((handle.src_info[e, :c] == t).nonzero()[0, 0])
                out[t] += topk_weights[t, k] * x[e, row].float()
        out = out.to(torch.bfloat16)
        if self.ctx.sink is not None:
            self.ctx.sink.outputs["combined_x"][0].copy_(out)
        return out, None, None


def torch_ops_or_skip():
    """:mod:`epcomm.torch_ops`, or a skip of the calling test (or module, when called at its top)
    where this torch is older than it needs (the EpcommError its import raises then, and only
    then: any other error of the import fails the test)."""
    try:
        from epcomm import torch_ops
    except EpcommError as e:
        pytest.skip(str(e), allow_module_level=True)
    return torch_ops


def fake_mismatch(op, args) -> str:
    """'' if ``op``'s fake implementation gives the real call's outputs' shapes, dtypes and strides
    on ``args``, else what differs (opcheck's test_faketensor without copying the arguments)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    real = op(*args)
    with FakeTensorMode(allow_non_fake_inputs=False) as mode:
        fake = op(*(mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args))
    real, fake = ((t,) if isinstance(t, torch.Tensor) else tuple(t) for t in (real, fake))
    bad = [f"output {i}: real {r.dtype} {tuple(r.shape)} {r.stride()}, fake {f.dtype} {tuple(f.shape)} {f.stride()}"
           for i, (r, f) in enumerate(zip(real, fake))
           if (r.dtype, r.shape, r.stride()) != (f.dtype, f.shape, f.stride())]
    return "; ".join(bad)
