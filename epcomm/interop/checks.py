"""Argument checks that turn a caller's array into a validated :class:`TensorRef`."""
from __future__ import annotations

from epcomm.interop.cupy_adapter import ref_cupy, widen_cupy
from epcomm.interop.dlpack import ref_dlpack
from epcomm.interop.dtypes import CUPY_STANDIN, DTYPES
from epcomm.interop.exporter import Exporter
from epcomm.interop.frameworks import FW_BY_TYPE, framework_of_arg
from epcomm.interop.jax_adapter import ref_jax
from epcomm.interop.numpy_adapter import ref_numpy
from epcomm.interop.refs import c_contiguous
from epcomm.interop.torch_adapter import ref_torch, widen_torch
from epcomm.interop.xla_buffers import ref_xla
from epcomm.runtime.event import current_stream_wait_for

BUILDERS = {"torch": ref_torch, "cupy": ref_cupy, "jax": ref_jax, "numpy": ref_numpy,
            "dlpack": ref_dlpack, "xla": ref_xla}

_FIX_HINT = {
    "torch": "call .contiguous()",
    "cupy": "call cupy.ascontiguousarray()",
    "numpy": "call numpy.ascontiguousarray()",
    "jax": "make a row-major copy",
    "dlpack": "pass a contiguous copy",
    "xla": "pass a row-major buffer",
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


def _dtype_mismatch(name: str, fw: str, dt: str, dtype) -> str:
    """The requested dtype that CuPy array dtype ``dt`` stands in for; TypeError if none."""
    if fw == "cupy":
        for want in ((dtype,) if dtype.__class__ is str else dtype):
            if CUPY_STANDIN.get(want) == dt:
                return want
    got = dt[1:] if dt[0] == "?" else dt
    raise TypeError(f"{name}: expected dtype {_fmt_dtypes(dtype)}, got {got}")


def _check_shape(name: str, sh: tuple, ndim, shape) -> None:
    """ValueError unless ``sh`` matches ``shape`` (ints must match; None or a str: any) and
    ``ndim``."""
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


_HOST_KIND = {"numpy": "a NumPy array", "torch": "a CPU torch tensor", "jax": "a JAX array on the CPU",
              "cupy": "a CuPy array in host memory"}


def _wrong_device(name: str, device: str, device_id: int, framework: str = "") -> ValueError:
    if device == "cuda":
        what = _HOST_KIND.get(framework, "an array in host memory")
        return ValueError(f"{name}: expected a CUDA tensor, got {what} (host memory)")
    if device == "cpu":
        return ValueError(f"{name}: expected a CPU tensor, got a CUDA tensor (cuda:{device_id})")
    return ValueError(f"{name}: bad device check {device!r} (use 'cuda', 'cpu' or 'any')")


def as_tensor(obj, name: str, *, dtype=None, ndim=None, shape=None, device: str = "cuda",
              contiguous: bool = True, allow_none: bool = False, sync_jax: bool = True):
    """Validate ``obj`` and return a :class:`TensorRef` to it (or None, see ``allow_none``).

    Args:
        obj: a torch.Tensor, cupy.ndarray, jax.Array, numpy.ndarray or any object with
            ``__dlpack__`` (an :class:`Exporter` too).
        name: the argument's name, used in every error message.
        dtype: None (any supported dtype), a name from DTYPES, or a tuple of names.
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
    fw = FW_BY_TYPE.get(tp)
    if fw not in BUILDERS:
        fw = framework_of_arg(obj, name)
    ref = obj.ref() if tp is Exporter else BUILDERS[fw](obj, name)

    dt = ref.dtype
    if dtype is not None:
        if not (dt == dtype if dtype.__class__ is str else dt in dtype):
            ref.dtype = _dtype_mismatch(name, fw, dt, dtype)
    elif dt[0] == "?":
        raise TypeError(f"{name}: unsupported dtype {dt[1:]}; supported: {', '.join(DTYPES)}")
    if shape is not None or ndim is not None:
        _check_shape(name, ref.shape, ndim, shape)
    if device != "any" and ref.device_type != device:
        raise _wrong_device(name, device, ref.device_id, fw)
    if contiguous:
        ok = obj.is_contiguous() if fw == "torch" else c_contiguous(ref.shape, ref.strides)
        if not ok:
            raise ValueError(f"{name}: must be contiguous (row-major); {_FIX_HINT[fw]}")
    if sync_jax and fw == "jax" and tp is not Exporter:
        if not obj.is_ready():
            obj.block_until_ready()
    return ref


def _widen(obj, fw: str, device_id: int):
    """An int64 copy of int32 array ``obj``, made by its own framework (CuPy for JAX and
    DLPack arrays) and queued on that framework's current stream."""
    if fw == "torch":
        return widen_torch(obj)
    if fw == "numpy":
        return obj.astype("int64")
    return widen_cupy(obj, fw, device_id)


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
        current_stream_wait_for("torch" if fw == "torch" else "cupy", ref.device_id, after_event)
    wide = _widen(obj, fw, ref.device_id)
    out = as_tensor(wide, name, dtype="int64", ndim=ndim, shape=shape, device=device)
    out.framework = fw  # outputs still go to the caller's framework
    out.obj = obj
    out.keepalive = wide
    out.widened = True
    return out
