"""Argument checks of the reference: per-rank lists, arrays of a dtype and shape, routings.

Messages name the argument and the rank (``x[3]``); a wrong container, array type or dtype
raises TypeError, a wrong length, shape or value ValueError.
"""
from __future__ import annotations

import ml_dtypes
import numpy as np

from epcomm.validate import FP8_GROUP, check_expert_range

BF16 = np.dtype(ml_dtypes.bfloat16)
FP8 = np.dtype(ml_dtypes.float8_e4m3fn)
#: Largest finite float8_e4m3fn value.
FP8_MAX = 448.0

_F32 = np.float32
_I32 = np.int32
_I64 = np.int64

__all__ = ["BF16", "FP8", "FP8_MAX", "FP8_GROUP"]


def _rank_list(name: str, v, num_ranks: int | None = None) -> list:
    """``v`` as a list over ranks: one entry per rank, or at least one when num_ranks is None."""
    if not isinstance(v, (list, tuple)):
        raise TypeError(f"{name} must be a list over ranks, got {type(v).__name__}")
    if num_ranks is None and len(v) == 0:
        raise ValueError(f"{name} must hold at least one rank")
    if num_ranks is not None and len(v) != num_ranks:
        raise ValueError(f"{name} has {len(v)} entries, expected one per rank ({num_ranks})")
    return list(v)


def _array(name: str, a, dtype, ndim: int, shape: tuple | None = None) -> np.ndarray:
    """Check one array; a ``dtype`` of None accepts any, ``shape`` entries that are None are free."""
    if not isinstance(a, np.ndarray):
        raise TypeError(f"{name} must be a numpy array, got {type(a).__name__}")
    if dtype is not None and a.dtype != np.dtype(dtype):
        raise TypeError(f"{name} must have dtype {np.dtype(dtype).name}, got {a.dtype.name}")
    if a.ndim != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {a.shape}")
    if shape is not None:
        for want, got in zip(shape, a.shape):
            if want is not None and want != got:
                raise ValueError(f"{name} has shape {a.shape}, expected "
                                 f"{tuple('*' if w is None else w for w in shape)}")
    return a


def _same_width_list(name: str, v, dtype, num_ranks: int | None, rows: list | None = None,
                     each=None) -> list[np.ndarray]:
    """A list over ranks of 2-D ``dtype`` arrays sharing their last dim (that of entry 0).

    ``rows``: each rank's row count, or None (free).  ``each(label, rank, array)``: a further
    check run on every entry right after its shape check.
    """
    v = _rank_list(name, v, num_ranks)
    _array(f"{name}[0]", v[0], dtype, 2)
    width = v[0].shape[1]
    for r, a in enumerate(v):
        _array(f"{name}[{r}]", a, dtype, 2, (None if rows is None else rows[r], width))
        if each is not None:
            each(f"{name}[{r}]", r, a)
    return v


def _topk_list(name: str, v, num_ranks: int, num_tokens: list[int], num_experts: int) -> list[np.ndarray]:
    """int64 [N_r, K] per rank, one K for all ranks, indices in [-1, E)."""
    return _same_width_list(name, v, _I64, num_ranks, num_tokens,
                            lambda label, _, a: check_expert_range(label, a, num_experts))


def _arrays(name: str, v, dtype, num_ranks: int, shapes: list[tuple]) -> list[np.ndarray]:
    """A list over ranks of 2-D ``dtype`` arrays of the given shapes."""
    v = _rank_list(name, v, num_ranks)
    for r, a in enumerate(v):
        _array(f"{name}[{r}]", a, dtype, 2, shapes[r])
    return v
