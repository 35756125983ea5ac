// epcomm: device helpers shared by every kernel family.
//
// No CUDA toolkit header is needed to compile a kernel that includes only this file: the
// conversions below use PTX directly, so plain (non-NVSHMEM) kernels compile with NVRTC alone.
#pragma once

namespace epcomm {

using i32 = int;
using u32 = unsigned int;
using i64 = long long;
using u64 = unsigned long long;
using u16 = unsigned short;
using u8 = unsigned char;

#define EPCOMM_DEVICE __device__ __forceinline__

constexpr int kWarpSize = 32;

// ---------------------------------------------------------------------------------------------
// Errors and timeouts.  Every kernel that waits on a peer gets an ErrorRecord living in
// host-mapped pinned memory: the first waiter that gives up claims it (code != 0), records
// where it stalled, and every other waiter of every kernel sees `code` and stops waiting, so a
// missing peer ends all kernels within the timeout and the host can raise a precise error
// instead of hanging.
// ---------------------------------------------------------------------------------------------
enum ErrorCode : int {
  kErrNone = 0,
  kErrTimeout = 1,
  kErrOverflow = 2,   // more received tokens than the output has rows (num_worst_tokens)
  kErrBadInput = 3,   // an index out of range seen on the device
  kErrMismatch = 4,   // ranks called a collective with different shapes (channel: which field)
};

// Where a wait stalled.  Mirrored by epcomm/_errstate.py (PHASES) for the host's messages.
enum Phase : int {
  kPhaseLayout = 1,
  kPhaseDispatchNotifyAck = 10,    // notify: waiting until peers consumed our previous writes
  kPhaseDispatchNotifyCounts = 11, // notify: waiting for the peers' token counts
  kPhaseDispatch = 12,             // a bad expert index seen by the dispatch (its record only)
  kPhaseDispatchRecv = 13,         // receive: waiting for a chunk of rows from a peer
  kPhaseCombineSendAck = 20,       // combine: waiting until peers consumed our previous writes
  kPhaseCombineRecv = 21,          // combine: waiting for a chunk of rows from a peer
  kPhaseLLDispatchSendAck = 30,
  kPhaseLLDispatchRecv = 31,
  kPhaseLLDispatchSend = 32,     // a bad expert index seen by the send (its record only)
  kPhaseLLCombineSendAck = 40,
  kPhaseLLCombineRecv = 41,
  kPhaseLLCombineWeights = 42,   // combine send: waiting for a source's weights (partials)
  kPhaseLLCombineReduce = 43,    // a bad expert index seen by the combine's reduction
  kPhaseSmoke = 50,
};

struct ErrorRecord {
  int code;
  int rank;
  int phase;     // a value of the Phase enum of the family that reported it
  int channel;   // chunk / block / expert index: which part stalled
  int peer;      // the rank waited for, or -1
  int pad;
  u64 expected;
  u64 observed;
  // A bad expert index seen on the device has its own slot: the kernels skip the index and go
  // on, so it must neither stop waiters nor keep a later timeout or mismatch from being recorded
  // above (first writer wins there).  bad_code: 0, -1 (being written) or kErrBadInput.
  int bad_code;
  int bad_token;
  u64 bad_limit;   // num_experts, and the phase in the high 32 bits
  u64 bad_value;   // the index seen
};
static_assert(sizeof(ErrorRecord) == 64, "ErrorRecord is mirrored by epcomm/_errstate.py");

EPCOMM_DEVICE u64 globaltimer_ns() {
  u64 t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}

EPCOMM_DEVICE u32 smid() {
  u32 v;
  asm volatile("mov.u32 %0, %%smid;" : "=r"(v));
  return v;
}

EPCOMM_DEVICE int ld_volatile_i32(const int* p) {
  int v;
  asm volatile("ld.volatile.global.s32 %0, [%1];" : "=r"(v) : "l"(p));
  return v;
}

EPCOMM_DEVICE void report_error(ErrorRecord* err, int code, int rank, int phase, int channel,
                                int peer, u64 expected, u64 observed) {
  if (err == nullptr) return;
  if (code == kErrBadInput) {
    if (atomicCAS(&err->bad_code, 0, -1) == 0) {
      err->bad_token = channel;
      // The record has no spare field for the phase: it rides above num_experts (< 2^32).
      err->bad_limit = expected | (static_cast<u64>(phase) << 32);
      err->bad_value = observed;
      __threadfence_system();
      atomicExch(&err->bad_code, code);
      __threadfence_system();
    }
    return;
  }
  if (atomicCAS(&err->code, 0, -1) == 0) {  // -1: claimed, being written
    err->rank = rank;
    err->phase = phase;
    err->channel = channel;
    err->peer = peer;
    err->expected = expected;
    err->observed = observed;
    __threadfence_system();
    atomicExch(&err->code, code);
    __threadfence_system();
  }
}

// ---------------------------------------------------------------------------------------------
// Memory-model helpers (PTX ISA "Memory Consistency Model").  Flags that cross GPUs are
// written with release semantics at system scope after the data, and read with acquire.
// ---------------------------------------------------------------------------------------------
EPCOMM_DEVICE u64 ld_acquire_sys_u64(const u64* p) {
  u64 v;
  asm volatile("ld.acquire.sys.global.u64 %0, [%1];" : "=l"(v) : "l"(p) : "memory");
  return v;
}
EPCOMM_DEVICE int ld_acquire_sys_i32(const int* p) {
  int v;
  asm volatile("ld.acquire.sys.global.s32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
  return v;
}
EPCOMM_DEVICE void st_release_sys_u64(u64* p, u64 v) {
  asm volatile("st.release.sys.global.u64 [%0], %1;" ::"l"(p), "l"(v) : "memory");
}
EPCOMM_DEVICE void st_release_sys_i32(int* p, int v) {
  asm volatile("st.release.sys.global.s32 [%0], %1;" ::"l"(p), "r"(v) : "memory");
}
EPCOMM_DEVICE void st_relaxed_sys_i32(int* p, int v) {
  asm volatile("st.relaxed.sys.global.s32 [%0], %1;" ::"l"(p), "r"(v) : "memory");
}
EPCOMM_DEVICE void st_relaxed_sys_u64(u64* p, u64 v) {
  asm volatile("st.relaxed.sys.global.u64 [%0], %1;" ::"l"(p), "l"(v) : "memory");
}
EPCOMM_DEVICE u64 ld_acquire_gpu_u64(const u64* p) {
  u64 v;
  asm volatile("ld.acquire.gpu.global.u64 %0, [%1];" : "=l"(v) : "l"(p) : "memory");
  return v;
}
EPCOMM_DEVICE void st_release_gpu_u64(u64* p, u64 v) {
  asm volatile("st.release.gpu.global.u64 [%0], %1;" ::"l"(p), "l"(v) : "memory");
}
EPCOMM_DEVICE void fence_sc_sys() { asm volatile("fence.sc.sys;" ::: "memory"); }
EPCOMM_DEVICE void fence_sys() { asm volatile("fence.acq_rel.sys;" ::: "memory"); }
EPCOMM_DEVICE void fence_gpu() { asm volatile("fence.acq_rel.gpu;" ::: "memory"); }

EPCOMM_DEVICE u64 ld_volatile_u64(const u64* p) {
  u64 v;
  asm volatile("ld.volatile.global.u64 %0, [%1];" : "=l"(v) : "l"(p));
  return v;
}

// ---------------------------------------------------------------------------------------------
// Rank masks (shrink mode).  `mask` is this rank's int [R] in memory its peers can write (the
// NVLink buffer or the symmetric heap); null when the Buffer was made without shrink, and then
// every test below folds away.  Entries only go from 0 to 1 inside kernels (the host clears
// them): a masked rank is neither sent to nor waited for.
// ---------------------------------------------------------------------------------------------
EPCOMM_DEVICE bool rank_masked(const int* mask, int r) {
  return mask != nullptr && ld_volatile_i32(mask + r) != 0;
}
EPCOMM_DEVICE void mask_rank(int* mask, int r) {
  if (mask != nullptr && ld_volatile_i32(mask + r) == 0) atomicExch(mask + r, 1);
}

// Shrink mode: the deadline of a wait for something a peer produces only after `hops` waits of
// its own (each of which may run to the shrink timeout on a rank that died), measured from the
// same start as `deadline`.  A shared deadline let a first wait on a dead rank use up the budget
// of the waits after it, which then masked live peers (delayed by the same dead rank) at their
// first timer check.  Without shrink the deadline is unchanged (a timeout is an error anyway).
EPCOMM_DEVICE u64 shrink_deadline(u64 deadline, u64 timeout_ns, int shrink, int hops) {
  return shrink ? deadline + static_cast<u64>(hops) * timeout_ns : deadline;
}

// Results of a wait that may skip a masked peer.
enum WaitResult : int { kWaitFailed = 0, kWaitArrived = 1, kWaitMasked = -1 };

// Spin until *flag >= target (64-bit tags only grow, so >= tolerates a peer that is ahead).
// Returns kWaitFailed (after recording where) on timeout, or if another waiter already gave up.
// With a mask (shrink mode): kWaitMasked once `peer` is masked (by this rank or by a peer that
// published it), and a timeout masks `peer` here instead of recording an error.
// The loop polls with plain volatile loads (served by L2) and takes acquire semantics once at
// the end; the error record lives in host memory, so it and the timer are read only every
// 1024 polls: hundreds of spinning warps reading host memory over PCIe slow the whole GPU down.
EPCOMM_DEVICE int wait_geq_u64_masked(const u64* flag, u64 target, ErrorRecord* err, u64 deadline_ns,
                                      int rank, int phase, int channel, int peer, int* mask) {
  if (ld_acquire_sys_u64(flag) >= target) return kWaitArrived;
  if (rank_masked(mask, peer)) return kWaitMasked;
  for (u32 i = 1;; ++i) {
    const u64 v = ld_volatile_u64(flag);
    if (v >= target) {
      ld_acquire_sys_u64(flag);
      return kWaitArrived;
    }
    if ((i & 1023u) == 0) {
      if (err != nullptr && ld_volatile_i32(&err->code) != 0) return kWaitFailed;
      if (rank_masked(mask, peer)) return kWaitMasked;
      if (globaltimer_ns() > deadline_ns) {
        if (mask != nullptr) {
          mask_rank(mask, peer);
          return kWaitMasked;
        }
        report_error(err, kErrTimeout, rank, phase, channel, peer, target, v);
        return kWaitFailed;
      }
    }
  }
}

// The wait without a mask (shrink off): true once arrived.
EPCOMM_DEVICE bool wait_geq_u64(const u64* flag, u64 target, ErrorRecord* err, u64 deadline_ns,
                                int rank, int phase, int channel, int peer) {
  return wait_geq_u64_masked(flag, target, err, deadline_ns, rank, phase, channel, peer, nullptr) == kWaitArrived;
}

// Should a waiter give up?  Yes once a wait failed or ranks disagreed (`code`); a bad expert
// index (`bad_code`) stops nothing: the kernels skip it and the host raises ValueError later.
EPCOMM_DEVICE bool aborted(const ErrorRecord* err) {
  return err != nullptr && ld_volatile_i32(&err->code) != 0;
}

// ---------------------------------------------------------------------------------------------
// Vector memory access.  `ld_nc` is for inputs nobody writes during the kernel; `ld_cg` reads
// at L2 (the point where NVLink writes from peers land), bypassing a possibly stale L1.
// ---------------------------------------------------------------------------------------------
struct alignas(16) V4 {
  int x, y, z, w;
};

EPCOMM_DEVICE V4 ld_nc_v4(const V4* p) {
  V4 v;
  asm volatile("ld.global.nc.L1::no_allocate.v4.s32 {%0, %1, %2, %3}, [%4];"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "l"(p));
  return v;
}
EPCOMM_DEVICE V4 ld_cg_v4(const V4* p) {
  V4 v;
  asm volatile("ld.global.cg.v4.s32 {%0, %1, %2, %3}, [%4];"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "l"(p));
  return v;
}
EPCOMM_DEVICE void st_v4(V4* p, const V4& v) {
  asm volatile("st.global.v4.s32 [%0], {%1, %2, %3, %4};" ::"l"(p), "r"(v.x), "r"(v.y), "r"(v.z),
               "r"(v.w)
               : "memory");
}
EPCOMM_DEVICE void st_na_v4(V4* p, const V4& v) {
  asm volatile("st.global.L1::no_allocate.v4.s32 [%0], {%1, %2, %3, %4};" ::"l"(p), "r"(v.x),
               "r"(v.y), "r"(v.z), "r"(v.w)
               : "memory");
}

EPCOMM_DEVICE void st_na_v2(void* p, u32 a, u32 b) {
  asm volatile("st.global.L1::no_allocate.v2.u32 [%0], {%1, %2};" ::"l"(p), "r"(a), "r"(b) : "memory");
}
struct alignas(8) U2 {
  u32 x, y;
};
EPCOMM_DEVICE U2 ld_cg_v2(const void* p) {
  U2 v;
  asm volatile("ld.global.cg.v2.u32 {%0, %1}, [%2];" : "=r"(v.x), "=r"(v.y) : "l"(p));
  return v;
}
EPCOMM_DEVICE u64 ld_cg_u64(const u64* p) {
  u64 v;
  asm volatile("ld.global.cg.u64 %0, [%1];" : "=l"(v) : "l"(p));
  return v;
}

// Warp-cooperative copy of one row of kN16 16-byte words (a compile-time size).  Each round
// issues all its loads before its stores, at most 14 words (56 registers) per lane, and the trip
// counts are constants: a row costs ceil(words per lane / 14) memory latencies, where a run-time
// tail loop would cost one latency per leftover word (the asm stores' "memory" clobber keeps
// the next load behind them).
template <int kN16, bool kSrcPeerWritten>
EPCOMM_DEVICE void warp_copy_row(V4* __restrict__ dst, const V4* __restrict__ src, int lane) {
  constexpr int kPerLane = (kN16 + kWarpSize - 1) / kWarpSize;
  constexpr int kRounds = (kPerLane + 13) / 14;
  constexpr int kRound = (kPerLane + kRounds - 1) / kRounds;
#pragma unroll
  for (int r = 0; r < kRounds; ++r) {
    V4 v[kRound];
#pragma unroll
    for (int u = 0; u < kRound; ++u) {
      const int i = (r * kRound + u) * kWarpSize + lane;
      if (i < kN16) v[u] = kSrcPeerWritten ? ld_cg_v4(src + i) : ld_nc_v4(src + i);
    }
#pragma unroll
    for (int u = 0; u < kRound; ++u) {
      const int i = (r * kRound + u) * kWarpSize + lane;
      if (i < kN16) st_na_v4(dst + i, v[u]);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Number formats.  bf16 and e4m3 are handled as raw bits; conversions round to nearest even
// exactly as ml_dtypes does on the host, so device results can be compared bit for bit with
// epcomm.reference.
// ---------------------------------------------------------------------------------------------
EPCOMM_DEVICE float bf16_to_f32(u16 b) { return __uint_as_float(static_cast<u32>(b) << 16); }

EPCOMM_DEVICE u16 f32_to_bf16(float f) {
  u16 r;
  asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(r) : "f"(f));
  return r;
}

// Two floats to two e4m3 bytes (lo in the low byte), round to nearest even, saturating.
EPCOMM_DEVICE u16 f32x2_to_e4m3x2(float lo, float hi) {
  u16 r;
  asm("cvt.rn.satfinite.e4m3x2.f32 %0, %1, %2;" : "=h"(r) : "f"(hi), "f"(lo));
  return r;
}

constexpr float kFp8Max = 448.0f;
constexpr float kFp8AmaxFloor = 1e-4f;

// Scale of one 128-channel group: s = max(amax, 1e-4) / 448, rounded up to a power of two if
// `round_pow2`.  Returns s; *inv receives the multiplier applied before the cast.
// kDeepep: DeepEP V1's arithmetic for the same scale (calculate_fp8_scales,
// csrc/kernels/legacy/utils.cuh): s = amax * float32(1/448), a product by a rounded constant
// instead of one correctly rounded quotient (the last bit of s differs for about half of the amax
// values); with `round_pow2` 2^ceil(log2 s), equal to the default's for every bf16 amax.  The
// multiplier *inv is the same either way.
constexpr float kFp8InvMaxDeepep = 1 / 448.0f;  // 0x3B124925, DeepEP's kFinfoAmaxInvE4M3
template <bool kDeepep = false>
EPCOMM_DEVICE float fp8_group_scale(float amax, bool round_pow2, float* inv) {
  amax = fmaxf(amax, kFp8AmaxFloor);
  float s = kDeepep ? __fmul_rn(amax, kFp8InvMaxDeepep) : __fdiv_rn(amax, kFp8Max);
  if (round_pow2) {
    u32 b = __float_as_uint(s);
    if (b & 0x7FFFFFu) b = (b & 0xFF800000u) + 0x800000u;
    s = __uint_as_float(b);
    *inv = __uint_as_float((254u - (b >> 23)) << 23);  // exact 1/s for a power of two
  } else {
    *inv = __fdiv_rn(kFp8Max, amax);
  }
  return s;
}

EPCOMM_DEVICE u32 ue8m0_of(float pow2_scale) { return (__float_as_uint(pow2_scale) >> 23) & 0xFFu; }

EPCOMM_DEVICE float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}
EPCOMM_DEVICE int warp_sum(int v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// The block's last finisher (a ticket on `counter`) returns true, in every thread of that block;
// the counter resets itself for the next launch.
EPCOMM_DEVICE bool last_block(int* counter) {
  __shared__ int s_last;
  __syncthreads();
  if (threadIdx.x == 0) {
    fence_sys();
    s_last = atomicAdd(counter, 1) == static_cast<int>(gridDim.x) - 1;
    if (s_last) {
      *counter = 0;
      fence_sys();
    }
  }
  __syncthreads();
  return s_last != 0;
}

EPCOMM_DEVICE int lane_id() { return threadIdx.x & 31; }
EPCOMM_DEVICE int warp_id() { return threadIdx.x >> 5; }

}  // namespace epcomm
