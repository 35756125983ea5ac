"""Outputs in the caller's framework: allocation, handing results back, wrapping owned memory."""
from __future__ import annotations

import contextlib
import ctypes

from epcomm.interop.cupy_adapter import alloc_cupy, allocating_on_cupy
from epcomm.interop.dtypes import CUPY_STANDIN, check_dtype_name
from epcomm.interop.exporter import Exporter
from epcomm.interop.jax_adapter import finish_jax
from epcomm.interop.numpy_adapter import alloc_numpy
from epcomm.interop.refs import check_device_type, shape_tuple
from epcomm.interop.torch_adapter import alloc_torch, allocating_on_torch
from epcomm.runtime import driver, streams


def _alloc_exporter(framework: str, shape: tuple, dtype: str, device_type: str, device_id: int,
                    zero: bool):
    """An :class:`Exporter` (JAX and generic DLPack outputs) and its ref; zero-filled on the
    framework's current stream when ``zero``."""
    e = Exporter.allocate(shape, dtype, device_type, device_id)
    if zero and e.nbytes:
        if device_type == "cpu":
            ctypes.memset(e.ptr, 0, e.nbytes)
        else:
            with driver.on_device(device_id):
                driver.memset_d8_async(e.ptr, 0, e.nbytes, streams.current_stream(framework, device_id))
    ref = e.ref()
    ref.framework = framework
    return e, ref


def _alloc(framework: str, shape, dtype: str, device_type: str, device_id: int, zero: bool):
    shape = shape_tuple(shape)
    check_dtype_name(dtype)
    check_device_type(device_type)
    if framework == "torch":
        return alloc_torch(shape, dtype, device_type, device_id, zero)
    if framework == "cupy":
        return alloc_cupy(shape, dtype, device_type, device_id, zero)
    if framework == "numpy":
        return alloc_numpy(shape, dtype, device_type, zero)
    if framework in ("jax", "dlpack"):
        return _alloc_exporter(framework, shape, dtype, device_type, device_id, zero)
    raise streams.unknown_framework(framework)


def empty(framework: str, shape, dtype: str, device_type: str = "cuda", device_id: int = 0):
    """Allocate an uninitialised output in ``framework``: returns ``(array, TensorRef)``.

    torch: ``torch.empty``; cupy: ``cupy.empty`` under the device (``uint16`` for bfloat16,
    ``uint8`` for float8; the ref reports the logical dtype); numpy: ``numpy.empty`` with
    ml_dtypes dtypes; jax (and 'dlpack'): an :class:`Exporter`, to be turned into a JAX array by
    :func:`finish` once written.  Raises TypeError for an unknown dtype, ValueError for an
    unknown framework or a device the framework cannot hold.
    """
    return _alloc(framework, shape, dtype, device_type, device_id, False)


def zeros(framework: str, shape, dtype: str, device_type: str = "cuda", device_id: int = 0):
    """Like :func:`empty`, zero-filled (on the framework's current stream for device memory)."""
    return _alloc(framework, shape, dtype, device_type, device_id, True)


def finish(framework: str, obj, stream: int | None = None):
    """The caller-facing result: for 'jax', ``jax.dlpack.from_dlpack(exporter)`` (zero-copy);
    anything else is returned unchanged.  ``stream``: the CUDA stream the kernels wrote the
    exporter's memory on (JAX's stream is then ordered after it).

    With 64-bit types disabled in JAX (the default), JAX converts int64/float64/uint64 results
    to 32 bits (a copy); other dtypes stay zero-copy.
    """
    if framework == "jax" and type(obj) is Exporter:
        return finish_jax(obj, stream)
    return obj


def wrap_pointer(framework: str, ptr: int, shape, dtype: str, device_type: str = "cuda",
                 device_id: int = 0, owner=None):
    """A ``framework`` array viewing memory epcomm owns (zero-copy through DLPack).

    ``owner`` is kept alive as long as the array.  For CuPy, bfloat16 / float8 come back as
    their uint16 / uint8 stand-ins.  Raises ValueError for an unknown framework.
    """
    dt = CUPY_STANDIN.get(dtype, dtype) if framework == "cupy" else dtype
    ex = Exporter(owner, ptr, shape, dt, device_type, device_id, None)
    if framework == "torch":
        import torch
        return torch.from_dlpack(ex)
    if framework == "cupy":
        import cupy
        return cupy.from_dlpack(ex)
    if framework == "jax":
        import jax.dlpack
        return jax.dlpack.from_dlpack(ex)
    if framework == "numpy" and device_type == "cpu":
        import numpy as np
        return np.from_dlpack(ex)
    raise ValueError(f"wrap_pointer: unsupported framework {framework!r} for {device_type} memory")


def allocating_on(framework: str, raw_stream: int, device_id: int):
    """A context manager in which ``framework`` allocates (and queues its own work) on the raw
    CUDA stream ``raw_stream`` of ``device_id``: torch's ``torch.cuda.stream`` of an
    ``ExternalStream``, CuPy's ``ExternalStream``; a no-op context for any other framework."""
    if framework == "torch":
        return allocating_on_torch(raw_stream, device_id)
    if framework == "cupy":
        return allocating_on_cupy(raw_stream, device_id)
    return contextlib.nullcontext()
