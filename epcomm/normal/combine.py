"""Normal-mode combine: the inverse route of a dispatch; every token gets the unweighted fp32 sum
of the rows that came from it (ascending rank order, then the biases; with the Buffer's
numerics="deepep" the biases first), written as bf16."""
from __future__ import annotations

from dataclasses import dataclass

from epcomm import interop
from epcomm.errors import BufferStateError
from epcomm.jit import loader
from epcomm.kernels import intranode as K_intra
from epcomm.normal.handle import check_handle, ptr
from epcomm.runtime import driver
from epcomm.runtime.event import check_event


def check_weights(ctx, topk_weights, handle, fw: str):
    """topk_weights: None or float32 [rows, handle.num_topk]."""
    wr = ctx.tensor(topk_weights, "topk_weights", dtype="float32", ndim=2, shape=(handle.out_rows, None),
                    allow_none=True, framework=fw)
    # The combine row carries K weights; the dispatch checked the buffer's capacity (and every
    # rank agreed) for its own K only, so any other width could overrun a peer's staging region.
    if wr is not None and wr.shape[1] != handle.num_topk:
        Kt = wr.shape[1]
        if handle.num_topk == 0:
            raise ValueError(f"topk_weights: has {Kt} columns but the dispatch had no top-k "
                             f"(handle.num_topk=0): pass None")
        raise ValueError(f"topk_weights: has {Kt} columns but the dispatch's top-k width is "
                         f"handle.num_topk={handle.num_topk}; pass [rows, {handle.num_topk}]")
    return wr


def check_biases(ctx, bias, N: int, H: int, fw: str) -> list:
    """bias: None, one bf16 [N, H] array or a pair (either may be None)."""
    biases = []
    if bias is None:
        return biases
    blist = list(bias) if isinstance(bias, (tuple, list)) else [bias]
    if len(blist) > 2:
        raise ValueError(f"bias: at most two tensors, got {len(blist)}")
    for i, b in enumerate(blist):
        if b is not None:  # DeepEP's pair may hold None in either place
            biases.append(ctx.tensor(b, f"bias[{i}]", dtype="bfloat16", ndim=2, shape=(N, H), framework=fw))
    return biases


@dataclass(slots=True)
class CombineArgs:
    """One combine's checked arguments: x, its framework, the weights (and their width Kt, 0
    without), the biases (0 to 2 TensorRefs) and the call's Config."""
    xr: object
    fw: str
    wr: object
    Kt: int
    biases: list
    cfg: object


def check_combine_args(ctx, default_config, x, handle, topk_weights, bias, config, previous_event,
                       check_kind=None) -> CombineArgs:
    """Every argument of a combine checked (TypeError / ValueError), before anything launches:
    ``previous_event``, the handle (of this Buffer; then ``check_kind(handle)`` for an engine's
    own handle type), x bf16 [handle.out_rows, H], the weights, the biases, the config."""
    check_event(previous_event)
    check_handle(handle, ctx.serial)
    if check_kind is not None:
        check_kind(handle)
    H, N = handle.hidden, handle.num_tokens
    xr = ctx.tensor(x, "x", dtype="bfloat16", ndim=2, shape=(handle.out_rows, H))
    fw = xr.framework
    wr = check_weights(ctx, topk_weights, handle, fw)
    return CombineArgs(xr, fw, wr, wr.shape[1] if wr is not None else 0, check_biases(ctx, bias, N, H, fw),
                       ctx.call_config(config, default_config, "combine"))


def _check_capacity(ctx, st, handle, Kt: int) -> int:
    """The call's chunk rows; ValueError where the handle's counts exceed the buffer."""
    lay, H, R = st.layout, handle.hidden, ctx.num_ranks
    cap = lay.capacity_rows(K_intra.combine_row_bytes(H, Kt))
    # Rows sent to one source rank <= that rank's dispatched tokens, which its dispatch checked
    # against capacity_rows(max_row_bytes(H, K)) of the same layout (equal on every rank), and
    # max_row_bytes >= combine_row_bytes: this holds in the num_worst_tokens mode too, where the
    # counts are unknown here.  The check below repeats it where they are known.
    if handle.recv_counts is not None and max(handle.recv_counts, default=0) > cap:
        raise ValueError(f"Buffer too small for this combine: {max(handle.recv_counts)} rows from one rank, "
                         f"capacity {cap}; need num_nvl_bytes >= "
                         f"{K_intra.nvl_buffer_size_hint(H, R, max(handle.recv_counts), Kt)}")
    return -(-lay.capacity_rows(K_intra.max_row_bytes(H, Kt)) // K_intra.MAX_CHUNKS)


def combine(ctx, st, default_config, x, handle, topk_weights=None, bias=None, config=None, previous_event=None,
            async_finish: bool = False, allocate_on_comm_stream: bool = False):
    """See :meth:`epcomm.Buffer.combine` (``ctx``: the Buffer's CommContext, ``st``: its
    NvlinkState or None, ``default_config``: its combine Config)."""
    ctx.check_usable("combine", collective=True)  # first: destroy() also drops the NVLink state
    if st is None:
        raise BufferStateError("combine needs a Buffer created with num_nvl_bytes > 0")
    c = check_combine_args(ctx, default_config, x, handle, topk_weights, bias, config, previous_event)
    xr, fw, wr, Kt, biases, cfg = c.xr, c.fw, c.wr, c.Kt, c.biases, c.cfg
    H, N = handle.hidden, handle.num_tokens
    S, Rv = cfg.split()
    chunk_rows = max(cfg.chunk_rows, _check_capacity(ctx, st, handle, Kt))
    spec = K_intra.IntranodeCombineSpec(ctx.num_ranks, H, deepep=ctx.numerics == "deepep")
    async_finish = ctx.call_flags(async_finish, allocate_on_comm_stream)
    with driver.on_device(ctx.device_id):
        mod = loader.load(spec, ctx.device_id)
        caller, cap = ctx.begin(fw, previous_event)
        out = ctx.empty(fw, (N, H), "bfloat16", name="combined_x")
        outw = ctx.empty(fw, (N, Kt), "float32", name="combined_topk_weights") if wr is not None else None
        p = st.params(ctx.kernel_timeout_s(spec))
        refs = handle.refs
        p.x = xr.ptr
        p.topk_weights = ptr(wr)
        p.send_pos, p.rank_prefix = refs["send_pos"].ptr, refs["rank_prefix"].ptr
        p.out = out[1].ptr
        p.out_weights = outw[1].ptr if outw else 0
        p.bias0 = biases[0].ptr if len(biases) > 0 else 0
        p.bias1 = biases[1].ptr if len(biases) > 1 else 0
        p.num_tokens, p.num_topk, p.num_experts = N, Kt, handle.num_experts
        p.chunk_rows, p.row_bytes = chunk_rows, K_intra.combine_row_bytes(H, Kt)
        p.num_send_blocks = S
        K_intra.launch_combine(mod, ctx.stream, p, S + Rv)
        outs = [out[0]] + ([outw[0]] if outw else [])
        ev = ctx.finish(fw, caller, async_finish, outs,
                        [xr.obj, wr.obj if wr else None, handle.send_pos, handle.rank_prefix]
                        + [b.obj for b in biases], cap)
    return (interop.finish(fw, out[0], ctx.stream),
            (interop.finish(fw, outw[0], ctx.stream) if outw else None), ev)
