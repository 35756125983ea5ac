"""LogFMT-10: the optional 10-bit logarithmic row format of the low-latency combine.

The format follows DeepEP V1's ``use_logfmt`` combine (``logfmt_encode`` and
``decode_and_accumulate`` in csrc/kernels/legacy/internode_ll.cu): every 128 channels of a
bfloat16 row share the magnitudes' maximum A and minimum, and each value travels as a sign bit
and a 9-bit code of its magnitude on a logarithmic grid between them.  The arithmetic is
epcomm's own: DeepEP uses the GPU's approximate ``lg2``/``ex2`` instructions, whose results are
not specified bit for bit; here every operation is a correctly rounded float32 one (a table
lookup, +, -, *, /, floor, and exponent arithmetic on bits), so the kernels and this module
agree bit for bit.

A group of 128 channels (magnitude bits m of each bfloat16 value, A = max m, amin = min m, as
bfloat16 numbers) is **cast** iff 2**-88 <= A < 1 and amin < A; otherwise it travels as its
bfloat16 bits, unchanged.  DeepEP casts under ``log2 A < 0 and log2 amin' < log2 A``; the lower
bound on A is epcomm's (a group that small is sent exactly), and DeepEP decides per 512 or 1024
channels, epcomm per 128.  For a cast group, all in float32 with one rounding per operation:

* ``L(m) = float(e - 127) + T[f]`` for the bfloat16 magnitude with exponent field e and
  mantissa field f, ``T[f]`` the float32 nearest log2(1 + f/128) (:data:`LOG2_TABLE`).  For
  e = 0 (zero and subnormals) this is below -126, which encodes as code 0 below.
* ``lx = L(A)``, ``la = max(L(amin), lx - 32)`` (DeepEP's ``kMinClip``), ``s = (lx - la) / 510``,
  ``inv = 1 / s``, ``rho = 0.5 + s * float32(ln 2 / 8)``, ``c = 2 - rho``.
* code of a value with magnitude m: ``clamp(floor((L(m) - la) * inv + c), 0, 511)``; the word
  sent is ``sign << 9 | code``.  ``rho`` puts the rounding threshold between two levels at
  their arithmetic mean to first order in s (DeepEP: ``log2((1 + 2**s) / 2) / s``, the same to
  O(s**3)), so a value goes to the nearer level on the linear scale.
* decode: code 0 is (signed) zero, code c >= 1 is ``E(la + (c - 1) * s)`` with sign, where
  ``E(y) = 2**floor(y) * P(y - floor(y))`` (exponent bits added; y >= -120, so the result is a
  normal float) and P the degree-4 polynomial :data:`EXP2_POLY` (max relative error 3e-6
  against 2**r on [0, 1)).

Error bound (:func:`logfmt_error_bound`, checked on random data by the CPU tests): for a value
x of a cast group, ``|decode(encode(x)) - x| <= eps(s) * |x|`` where ``eps(s) = 2**(s/2 + 2**-14)
- 1``, except for |x| < 2**la (possible only when la = lx - 32), where the error is at most
2**la.  Derivation: the levels are 2**(la + i s); a magnitude between two levels goes to the one
whose linear midpoint it has not crossed, so it is off by at most a factor 2**(s/2) (towards the
upper level) or 2**(rho s) (towards the lower one, which as a relative error is
1 - 2**(-rho s), smaller than 2**(s/2) - 1 since rho - 1/2 = s ln2 / 8 is of second order);
2**-14 covers the float32 roundings in the log domain (L, the code and the level: each below
2**-17, at most 2**-15.5 together) and P's error.  Beyond the level grid the format adds no error.
Since lx - la <= 32, s <= 32/510 and eps <= :data:`LOGFMT_MAX_REL_ERROR` (0.02203): every value
of a cast group comes back within 0.0221 |x| + 2**-32 A (A = its group's amax, times 1 + 2**-16);
the worst relative error, at a midpoint, is tanh(s ln2 / 2) = 0.02175 for s = 32/510.  Groups that
are not cast come back exactly.
"""
from __future__ import annotations

import numpy as np

from epcomm.reference._args import BF16, _F32, _I64

__all__ = ["LOGFMT_GROUP", "LOGFMT_MAX_CODE", "LOG2_TABLE", "EXP2_POLY", "LN2_8", "LOGFMT_MAX_REL_ERROR",
           "logfmt_encode", "logfmt_decode", "logfmt_round_trip", "logfmt_error_bound"]

#: Channels sharing one (amax, amin) pair.
LOGFMT_GROUP = 128
#: Largest magnitude code (9 bits); code 0 is zero.
LOGFMT_MAX_CODE = 511
#: log2 octaves between amax and the lowest level at most (DeepEP's kMinClip).
LOGFMT_MIN_CLIP = 32
#: float32 nearest log2(1 + f / 128), f = 0..127 (the kernels hold the same bits).
LOG2_TABLE = np.log2(1.0 + np.arange(128, dtype=np.float64) / 128.0).astype(_F32)
#: P(r) = 1 + r (c1 + r (c2 + r (c3 + r c4))) ~ 2**r on [0, 1): (c1, c2, c3, c4).
EXP2_POLY = tuple(_F32(float.fromhex(h)) for h in ("0x1.62d6c6p-1", "0x1.ee2452p-3", "0x1.abf85ap-5",
                                                   "0x1.b7f754p-7"))
#: float32(ln 2 / 8), the first-order term of the rounding threshold.
LN2_8 = _F32(float.fromhex("0x1.62e43p-4"))
#: eps(s) at the largest step s = 32/510 (rounded up): the relative error bound of every value
#: of a cast group that is not below its lowest level.
LOGFMT_MAX_REL_ERROR = float(2.0 ** (16.0 / 510.0 * (1 + 2.0**-20) + 2.0**-14) - 1)

_AMAX_CAST_LIMIT = 0x3F80     # bfloat16 1.0: groups with amax >= 1 are not cast
_AMAX_CAST_FLOOR = 39 << 7    # bfloat16 2**-88: nor groups whose amax is below it


def _bits(x) -> np.ndarray:
    if not isinstance(x, np.ndarray) or x.dtype != BF16:
        raise TypeError(f"x must be a bfloat16 numpy array, got {getattr(x, 'dtype', type(x).__name__)}")
    if x.ndim < 1 or x.shape[-1] % LOGFMT_GROUP:
        raise ValueError(f"x has shape {x.shape}; its last dim must be a multiple of {LOGFMT_GROUP}")
    return np.ascontiguousarray(x).view(np.uint16)


def _log2_mag(m: np.ndarray) -> np.ndarray:
    """L(m) for bfloat16 magnitude bits m (uint, < 0x8000): float(e - 127) + T[f], rounded once."""
    m = m.astype(_I64)
    return ((m >> 7) - 127).astype(_F32) + LOG2_TABLE[m & 127]


def _exp2(y: np.ndarray) -> np.ndarray:
    """E(y) = 2**floor(y) * P(y - floor(y)) for float32 y >= -120 (exponent added to P's bits)."""
    n = np.floor(y)
    r = (y - n).astype(_F32)
    c1, c2, c3, c4 = EXP2_POLY
    p = c4
    for c in (c3, c2, c1, _F32(1)):
        p = ((p * r).astype(_F32) + c).astype(_F32)
    return (p.view(np.int32) + (n.astype(np.int32) << 23)).view(_F32)


def _group_params(amax: np.ndarray, amin: np.ndarray):
    """(cast, la, s, inv, c) per group from its magnitude bits' max and min."""
    lx = _log2_mag(amax)
    la = np.maximum(_log2_mag(amin), (lx - _F32(LOGFMT_MIN_CLIP)).astype(_F32))
    cast = (amax < _AMAX_CAST_LIMIT) & (amax >= _AMAX_CAST_FLOOR) & (la < lx)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        s = ((lx - la).astype(_F32) / _F32(LOGFMT_MAX_CODE - 1)).astype(_F32)
        inv = (_F32(1) / s).astype(_F32)
    rho = (_F32(0.5) + (s * LN2_8).astype(_F32)).astype(_F32)
    c = (_F32(2) - rho).astype(_F32)
    return cast, la, s, inv, c


def _groups(b: np.ndarray):
    """Magnitude bits [..., G, 128] and the per-group (amax, amin) bits [..., G]."""
    g = b.reshape(*b.shape[:-1], b.shape[-1] // LOGFMT_GROUP, LOGFMT_GROUP)
    m = g & np.uint16(0x7FFF)
    return g, m, m.max(axis=-1), m.min(axis=-1)


def logfmt_encode(x) -> tuple[np.ndarray, np.ndarray]:
    """Encode bfloat16 rows.

    Args:
        x: bfloat16 [..., H], H % 128 == 0.

    Returns:
        (words uint16 [..., H], meta uint32 [..., H // 128]).  In a cast group a word is
        ``sign << 9 | code`` and the group's meta is ``amax | amin << 16`` (bfloat16 bits of the
        magnitudes' max and min, never 0); otherwise the words are x's bits and the meta is 0.

    Raises:
        TypeError: x not a bfloat16 array.  ValueError: H % 128 != 0.
    """
    b = _bits(x)
    g, m, amax, amin = _groups(b)
    cast, la, s, inv, c = _group_params(amax, amin)
    with np.errstate(invalid="ignore", over="ignore"):
        d = (_log2_mag(m) - la[..., None]).astype(_F32)
        t = ((d * inv[..., None]).astype(_F32) + c[..., None]).astype(_F32)
        code = np.clip(np.floor(np.where(cast[..., None], t, 0)), 0, LOGFMT_MAX_CODE).astype(np.uint16)
    word = ((g >> 15) << 9) | code
    words = np.where(cast[..., None], word, g).reshape(b.shape)
    meta = np.where(cast, amax.astype(np.uint32) | (amin.astype(np.uint32) << 16), 0).astype(np.uint32)
    return words, meta


def logfmt_decode(words, meta) -> np.ndarray:
    """Inverse of :func:`logfmt_encode`: float32 [..., H] (raw groups exactly, cast groups on
    their grid).

    Raises:
        TypeError: words not uint16 or meta not uint32.  ValueError: mismatched shapes.
    """
    if not isinstance(words, np.ndarray) or words.dtype != np.uint16:
        raise TypeError("words must be a uint16 numpy array")
    if not isinstance(meta, np.ndarray) or meta.dtype != np.uint32:
        raise TypeError("meta must be a uint32 numpy array")
    if (words.ndim < 1 or words.shape[-1] % LOGFMT_GROUP
            or meta.shape != (*words.shape[:-1], words.shape[-1] // LOGFMT_GROUP)):
        raise ValueError(f"words {words.shape} and meta {meta.shape} do not match: meta must be "
                         f"[..., H // {LOGFMT_GROUP}] for words [..., H]")
    G = meta.shape[-1]
    w = words.reshape(*words.shape[:-1], G, LOGFMT_GROUP)
    cast = meta != 0
    amax = (meta & 0xFFFF).astype(np.uint16)
    amin = (meta >> 16).astype(np.uint16)
    _, la, s, _, _ = _group_params(amax, amin)
    code = (w & 0x1FF).astype(_I64)
    with np.errstate(invalid="ignore", over="ignore"):
        y = (la[..., None] + ((code - 1).astype(_F32) * s[..., None]).astype(_F32)).astype(_F32)
        mag = np.where(code == 0, _F32(0), _exp2(np.where(cast[..., None] & (code > 0), y, _F32(-1))))
    dec = np.where(((w >> 9) & 1) != 0, -mag, mag).astype(_F32)
    raw = (w.astype(np.uint32) << 16).view(_F32)
    return np.where(cast[..., None], dec, raw).reshape(words.shape)


def logfmt_round_trip(x) -> np.ndarray:
    """``logfmt_decode(*logfmt_encode(x))``: what the combine adds for an expert row x (float32)."""
    return logfmt_decode(*logfmt_encode(x))


def logfmt_error_bound(x) -> np.ndarray:
    """The bound of the module docstring for every element of bfloat16 ``x`` [..., H]: float64
    [..., H] with ``|logfmt_round_trip(x) - x| <= bound`` (0 in groups that are not cast)."""
    b = _bits(x)
    _, m, amax, amin = _groups(b)
    cast, la, s, _, _ = _group_params(amax, amin)
    s64 = s.astype(np.float64)[..., None]
    la64 = la.astype(np.float64)[..., None]
    xa = np.abs((m.astype(np.uint32) << 16).view(_F32).astype(np.float64))
    eps = 2.0 ** (s64 / 2 + 2.0**-14) - 1
    floor = np.where(xa < 2.0**la64, 2.0**la64, 0.0)
    bound = np.where(cast[..., None], eps * xa + floor, 0.0)
    return bound.reshape(b.shape)
