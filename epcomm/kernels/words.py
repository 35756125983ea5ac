"""Packed words the kernels compare across ranks (shape words): fields of fixed bit widths, low
bits first, so that the host can name the fields of two words that differ."""
from __future__ import annotations


def pack_fields(fields, values, family: str) -> int:
    """``values`` packed by ``fields`` ((name, bits), ...); ValueError naming the field (and the
    kernel ``family``) for a value outside [0, 2**bits)."""
    w, shift = 0, 0
    for (name, bits), v in zip(fields, values):
        if not 0 <= v < (1 << bits):
            raise ValueError(f"{name}={v} does not fit the {family} kernels' {bits}-bit field")
        w |= v << shift
        shift += bits
    return w


def unpack_fields(fields, w: int) -> dict[str, int]:
    """The fields of a packed word, by name."""
    out, shift = {}, 0
    for name, bits in fields:
        out[name] = (w >> shift) & ((1 << bits) - 1)
        shift += bits
    return out
