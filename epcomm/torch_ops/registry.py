"""What the compiled operations cannot take as arguments, found from what they can: a Buffer from
its integer id (``ctx.serial``), and a low-latency dispatch's handle from its ``src_info`` tensor.

A torch custom operation takes tensors and plain scalars only, so the Buffer travels through a
compiled program as its id and is looked up in the operation's body, which runs outside the
trace.  The low-latency engine's handle holds Python state (its slot and the arrays the
operation does not return); the dispatch operation leaves it here, the latest one per buffer
slot (as in eager calls, a dispatch's results serve until the second next dispatch), and the
combine operation finds it by the address of its ``src_info``.
"""
from __future__ import annotations

import weakref

from epcomm.buffer import find_buffer

_BY_ID: "weakref.WeakValueDictionary" = weakref.WeakValueDictionary()
_LL_HANDLES: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def buffer_id(buffer) -> int:
    """The id under which operations name ``buffer`` (an epcomm Buffer); TypeError otherwise."""
    ctx = getattr(buffer, "ctx", None)
    serial = getattr(ctx, "serial", None)
    if type(serial) is not int:
        raise TypeError(f"buffer: expected an epcomm.Buffer, got {type(buffer).__name__}")
    return serial


def lookup(buffer_id: int):
    """The live Buffer with this id; ValueError if none (destroyed, or never made in this process)."""
    b = _BY_ID.get(buffer_id)
    if b is not None and b.ctx.destroyed:
        # Found through this cache, which outlives destroy(): forget it and the handles it keeps
        # (their arrays are the caller's device memory, held here only).
        del _BY_ID[buffer_id]
        _LL_HANDLES.pop(b, None)
        b = None
    if b is None:
        b = find_buffer(buffer_id)
        if b is None:
            raise ValueError(f"buffer_id={buffer_id}: no live epcomm Buffer of this process has this id "
                             f"(destroyed, or made in another process)")
        _BY_ID[buffer_id] = b
    return b


def remember_low_latency_handle(buffer, handle) -> None:
    """Keep the handle of ``buffer``'s latest low-latency dispatch in ``handle.slot`` (it replaces
    that slot's previous one, whose arrays are then freed once the program drops them)."""
    per_buffer = _LL_HANDLES.get(buffer)
    if per_buffer is None:
        per_buffer = _LL_HANDLES[buffer] = {}
    per_buffer[handle.slot] = handle


def low_latency_handle(buffer, src_info):
    """The handle of the dispatch of ``buffer`` that returned ``src_info``; ValueError if it is
    not one of the latest two (one per slot)."""
    ptr = src_info.data_ptr()
    for h in _LL_HANDLES.get(buffer, {}).values():
        if h.src_info.data_ptr() == ptr:
            return h
    raise ValueError("handle.src_info: not returned by one of the latest two low_latency_dispatch calls of this "
                     "Buffer (a dispatch's results serve until the second next dispatch)")
