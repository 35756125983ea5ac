"""Host copies of arrays of any framework, and arrays built from host data (checks, tests,
examples).  Each synchronises; none is for hot paths."""
from __future__ import annotations

import ctypes

import numpy as np

from epcomm.interop.cupy_adapter import from_numpy_cupy, to_numpy_cupy
from epcomm.interop.dlpack import ref_dlpack
from epcomm.interop.dtypes import np_dtype, np_tables
from epcomm.interop.exporter import Exporter
from epcomm.interop.frameworks import framework_of_arg
from epcomm.interop.jax_adapter import from_numpy_jax
from epcomm.interop.refs import TensorRef
from epcomm.interop.torch_adapter import from_numpy_torch, to_numpy_torch
from epcomm.runtime import driver, streams


def _copy_span(dst: int, src: int, nbytes: int, ref: TensorRef) -> None:
    """Copy ``nbytes`` from ``src`` (host or device memory, as ``ref`` says) to host ``dst``,
    after all work on ``ref``'s device."""
    if ref.device_type == "cpu":
        ctypes.memmove(dst, src, nbytes)
        return
    with driver.on_device(ref.device_id):
        driver.check(driver.drv().cuCtxSynchronize(), "cuCtxSynchronize")
        driver.memcpy_dtoh(dst, src, nbytes)


def ref_to_numpy(ref: TensorRef):
    """Copy the elements ``ref`` views into a new C-contiguous numpy array."""
    npdt = np_dtype(ref.dtype)
    isz = npdt.itemsize
    shape, strides = ref.shape, ref.strides
    n = 1
    for s in shape:
        n *= s
    if n == 0:
        return np.empty(shape, dtype=npdt)
    lo = sum(st * (s - 1) for s, st in zip(shape, strides) if st < 0)
    hi = sum(st * (s - 1) for s, st in zip(shape, strides) if st > 0)
    span = (hi - lo + 1) * isz
    buf = np.empty(span, dtype=np.uint8)
    _copy_span(buf.ctypes.data, ref.ptr + lo * isz, span, ref)
    base = buf.view(npdt)
    view = np.lib.stride_tricks.as_strided(base[-lo:], shape=shape,
                                           strides=tuple(st * isz for st in strides))
    return np.ascontiguousarray(view)


def to_numpy(obj):
    """A host numpy copy of any supported array (bf16 / fp8 as ml_dtypes; CuPy bf16/fp8
    stand-ins come back as uint16 / uint8).  Accepts a :class:`TensorRef` or an
    :class:`Exporter` too.  Synchronizes; not for hot paths."""
    if isinstance(obj, TensorRef):
        return ref_to_numpy(obj)
    if type(obj) is Exporter:
        return ref_to_numpy(obj.ref())
    fw = framework_of_arg(obj, "obj")
    if fw == "numpy" or fw == "jax":
        return np.array(obj, copy=True)
    if fw == "torch":
        return to_numpy_torch(obj)
    if fw == "cupy":
        return to_numpy_cupy(obj)
    return ref_to_numpy(ref_dlpack(obj, "obj"))


def from_numpy(framework: str, arr, device_type: str = "cuda", device_id: int = 0):
    """Build a ``framework`` array holding a copy of the host array ``arr`` (tests, examples).

    bf16 / fp8 come as ml_dtypes arrays; for CuPy they become uint16 / uint8 arrays.  Raises
    TypeError for an unsupported dtype, ValueError for an unknown framework or a device the
    framework cannot hold.
    """
    arr = np.ascontiguousarray(arr)
    dt = np_tables()[0].get(arr.dtype)
    if dt is None:
        raise TypeError(f"unsupported dtype {arr.dtype}")
    if framework == "numpy":
        if device_type != "cpu":
            raise ValueError("numpy arrays live on the host (device_type='cpu')")
        return arr.copy()
    if framework == "torch":
        return from_numpy_torch(arr, dt, device_type, device_id)
    if framework == "cupy":
        return from_numpy_cupy(arr, dt, device_type, device_id)
    if framework == "jax":
        return from_numpy_jax(arr, device_type, device_id)
    raise streams.unknown_framework(framework)


def to_host(obj, framework: str):
    """:func:`to_numpy` of an array of ``framework`` for the host checks (for a device array:
    one copy and one sync): never a view of the caller's memory (the low-latency combine
    compares a later call's indices with it), except of a JAX array, which cannot change."""
    if framework == "jax":
        return np.asarray(obj)
    return to_numpy(obj)
