"""The handle of a normal-mode dispatch: what its combine (or a cached dispatch) retraces."""
from __future__ import annotations

from dataclasses import dataclass, field


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
