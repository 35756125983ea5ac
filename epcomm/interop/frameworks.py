"""Which framework an object belongs to (cached per type; imports no framework)."""
from __future__ import annotations

import sys

from epcomm.interop.exporter import Exporter
from epcomm.interop.refs import remember
from epcomm.interop.xla_buffers import XlaArg
from epcomm.runtime.streams import FRAMEWORKS  # noqa: F401  (re-exported: the framework names)

# type -> framework name ('' when unsupported); as_tensor reads it directly on its hot path
FW_BY_TYPE: dict = {}
_UNSUPPORTED = ("expected a torch.Tensor, cupy.ndarray, jax.Array, numpy.ndarray or an object "
                "with __dlpack__")


def _loaded_subclass(module: str, attr: str, tp) -> bool:
    """Whether ``tp`` subclasses ``module.attr`` of an already imported ``module``."""
    mod = sys.modules.get(module)
    base = getattr(mod, attr, None) if mod is not None else None
    return isinstance(base, type) and issubclass(tp, base)


def _classify_by_module(tp, top: str) -> str:
    """Framework of ``tp`` judged by the package it is defined in ('' when not conclusive)."""
    if top == "torch":
        return "torch" if _loaded_subclass("torch", "Tensor", tp) else ""
    if top == "cupy" or top == "cupy_backends":
        return "cupy" if _loaded_subclass("cupy", "ndarray", tp) else ""
    if top in ("jax", "jaxlib"):
        if any(c.__name__ == "Tracer" for c in tp.__mro__):
            return "jax-tracer"
        if hasattr(tp, "unsafe_buffer_pointer") and hasattr(tp, "__dlpack__"):
            return "jax"
        return ""
    if top == "numpy":
        return "numpy" if _loaded_subclass("numpy", "ndarray", tp) else ""
    return ""


def classify(tp) -> str:
    """Framework name of objects of type ``tp``, or '' if unsupported.  Imports nothing new."""
    if tp is Exporter:
        return "jax"
    if tp is XlaArg:
        return "xla"
    mod = getattr(tp, "__module__", None) or ""
    fw = _classify_by_module(tp, mod.partition(".")[0])
    if fw:
        return fw
    # subclasses defined outside their framework's package
    for fw, module, attr in (("torch", "torch", "Tensor"), ("cupy", "cupy", "ndarray"),
                             ("numpy", "numpy", "ndarray")):
        if _loaded_subclass(module, attr, tp):
            return fw
    if hasattr(tp, "__dlpack__"):
        return "dlpack"
    return ""


def framework_of_arg(obj, name: str) -> str:
    """:func:`framework_of` with ``name`` (the argument's name) in the error messages."""
    tp = type(obj)
    fw = FW_BY_TYPE.get(tp)
    if fw is None:
        fw = remember(FW_BY_TYPE, tp, classify(tp), 1024)
    if not fw:
        raise TypeError(f"{name}: {_UNSUPPORTED}, got {tp.__name__}")
    if fw == "jax-tracer":
        raise TypeError(f"{name}: got a JAX tracer ({tp.__name__}); epcomm operations run "
                        f"eagerly and cannot be traced by jax.jit -- call them outside jit")
    return fw


def framework_of(obj) -> str:
    """'torch', 'cupy', 'jax', 'numpy', 'dlpack' (any other object with ``__dlpack__``) or 'xla'
    (an :class:`epcomm.interop.xla_buffers.XlaArg`, a compiled program's buffer).

    An :class:`Exporter` (a pending JAX output) counts as 'jax'.  Raises TypeError, naming the
    type, for anything else.
    """
    return framework_of_arg(obj, "obj")
