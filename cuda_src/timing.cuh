// Benchmark helpers (epcomm.tools.bench's start aligner): GPU waits measured in wall time, and a start
// barrier that lets every GPU of a node leave it at the same moment.
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

// ---------------------------------------------------------------------------------------------
// start_barrier: every rank leaves at the same wall time.  The GPUs' %globaltimer do not agree
// (about half a millisecond apart on 2x H200), so the leader (rank 0) first measures each
// peer's clock offset, NTP-style over peer memory: it stamps t1 and writes a ping into the
// peer's channel, the peer stamps t2 when it sees it and answers, the leader stamps t3 on the
// answer; offset = t2 - (t1 + t3) / 2, kept from the round with the shortest round trip (its
// error is at most half of it, about a microsecond over NVLink).  The leader then picks
// T0 = now + lead and sends every peer T0 in the peer's own clock; everyone spins until then.
// The exchange itself waits for the last rank to arrive, so no host barrier or collective is
// needed before it.  Every wait is bounded by cap_ns (a rank that never comes: the barrier
// gives up, reports aligned = 0 and the caller measures unaligned).
// Channel (u64 words, in every rank's device buffer, mapped by all): peers: [0] ping tag,
// [1] deadline, [2] deadline tag, [3] offset, [4] round trip (the last two for the report);
// leader: [8 + 2r] pong tag from peer r, [9 + 2r] peer r's t2.
// ---------------------------------------------------------------------------------------------
constexpr int kAlignMaxRanks = 72;
constexpr int kAlignRounds = 8;

struct AlignParams {
  u64 chan[kAlignMaxRanks];  // every rank's channel as mapped in this process
  u64 lead_ns;
  u64 cap_ns;
  u64 seq;                   // this barrier's number (1, 2, ...): tags only grow
  i64* report;               // [0] offset of this GPU's clock vs the leader's (ns), [1] best round
                             // trip (ns), [2] 1 if aligned, 0 if a wait hit the cap
  int rank;
  int num_ranks;
};

// Tags only grow, so the library's flag wait serves (no error record: a wait that hits the cap
// just returns false).
EPCOMM_DEVICE bool wait_tag(const u64* w, u64 tag, u64 give_up_at) {
  return wait_geq_u64(w, tag, nullptr, give_up_at, -1, 0, -1, -1);
}

EPCOMM_DEVICE void spin_until_ns(u64 t, u64 give_up_at) {
  for (u64 now = globaltimer_ns(); now < t && now < give_up_at; now = globaltimer_ns()) {
  }
}

template <int kThreads>
__global__ void __launch_bounds__(kThreads) start_barrier(const __grid_constant__ AlignParams p) {
  static_assert(kThreads > kAlignMaxRanks, "one leader thread per peer");
  const int t = threadIdx.x;
  const u64 give_up_at = globaltimer_ns() + p.cap_ns;
  u64* const me = reinterpret_cast<u64*>(p.chan[p.rank]);
  const u64 tag0 = p.seq * 16;
  __shared__ int s_ok;
  __shared__ u64 s_t0, s_rtt;
  if (t == 0) s_ok = 1;
  __syncthreads();
  if (p.rank == 0) {
    // Thread r measures peer r.
    i64 off = 0;
    u64 best = ~0ull;
    const int r = t;
    if (r >= 1 && r < p.num_ranks) {
      u64* peer = reinterpret_cast<u64*>(p.chan[r]);
      for (int i = 0; i < kAlignRounds; ++i) {
        const u64 tag = tag0 + 1 + i;
        const u64 t1 = globaltimer_ns();
        st_release_sys_u64(peer + 0, tag);
        if (!wait_tag(me + 8 + 2 * r, tag, give_up_at)) {
          s_ok = 0;
          break;
        }
        const u64 t3 = globaltimer_ns();
        const u64 t2 = ld_volatile_u64(me + 9 + 2 * r);
        if (t3 - t1 < best) {
          best = t3 - t1;
          off = static_cast<i64>(t2) - static_cast<i64>(t1 + (t3 - t1) / 2);
        }
      }
    }
    if (r == 1) s_rtt = best;
    __syncthreads();
    if (t == 0) s_t0 = globaltimer_ns() + p.lead_ns;
    __syncthreads();
    if (r >= 1 && r < p.num_ranks && s_ok) {
      u64* peer = reinterpret_cast<u64*>(p.chan[r]);
      st_relaxed_sys_u64(peer + 1, static_cast<u64>(static_cast<i64>(s_t0) + off));
      st_relaxed_sys_u64(peer + 3, static_cast<u64>(off));
      st_relaxed_sys_u64(peer + 4, best);
      st_release_sys_u64(peer + 2, tag0);
    }
    if (t == 0) {
      if (s_ok) spin_until_ns(s_t0, give_up_at);
      if (p.report != nullptr) {
        p.report[0] = 0;
        p.report[1] = p.num_ranks >= 2 ? static_cast<i64>(s_rtt) : 0;
        p.report[2] = s_ok;
      }
    }
    return;
  }
  if (t != 0) return;
  // Peer: answer the leader's pings, then wait for the deadline.
  u64* leader = reinterpret_cast<u64*>(p.chan[0]);
  bool ok = true;
  for (int i = 0; i < kAlignRounds && ok; ++i) {
    const u64 tag = tag0 + 1 + i;
    ok = wait_tag(me + 0, tag, give_up_at);
    if (!ok) break;
    const u64 t2 = globaltimer_ns();
    st_relaxed_sys_u64(leader + 9 + 2 * p.rank, t2);
    st_release_sys_u64(leader + 8 + 2 * p.rank, tag);
  }
  if (ok) ok = wait_tag(me + 2, tag0, give_up_at);
  if (ok) spin_until_ns(ld_volatile_u64(me + 1), give_up_at);
  if (p.report != nullptr) {
    p.report[0] = ok ? static_cast<i64>(ld_volatile_u64(me + 3)) : 0;
    p.report[1] = ok ? static_cast<i64>(ld_volatile_u64(me + 4)) : 0;
    p.report[2] = ok ? 1 : 0;
  }
}

}  // namespace epcomm
