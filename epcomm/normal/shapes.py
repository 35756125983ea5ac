"""Shapes and dtypes of what a normal-mode dispatch writes: its send plan (kept in the handle),
its received rows, and with ``num_worst_tokens`` everything at once, as a compiler's fixed-shape
outputs need them (:mod:`epcomm.jax`)."""
from __future__ import annotations

from epcomm.normal.layout import layout_specs


def route_specs(N: int, R: int) -> dict:
    """name -> (shape, dtype) of the send plan a dispatch of N tokens makes (kept in its handle)."""
    return {"rank_prefix": ((R + 1,), "int32"), "send_list": ((R, max(N, 1)), "int32"),
            "send_pos": ((N, R), "int32"), "send_count": ((R,), "int32")}


def recv_specs(M: int, H: int, fp8: bool, Kt: int, weights: bool, cached: bool) -> dict:
    """name -> (shape, dtype) of the receive's outputs for M rows, FP8 scales row-major [M, H/128]
    (the receive writes them column-major [H/128, M] when the input's were)."""
    spec = {"recv_x": ((M, H), "float8_e4m3fn" if fp8 else "bfloat16")}
    if fp8:
        spec["recv_scales"] = ((M, H // 128), "float32")
    if Kt:
        spec["recv_topk_idx"] = ((M, Kt), "int64")
        if weights:
            spec["recv_topk_weights"] = ((M, Kt), "float32")
    if not cached:
        spec["recv_src_idx"] = ((M,), "int32")
    return spec


def worst_output_specs(R: int, N: int, H: int, E: int, Kt: int, M: int, fp8: bool, weights: bool,
                       cached: bool) -> dict:
    """name -> (shape, dtype) of every array a ``num_worst_tokens=M`` dispatch of N tokens writes,
    given no layout (it computes it) and row-major FP8 scales: the receive's outputs and, unless
    ``cached``, the send plan and the layout."""
    spec = recv_specs(M, H, fp8, Kt, weights, cached)
    if not cached:
        spec.update(route_specs(N, R))
        spec.update(layout_specs(N, R, E, 0))
    return spec
