"""What the compiled operations cannot take as arguments, found from what they can: a Buffer from
its integer id (``ctx.serial``), and a low-latency dispatch's handle from the arrays it returned.

A torch custom operation takes tensors and plain scalars only, so the Buffer travels through a
compiled program as its id and is looked up in the operation's body, which runs outside the
trace.  The low-latency engine's handle holds Python state (its slot, generation and sizes)
beside its arrays; the dispatch operation leaves that here without the arrays, the
latest one per buffer slot (a dispatch's results serve until the next dispatch in its slot), and
the combine operation finds it by the addresses of the arrays it is given and rebuilds the handle
over them.
"""
from __future__ import annotations

import dataclasses
import itertools
import weakref

from epcomm.buffer import find_buffer
from epcomm.low_latency.handle import COMBINE_REFS, handle_over

_BY_ID: "weakref.WeakValueDictionary" = weakref.WeakValueDictionary()
_LL_HANDLES: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
_ORDER = itertools.count()


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
    """Keep what the combine of ``buffer``'s latest low-latency dispatch in ``handle.slot`` needs
    besides its arrays (which the operation returned): the handle's sizes, slot and generation,
    and the arrays' addresses, which name the dispatch.  It replaces that slot's previous one.
    No array is kept: the program owns them (a CUDA graph tree requires every tensor made in its
    pool to be an output or freed)."""
    per_buffer = _LL_HANDLES.get(buffer)
    if per_buffer is None:
        per_buffer = _LL_HANDLES[buffer] = {}
    sizes = dataclasses.replace(handle, src_info=None, layout_range=None, refs={})
    views = tuple(handle.refs[k].holding(None) for k in COMBINE_REFS)
    per_buffer[handle.slot] = (next(_ORDER), tuple(v.ptr for v in views), views, sizes, handle.refs["keep"].owner,
                               handle.refs.get("topk"))


def low_latency_handle(buffer, arrays: dict):
    """The engine handle of the dispatch of ``buffer`` that returned ``arrays`` (Tensor by the
    names of :data:`COMBINE_REFS`), over those arrays; ValueError if they are not the latest
    dispatch's of a slot.  Where two remembered dispatches had the same addresses (the older
    one's arrays were freed and reused), the newer one is meant."""
    ptrs = tuple(arrays[k].data_ptr() for k in COMBINE_REFS)
    found = [r for r in _LL_HANDLES.get(buffer, {}).values() if r[1] == ptrs]
    if not found:
        raise ValueError("handle: not returned by the latest low_latency_dispatch of its slot on this Buffer "
                         "(a dispatch's results serve until the next dispatch in the same slot: two dispatches "
                         "in flight take slots 0 and 1)")
    _, _, views, sizes, owner, topk = max(found, key=lambda r: r[0])
    # The arrays are the dispatch's (same addresses): its views, holding them again, need no
    # second look at each array.
    refs = {k: v.holding(arrays[k]) for k, v in zip(COMBINE_REFS, views)}
    return handle_over(owner, sizes, refs, sizes.generation, topk)
