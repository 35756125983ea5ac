"""Memory epcomm owns, and the DLPack exporter that hands it to a framework (JAX outputs).

JAX arrays are immutable, so JAX outputs are allocated by an :class:`Exporter`, written by the
kernels and then handed to JAX zero-copy through DLPack (interop.finish).
"""
from __future__ import annotations

import atexit
import ctypes
import weakref

from epcomm.interop import dlpack as dl
from epcomm.interop.dtypes import DL_OF_NAME, ITEMSIZE, check_dtype_name
from epcomm.interop.refs import TensorRef, check_device_type, compact_strides, shape_tuple
from epcomm.runtime import driver

# Live allocations, for tests.  A WeakSet rather than a locked counter: __del__ may run inside
# a garbage collection triggered anywhere, also on a thread that holds such a lock.
_OWNERS: "weakref.WeakSet" = weakref.WeakSet()


class Allocation:
    """Memory epcomm owns: host (a numpy byte buffer) or device (cuMemAlloc).

    ``live_count()`` is the number of allocations not yet released (tests use it).
    """

    __slots__ = ("ptr", "nbytes", "device_type", "device_id", "_buf", "_counted", "__weakref__")

    _ALIGN = 256

    def __init__(self, nbytes: int, device_type: str, device_id: int):
        self._counted = False
        self.ptr = 0
        self._buf = None
        self.nbytes = int(nbytes)
        self.device_type = device_type
        self.device_id = device_id
        check_device_type(device_type)
        if device_type == "cpu":
            import numpy as np
            buf = np.empty(self.nbytes + self._ALIGN, dtype=np.uint8)
            base = buf.__array_interface__["data"][0]
            off = (-base) % self._ALIGN
            self._buf = buf
            self.ptr = base + off
        else:
            with driver.on_device(device_id):
                self.ptr = driver.mem_alloc(self.nbytes)  # 256-byte aligned
        _OWNERS.add(self)
        self._counted = True

    def __del__(self):
        try:
            if not getattr(self, "_counted", False):
                return
            self._counted = False
            if self.device_type == "cuda" and self.ptr:
                with driver.on_device(self.device_id):
                    driver.mem_free(self.ptr)
            self._buf = None
            self.ptr = 0
        except Exception:  # interpreter shutdown, driver gone: nothing useful to do
            pass

    @staticmethod
    def live_count() -> int:
        return len(_OWNERS)


# managed-tensor address -> (owner, offset of its deleter field); popped by the deleter.  No
# lock: single dict operations are atomic, and a lock could deadlock when a garbage collection
# inside the locked region drops a capsule whose destructor needs the same lock.
_EXPORTED: dict = {}


def _release_managed(addr: int) -> None:
    entry = _EXPORTED.pop(addr, None)
    if entry is not None:
        dl.PyMem_RawFree(addr)
    del entry  # drops the owner (may free memory)


def _managed_deleter(addr):
    # Called by the consumer (or by our capsule destructor) once the tensor is no longer used;
    # may run on any thread (ctypes takes the GIL).
    try:
        _release_managed(addr)
    except Exception:  # pragma: no cover - shutdown
        pass


def _capsule_destructor(cap_addr):
    # Runs when an exported capsule is deallocated: if nobody consumed it (a consumer renames
    # it to 'used_dltensor[_versioned]'), release the managed tensor ourselves.
    try:
        cname = dl.PyCapsule_GetName_raw(cap_addr)
        if cname == dl.CAPSULE_NAME or cname == dl.CAPSULE_NAME_V:
            p = dl.PyCapsule_GetPointer_raw(cap_addr, cname)
            if p:
                _release_managed(p)
    except BaseException:  # pragma: no cover - never let an exception escape a destructor
        pass


_DELETER_FN = ctypes.CFUNCTYPE(None, ctypes.c_void_p)(_managed_deleter)
_CAPSULE_DESTRUCTOR_FN = ctypes.CFUNCTYPE(None, ctypes.c_void_p)(_capsule_destructor)
_DELETER_ADDR = ctypes.cast(_DELETER_FN, ctypes.c_void_p).value
_CAPSULE_DESTRUCTOR_ADDR = ctypes.cast(_CAPSULE_DESTRUCTOR_FN, ctypes.c_void_p).value
# The two C entry points must outlive this module (a consumer may call the deleter while the
# interpreter tears modules down): take one reference that is never dropped.
for _f in (_DELETER_FN, _CAPSULE_DESTRUCTOR_FN):
    dl.api.Py_IncRef(ctypes.py_object(_f))
del _f

_RAW_FREE_ADDR = ctypes.cast(dl.PyMem_RawFree, ctypes.c_void_p).value
_V_SIZE = ctypes.sizeof(dl.DLManagedTensorVersioned)
_L_SIZE = ctypes.sizeof(dl.DLManagedTensor)
_V_DELETER_OFF = dl.DLManagedTensorVersioned.deleter.offset
_L_DELETER_OFF = dl.DLManagedTensor.deleter.offset

_LEAKED: list = []


@atexit.register
def _disarm_exports() -> None:
    """At exit, disarm every still-exported tensor: its owner is kept for good, and its deleter
    becomes ``PyMem_RawFree`` (which frees just the managed struct and needs no interpreter).

    A consumer that frees the tensor late (JAX at teardown, C++ static destructors) then never
    calls into a finalizing Python.  (Not NULL: JAX calls the deleter without checking.)
    """
    try:
        for addr, entry in list(_EXPORTED.items()):
            ctypes.c_void_p.from_address(addr + entry[1]).value = _RAW_FREE_ADDR
            _LEAKED.append(entry)
        _EXPORTED.clear()
    except Exception:  # pragma: no cover
        pass


def live_exports() -> int:
    """Number of exported DLPack tensors not yet released by their consumers (for tests)."""
    return len(_EXPORTED)


def _fill_managed(addr: int, head: int, versioned: bool, exp: "Exporter") -> int:
    """Write the managed tensor describing ``exp`` at ``addr`` (shape and strides at
    ``addr + head``); returns the offset of its deleter field."""
    if versioned:
        m = dl.DLManagedTensorVersioned.from_address(addr)
        m.version.major, m.version.minor = 1, 1
        m.flags = 0
        deleter_off = _V_DELETER_OFF
    else:
        m = dl.DLManagedTensor.from_address(addr)
        deleter_off = _L_DELETER_OFF
    m.deleter = _DELETER_ADDR
    m.manager_ctx = addr
    t = m.dl_tensor
    t.data = exp.ptr or None
    dev_type, dev_id = exp.__dlpack_device__()
    t.device.device_type, t.device.device_id = dev_type, dev_id
    ndim = len(exp.shape)
    t.ndim = ndim
    code, bits = DL_OF_NAME[exp.dtype]
    t.dtype.code, t.dtype.bits, t.dtype.lanes = code, bits, 1
    if ndim:
        arr = (ctypes.c_int64 * (2 * ndim)).from_address(addr + head)
        arr[:ndim] = exp.shape
        arr[ndim:] = compact_strides(exp.shape)
        t.shape = ctypes.cast(addr + head, ctypes.POINTER(ctypes.c_int64))
        t.strides = ctypes.cast(addr + head + 8 * ndim, ctypes.POINTER(ctypes.c_int64))
    t.byte_offset = 0
    return deleter_off


class Exporter:
    """Memory epcomm owns, exported through DLPack with a logical shape and dtype.

    Used for JAX outputs: JAX cannot hand out writable memory, so interop.empty ('jax') returns
    an Exporter, the kernels write ``ptr``, and interop.finish gives the memory to JAX with
    ``jax.dlpack.from_dlpack`` (zero-copy).  Any DLPack consumer works (``torch.from_dlpack``
    too), any number of times; every exported capsule keeps the owner alive until its consumer
    releases it (or, if it is never consumed, until the capsule is dropped).

    ``stream``: the CUDA stream (raw handle) the producer's writes are on, default 0 (the legacy
    default stream).  When a consumer passes a stream to ``__dlpack__``, that stream is made to
    wait for the work queued so far on ``stream`` (an event plus ``cuStreamWaitEvent``); None
    skips this.  Host memory needs no ordering.

    Args to the constructor: ``owner`` (kept alive), ``ptr``, ``shape``, ``dtype`` (a name from
    DTYPES), ``device_type`` ('cuda' or 'cpu'), ``device_id``.  :meth:`allocate` builds one with
    fresh memory.
    """

    __slots__ = ("owner", "ptr", "shape", "dtype", "device_type", "device_id", "stream",
                 "__weakref__")

    def __init__(self, owner, ptr: int, shape, dtype: str, device_type: str = "cuda",
                 device_id: int = 0, stream: int | None = 0):
        self.owner = owner
        self.ptr = int(ptr)
        self.shape = shape_tuple(shape)
        self.dtype = check_dtype_name(dtype)
        check_device_type(device_type)
        self.device_type = device_type
        self.device_id = int(device_id) if device_type == "cuda" else -1
        self.stream = stream

    @classmethod
    def allocate(cls, shape, dtype: str, device_type: str = "cuda", device_id: int = 0,
                 stream: int | None = 0) -> "Exporter":
        shape = shape_tuple(shape)
        check_dtype_name(dtype)
        n = 1
        for s in shape:
            n *= s
        owner = Allocation(n * ITEMSIZE[dtype], device_type, device_id)
        return cls(owner, owner.ptr, shape, dtype, device_type, device_id, stream)

    @property
    def nbytes(self) -> int:
        n = ITEMSIZE[self.dtype]
        for s in self.shape:
            n *= s
        return n

    def ref(self) -> TensorRef:
        return TensorRef(self.ptr, self.shape, compact_strides(self.shape), self.dtype,
                         self.device_type, self.device_id, "jax", self, self.owner)

    def __dlpack_device__(self):
        if self.device_type == "cuda":
            return (dl.kDLCUDA, self.device_id)
        return (dl.kDLCPU, 0)

    def _order_before(self, consumer_stream) -> None:
        if self.device_type != "cuda" or consumer_stream is None or self.stream is None:
            return
        consumer = int(consumer_stream)
        if consumer == -1:  # the consumer asked for no synchronization
            return
        producer = int(self.stream)
        legacy = (0, 1)
        if consumer == producer or (consumer in legacy and producer in legacy):
            return
        with driver.on_device(self.device_id):
            ev = driver.event_create()
            try:
                driver.event_record(ev, producer)
                driver.stream_wait_event(consumer, ev)
            finally:
                driver.event_destroy(ev)

    def __dlpack__(self, *, stream=None, max_version=None, dl_device=None, copy=None):
        if dl_device is not None:
            want = (int(dl_device[0]), int(dl_device[1]))
            have = self.__dlpack_device__()
            if want != (int(have[0]), int(have[1])):
                raise BufferError(f"Exporter lives on {have}, cannot export to {want}")
        if copy:
            raise BufferError("Exporter does not copy (copy=True requested)")
        self._order_before(stream)  # host memory: nothing to order, whatever stream says

        versioned = max_version is not None and tuple(max_version)[0] >= 1
        size = _V_SIZE if versioned else _L_SIZE
        head = (size + 7) // 8 * 8
        total = head + 16 * len(self.shape)
        addr = dl.PyMem_RawMalloc(total)
        if not addr:
            raise MemoryError("PyMem_RawMalloc failed")
        try:
            ctypes.memset(addr, 0, total)
            deleter_off = _fill_managed(addr, head, versioned, self)
            _EXPORTED[addr] = (self.owner, deleter_off)
        except BaseException:
            dl.PyMem_RawFree(addr)
            raise
        try:
            return dl.PyCapsule_New(addr, dl.CAPSULE_NAME_V if versioned else dl.CAPSULE_NAME,
                                    _CAPSULE_DESTRUCTOR_ADDR)
        except BaseException:
            _release_managed(addr)
            raise

    def __repr__(self) -> str:
        dev = "cpu" if self.device_type == "cpu" else f"cuda:{self.device_id}"
        return f"Exporter(shape={self.shape}, dtype={self.dtype}, device={dev}, ptr=0x{self.ptr:x})"
