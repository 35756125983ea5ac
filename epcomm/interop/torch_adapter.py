"""torch: TensorRefs of tensors (``data_ptr()``, ``shape``, ``stride()``: no DLPack round
trip), allocation, host copies, and telling torch's caching allocator which streams use a tensor.

torch is imported by the functions here, never at module import.
"""
from __future__ import annotations

from epcomm.interop.dtypes import ITEMSIZE, TORCH_NAMES, np_dtype, torch_name, torch_tables
from epcomm.interop.refs import TensorRef

# the dtypes whose host copy goes through a same-size integer view (numpy() refuses them)
_RAW_COPIED = ("bfloat16", "float8_e4m3fn", "float8_e5m2", "uint16", "uint32", "uint64")


def ref_torch(t, name: str) -> TensorRef:
    """A TensorRef to torch tensor ``t`` (unsupported dtypes reported as '?name').  Raises
    ValueError for a tensor on neither CUDA nor CPU, TypeError for one without a data pointer
    (a sparse layout, say)."""
    dt = TORCH_NAMES.get(t.dtype) or torch_name(t.dtype)
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


_TORCH_DEVICES: dict = {}


def torch_device(device_type: str, device_id: int):
    """A cached torch.device: torch parses a device string on every call (microseconds that sit
    on the critical path of a CPU-synchronised dispatch)."""
    key = (device_type, device_id)
    d = _TORCH_DEVICES.get(key)
    if d is None:
        import torch
        d = _TORCH_DEVICES[key] = torch.device("cpu" if device_type == "cpu" else f"cuda:{device_id}")
    return d


def alloc_torch(shape: tuple, dtype: str, device_type: str, device_id: int, zero: bool):
    """``(tensor, TensorRef)`` of a new torch tensor; TypeError if this torch lacks ``dtype``."""
    # Lean on purpose: a CPU-synchronised dispatch allocates its outputs on the critical
    # path, and the ref of a tensor we just made needs no inspection.
    import torch
    tdt = torch_tables()[1].get(dtype)
    if tdt is None:
        raise TypeError(f"this torch has no dtype {dtype}")
    f = torch.zeros if zero else torch.empty
    t = f(shape, dtype=tdt, device=torch_device(device_type, device_id))
    return t, TensorRef(t.data_ptr(), shape, t.stride(), dtype, device_type,
                        device_id if device_type == "cuda" else -1, "torch", t)


def _raw_int(torch, itemsize: int):
    """The torch integer dtype of ``itemsize`` bytes (for bit-exact copies)."""
    return {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[itemsize]


def to_numpy_torch(obj):
    """A host numpy copy of torch tensor ``obj`` (bf16 / fp8 as ml_dtypes), never a view of its
    memory (a device tensor's ``.cpu()`` is a copy already; a host tensor's is copied)."""
    t = obj.detach()
    dt = ref_torch(t, "obj").dtype
    if dt in _RAW_COPIED:
        import torch
        raw = _raw_int(torch, ITEMSIZE[dt])
        a = t.cpu().contiguous().view(raw).numpy().view(np_dtype(dt))
    else:
        a = t.cpu().numpy()
    return a.copy() if t.device.type == "cpu" else a


def from_numpy_torch(arr, dt: str, device_type: str, device_id: int):
    """A torch tensor holding a copy of the C-contiguous host array ``arr`` of dtype ``dt``."""
    import numpy as np
    import torch
    raw_np = {1: np.uint8, 2: np.int16, 4: np.int32, 8: np.int64}[ITEMSIZE[dt]]
    t = torch.from_numpy(arr.view(raw_np).copy()).view(_raw_int(torch, ITEMSIZE[dt]))
    t = t.view(torch_tables()[1][dt])
    return t.to(torch_device(device_type, device_id)) if device_type == "cuda" else t


def widen_torch(obj):
    """An int64 copy of a torch integer tensor, queued on torch's current stream."""
    import torch
    return obj.to(dtype=torch.int64)


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


def _record_all(objs, stream_of) -> None:
    """:func:`record_stream` of every entry of ``objs`` that has ``record_stream`` (torch
    tensors; None and other frameworks' arrays are skipped) on ``stream_of()``, which is called
    once, at the first such entry (so torch is imported only when a tensor is there)."""
    stream = None
    for t in objs:
        if t is not None and hasattr(t, "record_stream"):
            if stream is None:
                stream = stream_of()
            record_stream(t, stream)


def record_on_stream(objs, raw_stream: int, device_id: int) -> None:
    """Tell torch's allocator that every torch tensor in ``objs`` is in use on the raw CUDA
    stream ``raw_stream`` of ``device_id`` (one ``torch.cuda.ExternalStream`` per call); None
    entries and non-torch objects are skipped."""
    def stream_of():
        import torch
        return torch.cuda.ExternalStream(raw_stream, device=device_id)
    _record_all(objs, stream_of)


def record_on_current_stream(objs, device_id: int) -> None:
    """:func:`record_on_stream` on torch's current stream of ``device_id``."""
    def stream_of():
        import torch
        return torch.cuda.current_stream(device_id)
    _record_all(objs, stream_of)


def allocating_on_torch(raw_stream: int, device_id: int):
    """A context in which torch allocates (and queues work) on raw stream ``raw_stream``."""
    import torch
    return torch.cuda.stream(torch.cuda.ExternalStream(raw_stream, device=device_id))


def torch_fast_api(device_id: int) -> tuple:
    """(the torch module, ``torch.device("cuda", device_id)``, torch's current-device query) for
    the low-latency fast paths, which check torch tensors through torch's own attributes: the
    cheapest checks there are, for calls that afford a few microseconds of host time."""
    import torch
    return torch, torch.device("cuda", device_id), getattr(torch._C, "_cuda_getDevice", torch.cuda.current_device)
