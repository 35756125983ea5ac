"""JAX: TensorRefs of arrays (read-only: JAX arrays are immutable), copies from the host, and
handing an :class:`Exporter` over as a JAX array.

A single-device array in the default layout is read through ``unsafe_buffer_pointer()``; any
other array on one device (a non-default memory layout, say) goes through DLPack, which reports
its real strides.  JAX is imported by the functions here, never at module import.
"""
from __future__ import annotations

from epcomm.interop.dlpack import ref_dlpack
from epcomm.interop.dtypes import NP_NAMES, np_name
from epcomm.interop.refs import TensorRef, compact_strides, remember
from epcomm.runtime import driver

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


def _placement(sharding):
    """(device_type, device_id) of an array with ``sharding``, or why it is unusable (a str)."""
    pl = _JAX_PLACEMENT.get(sharding)
    if pl is None:
        pl = remember(_JAX_PLACEMENT, sharding, _jax_placement(sharding), 256)
    return pl


def _jax_layout_is_default(layout, ndim: int) -> bool:
    ok = _JAX_DEFAULT_LAYOUT.get(layout)
    if ok is None:
        expected = "{" + ",".join(str(i) for i in range(ndim - 1, -1, -1)) + "}"
        ok = remember(_JAX_DEFAULT_LAYOUT, layout, str(layout) == expected, 256)
    return ok


def ref_jax(a, name: str) -> TensorRef:
    """A read-only TensorRef to JAX array ``a``.  Raises ValueError for a deleted (donated)
    array, one sharded over several devices, or one on neither CUDA nor CPU."""
    if a.is_deleted():
        raise ValueError(f"{name}: this JAX array has been deleted (donated?)")
    pl = _placement(a.sharding)
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
        ref = ref_dlpack(a, name, pass_stream=False)
        ref.framework = "jax"
        ref.readonly = True
        return ref
    dt = NP_NAMES.get(a.dtype) or np_name(a.dtype)
    return TensorRef(a.unsafe_buffer_pointer(), shape, compact_strides(shape), dt, pl[0], pl[1],
                     "jax", a, None, True)


def from_numpy_jax(arr, device_type: str, device_id: int):
    """A JAX array on the CPU or on the GPU of local id ``device_id``, holding a copy of host
    array ``arr``."""
    import jax
    import numpy as np
    if device_type == "cpu":
        dev = jax.devices("cpu")[0]
    else:
        dev = [d for d in jax.devices("gpu") if d.local_hardware_id == device_id][0]
    # a private copy: on CPU, device_put may alias the host buffer it is given
    return jax.device_put(np.array(arr, copy=True), dev)


def finish_jax(exporter, stream: int | None):
    """``jax.dlpack.from_dlpack(exporter)`` (zero-copy), once the writes queued on ``stream``
    (the producer's CUDA stream; None: not known) are complete."""
    import jax.dlpack
    if stream is not None and exporter.device_type == "cuda":
        # JAX may read (or convert: int64 -> int32 without x64) the buffer on a stream it does
        # not tell us about, so the writes must be complete: synchronise the producer stream.
        with driver.on_device(exporter.device_id):
            driver.stream_sync(stream)
        exporter.stream = None
    return jax.dlpack.from_dlpack(exporter)
