"""Compile a :class:`~epcomm.jit.spec.KernelSpec` to a cubin (NVRTC via ``cuda.core.Program``;
modules that call NVSHMEM are compiled relocatable and linked with ``libnvshmem_device.a``
through ``cuda.core.Linker``/nvJitLink), going through the disk cache.

Compiling needs no GPU and no driver: CI compiles every shipped specialization for sm_90.
"""
from __future__ import annotations

import hashlib
import io
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from epcomm import envs
from epcomm._version import __version__
from epcomm.errors import CompileError, ToolchainError
from epcomm.jit import cache, toolchain
from epcomm.jit.spec import KernelSpec


@dataclass
class Module:
    """A compiled (not yet loaded) module."""

    spec: KernelSpec
    arch: str
    key: str
    cubin: bytes
    symbols: dict[str, str]          # kernel short name -> mangled symbol
    cached: bool                     # True if read from the disk cache
    seconds: float                   # wall time of this build (compile or read)
    meta: dict = field(default_factory=dict)


_DIGEST_MEMO: dict[tuple, str] = {}


def _sources_digest() -> str:
    """sha256 over the path and bytes of every file in cuda_src/.

    Memoised on the files' (path, size, mtime_ns), so an edited header is re-read but a
    launch path does not hash the sources on every call.
    """
    root = toolchain.cuda_src_dir()
    files = toolchain.cuda_src_files()
    stamp = tuple((str(p), st.st_size, st.st_mtime_ns) for p in files for st in (p.stat(),))
    d = _DIGEST_MEMO.get(stamp)
    if d is None:
        h = hashlib.sha256()
        for p in files:
            h.update(str(p.relative_to(root)).encode() + b"\0")
            h.update(p.read_bytes())
            h.update(b"\0")
        d = _DIGEST_MEMO[stamp] = h.hexdigest()
    return d


def _options(spec: KernelSpec, arch: str) -> tuple[dict, list[str]]:
    """cuda.core ProgramOptions keyword arguments and their canonical string form."""
    inc = [str(toolchain.cuda_src_dir())]
    # A stable program name keeps the cubin byte-identical across compiles (line info embeds it).
    name = "".join(c if c.isalnum() else "_" for c in spec.label()) + ".cu"
    kw: dict = dict(std="c++17", arch=arch, lineinfo=True, name=name, frandom_seed="epcomm")
    if spec.uses_nvshmem:
        nv = toolchain.nvshmem()
        inc += [str(nv.include)] + [str(p) for p in toolchain.cuda_include_dirs()]
        kw.update(relocatable_device_code=True, device_as_default_execution_space=True)
    kw["include_path"] = inc
    macros = list(spec.macros())
    kw["define_macro"] = macros
    canon = [f"-std={kw['std']}", f"-arch={arch}", "-lineinfo", "-frandom-seed=epcomm"]
    canon += [f"-I{p}" for p in inc]
    canon += [f"-D{k}={v}" for k, v in macros]
    if spec.uses_nvshmem:
        canon += ["-rdc=true", "-default-device"]
    return kw, sorted(canon)


def cache_key(spec: KernelSpec, arch: str, source: str | None = None) -> str:
    source = spec.render() if source is None else source
    _, canon = _options(spec, arch)
    parts = {
        "schema": cache.SCHEMA_VERSION,
        "epcomm": __version__,
        "cuda_src": _sources_digest(),
        "source": source,
        "options": canon,
        "arch": arch,
        "nvrtc": toolchain.nvrtc_version(),
        "compiler_wheels": toolchain.compiler_dist_versions(),
    }
    if spec.uses_nvshmem:
        parts["nvjitlink"] = toolchain.nvjitlink_version()
        parts["nvshmem"] = toolchain.nvshmem().version
        parts["nvshmem_device_lib"] = toolchain.nvshmem_device_lib_stamp()
        parts["headers"] = toolchain.header_versions()
    return cache.make_key(parts)


def _dump(spec: KernelSpec, source: str, log: str, options: list[str]) -> None:
    d = envs.DUMP_DIR.get()
    if not d:
        return
    p = Path(d)
    safe = "".join(c if c.isalnum() or c in "-_=.," else "_" for c in spec.label())
    try:  # a debugging aid: never let it hide the compile error or fail a good compile
        p.mkdir(parents=True, exist_ok=True)
        (p / f"{safe}.cu").write_text(source)
        (p / f"{safe}.log").write_text(" ".join(options) + "\n\n" + log)
    except OSError as e:
        print(f"[epcomm.jit] EPCOMM_DUMP_DIR={d}: could not write the dump ({e})", file=sys.stderr)


def compile_uncached(spec: KernelSpec, arch: str) -> tuple[bytes, dict[str, str], str]:
    """Compile (and link, for NVSHMEM modules).  Returns (cubin, symbols, log).

    Raises CompileError with the log, options and numbered source on failure.
    """
    try:
        from cuda.core import Program, ProgramOptions
    except ImportError as e:  # pragma: no cover - depends on the install
        raise ToolchainError(f"cuda.core is not installed ({e}); pip install 'epcomm[cu13]'") from e
    source = spec.render()
    kw, canon = _options(spec, arch)
    kdefs = spec.kernels()
    names = [k.name_expression for k in kdefs]
    logbuf = io.StringIO()
    try:
        obj = Program(source, "c++", ProgramOptions(**kw)).compile("cubin", name_expressions=names,
                                                                   logs=logbuf)
    except Exception as e:
        log = logbuf.getvalue() + str(e)
        _dump(spec, source, log, canon)
        raise CompileError("NVRTC compile", log, canon, source, spec.label()) from None
    symbols = {}
    for k in kdefs:
        m = obj.symbol_mapping.get(k.name_expression)
        if m is None:
            raise CompileError("NVRTC name lookup", f"no symbol for {k.name_expression}", canon,
                               source, spec.label())
        symbols[k.short] = m.decode() if isinstance(m, bytes) else str(m)
    cubin = obj.code
    if spec.uses_nvshmem:
        from cuda.core import Linker, LinkerOptions, ObjectCode
        lib = ObjectCode.from_library(str(toolchain.nvshmem().device_lib))
        try:
            linked = Linker(obj, lib, options=LinkerOptions(arch=arch)).link("cubin")
        except Exception as e:
            _dump(spec, source, logbuf.getvalue() + str(e), canon)
            raise CompileError("nvJitLink link with libnvshmem_device.a", str(e), canon, source,
                               spec.label()) from None
        cubin = linked.code
    _dump(spec, source, logbuf.getvalue(), canon)
    return bytes(cubin), symbols, logbuf.getvalue()


def build(spec: KernelSpec, arch: str | None = None) -> Module:
    """The compiled module for ``spec``: from the disk cache, or compiled and published."""
    arch = toolchain.normalize_arch(arch) if arch else toolchain.current_arch()
    if toolchain.arch_number(arch) < spec.min_sm:
        raise ToolchainError(f"{spec.label()} needs sm_{spec.min_sm} or newer; the target is {arch}")
    t0 = time.perf_counter()
    source = spec.render()
    key = cache_key(spec, arch, source)
    verbose = envs.JIT_VERBOSE.get()
    if envs.DISABLE_CACHE.get():
        cubin, symbols, _ = compile_uncached(spec, arch)
        return Module(spec, arch, key, cubin, symbols, False, time.perf_counter() - t0)
    path = cache.entry_path(spec.family, key)
    ent = _usable(cache.read_entry(path, key), spec)
    if ent is None:
        try:
            lock = cache.key_lock(spec.family, key)
            lock.__enter__()
        except OSError as e:  # read-only or full cache directory: compile in memory
            _warn_unwritable(e)
            cubin, symbols, _ = compile_uncached(spec, arch)
            return Module(spec, arch, key, cubin, symbols, False, time.perf_counter() - t0)
        try:
            ent = _usable(cache.read_entry(path, key), spec)  # another process may have published it
            if ent is None:
                tc = time.perf_counter()
                cubin, symbols, _ = compile_uncached(spec, arch)
                meta = {"key": key, "label": spec.label(), "symbols": symbols, "arch": arch,
                        "compile_seconds": round(time.perf_counter() - tc, 3), "epcomm": __version__}
                try:
                    cache.write_entry(path, cubin, meta)
                except OSError as e:
                    _warn_unwritable(e)
                if verbose:
                    print(f"[epcomm.jit] compiled {spec.label()} ({arch}) in "
                          f"{meta['compile_seconds']}s -> {path}", file=sys.stderr)
                return Module(spec, arch, key, cubin, symbols, False, time.perf_counter() - t0, meta)
        finally:
            lock.__exit__(None, None, None)
    if verbose:
        print(f"[epcomm.jit] cache hit {spec.label()} ({arch})", file=sys.stderr)
    return Module(spec, arch, key, ent.payload, dict(ent.meta["symbols"]), True,
                  time.perf_counter() - t0, ent.meta)


def _usable(ent: "cache.CacheEntry | None", spec: KernelSpec) -> "cache.CacheEntry | None":
    """``ent`` if its metadata names a symbol (str) for every kernel of ``spec``; else a miss."""
    if ent is None:
        return None
    sym = ent.meta.get("symbols")
    if not isinstance(sym, dict) or not all(isinstance(sym.get(k.short), str) for k in spec.kernels()):
        return None
    return ent


_WARNED_UNWRITABLE = [False]


def _warn_unwritable(e: OSError) -> None:
    if not _WARNED_UNWRITABLE[0]:
        _WARNED_UNWRITABLE[0] = True
        import warnings
        warnings.warn(f"epcomm JIT cache {cache.cache_root()} cannot be written ({e}); kernels are compiled in "
                      f"memory for this process (set EPCOMM_CACHE_DIR to a writable directory)", RuntimeWarning,
                      stacklevel=3)
