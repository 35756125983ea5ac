"""DLPack capsules: the C structs, the CPython capsule calls, and reading a producer's capsule.

Any object with ``__dlpack__`` is read by parsing its capsule with ctypes (both
``dltensor_versioned`` and legacy ``dltensor`` capsules).  The capsule is kept, unconsumed, in
:attr:`TensorRef.keepalive`, so the producer's memory stays alive while the pointer is used;
the capsule's own destructor then releases it normally.
"""
from __future__ import annotations

import ctypes

from epcomm.interop.dtypes import DL_CODE
from epcomm.interop.refs import TensorRef, compact_strides

kDLCPU, kDLCUDA, kDLCUDAHost, kDLCUDAManaged = 1, 2, 3, 13
DLPACK_FLAG_READ_ONLY = 1
DLPACK_FLAG_IS_COPIED = 2

CAPSULE_NAME = b"dltensor"
CAPSULE_NAME_V = b"dltensor_versioned"


class DLDevice(ctypes.Structure):
    _fields_ = [("device_type", ctypes.c_int32), ("device_id", ctypes.c_int32)]


class DLDataType(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint8), ("bits", ctypes.c_uint8), ("lanes", ctypes.c_uint16)]


class DLTensor(ctypes.Structure):
    _fields_ = [("data", ctypes.c_void_p), ("device", DLDevice), ("ndim", ctypes.c_int32),
                ("dtype", DLDataType), ("shape", ctypes.POINTER(ctypes.c_int64)),
                ("strides", ctypes.POINTER(ctypes.c_int64)), ("byte_offset", ctypes.c_uint64)]


class DLManagedTensor(ctypes.Structure):
    _fields_ = [("dl_tensor", DLTensor), ("manager_ctx", ctypes.c_void_p),
                ("deleter", ctypes.c_void_p)]


class DLPackVersion(ctypes.Structure):
    _fields_ = [("major", ctypes.c_uint32), ("minor", ctypes.c_uint32)]


class DLManagedTensorVersioned(ctypes.Structure):
    _fields_ = [("version", DLPackVersion), ("manager_ctx", ctypes.c_void_p),
                ("deleter", ctypes.c_void_p), ("flags", ctypes.c_uint64),
                ("dl_tensor", DLTensor)]


api = ctypes.pythonapi
PyCapsule_GetName = api.PyCapsule_GetName
PyCapsule_GetName.restype = ctypes.c_char_p
PyCapsule_GetName.argtypes = [ctypes.py_object]
PyCapsule_GetPointer = api.PyCapsule_GetPointer
PyCapsule_GetPointer.restype = ctypes.c_void_p
PyCapsule_GetPointer.argtypes = [ctypes.py_object, ctypes.c_char_p]
PyCapsule_New = api.PyCapsule_New
PyCapsule_New.restype = ctypes.py_object
PyCapsule_New.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_void_p]
# Raw-pointer variants for the capsule destructor, which gets the capsule as a bare address
# (it runs while the capsule is being deallocated, so it must not take a new reference).
PyCapsule_GetName_raw = ctypes.PYFUNCTYPE(ctypes.c_char_p, ctypes.c_void_p)(
    ("PyCapsule_GetName", api))
PyCapsule_GetPointer_raw = ctypes.PYFUNCTYPE(ctypes.c_void_p, ctypes.c_void_p, ctypes.c_char_p)(
    ("PyCapsule_GetPointer", api))
PyMem_RawMalloc = api.PyMem_RawMalloc
PyMem_RawMalloc.restype = ctypes.c_void_p
PyMem_RawMalloc.argtypes = [ctypes.c_size_t]
PyMem_RawFree = api.PyMem_RawFree
PyMem_RawFree.restype = None
PyMem_RawFree.argtypes = [ctypes.c_void_p]


def parse_capsule(cap, name: str):
    """(DLTensor, flags) of an unconsumed DLPack capsule; TypeError for an unknown capsule name
    or DLPack major version."""
    cname = PyCapsule_GetName(cap)
    if cname == CAPSULE_NAME_V:
        p = PyCapsule_GetPointer(cap, cname)
        m = DLManagedTensorVersioned.from_address(p)
        if m.version.major != 1:
            raise TypeError(f"{name}: unsupported DLPack version {m.version.major}."
                            f"{m.version.minor}")
        return m.dl_tensor, int(m.flags)
    if cname == CAPSULE_NAME:
        p = PyCapsule_GetPointer(cap, cname)
        return DLManagedTensor.from_address(p).dl_tensor, 0
    raise TypeError(f"{name}: __dlpack__() returned a capsule named {cname!r}, expected "
                    f"'dltensor' or 'dltensor_versioned'")


def _export(obj, name: str, pass_stream: bool):
    """``obj.__dlpack__(...)``: a versioned capsule where the producer offers one."""
    kwargs = {}
    if pass_stream and hasattr(obj, "__dlpack_device__"):
        try:
            dev_type = int(obj.__dlpack_device__()[0])
        except Exception:
            dev_type = -1
        if dev_type in (kDLCUDA, kDLCUDAManaged):
            # We consume on the legacy default stream (current_stream('dlpack') == 0); in the
            # DLPack protocol that stream is spelled 1.
            kwargs["stream"] = 1
    try:
        try:
            return obj.__dlpack__(max_version=(1, 1), **kwargs)
        except TypeError:
            return obj.__dlpack__(**kwargs)
    except (BufferError, RuntimeError, ValueError, TypeError) as e:
        raise TypeError(f"{name}: cannot export {type(obj).__name__} through DLPack: "
                        f"{e}") from None


def ref_dlpack(obj, name: str, pass_stream: bool = True) -> TensorRef:
    """A TensorRef (framework 'dlpack') to any object with ``__dlpack__``; the capsule is its
    keepalive.  An unknown dtype is reported as '?dlpack(...)'.  Raises TypeError when the export
    fails, ValueError for a device other than CUDA or CPU."""
    cap = _export(obj, name, pass_stream)
    t, flags = parse_capsule(cap, name)
    code, bits, lanes = t.dtype.code, t.dtype.bits, t.dtype.lanes
    dt = DL_CODE.get((code, bits)) if lanes == 1 else None
    if dt is None:
        dt = f"?dlpack(code={code}, bits={bits}, lanes={lanes})"
    ndim = t.ndim
    shape = tuple(t.shape[i] for i in range(ndim)) if ndim else ()
    strides = tuple(t.strides[i] for i in range(ndim)) if (ndim and t.strides) \
        else compact_strides(shape)
    ptr = (t.data or 0) + t.byte_offset
    dtype_dev, did = t.device.device_type, t.device.device_id
    if dtype_dev in (kDLCUDA, kDLCUDAManaged):
        dev = "cuda"
    elif dtype_dev in (kDLCPU, kDLCUDAHost):
        dev, did = "cpu", -1
    else:
        raise ValueError(f"{name}: expected a CUDA or CPU tensor, got DLPack device type "
                         f"{dtype_dev}")
    return TensorRef(ptr, shape, strides, dt, dev, did, "dlpack", obj, cap,
                     bool(flags & DLPACK_FLAG_READ_ONLY))
