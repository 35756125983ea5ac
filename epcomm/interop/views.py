"""Views of arrays epcomm made or was given: leading rows, swapped axes (no copies)."""
from __future__ import annotations

from epcomm.interop.exporter import Exporter
from epcomm.interop.refs import TensorRef


def narrow_obj(obj, rows: int):
    """The first ``rows`` rows of an array made by interop.empty (torch, CuPy, NumPy or an
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
    """The first ``rows`` rows of an output made by interop.empty: ``(array, TensorRef)`` in,
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


def swap_last_two(framework: str, arr):
    """A view of ``arr`` (at least 2-D) with its last two axes swapped (e.g. a column-major
    scale array seen row-major): torch's ``transpose(-2, -1)``, NumPy-style ``swapaxes(-2, -1)``
    for CuPy, NumPy and JAX arrays."""
    if framework == "torch":
        return arr.transpose(-2, -1)
    return arr.swapaxes(-2, -1)
