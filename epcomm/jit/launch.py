"""Launching a loaded kernel whose only argument is a params struct (``__grid_constant__``)."""
from __future__ import annotations

import ctypes

from .. import _cuda


def launch(kernel, grid, block, stream: int, params: ctypes.Structure, *, smem: int = 0,
           cooperative: bool = False) -> None:
    """Launch ``kernel`` (a CUkernel handle) with one by-value struct argument.

    ``grid``/``block`` are ints or 3-tuples.  ``cooperative`` guarantees every block of the
    grid is resident at once (needed by kernels whose blocks wait on each other).
    """
    d = _cuda.drv()
    gx, gy, gz = (grid, 1, 1) if isinstance(grid, int) else tuple(grid)
    bx, by, bz = (block, 1, 1) if isinstance(block, int) else tuple(block)
    args = (ctypes.c_void_p * 1)(ctypes.addressof(params))
    st = d.CUstream(stream)
    if cooperative:
        err = d.cuLaunchCooperativeKernel(kernel, gx, gy, gz, bx, by, bz, smem, st, ctypes.addressof(args))
    else:
        err = d.cuLaunchKernel(kernel, gx, gy, gz, bx, by, bz, smem, st, ctypes.addressof(args), 0)
    if err[0] != d.CUresult.CUDA_SUCCESS:
        _cuda.check(err, f"launch(grid={grid}, block={block}, smem={smem}, coop={cooperative})")
