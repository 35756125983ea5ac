"""EventOverlap: the completion event of an asynchronous operation."""
from __future__ import annotations

from . import _cuda, interop


class EventOverlap:
    """A CUDA event recorded on epcomm's communication stream after an operation.

    ``current_stream_wait()`` makes the caller's current stream (of the framework the operation
    was called with) wait for it; used as a context manager, it does so on exit, which lets code
    inside the ``with`` block overlap with the communication.  ``extra`` keeps tensors alive
    until the event is dropped.
    """

    __slots__ = ("event", "framework", "device_id", "extra", "_owned")

    def __init__(self, event: int | None = None, framework: str = "torch", device_id: int = 0,
                 extra=None, owned: bool = True):
        self.event = event
        self.framework = framework
        self.device_id = device_id
        self.extra = extra
        self._owned = owned

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
            try:
                _cuda.event_destroy(self.event)  # safe while pending: freed when it completes
            except Exception:
                pass
            self.event = None
