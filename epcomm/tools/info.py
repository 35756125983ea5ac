"""``epcomm info``: versions, the toolchain, the JIT cache, the GPUs and their NVLink peers."""
from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

from epcomm import __version__, envs
from epcomm.jit import cache, cuda_majors, toolchain
from epcomm.runtime import driver
from epcomm.tools import messages


def _version(dist: str) -> str:
    try:
        return version(dist)
    except PackageNotFoundError:
        return "not installed"


_W = 22  # the label column: the longest package name ("nvidia-nvshmem-cu13") and a gap


def _cuda_majors() -> str | None:
    """Print the CUDA driver and whether the CUDA majors agree; the disagreement's line, if any."""
    parts = cuda_majors.collect()
    drv = next((p.detail for p in parts if p.name == "driver"), "none found")
    print(f"{'CUDA driver':{_W}s}{drv}")
    why = cuda_majors.disagreement(parts)
    majors = sorted({p.major for p in parts if p.name != "driver" and p.major is not None})
    agree = f"CUDA {majors[0]} throughout" if len(majors) == 1 else "no CUDA package found"
    print(f"{'CUDA majors':{_W}s}{agree if why is None else 'DISAGREE (see the error below)'}")
    return why


def main(a) -> int:
    """``epcomm info``: 0, or 1 when the CUDA majors of the driver, NVRTC, NVSHMEM and the
    frameworks disagree (one error line saying what to change); what is missing is printed as
    unavailable."""
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
    why = _cuda_majors()
    _gpus()
    if why is not None:
        messages.error("info", why)
        return messages.FAILED
    return messages.OK


def _gpus() -> None:
    """The GPUs, their architecture, SMs, NVLink links and peers (or why none is visible)."""
    try:
        count = driver.init()
    except Exception as e:
        print(f"{'GPUs':{_W}s}none visible ({str(e).splitlines()[0]})")
        return
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
