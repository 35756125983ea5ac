"""What every mode engine of one Buffer shares: the group, the device, the communication
streams and events, the error record, and the call-level plumbing built on them (argument views
on this device, ordering the comm stream after the caller, the call's event, output allocation).

A :class:`CommContext` is made collectively by :meth:`CommContext.open` (streams, events and the
error record of one device); its plain constructor takes those resources as they are, which is
how tests build one around a fake runtime.
"""
from __future__ import annotations

import contextlib
import itertools
import threading

import numpy as np

from epcomm import envs, interop
from epcomm.config import Config
from epcomm.errors import BufferStateError, EpcommError
from epcomm.runtime import driver, streams
from epcomm.runtime import event as event_mod
from epcomm.runtime.errstate import ErrorState
from epcomm.runtime.event import EventOverlap
from epcomm.runtime.topology import Topology
from epcomm.validate import check_bool, check_int

# Every Buffer's number in this process, recorded in its handles: unlike id(), never reused by a
# later Buffer after this one is collected, so a stale handle cannot pass for one of its own.
BUFFER_SERIALS = itertools.count(1)

# Comm streams of closed contexts, per device, for the next one.  Never destroyed: torch's
# allocator records an event on every stream a tensor was record_stream()ed on (async_finish
# does that with the comm streams) when the tensor is freed, which may be after the Buffer is
# gone; on a destroyed stream that fails inside a destructor and aborts the process.
SPARE_STREAMS: dict[int, list[int]] = {}


def take_stream(device: int) -> int:
    """A comm stream for ``device``: a spare one, else a new one."""
    spare = SPARE_STREAMS.get(device)
    return spare.pop() if spare else driver.stream_create()


class CallerOutputs:
    """What a caller supplies for one call in place of the engine's own: its outputs and the
    stream the kernels run on (a compiled program's buffers and stream, :mod:`epcomm.jax`).

    ``stream``: the raw CUDA stream the call is ordered on, as the caller's current stream would
    be; ``outputs``: output name -> ``(obj, TensorRef)`` (the names the engines give
    :meth:`CommContext.empty`); ``slot``: the low-latency buffer slot of the call (0 or 1), fixed
    by the caller so that every execution of a compiled call uses the same one; None: the
    engine's alternation.  Inside such a call nothing reads device memory on the host."""

    __slots__ = ("stream", "outputs", "slot")

    def __init__(self, stream: int, outputs: dict, slot: int | None = None):
        self.stream, self.outputs, self.slot = int(stream), outputs, slot

    def take(self, name: str | None, shape: tuple, dtype: str):
        """The supplied output ``name`` as an (obj, TensorRef) pair; EpcommError if it is missing
        or its shape or dtype is not the engine's (the caller sized it from the same rules)."""
        out = self.outputs.get(name)
        if out is None:
            raise EpcommError(f"the caller supplied no output {name!r} ({dtype} {tuple(shape)}); it supplied "
                              f"{sorted(self.outputs)}")
        ref = out[1]
        if tuple(ref.shape) != tuple(shape) or ref.dtype != dtype:
            raise EpcommError(f"output {name!r}: the caller supplied {ref.dtype} {tuple(ref.shape)}, the call "
                              f"writes {dtype} {tuple(shape)}")
        return out


class CommContext:
    """The shared state of one Buffer's engines (see the module docstring).

    Attributes: ``group``, ``rank``, ``num_ranks``, ``device_id``, ``serial`` (the Buffer's
    number, recorded in handles), ``timeout_s`` (EPCOMM_TIMEOUT_S), ``err`` (ErrorState),
    ``stream`` / ``stream2`` (raw comm streams: send and receive), ``ev_start`` / ``ev_mid`` /
    ``ev_recv`` (raw events for stream joins), ``destroyed``, ``alloc_on_comm`` (the current
    call's ``allocate_on_comm_stream``), ``shares_gpu``, ``topology`` (the group's nodes, a
    :class:`epcomm.runtime.topology.Topology`; None: not known, every rank is treated as one node),
    ``numerics`` ("epcomm" or "deepep": whose arithmetic the engines follow where they differ,
    set before the engines are made), ``shrink`` (the Buffer's ``enable_shrink``: kernels
    skip masked ranks and mask a peer that times out), ``mask`` (its
    :class:`epcomm.runtime.rankmask.RankMask` once the engines are made, else None), ``sink``
    (the current call's :class:`CallerOutputs` in this thread, or None: outputs allocated here,
    the framework's current stream).
    """

    def __init__(self, group, rank: int, num_ranks: int, device_id: int, *, err, stream: int = 0,
                 stream2: int = 0, events: tuple = (0, 0, 0), timeout_s: float | None = None,
                 shares_gpu: bool = False, device_sms: int | None = None, topology: Topology | None = None,
                 numerics: str = "epcomm"):
        self.group = group
        self.rank, self.num_ranks, self.device_id = rank, num_ranks, device_id
        self.serial = next(BUFFER_SERIALS)
        self.timeout_s = float(envs.TIMEOUT_S.get()) if timeout_s is None else float(timeout_s)
        self.err = err
        self.stream, self.stream2 = stream, stream2
        self.ev_start, self.ev_mid, self.ev_recv = events
        self.shares_gpu = shares_gpu
        self.topology = topology
        self.numerics = numerics
        self.shrink = False
        self.mask = None
        self._specs_called: set = set()  # kernel modules launched on this Buffer (kernel_timeout_s)
        self.destroyed = False
        self.alloc_on_comm = False
        # Per thread: XLA may run a compiled program's callback on a thread of its own while
        # this thread makes an eager call, which must not take the program's outputs and stream.
        self._sinks = threading.local()
        self._device_sms = device_sms

    @classmethod
    def open(cls, group, device_id: int) -> "CommContext":
        """Streams, events and the error record of ``device_id`` (not collective).  What was
        made is released if a later step raises."""
        made: dict = {}
        try:
            with driver.on_device(device_id):
                made["stream"] = take_stream(device_id)
                made["stream2"] = take_stream(device_id)
                made["events"] = tuple(driver.event_create() for _ in range(3))
            made["err"] = ErrorState(device_id)
        except BaseException:
            cls._release(device_id, made.get("stream", 0), made.get("stream2", 0), made.get("events", ()), None)
            raise
        return cls(group, group.rank, group.size, device_id, **made)

    def kernel_timeout_s(self, spec=None) -> float:
        """How long a kernel waits for a peer: EPCOMM_SHRINK_TIMEOUT_MS in shrink mode (then the
        peer is masked), else EPCOMM_TIMEOUT_S (then EpcommTimeoutError).  The shrink timeout is
        read at each call (parsed again only when its text changed: the fast paths ask too).

        ``spec``: the kernel module the call launches.  The first call of each module on this
        Buffer waits the longer of the two: a peer may still be compiling that module (seconds
        on a cold cache, more on a loaded host), and a late peer then is not a dead one.  Every
        rank makes the same calls, so the first calls of a module are the same calls everywhere."""
        if not self.shrink:
            return self.timeout_s
        shrink_s = envs.SHRINK_TIMEOUT_MS.get_memo() / 1000.0
        if spec is not None and spec not in self._specs_called:
            self._specs_called.add(spec)
            return max(shrink_s, self.timeout_s)
        return shrink_s

    # ---- lifecycle ---------------------------------------------------------------------------
    def check_usable(self, what: str, collective: bool = False) -> None:
        """Raise if destroyed or a kernel recorded an error.  ``collective``: the start of a call
        every rank makes, where a skipped bad index only warns (see ErrorState.check)."""
        if self.destroyed:
            raise BufferStateError(f"{what}: the Buffer was destroyed")
        self.err.check(what, collective=collective)

    def close(self) -> None:
        """Release the events and the error record; the streams go back to the spares."""
        self._release(self.device_id, self.stream, self.stream2, (self.ev_start, self.ev_mid, self.ev_recv),
                      self.err)
        self.ev_start = self.ev_mid = self.ev_recv = 0
        self.stream = self.stream2 = 0

    @staticmethod
    def _release(device_id: int, stream: int, stream2: int, events, err) -> None:
        for ev in events:
            try:
                if ev:
                    driver.event_destroy(ev)
            except Exception:
                pass
        spare = [s for s in (stream, stream2) if s]
        SPARE_STREAMS.setdefault(device_id, []).extend(spare)
        if err is not None:
            err.free()

    # ---- device facts and configs ------------------------------------------------------------
    def device_sm_count(self) -> int:
        """SMs of this context's GPU (queried once)."""
        n = self._device_sms
        if n is None:
            n = self._device_sms = driver.num_sms(self.device_id)
        return n

    def call_config(self, config, default: Config, what: str) -> Config:
        """The Config of one call: ``config`` or the default; TypeError for anything but a Config
        or None, ValueError if it asks for more SMs than the GPU has (the send and receive
        kernels run concurrently and the combine is a cooperative launch: blocks that cannot be
        resident would stall or fail the launch after other kernels of the call started)."""
        if config is None:
            config = default
        elif not isinstance(config, Config):
            raise TypeError(f"config: expected an epcomm.Config or None, got {type(config).__name__}")
        n = self.device_sm_count()
        if config.num_sms > n:
            raise ValueError(f"{what}: config.num_sms={config.num_sms} exceeds the {n} SMs of cuda:{self.device_id} "
                             f"(Buffer.set_num_sms / EPCOMM_NUM_SMS set the default)")
        return config

    def call_flags(self, async_finish, allocate_on_comm_stream) -> bool:
        """The two flags of a normal-mode call checked as bools (TypeError otherwise: a string
        such as "no" would count as True); sets :attr:`alloc_on_comm` for the call's outputs and
        returns ``async_finish``."""
        async_finish = check_bool("async_finish", async_finish)
        self.alloc_on_comm = check_bool("allocate_on_comm_stream", allocate_on_comm_stream)
        return async_finish

    def check_sms(self, num_sms) -> int:
        """``num_sms`` checked as an SM budget of this GPU: an int in [2, its SM count]."""
        return check_int("num_sms", num_sms, lo=2, hi=self.device_sm_count())

    def drain(self, ptr: int, nbytes: int) -> np.ndarray:
        """The int64 words at device address ``ptr`` (e.g. profile stamps), read after every
        stream of the device is done, then zeroed on the comm stream."""
        host = np.zeros(nbytes // 8, dtype=np.int64)
        with driver.on_device(self.device_id):
            driver.device_sync()
            driver.memcpy_dtoh(host.ctypes.data, ptr, nbytes)
            driver.memset_d8_async(ptr, 0, nbytes, self.stream)
            driver.stream_sync(self.stream)
        return host

    # ---- arguments ---------------------------------------------------------------------------
    def tensor(self, obj, name, *, framework: str | None = None, writable: bool = False, previous_event=None,
               **kw):
        """A borrowed view of ``obj`` on this context's GPU.  ``framework``: the framework of the
        call's first array (x); another one raises TypeError, since only that framework's stream
        is ordered with the kernels.  ``writable``: the kernel writes into it (read-only arrays,
        e.g. JAX's, raise ValueError).  ``previous_event``: the call's, which an int32 top-k's
        widening copy must wait for (``interop.as_index_tensor``).  ``dtype="index"``: int64
        expert indices (int32 widened)."""
        if kw.get("dtype") == "index":
            kw.pop("dtype")
            if obj is None and kw.pop("allow_none", False):
                return None
            if framework is not None and obj is not None:
                self._same_framework(obj, name, framework)
            after = previous_event if isinstance(previous_event, EventOverlap) else None
            ref = interop.as_index_tensor(obj, name, device="cuda", after_event=after, **kw)
        else:
            if framework is not None and obj is not None:
                self._same_framework(obj, name, framework)
            ref = interop.as_tensor(obj, name, device="cuda", **kw)
        if ref is not None and ref.device_id != self.device_id:
            raise ValueError(f"{name}: is on cuda:{ref.device_id} but this Buffer uses cuda:{self.device_id}")
        if ref is not None and writable and ref.readonly:
            raise ValueError(f"{name}: is read-only (a {ref.framework} array) but is written in place")
        return ref

    @staticmethod
    def _same_framework(obj, name: str, framework: str) -> None:
        try:
            fw = interop.framework_of(obj)
        except (TypeError, ValueError):
            return  # not an array: as_tensor raises the usual TypeError
        if fw != framework:
            raise TypeError(f"{name}: is a {fw} array but x is a {framework} one; pass every array of a call "
                            f"in one framework")

    # ---- streams and events of a call --------------------------------------------------------
    @property
    def sink(self) -> CallerOutputs | None:
        return getattr(self._sinks, "sink", None)

    @contextlib.contextmanager
    def supplying(self, sink: CallerOutputs):
        """The calls this thread makes inside run on ``sink``'s stream and write into its
        outputs."""
        prev, self._sinks.sink = self.sink, sink
        try:
            yield sink
        finally:
            self._sinks.sink = prev

    def caller_stream(self, fw: str) -> tuple[int, int]:
        """(the caller's stream: the sink's, else the current one in ``fw``; its capture id: 0
        when not capturing)."""
        sink = self.sink
        caller = streams.current_stream(fw, self.device_id) if sink is None else sink.stream
        return caller, driver.capture_id(caller)

    def begin(self, fw: str, previous_event: EventOverlap | None, caller_work: bool = False,
              caller: int | None = None, cap: int | None = None) -> tuple[int, int]:
        """Order the comm stream after the caller's work (or only after ``previous_event``,
        unless ``caller_work``: epcomm queued work on the caller's stream for this call, e.g.
        an int32 top-k widened to int64); returns (caller stream, its capture id: 0 when not
        capturing, see driver.capture_id).  ``caller`` and ``cap``: both, if the call already
        read them (each is a driver query on the hot path)."""
        if caller is None or cap is None:
            caller, cap = self.caller_stream(fw)
        waited = event_mod.wait_for(self.stream, previous_event, cap)
        # Under capture, a previous_event recorded before the capture began orders nothing
        # in the graph (wait_for skips it), and the comm stream would stay outside the capture:
        # the kernel would run once, now, and be missing from every replay.  Joining the
        # caller's stream brings the comm stream into the capture.
        if not waited or caller_work or (cap and driver.capture_id(self.stream) != cap):
            driver.event_record(self.ev_start, caller)
            driver.stream_wait_event(self.stream, self.ev_start)
        return caller, cap

    def finish(self, fw: str, caller: int, async_finish: bool, outputs: list, inputs: list,
               cap: int | None = None) -> EventOverlap:
        """The call's event on the comm stream (the caller waits for it unless ``async_finish``).
        ``cap``: begin()'s capture id of the call; 0 skips querying the comm stream's (which
        begin() left outside any capture then)."""
        ev = driver.event_create()
        driver.event_record(ev, self.stream)
        if cap != 0:
            cap = driver.capture_id(self.stream)
        event_mod.release_deferred(cap)
        torch_outputs = fw == "torch"  # only torch's allocator is told of streams (record_stream)
        if self.alloc_on_comm and torch_outputs:
            # Outputs allocated on the comm stream belong to its pool: once the caller frees
            # them, the next allocation there could reuse the memory while the caller's stream
            # still reads it (a call with previous_event does not wait for the caller's stream).
            # Recording the caller's stream makes the allocator wait for it, as DeepEP does.
            interop.record_on_current_stream(outputs, self.device_id)
        if async_finish and torch_outputs:
            # Inputs and outputs stay in use on both comm streams after the call returns.
            both = outputs + inputs
            interop.record_on_stream(both, self.stream, self.device_id)
            interop.record_on_stream(both, self.stream2, self.device_id)
        if not async_finish:
            driver.stream_wait_event(caller, ev)
        return EventOverlap(ev, fw, self.device_id, extra=(outputs, inputs) if async_finish else None, capture=cap)

    def empty(self, fw: str, shape, dtype: str, name: str | None = None):
        """A new ``fw`` array on this GPU, as interop.empty's (obj, TensorRef) pair; with
        ``alloc_on_comm`` it belongs to the comm stream's pool (torch's caching allocator ties
        a block to the stream it was allocated on; the flag is torch's only).  Inside
        :meth:`supplying`, the caller's output ``name`` instead (:meth:`CallerOutputs.take`)."""
        shape = tuple(int(s) for s in shape)
        if self.sink is not None:
            return self.sink.take(name, shape, dtype)
        if self.alloc_on_comm and fw == "torch":
            with interop.allocating_on(fw, self.stream, self.device_id):
                return interop.empty(fw, shape, dtype, "cuda", self.device_id)
        return interop.empty(fw, shape, dtype, "cuda", self.device_id)
