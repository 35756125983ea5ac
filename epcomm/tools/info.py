"""``epcomm info``: versions, the toolchain, the JIT cache, the GPUs and their NVLink peers."""
from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

from epcomm import __version__, envs
from epcomm.jit import cache, toolchain
from epcomm.runtime import driver


def _version(dist: str) -> str:
    try:
        return version(dist)
    except PackageNotFoundError:
        return "not installed"


_W = 22  # the label column: the longest package name ("nvidia-nvshmem-cu13") and a gap


def main(a) -> int:
    """``epcomm info``: always 0 (what is missing is printed as unavailable)."""
    print(f"{'epcomm':{_W}s}{__version__}")
    for dist in ("cuda-core", "cuda-bindings", "cupy-cuda13x", "cupy-cuda12x", "nvshmem4py-cu13",
                 "nvshmem4py-cu12", "nvidia-nvshmem-cu13", "nvidia-nvshmem-cu12", "torch", "jax", "ml_dtypes"):
        v = _version(dist)
        if v != "not installed" or dist in ("cuda-core", "cuda-bindings", "torch", "jax"):
            print(f"{dist:{_W}s}{v}")
    try:
        print(f"{'NVRTC':{_W}s}{toolchain.nvrtc_version()}")
    except Exception as e:
        print(f"{'NVRTC':{_W}s}unavailable ({e})")
    print(f"{'nvJitLink':{_W}s}{toolchain.nvjitlink_version()}")
    try:
        nv = toolchain.nvshmem()
        print(f"{'NVSHMEM (device)':{_W}s}{nv.version} ({nv.device_lib})")
    except Exception as e:
        print(f"{'NVSHMEM (device)':{_W}s}unavailable ({str(e).splitlines()[0]})")
    try:
        inc = toolchain.cuda_include_dirs()
        print(f"{'CUDA headers':{_W}s}{', '.join(map(str, inc))}")
    except Exception as e:
        print(f"{'CUDA headers':{_W}s}unavailable ({str(e).splitlines()[0]})")
    n, size = cache.cache_size_bytes()
    print(f"{'JIT cache':{_W}s}{envs.CACHE_DIR.get()} ({n} entries, {size / 2**20:.1f} MiB)")
    print(f"{'target arch':{_W}s}{toolchain.current_arch()}")
    try:
        count = driver.init()
    except Exception as e:
        print(f"{'GPUs':{_W}s}none visible ({str(e).splitlines()[0]})")
        return 0
    print(f"{'GPUs':{_W}s}{count}")
    for i in range(count):
        d = driver.drv()
        dev = driver.check(d.cuDeviceGet(i))
        name = driver.check(d.cuDeviceGetName(256, dev))
        name = (name.decode(errors="replace") if isinstance(name, bytes) else str(name)).split("\x00")[0].strip()
        major = driver.device_attr(i, "CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR")
        minor = driver.device_attr(i, "CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR")
        peers = [j for j in range(count) if j != i and driver.can_access_peer(i, j)]
        links = ""
        try:
            import pynvml  # type: ignore  # nvidia-ml-py, optional: NVLink link counts
            pynvml.nvmlInit()
            h = pynvml.nvmlDeviceGetHandleByIndex(i)
            n_up = 0
            for link in range(18 * 2):
                try:
                    if pynvml.nvmlDeviceGetNvLinkState(h, link):
                        n_up += 1
                except Exception:
                    break
            links = f", {n_up} NVLink links up"
        except Exception:
            pass
        print(f"  cuda:{i} {name} sm_{major}{minor}, {driver.num_sms(i)} SMs{links}; "
              f"peer access to {peers if peers else 'none'}")
    return 0
