"""Trace-time checks of :mod:`epcomm.jax`'s arguments (shapes and dtypes of JAX arrays or
tracers; TypeError / ValueError naming the argument, before anything is traced) and the output
specs of each operation, from the engines' own rules."""
from __future__ import annotations

from dataclasses import dataclass

from epcomm.buffer import Buffer
from epcomm.errors import BufferStateError
from epcomm.interop import jax_callback as jx
from epcomm.kernels import intranode as K_intra
from epcomm.kernels import layout as K_layout
from epcomm.low_latency.dispatch import check_format, check_sizes, check_topk_width
from epcomm.low_latency.handle import result_specs
from epcomm.normal.shapes import worst_output_specs
from epcomm.validate import check_bool, check_experts_divisible, check_hidden_size, check_int


def check_buffer(buffer, mode: str) -> Buffer:
    """``buffer`` as a live :class:`epcomm.Buffer` with ``mode`` ("normal": an NVLink buffer in
    one node; "low_latency"); TypeError / ValueError / BufferStateError otherwise."""
    if not isinstance(buffer, Buffer):
        raise TypeError(f"buffer: expected an epcomm.Buffer, got {type(buffer).__name__}")
    if buffer.ctx.destroyed:
        raise BufferStateError("buffer: was destroyed")
    if mode == "normal":
        if buffer._inter is not None:
            raise ValueError("buffer: spans nodes; epcomm.jax runs the normal mode inside one node only")
        if buffer._intra is None:
            raise ValueError("buffer: has no NVLink buffer (create it with num_nvl_bytes > 0)")
    elif buffer._ll is None:
        raise ValueError("buffer: has no low-latency state (create it with low_latency_mode=True)")
    return buffer


def _dtype(a) -> str:
    return jx.dtype_name(a.dtype)


def operand(a, name: str, shape: tuple, dtype) -> tuple:
    """(``a``, (its shape, dtype name)) if ``a`` is an array of ``dtype`` (a name or a tuple of
    names) and ``shape`` (None entries: any size); TypeError / ValueError naming ``name``."""
    if not (hasattr(a, "shape") and hasattr(a, "dtype")) or isinstance(a, (tuple, list)):
        raise TypeError(f"{name}: expected a JAX array, got {type(a).__name__}")
    dt = _dtype(a)
    ok = (dtype,) if isinstance(dtype, str) else tuple(dtype)
    if dt not in ok:
        raise TypeError(f"{name}: expected dtype {' or '.join(ok)}, got {dt}")
    sh = tuple(int(s) for s in a.shape)
    if len(sh) != len(shape) or any(w is not None and w != s for w, s in zip(shape, sh)):
        want = "(" + ", ".join("N" if w is None else str(w) for w in shape) + ")"
        raise ValueError(f"{name}: expected shape {want}, got {sh}")
    return a, (sh, dt)


def index_operand(a, name: str, rows: int | None = None, cols: int | None = None) -> tuple:
    """Expert indices int32 or int64 [rows, cols] as the operand the kernels read: int64 values
    in int32 pairs (``(pairs, ((N, K), "int64"))``)."""
    a, (sh, _) = operand(a, name, (rows, cols), ("int32", "int64"))
    return jx.int64_pairs(a), (sh, "int64")


def x_operands(x) -> tuple[list, bool]:
    """The operands of a dispatch's ``x`` (bf16 [N, H], or the FP8 pair) and whether it is FP8."""
    if isinstance(x, tuple):
        if len(x) != 2:
            raise ValueError("x: an FP8 input is a pair (data float8_e4m3fn [N, H], scales float32 [N, H/128])")
        d = operand(x[0], "x[0]", (None, None), "float8_e4m3fn")
        N, H = d[1][0]
        check_hidden_size(H, fp8=True, name="x[0]")
        return [d, operand(x[1], "x[1]", (N, H // 128), "float32")], True
    d = operand(x, "x", (None, None), "bfloat16")
    check_hidden_size(d[1][0][1])
    return [d], False


def dispatch_specs(buffer: Buffer, N: int, H: int, E: int, K: int, M: int, fp8: bool, weights: bool) -> dict:
    """The outputs of a ``num_worst_tokens=M`` dispatch that computes its layout; ValueError for
    a size the engine refuses."""
    R = buffer.num_ranks
    check_experts_divisible(E, R)
    if E // R > K_intra.MAX_LOCAL_EXPERTS:
        raise ValueError(f"{E // R} experts per rank: at most {K_intra.MAX_LOCAL_EXPERTS} supported")
    if K < 1:
        raise ValueError("topk_idx: needs at least one column")
    K_layout.check_layout_smem(E, R)
    return worst_output_specs(R, N, H, E, K, M, fp8, weights, cached=False)


@dataclass(frozen=True)
class LLArgs:
    """A low-latency dispatch's checked arguments: operands, sizes, flags, slot."""
    x: tuple
    topk: tuple
    N: int
    H: int
    T: int
    E: int
    K: int
    fp8: bool
    round_scale: bool
    ue8m0: bool
    slot: int
    cmd: bool


def check_ll_args(buffer: Buffer, x, topk_idx, T, E, use_fp8, round_scale, use_ue8m0, slot,
                  command_buffer) -> LLArgs:
    """Every argument of a low-latency dispatch, by the engine's rules."""
    fp8, rs, ue = check_format(use_fp8, round_scale, use_ue8m0)
    cmd = check_bool("command_buffer", command_buffer)
    slot = check_int("slot", slot, lo=0, hi=1)
    xo = operand(x, "x", (None, None), "bfloat16")
    N, H = xo[1][0]
    T, H, E = check_sizes(N, H, T, E, buffer.num_ranks)
    tk = index_operand(topk_idx, "topk_idx", rows=N)
    K = check_topk_width(tk[1][0][1])
    return LLArgs(xo, tk, N, H, T, E, K, fp8, rs, ue, slot, cmd)


def ll_specs(buffer: Buffer, T: int, H: int, E: int, fp8: bool = False, ue8m0: bool = False) -> dict:
    """A low-latency dispatch's arrays (name -> (shape, dtype)), the engine's slot results."""
    return result_specs(buffer.num_ranks, T, H, E, fp8, ue8m0)
