"""FP8 (e4m3) per-token quantisation and UE8M0 scale packing, as the kernels compute them."""
from __future__ import annotations

import numpy as np

from epcomm.reference._args import BF16, FP8, FP8_GROUP, FP8_MAX, _F32, _I32, _I64, _array
from epcomm.validate import check_hidden_size, check_int, check_numerics

__all__ = ["fp8_quantize", "fp8_dequantize", "pack_ue8m0", "unpack_ue8m0", "FP8_INV_MAX_DEEPEP"]

#: DeepEP's ``kFinfoAmaxInvE4M3 = 1 / 448.0f``: float32(1/448), 0x3B124925.
FP8_INV_MAX_DEEPEP = _F32(1) / _F32(FP8_MAX)


def _of_dtype(name: str, a, dtype) -> np.ndarray:
    """``a`` if it is a numpy array of ``dtype`` (any shape), else TypeError."""
    if not isinstance(a, np.ndarray) or a.dtype != np.dtype(dtype):
        want = np.dtype(dtype).name
        raise TypeError(f"{name} must be {'an' if want[0] in 'aeiou' else 'a'} {want} array, "
                        f"got {getattr(a, 'dtype', type(a).__name__)}")
    return a


def _fp8_hidden(name: str, a: np.ndarray) -> int:
    """The last dim of ``a`` (its hidden size), a multiple of FP8_GROUP, else ValueError."""
    if a.ndim < 1:
        raise ValueError(f"{name} is 0-d; it needs a last dim (the hidden size, a multiple of {FP8_GROUP})")
    return check_hidden_size(a.shape[-1], fp8=True, name=name)


def _check_ue8m0(round_scale, use_ue8m0) -> None:
    if use_ue8m0 and not round_scale:
        raise ValueError("use_ue8m0=True needs round_scale=True (UE8M0 stores powers of two only)")


def _round_scale_up(s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Round positive normal float32 scales up to powers of two; return (scale, exact inverse)."""
    b = s.view(np.uint32).astype(_I64)
    b = np.where((b & 0x7FFFFF) != 0, (b & 0xFF800000) + 0x800000, b)
    s2 = b.astype(np.uint32).view(_F32)
    # 1/2**(e-127) = 2**(127-e): biased exponent 254 - e, built from bits so it is exact.
    inv = ((254 - (b >> 23)) << 23).astype(np.uint32).view(_F32)
    return s2, inv


def fp8_quantize(x_bf16, *, round_scale=False, use_ue8m0=False, numerics="epcomm") -> tuple[np.ndarray, np.ndarray]:
    """Per-token FP8 (e4m3) quantisation, one float32 scale per 128 channels.

    Args:
        x_bf16: bfloat16 (or float32) array [..., H], H % 128 == 0; values must be finite.
        round_scale: round every scale up to a power of two (its inverse is then exact).
        use_ue8m0: the scales are meant for UE8M0 packing; needs round_scale.  The result is
            the same as with round_scale alone (pack with :func:`pack_ue8m0`).
        numerics: "epcomm" or "deepep" (DeepEP V1's scale arithmetic; see below).

    Recipe, float32 IEEE operations throughout (GPU kernels reproduce it bit for bit), per
    group of 128 channels v = float32(x): amax = max(max|v|, float32(1e-4));
    s = float32(amax / 448); with round_scale, s is rounded up to a power of two and
    inv = 1/s exactly, else inv = float32(448 / amax); q = e4m3(clip(float32(v * inv), -448, 448))
    rounded to nearest even.

    ``numerics="deepep"`` (DeepEP's ``calculate_fp8_scales``, csrc/kernels/legacy/utils.cuh):
    s = float32(amax * c) with c = float32(1 / 448) = 0x3B124925, one rounding after a product
    by an already rounded constant instead of one correctly rounded quotient; with round_scale
    s = 2**ceil(log2(float32(amax * c))) and inv = 1/s.  The multiplier inv and so q are the
    same in both; the stored scale differs in its last bit for about half of the amax values
    without round_scale, and never with it (for bfloat16 input: an exact power of two times
    448 is the only amax whose quotient lies near a power of two, and there both agree).

    Returns:
        (q float8_e4m3fn [..., H], scales float32 [..., H // 128]); x ~= q * scale.

    Raises:
        TypeError: x not a bfloat16/float32 array.
        ValueError: H % 128 != 0, or use_ue8m0 without round_scale.
    """
    if not isinstance(x_bf16, np.ndarray):
        raise TypeError(f"x_bf16 must be a numpy array, got {type(x_bf16).__name__}")
    if x_bf16.dtype not in (BF16, np.dtype(_F32)):
        raise TypeError(f"x_bf16 must have dtype bfloat16 or float32, got {x_bf16.dtype.name}")
    H = _fp8_hidden("x_bf16", x_bf16)
    _check_ue8m0(round_scale, use_ue8m0)
    deepep = check_numerics(numerics) == "deepep"
    lead = x_bf16.shape[:-1]
    G = H // FP8_GROUP
    v = x_bf16.astype(_F32).reshape(*lead, G, FP8_GROUP)
    amax = np.abs(v).max(axis=-1, initial=_F32(0))
    amax = np.maximum(amax, _F32(1e-4))
    if deepep:
        s = (amax * FP8_INV_MAX_DEEPEP).astype(_F32)
    else:
        s = (amax / _F32(FP8_MAX)).astype(_F32)
    if round_scale:
        s, inv = _round_scale_up(s)
    else:
        inv = (_F32(FP8_MAX) / amax).astype(_F32)
    scaled = (v * inv[..., None]).astype(_F32)
    q = np.clip(scaled, _F32(-FP8_MAX), _F32(FP8_MAX)).astype(FP8)
    return q.reshape(*lead, H), s


def fp8_dequantize(q, scales) -> np.ndarray:
    """float32(q) * scale of its 128-channel group.

    Args:
        q: float8_e4m3fn [..., H], H % 128 == 0.
        scales: float32 [..., H // 128], same leading shape.

    Returns:
        float32 [..., H].

    Raises:
        TypeError: wrong array types or dtypes.  ValueError: mismatched shapes.
    """
    G = _fp8_hidden("q", _of_dtype("q", q, FP8)) // FP8_GROUP
    _array("scales", scales, _F32, q.ndim, (*q.shape[:-1], G))
    v = q.astype(_F32).reshape(*q.shape[:-1], G, FP8_GROUP)
    return (v * scales[..., None]).reshape(q.shape)


def pack_ue8m0(scales) -> np.ndarray:
    """Pack power-of-two float32 scales as UE8M0 exponent bytes, 4 per int32.

    Args:
        scales: float32 [..., G], every entry a positive normal power of two.

    The byte of a group is its biased float32 exponent, (bits >> 23) & 0xFF.  Word w holds
    groups 4w..4w+3, group 4w+i in bits 8i..8i+7; missing groups of the last word are 0.

    Returns:
        int32 [..., ceil(G / 4)].

    Raises:
        TypeError: not a float32 array.  ValueError: an entry that is not a positive normal power of two.
    """
    _of_dtype("scales", scales, _F32)
    if scales.ndim < 1:
        raise ValueError("scales must have at least one dimension")
    b = np.ascontiguousarray(scales).view(np.uint32)
    expo = (b >> 23) & 0xFF
    bad = ((b & 0x807FFFFF) != 0) | (expo == 0) | (expo == 0xFF)
    if bad.any():
        raise ValueError(f"scales holds {scales[bad].ravel()[0]!r}, not a positive normal power of two "
                         "(round_scale=True produces those)")
    G = scales.shape[-1]
    W = -(-G // 4)
    byts = np.zeros((*scales.shape[:-1], W * 4), dtype=np.uint32)
    byts[..., :G] = expo
    byts = byts.reshape(*scales.shape[:-1], W, 4)
    words = byts[..., 0] | (byts[..., 1] << 8) | (byts[..., 2] << 16) | (byts[..., 3] << 24)
    return words.astype(np.uint32).view(_I32)


def unpack_ue8m0(packed, num_groups) -> np.ndarray:
    """Inverse of :func:`pack_ue8m0`.

    Args:
        packed: int32 [..., ceil(num_groups / 4)].
        num_groups: G >= 0.

    Returns:
        float32 [..., G] with scale 2**(byte - 127); a 0 byte decodes as 0.0 and 0xFF as inf
        (pack_ue8m0 never produces either).

    Raises:
        TypeError: not an int32 array.  ValueError: last dim != ceil(G / 4).
    """
    G = check_int("num_groups", num_groups, lo=0)
    _of_dtype("packed", packed, _I32)
    W = -(-G // 4)
    if packed.ndim < 1 or packed.shape[-1] != W:
        raise ValueError(f"packed has shape {packed.shape}, its last dim must be ceil({G}/4) = {W}")
    u = np.ascontiguousarray(packed).view(np.uint32)
    byts = (u[..., None] >> np.array([0, 8, 16, 24], dtype=np.uint32)) & 0xFF
    byts = byts.reshape(*packed.shape[:-1], W * 4)[..., :G]
    return (byts.astype(np.uint32) << 23).view(_F32)
