"""The caller's current CUDA stream and device, per framework.

The one runtime module that names torch and CuPy: both keep a per-thread current stream (and
device) that epcomm's work must be ordered against.  JAX, NumPy and bare DLPack producers have
no user-visible stream; their work is on the legacy default stream (0).  Each framework is
imported only when a query names it.
"""
from __future__ import annotations

from epcomm.errors import EpcommError

FRAMEWORKS = ("torch", "cupy", "jax", "numpy", "dlpack")


def unknown_framework(framework) -> ValueError:
    """The error raised for a framework name outside :data:`FRAMEWORKS`."""
    return ValueError(f"unknown framework {framework!r}; expected one of {', '.join(FRAMEWORKS)}")


_torch_raw_stream = None


def _torch_stream_getter():
    """torch's raw current-stream query (a C function: no Stream object is built)."""
    global _torch_raw_stream
    f = _torch_raw_stream
    if f is None:
        import torch
        f = getattr(torch._C, "_cuda_getCurrentRawStream", None)
        if f is None:  # pragma: no cover - older/newer torch
            def f(dev):
                return torch.cuda.current_stream(dev).cuda_stream
        _torch_raw_stream = f
    return f


def current_stream(framework: str, device_id: int) -> int:
    """The raw ``cudaStream_t`` (an int) that the caller's work in ``framework`` is on.

    torch: the current stream of ``device_id``; cupy: CuPy's current stream of that device;
    jax / numpy / dlpack: 0, the legacy default stream (JAX has no user-visible stream, so
    interop.as_tensor waits for JAX inputs, and interop.finish makes JAX wait for outputs).
    Raises ValueError for a framework outside :data:`FRAMEWORKS`.
    """
    if framework == "torch":
        f = _torch_raw_stream
        if f is None:
            f = _torch_stream_getter()
        return int(f(device_id))
    if framework == "cupy":
        import cupy
        return int(cupy.cuda.get_current_stream(device_id).ptr)
    if framework in ("jax", "numpy", "dlpack"):
        return 0
    raise unknown_framework(framework)


def current_device(framework: str) -> int:
    """The caller's current CUDA device in ``framework``: torch's ``torch.cuda.current_device()``,
    CuPy's ``cupy.cuda.Device().id``.  Raises ValueError for any other framework (JAX, NumPy and
    DLPack producers have no current device)."""
    if framework == "torch":
        import torch
        if not torch.cuda.is_available():  # torch would raise a bare AssertionError (a CPU-only build)
            raise EpcommError("torch has no CUDA device here (a CPU-only torch build, or no GPU visible): "
                              "epcomm's calls need a CUDA GPU")
        return int(torch.cuda.current_device())
    if framework == "cupy":
        import cupy
        return int(cupy.cuda.Device().id)
    raise ValueError(f"framework: expected 'torch' or 'cupy' (no current device), got {framework!r}")
