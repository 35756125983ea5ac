"""The low-latency dispatch and combine as torch custom operations (namespace ``epcomm``), with
fake implementations.  Their shapes are fixed by the call (``[E/R, R*T, H]``), so a compiled
program needs nothing else.  Each call's results are new tensors the operation allocates and the
kernels write into (the engine's caller-supplied outputs, :meth:`epcomm.context.CommContext.supplying`),
not views of the Buffer's storage: a compiled program owns its operations' outputs and may place
other tensors in their memory once they are dead (Inductor does), which must not be memory the
next dispatch writes.  Every array the dispatch writes is an output, and the combine takes every
one its kernel reads (count, src_info, layout_range, src_k, tok_rows, tok_meta), so none is
reused before it and none outlives the program's use (a CUDA graph tree requires that of every
tensor made in its pool); :mod:`epcomm.torch_ops.registry` keeps only the handle's sizes.

The buffer slot is the dispatch's argument, and the combine takes its dispatch's, never the
engine's alternation: a CUDA graph replay runs no Python, so its calls keep the slots of the
capture while the alternation stands still, and where one rank replays a call that another runs
in Python (a shape recorded on one rank only, e.g. a token count of its own), the two could take
different slots and each wait for messages the other never sends.

Both take the order token last (:mod:`epcomm.torch_ops.order`; None in eager calls).  No autograd
(the low-latency mode serves inference).  Registered when this module is imported.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from epcomm import interop
from epcomm.context import CallerOutputs
from epcomm.low_latency.handle import result_specs
from epcomm.torch_ops.registry import lookup, low_latency_handle, remember_low_latency_handle
from epcomm.validate import check_int


def _supplying(buf, x: Tensor, outputs: dict, slot: int):
    """The Buffer's calls inside write into ``outputs`` (name -> (tensor, TensorRef)) on the
    current stream of ``x``'s device, in buffer slot ``slot``."""
    dev = x.device
    stream = torch.cuda.current_stream(dev).cuda_stream if dev.type == "cuda" else 0
    return buf.ctx.supplying(CallerOutputs(stream, outputs, slot=slot))


def _new(x: Tensor, shape, dtype: str):
    """A new (tensor, TensorRef) on ``x``'s device."""
    return interop.empty("torch", tuple(shape), dtype, x.device.type, x.device.index or 0)


@torch.library.custom_op("epcomm::low_latency_dispatch", mutates_args=())
def low_latency_dispatch_op(x: Tensor, topk_idx: Tensor, buffer_id: int, num_ranks: int,
                            num_max_dispatch_tokens_per_rank: int, num_experts: int, use_fp8: bool,
                            round_scale: bool, use_ue8m0: bool, slot: int = 0, order: Optional[Tensor] = None
                            ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """:meth:`epcomm.Buffer.low_latency_dispatch`: (recv_x [L, R*T, H] bf16 or e4m3, its scales
    (float32 [L, R*T, H/128], int32 [L, R*T, ceil(H/512)] with UE8M0, both column-major in the
    last two dims; float32 [L, R*T, 0] without FP8), recv_count int32 [L], src_info int32
    [L, R*T], layout_range int32 [L, R, 2], then what only the combine reads: src_k int32
    [L, R*T], tok_rows int32 [R*T, 32], tok_meta int64 [R*T]), L = E / R.  Every array the
    dispatch writes is an output (none is kept here).  ``slot``: the buffer slot, 0 or 1."""
    buf = lookup(buffer_id)
    if buf.num_ranks != num_ranks:
        raise ValueError(f"num_ranks={num_ranks}: the Buffer has {buf.num_ranks} ranks")
    slot = check_int("slot", slot, lo=0, hi=1)
    T, E = num_max_dispatch_tokens_per_rank, num_experts
    specs = result_specs(num_ranks, T, x.shape[1], E, use_fp8, use_ue8m0)
    outs = {name: _new(x, shape, dtype) for name, (shape, dtype) in specs.items()}
    with _supplying(buf, x, outs, slot):
        _, _, handle, _, _ = buf.low_latency_dispatch(x, topk_idx, T, E, use_fp8=use_fp8, round_scale=round_scale,
                                                      use_ue8m0=use_ue8m0)
    remember_low_latency_handle(buf, handle)
    return _returned(x, {name: pair[0] for name, pair in outs.items()})


def _returned(x: Tensor, o: dict) -> tuple:
    """The dispatch operation's outputs of the arrays ``o`` (name -> tensor, as result_specs
    names and shapes them): FP8 scales stored [L, groups, R*T] are returned column-major
    ([L, R*T, groups]); without FP8, an empty float32 [L, R*T, 0] stands for them."""
    rx = o["x"]
    scales = o["scales"].transpose(1, 2) if "scales" in o else x.new_empty((*rx.shape[:2], 0), dtype=torch.float32)
    return (rx, scales, *(o[n] for n in ("count", "src_info", "layout_range", "src_k", "tok_rows", "tok_meta")))


@low_latency_dispatch_op.register_fake
def _low_latency_dispatch_fake(x, topk_idx, buffer_id, num_ranks, num_max_dispatch_tokens_per_rank, num_experts,
                               use_fp8, round_scale, use_ue8m0, slot=0, order=None):
    specs = result_specs(num_ranks, num_max_dispatch_tokens_per_rank, x.shape[1], num_experts, use_fp8, use_ue8m0)
    return _returned(x, {n: x.new_empty(shape, dtype=getattr(torch, dt)) for n, (shape, dt) in specs.items()})


@torch.library.custom_op("epcomm::low_latency_combine", mutates_args=())
def low_latency_combine_op(x: Tensor, topk_idx: Tensor, topk_weights: Tensor, count: Tensor, src_info: Tensor,
                           layout_range: Tensor, src_k: Tensor, tok_rows: Tensor, tok_meta: Tensor, buffer_id: int,
                           order: Optional[Tensor] = None) -> Tensor:
    """:meth:`epcomm.Buffer.low_latency_combine` of the dispatch that returned ``count`` ..
    ``tok_meta`` (the kernel reads them all), in that dispatch's slot: combined bf16 [N, H]."""
    buf = lookup(buffer_id)
    handle = low_latency_handle(buf, dict(count=count, range=layout_range, src_info=src_info, src_k=src_k,
                                          tok_rows=tok_rows, tok_meta=tok_meta))
    out = _new(x, (topk_idx.shape[0], x.shape[2]), "bfloat16")
    with _supplying(buf, x, {"combined_x": out}, handle.slot):
        buf.low_latency_combine(x, topk_idx, topk_weights, handle)
    return out[0]


@low_latency_combine_op.register_fake
def _low_latency_combine_fake(x, topk_idx, topk_weights, count, src_info, layout_range, src_k, tok_rows, tok_meta,
                              buffer_id, order=None):
    return x.new_empty((topk_idx.shape[0], x.shape[2]))
