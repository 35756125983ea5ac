"""Bit-exact comparison helpers shared by the GPU test modules (imported in spawned workers too)."""
from __future__ import annotations

import numpy as np


def to_np(obj):
    """Host numpy copy of any framework's array."""
    from epcomm import interop
    return interop.to_numpy(obj)


def bits(a):
    """Raw bits for exact comparison whatever the dtype (bf16/fp8 included)."""
    a = np.ascontiguousarray(a)
    return a.view({1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}[a.dtype.itemsize])


def assert_bits(name, got, want):
    got, want = np.asarray(got), np.asarray(want)
    if got.dtype.kind in "iu" and want.dtype.kind in "iu" and got.dtype != want.dtype:
        got, want = got.astype(np.int64), want.astype(np.int64)  # e.g. JAX without x64: int32
    g, w = bits(got), bits(want)
    assert g.shape == w.shape, f"{name}: shape {g.shape} != reference {w.shape}"
    bad = np.argwhere(g != w)
    assert bad.size == 0, f"{name}: {len(bad)} elements differ from the reference, first at {bad[0].tolist()}"
