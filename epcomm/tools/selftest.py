"""``epcomm selftest``: prove on this machine's GPUs that the whole stack works.

One process per GPU, bootstrapped through epcomm's group abstraction (no torch needed):
1. plain stores into a peer's memory mapped with CUDA IPC (smoke_peer_store);
2. NVSHMEM: symmetric heap, an NVSHMEM-linked kernel doing puts and signals (smoke_nvshmem_put);
3. get_dispatch_layout against epcomm.reference on random routing (CuPy arrays).
Every result is checked against values computed on the host.
"""
from __future__ import annotations

import sys
import time

import numpy as np

from epcomm import api, envs, reference
from epcomm.jit import loader
from epcomm.kernels import smoke as K_smoke
from epcomm.kernels.smoke import SmokeNvshmemSpec, SmokeParams, SmokePeerStoreSpec
from epcomm.runtime import driver
from epcomm.runtime import nvshmem as nvr
from epcomm.runtime.peer_memory import PeerMemory
from epcomm.testing import random_topk
from epcomm.tools import messages, spawn


def _expect(v: int, n: int) -> np.ndarray:
    """What a smoke kernel writes: ``v + i`` at element i."""
    return (v + np.arange(n, dtype=np.uint64)).astype(np.uint64)


def _smoke_worker(rank: int, world: int, group, n: int = 1 << 20) -> dict:
    out: dict = {}
    dev = spawn.device_of(rank)
    driver.init()
    driver.set_device(dev)
    stream = driver.stream_create()
    _peer_store_check(out, rank, world, group, dev, stream, n)
    shared = world > spawn.gpu_count()  # EPCOMM_SHARE_GPU: NVSHMEM's several-PEs-per-GPU mode
    _nvshmem_check(out, rank, world, group, dev, stream, n, shared)
    _layout_check(out, rank, dev)
    return out


def _peer_store_check(out: dict, rank: int, world: int, group, dev: int, stream: int, n: int) -> None:
    """1. Plain stores into the next rank's memory, shared as the NVLink buffer is
    (EPCOMM_PEER_MEMORY: CUDA IPC or virtual memory with file descriptors)."""
    spawn.phase("peer memory store")
    peer, src = (rank + 1) % world, (rank - 1) % world
    mem = PeerMemory(dev, n * 8)
    try:
        driver.memset_d8_async(mem.local, 0, n * 8, stream)
        driver.stream_sync(stream)
        ptrs = mem.share(group)
        mod = loader.load(SmokePeerStoreSpec(), dev)
        t0 = time.perf_counter()
        K_smoke.launch_peer_store(mod, stream, SmokeParams(mem.local, ptrs[peer], 0, 0, n, 1000 * (rank + 1), rank,
                                                           peer))
        driver.stream_sync(stream)
        group.barrier()
        host = np.empty(n, np.uint64)
        driver.memcpy_dtoh(host.ctypes.data, mem.local, n * 8)
        out["peer_memory"] = mem.kind
        out["peer_store"] = bool((host == _expect(1000 * (src + 1), n)).all())
        out["peer_store_ms"] = round((time.perf_counter() - t0) * 1e3, 2)
        group.barrier()
    finally:
        mem.free()


def _nvshmem_check(out: dict, rank: int, world: int, group, dev: int, stream: int, n: int, shared: bool) -> None:
    """2. NVSHMEM: the symmetric heap and an NVSHMEM-linked kernel's puts and signal."""
    spawn.phase("nvshmem init")
    peer, src = (rank + 1) % world, (rank - 1) % world
    t0 = time.perf_counter()
    nvr.init(group, dev, 64 << 20, shared_gpu=shared)
    out["nvshmem_init_s"] = round(time.perf_counter() - t0, 2)
    spawn.phase("nvshmem put/signal")
    buf, ptr = nvr.alloc(n * 8 + 64)
    sig = ptr + n * 8
    res = driver.mem_alloc(16)
    driver.memset_d8_async(ptr, 0, n * 8 + 64, stream)
    driver.memset_d8_async(res, 0, 16, stream)
    driver.stream_sync(stream)
    group.barrier()
    t0 = time.perf_counter()
    mod2 = loader.load(SmokeNvshmemSpec(), dev)
    out["nvshmem_compile_link_load_s"] = round(time.perf_counter() - t0, 2)
    K_smoke.launch_nvshmem_put(mod2, stream, SmokeParams(ptr, 0, sig, res, n, 7 * (rank + 1), rank, peer))
    driver.stream_sync(stream)
    group.barrier()
    host = np.empty(n, np.uint64)
    driver.memcpy_dtoh(host.ctypes.data, ptr, n * 8)
    r2 = np.empty(2, np.uint64)
    driver.memcpy_dtoh(r2.ctypes.data, res, 16)
    out["nvshmem_put_signal"] = bool((host == _expect(7 * (src + 1), n)).all()) and int(r2[1]) == 1
    out["nvshmem_ptr_nvlink"] = int(r2[0]) == 1
    group.barrier()
    nvr.free(buf)
    driver.mem_free(res)


def _layout_check(out: dict, rank: int, dev: int) -> None:
    """3. get_dispatch_layout (CuPy in, CuPy out) against the reference."""
    spawn.phase("layout")
    try:
        import cupy as cp
    except ImportError:
        out["layout"] = "skipped: cupy not installed"
        return
    rng = np.random.default_rng(rank)
    ok = True
    with cp.cuda.Device(dev):
        for N, E, R in ((1, 8, 2), (4096, 256, 8), (8192, 512, 64), (777, 64, 16)):
            topk = random_topk(rng, N, E, min(8, E), drop_prob=0.1)
            got = api.get_dispatch_layout(cp.asarray(topk), E, R)
            ref = reference.get_dispatch_layout(topk, E, R)
            ok &= np.array_equal(cp.asnumpy(got[0]), ref.num_tokens_per_rank)
            ok &= np.array_equal(cp.asnumpy(got[2]), ref.num_tokens_per_expert)
            ok &= np.array_equal(cp.asnumpy(got[3]).astype(bool), ref.is_token_in_rank)
            if ref.num_tokens_per_rdma_rank is None:
                ok &= got[1] is None
            else:
                ok &= np.array_equal(cp.asnumpy(got[1]), ref.num_tokens_per_rdma_rank)
    out["layout"] = bool(ok)


def run_selftest(gpus: int = 0, timeout: float = 300.0) -> int:
    """Run the checks on ``gpus`` GPUs (0 = every visible one), one process each.  Returns 0 if
    all pass, 1 if a check fails or a rank fails (its error printed), 2 if the machine or the
    arguments cannot run it (fewer than 2 GPUs, more asked for than visible)."""
    visible = spawn.gpu_count()
    if gpus < 0 or gpus > visible:
        messages.error("selftest", f"--gpus {gpus}: {visible} GPU(s) visible (0 = all)")
        return messages.USAGE
    n = gpus or visible
    if n == 1 and visible >= 1 and envs.SHARE_GPU.get():
        n = 2  # two ranks on one GPU, taking turns: checks the stack, not its speed
        messages.status("selftest", "2 ranks sharing one GPU (EPCOMM_SHARE_GPU=1)")
    if n < 2:
        messages.error("selftest", f"needs 2 or more GPUs (or one with EPCOMM_SHARE_GPU=1); {visible} visible"
                       f"{' (--gpus 1)' if gpus == 1 else ''}")
        return messages.USAGE
    t0 = time.perf_counter()
    try:
        results = spawn.run(_smoke_worker, n, timeout=timeout)
    except spawn.SpawnError as e:
        first, _, rest = str(e).partition("\n")
        messages.error("selftest", f"FAIL: {first}")
        if rest:
            print(rest, file=sys.stderr)  # the ranks' own output, as the spawn collected it
        return messages.FAILED
    bad = 0
    for r, res in enumerate(results):
        print(f"rank {r}: {res}")
        bad += sum(1 for v in res.values() if v is False)
    print(f"selftest with {n} ranks: {'PASS' if bad == 0 else 'FAIL'} in {time.perf_counter() - t0:.1f}s")
    return 0 if bad == 0 else 1



def main(a) -> int:
    """``epcomm selftest`` (its arguments: ``gpus``, ``timeout``)."""
    return run_selftest(a.gpus, a.timeout)


__all__ = ["main", "run_selftest"]
