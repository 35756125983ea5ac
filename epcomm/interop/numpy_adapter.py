"""NumPy (host data): TensorRefs of arrays through ``__array_interface__`` (ml_dtypes' bfloat16 /
float8 included) and allocation."""
from __future__ import annotations

from epcomm.interop.dtypes import NP_NAMES, np_dtype, np_name
from epcomm.interop.refs import TensorRef, element_strides


def ref_numpy(a, name: str) -> TensorRef:
    """A TensorRef to numpy array ``a`` (read-only when ``a`` is not writeable)."""
    dt = NP_NAMES.get(a.dtype) or np_name(a.dtype)
    st = element_strides(a, name)
    ai = a.__array_interface__
    return TensorRef(ai["data"][0], a.shape, st, dt, "cpu", -1, "numpy", a, None,
                     not a.flags.writeable)


def alloc_numpy(shape: tuple, dtype: str, device_type: str, zero: bool):
    """``(array, TensorRef)`` of a new numpy array.  ValueError for ``device_type`` other than
    'cpu'; TypeError when ``dtype`` needs ml_dtypes and that is missing."""
    if device_type != "cpu":
        raise ValueError("numpy arrays live on the host (device_type='cpu')")
    import numpy as np
    a = (np.zeros if zero else np.empty)(shape, dtype=np_dtype(dtype))
    return a, ref_numpy(a, "out")
