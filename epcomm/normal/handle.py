"""The handle of a normal-mode dispatch: what its combine (or a cached dispatch) retraces."""
from __future__ import annotations

from dataclasses import dataclass, field

from epcomm import interop

# The route of a fixed-shape (num_worst_tokens) dispatch as arrays, in this order: what a
# compiled program carries from a dispatch to its combine (every other field follows from their
# shapes and from the Buffer).
ROUTE_FIELDS = ("rank_prefix", "send_list", "send_pos", "send_count", "is_token_in_rank", "recv_src_idx")


@dataclass(eq=False)
class DispatchHandle:
    """Everything a combine (or a cached dispatch) needs to retrace a dispatch.

    Opaque to users; keep it as long as the received tensors.  ``buffer_id`` is the serial of
    the Buffer that made it.  ``num_recv_tokens`` and ``recv_counts`` (rows per source rank) are
    None in ``num_worst_tokens`` mode, where they are known only on the GPU.  ``recv_src_idx``
    (int32 [rows]) holds the source-token index of every received row (-1 for padding rows).
    """

    buffer_id: int
    framework: str
    device_id: int
    num_ranks: int
    rank: int
    num_tokens: int
    hidden: int
    num_experts: int
    num_topk: int
    num_worst_tokens: int
    out_rows: int
    num_recv_tokens: int | None
    recv_counts: tuple | None
    rank_prefix: object
    send_list: object
    send_pos: object
    send_count: object
    is_token_in_rank: object
    recv_src_idx: object
    refs: dict = field(repr=False, default_factory=dict)


def ptr(ref) -> int:
    """The device address of a TensorRef, 0 for an absent (None) argument (the kernels' "none")."""
    return 0 if ref is None else ref.ptr


def check_handle(handle, serial: int) -> DispatchHandle:
    """``handle`` as a DispatchHandle of the Buffer numbered ``serial``; TypeError / ValueError
    otherwise."""
    if not isinstance(handle, DispatchHandle):
        raise TypeError(f"handle: expected a DispatchHandle, got {type(handle).__name__}")
    if handle.buffer_id != serial:
        raise ValueError("handle: was made by another Buffer")
    return handle


def route_arrays(handle: DispatchHandle) -> tuple:
    """The arrays of ``handle`` named by :data:`ROUTE_FIELDS`, in that order."""
    return tuple(getattr(handle, f) for f in ROUTE_FIELDS)


def handle_from_route(arrays, *, serial: int, device_id: int, rank: int, num_ranks: int, hidden: int,
                      num_experts: int, num_topk: int) -> DispatchHandle:
    """The DispatchHandle of a ``num_worst_tokens`` dispatch of the Buffer numbered ``serial`` from
    its :func:`route_arrays`: rank_prefix int32 [R + 1], send_list int32 [R, max(N, 1)], send_pos
    int32 [N, R], send_count int32 [R], is_token_in_rank bool [N, R], recv_src_idx int32 [rows]
    (rows = num_worst_tokens), all contiguous, of one framework, on ``device_id`` (-1: host).

    The kernels read these arrays through raw pointers, so each is checked: TypeError for a wrong
    dtype or framework, ValueError for a wrong count, shape or device."""
    arrays = tuple(arrays)
    if len(arrays) != len(ROUTE_FIELDS):
        raise ValueError(f"handle: expected {len(ROUTE_FIELDS)} arrays {ROUTE_FIELDS}, got {len(arrays)}")
    R = num_ranks
    N = _route_ref(arrays[2], "send_pos", "int32", (None, R), device_id).shape[0]
    shapes = {"rank_prefix": (R + 1,), "send_list": (R, max(N, 1)), "send_pos": (N, R), "send_count": (R,),
              "is_token_in_rank": (N, R), "recv_src_idx": (None,)}
    refs = {f: _route_ref(a, f, "bool" if f == "is_token_in_rank" else "int32", shapes[f], device_id)
            for f, a in zip(ROUTE_FIELDS, arrays)}
    fws = {r.framework for r in refs.values()}
    if len(fws) != 1:
        raise TypeError(f"handle: its arrays must be of one framework, got {sorted(fws)}")
    rows = refs["recv_src_idx"].shape[0]
    return DispatchHandle(
        buffer_id=serial, framework=fws.pop(), device_id=device_id, num_ranks=R, rank=rank, num_tokens=N,
        hidden=hidden, num_experts=num_experts, num_topk=num_topk, num_worst_tokens=rows, out_rows=rows,
        num_recv_tokens=None, recv_counts=None, refs=refs, **dict(zip(ROUTE_FIELDS, arrays)))


def _route_ref(obj, name: str, dtype: str, shape: tuple, device_id: int):
    ref = interop.as_tensor(obj, f"handle.{name}", dtype=dtype, shape=shape, device="any")
    if ref.device_id != device_id:
        raise ValueError(f"handle.{name}: is on {ref.device} but the Buffer uses "
                         f"{'the host' if device_id < 0 else f'cuda:{device_id}'}")
    return ref
