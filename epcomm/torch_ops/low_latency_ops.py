"""The low-latency dispatch and combine as torch custom operations (namespace ``epcomm``), with
fake implementations.  Their shapes are fixed by the call (``[E/R, R*T, H]``), so a compiled
program needs nothing else; the dispatch's results are views of the Buffer's double-buffered
storage, as in eager calls (valid until the second next dispatch), and the handle travels as the
``src_info`` tensor (:mod:`epcomm.torch_ops.registry`).  No autograd (the low-latency mode
serves inference).  Registered when this module is imported.
"""
from __future__ import annotations

import torch
from torch import Tensor

from epcomm.torch_ops.registry import lookup, low_latency_handle, remember_low_latency_handle


def _fresh(t: Tensor) -> Tensor:
    """A new tensor object on ``t``'s memory: the engine hands out the same view objects at every
    call, and each output of an operation carries its own autograd and tracing state."""
    return torch.ops.aten.alias.default(t)


@torch.library.custom_op("epcomm::low_latency_dispatch", mutates_args=())
def low_latency_dispatch_op(x: Tensor, topk_idx: Tensor, buffer_id: int, num_ranks: int,
                            num_max_dispatch_tokens_per_rank: int, num_experts: int, use_fp8: bool,
                            round_scale: bool, use_ue8m0: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """:meth:`epcomm.Buffer.low_latency_dispatch`: (recv_x [L, R*T, H] bf16 or e4m3, its scales
    (float32 [L, R*T, H/128], int32 [L, R*T, ceil(H/512)] with UE8M0, both column-major in the
    last two dims; float32 [L, R*T, 0] without FP8), recv_count int32 [L], src_info int32
    [L, R*T], layout_range int32 [L, R, 2]), L = E / R."""
    buf = lookup(buffer_id)
    if buf.num_ranks != num_ranks:
        raise ValueError(f"num_ranks={num_ranks}: the Buffer has {buf.num_ranks} ranks")
    recv_x, count, handle, _, _ = buf.low_latency_dispatch(
        x, topk_idx, num_max_dispatch_tokens_per_rank, num_experts, use_fp8=use_fp8, round_scale=round_scale,
        use_ue8m0=use_ue8m0)
    remember_low_latency_handle(buf, handle)
    if use_fp8:
        recv_x, scales = recv_x
    else:
        scales = recv_x.new_empty((recv_x.shape[0], recv_x.shape[1], 0), dtype=torch.float32)
    return (_fresh(recv_x), _fresh(scales), _fresh(count), _fresh(handle.src_info), _fresh(handle.layout_range))


@low_latency_dispatch_op.register_fake
def _low_latency_dispatch_fake(x, topk_idx, buffer_id, num_ranks, num_max_dispatch_tokens_per_rank, num_experts,
                               use_fp8, round_scale, use_ue8m0):
    R, H = num_ranks, x.shape[1]
    L, RT = num_experts // R, R * num_max_dispatch_tokens_per_rank
    i32 = torch.int32
    if use_fp8:
        recv_x = x.new_empty((L, RT, H), dtype=torch.float8_e4m3fn)
        # Stored [L, groups, R*T]: the caller sees the last two dims swapped (column-major).
        groups, dt = ((H // 128 + 3) // 4, i32) if use_ue8m0 else (H // 128, torch.float32)
        scales = x.new_empty((L, groups, RT), dtype=dt).transpose(1, 2)
    else:
        recv_x = x.new_empty((L, RT, H))
        scales = x.new_empty((L, RT, 0), dtype=torch.float32)
    return (recv_x, scales, x.new_empty((L,), dtype=i32), x.new_empty((L, RT), dtype=i32),
            x.new_empty((L, R, 2), dtype=i32))


@torch.library.custom_op("epcomm::low_latency_combine", mutates_args=())
def low_latency_combine_op(x: Tensor, topk_idx: Tensor, topk_weights: Tensor, src_info: Tensor,
                           buffer_id: int) -> Tensor:
    """:meth:`epcomm.Buffer.low_latency_combine` of the dispatch that returned ``src_info``:
    combined bf16 [N, H]."""
    buf = lookup(buffer_id)
    return buf.low_latency_combine(x, topk_idx, topk_weights, low_latency_handle(buf, src_info))[0]


@low_latency_combine_op.register_fake
def _low_latency_combine_fake(x, topk_idx, topk_weights, src_info, buffer_id):
    return x.new_empty((topk_idx.shape[0], x.shape[2]))
