"""Low-latency mode of :class:`epcomm.Buffer` (decoding): the engine (state.py), its dispatch,
combine, receive hooks and fast paths (one module each), handles and results (handle.py).

Kernels: ``cuda_src/low_latency.cuh`` via :mod:`epcomm.kernels.low_latency`.

Host cost matters here (a decode step is tens of microseconds), so the steady state allocates
little: the packed dispatch outputs are *double-buffered results* owned by the buffer (one set
per slot, reused every second dispatch), launch parameters are prebuilt, and a call is a single
kernel launch (two with the receive hook).  A dispatch of a shape already used, with int64
indices and EPCOMM_CHECK_INDICES=0, allocates no device memory (the default check copies the
indices and costs a device sync; int32 indices are widened into a copy; JAX results get new
storage every call); the combine allocates only its ``[N, H]`` output, which ``out=`` avoids
(not with JAX, whose arrays are read-only).
"""
from __future__ import annotations

from epcomm.low_latency.handle import LowLatencyHandle
from epcomm.low_latency.state import LowLatencyState

__all__ = ["LowLatencyHandle", "LowLatencyState"]
