"""Locating the CUDA compile toolchain: NVRTC, nvJitLink, headers, NVSHMEM.

Everything is resolved lazily and memoised; none of it needs a GPU or a driver.
"""
from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from pathlib import Path

from epcomm import envs
from epcomm.errors import ToolchainError


# What installs the CUDA components epcomm compiles with: the extra of the CUDA major version.
INSTALL_FIX = "pip install 'epcomm[cu13]' (or 'epcomm[cu12]' for CUDA 12)"


def cuda_src_dir() -> Path:
    """The ``cuda_src`` directory: inside the installed package, or beside it in a checkout."""
    here = Path(__file__).resolve().parent.parent  # .../epcomm
    for cand in (here / "cuda_src", here.parent / "cuda_src"):
        if (cand / "epcomm_common.cuh").is_file():
            return cand
    raise ToolchainError(f"cuda_src/ not found next to {here}; the installation is incomplete")


def cuda_src_files() -> list[Path]:
    root = cuda_src_dir()
    return sorted(p for p in root.rglob("*") if p.is_file() and p.suffix in (".cuh", ".h", ".cu"))


def _first_dir(*cands) -> Path | None:
    for c in cands:
        if c and Path(c).is_dir():
            return Path(c)
    return None


@functools.lru_cache(maxsize=None)
def _pathfinder_header(name: str) -> Path | None:
    try:
        from cuda import pathfinder
    except ImportError:
        return None
    try:
        loc = pathfinder.locate_nvidia_header_directory(name)
    except Exception:
        return None
    return Path(loc.abs_path) if loc is not None else None


def _cuda_homes() -> list[Path]:
    out = []
    for v in (envs.CUDA_HOME.get(), envs.external("CUDA_HOME"), envs.external("CUDA_PATH"),
              "/usr/local/cuda"):
        if v:
            out.append(Path(v))
    return out


@functools.lru_cache(maxsize=None)
def cuda_include_dirs() -> tuple[Path, ...]:
    """Include directories for the CUDA runtime headers and CCCL (``cuda/std/...``).

    Raises ToolchainError naming what was searched if either is missing.
    """
    homes = _cuda_homes()
    if envs.CUDA_HOME.get():
        rt = _first_dir(Path(envs.CUDA_HOME.get()) / "include")
    else:
        rt = _pathfinder_header("cudart") or _first_dir(*(h / "include" for h in homes))
    if rt is None or not (rt / "cuda_runtime.h").is_file():
        raise ToolchainError(
            f"CUDA runtime headers (cuda_runtime.h) not found; {INSTALL_FIX} installs them, or set "
            f"EPCOMM_CUDA_HOME. Searched: wheels, {', '.join(map(str, homes)) or 'no CUDA home'}")
    cccl = None
    for c in (rt / "cccl", _pathfinder_header("cccl"), *(h / "include" / "cccl" for h in homes), rt):
        if c and (Path(c) / "cuda" / "std" / "version").is_file():
            cccl = Path(c)
            break
    if cccl is None:
        raise ToolchainError(f"CCCL headers (cuda/std/version) not found; {INSTALL_FIX} installs them")
    dirs = [rt] if cccl == rt else [rt, cccl]
    return tuple(dirs)


@dataclass(frozen=True)
class NvshmemInstall:
    include: Path
    device_lib: Path
    version: str


@functools.lru_cache(maxsize=None)
def nvshmem() -> NvshmemInstall:
    """The NVSHMEM installation to compile and link device code against.

    It must be the one whose host library nvshmem4py loads (the nvidia-nvshmem wheel by
    default); device and host halves of different NVSHMEM releases do not interoperate.
    """
    root = None
    if envs.NVSHMEM_HOME.get():
        root = Path(envs.NVSHMEM_HOME.get())
    else:
        try:
            import nvidia.nvshmem as nvs  # type: ignore
            root = Path(list(nvs.__path__)[0])
        except Exception:
            inc = _pathfinder_header("nvshmem")
            root = inc.parent if inc is not None else None
    if root is None or not (root / "include" / "nvshmem.h").is_file():
        where = f"looked in {root}" if root is not None else "no nvidia-nvshmem wheel is installed"
        raise ToolchainError(f"NVSHMEM headers not found ({where}); {INSTALL_FIX} installs them, or set "
                             f"EPCOMM_NVSHMEM_HOME")
    lib = root / "lib" / "libnvshmem_device.a"
    if not lib.is_file():
        raise ToolchainError(f"{lib} not found: NVSHMEM device library missing")
    return NvshmemInstall(root / "include", lib, _nvshmem_version(root / "include"))


def _nvshmem_version(inc: Path) -> str:
    ver = {}
    for f in (inc / "non_abi" / "nvshmem_version.h", inc / "nvshmem_version.h"):
        if f.is_file():
            for m in re.finditer(r"#define\s+NVSHMEM_VENDOR_(MAJOR|MINOR|PATCH)_VERSION\s+(\d+)",
                                 f.read_text(errors="replace")):
                ver[m.group(1)] = m.group(2)
            if ver:
                break
    if len(ver) == 3:
        return f"{ver['MAJOR']}.{ver['MINOR']}.{ver['PATCH']}"
    try:
        from importlib.metadata import version
        for dist in ("nvidia-nvshmem-cu13", "nvidia-nvshmem-cu12"):
            try:
                return version(dist)
            except Exception:
                pass
    except Exception:
        pass
    return "unknown"


@functools.lru_cache(maxsize=None)
def header_versions() -> dict[str, str]:
    """Versions of the headers NVSHMEM modules include besides epcomm's own: CUDART_VERSION of
    the runtime headers and CCCL_VERSION (they come from separate wheels, upgraded separately;
    part of the JIT cache key).  "unknown" where a macro is not found."""
    out = {}
    try:
        dirs = cuda_include_dirs()
    except ToolchainError:
        return {"cudart": "unknown", "cccl": "unknown"}
    for name, rel, macro in (("cudart", "cuda_runtime_api.h", "CUDART_VERSION"),
                             ("cccl", "cuda/std/__cccl/version.h", "CCCL_VERSION")):
        v = "unknown"
        for d in dirs:
            f = d / rel
            if f.is_file():
                m = re.search(rf"#define\s+{macro}\s+(\d+)", f.read_text(errors="replace"))
                if m:
                    v = m.group(1)
                    break
        out[name] = v
    return out


@functools.lru_cache(maxsize=None)
def compiler_dist_versions() -> dict[str, str]:
    """Installed versions of the NVRTC and nvJitLink wheels (their patch level, which
    nvrtcVersion() does not report); empty for a toolkit outside pip.  Part of the cache key."""
    from importlib.metadata import PackageNotFoundError, version
    out = {}
    for dist in ("nvidia-cuda-nvrtc", "nvidia-cuda-nvrtc-cu12", "nvidia-nvjitlink", "nvidia-nvjitlink-cu12"):
        try:
            out[dist] = version(dist)
        except PackageNotFoundError:
            pass
    return out


@functools.lru_cache(maxsize=None)
def nvshmem_device_lib_stamp() -> str:
    """sha256 of the NVSHMEM device library linked into NVSHMEM modules (a few MB, hashed once
    per process): a rebuilt library of the same version (EPCOMM_NVSHMEM_HOME) changes the cache
    key too, and the same file gives the same key on every machine."""
    import hashlib
    h = hashlib.sha256()
    with open(nvshmem().device_lib, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def check_for(specs) -> None:
    """One ToolchainError, naming the fix, if what these specializations need to compile is
    missing (NVRTC, the CUDA and CCCL headers, NVSHMEM for the modules that call it)."""
    nvrtc_version()
    cuda_include_dirs()
    if any(s.uses_nvshmem for s in specs):
        nvshmem()


@functools.lru_cache(maxsize=None)
def nvrtc_version() -> str:
    try:
        from cuda.bindings import nvrtc
        err, major, minor = nvrtc.nvrtcVersion()
        return f"{major}.{minor}"
    except Exception as e:  # pragma: no cover - depends on the install
        raise ToolchainError(f"NVRTC is not usable ({type(e).__name__}: {e}); {INSTALL_FIX} installs it") from e


@functools.lru_cache(maxsize=None)
def nvjitlink_version() -> str:
    try:
        from cuda.bindings import nvjitlink
        major, minor = nvjitlink.version()
        return f"{major}.{minor}"
    except Exception:
        return "unavailable"


def current_arch(device_id: int | None = None) -> str:
    """The architecture to compile for: EPCOMM_ARCH, else that of GPU ``device_id`` (default:
    the current one; GPUs of a host may differ), else sm_90.

    Only this function (called when a kernel is first needed) may query the driver.
    """
    a = envs.ARCH.get()
    if a:
        return normalize_arch(a)
    try:
        from cuda.core import Device
        cc = (Device() if device_id is None else Device(device_id)).compute_capability
    except Exception:
        return "sm_90"
    if cc.major * 10 + cc.minor < MIN_SM:
        raise ToolchainError(f"GPU {device_id if device_id is not None else '(current)'} is sm_{cc.major}{cc.minor}: "
                             f"epcomm's kernels need sm_{MIN_SM} or newer")
    return f"sm_{cc.major}{cc.minor}"


# The oldest architecture the kernels compile for: bf16 conversions (cvt.rn.bf16.f32) and the
# acquire/release memory operations need sm_80 (compiled for sm_80 and sm_89 on the CPU; only
# sm_90 is run and tested).  Specializations may need more (KernelSpec.min_sm: the low-latency
# FP8 cast, cvt.e4m3x2, needs sm_89).
MIN_SM = 80


def arch_number(arch: str) -> int:
    """The number of a normalized arch: 90 for sm_90 or sm_90a."""
    return int(re.match(r"sm_(\d+)", arch).group(1))


def normalize_arch(a: str) -> str:
    """``a`` as ``sm_NN[a|f]``; ValueError for a malformed name or one older than MIN_SM."""
    a = a.strip().lower()
    m = re.fullmatch(r"(?:sm_?|compute_?)?(\d{2,3})([af]?)", a)
    if not m:
        raise ValueError(f"arch {a!r}: expected e.g. sm_90, sm_90a or 90")
    if int(m.group(1)) < MIN_SM:
        raise ValueError(f"arch {a!r}: the kernels need sm_{MIN_SM} or newer (bf16 conversions; the low-latency "
                         f"FP8 cast needs sm_89); they are tested on sm_90")
    return f"sm_{m.group(1)}{m.group(2)}"


@functools.lru_cache(maxsize=None)
def nvrtc_has_builtin_offsetof() -> bool:
    """Whether this NVRTC knows ``__builtin_offsetof`` (13.5 does, 13.0 does not).

    Instantiation sources assert every params field offset with it where available, and only
    the struct size otherwise (CI's NVRTC still checks the offsets on every change).
    """
    try:
        from cuda.core import Program, ProgramOptions
        Program("struct S { int a; long long b; };\n"
                "static_assert(__builtin_offsetof(S, b) == 8, \"\");\n",
                "c++", ProgramOptions(arch="sm_90", std="c++17")).compile("cubin")
        return True
    except Exception:
        return False
