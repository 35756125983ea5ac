"""Framework interop: borrowed views of caller arrays, and outputs in the caller's framework.

epcomm's public API takes arrays from PyTorch, CuPy, JAX (and NumPy for host data) and hands
results back in the same framework.  Kernels are launched with raw pointers, so this package
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

Importing this package imports neither torch, CuPy nor JAX and does not touch a GPU: each
framework is imported the first time an object of it is seen (it is then already imported).

Modules: ``dtypes`` (names, item sizes, DLPack type codes, per-framework tables), ``refs``
(TensorRef, stride helpers), ``dlpack`` (capsule structs, reading a producer's capsule),
``exporter`` (owned memory, the DLPack Exporter), ``frameworks`` (which framework an object
is), ``torch_adapter`` / ``cupy_adapter`` / ``jax_adapter`` / ``numpy_adapter`` (one
framework each), ``checks`` (as_tensor, as_index_tensor), ``alloc`` (empty, zeros, finish,
wrap_pointer, allocating_on), ``views`` (narrow_rows, swap_last_two), ``host`` (to_numpy,
from_numpy, to_host).  The caller's current stream is runtime.streams.current_stream,
re-exported here.
"""
from __future__ import annotations

from epcomm.interop.alloc import allocating_on, empty, finish, wrap_pointer, zeros
from epcomm.interop.checks import as_index_tensor, as_tensor
from epcomm.interop.dlpack import kDLCPU, kDLCUDA, kDLCUDAHost, kDLCUDAManaged  # noqa: F401
from epcomm.interop.dtypes import DTYPES, ITEMSIZE
from epcomm.interop.exporter import Exporter, live_exports  # noqa: F401
from epcomm.interop.frameworks import FRAMEWORKS, framework_of  # noqa: F401
from epcomm.interop.host import from_numpy, to_host, to_numpy
from epcomm.interop.refs import TensorRef
from epcomm.interop.torch_adapter import (  # noqa: F401
    record_on_current_stream, record_on_stream, record_stream, torch_fast_api)
from epcomm.interop.views import narrow_obj, narrow_rows, swap_last_two  # noqa: F401
from epcomm.runtime.streams import current_stream

__all__ = [
    "DTYPES", "ITEMSIZE", "TensorRef", "Exporter", "framework_of", "as_tensor", "current_stream",
    "empty", "zeros", "finish", "wrap_pointer", "as_index_tensor", "to_numpy", "from_numpy",
    "to_host", "record_on_stream", "record_on_current_stream", "allocating_on", "swap_last_two",
]

# Also public, though outside __all__:
# FRAMEWORKS, kDLCPU, kDLCUDA, kDLCUDAHost, kDLCUDAManaged, live_exports, narrow_obj,
# narrow_rows, record_stream (imported above).
