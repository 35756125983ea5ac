"""float32 arithmetic NumPy lacks: the fused multiply-add (one rounding of a * b + c)."""
from __future__ import annotations

import numpy as np

_F32, _F64 = np.float32, np.float64


def fma32(a, b, c) -> np.ndarray:
    """float32(a * b + c) rounded once to nearest even, as the GPU's ``fma.rn.f32``.

    a, b, c: float32 arrays (broadcast together).  The product of two float32 values is exact in
    float64 (48 significant bits <= 53), and so is the sum's error (Knuth's TwoSum); the float64
    sum is then rounded to odd (its last bit forced to 1 when inexact), which makes the final
    rounding to float32 correct: 53 >= 24 + 2 bits (Boldo and Melquiond, "When double rounding
    is odd", 2005).  Infinities and NaNs propagate as float64 arithmetic does.
    """
    a64, b64, c64 = (np.asarray(v, dtype=_F32).astype(_F64) for v in (a, b, c))
    p = a64 * b64
    with np.errstate(invalid="ignore", over="ignore"):
        s = p + c64
        pv = s - c64
        err = (p - pv) + (c64 - (s - pv))
        odd_fix = np.isfinite(s) & (err != 0) & ((s.view(np.uint64) & 1) == 0)
        toward = np.where(err > 0, np.inf, -np.inf)
        s = np.where(odd_fix, np.nextafter(s, toward), s)
        return s.astype(_F32)
