"""Checked wrappers over the CUDA driver's virtual memory management (``cuMemCreate`` and kin)
for memory shared between the processes of one host through POSIX file descriptors.

Why: memory made this way is reference-counted by the driver.  A process that maps a peer's
allocation holds a reference to its physical pages, so when the peer dies (SIGKILL, OOM kill)
the pages stay until the survivor unmaps them, and the survivor's stores into them land in
memory nobody reads instead of faulting.  Memory shared with ``cuIpcGetMemHandle`` gives no
such promise: freeing the exporter's allocation, which its death does, before the importer
closes the handle is undefined behaviour (the CUDA driver API reference, ``cuIpcOpenMemHandle``).

Handles and pointers are plain ints, as in :mod:`epcomm.runtime.driver`.
"""
from __future__ import annotations

from epcomm.errors import ToolchainError
from epcomm.runtime.driver import check, drv


def _prop(device_id: int):
    d = drv()
    p = d.CUmemAllocationProp()
    p.type = d.CUmemAllocationType.CU_MEM_ALLOCATION_TYPE_PINNED
    p.location.type = d.CUmemLocationType.CU_MEM_LOCATION_TYPE_DEVICE
    p.location.id = device_id
    p.requestedHandleTypes = d.CUmemAllocationHandleType.CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR
    return p


def check_supported(device_id: int) -> None:
    """Raise ToolchainError unless the device supports virtual memory management with POSIX
    file-descriptor handles."""
    d = drv()
    dev = check(d.cuDeviceGet(device_id), "cuDeviceGet")
    for attr in ("CU_DEVICE_ATTRIBUTE_VIRTUAL_MEMORY_MANAGEMENT_SUPPORTED",
                 "CU_DEVICE_ATTRIBUTE_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR_SUPPORTED"):
        if not check(d.cuDeviceGetAttribute(getattr(d.CUdevice_attribute, attr), dev), "cuDeviceGetAttribute"):
            raise ToolchainError(f"device {device_id} lacks {attr} (driver or platform): set "
                                 f"EPCOMM_PEER_MEMORY=ipc")


def granularity(device_id: int) -> int:
    """The allocation granularity (bytes) of shareable device memory on ``device_id``."""
    d = drv()
    opt = d.CUmemAllocationGranularity_flags.CU_MEM_ALLOC_GRANULARITY_MINIMUM
    return int(check(d.cuMemGetAllocationGranularity(_prop(device_id), opt), "cuMemGetAllocationGranularity"))


def rounded(nbytes: int, device_id: int) -> int:
    """``nbytes`` rounded up to the granularity (at least one granule)."""
    g = granularity(device_id)
    return max(g, -(-int(nbytes) // g) * g)


def create(nbytes: int, device_id: int) -> int:
    """A physical allocation of ``nbytes`` (a multiple of :func:`granularity`) on ``device_id``,
    exportable as a file descriptor; its handle."""
    d = drv()
    return int(check(d.cuMemCreate(nbytes, _prop(device_id), 0), "cuMemCreate"))


def export_fd(handle: int) -> int:
    """A new file descriptor for the allocation ``handle`` (the caller closes it)."""
    d = drv()
    kind = d.CUmemAllocationHandleType.CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR
    return int(check(d.cuMemExportToShareableHandle(handle, kind, 0), "cuMemExportToShareableHandle"))


def import_fd(fd: int) -> int:
    """The allocation handle behind ``fd`` (a reference of this process: :func:`release` it;
    ``fd`` may be closed afterwards)."""
    d = drv()
    kind = d.CUmemAllocationHandleType.CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR
    return int(check(d.cuMemImportFromShareableHandle(fd, kind), "cuMemImportFromShareableHandle"))


def map_rw(handle: int, nbytes: int, device_id: int) -> int:
    """Reserve ``nbytes`` of address space, map the allocation there and let ``device_id`` read
    and write it; the address.  What was done is undone if a step fails."""
    d = drv()
    ptr = int(check(d.cuMemAddressReserve(nbytes, 0, 0, 0), "cuMemAddressReserve"))
    mapped = False
    try:
        check(d.cuMemMap(ptr, nbytes, 0, handle, 0), "cuMemMap")
        mapped = True
        acc = d.CUmemAccessDesc()
        acc.location.type = d.CUmemLocationType.CU_MEM_LOCATION_TYPE_DEVICE
        acc.location.id = device_id
        acc.flags = d.CUmemAccess_flags.CU_MEM_ACCESS_FLAGS_PROT_READWRITE
        check(d.cuMemSetAccess(ptr, nbytes, [acc], 1), "cuMemSetAccess")
    except BaseException:
        if mapped:
            d.cuMemUnmap(ptr, nbytes)
        d.cuMemAddressFree(ptr, nbytes)
        raise
    return ptr


def unmap(ptr: int, nbytes: int) -> None:
    """Unmap what :func:`map_rw` mapped at ``ptr`` and free its address range."""
    d = drv()
    check(d.cuMemUnmap(ptr, nbytes), "cuMemUnmap")
    check(d.cuMemAddressFree(ptr, nbytes), "cuMemAddressFree")


def release(handle: int) -> None:
    """Drop this process's reference to an allocation (the memory goes when no process maps or
    holds it)."""
    d = drv()
    check(d.cuMemRelease(handle), "cuMemRelease")
