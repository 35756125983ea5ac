"""Launching a loaded kernel whose only argument is a params struct (``__grid_constant__``)."""
from __future__ import annotations

import ctypes

from epcomm.runtime import driver

_SUCCESS: list = [None]  # CUDA_SUCCESS, looked up once (cuda.bindings is imported lazily)


def launch(kernel, grid, block, stream: int, params: ctypes.Structure, *, smem: int = 0,
           cooperative: bool = False) -> None:
    """Launch ``kernel`` (a CUkernel handle) with one by-value struct argument.

    ``grid``/``block`` are ints or 3-tuples.  ``cooperative`` guarantees every block of the
    grid is resident at once (needed by kernels whose blocks wait on each other).
    """
    gx, gy, gz = (grid, 1, 1) if isinstance(grid, int) else tuple(grid)
    bx, by, bz = (block, 1, 1) if isinstance(block, int) else tuple(block)
    _launch(kernel, gx, gy, gz, bx, by, bz, smem, stream, launch_args(params), cooperative)


def launch_args(params: ctypes.Structure) -> ctypes.Array:
    """The argument array of a launch with ``params`` (one by-value struct), for
    :func:`launch_prepared`; the caller keeps both alive while it launches with them."""
    return (ctypes.c_void_p * 1)(ctypes.addressof(params))


def launch_prepared(kernel, grid: int, block: int, stream: int, args: ctypes.Array, smem: int,
                    cooperative: bool) -> None:
    """:func:`launch` for hot paths: 1-D grid and block, arguments from :func:`launch_args`
    (the struct may change between launches: the driver copies it at each launch)."""
    _launch(kernel, grid, 1, 1, block, 1, 1, smem, stream, args, cooperative)


def _launch(kernel, gx, gy, gz, bx, by, bz, smem, stream, args, cooperative) -> None:
    d = driver.drv()
    st = d.CUstream(stream)
    if cooperative:
        err = d.cuLaunchCooperativeKernel(kernel, gx, gy, gz, bx, by, bz, smem, st, ctypes.addressof(args))
    else:
        err = d.cuLaunchKernel(kernel, gx, gy, gz, bx, by, bz, smem, st, ctypes.addressof(args), 0)
    ok = _SUCCESS[0]
    if ok is None:
        ok = _SUCCESS[0] = d.CUresult.CUDA_SUCCESS
    if err[0] != ok:
        grid = gx if gy == gz == 1 else (gx, gy, gz)
        block = bx if by == bz == 1 else (bx, by, bz)
        driver.check(err, f"launch(grid={grid}, block={block}, smem={smem}, coop={cooperative})")
