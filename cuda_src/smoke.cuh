// Smoke-test kernels: prove, on a new machine, that peer memory and NVSHMEM work end to end.
#pragma once
#include "epcomm_common.cuh"
#if EPCOMM_WITH_NVSHMEM
#include "epcomm_nvshmem.cuh"
#endif

namespace epcomm {

struct SmokeParams {
  u64* local;        // this rank's buffer (symmetric for the NVSHMEM kernel)
  u64* peer;         // the peer's buffer as seen from here (peer pointer), plain-store kernel
  u64* signal;       // symmetric u64 signal word (NVSHMEM kernel)
  u64* result;       // device-visible result words: [0] = nvshmem_ptr(peer) != null
  u64 count;         // u64 elements to write
  u64 value;         // element i gets value + i
  int rank;
  int peer_rank;
};

// Plain stores into the peer's memory through a peer pointer (CUDA IPC or nvshmem_ptr).
template <int kThreads>
__global__ void __launch_bounds__(kThreads) smoke_peer_store(const __grid_constant__ SmokeParams p) {
  for (u64 i = blockIdx.x * (u64)kThreads + threadIdx.x; i < p.count; i += (u64)gridDim.x * kThreads)
    p.peer[i] = p.value + i;
}

#if EPCOMM_WITH_NVSHMEM
// NVSHMEM device API: each block stages its slice in shared memory, puts it to the peer with
// a block-wide put, orders it before a signal (nvshmem_fence), and bumps the
// peer's signal; block 0 then waits until every block of the peer has signalled us.
template <int kThreads>
__global__ void __launch_bounds__(kThreads) smoke_nvshmem_put(const __grid_constant__ SmokeParams p) {
  __shared__ u64 stage[1024];
  const u64 per_block = (p.count + gridDim.x - 1) / gridDim.x;
  const u64 begin = blockIdx.x * per_block;
  const u64 end = begin + per_block < p.count ? begin + per_block : p.count;
  for (u64 off = begin; off < end; off += 1024) {
    const u64 n = end - off < 1024 ? end - off : 1024;
    for (u64 i = threadIdx.x; i < n; i += kThreads) stage[i] = p.value + off + i;
    __syncthreads();
    // Blocking form: returns once `stage` may be reused for the next slice.
    nvshmemx_putmem_block(p.local + off, stage, n * sizeof(u64), p.peer_rank);
    __syncthreads();
  }
  if (threadIdx.x == 0) {
    nvshmem_fence();
    nvshmemx_signal_op(p.signal, 1, NVSHMEM_SIGNAL_ADD, p.peer_rank);
    if (blockIdx.x == 0) {
      p.result[0] = nvshmem_ptr(p.local, p.peer_rank) != nullptr ? 1ull : 0ull;
      nvshmem_signal_wait_until(p.signal, NVSHMEM_CMP_GE, static_cast<u64>(gridDim.x));
      p.result[1] = 1ull;
    }
  }
}
#endif

}  // namespace epcomm
