"""A compiled program's device buffers (the ``Buffer`` objects ``jax.experimental.buffer_callback``
hands its callback) as arrays the engines take: :class:`XlaArg`, framework ``"xla"``.

An XlaArg views the buffer with a *logical* shape and dtype of the same byte size, so a program
can carry an array its dtype rules lack: with JAX's default 32-bit mode, an int64 [N, K] travels
as int32 [N, K, 2] (:mod:`epcomm.interop.jax_callback` builds and reads such pairs).  Nothing
here imports a framework: the buffer is read through ``__cuda_array_interface__`` (its address
only), else DLPack.
"""
from __future__ import annotations

from epcomm.errors import EpcommError
from epcomm.interop.dlpack import kDLCUDA, ref_dlpack
from epcomm.interop.dtypes import ITEMSIZE, NP_NAMES, np_name
from epcomm.interop.refs import TensorRef, compact_strides


class XlaArg:
    """One buffer of a compiled call, as epcomm sees it: ``ref`` (a TensorRef of framework
    ``"xla"``, row-major, with the logical shape and dtype) and ``buf`` (the program's buffer,
    kept alive with the ref)."""

    __slots__ = ("ref", "buf")

    def __init__(self, ref: TensorRef, buf=None):
        self.ref, self.buf = ref, buf

    @property
    def shape(self) -> tuple:
        return self.ref.shape

    @property
    def dtype(self) -> str:
        return self.ref.dtype

    def swapaxes(self, a: int, b: int) -> "XlaArg":
        """The same memory with its last two axes swapped (``a, b`` = -2, -1 only)."""
        if {a, b} != {-2, -1}:
            raise ValueError("XlaArg.swapaxes: only the last two axes")
        r = self.ref
        shape = r.shape[:-2] + (r.shape[-1], r.shape[-2])
        strides = r.strides[:-2] + (r.strides[-1], r.strides[-2])
        out = XlaArg(TensorRef(r.ptr, shape, strides, r.dtype, r.device_type, r.device_id, "xla", None, self.buf,
                               r.readonly), self.buf)
        out.ref.obj = out
        return out


# DLPack device types a program buffer may have: the kernels take device addresses only.
DEVICE_TYPES = (kDLCUDA,)


def _check_device(buf, device_id: int) -> None:
    """EpcommError unless ``buf`` is in the memory of GPU ``device_id``: a program lowered for
    the CPU (its inputs committed to the CPU) hands the callback host buffers, which the kernels
    cannot read; a program run on several GPUs of one process (a mesh of local devices) hands
    each GPU's run that GPU's buffers, while a Buffer serves one GPU."""
    kind, dev = buf.__dlpack_device__()
    if kind not in DEVICE_TYPES:
        raise EpcommError(f"a program buffer is on DLPack device type {kind}, not a CUDA GPU: epcomm.jax runs "
                          f"in programs compiled for the GPU (put the inputs on the Buffer's GPU)")
    if kind == kDLCUDA and int(dev) != device_id:
        raise EpcommError(f"a program buffer is on cuda:{int(dev)} but the Buffer uses cuda:{device_id}: a Buffer "
                          f"serves one GPU, so a program that calls epcomm.jax runs on one local device per "
                          f"process (the expert axis of the mesh is the process axis)")


def _address(buf) -> int:
    """The device address of ``buf``: ``__cuda_array_interface__`` (no capsule to build), else
    DLPack.  jaxlib raises its runtime error (a RuntimeError) from the interface for a dtype it
    cannot spell there (FP8), or for a buffer not on a CUDA device; DLPack carries those."""
    try:
        return int(buf.__cuda_array_interface__["data"][0])
    except (AttributeError, KeyError, TypeError, ValueError, RuntimeError):
        return ref_dlpack(buf, "buffer", pass_stream=False).ptr


def xla_arg(buf, shape: tuple, dtype: str, device_id: int) -> XlaArg:
    """``buf`` (a device buffer of the program on ``device_id``) seen as ``dtype`` ``shape``.
    EpcommError if the byte sizes differ (the program's buffer is not the one declared)."""
    have_dt = NP_NAMES.get(buf.dtype) or np_name(buf.dtype)
    have = ITEMSIZE.get(have_dt, 0)
    for s in buf.shape:
        have *= int(s)
    want = ITEMSIZE[dtype]
    for s in shape:
        want *= int(s)
    if have != want:
        raise EpcommError(f"a program buffer of {have_dt} {tuple(buf.shape)} cannot hold {dtype} {tuple(shape)}")
    _check_device(buf, device_id)
    shape = tuple(int(s) for s in shape)
    ref = TensorRef(_address(buf) if want else 0, shape, compact_strides(shape), dtype, "cuda", device_id, "xla",
                    None, buf, not getattr(buf, "writeable", True))
    arg = XlaArg(ref, buf)
    ref.obj = arg
    return arg


def ref_xla(arg: XlaArg, name: str) -> TensorRef:
    """A copy of ``arg``'s ref (the argument checks may relabel its dtype)."""
    r = arg.ref
    return TensorRef(r.ptr, r.shape, r.strides, r.dtype, r.device_type, r.device_id, "xla", arg, r.keepalive,
                     r.readonly)
