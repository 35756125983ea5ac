"""Per-SM copy throughput over NVLink and in local memory, by copy method (design probe).

Answers one question before a kernel is redesigned: how many bytes per second one SM moves
when it copies rows with plain 16-byte warp loads/stores versus Hopper's bulk copy engine
(``cp.async.bulk`` through shared memory, completing on an mbarrier), pushing to a peer
(remote stores), pulling from a peer (remote loads) or copying locally.  Both GPUs run at
once (GPU0 <-> GPU1), as in a dispatch, so the numbers include the opposite direction's load.

Single process, peer access enabled, CuPy for buffers and NVRTC compilation: this is a probe,
not a product kernel.  Usage (on a machine with two GPUs)::

    python benchmarks/nvlink_probe.py --json out.json
"""
from __future__ import annotations

import argparse
import json
import statistics

from epcomm.tools import spawn

SOURCE = r"""
struct alignas(16) V4 { int x, y, z, w; };
__device__ __forceinline__ V4 ld_nc(const V4* p) {
  V4 v;
  asm volatile("ld.global.nc.L1::no_allocate.v4.s32 {%0,%1,%2,%3}, [%4];"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
  return v;
}
__device__ __forceinline__ void st_na(V4* p, const V4& v) {
  asm volatile("st.global.L1::no_allocate.v4.s32 [%0], {%1,%2,%3,%4};"
               :: "l"(p), "r"(v.x), "r"(v.y), "r"(v.z), "r"(v.w) : "memory");
}

// One warp per row, U 16-byte words in flight per lane.
template <int U>
__device__ void warp_rows(const V4* src, V4* dst, int rows, int n16) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
  for (int r = blockIdx.x * nw + warp; r < rows; r += gridDim.x * nw) {
    const V4* s = src + (long long)r * n16;
    V4* d = dst + (long long)r * n16;
    for (int i = lane; i < n16; i += 32 * U) {
      V4 v[U];
#pragma unroll
      for (int u = 0; u < U; ++u) if (i + u * 32 < n16) v[u] = ld_nc(s + i + u * 32);
#pragma unroll
      for (int u = 0; u < U; ++u) if (i + u * 32 < n16) st_na(d + i + u * 32, v[u]);
    }
  }
}
extern "C" __global__ void warp_u4(const V4* s, V4* d, int rows, int n16) { warp_rows<4>(s, d, rows, n16); }
extern "C" __global__ void warp_u8(const V4* s, V4* d, int rows, int n16) { warp_rows<8>(s, d, rows, n16); }
extern "C" __global__ void warp_u14(const V4* s, V4* d, int rows, int n16) { warp_rows<14>(s, d, rows, n16); }

__device__ __forceinline__ unsigned smem_u32(const void* p) {
  return static_cast<unsigned>(__cvta_generic_to_shared(p));
}
__device__ __forceinline__ void bar_wait(unsigned bar, unsigned parity) {
  asm volatile(
      "{\n .reg .pred p;\n W: mbarrier.try_wait.parity.shared::cta.b64 p, [%0], %1;\n"
      " @!p bra W;\n}\n" :: "r"(bar), "r"(parity) : "memory");
}

// Bulk copies: every warp of the block runs its own ring of `stages` buffers of `piece` bytes;
// lane 0 issues.  Loads complete on an mbarrier; stores are bulk groups, and a buffer is
// refilled once the store issued from it one step earlier has read it.
extern "C" __global__ void tma_rows(const char* src, char* dst, long long total_bytes, int piece,
                                    int stages) {
  extern __shared__ __align__(128) char smem[];
  __shared__ __align__(8) unsigned long long bars[32 * 16];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
  if (lane != 0) return;
  char* ring = smem + (long long)warp * stages * piece;
  unsigned long long* wb = bars + warp * 16;
  const long long npieces = total_bytes / piece;
  const long long first = (long long)blockIdx.x * nw + warp, step = (long long)gridDim.x * nw;
  const long long n = first < npieces ? (npieces - first + step - 1) / step : 0;
  for (int s = 0; s < stages; ++s)
    asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;" :: "r"(smem_u32(wb + s)));
  asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
  auto issue_load = [&](long long i) {
    const int s = (int)(i % stages);
    const unsigned bar = smem_u32(wb + s);
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" :: "r"(bar), "r"(piece) : "memory");
    asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];"
                 :: "r"(smem_u32(ring + (long long)s * piece)), "l"(src + (first + i * step) * piece),
                    "r"(piece), "r"(bar) : "memory");
  };
  for (long long i = 0; i < n && i < stages; ++i) issue_load(i);
  for (long long i = 0; i < n; ++i) {
    const int s = (int)(i % stages);
    bar_wait(smem_u32(wb + s), (unsigned)((i / stages) & 1));
    asm volatile("cp.async.bulk.global.shared::cta.bulk_group [%0], [%1], %2;"
                 :: "l"(dst + (first + i * step) * piece), "r"(smem_u32(ring + (long long)s * piece)),
                    "r"(piece) : "memory");
    asm volatile("cp.async.bulk.commit_group;" ::: "memory");
    if (i >= 1 && i - 1 + stages < n) {
      asm volatile("cp.async.bulk.wait_group.read 1;" ::: "memory");
      issue_load(i - 1 + stages);
    }
  }
  asm volatile("cp.async.bulk.wait_group 0;" ::: "memory");
}
"""

ROWS = 4096
ROW_BYTES = 7168 * 2  # one BF16 DeepSeek-V3 row
REPS = 10


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", default=None)
    ap.add_argument("--blocks", default="4,8,12,16,24,32")
    args = ap.parse_args()
    if spawn.gpu_count() < 2:
        raise SystemExit(f"nvlink_probe.py needs 2 GPUs (it copies between GPUs 0 and 1); {spawn.gpu_count()} visible")
    import cupy as cp

    nbytes = ROWS * ROW_BYTES
    n16 = ROW_BYTES // 16
    devs = [0, 1]
    bufs = {}
    mods = {}
    for d in devs:
        with cp.cuda.Device(d):
            cp.cuda.runtime.deviceEnablePeerAccess(1 - d)
            rng = cp.random.default_rng(d + 1)
            bufs[d] = {
                "src": rng.integers(0, 2**31 - 1, nbytes // 4, dtype=cp.int32),
                "dst": cp.zeros(nbytes // 4, dtype=cp.int32),  # written by the peer in push mode
                "loc": cp.zeros(nbytes // 4, dtype=cp.int32),
            }
            mods[d] = cp.RawModule(code=SOURCE, options=("-std=c++17",),
                                   name_expressions=None)
    results = []

    def run(method: str, mode: str, blocks: int, threads: int, extra: dict):
        # mode: push (src local -> peer dst), pull (peer src -> local loc), local (src -> loc)
        kern = {}
        streams = {}
        for d in devs:
            with cp.cuda.Device(d):
                k = mods[d].get_function(method if method != "tma" else "tma_rows")
                if method == "tma":
                    smem = (threads // 32) * extra["stages"] * extra["piece"]
                    k.max_dynamic_shared_size_bytes = smem
                kern[d] = k
                streams[d] = cp.cuda.Stream(non_blocking=True)

        def args_for(d):
            peer = 1 - d
            if mode == "push":
                s, t = bufs[d]["src"], bufs[peer]["dst"]
            elif mode == "pull":
                s, t = bufs[peer]["src"], bufs[d]["loc"]
            else:
                s, t = bufs[d]["src"], bufs[d]["loc"]
            return s, t

        def launch(d):
            s, t = args_for(d)
            with cp.cuda.Device(d):
                if method == "tma":
                    smem = (threads // 32) * extra["stages"] * extra["piece"]
                    kern[d]((blocks,), (threads,), (s, t, cp.int64(nbytes), cp.int32(extra["piece"]),
                                                    cp.int32(extra["stages"])),
                            stream=streams[d], shared_mem=smem)
                else:
                    kern[d]((blocks,), (threads,), (s, t, cp.int32(ROWS), cp.int32(n16)), stream=streams[d])

        times = {d: [] for d in devs}
        for trial in range(4):
            ev = {}
            for d in devs:
                with cp.cuda.Device(d):
                    streams[d].synchronize()
            for d in devs:
                with cp.cuda.Device(d):
                    e0, e1 = cp.cuda.Event(), cp.cuda.Event()
                    e0.record(streams[d])
                    ev[d] = (e0, e1)
            for _ in range(REPS):
                for d in devs:
                    launch(d)
            for d in devs:
                with cp.cuda.Device(d):
                    ev[d][1].record(streams[d])
            for d in devs:
                with cp.cuda.Device(d):
                    ev[d][1].synchronize()
                    if trial > 0:
                        times[d].append(cp.cuda.get_elapsed_time(*ev[d]) * 1e3 / REPS)
        # Correctness of the last copy.
        ok = True
        for d in devs:
            s, t = args_for(d)
            with cp.cuda.Device(d):
                ok = ok and bool(cp.asnumpy(s).tobytes() == cp.asnumpy(t).tobytes())
                t.fill(0)
        us = max(statistics.median(times[d]) for d in devs)
        rec = {"method": method, "mode": mode, "blocks": blocks, "threads": threads, **extra,
               "us": round(us, 1), "GBps": round(nbytes / us / 1e3, 1),
               "GBps_per_block": round(nbytes / us / 1e3 / blocks, 2), "ok": ok}
        results.append(rec)
        print(f"{mode:5s} {method:8s} thr={threads:4d} {extra} blocks={blocks:3d}: {us:8.1f} us "
              f"{rec['GBps']:7.1f} GB/s ({rec['GBps_per_block']:.2f}/block) ok={ok}", flush=True)

    block_list = [int(b) for b in args.blocks.split(",")]
    variants = [
        ("warp_u8", 512, {}), ("warp_u14", 512, {}), ("warp_u8", 1024, {}), ("warp_u4", 1024, {}),
        ("tma", 32, {"stages": 8, "piece": 14336}), ("tma", 128, {"stages": 3, "piece": 14336}),
        ("tma", 128, {"stages": 6, "piece": 7168}), ("tma", 256, {"stages": 6, "piece": 3584}),
    ]
    for mode in ("push", "pull", "local"):
        for method, threads, extra in variants:
            for b in block_list:
                try:
                    run(method, mode, b, threads, dict(extra))
                except Exception as e:  # noqa: BLE001 - a probe keeps going
                    print(f"{mode} {method} {threads} {extra} {b}: FAILED {type(e).__name__}: {e}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
