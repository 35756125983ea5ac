"""TensorRef, the borrowed view of an array that kernels are launched with, and stride helpers."""
from __future__ import annotations

from epcomm.interop.dtypes import ITEMSIZE


class TensorRef:
    """A borrowed view of an array: raw pointer, shape, strides (in elements) and dtype name.

    ``obj`` is the caller's object and ``keepalive`` anything else (a DLPack capsule, an owner)
    that must outlive the use of ``ptr``; both are held by the ref.
    """

    __slots__ = ("ptr", "shape", "strides", "dtype", "device_type", "device_id", "framework",
                 "obj", "keepalive", "readonly", "widened")

    def __init__(self, ptr: int, shape: tuple, strides: tuple, dtype: str, device_type: str,
                 device_id: int, framework: str, obj=None, keepalive=None, readonly: bool = False):
        self.ptr = ptr
        self.shape = shape
        self.strides = strides
        self.dtype = dtype
        self.device_type = device_type
        self.device_id = device_id
        self.framework = framework
        self.obj = obj
        self.keepalive = keepalive
        self.readonly = readonly
        # True when ptr is a widening copy queued on the caller's stream (as_index_tensor): a
        # kernel on another stream must then wait for the caller's stream, not only an event.
        self.widened = False

    def holding(self, obj, keepalive=None) -> "TensorRef":
        """This view (pointer, shape, strides, dtype, device), holding ``obj`` instead: a ref
        kept without its array, given the array again."""
        r = TensorRef(self.ptr, self.shape, self.strides, self.dtype, self.device_type, self.device_id,
                      self.framework, obj, keepalive, self.readonly)
        r.widened = self.widened
        return r

    @property
    def itemsize(self) -> int:
        return ITEMSIZE[self.dtype]

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def nbytes(self) -> int:
        return self.numel * ITEMSIZE[self.dtype]

    @property
    def is_contiguous(self) -> bool:
        """C (row-major) contiguous; strides of size-1 dimensions are ignored."""
        return c_contiguous(self.shape, self.strides)

    @property
    def is_col_major_2d(self) -> bool:
        """2-D with strides (1, shape[0]), strides of size-1 dimensions ignored."""
        if len(self.shape) != 2:
            return False
        m, n = self.shape
        if m * n == 0:
            return True
        s0, s1 = self.strides
        return (m == 1 or s0 == 1) and (n == 1 or s1 == m)

    @property
    def device(self) -> str:
        return "cpu" if self.device_type == "cpu" else f"cuda:{self.device_id}"

    def __repr__(self) -> str:
        return (f"TensorRef({self.framework}, ptr=0x{self.ptr:x}, shape={self.shape}, "
                f"strides={self.strides}, dtype={self.dtype}, device={self.device})")


def c_contiguous(shape, strides) -> bool:
    """Whether element ``strides`` are row-major for ``shape`` (size-1 dimensions ignored; an
    empty array counts as contiguous)."""
    expected = 1
    for i in range(len(shape) - 1, -1, -1):
        n = shape[i]
        if n != 1 and strides[i] != expected:
            return 0 in shape  # an empty array is contiguous whatever its strides
        expected *= n
    return True


def remember(cache: dict, key, value, limit: int):
    """Store ``value`` under ``key`` in a memo ``cache`` and return it; the cache is emptied
    first once it holds more than ``limit`` entries (keys such as shapes or types are few in
    practice, but nothing bounds them)."""
    if len(cache) > limit:
        cache.clear()
    cache[key] = value
    return value


_COMPACT: dict = {}


def compact_strides(shape) -> tuple:
    """Row-major strides (in elements) of ``shape`` (memoized: shapes repeat)."""
    st = _COMPACT.get(shape)
    if st is None:
        out = [0] * len(shape)
        acc = 1
        for i in range(len(shape) - 1, -1, -1):
            out[i] = acc
            acc *= shape[i]
        st = remember(_COMPACT, tuple(shape), tuple(out), 4096)
    return st


def shape_tuple(shape) -> tuple:
    """``shape`` (an int or a sequence of ints) as a tuple of ints; ValueError for a negative size."""
    if isinstance(shape, int):
        return (int(shape),)
    out = tuple(int(s) for s in shape)
    if any(s < 0 for s in out):
        raise ValueError(f"shape {out}: sizes must be >= 0")
    return out


def check_device_type(device_type: str) -> None:
    """ValueError unless ``device_type`` is 'cuda' or 'cpu'."""
    if device_type not in ("cuda", "cpu"):
        raise ValueError(f"device_type must be 'cuda' or 'cpu', got {device_type!r}")


def element_strides(a, name: str) -> tuple:
    """The strides of NumPy-like array ``a`` in elements; ValueError if one is not a multiple
    of the item size."""
    isz = a.dtype.itemsize
    bs = a.strides
    if any(s % isz for s in bs):
        raise ValueError(f"{name}: strides {bs} (bytes) are not multiples of the item size "
                         f"{isz}")
    return tuple(s // isz for s in bs)
