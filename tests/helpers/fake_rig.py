"""The one fake runtime the CPU tests drive the public call paths on: every driver call the normal,
layout and low-latency paths make (launches, memsets, stream and event operations, captures) is
replaced by a recorder, CPU arrays stand in for arrays on cuda:0, and Buffers are assembled around
fake engine states (:mod:`fake_runtime`).  Applied with monkeypatch, so a test's changes are
undone after it.

"Nothing launched" in a test means no entry in :attr:`FakeRuntime.kernels`: an error raised
before that point came before any kernel could run.
"""
from __future__ import annotations

import contextlib

import numpy as np

from fake_driver import FakeModule, cpu_arrays_as_cuda
from fake_runtime import FakeErr, FakeGroup, fake_buffer, fake_context

# Parameter fields a launch record keeps (those a kernel of some family has; absent ones: None).
PARAM_FIELDS = ("expert_alignment", "num_topk", "src_ld", "rows", "groups", "speculative", "num_tokens",
                "hidden", "num_experts", "max_tokens", "out_rows", "fp8", "cached")


def fake_heap(R: int):
    """A low-latency engine's resources without NVSHMEM: a heap address no array uses, every
    peer mapped (so every pair over NVLink)."""
    from epcomm.low_latency.state import HeapResources
    return HeapResources(None, 1 << 40, 0, [1] * R, np.ones((R, R), dtype=bool))


class FakeRuntime:
    """Recorders for what would reach the GPU.

    Attributes:
        log: ``("launch", fn)``, ``("memset", ptr, nbytes)``, ``("device_sync",)`` and, for the
            groups made by :meth:`ll_buffer`, ``("barrier",)``, in call order.
        kernels: ``(fn, grid, {field: value})`` of every kernel launch (fields: PARAM_FIELDS).
        capturing: streams in a CUDA-graph capture (id :attr:`capture`); a stream that waits for
            an event recorded on a capturing stream joins the capture, as in CUDA.
        launch_streams: ``(stream, capturing)`` of each launch; waits: ``(stream, event)``.
    """

    def __init__(self, monkeypatch, *, cpu_as_cuda: bool = True):
        from epcomm import api, context, interop
        from epcomm.interop import checks
        from epcomm.jit import loader
        from epcomm.kernels import internode as K_inter
        from epcomm.kernels import intranode as K_intra
        from epcomm.kernels import layout as K_layout
        from epcomm.kernels import low_latency as K_ll
        from epcomm.low_latency.state import LowLatencyState
        from epcomm.runtime import driver, streams
        self.log, self.kernels = [], []
        self.capturing, self.capture = set(), 42
        self.recorded_on, self.launch_streams, self.waits = {}, [], []
        self.monkeypatch = monkeypatch
        if cpu_as_cuda:
            cpu_arrays_as_cuda(monkeypatch)
        else:
            monkeypatch.setattr(streams, "current_stream", lambda fw, d: 0)
            monkeypatch.setattr(interop, "current_stream", lambda fw, d: 0)
        orig_empty = interop.empty
        monkeypatch.setattr(interop, "empty", lambda fw, shape, dtype, *a: orig_empty(fw, shape, dtype, "cpu", 0))
        monkeypatch.setattr(interop, "wrap_pointer", self._wrap_pointer)
        for name in ("on_device", "stream_is_capturing", "capture_id", "memset_d8_async", "memset_d32_async",
                     "stream_sync", "event_record", "stream_wait_event", "device_sync", "event_sync",
                     "event_create", "event_destroy", "num_sms"):
            monkeypatch.setattr(driver, name, getattr(self, name))
        monkeypatch.setattr(loader, "load", lambda spec, dev: FakeModule())
        for mod in (K_intra, K_layout, K_ll, K_inter):
            monkeypatch.setattr(mod, "launch", self.launch)
        monkeypatch.setattr(K_ll, "launch_prepared", lambda *a: self._record("prepared", 0, None, None))
        monkeypatch.setattr(K_ll, "launch_plan", lambda fn, grid, s, args, smem: self._record(fn, grid, s, None))
        monkeypatch.setattr(api, "default_state", lambda dev: FakeErr())
        # int32 indices of JAX (and CuPy) are widened by CuPy on the GPU: by NumPy here.
        monkeypatch.setattr(checks, "widen_cupy", lambda obj, fw, dev: np.asarray(obj).astype(np.int64))
        # destroy() hands a context's streams to the device's spares: the fake ones stay here.
        monkeypatch.setattr(context, "SPARE_STREAMS", {})
        monkeypatch.setattr(LowLatencyState, "_allow_smem", lambda self, *a: None)
        monkeypatch.setattr(LowLatencyState, "_coop_blocks", lambda self, fn, smem: 132)
        real_empty = LowLatencyState.empty
        monkeypatch.setattr(LowLatencyState, "empty",
                            lambda self, fw, shape, dtype, name=None: real_empty(self, fw, shape, dtype, name)
                            if self.ctx.sink is not None else interop.empty(fw, tuple(shape), dtype, "cpu", 0))

    # ---- the driver, recorded ----------------------------------------------------------------
    @contextlib.contextmanager
    def on_device(self, d):
        yield

    def stream_is_capturing(self, s):
        return s in self.capturing

    def capture_id(self, s):
        return self.capture if s in self.capturing else 0

    def memset_d8_async(self, ptr, value, nbytes, stream):
        self.log.append(("memset", ptr, nbytes))

    def memset_d32_async(self, *a):
        pass

    def stream_sync(self, *a):
        pass

    def event_record(self, ev, s):
        self.recorded_on[ev] = s

    def stream_wait_event(self, s, ev):
        self.waits.append((s, ev))
        if self.recorded_on.get(ev) in self.capturing:
            self.capturing.add(s)

    def device_sync(self):
        self.log.append(("device_sync",))

    def event_sync(self, ev):
        pass

    def event_create(self, *a):
        return 1

    def event_destroy(self, *a):
        pass

    def num_sms(self, d):
        return 132

    def launch(self, fn, grid, threads, stream, p, smem=0, cooperative=False):
        self._record(fn, grid, stream, p)

    def _record(self, fn, grid, stream, p):
        self.log.append(("launch", fn))
        self.kernels.append((fn, grid, {f: getattr(p, f, None) for f in PARAM_FIELDS}))
        self.launch_streams.append((stream, stream in self.capturing))

    @staticmethod
    def _wrap_pointer(fw, ptr, shape, dtype, device_type="cuda", device_id=0, owner=None):
        from epcomm import interop
        return interop.empty(fw, tuple(shape), dtype, "cpu", 0)[0]

    # ---- what tests read -----------------------------------------------------------------------
    def launched(self) -> list:
        """Names of the kernels launched, in order."""
        return [e[0] for e in self.kernels]

    def launches(self) -> list:
        return [e for e in self.log if e[0] == "launch"]

    def clear(self) -> None:
        self.log.clear()
        self.kernels.clear()

    # ---- Buffers on the fake runtime -------------------------------------------------------------
    def normal_buffer(self, R: int = 2, recv_per_rank: int = 4, **kw):
        """A Buffer with the normal mode on a FakeNvlinkState (``kw``: :func:`fake_buffer`'s)."""
        return fake_buffer(num_ranks=R, recv_per_rank=recv_per_rank, **kw)

    def ll_buffer(self, R: int = 2, rdma: int = 1 << 30, *, normal: bool = False, numerics: str = "epcomm",
                  recv_per_rank: int = 4):
        """(Buffer, its LowLatencyState): a real low-latency engine on a fake heap (every peer
        reached by NVLink), and with ``normal`` the normal mode too."""
        from epcomm.low_latency.state import LowLatencyState
        ctx = fake_context(R, stream=7, group=FakeGroup(0, R, self.log))
        ctx.numerics = numerics
        st = LowLatencyState(ctx, rdma, resources=fake_heap(R))
        return fake_buffer(normal=normal, ctx=ctx, low_latency=st, num_ranks=R, recv_per_rank=recv_per_rank), st
