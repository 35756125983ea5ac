"""EventOverlap: the completion event of an asynchronous operation."""
from __future__ import annotations

from . import _cuda, interop

# (event, kept objects) of async operations whose EventOverlap was dropped before they finished.
# torch's allocator learns of the comm stream through record_stream, but CuPy's and JAX's do not:
# an input freed with its event still pending could be handed to a new array on the caller's
# stream and overwritten while the kernel reads it.  Released once their event completed
# (checked whenever another async operation makes an event).
_DEFERRED: list = []


def _release_finished() -> None:
    keep = []
    for ev, extra in _DEFERRED:
        try:
            done = _cuda.event_query(ev)
        except Exception:
            done = True  # a failed context: nothing will read the objects any more
        if done:
            try:
                _cuda.event_destroy(ev)
            except Exception:
                pass
        else:
            keep.append((ev, extra))
    _DEFERRED[:] = keep


class EventOverlap:
    """A CUDA event recorded on epcomm's communication stream after an operation.

    ``current_stream_wait()`` makes the caller's current stream (of the framework the operation
    was called with) wait for it; used as a context manager, it does so on exit, which lets code
    inside the ``with`` block overlap with the communication.  ``extra`` keeps tensors alive
    until the event is dropped, or, if it is dropped before the operation finished, until then.
    """

    __slots__ = ("event", "framework", "device_id", "extra", "_owned")

    def __init__(self, event: int | None = None, framework: str = "torch", device_id: int = 0,
                 extra=None, owned: bool = True):
        self.event = event
        self.framework = framework
        self.device_id = device_id
        self.extra = extra
        self._owned = owned
        if extra is not None and _DEFERRED:
            _release_finished()

    def current_stream_wait(self) -> None:
        if self.event is None:
            return
        with _cuda.on_device(self.device_id):
            _cuda.stream_wait_event(interop.current_stream(self.framework, self.device_id), self.event)

    def synchronize(self) -> None:
        """Block the host until the operation finished."""
        if self.event is not None:
            with _cuda.on_device(self.device_id):
                _cuda.event_sync(self.event)

    def query(self) -> bool:
        return self.event is None or _cuda.event_query(self.event)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.current_stream_wait()

    def __del__(self):
        if self._owned and self.event is not None:
            if self.extra is not None:
                try:
                    if not _cuda.event_query(self.event):
                        _DEFERRED.append((self.event, self.extra))
                        self.event = self.extra = None
                        return
                except Exception:
                    pass
            try:
                _cuda.event_destroy(self.event)  # safe while pending: freed when it completes
            except Exception:
                pass
            self.event = None
