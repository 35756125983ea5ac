"""CuPy: TensorRefs of arrays (``.data.ptr``, ``.shape``, ``.strides`` in bytes divided by the
item size), allocation and copies.

CuPy has no bfloat16 or float8 dtypes: a same-size unsigned integer array stands for them
(dtypes.CUPY_STANDIN).  CuPy is imported by the functions here, never at module import.
"""
from __future__ import annotations

from epcomm.interop.dtypes import CUPY_STANDIN, NP_NAMES, np_dtype, np_name, np_tables
from epcomm.interop.refs import TensorRef, element_strides


def ref_cupy(a, name: str) -> TensorRef:
    """A TensorRef to CuPy array ``a`` (its stand-in dtype, e.g. uint16 for bfloat16)."""
    dt = NP_NAMES.get(a.dtype) or np_name(a.dtype)
    st = element_strides(a, name)
    return TensorRef(a.data.ptr, a.shape, st, dt, "cuda", a.device.id, "cupy", a)


def alloc_cupy(shape: tuple, dtype: str, device_type: str, device_id: int, zero: bool):
    """``(array, TensorRef)`` of a new CuPy array on ``device_id``; the ref reports ``dtype``
    (the array has its stand-in dtype).  ValueError for ``device_type`` other than 'cuda'."""
    if device_type != "cuda":
        raise ValueError("cupy arrays live on CUDA devices (device_type='cuda')")
    import cupy
    npdt = np_tables()[1][CUPY_STANDIN.get(dtype, dtype)]
    with cupy.cuda.Device(device_id):
        a = (cupy.zeros if zero else cupy.empty)(shape, dtype=npdt)
    ref = ref_cupy(a, "out")
    ref.dtype = dtype
    return a, ref


def from_numpy_cupy(arr, dt: str, device_type: str, device_id: int):
    """A CuPy array on ``device_id`` holding a copy of host array ``arr`` of dtype ``dt``
    (bf16 / fp8 as their stand-ins)."""
    if device_type != "cuda":
        raise ValueError("cupy arrays live on CUDA devices (device_type='cuda')")
    import cupy
    host = arr.view(np_dtype(CUPY_STANDIN[dt])) if dt in CUPY_STANDIN else arr
    with cupy.cuda.Device(device_id):
        return cupy.asarray(host)


def to_numpy_cupy(obj):
    """A host numpy copy of CuPy array ``obj``."""
    import cupy
    return cupy.asnumpy(obj)


def widen_cupy(obj, framework: str, device_id: int):
    """An int64 CuPy copy of an integer array on ``device_id``, queued on CuPy's current
    stream; a JAX or DLPack array is imported zero-copy through DLPack first."""
    import cupy
    with cupy.cuda.Device(device_id):
        src = obj if framework == "cupy" else cupy.from_dlpack(obj)
        return src.astype(cupy.int64)


def allocating_on_cupy(raw_stream: int, device_id: int):
    """A context in which CuPy allocates (and queues work) on raw stream ``raw_stream``."""
    import cupy
    return cupy.cuda.ExternalStream(raw_stream, device_id=device_id)
