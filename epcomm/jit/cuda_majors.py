"""Do the driver, NVRTC, NVSHMEM and the frameworks' CUDA builds agree on the CUDA major version?

Read from the installed packages' metadata and two version calls (the driver's, NVRTC's): no
framework is imported, nothing is compiled, no GPU is needed.  ``epcomm info`` prints
:func:`collect`'s parts and :func:`disagreement`'s line.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, distribution

from epcomm import envs
from epcomm.errors import ToolchainError
from epcomm.jit import toolchain
from epcomm.runtime import driver

# The newest torch on PyPI built for each CUDA major (PyPI's torch 2.11 and newer are built
# for CUDA 13 and require cuda-bindings 13, which the cu12 extra excludes).
TORCH = {13: "2.13.0", 12: "2.10.0"}


def install_line(major: int) -> str:
    """The install line of CUDA ``major``: epcomm's extra, torch and JAX built for it (the
    README's "Install" section shows the same lines; tests/cpu/test_install_docs.py holds them
    equal)."""
    return f"pip install 'epcomm[cu{major}]' torch=={TORCH[major]} 'jax[cuda{major}]'"


# The oldest driver of each CUDA major (CUDA 12 runs on R525 and newer through minor version
# compatibility; CUDA 13 needs R580).
MIN_DRIVER = {12: 525, 13: 580}


@dataclass(frozen=True)
class Part:
    """One CUDA component: ``name`` (driver, NVRTC, cuda-bindings, NVSHMEM, torch, jax, cupy),
    ``detail`` (version and package), ``major`` (None: not built for CUDA, or unknown), and
    ``dist`` (the distribution it came from, "" for the driver and NVRTC)."""
    name: str
    detail: str
    major: int | None
    dist: str = ""


def torch_cuda_major(version: str, requires: list[str]) -> int | None:
    """The CUDA major torch ``version`` was built for, from its version's local tag (``+cu128``:
    12, ``+cpu``: None) or, without one (PyPI's builds), from the CUDA wheels it requires
    (``nvidia-*-cu12``, ``cuda-toolkit==13.*``); None for a build without CUDA."""
    local = version.partition("+")[2]
    if local:
        m = re.fullmatch(r"cu(\d+)\d", local)
        return int(m.group(1)) if m else None
    for req in requires:
        m = re.match(r"\s*(?:nvidia-[a-z0-9-]+-cu(\d+)\b|cuda-toolkit\b[^=;]*==\s*(\d+))", req)
        if m:
            return int(m.group(1) or m.group(2))
    return None


def _dist(name: str):
    try:
        return distribution(name)
    except PackageNotFoundError:
        return None


def _dist_parts() -> list[Part]:
    """The installed CUDA-specific distributions, one Part each."""
    parts = []
    d = _dist("cuda-bindings")
    if d is not None:
        parts.append(Part("cuda-bindings", d.version, int(d.version.split(".")[0]), "cuda-bindings"))
    for label, pattern in (("NVSHMEM", "nvidia-nvshmem-cu{}"), ("jax", "jax-cuda{}-plugin"), ("cupy", "cupy-cuda{}x")):
        if label == "NVSHMEM" and envs.NVSHMEM_HOME.get():
            continue  # a build outside pip: its CUDA major is not recorded anywhere we can read
        for major in sorted(TORCH):
            d = _dist(pattern.format(major))
            if d is not None:
                parts.append(Part(label, f"{pattern.format(major)} {d.version}", major, pattern.format(major)))
    d = _dist("torch")
    if d is not None:
        major = torch_cuda_major(d.version, d.requires or [])
        parts.append(Part("torch", f"{d.version} ({f'CUDA {major}' if major else 'no CUDA'})", major, "torch"))
    return parts


def collect() -> list[Part]:
    """What is installed: the driver (if any), NVRTC (if usable), then :func:`_dist_parts`."""
    parts = []
    v = driver.cuda_version()
    if v is not None:
        parts.append(Part("driver", f"CUDA {v[0]}.{v[1]}", v[0]))
    try:
        nvrtc = toolchain.nvrtc_version()
        parts.append(Part("NVRTC", nvrtc, int(nvrtc.split(".")[0])))
    except ToolchainError:
        pass
    return parts + _dist_parts()


def _fix(p: Part, target: int, parts: list[Part]) -> str:
    """What makes ``p`` agree with CUDA ``target``."""
    if any(q.name == p.name and q.major == target for q in parts):
        return f"pip uninstall {p.dist}"  # the target's build is there too (they share a folder)
    return {"torch": f"torch=={TORCH[target]} (built for CUDA {target})",
            "jax": f"'jax[cuda{target}]'", "cupy": f"cupy-cuda{target}x"}.get(p.name, f"'epcomm[cu{target}]'")


def disagreement(parts: list[Part]) -> str | None:
    """One line naming the parts whose CUDA major differs and what to change, or None when they
    agree (parts without a major are ignored; a driver may be newer than the rest)."""
    built = [p for p in parts if p.name != "driver" and p.major is not None]
    if not built:
        return None
    nvrtc = [p.major for p in built if p.name == "NVRTC"]
    majors = [p.major for p in built]
    target = nvrtc[0] if nvrtc else max(set(majors), key=majors.count)
    odd = [p for p in built if p.major != target]
    drv = next((p for p in parts if p.name == "driver"), None)
    if odd:
        alt = sorted({p.major for p in odd})
        basis = "NVRTC" if nvrtc else "the rest"
        names = ", ".join(f"{p.name} {p.detail}" for p in odd)
        fixes = ", ".join(dict.fromkeys(_fix(p, target, parts) for p in odd))
        other = f"; or everything for CUDA {alt[0]}: {install_line(alt[0])}" if len(alt) == 1 and alt[0] in TORCH else ""
        return (f"CUDA majors disagree: {basis} is CUDA {target}, but {names}: install {fixes}{other}")
    if drv is not None and drv.major < target:
        lower = f"install for CUDA {drv.major} ({install_line(drv.major)}) or " if drv.major in TORCH else ""
        return (f"the driver supports {drv.detail} but the packages are for CUDA {target}: {lower}"
                f"update the driver (CUDA {target} needs R{MIN_DRIVER.get(target, '?')} or newer)")
    return None


def summary(parts: list[Part]) -> str:
    """``parts`` in one line: 'driver CUDA 13.0, NVRTC 13.0, ...'."""
    return ", ".join(f"{p.name} {p.detail}" for p in parts) or "no CUDA component found"
