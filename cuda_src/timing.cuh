// Benchmark helpers: GPU waits measured in wall time (epcomm.bench's start aligner).
#pragma once
#include "epcomm_common.cuh"

namespace epcomm {

struct SpinParams {
  u64 ns;         // spin_wait_ns: how long to wait (with a deadline: the longest wait allowed);
                  // deadline_stamp: the lead added to the current time
  u64* deadline;  // null, or a %globaltimer value in device memory (see deadline_stamp)
};

// One thread spins on %globaltimer: until `ns` nanoseconds have passed since it started, or,
// with a deadline, until %globaltimer reaches *deadline (at most `ns`, so a deadline far in the
// future cannot hang the benchmark).  A plain spin, no __nanosleep: reading %globaltimer is a
// register read with no memory traffic, the other SMs are untouched, and __nanosleep wakes up
// after an approximate time (up to twice the request), which would add a per-GPU jitter to the
// moment the wait ends.
template <int kThreads>
__global__ void __launch_bounds__(kThreads) spin_wait_ns(const __grid_constant__ SpinParams p) {
  if (threadIdx.x != 0) return;
  const u64 start = globaltimer_ns();
  if (p.deadline != nullptr) {
    const u64 until = ld_volatile_u64(p.deadline);
    for (u64 now = start; now < until && now - start < p.ns; now = globaltimer_ns()) {
    }
    return;
  }
  while (globaltimer_ns() - start < p.ns) {
  }
}

// *deadline = now + ns.  The aligner's "clock" mode stamps this on every GPU, takes the maximum
// over the ranks with an NCCL all-reduce and waits for it (spin_wait_ns with the deadline): every
// GPU then leaves the wait at the same %globaltimer value, however unevenly the all-reduce ended.
template <int kThreads>
__global__ void __launch_bounds__(kThreads) deadline_stamp(const __grid_constant__ SpinParams p) {
  if (threadIdx.x == 0) *p.deadline = globaltimer_ns() + p.ns;
}

}  // namespace epcomm
