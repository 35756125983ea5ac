"""DeepEP's ``EventHandle`` and ``EventOverlap`` on epcomm's :class:`epcomm.EventOverlap`.

Both are subclasses of epcomm's class without state of their own, so every epcomm call accepts
them as ``previous_event`` and the drop-in's calls return epcomm's events re-classed
(:func:`adopt`: no copy, no new CUDA event).  What differs from DeepEP: ``EventOverlap.event``
is the raw CUDA event handle (an int) or None, not an ``EventHandle`` object; and
``current_stream_wait()`` on an event-less EventOverlap does nothing (DeepEP asserts).
"""
from __future__ import annotations

from epcomm.runtime.event import EventOverlap as NativeEventOverlap


class _Kept(tuple):
    """(EventHandle, extra_tensors) kept alive by an EventOverlap built from the handle: the
    handle owns the CUDA event, the EventOverlap only waits on it."""
    __slots__ = ()


class EventHandle(NativeEventOverlap):
    """DeepEP's ``EventHandle()``: a CUDA event recorded on torch's current stream now.

    ``current_stream_wait()`` makes torch's current stream (at the time of that call) wait for
    it.  Recording needs a CUDA device (epcomm's driver errors otherwise)."""

    __slots__ = ()

    def __init__(self):
        super().__init__(None)  # a valid event-less object, should recording raise
        ev = NativeEventOverlap.record("torch")
        self.event, self.framework, self.device_id, self.capture = ev.event, ev.framework, ev.device_id, ev.capture
        ev.event = None  # this object owns the event now; ``ev`` is dropped without destroying it


class EventOverlap(NativeEventOverlap):
    """DeepEP's ``EventOverlap(event=None, extra_tensors=None)``: the completion event of an
    operation, waited for with ``current_stream_wait()`` or on leaving a ``with`` block.

    Args:
        event: None (no event: waiting does nothing) or an :class:`EventHandle` (kept alive as
            long as this object; TypeError for anything else).
        extra_tensors: anything to keep alive with the event (DeepEP's stand-in for
            ``record_stream``), read back as :attr:`extra_tensors`.

    The drop-in's operations return this class; its ``event`` is the raw CUDA event handle (int).
    """

    __slots__ = ()

    def __init__(self, event: EventHandle | None = None, extra_tensors=None):
        super().__init__(None, "torch", 0, extra=extra_tensors)  # valid (event-less) should the check raise
        if event is None:
            return
        if not isinstance(event, EventHandle):
            raise TypeError(f"event: expected an EventHandle (epcomm.deep_ep.EventHandle) or None, "
                            f"got {type(event).__name__}")
        # The handle owns the CUDA event; this object waits on it and keeps the handle alive.
        self.event, self.framework, self.device_id, self.capture = event.event, event.framework, event.device_id, \
            event.capture
        self.extra, self._owned = _Kept((event, extra_tensors)), False

    @property
    def extra_tensors(self):
        """What this event keeps alive: the ``extra_tensors`` it was built with, or for an
        operation's event the arrays that operation still reads (None when none)."""
        extra = self.extra
        return extra[1] if type(extra) is _Kept else extra


def adopt(ev):
    """``ev`` (an epcomm EventOverlap an operation returned, or None) as an :class:`EventOverlap`:
    the same object, re-classed (both classes have the same slots)."""
    if ev is not None and type(ev) is NativeEventOverlap:
        ev.__class__ = EventOverlap
    return ev
