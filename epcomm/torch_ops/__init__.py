"""epcomm's calls inside compiled torch programs: ``torch.compile(fullgraph=True)`` without a
graph break, and CUDA graphs (``mode="reduce-overhead"``) of the low-latency pair.

Importing this module registers the custom operations ``torch.ops.epcomm.*`` (importing
:mod:`epcomm` itself imports no torch); it needs torch 2.7 or newer (:data:`NEEDED_TORCH`) and
raises :class:`epcomm.errors.EpcommError` naming that version on an older one, before
registering anything.  The functions below call them and work the same
eagerly and compiled; the Buffer is made outside the compiled code (one per process, as
always) and passed in, and stays alive while the compiled code runs.

Fixed shapes only, as a compiler needs them: the normal-mode dispatch takes ``num_worst_tokens``
(outputs of exactly that many rows, padding rows with top-k index -1), the low-latency calls
are ``[E/R, R*T, H]`` as ever.  One NVLink domain (not a Buffer spanning nodes).

Order: every rank issues the collectives in program order, whatever its shapes.  Eager calls
run in that order; in a compiled program each collective takes its device's order token and is
followed by an operation that writes it (:mod:`epcomm.torch_ops.order`), so the program's
collectives (forward and backward, on any Buffer of the device) form one chain of data
dependencies that Inductor cannot reorder: two independent micro-batches in one compiled
function are safe.  The token is a static input of the graph, so the low-latency pair keeps its
CUDA graph.  Calls of ``torch.ops.epcomm.*`` made directly, without a token, are not chained.

Gradients: :func:`dispatch` (to ``x`` and ``topk_weights``), :func:`cached_dispatch` and
:func:`combine` (to ``x``) are differentiable with :mod:`epcomm.torch_autograd`'s rules; the
low-latency calls are not (inference).  First order only: a double backward
(``create_graph=True``) misses the second derivative through ``topk_weights``' gradient (the
combine that carries it takes the weights as non-differentiable).

Example::

    from epcomm import torch_ops
    recv_x, recv_idx, recv_w, handle = torch_ops.dispatch(buf, x, topk_idx, topk_weights, E, worst)
    y = experts(recv_x, recv_idx, recv_w)
    out, _ = torch_ops.combine(buf, y, handle)
"""
from __future__ import annotations

import re
from typing import NamedTuple

import torch
from torch.fx.node import has_side_effect

from epcomm.errors import EpcommError

# The oldest torch these operations serve.  Older ones fall short: torch 2.5 and 2.6 hand the
# order token (epcomm.torch_ops.order) to the compiled graph as a mutated input that is not
# static, so CUDA graph trees skip the low-latency pair's graph under mode="reduce-overhead";
# torch 2.4's custom_op cannot read string annotations (this package's), and its compiled
# autograd cannot trace a custom operation's backward.  Tested with torch 2.7, 2.8, 2.10, 2.11 and 2.13.
NEEDED_TORCH = (2, 7)


def check_torch(version: str) -> None:
    """EpcommError naming the torch version needed where ``version`` (``torch.__version__``) is
    older than :data:`NEEDED_TORCH`; nothing for a version that does not start with major.minor."""
    m = re.match(r"(\d+)\.(\d+)", version)
    if m is not None and (int(m[1]), int(m[2])) < NEEDED_TORCH:
        need = "%d.%d" % NEEDED_TORCH
        raise EpcommError(f"epcomm.torch_ops needs torch {need} or newer; this is torch {version}: "
                          f"pip install -U 'torch>={need}'")


# Before the operations are registered: an older torch fails there with its own error.
check_torch(torch.__version__)

from epcomm.normal.handle import route_arrays  # noqa: E402
from epcomm.torch_ops.low_latency_ops import low_latency_combine_op, low_latency_dispatch_op  # noqa: E402
from epcomm.torch_ops.normal_ops import cached_dispatch_op, combine_op, dispatch_op, layout_op  # noqa: E402
from epcomm.torch_ops.order import in_order, order_token  # noqa: E402
from epcomm.torch_ops.registry import buffer_id  # noqa: E402
from epcomm.validate import check_bool, check_int  # noqa: E402

# The collectives are marked side-effecting: a compiled program must call each one on every rank
# even where this rank leaves its results unused (dead-code elimination would drop it here
# only, and the other ranks would wait), and must not merge two equal calls into one.
for _name in ("dispatch", "cached_dispatch", "combine", "low_latency_dispatch", "low_latency_combine"):
    has_side_effect(getattr(torch.ops.epcomm, _name).default)

__all__ = ["DispatchRoute", "LowLatencyRoute", "dispatch", "cached_dispatch", "combine", "get_dispatch_layout",
           "low_latency_dispatch", "low_latency_combine"]


class DispatchRoute(NamedTuple):
    """The handle of :func:`dispatch` as tensors (those of
    :data:`epcomm.normal.handle.ROUTE_FIELDS`) and the dispatch's expert count and top-k width:
    what :func:`combine` and :func:`cached_dispatch` retrace.  Opaque; keep it with the received
    tensors."""
    rank_prefix: torch.Tensor
    send_list: torch.Tensor
    send_pos: torch.Tensor
    send_count: torch.Tensor
    is_token_in_rank: torch.Tensor
    recv_src_idx: torch.Tensor
    num_experts: int
    num_topk: int


class LowLatencyRoute(NamedTuple):
    """The handle of :func:`low_latency_dispatch`: ``count`` int32 [E/R] (rows per local expert),
    ``src_info`` int32 [E/R, R*T] (source token of each packed row), ``layout_range`` int32
    [E/R, R, 2], and what only the combine reads (``src_k``, ``tok_rows``, ``tok_meta``: opaque).
    Valid until the next low-latency dispatch in the same slot."""
    count: torch.Tensor
    src_info: torch.Tensor
    layout_range: torch.Tensor
    src_k: torch.Tensor
    tok_rows: torch.Tensor
    tok_meta: torch.Tensor


def _tensor(name: str, t, ndim: int) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.dim() != ndim:
        raise ValueError(f"{name}: expected {ndim} dimensions, got shape {tuple(t.shape)}")


def _nvlink_buffer(buffer) -> int:
    """The Buffer's id; ValueError for a Buffer spanning nodes (whose handles carry more)."""
    bid = buffer_id(buffer)
    if buffer.internode:
        raise ValueError("buffer: spans nodes; epcomm.torch_ops serves the normal mode within one NVLink domain")
    return bid


def _route_of(handle) -> tuple:
    if not isinstance(handle, DispatchRoute):
        raise TypeError(f"handle: expected the DispatchRoute of epcomm.torch_ops.dispatch, got "
                        f"{type(handle).__name__}")
    # By name (ROUTE_FIELDS), not handle[:6]: Dynamo of torch 2.6 to 2.8 fails slicing a NamedTuple
    # (InternalTorchDynamoError: VariableTracker got an unexpected keyword 'dynamic_attributes').
    return route_arrays(handle)


def dispatch(buffer, x, topk_idx, topk_weights, num_experts: int, num_worst_tokens: int):
    """:meth:`epcomm.Buffer.dispatch` with ``num_worst_tokens``, as one operation.

    Args: ``x`` bf16 [N, H]; ``topk_idx`` int64 [N, K] (-1: none); ``topk_weights`` float32
    [N, K]; ``num_experts`` E; ``num_worst_tokens`` M >= 1, the rows of every output (at least
    the rows this rank can receive, e.g. N * R).

    Returns ``(recv_x bf16 [M, H], recv_topk_idx int64 [M, K], recv_topk_weights float32 [M, K],
    handle)`` (:class:`DispatchRoute`); rows ordered by source rank, then source token; padding
    rows have top-k index -1 and unwritten ``recv_x``.  Differentiable in ``x`` and
    ``topk_weights``.  Raises TypeError / ValueError for a wrong argument here (its type, rank or
    count) and, when the operation runs, what :meth:`epcomm.Buffer.dispatch` raises.
    """
    bid = _nvlink_buffer(buffer)
    _tensor("x", x, 2)
    _tensor("topk_idx", topk_idx, 2)
    _tensor("topk_weights", topk_weights, 2)
    num_experts = check_int("num_experts", num_experts, lo=1)
    num_worst_tokens = check_int("num_worst_tokens", num_worst_tokens, lo=1)
    out = in_order(dispatch_op, order_token(x), x, topk_idx, topk_weights, bid, buffer.num_ranks, num_experts,
                   num_worst_tokens)
    return out[0], out[1], out[2], DispatchRoute(*out[3:], num_experts, topk_idx.shape[1])


def cached_dispatch(buffer, x, handle: DispatchRoute):
    """A dispatch of ``x`` (bf16 [N, H], N the handle's token count) along ``handle``'s route:
    recv_x bf16 [M, H] (what the backward of :func:`combine` computes).  Differentiable in ``x``."""
    bid = _nvlink_buffer(buffer)
    route = _route_of(handle)
    _tensor("x", x, 2)
    return in_order(cached_dispatch_op, order_token(x), x, *route, bid, handle.num_experts, handle.num_topk)


def combine(buffer, x, handle: DispatchRoute, topk_weights=None):
    """:meth:`epcomm.Buffer.combine` through ``handle``: each token gets the unweighted sum of
    its received rows.

    Args: ``x`` bf16 [M, H] in the dispatch's receive order; ``topk_weights`` None or float32
    [M, K] (summed the same way), not differentiable (ValueError if it requires grad).

    Returns ``(combined_x bf16 [N, H], combined_topk_weights float32 [N, K] or None)``.
    Differentiable in ``x``: the backward is :func:`cached_dispatch`.
    """
    bid = _nvlink_buffer(buffer)
    route = _route_of(handle)
    _tensor("x", x, 2)
    if topk_weights is not None:
        _tensor("topk_weights", topk_weights, 2)
        if topk_weights.requires_grad and torch.is_grad_enabled():
            raise ValueError("topk_weights: the combine of weights is not differentiable; pass them detached")
    out, out_w = in_order(combine_op, order_token(x), x, topk_weights, *route, bid, handle.num_experts, handle.num_topk)
    return out, (out_w if topk_weights is not None else None)


def get_dispatch_layout(topk_idx, num_experts: int, num_ranks: int, *, num_ranks_per_node: int = 8):
    """:func:`epcomm.get_dispatch_layout` as one operation: ``(num_tokens_per_rank int32 [R],
    num_tokens_per_rdma_rank int32 [R / num_ranks_per_node] or None within one node,
    num_tokens_per_expert int32 [E], is_token_in_rank bool [N, R])``."""
    _tensor("topk_idx", topk_idx, 2)
    num_experts = check_int("num_experts", num_experts, lo=1)
    num_ranks = check_int("num_ranks", num_ranks, lo=1)
    num_ranks_per_node = check_int("num_ranks_per_node", num_ranks_per_node, lo=1)
    rank, rdma, expert, in_rank = layout_op(topk_idx, num_experts, num_ranks, num_ranks_per_node)
    return rank, (rdma if num_ranks > num_ranks_per_node else None), expert, in_rank


def low_latency_dispatch(buffer, x, topk_idx, num_max_dispatch_tokens_per_rank: int, num_experts: int, *,
                         use_fp8: bool = True, round_scale: bool = False, use_ue8m0: bool = False, slot: int = 0):
    """:meth:`epcomm.Buffer.low_latency_dispatch` (one kernel: no hook, no event) as one operation.

    Returns ``(recv_x, recv_count int32 [E/R], handle)`` (:class:`LowLatencyRoute`): ``recv_x``
    bf16 [E/R, R*T, H], or with ``use_fp8`` the pair ``(e4m3 [E/R, R*T, H], scales)``, in the
    Buffer's method's layout but new tensors at every call (not views of the Buffer's storage).
    Not differentiable; capturable in a CUDA graph (one warm-up call first, as torch.compile's
    ``mode="reduce-overhead"`` makes).

    ``slot``: the buffer slot, 0 or 1, which every rank gives the same call (the Buffer's method
    alternates them; a CUDA graph replay could not, see :mod:`epcomm.torch_ops.low_latency_ops`).
    Combine each dispatch before the next dispatch in its slot (two in flight, e.g. two
    micro-batches, take different slots): a combine of an older dispatch raises ValueError when
    the operation runs.
    """
    bid = buffer_id(buffer)
    _tensor("x", x, 2)
    _tensor("topk_idx", topk_idx, 2)
    T = check_int("num_max_dispatch_tokens_per_rank", num_max_dispatch_tokens_per_rank, lo=1)
    num_experts = check_int("num_experts", num_experts, lo=1)
    use_fp8, round_scale = check_bool("use_fp8", use_fp8), check_bool("round_scale", round_scale)
    use_ue8m0 = check_bool("use_ue8m0", use_ue8m0)
    slot = check_int("slot", slot, lo=0, hi=1)
    rx, scales, *route = in_order(
        low_latency_dispatch_op, order_token(x), x, topk_idx, bid, buffer.num_ranks, T, num_experts, use_fp8,
        round_scale, use_ue8m0, slot)
    return ((rx, scales) if use_fp8 else rx), route[0], LowLatencyRoute(*route)


def low_latency_combine(buffer, x, topk_idx, topk_weights, handle: LowLatencyRoute):
    """:meth:`epcomm.Buffer.low_latency_combine` (default format, one kernel) as one operation, in
    the slot of ``handle``'s dispatch: ``x`` bf16 [E/R, R*T, H], ``topk_idx`` int64 /
    ``topk_weights`` float32 [N, K] as dispatched; returns the combined bf16 [N, H].  Not
    differentiable; CUDA-graph capturable.  ``handle`` must hold the dispatch's own tensors (its
    dispatch is found by their addresses), not copies: a CUDA graph tree records a graph on copies
    of the inputs that no graph of the tree made, so under ``mode="reduce-overhead"`` a combine
    whose dispatch ran outside the tree (eagerly, or compiled without CUDA graphs) raises
    ValueError when its graph is recorded."""
    bid = buffer_id(buffer)
    if not isinstance(handle, LowLatencyRoute):
        raise TypeError(f"handle: expected the LowLatencyRoute of epcomm.torch_ops.low_latency_dispatch, got "
                        f"{type(handle).__name__}")
    _tensor("x", x, 3)
    _tensor("topk_idx", topk_idx, 2)
    _tensor("topk_weights", topk_weights, 2)
    return in_order(low_latency_combine_op, order_token(x), x, topk_idx, topk_weights, *handle, bid)
