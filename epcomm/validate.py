"""Argument rules, written once and used by the API, the engines and the reference (each raises
TypeError / ValueError naming the argument, before any kernel is launched).  Pure functions of
Python values and NumPy arrays: this module sits below every other epcomm layer."""
from __future__ import annotations

import numpy as np


def check_int(name: str, v, *, lo: int | None = None, hi: int | None = None) -> int:
    if not isinstance(v, int) or isinstance(v, bool):
        try:
            if isinstance(v, np.integer):
                v = int(v)
            else:
                raise TypeError
        except TypeError:
            raise TypeError(f"{name} must be an int, got {type(v).__name__}") from None
    if lo is not None and v < lo:
        raise ValueError(f"{name}={v} must be >= {lo}")
    if hi is not None and v > hi:
        raise ValueError(f"{name}={v} must be <= {hi}")
    return v


def check_bool(name: str, v) -> bool:
    """A flag: bool (or NumPy bool, or the ints 0 and 1); anything else raises TypeError (a
    string such as "no" would otherwise count as True)."""
    if isinstance(v, bool):
        return v
    if isinstance(v, np.bool_):
        return bool(v)
    if isinstance(v, int) and v in (0, 1):
        return bool(v)
    raise TypeError(f"{name} must be a bool, got {type(v).__name__} {v!r}")


def index_range(a) -> tuple[int, int] | None:
    """(min, max) of a NumPy integer array, None if it is empty."""
    if a.size == 0:
        return None
    return int(a.min()), int(a.max())


def first_repeated_expert(a) -> int | None:
    """Index of the first row of a NumPy [N, K] index array that lists an expert (>= 0) twice,
    or None."""
    if a.size == 0 or a.shape[1] < 2:
        return None
    srt = np.sort(a, axis=1)
    dup = ((srt[:, 1:] == srt[:, :-1]) & (srt[:, 1:] >= 0)).any(axis=1)
    return int(np.argmax(dup)) if dup.any() else None


def check_index_values(a, num_experts: int, name: str = "topk_idx", *, unique: bool = False) -> None:
    """The rules of expert indices, on a NumPy integer array ``a`` [N, K]: every entry in
    [-1, num_experts) (ValueError naming the first bad value), and with ``unique`` no row listing
    an expert (>= 0) twice."""
    check_expert_range(name, a, num_experts)
    if unique:
        check_unique_experts(name, a)


# --------------------------------------------------------------------------- shared shape and index rules

#: Channels sharing one FP8 scale: FP8 hidden sizes are multiples of it.
FP8_GROUP = 128
#: bf16 channels in one 16-byte row unit: BF16 normal-mode hidden sizes are multiples of it.
BF16_ROW_CHANNELS = 8


def check_experts_divisible(num_experts: int, num_ranks: int, ranks_arg: str | None = None) -> int:
    """Experts per rank, ``num_experts // num_ranks`` (both already checked ints >= 1).

    Raises ValueError when num_experts is not a multiple of num_ranks.  ``ranks_arg``: the
    caller's argument name when it was given the rank count as an argument (the message reads
    "... a multiple of num_ranks=4"); None when the rank count is the group's size ("... a
    multiple of the number of ranks 4")."""
    if num_experts % num_ranks:
        ranks = f"{ranks_arg}={num_ranks}" if ranks_arg else f"the number of ranks {num_ranks}"
        raise ValueError(f"num_experts={num_experts} must be a multiple of {ranks}")
    return num_experts // num_ranks


def check_hidden_size(hidden: int, *, fp8: bool = False, low_latency: bool = False, name: str | None = "x") -> int:
    """Return ``hidden`` (an int) if the mode accepts it, else raise ValueError.

    Rules: the low-latency kernels need a positive multiple of FP8_GROUP; FP8 data a multiple of
    FP8_GROUP (one scale per 128 channels); BF16 normal-mode rows a multiple of
    BF16_ROW_CHANNELS (16-byte rows).  ``name``: the array whose last dimension is ``hidden``
    (message "x: hidden size 100 must be ..."), or None when ``hidden`` is itself the argument
    ("hidden=100 must be ...")."""
    if low_latency:
        step, positive, why = FP8_GROUP, True, "for the low-latency kernels"
    elif fp8:
        step, positive, why = FP8_GROUP, False, f"(one scale per {FP8_GROUP} channels)"
    else:
        step, positive, why = BF16_ROW_CHANNELS, False, "(16-byte rows)"
    if hidden % step == 0 and (hidden > 0 or not positive):
        return hidden
    subject = f"hidden size {hidden}" if name else f"hidden={hidden}"
    subject = ("FP8 " if fp8 else "") + subject
    if name:
        subject = f"{name}: {subject}"
    raise ValueError(f"{subject} must be a {'positive ' if positive else ''}multiple of {step} {why}")


def check_expert_range(name: str, a, num_experts: int) -> None:
    """Raise ValueError if the NumPy integer array ``a`` holds an entry outside [-1, num_experts)."""
    r = index_range(a)
    if r is None:
        return
    lo, hi = r
    if lo < -1 or hi >= num_experts:
        bad = lo if lo < -1 else hi
        raise ValueError(f"{name} holds expert index {bad}, outside [-1, {num_experts}) "
                         f"(num_experts={num_experts}); -1 marks an unused slot")


def check_unique_experts(name: str, a) -> None:
    """Raise ValueError if a row of the NumPy [N, K] index array ``a`` lists an expert (>= 0) twice."""
    t = first_repeated_expert(a)
    if t is not None:
        raise ValueError(f"{name} row {t} lists the same expert twice ({a[t].tolist()}); each expert may "
                         f"appear once per token (-1 marks unused slots)")


#: The arithmetic a Buffer (and the reference) can follow: epcomm's own, or DeepEP V1's where
#: the two differ (docs/design.md, "Numerics").
NUMERICS = ("epcomm", "deepep")


def check_numerics(v, name: str = "numerics") -> str:
    """``v`` if it is one of :data:`NUMERICS`; TypeError for a non-string, ValueError otherwise."""
    if not isinstance(v, str):
        raise TypeError(f"{name} must be a str, one of {NUMERICS}, got {type(v).__name__}")
    if v not in NUMERICS:
        raise ValueError(f"{name}={v!r}: expected one of {NUMERICS}")
    return v
