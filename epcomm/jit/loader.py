"""Loading compiled modules: a per-process, per-device memo.

``load(spec)`` builds the module (disk cache or compile), loads the cubin once per device,
and for NVSHMEM modules runs ``nvshmem.bindings.culibrary_init`` on the library (NVSHMEM's
device state must be bound to every library that calls it, before its first launch).
"""
from __future__ import annotations

import threading
from dataclasses import dataclass

from epcomm.jit import compiler, toolchain
from epcomm.jit.spec import KernelSpec
from epcomm.runtime import driver

_LOCK = threading.Lock()
_MEMO: dict[tuple[int, KernelSpec, str], "LoadedModule"] = {}


@dataclass
class LoadedModule:
    spec: KernelSpec
    module: compiler.Module
    device_id: int
    object_code: object           # cuda.core.ObjectCode (keeps the CUlibrary alive)
    kernels: dict[str, object]    # short name -> CUfunction (cuda.bindings object)

    def fn(self, short: str):
        return self.kernels[short]


def _load(spec: KernelSpec, device_id: int, arch: str | None) -> LoadedModule:
    from cuda.core import ObjectCode

    mod = compiler.build(spec, arch or toolchain.current_arch(device_id))
    d = driver.drv()
    with driver.on_device(device_id):
        obj = ObjectCode.from_cubin(mod.cubin, name=spec.label())
        kernels = {}
        smem_optin = driver.device_attr(device_id, "CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN")
        dev = driver.check(d.cuDeviceGet(device_id), "cuDeviceGet")
        for short, mangled in mod.symbols.items():
            k = obj.get_kernel(mangled)
            h = k.handle
            static = int(driver.check(d.cuKernelGetAttribute(
                d.CUfunction_attribute.CU_FUNC_ATTRIBUTE_SHARED_SIZE_BYTES, h, dev), "cuKernelGetAttribute"))
            # Opt every kernel in to the device's whole shared memory, so a launch may ask for
            # any dynamic size that fits; the launchers size it per call.
            driver.check(d.cuKernelSetAttribute(
                d.CUfunction_attribute.CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                smem_optin - static, h, dev), "cuKernelSetAttribute")
            # A CUfunction of this device's primary context: accepted by every launch API
            # (cooperative included) on every driver we support.
            kernels[short] = driver.check(d.cuKernelGetFunction(h), "cuKernelGetFunction")
        if spec.uses_nvshmem:
            import nvshmem.bindings as nvb  # type: ignore
            nvb.culibrary_init(int(obj.handle))
    return LoadedModule(spec, mod, device_id, obj, kernels)


def load(spec: KernelSpec, device_id: int, arch: str | None = None) -> LoadedModule:
    """The loaded module of ``spec`` on ``device_id`` (compiled and loaded at most once)."""
    key = (device_id, spec, arch or "")
    m = _MEMO.get(key)
    if m is not None:
        return m
    with _LOCK:
        m = _MEMO.get(key)
        if m is None:
            m = _load(spec, device_id, arch)
            _MEMO[key] = m
    return m


def loaded_count() -> int:
    return len(_MEMO)
