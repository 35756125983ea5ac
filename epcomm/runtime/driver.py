"""Thin, checked wrappers over the CUDA driver API (``cuda.bindings.driver``).

Everything here is imported lazily by the code that needs a GPU; importing epcomm never
initialises CUDA.  Handles (streams, events, pointers) are passed around as plain ints so the
hot paths avoid building wrapper objects.
"""
from __future__ import annotations

import contextlib
import ctypes
import functools

from epcomm.errors import EpcommError, ToolchainError


@functools.lru_cache(maxsize=None)
def drv():
    try:
        from cuda.bindings import driver
    except ImportError as e:  # pragma: no cover
        raise ToolchainError("cuda-bindings is not installed: pip install 'epcomm[cu13]'") from e
    return driver


def check(ret, what: str = ""):
    """Unpack a cuda.bindings result tuple, raising EpcommError on a driver error."""
    d = drv()
    err = ret[0] if isinstance(ret, tuple) else ret
    if err != d.CUresult.CUDA_SUCCESS:
        try:
            _, name = d.cuGetErrorName(err)
            name = name.decode() if isinstance(name, bytes) else str(name)
        except Exception:
            name = str(err)
        raise EpcommError(f"CUDA driver call {what or '?'} failed: {name}")
    if isinstance(ret, tuple):
        if len(ret) == 1:
            return None
        if len(ret) == 2:
            return ret[1]
        return ret[1:]
    return None


@functools.lru_cache(maxsize=None)
def init() -> int:
    """cuInit and the number of visible devices (raises ToolchainError without a driver)."""
    d = drv()
    try:
        check(d.cuInit(0), "cuInit")
    except EpcommError:
        raise
    except Exception as e:
        raise ToolchainError(f"no usable NVIDIA driver: {e}") from e
    return int(check(d.cuDeviceGetCount(), "cuDeviceGetCount"))


def cuda_version() -> tuple[int, int] | None:
    """The newest CUDA version the installed driver supports, e.g. (13, 0) (cuDriverGetVersion:
    no GPU or cuInit needed); None where there is no driver or no cuda-bindings (never raises)."""
    try:
        v = int(check(drv().cuDriverGetVersion(), "cuDriverGetVersion"))
    except Exception:
        return None
    return (v // 1000, v % 1000 // 10) if v > 0 else None


def device_count() -> int:
    """Visible CUDA devices; 0 where there is no driver or no GPU (never raises)."""
    try:
        return init()
    except Exception:
        return 0


@functools.lru_cache(maxsize=None)
def _primary_ctx(device_id: int):
    d = drv()
    init()
    dev = check(d.cuDeviceGet(device_id), "cuDeviceGet")
    return check(d.cuDevicePrimaryCtxRetain(dev), "cuDevicePrimaryCtxRetain")


def current_device() -> int:
    """Device of the current context, or -1 if none is current."""
    d = drv()
    init()
    ctx = check(d.cuCtxGetCurrent(), "cuCtxGetCurrent")
    if ctx is None or int(ctx) == 0:
        return -1
    return int(check(d.cuCtxGetDevice(), "cuCtxGetDevice"))


@contextlib.contextmanager
def on_device(device_id: int):
    """Make ``device_id``'s primary context current for the block (a no-op if it already is)."""
    d = drv()
    cur = current_device()
    if cur == device_id:
        yield
        return
    check(d.cuCtxPushCurrent(_primary_ctx(device_id)), "cuCtxPushCurrent")
    try:
        yield
    finally:
        check(d.cuCtxPopCurrent(), "cuCtxPopCurrent")


def set_device(device_id: int) -> None:
    """Make ``device_id``'s primary context current for this thread (like cudaSetDevice)."""
    d = drv()
    check(d.cuCtxSetCurrent(_primary_ctx(device_id)), "cuCtxSetCurrent")


@functools.lru_cache(maxsize=None)
def device_attr(device_id: int, attr_name: str) -> int:
    d = drv()
    init()
    attr = getattr(d.CUdevice_attribute, attr_name)
    dev = check(d.cuDeviceGet(device_id), "cuDeviceGet")
    return int(check(d.cuDeviceGetAttribute(attr, dev), f"cuDeviceGetAttribute({attr_name})"))


def num_sms(device_id: int) -> int:
    return device_attr(device_id, "CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT")


# ---- streams and events -------------------------------------------------------------------
def stream_create(priority: int = 0) -> int:
    d = drv()
    s = check(d.cuStreamCreateWithPriority(d.CUstream_flags.CU_STREAM_NON_BLOCKING, priority),
              "cuStreamCreateWithPriority")
    return int(s)


def stream_destroy(s: int) -> None:
    d = drv()
    check(d.cuStreamDestroy(d.CUstream(s)), "cuStreamDestroy")


def stream_sync(s: int) -> None:
    d = drv()
    check(d.cuStreamSynchronize(d.CUstream(s)), "cuStreamSynchronize")


def device_sync() -> None:
    d = drv()
    check(d.cuCtxSynchronize(), "cuCtxSynchronize")


def capture_id(s: int) -> int:
    """0 when stream ``s`` is not capturing, else its capture sequence's id (unique in the
    process: streams joined into one capture share it)."""
    d = drv()
    r = d.cuStreamGetCaptureInfo(d.CUstream(s))
    check((r[0],), "cuStreamGetCaptureInfo")
    st = d.CUstreamCaptureStatus
    if r[1] == st.CU_STREAM_CAPTURE_STATUS_NONE:
        return 0
    if r[1] != st.CU_STREAM_CAPTURE_STATUS_ACTIVE:
        return -1  # an invalidated capture: still "capturing" (no host syncs; its end reports it)
    return int(r[2])


@contextlib.contextmanager
def relaxed_capture_mode():
    """Let this thread make calls that a capture in global mode (torch's default) forbids, such
    as event queries, while another stream or thread captures (as PyTorch does for its own)."""
    d = drv()
    mode = d.CUstreamCaptureMode.CU_STREAM_CAPTURE_MODE_RELAXED
    prev = check(d.cuThreadExchangeStreamCaptureMode(mode), "cuThreadExchangeStreamCaptureMode")
    try:
        yield
    finally:
        d.cuThreadExchangeStreamCaptureMode(prev)


def stream_is_capturing(s: int) -> bool:
    d = drv()
    st = check(d.cuStreamIsCapturing(d.CUstream(s)), "cuStreamIsCapturing")
    return st != d.CUstreamCaptureStatus.CU_STREAM_CAPTURE_STATUS_NONE


def event_create(timing: bool = False) -> int:
    d = drv()
    flags = d.CUevent_flags.CU_EVENT_DEFAULT if timing else d.CUevent_flags.CU_EVENT_DISABLE_TIMING
    return int(check(d.cuEventCreate(flags), "cuEventCreate"))


def event_destroy(e: int) -> None:
    d = drv()
    check(d.cuEventDestroy(d.CUevent(e)), "cuEventDestroy")


def event_record(e: int, s: int) -> None:
    d = drv()
    check(d.cuEventRecord(d.CUevent(e), d.CUstream(s)), "cuEventRecord")


def stream_wait_event(s: int, e: int) -> None:
    d = drv()
    check(d.cuStreamWaitEvent(d.CUstream(s), d.CUevent(e), 0), "cuStreamWaitEvent")


def event_sync(e: int) -> None:
    d = drv()
    check(d.cuEventSynchronize(d.CUevent(e)), "cuEventSynchronize")


def event_query(e: int) -> bool:
    d = drv()
    err = d.cuEventQuery(d.CUevent(e))[0]
    if err == d.CUresult.CUDA_SUCCESS:
        return True
    if err == d.CUresult.CUDA_ERROR_NOT_READY:
        return False
    check((err,), "cuEventQuery")
    return False


def event_elapsed_ms(start: int, end: int) -> float:
    d = drv()
    return float(check(d.cuEventElapsedTime(d.CUevent(start), d.CUevent(end)), "cuEventElapsedTime"))


# ---- memory -------------------------------------------------------------------------------
def mem_alloc(nbytes: int) -> int:
    d = drv()
    return int(check(d.cuMemAlloc(max(int(nbytes), 1)), "cuMemAlloc"))


def mem_free(ptr: int) -> None:
    d = drv()
    check(d.cuMemFree(d.CUdeviceptr(ptr)), "cuMemFree")


def memset_d8_async(ptr: int, value: int, nbytes: int, stream: int) -> None:
    d = drv()
    check(d.cuMemsetD8Async(d.CUdeviceptr(ptr), value, nbytes, d.CUstream(stream)), "cuMemsetD8Async")


def memset_d32_async(ptr: int, value: int, count: int, stream: int) -> None:
    d = drv()
    check(d.cuMemsetD32Async(d.CUdeviceptr(ptr), value, count, d.CUstream(stream)), "cuMemsetD32Async")


def memcpy_dtod_async(dst: int, src: int, nbytes: int, stream: int) -> None:
    d = drv()
    check(d.cuMemcpyDtoDAsync(d.CUdeviceptr(dst), d.CUdeviceptr(src), nbytes, d.CUstream(stream)),
          "cuMemcpyDtoDAsync")


def memcpy_htod(dst: int, host_ptr: int, nbytes: int) -> None:
    d = drv()
    check(d.cuMemcpyHtoD(d.CUdeviceptr(dst), host_ptr, nbytes), "cuMemcpyHtoD")


def memcpy_dtoh(host_ptr: int, src: int, nbytes: int) -> None:
    d = drv()
    check(d.cuMemcpyDtoH(host_ptr, d.CUdeviceptr(src), nbytes), "cuMemcpyDtoH")


def host_alloc_mapped(nbytes: int) -> tuple[int, int]:
    """Pinned host memory mapped into the device: (host pointer, device pointer)."""
    d = drv()
    flags = d.CU_MEMHOSTALLOC_DEVICEMAP | d.CU_MEMHOSTALLOC_PORTABLE
    hptr = int(check(d.cuMemHostAlloc(nbytes, flags), "cuMemHostAlloc"))
    dptr = int(check(d.cuMemHostGetDevicePointer(hptr, 0), "cuMemHostGetDevicePointer"))
    return hptr, dptr


def host_free(hptr: int) -> None:
    d = drv()
    check(d.cuMemFreeHost(hptr), "cuMemFreeHost")


def ipc_get_handle(ptr: int) -> bytes:
    d = drv()
    h = check(d.cuIpcGetMemHandle(d.CUdeviceptr(ptr)), "cuIpcGetMemHandle")
    # The 64 opaque bytes, read through the struct's address (no field accessor is exposed).
    return ctypes.string_at(h.getPtr(), 64)


def ipc_open(handle: bytes) -> int:
    d = drv()
    if len(handle) != 64:
        raise ValueError(f"a CUDA IPC handle has 64 bytes, got {len(handle)}")
    h = d.CUipcMemHandle()
    ctypes.memmove(h.getPtr(), handle, 64)
    flags = d.CUipcMem_flags.CU_IPC_MEM_LAZY_ENABLE_PEER_ACCESS
    return int(check(d.cuIpcOpenMemHandle(h, flags), "cuIpcOpenMemHandle"))


def ipc_close(ptr: int) -> None:
    d = drv()
    check(d.cuIpcCloseMemHandle(d.CUdeviceptr(ptr)), "cuIpcCloseMemHandle")


def can_access_peer(dev: int, peer: int) -> bool:
    """Whether contexts on device ordinal ``dev`` can map memory of device ``peer`` directly
    (cuDeviceCanAccessPeer; False for ``dev == peer``)."""
    d = drv()
    a = check(d.cuDeviceGet(dev), "cuDeviceGet")
    b = check(d.cuDeviceGet(peer), "cuDeviceGet")
    return bool(check(d.cuDeviceCanAccessPeer(a, b), "cuDeviceCanAccessPeer"))


def pci_bus_id(dev: int) -> str:
    """Device ``dev``'s PCI bus id, e.g. ``0000:00:06.0``."""
    d = drv()
    h = check(d.cuDeviceGet(dev), "cuDeviceGet")
    s = check(d.cuDeviceGetPCIBusId(32, h), "cuDeviceGetPCIBusId")
    # The binding returns the whole 32-byte buffer: the id, its NUL, then filler (spaces seen).
    return (s.decode() if isinstance(s, bytes) else str(s)).split("\x00", 1)[0].strip()


def device_by_pci_bus_id(bus_id: str) -> int | None:
    """The ordinal of the device at ``bus_id`` (as :func:`pci_bus_id` writes it), or None if this
    process does not see that device (e.g. CUDA_VISIBLE_DEVICES hides it)."""
    d = drv()
    r = d.cuDeviceGetByPCIBusId(bus_id.encode())
    if r[0] in (d.CUresult.CUDA_ERROR_INVALID_DEVICE, d.CUresult.CUDA_ERROR_INVALID_VALUE):
        return None
    return int(check(r, f"cuDeviceGetByPCIBusId({bus_id})"))
