"""JAX's side of :mod:`epcomm.jax`: one epcomm call as one XLA operation
(``jax.experimental.buffer_callback``), pytrees, custom VJPs and the few array steps around a call.

:func:`call` declares the outputs to XLA and, when the program runs, hands the Python function
XLA's buffers (as :class:`epcomm.interop.xla_buffers.XlaArg`) and its CUDA stream; the function
launches kernels on that stream writing into those buffers.  With ``command_buffer`` the
operation is marked ``command_buffer_compatible``: XLA may capture its launches into the CUDA
graph of the program and replay them without running Python again, so the function must launch
the same device work every time and read nothing back on the host.

int64 arrays travel as int32 pairs [..., 2] (little-endian words), whatever JAX's 64-bit mode:
:func:`int64_pairs` makes them from int32 or int64 indices, :func:`low_words` reads an int64
array whose values fit 32 bits.  This module imports JAX; nothing imports it before
:mod:`epcomm.jax` is imported.
"""
from __future__ import annotations

import inspect

import jax
import jax.numpy as jnp

from epcomm.errors import EpcommError
from epcomm.interop.xla_buffers import xla_arg

# The first JAX release with jax.experimental.buffer_callback, which has taken
# command_buffer_compatible from the start (read from the jax 0.6.0 and 0.6.1 wheels on PyPI).
# epcomm.jax is tested with JAX 0.10.2.
NEEDED_JAX = "0.6.1"

_CALLBACK = []


def buffer_callback():
    """``jax.experimental.buffer_callback.buffer_callback``; EpcommError naming the JAX version
    needed where this JAX lacks it (or its ``command_buffer_compatible`` option)."""
    if _CALLBACK:
        return _CALLBACK[0]
    try:
        from jax.experimental.buffer_callback import buffer_callback as bc
    except ImportError:
        bc = None
    if bc is None or "command_buffer_compatible" not in inspect.signature(bc).parameters:
        raise EpcommError(f"epcomm.jax needs jax.experimental.buffer_callback with command_buffer_compatible "
                          f"(JAX {NEEDED_JAX} or newer); this is JAX {jax.__version__}: pip install -U 'jax>="
                          f"{NEEDED_JAX}'")
    _CALLBACK.append(bc)
    return bc


def _program_type(shape: tuple, dtype: str) -> jax.ShapeDtypeStruct:
    """How an array of logical ``dtype`` ``shape`` travels in the program (int64: int32 pairs)."""
    if dtype in ("int64", "uint64"):
        return jax.ShapeDtypeStruct(tuple(shape) + (2,), jnp.int32)
    return jax.ShapeDtypeStruct(tuple(shape), jnp.dtype(dtype))


def call(run, operands: list, outputs: dict, device_id: int, *, command_buffer: bool) -> dict:
    """One XLA operation running ``run(stream, ins, outs)`` on the GPU.

    ``operands``: (JAX array, (logical shape, dtype name)) pairs, int64 ones as int32 pairs
    (:func:`int64_pairs`); ``outputs``: name -> (logical shape, dtype name).  At run time ``ins``
    is the list of operands as XlaArgs and ``outs`` maps each output name to an (XlaArg,
    TensorRef) pair (what ``CommContext.empty`` returns), both on ``device_id``; ``stream`` is
    XLA's CUDA stream.  Returns name -> JAX array (int64 outputs as int32 pairs)."""
    specs = tuple((tuple(shape), dt) for _, (shape, dt) in operands)
    key = (run, specs, tuple(outputs.items()), device_id, bool(command_buffer))
    f = _OPS.get(key)
    if f is None:
        f = _OPS[key] = _operation(run, specs, outputs, device_id, command_buffer)
        if len(_OPS) > 4096:  # run functions are memoised by the caller: a few per program shape
            _OPS.pop(next(iter(_OPS)))
    return dict(zip(outputs, f(*[a for a, _ in operands])))


# (run, operand specs, outputs, device, command_buffer) -> the wrapped callback: the same
# object for the same call, so JAX's caches (eager dispatch compiles per callback) hit.
_OPS: dict = {}


def forget(runs) -> None:
    """Drop the wrapped callbacks of the run functions ``runs`` (their Buffer was destroyed)."""
    gone = {id(r) for r in runs}
    for key in [k for k in _OPS if id(k[0]) in gone]:
        del _OPS[key]


def _operation(run, specs: tuple, outputs: dict, device_id: int, command_buffer: bool):
    names = list(outputs)
    result = [_program_type(*outputs[n]) for n in names]

    def callback(ctx, outs, *ins):
        args = [xla_arg(b, shape, dt, device_id) for b, (shape, dt) in zip(ins, specs)]
        dest = {}
        for n, b in zip(names, outs):
            a = xla_arg(b, *outputs[n], device_id)
            dest[n] = (a, a.ref)
        run(int(ctx.stream), args, dest)

    return buffer_callback()(callback, result, command_buffer_compatible=command_buffer)


def int64_pairs(a):
    """Integer array ``a`` [...] as int64 values in int32 pairs [..., 2] (low word, high word)."""
    if a.dtype == jnp.int64:
        return jax.lax.bitcast_convert_type(a, jnp.int32)
    a = a.astype(jnp.int32)
    return jnp.stack([a, jnp.right_shift(a, 31)], axis=-1)


def low_words(pairs):
    """int32 [...] of int64 values held as int32 pairs [..., 2] whose values fit 32 bits."""
    return pairs[..., 0]


def zero_rows(x, keep):
    """``x`` [M, ...] with the rows where bool ``keep`` [M] is False set to zero."""
    mask = keep.reshape(keep.shape + (1,) * (x.ndim - 1))
    return jnp.where(mask, x, jnp.zeros((), x.dtype))


def swap_last_two(a):
    """``a`` with its last two axes swapped."""
    return jnp.swapaxes(a, -2, -1)


def register_pytree(cls, data_fields: list, meta_fields: list):
    """Register dataclass ``cls`` as a pytree: ``data_fields`` are arrays (traced), ``meta_fields``
    static (hashable) values.  Returns ``cls``."""
    return jax.tree_util.register_dataclass(cls, data_fields=data_fields, meta_fields=meta_fields)


def with_vjp(fun, fwd, bwd, nondiff_argnums: tuple):
    """``jax.custom_vjp(fun)`` with rules ``fwd`` and ``bwd`` (as ``jax.custom_vjp`` takes them)."""
    f = jax.custom_vjp(fun, nondiff_argnums=nondiff_argnums)
    f.defvjp(fwd, bwd)
    return f


def forward_only(fun, what: str, nondiff_argnums: tuple):
    """``fun`` as a ``jax.custom_jvp`` whose rule raises TypeError naming ``what``: JAX runs the
    rule only when an argument is being differentiated (a tangent that is not zero), where the
    bare operation would fail with JAX's generic "Buffer callbacks do not support JVP"."""
    f = jax.custom_jvp(fun, nondiff_argnums=nondiff_argnums)

    def rule(*args):
        raise TypeError(f"{what} is not differentiable: an argument of it is being differentiated here (wrap "
                        f"it in jax.lax.stop_gradient, or see epcomm.jax for the differentiable calls)")

    f.defjvp(rule)
    return f


def dtype_name(dtype) -> str:
    """JAX / NumPy dtype -> epcomm's name (``jnp.dtype(...).name``)."""
    return jnp.dtype(dtype).name
