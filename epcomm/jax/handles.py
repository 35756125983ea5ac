"""The handles of :mod:`epcomm.jax` (pytrees: arrays traced, sizes static), their arrays as
operands of a later call, and the engines' handles made over a program's buffers."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from epcomm.buffer import Buffer
from epcomm.interop import jax_callback as jx
from epcomm.jax.args import index_operand, ll_specs, operand
from epcomm.low_latency.handle import LowLatencyHandle as EngineLLHandle, handle_over
from epcomm.normal.shapes import route_specs
from epcomm.normal.handle import ROUTE_FIELDS, DispatchHandle

# The arrays of a normal-mode handle (the engine's route: the send plan, the layout's
# is_token_in_rank and the source token of every received row, -1: padding).
HANDLE_ARRAYS = ROUTE_FIELDS
# Those of a low-latency handle (the engine's slot results the combine reads).
LL_HANDLE_ARRAYS = ("count", "src_info", "layout_range", "src_k", "tok_rows", "tok_meta")


@dataclass(frozen=True)
class Handle:
    """A normal-mode dispatch's route (a pytree: the arrays traced, the sizes static).  Arrays:
    ``rank_prefix`` int32 [R+1], ``send_list`` int32 [R, max(N, 1)], ``send_pos`` int32 [N, R],
    ``send_count`` int32 [R], ``is_token_in_rank`` bool [N, R], ``recv_src_idx`` int32 [M] (source
    token of each received row, -1 for padding).  Sizes: the Buffer's serial, N, H, E, K, M."""
    rank_prefix: object
    send_list: object
    send_pos: object
    send_count: object
    is_token_in_rank: object
    recv_src_idx: object
    buffer_serial: int
    num_tokens: int
    hidden: int
    num_experts: int
    num_topk: int
    num_worst_tokens: int


@dataclass(frozen=True)
class LowLatencyHandle:
    """A low-latency dispatch's route (a pytree).  Arrays: ``count`` int32 [L], ``src_info`` and
    ``src_k`` int32 [L, R*T], ``layout_range`` int32 [L, R, 2], ``tok_rows`` int32 [R*T, 32],
    ``tok_meta`` int64 [R*T] as int32 pairs [R*T, 2].  Sizes: the Buffer's serial, the slot, T, H,
    E, K, N."""
    count: object
    src_info: object
    layout_range: object
    src_k: object
    tok_rows: object
    tok_meta: object
    buffer_serial: int
    slot: int
    num_max_tokens: int
    hidden: int
    num_experts: int
    num_topk: int
    num_tokens: int


jx.register_pytree(Handle, list(HANDLE_ARRAYS), [f.name for f in dataclasses.fields(Handle)][6:])
jx.register_pytree(LowLatencyHandle, list(LL_HANDLE_ARRAYS), [f.name for f in dataclasses.fields(LowLatencyHandle)][6:])


def sizes_only(h):
    """``h`` without its arrays (what a memoised run function may keep: no tracer)."""
    return dataclasses.replace(h, **{f.name: None for f in dataclasses.fields(h)[:6]})


def _check(buffer: Buffer, h, cls) -> None:
    if not isinstance(h, cls):
        raise TypeError(f"handle: expected an epcomm.jax.{cls.__name__}, got {type(h).__name__}")
    if h.buffer_serial != buffer.ctx.serial:
        raise ValueError("handle: was made by another Buffer")


def handle_operands(buffer: Buffer, h) -> list:
    """(array, spec) of a normal-mode handle's arrays, checked to be the Buffer's and sized."""
    _check(buffer, h, Handle)
    R, N = buffer.num_ranks, h.num_tokens
    spec = dict(route_specs(N, R), is_token_in_rank=((N, R), "bool"), recv_src_idx=((h.num_worst_tokens,), "int32"))
    return [operand(getattr(h, k), f"handle.{k}", *spec[k]) for k in HANDLE_ARRAYS]


def ll_handle_operands(buffer: Buffer, h) -> list:
    """(array, spec) of a low-latency handle's arrays (tok_meta: int64 in int32 pairs)."""
    _check(buffer, h, LowLatencyHandle)
    spec = ll_specs(buffer, h.num_max_tokens, h.hidden, h.num_experts)
    out = [operand(getattr(h, k), f"handle.{k}", *spec[k]) for k in LL_HANDLE_ARRAYS[:-1]]
    shape, _ = spec["tok_meta"]
    tm = operand(h.tok_meta, "handle.tok_meta", shape + (2,), "int32")[0]
    return out + [(tm, (shape, "int64"))]


def engine_handle(buffer: Buffer, h: Handle, args: dict) -> DispatchHandle:
    """The engine's DispatchHandle over a program's handle buffers (XlaArgs by name)."""
    M = h.num_worst_tokens
    return DispatchHandle(
        buffer_id=buffer.ctx.serial, framework="xla", device_id=buffer.device_id, num_ranks=buffer.num_ranks,
        rank=buffer.rank, num_tokens=h.num_tokens, hidden=h.hidden, num_experts=h.num_experts,
        num_topk=h.num_topk, num_worst_tokens=M, out_rows=M, num_recv_tokens=None, recv_counts=None,
        refs={k: a.ref for k, a in args.items()}, **{k: args[k] for k in ROUTE_FIELDS})


def engine_ll_handle(buffer: Buffer, h: LowLatencyHandle, args: dict) -> EngineLLHandle:
    """The engine's LowLatencyHandle over a program's handle buffers (XlaArgs by name); no
    generation: the kernels' tags in device memory order the combine after its dispatch."""
    refs = {("range" if k == "layout_range" else k): a.ref for k, a in args.items()}
    sizes = EngineLLHandle(h.slot, None, "xla", h.num_max_tokens, h.hidden, h.num_experts, h.num_topk, h.num_tokens,
                           None, None)
    return handle_over(buffer._ll.serial, sizes, refs, None)


def ll_combine_operands(buffer: Buffer, h, x, topk_idx, topk_weights) -> list:
    """The operands of a low-latency combine: x bf16 [L, R*T, H], topk_idx and topk_weights
    [N, K] (the dispatch's), then the handle's arrays."""
    _check(buffer, h, LowLatencyHandle)
    R = buffer.num_ranks
    L, RT, N, K = h.num_experts // R, R * h.num_max_tokens, h.num_tokens, h.num_topk
    return ([operand(x, "x", (L, RT, h.hidden), "bfloat16"), index_operand(topk_idx, "topk_idx", N, K),
             operand(topk_weights, "topk_weights", (N, K), "float32")] + ll_handle_operands(buffer, h))
