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


def check_experts_divisible(num_experts: int, num_ranks: int, ranks_name: str | None = None) -> int:
    """Experts per rank; ValueError unless ``num_experts`` is a multiple of ``num_ranks`` (expert e
    lives on rank e // (E / R)).  ``ranks_name``: how the message names the rank count (an
    argument name), else "the number of ranks"."""
    if num_experts % num_ranks:
        of = f"{ranks_name}={num_ranks}" if ranks_name else f"the number of ranks {num_ranks}"
        raise ValueError(f"num_experts={num_experts} must be a multiple of {of}")
    return num_experts // num_ranks


# Why the normal mode's hidden sizes are multiples of these: BF16 rows move in 16-byte pieces, and
# FP8 rows carry one scale per 128 channels.
_HIDDEN_WHY = {8: "16-byte rows", 128: "one scale per 128 channels"}


def check_hidden_multiple(label: str, hidden: int, multiple: int) -> None:
    """ValueError ``"{label} must be a multiple of {multiple} (why)"`` unless it is one."""
    if hidden % multiple:
        raise ValueError(f"{label} must be a multiple of {multiple} ({_HIDDEN_WHY[multiple]})")


def check_hidden(name: str, v, multiple: int = 8) -> int:
    """A hidden size argument: an int, positive and a multiple of ``multiple`` (8 or 128)."""
    v = check_int(name, v, lo=multiple)
    check_hidden_multiple(f"{name}={v}", v, multiple)
    return v


def check_event(previous_event) -> None:
    """``previous_event`` must be None or an EventOverlap (what async calls return)."""
    from epcomm.runtime.event import EventOverlap
    if previous_event is not None and not isinstance(previous_event, EventOverlap):
        raise TypeError(f"previous_event: expected an EventOverlap (the event an epcomm call returned) or None, "
                        f"got {type(previous_event).__name__}")


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
    r = index_range(a)
    if r is None:
        return
    lo, hi = r
    if lo < -1 or hi >= num_experts:
        bad = lo if lo < -1 else hi
        raise ValueError(f"{name} holds expert index {bad}, outside [-1, {num_experts}) "
                         f"(num_experts={num_experts}); -1 marks an unused slot")
    if unique:
        t = first_repeated_expert(a)
        if t is not None:
            raise ValueError(f"{name} row {t} lists the same expert twice; each expert may appear once per token "
                             f"(-1 marks unused slots)")
