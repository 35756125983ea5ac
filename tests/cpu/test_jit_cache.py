"""The JIT disk cache: hits, misses, invalidation, concurrency, corruption and compile errors."""
from __future__ import annotations

import ctypes
import multiprocessing as mp
import os
import shutil
from dataclasses import dataclass

import pytest

from epcomm.errors import CompileError
from epcomm.jit import cache, compiler, toolchain
from epcomm.jit.spec import KernelDef, KernelSpec, ParamsStruct
from epcomm.kernels.smoke import SmokeParams, SmokePeerStoreSpec



def test_hit_after_miss_returns_the_same_cubin(cache_dir):
    spec = SmokePeerStoreSpec(threads=128)
    a = compiler.build(spec, "sm_90")
    b = compiler.build(spec, "sm_90")
    assert (a.cached, b.cached) == (False, True)
    assert a.cubin == b.cubin and a.symbols == b.symbols and a.key == b.key
    assert cache.entry_path(spec.family, a.key).is_file()


def test_key_depends_on_arch_and_template_arguments(cache_dir):
    k = lambda s, arch="sm_90": compiler.cache_key(s, arch)  # noqa: E731
    assert k(SmokePeerStoreSpec(128)) != k(SmokePeerStoreSpec(256))
    assert k(SmokePeerStoreSpec(128)) != k(SmokePeerStoreSpec(128), "sm_100")
    assert k(SmokePeerStoreSpec(128)) == k(SmokePeerStoreSpec(128))


def test_key_covers_the_toolchain_outside_cuda_src(cache_dir, monkeypatch):
    from epcomm.kernels.smoke import SmokeNvshmemSpec
    spec = SmokeNvshmemSpec(threads=128)
    base = compiler.cache_key(spec, "sm_90")
    for name, fake in (("header_versions", lambda: {"cudart": "1", "cccl": "2"}),
                       ("nvshmem_device_lib_stamp", lambda: "another build"),
                       ("compiler_dist_versions", lambda: {"nvidia-cuda-nvrtc": "0.0.1"})):
        with monkeypatch.context() as m:
            m.setattr(toolchain, name, fake)
            assert compiler.cache_key(spec, "sm_90") != base, name
    assert compiler.cache_key(spec, "sm_90") == base


def test_a_changed_header_byte_is_a_miss(cache_dir, tmp_path, monkeypatch):
    src = tmp_path / "cuda_src"
    shutil.copytree(toolchain.cuda_src_dir(), src)
    monkeypatch.setattr(toolchain, "cuda_src_dir", lambda: src)
    spec = SmokePeerStoreSpec(threads=64)
    a = compiler.build(spec, "sm_90")
    assert compiler.build(spec, "sm_90").cached
    hdr = src / "epcomm_common.cuh"
    hdr.write_text(hdr.read_text() + "\n// one more byte of comment\n")
    c = compiler.build(spec, "sm_90")
    assert not c.cached and c.key != a.key


def test_truncated_or_corrupt_entry_is_a_miss_and_is_rewritten(cache_dir):
    spec = SmokePeerStoreSpec(threads=96)
    a = compiler.build(spec, "sm_90")
    path = cache.entry_path(spec.family, a.key)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])           # truncated
    b = compiler.build(spec, "sm_90")
    assert not b.cached and b.cubin == a.cubin
    assert cache.read_entry(path).payload == a.cubin   # republished whole
    corrupt = bytearray(data)
    corrupt[-10] ^= 0xFF                               # payload bit flip: hash mismatch
    path.write_bytes(bytes(corrupt))
    assert cache.read_entry(path) is None
    assert not compiler.build(spec, "sm_90").cached
    path.write_bytes(b"garbage")
    assert cache.read_entry(path) is None


def test_an_entry_of_another_key_or_with_bad_symbols_is_a_miss(cache_dir):
    a_spec, b_spec = SmokePeerStoreSpec(threads=32), SmokePeerStoreSpec(threads=160)
    a = compiler.build(a_spec, "sm_90")
    b_key = compiler.cache_key(b_spec, "sm_90")
    # a's entry copied (or renamed) to b's path: same kernel names, a different kernel
    b_path = cache.entry_path(b_spec.family, b_key)
    shutil.copyfile(cache.entry_path(a_spec.family, a.key), b_path)
    assert cache.read_entry(b_path, b_key) is None
    b = compiler.build(b_spec, "sm_90")
    assert not b.cached and b.cubin != a.cubin and b.meta["key"] == b_key
    # a whole, correctly hashed entry whose metadata lacks a kernel's symbol: a miss, not a KeyError
    a_path = cache.entry_path(a_spec.family, a.key)
    ent = cache.read_entry(a_path, a.key)
    cache.write_entry(a_path, ent.payload, dict(ent.meta, symbols=["not", "a", "dict"]))
    again = compiler.build(a_spec, "sm_90")
    assert not again.cached and again.symbols == a.symbols


def test_an_unwritable_cache_compiles_in_memory_with_one_warning(tmp_path, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    monkeypatch.setenv("EPCOMM_CACHE_DIR", str(blocker / "cache"))  # can never be created
    monkeypatch.setattr(compiler, "_WARNED_UNWRITABLE", [False])
    with pytest.warns(RuntimeWarning, match="cannot be written"):
        m = compiler.build(SmokePeerStoreSpec(threads=224), "sm_90")
    assert not m.cached and m.cubin and m.symbols
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per process
        compiler.build(SmokePeerStoreSpec(threads=224), "sm_90")


def _build_in_child(cache_root, q):
    os.environ["EPCOMM_CACHE_DIR"] = cache_root
    from epcomm.jit import compiler as c
    from epcomm.kernels.smoke import SmokeNvshmemSpec
    m = c.build(SmokeNvshmemSpec(threads=160), "sm_90")  # slow compile: the others must wait for it
    q.put((m.cached, len(m.cubin), m.key))


def test_four_processes_compile_one_key_once(cache_dir):
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_build_in_child, args=(str(cache_dir), q)) for _ in range(4)]
    for p in procs:
        p.start()
    res = [q.get(timeout=600) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    cached = sorted(r[0] for r in res)
    assert cached == [False, True, True, True], f"expected one compile and three cache hits, got {res}"
    assert len({(r[1], r[2]) for r in res}) == 1
    entries = list((cache_dir / "smoke_nvshmem").glob("*.bin"))
    assert len(entries) == 1 and not list((cache_dir / "smoke_nvshmem").glob("*.tmp"))


def test_disable_cache_writes_nothing(cache_dir, monkeypatch):
    monkeypatch.setenv("EPCOMM_DISABLE_CACHE", "1")
    m = compiler.build(SmokePeerStoreSpec(threads=32), "sm_90")
    assert not m.cached and not cache_dir.exists()


@dataclass(frozen=True)
class _BadKernelSpec(KernelSpec):
    family = "test_bad"
    header = "smoke.cuh"

    def kernels(self):
        return (KernelDef("k", "epcomm::no_such_kernel", (1,), SmokeParams),)


class _WrongMirror(ParamsStruct):
    _cname_ = "epcomm::SmokeParams"
    _fields_ = [("peer", ctypes.c_uint64), ("local", ctypes.c_uint64)]  # swapped and incomplete


@dataclass(frozen=True)
class _WrongMirrorSpec(KernelSpec):
    family = "test_mirror"
    header = "smoke.cuh"

    def kernels(self):
        return (KernelDef("k", "epcomm::smoke_peer_store", (256,), _WrongMirror),)


def test_compile_error_carries_log_options_and_numbered_source(cache_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("EPCOMM_DUMP_DIR", str(tmp_path / "dump"))
    with pytest.raises(CompileError) as ei:
        compiler.build(_BadKernelSpec(), "sm_90")
    e = ei.value
    assert "no_such_kernel" in e.log and "error" in e.log
    assert any(o.startswith("-arch=sm_90") for o in e.options)
    assert "epcomm::no_such_kernel<1>" in e.source
    assert "    2  #include \"smoke.cuh\"" in str(e)       # numbered source in the message
    assert list((tmp_path / "dump").glob("*.log"))          # EPCOMM_DUMP_DIR keeps the evidence
    assert not list((cache_dir / "test_bad").glob("*.bin"))  # nothing published


def test_params_mirror_mismatch_fails_at_compile_time(cache_dir):
    with pytest.raises(CompileError, match="differs from its Python mirror"):
        compiler.build(_WrongMirrorSpec(), "sm_90")


def test_rendered_source_is_a_small_explicit_instantiation():
    src = SmokePeerStoreSpec(threads=256).render()
    assert '#include "smoke.cuh"' in src
    assert "template __global__ void epcomm::smoke_peer_store<256>(const __grid_constant__ epcomm::SmokeParams);" in src
    assert src.count("static_assert") == 1 + len(SmokeParams._fields_)


# ---- found by mutation testing: each fails if the check it names is removed or loosened ----


def test_bad_magic_or_unparsable_header_is_a_miss(cache_dir):
    import struct
    path = cache_dir / "fam" / "k.bin"
    cache.write_entry(path, b"payload", {"key": "k"})
    assert cache.read_entry(path, "k").payload == b"payload"
    data = path.read_bytes()
    path.write_bytes(b"X" + data[1:])                      # another format's magic
    assert cache.read_entry(path, "k") is None
    hdr = b"{not json"                                     # valid UTF-8, invalid JSON
    path.write_bytes(cache._MAGIC + struct.pack("<I", len(hdr)) + hdr + b"payload")
    assert cache.read_entry(path, "k") is None


def test_make_key_is_canonical():
    assert cache.make_key({"a": 1, "b": [2, 3]}) == cache.make_key({"b": [2, 3], "a": 1})
    assert cache.make_key({"a": b"xy"}) != cache.make_key({"a": b"xz"})


def test_a_reader_never_sees_a_partial_entry_while_it_is_republished(cache_dir):
    import threading
    path = cache_dir / "fam" / "k.bin"
    payload = os.urandom(8 << 20)
    cache.write_entry(path, payload, {"key": "k"})
    stop, misses = threading.Event(), []

    def reader():
        while not stop.is_set():
            if cache.read_entry(path, "k") is None:
                misses.append(1)

    t = threading.Thread(target=reader)
    t.start()
    try:
        for _ in range(40):
            cache.write_entry(path, payload, {"key": "k"})
    finally:
        stop.set()
        t.join()
    assert not misses, f"{len(misses)} reads saw no whole entry"


def test_cache_list_and_clear_touch_only_epcomm_files(cache_dir, capsys):
    from epcomm.tools.cli import main
    spec = SmokePeerStoreSpec(threads=128)
    m = compiler.build(spec, "sm_90")
    path = cache.entry_path(spec.family, m.key)
    bad = path.with_name("0" * 64 + ".bin")
    bad.write_bytes(b"not an entry")
    stale_tmp = path.with_name(path.name + ".abc.tmp")
    fresh_tmp = path.with_name(path.name + ".def.tmp")
    stale_tmp.write_bytes(b"x")
    fresh_tmp.write_bytes(b"y")
    os.utime(stale_tmp, (1, 1))
    mine = cache.cache_root() / "notes.txt"          # the user's file in a shared directory
    mine.write_text("keep me")
    theirs = path.parent / "README"
    theirs.write_text("keep me too")
    other_tool = cache.cache_root() / "models"       # another tool's directory with a .bin
    other_tool.mkdir()
    (other_tool / "model.bin").write_bytes(b"weights")
    (cache.cache_root() / "empty_dir_of_theirs").mkdir()
    outside = cache.cache_root().parent / "outside"
    outside.mkdir()
    (outside / ("a" * 64 + ".bin")).write_bytes(b"not under the cache")
    (cache.cache_root() / "link").symlink_to(outside)  # never followed
    assert main(["cache", "list"]) == 0
    out = capsys.readouterr().out
    assert spec.label() in out and "sm_90" in out and "corrupt" in out and "2 entries" in out
    locks = list((path.parent / "locks").glob("*.lock"))
    assert locks, "a build leaves its lock file"
    held = "b" * 64
    with cache.key_lock("other", held):                # a build in progress keeps its lock
        assert main(["cache", "clear"]) == 0
        assert (cache.cache_root() / "other" / "locks" / f"{held}.lock").exists()
    out = capsys.readouterr().out
    assert out.startswith(f"removed {2 + 1 + len(locks)} files")
    assert not path.exists() and not bad.exists() and not stale_tmp.exists()
    assert fresh_tmp.exists() and mine.read_text() == "keep me" and theirs.exists()
    assert (other_tool / "model.bin").read_bytes() == b"weights" and (cache.cache_root() / "empty_dir_of_theirs").is_dir()
    assert (outside / ("a" * 64 + ".bin")).exists()
    assert not any(p.exists() for p in locks)
    assert compiler.build(spec, "sm_90").cached is False   # a clean miss after clearing
