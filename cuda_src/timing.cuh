// Benchmark helper: a GPU wait measured in wall time (epcomm.bench's start aligner).
#pragma once
#include "epcomm_common.cuh"

namespace epcomm {

struct SpinParams {
  u64 ns;  // how long to wait
};

// One thread spins on %globaltimer until `ns` nanoseconds have passed since it started.  Every
// GPU leaves it the same wall time after it began, whatever its SM clock (a wait counted in SM
// cycles ends earlier on a GPU that runs faster).  A plain spin, no __nanosleep: reading
// %globaltimer is a register read with no memory traffic, the other SMs are untouched, and
// __nanosleep wakes up after an approximate time (up to twice the request), which would add a
// per-GPU jitter to the moment the wait ends.
template <int kThreads>
__global__ void __launch_bounds__(kThreads) spin_wait_ns(const __grid_constant__ SpinParams p) {
  if (threadIdx.x != 0) return;
  const u64 start = globaltimer_ns();
  while (globaltimer_ns() - start < p.ns) {
  }
}

}  // namespace epcomm
