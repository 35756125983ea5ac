"""epcomm inside compiled JAX programs: dispatch and combine as functions of JAX arrays that work
eagerly, under ``jax.jit``, inside ``shard_map``, under ``lax.scan`` / ``lax.cond`` and in
``jax.grad``.

Each call is one XLA operation (``jax.experimental.buffer_callback``, JAX 0.6.1 or newer; tested with 0.10.2): when
the program runs, XLA hands epcomm its device buffers and CUDA stream, and the kernels run on
that stream writing into XLA's output buffers (no copy, no host round trip, no host read of
device memory).  By default the operation is ``command_buffer_compatible``: XLA may capture the
launches into the program's CUDA graph and replay them; the kernels keep their call tags in
device memory, so every replay is a new call that sees the routing of its inputs.

Shapes are fixed, as a compiler needs: the normal mode's outputs have ``num_worst_tokens`` rows
(padding rows: top-k index -1, source index -1, zero rows and weights); the low-latency mode's
are ``[E/R, R*T, H]`` as in :meth:`epcomm.Buffer.low_latency_dispatch`.  Handles are pytrees of
arrays (:class:`Handle`, :class:`LowLatencyHandle`) that flow through ``jit``, ``scan`` and
``grad``.  Normal-mode dispatch and combine (BF16) are differentiable: the backward of a dispatch
is a combine with its handle, that of a combine a cached dispatch (as :mod:`epcomm.torch_autograd`).

The :class:`epcomm.Buffer` is made outside ``jit`` (one per process, collectively) and passed as
a static argument (it hashes by identity).  A multi-process job with one GPU per process builds
it after ``jax.distributed.initialize()``, from JAX's own runtime::

    buf = epcomm.Buffer("jax", num_nvl_bytes, num_rdma_bytes, low_latency_mode=True,
                        device=jax.local_devices()[0].local_hardware_id)

(``group="jax"``: rank ``jax.process_index()`` of ``jax.process_count()``, handles exchanged
through JAX's distributed key-value store; see :mod:`epcomm.runtime.group`).  The expert axis of
the mesh is the process axis: inside ``shard_map`` over it, each process's block is its rank's
tokens.  Ranks must make the same calls in the same order, as eagerly; device errors (a timeout,
a bad index) are raised by the next eager epcomm call or ``Buffer.check()``.

To XLA the operations are pure (not ``has_side_effect``, which ``jax.checkpoint`` refuses): a
call whose results are unused is removed and two identical calls are merged, and calls with no
data dependence between them are ordered by XLA's schedule.  That is safe because every rank
compiles the same program, so every rank removes, merges and orders alike; it therefore takes:
no rank-dependent Python value deciding whether results are used (``jnp.where(rank == 0, y,
0)`` with a Python ``rank`` lets XLA drop the collective on the other ranks only, and rank 0
waits for them forever: use a traced value, e.g. ``lax.axis_index``); the same XLA flags on
every rank; and no concurrent command-buffer scheduling
(``--xla_gpu_command_buffer_scheduling_mode=CONCURRENT`` may run two independent calls of one
Buffer at once).  Calls of one Buffer from a compiled program and eager calls from the same
process are ordered only by the order their Python runs (``block_until_ready`` between them).

Not supported here: the normal mode across nodes, FP8 gradients, receive hooks, statistics
arguments, and the host index check (EPCOMM_CHECK_INDICES: a compiled call never reads device
memory on the host; the kernels still check the range and record it).
"""
from __future__ import annotations

from epcomm.buffer import Buffer
from epcomm.context import CallerOutputs
from epcomm.interop import jax_callback as jx
from epcomm.jax.args import check_buffer, check_ll_args, dispatch_specs, index_operand, ll_specs, operand, x_operands
from epcomm.jax.handles import (HANDLE_ARRAYS, LL_HANDLE_ARRAYS, Handle, LowLatencyHandle, engine_handle,
                                engine_ll_handle, handle_operands, ll_combine_operands, sizes_only)
from epcomm.normal.layout import LAYOUT_OUTPUTS, layout_specs
from epcomm.validate import check_bool, check_int

__all__ = ["Handle", "LowLatencyHandle", "dispatch", "combine", "low_latency_dispatch", "low_latency_combine",
           "get_dispatch_layout"]

_RUNNERS: dict = {}


def _runner(key: tuple, make):
    """The run function for ``key`` (``(kind, buffer, sizes...)``; made once: the same object lets
    JAX's caches hit).  A new one first drops those of destroyed Buffers, which would otherwise
    keep them alive (programs JAX compiled may still hold their callbacks)."""
    f = _RUNNERS.get(key)
    if f is None:
        dead = [k for k in _RUNNERS if k[1].ctx.destroyed]
        if dead:
            jx.forget([_RUNNERS.pop(k) for k in dead])
        f = _RUNNERS[key] = make()
    return f


# ---- normal mode -----------------------------------------------------------------------------
def get_dispatch_layout(buffer: Buffer, topk_idx, num_experts: int, *, command_buffer: bool = True):
    """Routing counts of this rank's tokens (as :meth:`epcomm.Buffer.get_dispatch_layout`).

    ``topk_idx``: int32 or int64 [N, K] (-1: none); ``num_experts``: E, a multiple of R.
    Returns ``(num_tokens_per_rank int32 [R], num_tokens_per_expert int32 [E], is_token_in_rank
    bool [N, R])``.  Raises TypeError/ValueError naming the argument at trace time."""
    check_buffer(buffer, "normal")
    E = check_int("num_experts", num_experts, lo=1)
    cmd = check_bool("command_buffer", command_buffer)
    tk = index_operand(topk_idx, "topk_idx")
    N = tk[1][0][0]
    outputs = layout_specs(N, buffer.num_ranks, E, 0)

    def make():
        def run(stream, ins, outs):
            with buffer.ctx.supplying(CallerOutputs(stream, outs)):
                buffer.get_dispatch_layout(ins[0], E)
        return run

    res = jx.call(_runner(("layout", buffer, E), make), [tk], outputs, buffer.device_id, command_buffer=cmd)
    return tuple(res[k] for k in LAYOUT_OUTPUTS if k in res)


def _dispatch_raw(buffer, E, M, cmd, x, topk_idx, topk_weights):
    """The dispatch operation: (recv_x, recv_topk_idx int32, recv_topk_weights or None, Handle)."""
    ops, fp8 = x_operands(x)
    N, H = ops[0][1][0]
    tk = index_operand(topk_idx, "topk_idx", rows=N)
    K = tk[1][0][1]
    ops.append(tk)
    if topk_weights is not None:
        ops.append(operand(topk_weights, "topk_weights", (N, K), "float32"))
    has_w = topk_weights is not None
    outputs = dispatch_specs(buffer, N, H, E, K, M, fp8, has_w)

    def make():
        def run(stream, ins, outs):
            xa = (ins[0], ins[1]) if fp8 else ins[0]
            rest = ins[2:] if fp8 else ins[1:]
            with buffer.ctx.supplying(CallerOutputs(stream, outs)):
                buffer.dispatch(xa, topk_idx=rest[0], topk_weights=rest[1] if has_w else None, num_experts=E,
                                num_worst_tokens=M)
        return run

    res = jx.call(_runner(("dispatch", buffer, E, M, fp8, has_w), make), ops, outputs, buffer.device_id,
                  command_buffer=cmd)
    keep = res["recv_src_idx"] >= 0
    recv_x = (res["recv_x"], res["recv_scales"]) if fp8 else jx.zero_rows(res["recv_x"], keep)
    recv_w = jx.zero_rows(res["recv_topk_weights"], keep) if has_w else None
    h = Handle(*(res[k] for k in HANDLE_ARRAYS), buffer.ctx.serial, N, H, E, K, M)
    return recv_x, jx.low_words(res["recv_topk_idx"]), recv_w, h


def _combine_raw(buffer, cmd, x, h: Handle, topk_weights=None):
    """The combine operation: (combined_x bf16 [N, H], combined weights float32 [N, K] or None)."""
    M, H, N, K = h.num_worst_tokens, h.hidden, h.num_tokens, h.num_topk
    ops = [operand(x, "x", (M, H), "bfloat16")] + handle_operands(buffer, h)
    hs = sizes_only(h)
    has_w = topk_weights is not None
    if has_w:
        ops.append(operand(topk_weights, "topk_weights", (M, K), "float32"))
    outputs = {"combined_x": ((N, H), "bfloat16")}
    if has_w:
        outputs["combined_topk_weights"] = ((N, K), "float32")

    def make():
        def run(stream, ins, outs):
            eh = engine_handle(buffer, hs, dict(zip(HANDLE_ARRAYS, ins[1:7])))
            with buffer.ctx.supplying(CallerOutputs(stream, outs)):
                buffer.combine(ins[0], eh, topk_weights=ins[7] if has_w else None)
        return run

    res = jx.call(_runner(("combine", buffer, h.num_tokens, H, h.num_experts, K, M, has_w), make), ops, outputs,
                  buffer.device_id, command_buffer=cmd)
    return res["combined_x"], res.get("combined_topk_weights")


def _cached_dispatch_raw(buffer, cmd, g, h: Handle):
    """A cached dispatch of bf16 ``g`` [N, H] along ``h``'s route: [M, H], padding rows zero."""
    M, H, N = h.num_worst_tokens, h.hidden, h.num_tokens
    ops = [operand(g, "x", (N, H), "bfloat16")] + handle_operands(buffer, h)
    hs = sizes_only(h)
    outputs = {"recv_x": ((M, H), "bfloat16")}

    def make():
        def run(stream, ins, outs):
            eh = engine_handle(buffer, hs, dict(zip(HANDLE_ARRAYS, ins[1:7])))
            with buffer.ctx.supplying(CallerOutputs(stream, outs)):
                buffer.dispatch(ins[0], handle=eh)
        return run

    res = jx.call(_runner(("cached", buffer, N, H, h.num_experts, h.num_topk, M), make), ops, outputs,
                  buffer.device_id, command_buffer=cmd)
    return jx.zero_rows(res["recv_x"], h.recv_src_idx >= 0)


def _dispatch_fwd(buffer, E, M, cmd, x, topk_idx, topk_weights):
    out = _dispatch_raw(buffer, E, M, cmd, x, topk_idx, topk_weights)
    return out, (out[3], out[1])


def _dispatch_bwd(buffer, E, M, cmd, res, cts):
    h, recv_idx = res
    g_x, _, g_w, _ = cts
    if g_w is not None:
        # Padding entries (index -1) were zeros, not copies of a weight.
        g_w = jx.zero_rows(g_w.reshape(-1), recv_idx.reshape(-1) >= 0).reshape(g_w.shape)
    gx, gw = _combine_raw(buffer, cmd, g_x, h, g_w)
    return gx, None, gw


def _combine_fwd(buffer, cmd, x, h):
    return _combine_raw(buffer, cmd, x, h)[0], h


def _combine_bwd(buffer, cmd, h, g):
    return _cached_dispatch_raw(buffer, cmd, g, h), None


_dispatch_vjp = jx.with_vjp(lambda b, E, M, c, x, t, w: _dispatch_raw(b, E, M, c, x, t, w), _dispatch_fwd,
                            _dispatch_bwd, (0, 1, 2, 3))
_dispatch_fp8 = jx.forward_only(lambda b, E, M, c, x, t, w: _dispatch_raw(b, E, M, c, x, t, w),
                                "epcomm.jax.dispatch of an FP8 x", (0, 1, 2, 3))
_combine_vjp = jx.with_vjp(lambda b, c, x, h: _combine_raw(b, c, x, h)[0], _combine_fwd, _combine_bwd, (0, 1))


def dispatch(buffer: Buffer, x, topk_idx, topk_weights=None, *, num_experts: int, num_worst_tokens: int,
             command_buffer: bool = True):
    """Normal-mode dispatch with fixed output rows (as :meth:`epcomm.Buffer.dispatch` with
    ``num_worst_tokens``): every token goes once to each rank holding one of its experts.

    Args:
        buffer: an :class:`epcomm.Buffer` with an NVLink buffer (``num_nvl_bytes > 0``), one node.
        x: bf16 [N, H] (differentiable), or an FP8 pair (float8_e4m3fn [N, H], float32 scales
           [N, H/128]) (not differentiable).
        topk_idx: int32 or int64 [N, K], -1 = none; topk_weights: None or float32 [N, K]
           (differentiable).
        num_experts: E, a multiple of R.  num_worst_tokens: M >= 1, the rows of every output
           (at most N * R arrive; fewer rows than arrive is an error the kernels record).
        command_buffer: mark the operation command_buffer_compatible (default).

    Returns ``(recv_x, recv_topk_idx int32 [M, K], recv_topk_weights float32 [M, K] or None,
    handle)``; ``recv_x`` in the form of ``x`` with M rows, rows by source rank then token,
    padding rows zero (BF16) with index -1 and weight 0.  Raises TypeError/ValueError naming the
    argument at trace time."""
    check_buffer(buffer, "normal")
    E = check_int("num_experts", num_experts, lo=1)
    M = check_int("num_worst_tokens", num_worst_tokens, lo=1)
    cmd = check_bool("command_buffer", command_buffer)
    if isinstance(x, (tuple, list)):
        return _dispatch_fp8(buffer, E, M, cmd, tuple(x), topk_idx, topk_weights)
    return _dispatch_vjp(buffer, E, M, cmd, x, topk_idx, topk_weights)


def combine(buffer: Buffer, x, handle: Handle, *, command_buffer: bool = True):
    """Reverse a :func:`dispatch`: every token gets the unweighted sum of its rows' ``x``
    (bf16 [M, H], padding rows ignored), as :meth:`epcomm.Buffer.combine`.  Returns bf16 [N, H];
    differentiable in ``x`` (its gradient: a dispatch of the output's gradient along the same
    route, padding rows zero)."""
    check_buffer(buffer, "normal")
    cmd = check_bool("command_buffer", command_buffer)
    handle_operands(buffer, handle)  # TypeError / ValueError before anything is traced
    return _combine_vjp(buffer, cmd, x, handle)


# ---- low-latency mode ------------------------------------------------------------------------
def low_latency_dispatch(buffer: Buffer, x, topk_idx, *, num_max_dispatch_tokens_per_rank: int, num_experts: int,
                         use_fp8: bool = True, round_scale: bool = False, use_ue8m0: bool = False, slot: int = 0,
                         command_buffer: bool = True):
    """Low-latency dispatch (as :meth:`epcomm.Buffer.low_latency_dispatch`), forward only.

    ``x`` bf16 [N, H] with N <= T (``num_max_dispatch_tokens_per_rank``); ``topk_idx`` int32 or
    int64 [N, K]; ``slot``: 0 or 1, the buffer slot (two dispatches in flight, e.g. two
    micro-batches, take different slots; a combine must follow the latest dispatch of its slot).
    Returns ``(recv_x, recv_count int32 [L], handle)``: ``recv_x`` bf16 [L, R*T, H], or with FP8
    ``(e4m3 [L, R*T, H], scales float32 [L, R*T, H/128])`` (UE8M0: int32 [L, R*T, ceil(H/512)]).
    Raises TypeError/ValueError naming the argument at trace time."""
    check_buffer(buffer, "low_latency")
    a = check_ll_args(buffer, x, topk_idx, num_max_dispatch_tokens_per_rank, num_experts, use_fp8, round_scale,
                      use_ue8m0, slot, command_buffer)
    return _ll_dispatch(buffer, a.T, a.E, a.fp8, a.round_scale, a.ue8m0, a.slot, a.cmd, x, topk_idx)


def _ll_dispatch_raw(buffer, T, E, fp8, rs, ue, sl, cmd, x, topk_idx):
    """The low-latency dispatch operation (arguments checked by low_latency_dispatch)."""
    a = check_ll_args(buffer, x, topk_idx, T, E, fp8, rs, ue, sl, cmd)
    outputs = ll_specs(buffer, T, a.H, E, fp8, ue)

    def make():
        def run(stream, ins, outs):
            with buffer.ctx.supplying(CallerOutputs(stream, outs, slot=sl)):
                buffer.low_latency_dispatch(ins[0], ins[1], T, E, use_fp8=fp8, round_scale=rs, use_ue8m0=ue)
        return run

    res = jx.call(_runner(("ll_dispatch", buffer, T, E, fp8, rs, ue, sl), make), [a.x, a.topk], outputs,
                  buffer.device_id, command_buffer=cmd)
    recv_x = (res["x"], jx.swap_last_two(res["scales"])) if fp8 else res["x"]
    h = LowLatencyHandle(*(res[k] for k in LL_HANDLE_ARRAYS), buffer.ctx.serial, sl, T, a.H, E, a.K, a.N)
    return recv_x, res["count"], h


_ll_dispatch = jx.forward_only(_ll_dispatch_raw, "epcomm.jax.low_latency_dispatch", tuple(range(8)))


def low_latency_combine(buffer: Buffer, x, topk_idx, topk_weights, handle: LowLatencyHandle, *,
                        command_buffer: bool = True):
    """Low-latency combine (as :meth:`epcomm.Buffer.low_latency_combine`), forward only: every
    token gets the weighted sum of its experts' rows.  ``x`` bf16 [L, R*T, H]; ``topk_idx`` and
    ``topk_weights`` (float32) [N, K], the dispatch's.  Returns bf16 [N, H]."""
    check_buffer(buffer, "low_latency")
    cmd = check_bool("command_buffer", command_buffer)
    ll_combine_operands(buffer, handle, x, topk_idx, topk_weights)  # errors before anything is traced
    return _ll_combine(buffer, cmd, x, topk_idx, topk_weights, handle)


def _ll_combine_raw(buffer, cmd, x, topk_idx, topk_weights, handle):
    """The low-latency combine operation (arguments checked by low_latency_combine)."""
    ops = ll_combine_operands(buffer, handle, x, topk_idx, topk_weights)
    outputs = {"combined_x": ((handle.num_tokens, handle.hidden), "bfloat16")}
    h = sizes_only(handle)

    def make():
        def run(stream, ins, outs):
            eh = engine_ll_handle(buffer, h, dict(zip(LL_HANDLE_ARRAYS, ins[3:])))
            with buffer.ctx.supplying(CallerOutputs(stream, outs, slot=h.slot)):
                buffer.low_latency_combine(ins[0], ins[1], ins[2], eh)
        return run

    key = ("ll_combine", buffer, h.slot, h.num_max_tokens, h.hidden, h.num_experts, h.num_topk, h.num_tokens)
    return jx.call(_runner(key, make), ops, outputs, buffer.device_id, command_buffer=cmd)["combined_x"]


_ll_combine = jx.forward_only(_ll_combine_raw, "epcomm.jax.low_latency_combine", (0, 1))
