"""A normal-mode dispatch's arguments, every one checked (TypeError / ValueError) before anything
launches: the input rows, and either a cached dispatch's handle or the routing arrays.  The
normal mode across nodes checks its arguments by the same rules (:mod:`epcomm.internode.dispatch`).
"""
from __future__ import annotations

from dataclasses import dataclass

from epcomm.kernels import intranode as K_intra
from epcomm.kernels import layout as K_layout
from epcomm.normal.handle import DispatchHandle, check_handle
from epcomm.validate import check_experts_divisible, check_hidden_size, check_int

# Routing arguments a cached dispatch must not be given (the handle holds the route).
_ROUTE_ARGS = ("topk_idx", "topk_weights", "is_token_in_rank", "num_tokens_per_rank", "num_tokens_per_rdma_rank",
               "num_tokens_per_expert", "num_experts")


@dataclass(slots=True)
class DispatchArgs:
    """One dispatch's checked arguments (TensorRefs of the caller's arrays, sizes, the config)."""
    fw: str
    xr: object
    sr: object
    N: int
    H: int
    fp8: bool
    handle: DispatchHandle | None
    tr: object = None
    wr: object = None
    itr: object = None
    ner: object = None
    E: int = 0
    Kt: int = 0
    expert_alignment: int = 1
    num_worst_tokens: int = 0
    cfg: object = None
    send_blocks: int = 0
    recv_blocks: int = 0
    nrr: object = None

    @property
    def cached(self) -> bool:
        return self.handle is not None

    @property
    def needs_layout(self) -> bool:
        """The caller gave no is_token_in_rank, or a top-k without num_tokens_per_expert."""
        return not self.cached and (self.itr is None or (self.tr is not None and self.ner is None))


def _x_refs(ctx, x) -> DispatchArgs:
    """``x``: bf16 [N, H] with H % 8 == 0, or an FP8 pair (e4m3 [N, H] with H % 128 == 0, float32
    scales [N, H/128] of any strides)."""
    if isinstance(x, (tuple, list)):
        if len(x) != 2:
            raise ValueError("x: an FP8 input is a pair (data float8_e4m3fn [N, H], scales float32 [N, H/128])")
        xr = ctx.tensor(x[0], "x[0]", dtype="float8_e4m3fn", ndim=2)
        N, H = xr.shape
        check_hidden_size(H, fp8=True, name="x[0]")
        sr = ctx.tensor(x[1], "x[1]", dtype="float32", ndim=2, shape=(N, H // 128), contiguous=False,
                        framework=xr.framework)
        return DispatchArgs(xr.framework, xr, sr, N, H, True, None)
    xr = ctx.tensor(x, "x", dtype="bfloat16", ndim=2)
    N, H = xr.shape
    check_hidden_size(H)
    return DispatchArgs(xr.framework, xr, None, N, H, False, None)


def _cached_args(ctx, a: DispatchArgs, handle, route: dict) -> None:
    a.handle = check_handle(handle, ctx.serial)
    if handle.num_tokens != a.N:
        raise ValueError(f"x: has {a.N} tokens but the handle's dispatch had {handle.num_tokens}")
    for nm in _ROUTE_ARGS:
        if route[nm] is not None:
            raise ValueError(f"{nm}: must be None for a cached dispatch (the handle holds the route)")
    if a.expert_alignment != 1:
        raise ValueError(f"expert_alignment={a.expert_alignment}: a cached dispatch returns no per-expert "
                         f"counts, so it must be 1 (the default)")
    a.E = handle.num_experts


def _route_args(ctx, a: DispatchArgs, route: dict, previous_event) -> None:
    fw, N, R = a.fw, a.N, ctx.num_ranks
    if route["topk_idx"] is not None:
        a.tr = ctx.tensor(route["topk_idx"], "topk_idx", dtype="index", ndim=2, shape=(N, None), framework=fw,
                          previous_event=previous_event)
        a.Kt = a.tr.shape[1]
        if a.Kt < 1:
            raise ValueError("topk_idx: needs at least one column")
        a.wr = ctx.tensor(route["topk_weights"], "topk_weights", dtype="float32", ndim=2, shape=(N, a.Kt),
                          allow_none=True, framework=fw)
    else:
        if route["topk_weights"] is not None:
            raise ValueError("topk_weights: given without topk_idx")
        if route["is_token_in_rank"] is None:
            raise ValueError("is_token_in_rank: required when topk_idx is None")
    a.ner = ctx.tensor(route["num_tokens_per_expert"], "num_tokens_per_expert", dtype="int32", ndim=1,
                       allow_none=True, framework=fw)
    E = route["num_experts"]
    if E is None:
        if a.ner is None:
            if a.tr is not None:
                raise ValueError("num_experts: pass it, or num_tokens_per_expert (from get_dispatch_layout)")
            E = R
        else:
            E = a.ner.shape[0]
    a.E = E = check_int("num_experts", E, lo=1)
    check_experts_divisible(E, R)
    if a.ner is not None and a.ner.shape[0] != E:
        raise ValueError(f"num_tokens_per_expert: has {a.ner.shape[0]} entries, expected num_experts={E}")
    if E // R > K_intra.MAX_LOCAL_EXPERTS:
        raise ValueError(f"{E // R} experts per rank: at most {K_intra.MAX_LOCAL_EXPERTS} supported")
    a.itr = ctx.tensor(route["is_token_in_rank"], "is_token_in_rank", dtype="bool", ndim=2, shape=(N, R),
                       allow_none=True, framework=fw)
    # Not read by the kernels (the notify kernel counts from is_token_in_rank), but a wrong one
    # is a caller's bug worth reporting rather than ignoring.
    ctx.tensor(route["num_tokens_per_rank"], "num_tokens_per_rank", dtype="int32", ndim=1, shape=(R,),
               allow_none=True, framework=fw)
    nrr = ctx.tensor(route["num_tokens_per_rdma_rank"], "num_tokens_per_rdma_rank", dtype="int32", ndim=1,
                     allow_none=True, framework=fw)
    if nrr is not None and (nrr.shape[0] < 1 or R % nrr.shape[0]):
        raise ValueError(f"num_tokens_per_rdma_rank: has {nrr.shape[0]} entries, expected "
                         f"num_ranks / ranks_per_node (num_ranks={R}), or None")
    a.nrr = nrr
    if a.needs_layout:
        K_layout.check_layout_smem(E, R)  # the layout kernel runs in the call


def check_args(ctx, default_config, x, handle, route: dict, expert_alignment, num_worst_tokens, config,
               previous_event) -> DispatchArgs:
    """Every argument of a dispatch checked (TypeError / ValueError), before anything launches.
    ``route``: the routing arguments by name (:data:`_ROUTE_ARGS`)."""
    a = _x_refs(ctx, x)
    a.expert_alignment = check_int("expert_alignment", expert_alignment, lo=1, hi=K_intra.MAX_EXPERT_ALIGNMENT)
    a.num_worst_tokens = check_int("num_worst_tokens", num_worst_tokens, lo=0)
    a.cfg = ctx.call_config(config, default_config, "dispatch")
    a.send_blocks, a.recv_blocks = a.cfg.split()
    if handle is not None:
        _cached_args(ctx, a, handle, route)
    else:
        _route_args(ctx, a, route, previous_event)
    return a
