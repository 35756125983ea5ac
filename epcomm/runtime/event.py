"""EventOverlap: the completion event of an asynchronous operation."""
from __future__ import annotations

from epcomm.runtime import driver, streams

# (event, kept objects) of CuPy/JAX async operations whose EventOverlap was dropped before it was
# known to be finished.  torch's allocator learns of the comm stream through record_stream, but
# CuPy's and JAX's do not: an input freed with its event still pending could be handed to a new
# array on the caller's stream and overwritten while the kernel reads it.  Released once their
# event completed, checked by the next async call made outside a CUDA-graph capture (querying an
# event during a capture would invalidate it).
_DEFERRED: list = []


def release_finished() -> None:
    """Drop the deferred objects whose operation finished.  Call only where this thread is not
    capturing (the queries run in relaxed capture mode, so another thread's capture survives)."""
    n = len(_DEFERRED)
    if not n:
        return
    # Taken out first: another thread calling this meanwhile sees none of them twice.
    items = _DEFERRED[:n]
    del _DEFERRED[:n]
    keep = []
    try:
        with driver.relaxed_capture_mode():
            for ev, extra in items:
                try:
                    done = driver.event_query(ev)
                except Exception:
                    done = False  # an error is no proof the kernels stopped reading: keep them
                if done:
                    try:
                        driver.event_destroy(ev)
                    except Exception:
                        pass
                else:
                    keep.append((ev, extra))
    except Exception:
        keep = items  # the mode switch failed: keep everything for a later call
    _DEFERRED.extend(keep)


def release_deferred(capture: int) -> None:
    """:func:`release_finished` when anything is deferred and ``capture`` (the capture id of
    the calling stream, 0 for none) says this thread is not capturing."""
    if _DEFERRED and not capture:
        release_finished()


def wait_for(stream: int, previous_event: "EventOverlap | None", capture: int) -> bool:
    """Make ``stream`` wait for ``previous_event`` (None or event-less: nothing to wait for);
    True if it did.  ``capture``: the capture id of the call (its caller's stream; 0 for none).
    Inside a capture an event known to be recorded outside it is skipped: it is complete before
    any replay, so it orders nothing in the graph, and waiting for it from a capturing stream
    would invalidate the capture.  Outside a capture an event recorded in one is skipped too
    (the driver refuses the wait).  An event of unknown origin is waited for."""
    if previous_event is None or previous_event.event is None:
        return False
    if previous_event.capture is not None and previous_event.capture != capture:
        # Recorded outside this capture (before it) or in another one (which the driver will
        # not let an outside stream wait for; its replays order themselves).
        return False
    driver.stream_wait_event(stream, previous_event.event)
    return True


def current_stream_wait_for(framework: str, device_id: int, previous_event: "EventOverlap | None") -> bool:
    """:func:`wait_for` on the current stream of ``framework`` ("torch" or "cupy") on
    ``device_id``, with that stream's own capture id; True if it waited."""
    with driver.on_device(device_id):
        s = streams.current_stream(framework, device_id)
        return wait_for(s, previous_event, driver.capture_id(s))


class EventOverlap:
    """A CUDA event recorded on epcomm's communication stream after an operation.

    ``current_stream_wait()`` makes the caller's current stream (of the framework the operation
    was called with) wait for it; used as a context manager, it does so on exit, which lets code
    inside the ``with`` block overlap with the communication.  ``extra`` keeps arrays alive until
    the event is dropped, and for CuPy and JAX, if it is dropped early, until the operation
    finished.

    ``capture``: the CUDA-graph capture the event was recorded in (its id, 0 for none), which
    lets a call inside a capture tell an event of that capture (a dependency in the graph) from
    one recorded before it (already complete; it orders nothing in the graph).  None when
    unknown, for an event made outside epcomm; :meth:`record` makes one that knows.
    """

    __slots__ = ("event", "framework", "device_id", "extra", "_owned", "capture")

    def __init__(self, event: int | None = None, framework: str = "torch", device_id: int = 0,
                 extra=None, owned: bool = True, capture: int | None = None):
        self.event = event
        self.framework = framework
        self.device_id = device_id
        self.extra = extra
        self._owned = owned
        self.capture = capture

    @classmethod
    def record(cls, framework: str = "torch", device_id: int | None = None) -> "EventOverlap":
        """An event recorded now on the current stream of ``framework`` ("torch" or "cupy") on
        ``device_id`` (default: the framework's current device), for ``previous_event`` (as
        DeepEP's ``EventOverlap(EventHandle())``)."""
        if framework not in ("torch", "cupy"):
            raise ValueError(f"framework: expected 'torch' or 'cupy' (JAX has no stream to record on), "
                             f"got {framework!r}")
        if device_id is None:
            device_id = streams.current_device(framework)
        with driver.on_device(device_id):
            s = streams.current_stream(framework, device_id)
            ev = driver.event_create()
            driver.event_record(ev, s)
            return cls(ev, framework, device_id, capture=driver.capture_id(s))

    def current_stream_wait(self) -> None:
        if self.event is None:
            return
        with driver.on_device(self.device_id):
            driver.stream_wait_event(streams.current_stream(self.framework, self.device_id), self.event)

    def synchronize(self) -> None:
        """Block the host until the operation finished."""
        if self.event is not None and self.capture in (None, 0):  # a captured event: nothing ran
            with driver.on_device(self.device_id):
                driver.event_sync(self.event)
                if _DEFERRED and not driver.capture_id(streams.current_stream(self.framework, self.device_id)):
                    release_finished()

    def query(self) -> bool:
        return self.event is None or driver.event_query(self.event)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.current_stream_wait()

    def __del__(self):
        if self._owned and self.event is not None:
            # No query here: this may run inside a capture.  Captured events go at once (a
            # graph's arrays are the caller's to keep), as do torch's (record_stream).
            if self.extra is not None and self.framework != "torch" and self.capture == 0:
                _DEFERRED.append((self.event, self.extra))
                self.event = self.extra = None
                return
            try:
                driver.event_destroy(self.event)  # safe while pending: freed when it completes
            except Exception:
                pass
            self.event = None


def check_event(previous_event) -> None:
    """``previous_event`` must be None or an EventOverlap (what async calls return); TypeError
    otherwise."""
    if previous_event is not None and not isinstance(previous_event, EventOverlap):
        raise TypeError(f"previous_event: expected an EventOverlap (the event an epcomm call returned) or None, "
                        f"got {type(previous_event).__name__}")
