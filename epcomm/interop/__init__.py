"""Framework interop: borrowed views of caller arrays, and outputs in the caller's framework.

epcomm's public API takes arrays from PyTorch, CuPy, JAX (and NumPy for host data) and hands
results back in the same framework.  Kernels are launched with raw pointers, so this module
turns any supported array into a :class:`TensorRef` -- a small, borrowed view (pointer, shape,
strides in elements, dtype name, device) -- and allocates outputs with :func:`empty` /
:func:`zeros`.

Paths, fastest first:

* ``torch.Tensor``: ``data_ptr()``, ``shape``, ``stride()`` (no DLPack round trip);
* ``cupy.ndarray``: ``.data.ptr``, ``.shape``, ``.strides`` (bytes, divided by the item size);
* ``jax.Array`` (single device, default layout): ``unsafe_buffer_pointer()``; any other JAX
  array that lives on one device (a non-default memory layout, say) goes through DLPack, which
  reports its real strides;
* ``numpy.ndarray``: ``__array_interface__`` (ml_dtypes' bfloat16 / float8 included);
* anything else with ``__dlpack__``: the DLPack capsule is parsed with ctypes (both
  ``dltensor_versioned`` and legacy ``dltensor`` capsules) and kept, unconsumed, in
  :attr:`TensorRef.keepalive`, so the producer's memory stays alive while the pointer is used;
  the capsule's own destructor then releases it normally.

dtype names are framework neutral (:data:`DTYPES`).  CuPy has no bfloat16 or float8 dtypes: a
CuPy ``uint16`` array is accepted where ``'bfloat16'`` is requested and a CuPy ``uint8`` array
where ``'float8_e4m3fn'`` / ``'float8_e5m2'`` is requested (the :class:`TensorRef` then reports
the requested dtype), and :func:`empty` / :func:`zeros` return such ``uint16`` / ``uint8``
arrays for those dtypes.

JAX arrays are immutable: :func:`as_tensor` on a JAX array is for reading only.  JAX outputs
are allocated by an :class:`Exporter` (memory that epcomm owns), written by the kernels and then
handed to JAX zero-copy through DLPack by :func:`finish`.

Importing this module imports neither torch, CuPy nor JAX and does not touch a GPU: each
framework is imported the first time an object of it is seen (it is then already imported).
"""
from __future__ import annotations

import atexit
import ctypes
import sys
import weakref

__all__ = [
    "DTYPES", "ITEMSIZE", "TensorRef", "Exporter", "framework_of", "as_tensor", "current_stream",
    "empty", "zeros", "finish", "wrap_pointer", "as_index_tensor", "to_numpy", "from_numpy",
]

DTYPES = ("bool", "int8", "uint8", "int16", "uint16", "int32", "uint32", "int64", "uint64",
          "float16", "bfloat16", "float32", "float64", "float8_e4m3fn", "float8_e5m2")

ITEMSIZE = {
    "bool": 1, "int8": 1, "uint8": 1, "int16": 2, "uint16": 2, "int32": 4, "uint32": 4,
    "int64": 8, "uint64": 8, "float16": 2, "bfloat16": 2, "float32": 4, "float64": 8,
    "float8_e4m3fn": 1, "float8_e5m2": 1,
}

FRAMEWORKS = ("torch", "cupy", "jax", "numpy", "dlpack")

# dtypes CuPy cannot represent, and the same-size unsigned integer dtype that stands for them
_CUPY_STANDIN = {"bfloat16": "uint16", "float8_e4m3fn": "uint8", "float8_e5m2": "uint8"}

# ---- DLPack constants (checked against torch 2.13 and jax 0.10 exports) ----------------------
kDLCPU, kDLCUDA, kDLCUDAHost, kDLCUDAManaged = 1, 2, 3, 13
_DL_CODE = {  # (type code, bits) -> dtype name
    (0, 8): "int8", (0, 16): "int16", (0, 32): "int32", (0, 64): "int64",
    (1, 8): "uint8", (1, 16): "uint16", (1, 32): "uint32", (1, 64): "uint64",
    (2, 16): "float16", (2, 32): "float32", (2, 64): "float64",
    (4, 16): "bfloat16", (6, 8): "bool", (10, 8): "float8_e4m3fn", (12, 8): "float8_e5m2",
}
_DL_OF_NAME = {name: code for code, name in _DL_CODE.items()}
_DLPACK_FLAG_READ_ONLY = 1
_DLPACK_FLAG_IS_COPIED = 2

_CAPSULE_NAME = b"dltensor"
_CAPSULE_NAME_V = b"dltensor_versioned"


# =============================================================================================
# TensorRef
# =============================================================================================
class TensorRef:
    """A borrowed view of an array: raw pointer, shape, strides (in elements) and dtype name.

    ``obj`` is the caller's object and ``keepalive`` anything else (a DLPack capsule, an owner)
    that must outlive the use of ``ptr``; both are held by the ref.
    """

    __slots__ = ("ptr", "shape", "strides", "dtype", "device_type", "device_id", "framework",
                 "obj", "keepalive", "readonly", "widened")

    def __init__(self, ptr: int, shape: tuple, strides: tuple, dtype: str, device_type: str,
                 device_id: int, framework: str, obj=None, keepalive=None, readonly: bool = False):
        self.ptr = ptr
        self.shape = shape
        self.strides = strides
        self.dtype = dtype
        self.device_type = device_type
        self.device_id = device_id
        self.framework = framework
        self.obj = obj
        self.keepalive = keepalive
        self.readonly = readonly
        # True when ptr is a widening copy queued on the caller's stream (as_index_tensor): a
        # kernel on another stream must then wait for the caller's stream, not only an event.
        self.widened = False

    @property
    def itemsize(self) -> int:
        return ITEMSIZE[self.dtype]

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def nbytes(self) -> int:
        return self.numel * ITEMSIZE[self.dtype]

    @property
    def is_contiguous(self) -> bool:
        """C (row-major) contiguous; strides of size-1 dimensions are ignored."""
        return _c_contiguous(self.shape, self.strides)

    @property
    def is_col_major_2d(self) -> bool:
        """2-D with strides (1, shape[0]), strides of size-1 dimensions ignored."""
        if len(self.shape) != 2:
            return False
        m, n = self.shape
        if m * n == 0:
            return True
        s0, s1 = self.strides
        return (m == 1 or s0 == 1) and (n == 1 or s1 == m)

    @property
    def device(self) -> str:
        return "cpu" if self.device_type == "cpu" else f"cuda:{self.device_id}"

    def __repr__(self) -> str:
        return (f"TensorRef({self.framework}, ptr=0x{self.ptr:x}, shape={self.shape}, "
                f"strides={self.strides}, dtype={self.dtype}, device={self.device})")


def _c_contiguous(shape, strides) -> bool:
    expected = 1
    for i in range(len(shape) - 1, -1, -1):
        n = shape[i]
        if n != 1 and strides[i] != expected:
            return 0 in shape  # an empty array is contiguous whatever its strides
        expected *= n
    return True


_COMPACT: dict = {}


def _compact_strides(shape) -> tuple:
    """Row-major strides (in elements) of ``shape`` (memoized: shapes repeat)."""
    st = _COMPACT.get(shape)
    if st is None:
        out = [0] * len(shape)
        acc = 1
        for i in range(len(shape) - 1, -1, -1):
            out[i] = acc
            acc *= shape[i]
        st = tuple(out)
        if len(_COMPACT) > 4096:
            _COMPACT.clear()
        _COMPACT[tuple(shape)] = st
    return st


# =============================================================================================
# Framework detection (cached per type)
# =============================================================================================
_FW_BY_TYPE: dict = {}
_UNSUPPORTED = ("expected a torch.Tensor, cupy.ndarray, jax.Array, numpy.ndarray or an object "
                "with __dlpack__")


def _classify(tp) -> str:
    """Framework name of objects of type ``tp``, or '' if unsupported.  Imports nothing new."""
    mod = getattr(tp, "__module__", None) or ""
    top = mod.partition(".")[0]
    if tp is Exporter:
        return "jax"
    if top == "torch":
        torch = sys.modules.get("torch")
        if torch is not None and issubclass(tp, torch.Tensor):
            return "torch"
    elif top == "cupy" or top == "cupy_backends":
        cupy = sys.modules.get("cupy")
        if cupy is not None and issubclass(tp, cupy.ndarray):
            return "cupy"
    elif top in ("jax", "jaxlib"):
        if any(c.__name__ == "Tracer" for c in tp.__mro__):
            return "jax-tracer"
        if hasattr(tp, "unsafe_buffer_pointer") and hasattr(tp, "__dlpack__"):
            return "jax"
    elif top == "numpy":
        np = sys.modules.get("numpy")
        if np is not None and issubclass(tp, np.ndarray):
            return "numpy"
    # subclasses defined outside their framework's package
    torch = sys.modules.get("torch")
    if torch is not None and issubclass(tp, torch.Tensor):
        return "torch"
    cupy = sys.modules.get("cupy")
    if cupy is not None and isinstance(getattr(cupy, "ndarray", None), type) \
            and issubclass(tp, cupy.ndarray):
        return "cupy"
    np = sys.modules.get("numpy")
    if np is not None and issubclass(tp, np.ndarray):
        return "numpy"
    if hasattr(tp, "__dlpack__"):
        return "dlpack"
    return ""


def _framework(obj, name: str) -> str:
    tp = type(obj)
    fw = _FW_BY_TYPE.get(tp)
    if fw is None:
        fw = _classify(tp)
        if len(_FW_BY_TYPE) > 1024:
            _FW_BY_TYPE.clear()
        _FW_BY_TYPE[tp] = fw
    if not fw:
        raise TypeError(f"{name}: {_UNSUPPORTED}, got {tp.__name__}")
    if fw == "jax-tracer":
        raise TypeError(f"{name}: got a JAX tracer ({tp.__name__}); epcomm operations run "
                        f"eagerly and cannot be traced by jax.jit -- call them outside jit")
    return fw


def framework_of(obj) -> str:
    """'torch', 'cupy', 'jax', 'numpy' or 'dlpack' (any other object with ``__dlpack__``).

    An :class:`Exporter` (a pending JAX output) counts as 'jax'.  Raises TypeError, naming the
    type, for anything else.
    """
    return _framework(obj, "obj")


# =============================================================================================
# dtype tables (built lazily, per framework)
# =============================================================================================
_TORCH_DT: dict | None = None
_TORCH_OF_NAME: dict | None = None
_NP_DT: dict | None = None
_NP_OF_NAME: dict | None = None


def _torch_tables():
    global _TORCH_DT, _TORCH_OF_NAME
    if _TORCH_DT is None:
        import torch
        m = {}
        for n in DTYPES:
            t = getattr(torch, n, None)
            if isinstance(t, torch.dtype):
                m[t] = n
        _TORCH_OF_NAME = {n: t for t, n in m.items()}
        _TORCH_DT = m
    return _TORCH_DT, _TORCH_OF_NAME


def _np_tables():
    """numpy dtype -> name, and name -> numpy dtype (bf16 / fp8 through ml_dtypes)."""
    global _NP_DT, _NP_OF_NAME
    if _NP_DT is None:
        import numpy as np
        m = {}
        for n in DTYPES:
            try:
                d = np.dtype(n)
            except TypeError:
                try:
                    import ml_dtypes
                    d = np.dtype(getattr(ml_dtypes, n))
                except (ImportError, AttributeError, TypeError):
                    continue
            m[d] = n
        _NP_OF_NAME = {n: d for d, n in m.items()}
        _NP_DT = m
    return _NP_DT, _NP_OF_NAME


def _torch_dtype_str(dt) -> str:
    s = str(dt)
    return s[6:] if s.startswith("torch.") else s


# =============================================================================================
# Per-framework builders (no validation; may raise TypeError/ValueError for unusable objects)
# =============================================================================================
def _ref_torch(t, name: str) -> TensorRef:
    dtab = _TORCH_DT if _TORCH_DT is not None else _torch_tables()[0]
    dt = dtab.get(t.dtype)
    if dt is None:
        dt = "?" + _torch_dtype_str(t.dtype)
    if t.is_cuda:
        dev, did = "cuda", t.get_device()
    elif t.is_cpu:
        dev, did = "cpu", -1
    else:
        raise ValueError(f"{name}: expected a CUDA or CPU tensor, got a {t.device.type} tensor")
    try:
        ptr = t.data_ptr()
    except RuntimeError as e:
        raise TypeError(f"{name}: cannot take the data pointer of this tensor "
                        f"(layout {t.layout}): {e}") from None
    return TensorRef(ptr, tuple(t.shape), t.stride(), dt, dev, did, "torch", t)


def _ref_cupy(a, name: str) -> TensorRef:
    dtab = _NP_DT if _NP_DT is not None else _np_tables()[0]
    d = a.dtype
    dt = dtab.get(d)
    if dt is None:
        dt = "?" + str(d)
    isz = d.itemsize
    bs = a.strides
    st = tuple(s // isz for s in bs)
    if any(s % isz for s in bs):
        raise ValueError(f"{name}: strides {bs} (bytes) are not multiples of the item size "
                         f"{isz}")
    return TensorRef(a.data.ptr, a.shape, st, dt, "cuda", a.device.id, "cupy", a)


def _ref_numpy(a, name: str) -> TensorRef:
    dtab = _NP_DT if _NP_DT is not None else _np_tables()[0]
    d = a.dtype
    dt = dtab.get(d)
    if dt is None:
        dt = "?" + str(d)
    isz = d.itemsize
    bs = a.strides
    if any(s % isz for s in bs):
        raise ValueError(f"{name}: strides {bs} (bytes) are not multiples of the item size "
                         f"{isz}")
    ai = a.__array_interface__
    return TensorRef(ai["data"][0], a.shape, tuple(s // isz for s in bs), dt, "cpu", -1,
                     "numpy", a, None, not a.flags.writeable)


# ---- JAX -----------------------------------------------------------------------------------
_JAX_PLACEMENT: dict = {}  # sharding -> (device_type, device_id) or an error string
_JAX_DEFAULT_LAYOUT: dict = {}  # PjRtLayout -> bool (row-major, untiled)


def _jax_placement(sharding):
    try:
        devs = sharding.device_set
    except Exception as e:  # pragma: no cover - unusual sharding
        return f"cannot determine the device of this array ({e})"
    if len(devs) != 1:
        return (f"expected an array on a single device, got one sharded over {len(devs)} "
                f"devices")
    (d,) = tuple(devs)
    mk = getattr(sharding, "memory_kind", None)
    platform = d.platform
    if platform == "cpu" or mk in ("pinned_host", "unpinned_host"):
        return ("cpu", -1)
    if platform in ("gpu", "cuda"):
        return ("cuda", int(d.local_hardware_id))
    return f"expected a CUDA or CPU array, got a {platform} array"


def _jax_layout_is_default(layout, ndim: int) -> bool:
    ok = _JAX_DEFAULT_LAYOUT.get(layout)
    if ok is None:
        expected = "{" + ",".join(str(i) for i in range(ndim - 1, -1, -1)) + "}"
        ok = str(layout) == expected
        if len(_JAX_DEFAULT_LAYOUT) > 256:
            _JAX_DEFAULT_LAYOUT.clear()
        _JAX_DEFAULT_LAYOUT[layout] = ok
    return ok


def _ref_jax(a, name: str) -> TensorRef:
    if a.is_deleted():
        raise ValueError(f"{name}: this JAX array has been deleted (donated?)")
    sh = a.sharding
    pl = _JAX_PLACEMENT.get(sh)
    if pl is None:
        pl = _jax_placement(sh)
        if len(_JAX_PLACEMENT) > 256:
            _JAX_PLACEMENT.clear()
        _JAX_PLACEMENT[sh] = pl
    if type(pl) is str:
        raise ValueError(f"{name}: {pl}")
    shape = a.shape
    try:
        layout = a._pjrt_layout
        default = _jax_layout_is_default(layout, len(shape))
    except Exception:
        default = False
    if not default:
        # Non-default layout (or a jax without _pjrt_layout): DLPack reports the real strides.
        ref = _ref_dlpack(a, name, pass_stream=False)
        ref.framework = "jax"
        ref.readonly = True
        return ref
    dtab = _NP_DT if _NP_DT is not None else _np_tables()[0]
    d = a.dtype
    dt = dtab.get(d)
    if dt is None:
        dt = "?" + str(d)
    return TensorRef(a.unsafe_buffer_pointer(), shape, _compact_strides(shape), dt, pl[0], pl[1],
                     "jax", a, None, True)


# ---- generic DLPack ------------------------------------------------------------------------
class _DLDevice(ctypes.Structure):
    _fields_ = [("device_type", ctypes.c_int32), ("device_id", ctypes.c_int32)]


class _DLDataType(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint8), ("bits", ctypes.c_uint8), ("lanes", ctypes.c_uint16)]


class _DLTensor(ctypes.Structure):
    _fields_ = [("data", ctypes.c_void_p), ("device", _DLDevice), ("ndim", ctypes.c_int32),
                ("dtype", _DLDataType), ("shape", ctypes.POINTER(ctypes.c_int64)),
                ("strides", ctypes.POINTER(ctypes.c_int64)), ("byte_offset", ctypes.c_uint64)]


class _DLManagedTensor(ctypes.Structure):
    _fields_ = [("dl_tensor", _DLTensor), ("manager_ctx", ctypes.c_void_p),
                ("deleter", ctypes.c_void_p)]


class _DLPackVersion(ctypes.Structure):
    _fields_ = [("major", ctypes.c_uint32), ("minor", ctypes.c_uint32)]


class _DLManagedTensorVersioned(ctypes.Structure):
    _fields_ = [("version", _DLPackVersion), ("manager_ctx", ctypes.c_void_p),
                ("deleter", ctypes.c_void_p), ("flags", ctypes.c_uint64),
                ("dl_tensor", _DLTensor)]


_api = ctypes.pythonapi
_PyCapsule_GetName = _api.PyCapsule_GetName
_PyCapsule_GetName.restype = ctypes.c_char_p
_PyCapsule_GetName.argtypes = [ctypes.py_object]
_PyCapsule_GetPointer = _api.PyCapsule_GetPointer
_PyCapsule_GetPointer.restype = ctypes.c_void_p
_PyCapsule_GetPointer.argtypes = [ctypes.py_object, ctypes.c_char_p]
_PyCapsule_New = _api.PyCapsule_New
_PyCapsule_New.restype = ctypes.py_object
_PyCapsule_New.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_void_p]
# Raw-pointer variants for the capsule destructor, which gets the capsule as a bare address
# (it runs while the capsule is being deallocated, so it must not take a new reference).
_PyCapsule_GetName_raw = ctypes.PYFUNCTYPE(ctypes.c_char_p, ctypes.c_void_p)(
    ("PyCapsule_GetName", _api))
_PyCapsule_GetPointer_raw = ctypes.PYFUNCTYPE(ctypes.c_void_p, ctypes.c_void_p, ctypes.c_char_p)(
    ("PyCapsule_GetPointer", _api))
_PyMem_RawMalloc = _api.PyMem_RawMalloc
_PyMem_RawMalloc.restype = ctypes.c_void_p
_PyMem_RawMalloc.argtypes = [ctypes.c_size_t]
_PyMem_RawFree = _api.PyMem_RawFree
_PyMem_RawFree.restype = None
_PyMem_RawFree.argtypes = [ctypes.c_void_p]


def _parse_capsule(cap, name: str):
    """(DLTensor, flags) of an unconsumed DLPack capsule."""
    cname = _PyCapsule_GetName(cap)
    if cname == _CAPSULE_NAME_V:
        p = _PyCapsule_GetPointer(cap, cname)
        m = _DLManagedTensorVersioned.from_address(p)
        if m.version.major != 1:
            raise TypeError(f"{name}: unsupported DLPack version {m.version.major}."
                            f"{m.version.minor}")
        return m.dl_tensor, int(m.flags)
    if cname == _CAPSULE_NAME:
        p = _PyCapsule_GetPointer(cap, cname)
        return _DLManagedTensor.from_address(p).dl_tensor, 0
    raise TypeError(f"{name}: __dlpack__() returned a capsule named {cname!r}, expected "
                    f"'dltensor' or 'dltensor_versioned'")


def _ref_dlpack(obj, name: str, pass_stream: bool = True) -> TensorRef:
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
            cap = obj.__dlpack__(max_version=(1, 1), **kwargs)
        except TypeError:
            cap = obj.__dlpack__(**kwargs)
    except (BufferError, RuntimeError, ValueError, TypeError) as e:
        raise TypeError(f"{name}: cannot export {type(obj).__name__} through DLPack: "
                        f"{e}") from None
    t, flags = _parse_capsule(cap, name)
    code, bits, lanes = t.dtype.code, t.dtype.bits, t.dtype.lanes
    dt = _DL_CODE.get((code, bits)) if lanes == 1 else None
    if dt is None:
        dt = f"?dlpack(code={code}, bits={bits}, lanes={lanes})"
    ndim = t.ndim
    shape = tuple(t.shape[i] for i in range(ndim)) if ndim else ()
    strides = tuple(t.strides[i] for i in range(ndim)) if (ndim and t.strides) \
        else _compact_strides(shape)
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
                     bool(flags & _DLPACK_FLAG_READ_ONLY))


_BUILDERS = {"torch": _ref_torch, "cupy": _ref_cupy, "jax": _ref_jax, "numpy": _ref_numpy,
             "dlpack": _ref_dlpack}


# =============================================================================================
# as_tensor
# =============================================================================================
_FIX_HINT = {
    "torch": "call .contiguous()",
    "cupy": "call cupy.ascontiguousarray()",
    "numpy": "call numpy.ascontiguousarray()",
    "jax": "make a row-major copy",
    "dlpack": "pass a contiguous copy",
}


def _fmt_shape(shape) -> str:
    parts = ["N" if s is None else str(s) for s in shape]
    return "(" + ", ".join(parts) + (",)" if len(parts) == 1 else ")")


def _fmt_dtypes(dtype) -> str:
    if isinstance(dtype, str):
        return dtype
    dtype = tuple(dtype)
    if len(dtype) == 1:
        return dtype[0]
    return ", ".join(dtype[:-1]) + " or " + dtype[-1]


def as_tensor(obj, name: str, *, dtype=None, ndim=None, shape=None, device: str = "cuda",
              contiguous: bool = True, allow_none: bool = False, sync_jax: bool = True):
    """Validate ``obj`` and return a :class:`TensorRef` to it (or None, see ``allow_none``).

    Args:
        obj: a torch.Tensor, cupy.ndarray, jax.Array, numpy.ndarray or any object with
            ``__dlpack__`` (an :class:`Exporter` too).
        name: the argument's name, used in every error message.
        dtype: None (any supported dtype), a name from :data:`DTYPES`, or a tuple of names.
            A CuPy ``uint16`` array is accepted where 'bfloat16' is requested and a CuPy
            ``uint8`` array where 'float8_e4m3fn' / 'float8_e5m2' is requested (CuPy has no
            such dtypes); the ref then reports the requested dtype.
        ndim: required number of dimensions (implied by ``shape``).
        shape: required shape; entries are ints, or None (rendered 'N' in messages) or a str
            (a name shown in messages) for any size.
        device: 'cuda', 'cpu' or 'any'.
        contiguous: require C (row-major) contiguity; strides of size-1 dims are ignored.
        allow_none: return None for None instead of raising ValueError.
        sync_jax: for JAX arrays, wait (``block_until_ready``) until the array is computed,
            since JAX's work is not on a stream epcomm can order against.  Done after all the
            checks passed.

    Raises:
        TypeError: unsupported object type, or wrong dtype.
        ValueError: None, wrong ndim / shape, wrong device, or non-contiguous.
    """
    if obj is None:
        if allow_none:
            return None
        raise ValueError(f"{name}: expected a tensor, got None")
    tp = type(obj)
    fw = _FW_BY_TYPE.get(tp)
    if fw not in _BUILDERS:
        fw = _framework(obj, name)
    if tp is Exporter:
        ref = obj.ref()
    else:
        ref = _BUILDERS[fw](obj, name)

    # ---- dtype
    dt = ref.dtype
    if dtype is not None:
        if dtype.__class__ is str:
            ok = dt == dtype
        else:
            ok = dt in dtype
        if not ok:
            sub = None
            if fw == "cupy":
                for want in ((dtype,) if dtype.__class__ is str else dtype):
                    if _CUPY_STANDIN.get(want) == dt:
                        sub = want
                        break
            if sub is None:
                got = dt[1:] if dt[0] == "?" else dt
                raise TypeError(f"{name}: expected dtype {_fmt_dtypes(dtype)}, got {got}")
            ref.dtype = sub
    elif dt[0] == "?":
        raise TypeError(f"{name}: unsupported dtype {dt[1:]}; supported: {', '.join(DTYPES)}")

    # ---- ndim / shape
    sh = ref.shape
    if shape is not None:
        if ndim is not None and ndim != len(shape):
            raise ValueError(f"{name}: inconsistent checks: ndim={ndim} but shape={shape}")
        bad = len(sh) != len(shape)
        if not bad:
            i = 0
            for want in shape:
                if want.__class__ is int and want != sh[i]:
                    bad = True
                    break
                i += 1
        if bad:
            raise ValueError(f"{name}: expected shape {_fmt_shape(shape)}, got "
                             f"{_fmt_shape(sh)}")
    elif ndim is not None and len(sh) != ndim:
        raise ValueError(f"{name}: expected a {ndim}-D tensor, got a {len(sh)}-D tensor "
                         f"of shape {_fmt_shape(sh)}")

    # ---- device
    if device != "any" and ref.device_type != device:
        if device == "cuda":
            raise ValueError(f"{name}: expected a CUDA tensor, got a CPU tensor")
        if device == "cpu":
            raise ValueError(f"{name}: expected a CPU tensor, got a CUDA tensor "
                             f"(cuda:{ref.device_id})")
        raise ValueError(f"{name}: bad device check {device!r} (use 'cuda', 'cpu' or 'any')")

    # ---- contiguity
    if contiguous:
        ok = obj.is_contiguous() if fw == "torch" else _c_contiguous(sh, ref.strides)
        if not ok:
            raise ValueError(f"{name}: must be contiguous (row-major); {_FIX_HINT[fw]}")

    if sync_jax and fw == "jax" and tp is not Exporter:
        if not obj.is_ready():
            obj.block_until_ready()
    return ref


# =============================================================================================
# Streams
# =============================================================================================
_torch_raw_stream = None


def current_stream(framework: str, device_id: int) -> int:
    """The raw ``cudaStream_t`` (an int) that the caller's work in ``framework`` is on.

    torch: the current stream of ``device_id``; cupy: CuPy's current stream of that device;
    jax / numpy / dlpack: 0, the legacy default stream (JAX has no user-visible stream, so
    :func:`as_tensor` waits for JAX inputs, and :func:`finish` makes JAX wait for outputs).
    """
    global _torch_raw_stream
    if framework == "torch":
        f = _torch_raw_stream
        if f is None:
            import torch
            f = getattr(torch._C, "_cuda_getCurrentRawStream", None)
            if f is None:  # pragma: no cover - older/newer torch
                def f(dev):
                    return torch.cuda.current_stream(dev).cuda_stream
            _torch_raw_stream = f
        return int(f(device_id))
    if framework == "cupy":
        import cupy
        return int(cupy.cuda.get_current_stream(device_id).ptr)
    if framework in ("jax", "numpy", "dlpack"):
        return 0
    raise ValueError(f"unknown framework {framework!r}; expected one of {', '.join(FRAMEWORKS)}")


# =============================================================================================
# Owned memory and the DLPack exporter (JAX outputs)
# =============================================================================================
# Live allocations, for tests.  A WeakSet rather than a locked counter: __del__ may run inside
# a garbage collection triggered anywhere, also on a thread that holds such a lock.
_OWNERS: "weakref.WeakSet" = weakref.WeakSet()


class _Allocation:
    """Memory epcomm owns: host (a numpy byte buffer) or device (cuMemAlloc).

    ``live_count()`` is the number of allocations not yet released (tests use it).
    """

    __slots__ = ("ptr", "nbytes", "device_type", "device_id", "_buf", "_counted", "__weakref__")

    _ALIGN = 256

    def __init__(self, nbytes: int, device_type: str, device_id: int):
        self._counted = False
        self.ptr = 0
        self._buf = None
        self.nbytes = int(nbytes)
        self.device_type = device_type
        self.device_id = device_id
        if device_type == "cpu":
            import numpy as np
            buf = np.empty(self.nbytes + self._ALIGN, dtype=np.uint8)
            base = buf.__array_interface__["data"][0]
            off = (-base) % self._ALIGN
            self._buf = buf
            self.ptr = base + off
        elif device_type == "cuda":
            from epcomm.runtime import driver
            with driver.on_device(device_id):
                self.ptr = driver.mem_alloc(self.nbytes)  # 256-byte aligned
        else:
            raise ValueError(f"device_type must be 'cuda' or 'cpu', got {device_type!r}")
        _OWNERS.add(self)
        self._counted = True

    def __del__(self):
        try:
            if not getattr(self, "_counted", False):
                return
            self._counted = False
            if self.device_type == "cuda" and self.ptr:
                from epcomm.runtime import driver
                with driver.on_device(self.device_id):
                    driver.mem_free(self.ptr)
            self._buf = None
            self.ptr = 0
        except Exception:  # interpreter shutdown, driver gone: nothing useful to do
            pass

    @staticmethod
    def live_count() -> int:
        return len(_OWNERS)


# managed-tensor address -> (owner, offset of its deleter field); popped by the deleter.  No
# lock: single dict operations are atomic, and a lock could deadlock when a garbage collection
# inside the locked region drops a capsule whose destructor needs the same lock.
_EXPORTED: dict = {}


def _release_managed(addr: int) -> None:
    entry = _EXPORTED.pop(addr, None)
    if entry is not None:
        _PyMem_RawFree(addr)
    del entry  # drops the owner (may free memory)


def _managed_deleter(addr):
    # Called by the consumer (or by our capsule destructor) once the tensor is no longer used;
    # may run on any thread (ctypes takes the GIL).
    try:
        _release_managed(addr)
    except Exception:  # pragma: no cover - shutdown
        pass


def _capsule_destructor(cap_addr):
    # Runs when an exported capsule is deallocated: if nobody consumed it (a consumer renames
    # it to 'used_dltensor[_versioned]'), release the managed tensor ourselves.
    try:
        cname = _PyCapsule_GetName_raw(cap_addr)
        if cname == _CAPSULE_NAME or cname == _CAPSULE_NAME_V:
            p = _PyCapsule_GetPointer_raw(cap_addr, cname)
            if p:
                _release_managed(p)
    except BaseException:  # pragma: no cover - never let an exception escape a destructor
        pass


_DELETER_FN = ctypes.CFUNCTYPE(None, ctypes.c_void_p)(_managed_deleter)
_CAPSULE_DESTRUCTOR_FN = ctypes.CFUNCTYPE(None, ctypes.c_void_p)(_capsule_destructor)
_DELETER_ADDR = ctypes.cast(_DELETER_FN, ctypes.c_void_p).value
_CAPSULE_DESTRUCTOR_ADDR = ctypes.cast(_CAPSULE_DESTRUCTOR_FN, ctypes.c_void_p).value
# The two C entry points must outlive this module (a consumer may call the deleter while the
# interpreter tears modules down): take one reference that is never dropped.
for _f in (_DELETER_FN, _CAPSULE_DESTRUCTOR_FN):
    _api.Py_IncRef(ctypes.py_object(_f))
del _f

_RAW_FREE_ADDR = ctypes.cast(_PyMem_RawFree, ctypes.c_void_p).value
_V_SIZE = ctypes.sizeof(_DLManagedTensorVersioned)
_L_SIZE = ctypes.sizeof(_DLManagedTensor)
_V_DELETER_OFF = _DLManagedTensorVersioned.deleter.offset
_L_DELETER_OFF = _DLManagedTensor.deleter.offset


@atexit.register
def _disarm_exports() -> None:
    """At exit, disarm every still-exported tensor: its owner is kept for good, and its deleter
    becomes ``PyMem_RawFree`` (which frees just the managed struct and needs no interpreter).

    A consumer that frees the tensor late (JAX at teardown, C++ static destructors) then never
    calls into a finalizing Python.  (Not NULL: JAX calls the deleter without checking.)
    """
    try:
        for addr, entry in list(_EXPORTED.items()):
            ctypes.c_void_p.from_address(addr + entry[1]).value = _RAW_FREE_ADDR
            _LEAKED.append(entry)
        _EXPORTED.clear()
    except Exception:  # pragma: no cover
        pass


_LEAKED: list = []


def _shape_tuple(shape) -> tuple:
    if isinstance(shape, int):
        return (int(shape),)
    out = tuple(int(s) for s in shape)
    if any(s < 0 for s in out):
        raise ValueError(f"shape {out}: sizes must be >= 0")
    return out


def _check_dtype_name(dtype: str) -> str:
    if dtype not in ITEMSIZE:
        raise TypeError(f"unsupported dtype {dtype!r}; supported: {', '.join(DTYPES)}")
    return dtype


class Exporter:
    """Memory epcomm owns, exported through DLPack with a logical shape and dtype.

    Used for JAX outputs: JAX cannot hand out writable memory, so :func:`empty` ('jax') returns
    an Exporter, the kernels write ``ptr``, and :func:`finish` gives the memory to JAX with
    ``jax.dlpack.from_dlpack`` (zero-copy).  Any DLPack consumer works (``torch.from_dlpack``
    too), any number of times; every exported capsule keeps the owner alive until its consumer
    releases it (or, if it is never consumed, until the capsule is dropped).

    ``stream``: the CUDA stream (raw handle) the producer's writes are on, default 0 (the legacy
    default stream).  When a consumer passes a stream to ``__dlpack__``, that stream is made to
    wait for the work queued so far on ``stream`` (an event plus ``cuStreamWaitEvent``); None
    skips this.  Host memory needs no ordering.

    Args to the constructor: ``owner`` (kept alive), ``ptr``, ``shape``, ``dtype`` (a name from
    :data:`DTYPES`), ``device_type`` ('cuda' or 'cpu'), ``device_id``.  :meth:`allocate` builds
    one with fresh memory.
    """

    __slots__ = ("owner", "ptr", "shape", "dtype", "device_type", "device_id", "stream",
                 "__weakref__")

    def __init__(self, owner, ptr: int, shape, dtype: str, device_type: str = "cuda",
                 device_id: int = 0, stream: int | None = 0):
        self.owner = owner
        self.ptr = int(ptr)
        self.shape = _shape_tuple(shape)
        self.dtype = _check_dtype_name(dtype)
        if device_type not in ("cuda", "cpu"):
            raise ValueError(f"device_type must be 'cuda' or 'cpu', got {device_type!r}")
        self.device_type = device_type
        self.device_id = int(device_id) if device_type == "cuda" else -1
        self.stream = stream

    @classmethod
    def allocate(cls, shape, dtype: str, device_type: str = "cuda", device_id: int = 0,
                 stream: int | None = 0) -> "Exporter":
        shape = _shape_tuple(shape)
        _check_dtype_name(dtype)
        n = 1
        for s in shape:
            n *= s
        owner = _Allocation(n * ITEMSIZE[dtype], device_type, device_id)
        return cls(owner, owner.ptr, shape, dtype, device_type, device_id, stream)

    @property
    def nbytes(self) -> int:
        n = ITEMSIZE[self.dtype]
        for s in self.shape:
            n *= s
        return n

    def ref(self) -> TensorRef:
        return TensorRef(self.ptr, self.shape, _compact_strides(self.shape), self.dtype,
                         self.device_type, self.device_id, "jax", self, self.owner)

    def __dlpack_device__(self):
        if self.device_type == "cuda":
            return (kDLCUDA, self.device_id)
        return (kDLCPU, 0)

    def _order_before(self, consumer_stream) -> None:
        if self.device_type != "cuda" or consumer_stream is None or self.stream is None:
            return
        consumer = int(consumer_stream)
        if consumer == -1:  # the consumer asked for no synchronization
            return
        producer = int(self.stream)
        legacy = (0, 1)
        if consumer == producer or (consumer in legacy and producer in legacy):
            return
        from epcomm.runtime import driver
        with driver.on_device(self.device_id):
            ev = driver.event_create()
            try:
                driver.event_record(ev, producer)
                driver.stream_wait_event(consumer, ev)
            finally:
                driver.event_destroy(ev)

    def __dlpack__(self, *, stream=None, max_version=None, dl_device=None, copy=None):
        if dl_device is not None:
            want = (int(dl_device[0]), int(dl_device[1]))
            have = self.__dlpack_device__()
            if want != (int(have[0]), int(have[1])):
                raise BufferError(f"Exporter lives on {have}, cannot export to {want}")
        if copy:
            raise BufferError("Exporter does not copy (copy=True requested)")
        self._order_before(stream)  # host memory: nothing to order, whatever stream says

        versioned = max_version is not None and tuple(max_version)[0] >= 1
        ndim = len(self.shape)
        size = _V_SIZE if versioned else _L_SIZE
        head = (size + 7) // 8 * 8
        addr = _PyMem_RawMalloc(head + 16 * ndim)
        if not addr:
            raise MemoryError("PyMem_RawMalloc failed")
        try:
            ctypes.memset(addr, 0, head + 16 * ndim)
            if versioned:
                m = _DLManagedTensorVersioned.from_address(addr)
                m.version.major, m.version.minor = 1, 1
                m.flags = 0
                deleter_off = _V_DELETER_OFF
            else:
                m = _DLManagedTensor.from_address(addr)
                deleter_off = _L_DELETER_OFF
            m.deleter = _DELETER_ADDR
            m.manager_ctx = addr
            t = m.dl_tensor
            t.data = self.ptr or None
            dev_type, dev_id = self.__dlpack_device__()
            t.device.device_type, t.device.device_id = dev_type, dev_id
            t.ndim = ndim
            code, bits = _DL_OF_NAME[self.dtype]
            t.dtype.code, t.dtype.bits, t.dtype.lanes = code, bits, 1
            if ndim:
                arr = (ctypes.c_int64 * (2 * ndim)).from_address(addr + head)
                arr[:ndim] = self.shape
                arr[ndim:] = _compact_strides(self.shape)
                t.shape = ctypes.cast(addr + head, ctypes.POINTER(ctypes.c_int64))
                t.strides = ctypes.cast(addr + head + 8 * ndim, ctypes.POINTER(ctypes.c_int64))
            t.byte_offset = 0
            _EXPORTED[addr] = (self.owner, deleter_off)
        except BaseException:
            _PyMem_RawFree(addr)
            raise
        try:
            return _PyCapsule_New(addr, _CAPSULE_NAME_V if versioned else _CAPSULE_NAME,
                                  _CAPSULE_DESTRUCTOR_ADDR)
        except BaseException:
            _release_managed(addr)
            raise

    def __repr__(self) -> str:
        dev = "cpu" if self.device_type == "cpu" else f"cuda:{self.device_id}"
        return f"Exporter(shape={self.shape}, dtype={self.dtype}, device={dev}, ptr=0x{self.ptr:x})"


def live_exports() -> int:
    """Number of exported DLPack tensors not yet released by their consumers (for tests)."""
    return len(_EXPORTED)


# =============================================================================================
# Allocation in the caller's framework
# =============================================================================================
_TORCH_DEVICES: dict = {}


def _torch_device(device_type: str, device_id: int):
    # A cached torch.device: torch parses a device string on every call (microseconds that sit
    # on the critical path of a CPU-synchronised dispatch).
    key = (device_type, device_id)
    d = _TORCH_DEVICES.get(key)
    if d is None:
        import torch
        d = _TORCH_DEVICES[key] = torch.device("cpu" if device_type == "cpu" else f"cuda:{device_id}")
    return d


def _alloc(framework: str, shape, dtype: str, device_type: str, device_id: int, zero: bool):
    shape = _shape_tuple(shape)
    _check_dtype_name(dtype)
    if device_type not in ("cuda", "cpu"):
        raise ValueError(f"device_type must be 'cuda' or 'cpu', got {device_type!r}")
    if framework == "torch":
        # Lean on purpose: a CPU-synchronised dispatch allocates its outputs on the critical
        # path, and the ref of a tensor we just made needs no inspection.
        import torch
        tdt = _torch_tables()[1].get(dtype)
        if tdt is None:
            raise TypeError(f"this torch has no dtype {dtype}")
        f = torch.zeros if zero else torch.empty
        t = f(shape, dtype=tdt, device=_torch_device(device_type, device_id))
        return t, TensorRef(t.data_ptr(), shape, t.stride(), dtype, device_type,
                            device_id if device_type == "cuda" else -1, "torch", t)
    if framework == "cupy":
        if device_type != "cuda":
            raise ValueError("cupy arrays live on CUDA devices (device_type='cuda')")
        import cupy
        npdt = _np_tables()[1][_CUPY_STANDIN.get(dtype, dtype)]
        with cupy.cuda.Device(device_id):
            a = (cupy.zeros if zero else cupy.empty)(shape, dtype=npdt)
        ref = _ref_cupy(a, "out")
        ref.dtype = dtype
        return a, ref
    if framework == "numpy":
        if device_type != "cpu":
            raise ValueError("numpy arrays live on the host (device_type='cpu')")
        import numpy as np
        npdt = _np_tables()[1].get(dtype)
        if npdt is None:
            raise TypeError(f"numpy dtype {dtype} needs the ml_dtypes package")
        a = (np.zeros if zero else np.empty)(shape, dtype=npdt)
        return a, _ref_numpy(a, "out")
    if framework in ("jax", "dlpack"):
        e = Exporter.allocate(shape, dtype, device_type, device_id)
        if zero and e.nbytes:
            if device_type == "cpu":
                ctypes.memset(e.ptr, 0, e.nbytes)
            else:
                from epcomm.runtime import driver
                with driver.on_device(device_id):
                    driver.memset_d8_async(e.ptr, 0, e.nbytes, current_stream(framework, device_id))
        ref = e.ref()
        ref.framework = framework
        return e, ref
    raise ValueError(f"unknown framework {framework!r}; expected one of {', '.join(FRAMEWORKS)}")


def empty(framework: str, shape, dtype: str, device_type: str = "cuda", device_id: int = 0):
    """Allocate an uninitialised output in ``framework``: returns ``(array, TensorRef)``.

    torch: ``torch.empty``; cupy: ``cupy.empty`` under the device (``uint16`` for bfloat16,
    ``uint8`` for float8; the ref reports the logical dtype); numpy: ``numpy.empty`` with
    ml_dtypes dtypes; jax (and 'dlpack'): an :class:`Exporter`, to be turned into a JAX array by
    :func:`finish` once written.
    """
    return _alloc(framework, shape, dtype, device_type, device_id, False)


def zeros(framework: str, shape, dtype: str, device_type: str = "cuda", device_id: int = 0):
    """Like :func:`empty`, zero-filled (on the framework's current stream for device memory)."""
    return _alloc(framework, shape, dtype, device_type, device_id, True)


def narrow_obj(obj, rows: int):
    """The first ``rows`` rows of an array made by :func:`empty` (torch, CuPy, NumPy or an
    :class:`Exporter`), as a view of the same memory; ``obj`` itself when it has that many
    rows.  The caller guarantees 0 <= rows <= the array's rows (:func:`narrow_rows` checks);
    used where a dispatch's outputs are cut to the received rows, which is on the GPU's
    critical path (no TensorRef is built)."""
    if type(obj) is Exporter:
        if rows == obj.shape[0]:
            return obj
        return Exporter(obj.owner, obj.ptr, (rows,) + obj.shape[1:], obj.dtype, obj.device_type, obj.device_id,
                        obj.stream)
    if rows == obj.shape[0]:
        return obj
    narrow = getattr(obj, "narrow", None)  # torch: cheaper than __getitem__
    return narrow(0, 0, rows) if narrow is not None else obj[:rows]


def narrow_rows(out: tuple, rows: int) -> tuple:
    """The first ``rows`` rows of an output made by :func:`empty`: ``(array, TensorRef)`` in,
    the same pair for the row view out (same pointer and strides; the view keeps the whole
    allocation alive).  ``rows`` equal to the allocation's returns ``out`` unchanged.  Raises
    ValueError if ``rows`` is negative or larger than the allocation."""
    obj, ref = out
    have = ref.shape[0]
    if not 0 <= rows <= have:
        raise ValueError(f"narrow_rows: {rows} rows of an allocation of {have}")
    if rows == have:
        return out
    shape = (rows,) + tuple(ref.shape[1:])
    view = narrow_obj(obj, rows)
    keep = obj.owner if type(obj) is Exporter else ref.keepalive
    return view, TensorRef(ref.ptr, shape, ref.strides, ref.dtype, ref.device_type, ref.device_id,
                           ref.framework, view, keep)


def finish(framework: str, obj, stream: int | None = None):
    """The caller-facing result: for 'jax', ``jax.dlpack.from_dlpack(exporter)`` (zero-copy);
    anything else is returned unchanged.  ``stream``: the CUDA stream the kernels wrote the
    exporter's memory on (JAX's stream is then ordered after it).

    With 64-bit types disabled in JAX (the default), JAX converts int64/float64/uint64 results
    to 32 bits (a copy); other dtypes stay zero-copy.
    """
    if framework == "jax" and type(obj) is Exporter:
        import jax.dlpack
        if stream is not None and obj.device_type == "cuda":
            # JAX may read (or convert: int64 -> int32 without x64) the buffer on a stream it does
            # not tell us about, so the writes must be complete: synchronise the producer stream.
            from epcomm.runtime import driver
            with driver.on_device(obj.device_id):
                driver.stream_sync(stream)
            obj.stream = None
        return jax.dlpack.from_dlpack(obj)
    return obj


def as_index_tensor(obj, name: str, *, ndim=None, shape=None, device: str = "cuda", after_event=None):
    """Like :func:`as_tensor` for int64 expert indices, also accepting int32 (JAX's default
    integer width when 64-bit mode is off).  An int32 input is widened with a copy made by its
    own framework (CuPy for JAX arrays), queued on the framework's current stream; the returned
    ref keeps that copy alive.  ``after_event`` (the call's previous_event, an EventOverlap): the
    input may be written on a stream only that event orders, so the widening stream first waits
    for it (and with it the caller's later work on that stream; inside a graph capture, not for
    one recorded before the capture: see event.wait_for).  Raises like :func:`as_tensor`.
    """
    ref = as_tensor(obj, name, dtype=("int64", "int32"), ndim=ndim, shape=shape, device=device)
    if ref.dtype == "int64":
        return ref
    fw = ref.framework
    if after_event is not None and ref.device_id >= 0:
        from epcomm.runtime import driver
        from epcomm.runtime.event import wait_for
        with driver.on_device(ref.device_id):
            s = current_stream("torch" if fw == "torch" else "cupy", ref.device_id)
            wait_for(s, after_event, driver.capture_id(s))
    if fw == "torch":
        wide = obj.to(dtype=__import__("torch").int64)
    elif fw == "numpy":
        wide = obj.astype("int64")
    else:  # cupy, and jax / dlpack through CuPy (zero-copy import, then a widening copy)
        import cupy
        with cupy.cuda.Device(ref.device_id):
            src = obj if fw == "cupy" else cupy.from_dlpack(obj)
            wide = src.astype(cupy.int64)
    out = as_tensor(wide, name, dtype="int64", ndim=ndim, shape=shape, device=device)
    out.framework = fw  # outputs still go to the caller's framework
    out.obj = obj
    out.keepalive = wide
    out.widened = True
    return out


def record_stream(t, stream) -> None:
    """``t.record_stream(stream)`` for a torch tensor: its memory is not reused before the work
    queued on ``stream`` so far is done.  A tensor torch's allocator does not own (e.g. a DLPack
    view of epcomm's own memory) is skipped by the default allocator but makes the
    cudaMallocAsync backend raise; that is ignored, since such memory is not the allocator's
    to reuse anyway."""
    try:
        t.record_stream(stream)
    except RuntimeError:
        pass


def wrap_pointer(framework: str, ptr: int, shape, dtype: str, device_type: str = "cuda",
                 device_id: int = 0, owner=None):
    """A ``framework`` array viewing memory epcomm owns (zero-copy through DLPack).

    ``owner`` is kept alive as long as the array.  For CuPy, bfloat16 / float8 come back as
    their uint16 / uint8 stand-ins.  Raises ValueError for an unknown framework.
    """
    dt = _CUPY_STANDIN.get(dtype, dtype) if framework == "cupy" else dtype
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


# =============================================================================================
# Host copies (tests, examples)
# =============================================================================================
def _np_dtype(name: str):
    d = _np_tables()[1].get(name)
    if d is None:
        raise TypeError(f"numpy dtype {name} needs the ml_dtypes package")
    return d


def _ref_to_numpy(ref: TensorRef):
    """Copy the elements ``ref`` views into a new C-contiguous numpy array."""
    import numpy as np
    npdt = _np_dtype(ref.dtype)
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
    src = ref.ptr + lo * isz
    if ref.device_type == "cpu":
        ctypes.memmove(buf.ctypes.data, src, span)
    else:
        from epcomm.runtime import driver
        with driver.on_device(ref.device_id):
            driver.check(driver.drv().cuCtxSynchronize(), "cuCtxSynchronize")
            driver.memcpy_dtoh(buf.ctypes.data, src, span)
    base = buf.view(npdt)
    view = np.lib.stride_tricks.as_strided(base[-lo:], shape=shape,
                                           strides=tuple(st * isz for st in strides))
    return np.ascontiguousarray(view)


def to_numpy(obj):
    """A host numpy copy of any supported array (bf16 / fp8 as ml_dtypes; CuPy bf16/fp8
    stand-ins come back as uint16 / uint8).  Accepts a :class:`TensorRef` or an
    :class:`Exporter` too.  Synchronizes; not for hot paths."""
    import numpy as np
    if isinstance(obj, TensorRef):
        return _ref_to_numpy(obj)
    if type(obj) is Exporter:
        return _ref_to_numpy(obj.ref())
    fw = _framework(obj, "obj")
    if fw == "numpy":
        return np.array(obj, copy=True)
    if fw == "torch":
        t = obj.detach()
        dt = _ref_torch(t, "obj").dtype
        if dt in ("bfloat16", "float8_e4m3fn", "float8_e5m2", "uint16", "uint32", "uint64"):
            import torch
            raw = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[ITEMSIZE[dt]]
            return t.cpu().contiguous().view(raw).numpy().view(_np_dtype(dt)).copy()
        return t.cpu().numpy().copy()
    if fw == "cupy":
        import cupy
        return cupy.asnumpy(obj)
    if fw == "jax":
        return np.array(obj, copy=True)
    return _ref_to_numpy(_ref_dlpack(obj, "obj"))


def from_numpy(framework: str, arr, device_type: str = "cuda", device_id: int = 0):
    """Build a ``framework`` array holding a copy of the host array ``arr`` (tests, examples).

    bf16 / fp8 come as ml_dtypes arrays; for CuPy they become uint16 / uint8 arrays.
    """
    import numpy as np
    arr = np.ascontiguousarray(arr)
    dt = _np_tables()[0].get(arr.dtype)
    if dt is None:
        raise TypeError(f"unsupported dtype {arr.dtype}")
    if framework == "numpy":
        if device_type != "cpu":
            raise ValueError("numpy arrays live on the host (device_type='cpu')")
        return arr.copy()
    if framework == "torch":
        import torch
        raw_np = {1: np.uint8, 2: np.int16, 4: np.int32, 8: np.int64}[ITEMSIZE[dt]]
        raw_t = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[ITEMSIZE[dt]]
        t = torch.from_numpy(arr.view(raw_np).copy()).view(raw_t)
        t = t.view(_torch_tables()[1][dt])
        return t.to(_torch_device(device_type, device_id)) if device_type == "cuda" else t
    if framework == "cupy":
        if device_type != "cuda":
            raise ValueError("cupy arrays live on CUDA devices (device_type='cuda')")
        import cupy
        host = arr.view(_np_dtype(_CUPY_STANDIN[dt])) if dt in _CUPY_STANDIN else arr
        with cupy.cuda.Device(device_id):
            return cupy.asarray(host)
    if framework == "jax":
        import jax
        if device_type == "cpu":
            dev = jax.devices("cpu")[0]
        else:
            dev = [d for d in jax.devices("gpu") if d.local_hardware_id == device_id][0]
        # a private copy: on CPU, device_put may alias the host buffer it is given
        return jax.device_put(np.array(arr, copy=True), dev)
    raise ValueError(f"unknown framework {framework!r}; expected one of {', '.join(FRAMEWORKS)}")
