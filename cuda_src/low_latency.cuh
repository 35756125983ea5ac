// Low-latency dispatch and combine (decoding) on the NVSHMEM symmetric heap.
//
// Design:
// * Two buffer slots per operation type, so two micro-batches can be in flight.  Each slot
//   has its own 64-bit tag (count of uses), advanced by the kernels: graph replays stay valid.
// * Dispatch sends a token ONCE per destination rank (not once per selected expert): the
//   message holds the token's K global expert ids, and the receiver expands it into every local
//   expert it selected.  With top-8 of 256 experts on 2 ranks that is ~4x fewer bytes on the wire.
//   A source writes the message of token t into slot t of its region at the destination, so no
//   slot has to be allocated, and the receiver finds valid slots by their tag (ll_msg_tag: the
//   slot's tag with the slot in its low bit): the packed output order (source rank, then token
//   index) is deterministic.
// * Combine: the expert side reduces a token's rows that it holds into one fp32 partial over
//   NVLink (see "Combine" below); otherwise one row per (token, expert) goes back into slot
//   (t, k) of the source's region.  The source adds in k order (fp32, no FMA: as
//   epcomm.reference.low_latency_combine).
// * Transport per peer: plain stores through the peer's heap pointer when it is reachable over
//   NVLink (peer_base[pe] != 0), otherwise NVSHMEM puts and signals (the RDMA path).  Both are
//   compiled; EPCOMM_LL_FORCE_NVSHMEM_PUT routes every peer through puts.
// * kPhases: 1 = send only (the call with the receive hook), 2 = receive only (the hook),
//   3 = both in one cooperative launch (the default, one launch per call).  A send half waits
//   for nothing but the slot's acknowledgements, except the combine's with partials: it also
//   waits for each NVLink peer's combine to have published its weights.
#pragma once
#include "epcomm_common.cuh"
#include "epcomm_nvshmem.cuh"
#include "logfmt.cuh"

namespace epcomm {

constexpr int kLLMaxRanks = 64;
constexpr int kLLMaxTopk = 32;
constexpr int kLLThreads = 512;
constexpr int kLLWarps = kLLThreads / 32;

struct LLCtrl {
  u64 disp_seq[2];
  u64 comb_seq[2];
  u64 disp_base[2][kLLMaxRanks];  // each source's dispatch arrival counter at its last completion
  u64 comb_base[2][kLLMaxRanks];  // the same for the combine
  int disp_send_done[2];          // tickets of the put destinations' arrivals (ll_arrive)
  int comb_send_done[2];
  int disp_recv_done[2];
  int comb_recv_done[2];
  int failed;  // a receive gave up or found another shape: later kernels do nothing
  int pad;
  u64 layout;  // ll_layout_word of the last call whose receive ended here (0: none)
};

// Hand-off from a sending grid to each receiver (the dispatch and combine flags).  NVLink
// destinations: no grid-wide ticket; every sending block, once its writes are done, adds
// 1 + (G << 32) to the flag of each such destination (G: its grid size; block 0 adds kArrivalReq
// too when it asks receivers to compare shape words).  Put destinations: one add per call of
// the whole grid's count, G + (G G << 32), from the block that takes the last ticket on
// `*_send_done` (see ll_arrive).  With n blocks arrived since the last completion the sum is
// n + (n G << 32) (+ kArrivalReq): complete iff n G == n n, i.e. n == G, so a receiver needs
// no grid size in advance (grids follow the token count).  The receiver's last block stores
// the counter as the new base (LLCtrl.*_base) before acknowledging; the counter never resets
// (modular differences stay exact).  The flag then lands as soon as the slowest block's writes
// do, not after every block has also queued on one counter and a last block re-signalled.
constexpr u64 kArrivalReq = 1ull << 63;

EPCOMM_DEVICE bool ll_arrived(u64 delta) {
  const u64 n = delta & 0xffffffffull;
  const u64 ng = (delta >> 32) & 0x7fffffffull;
  return n != 0 && ng == n * n;
}

struct LLParams {
  u64 peer_base[kLLMaxRanks];  // each rank's heap as mapped here; 0: reach it with NVSHMEM puts
  u8* heap;                    // this rank's heap (symmetric address: valid as a put target too)
  LLCtrl* ctrl;
  ErrorRecord* err;
  u64 disp_flag_off;           // u64 [2][R]: arrival counter of each source (see ll_arrived)
  u64 comb_flag_off;           // u64 [2][R]: arrival counter of each expert-side rank
  u64 disp_ack_off;            // u64 [2][R]: tag up to which each destination consumed our tokens
  u64 comb_ack_off;            // u64 [2][R]
  u64 disp_shape_off;          // u64 [2][R]: the shape word of each source's last dispatch
  u64 disp_region_off;         // [2][R][T] messages
  u64 comb_region_off;         // [2][T][K] bf16 rows
  u64 disp_send_off;           // [2][T] messages: put-path staging
  u64 comb_send_off;           // [2][L][R*T] bf16 rows: zero-copy / put-path staging
  u64 comb_wflag_off;          // u64 [2][R]: tag, when each source's combine weights are here
  u64 comb_w_off;              // f32 [2][R][T][K]: each NVLink source's combine weights
  const u16* x;                // dispatch: [N, H] bf16; combine: [L, R*T, H] bf16
  const i64* topk_idx;         // [N, K]
  const float* topk_weights;   // combine: [N, K]
  u8* recv_x;                  // [L, R*T, payload]
  u8* recv_scales;             // f32 [L][G][R*T], or UE8M0 int32 [L][ceil(G/4)][R*T]
  int* recv_count;             // [L]
  int* recv_src_info;          // [L, R*T]
  int* recv_layout_range;      // [L, R, 2]
  int* recv_src_k;             // [L, R*T]
  int* recv_tok_rows;          // [R*T, K]: packed row (j * R*T + row) of each local (source token, k)
  u64* recv_tok_meta;          // [R*T]: (u32 tag << 32) | mask of the k on this rank, per source token
  int* cumulative_stats;       // [L] or null
  const int* h_count;          // combine: the dispatch's recv_count
  const int* h_range;          // combine: the dispatch's layout range
  const int* h_src_info;
  const int* h_src_k;
  const int* h_tok_rows;       // combine: the dispatch's recv_tok_rows / recv_tok_meta
  const u64* h_tok_meta;
  u16* out;                    // combine: [N, H]
  u64 timeout_ns;
  u64 shape_word;              // this call's (T, H, E, K, FP8 format): epcomm.kernels.low_latency.shape_word
  int rank;
  int num_ranks;
  int num_tokens;
  int num_topk;
  int num_experts;
  int max_tokens;              // T
  int slot;
  int msg_bytes;
  int hdr_bytes;
  int round_scale;
  int use_ue8m0;
  int zero_copy;               // combine: x is the slot's comb_send region
  int force_put;
  int any_put;                 // some peer is reached with puts: quiet before signalling
  int check_shape;             // dispatch receive: compare every source's shape word with ours
  int h_slot;                  // combine: the dispatch slot of the handle
  int partials;                // combine: reduce a token's rows on the expert side (see ll_combine_send)
  u64* prof;                   // EPCOMM_PROFILE: per-block phase stamps, or null
  i64* wait_stats;             // [R]: ns the receive waited for each source, added (ll_wait_arrivals), or null
  u64 lf_meta_off;             // LogFMT combine: u64 [2][T][K][H/128] group words of each arriving row
  u64 lf_stage_off;            // LogFMT combine: u64 [2][L][R*T][H/128] their put-path staging
  u64 mask_off;                // int [R]: the rank mask (shrink mode), at the same offset for every shape
  int shrink;                  // 1: masked ranks are skipped, a peer that times out is masked
  int pad2;
};

// Profiling (EPCOMM_PROFILE=1): thread 0 of block b stamps (globaltimer ns) the end of phase i
// of kernel k (0 dispatch, 1 combine) at prof[(k * kLLProfBlocks + b) * kLLProfSlots + i], when
// the block gets there (after a __syncthreads, so for the whole block).  Phases: see
// epcomm.kernels.low_latency.PROF_PHASES.  Costs one predictable branch per phase otherwise.
constexpr int kLLProfBlocks = 512;
constexpr int kLLProfSlots = 8;
EPCOMM_DEVICE void ll_stamp(const LLParams& p, int kernel, int phase) {
  if (p.prof != nullptr && threadIdx.x == 0 && blockIdx.x < kLLProfBlocks)
    p.prof[(static_cast<u64>(kernel) * kLLProfBlocks + blockIdx.x) * kLLProfSlots + phase] = globaltimer_ns();
}

template <int kHidden, bool kFp8>
struct LLMsg {
  static constexpr int kPayload = kHidden * (kFp8 ? 1 : 2);
  static constexpr int kGroups = kHidden / 128;
};

EPCOMM_DEVICE u8* remote(const LLParams& p, int pe, u64 off) {
  return reinterpret_cast<u8*>(p.peer_base[pe] + off);
}

// Signal a flag word at `pe`: plain release store over NVLink, or an NVSHMEM signal.
EPCOMM_DEVICE void ll_signal(const LLParams& p, int pe, u64 off, u64 value) {
  if (!p.force_put && p.peer_base[pe] != 0) {
    st_release_sys_u64(reinterpret_cast<u64*>(remote(p, pe, off)), value);
  } else {
    nvshmemx_signal_op(reinterpret_cast<u64*>(p.heap + off), value, NVSHMEM_SIGNAL_SET, pe);
  }
}

EPCOMM_DEVICE bool use_put(const LLParams& p, int pe) { return p.force_put || p.peer_base[pe] == 0; }

// The tag a dispatch message carries (its header's first word): the slot's tag (its count of
// uses) shifted left, the slot in the low bit.  The two slots count apart, and where a slot's
// messages sit depends on T and H (slot 1's region starts after slot 0's), so a header that a
// dispatch of another shape left in the other slot can sit exactly where this call reads one,
// holding this slot's current count: with the bare count it would match, and its stale token
// would be received as a row of this call.  With the slot bit no header of the other slot
// matches, and one of the same slot holds an older count.  Every region that holds headers
// (the dispatch regions and the put staging of every shape used) is zeroed when the counts
// restart (clean_low_latency_buffer).  The high 16 bits are 0x7FA5: as a bf16 (bytes 6-7) a NaN
// whose payload no arithmetic makes (its NaNs are 0x7FC0 or 0x7FFF), as e4m3 bytes 0xA5 then a NaN (0x7F),
// as a float32 scale's high half a NaN with a payload (canonical: 0x7FC0), and as an int16
// expert id 32677, which only E > 32677 has (E < 2^15), and then the word's other 48 bits must
// match too: where a message of another shape left payload bytes at a header's place (rows of
// zeros and small FP8 values are common), they do not spell a tag.
EPCOMM_DEVICE u64 ll_msg_tag(u64 tag, int slot) {
  return (0x7FA5ull << 48) | (tag << 1) | static_cast<u64>(slot & 1);
}

// The heap layout of a call (epcomm.kernels.low_latency.HeapLayout: with R, T, H and E place
// every region), as one word; never 0 (T >= 1).
EPCOMM_DEVICE u64 ll_layout_word(const LLParams& p, int hidden) {
  return static_cast<u64>(p.max_tokens) | (static_cast<u64>(hidden / 128) << 20) |
         (static_cast<u64>(p.num_experts) << 30);
}

// This rank's mask (shrink mode; null otherwise, and every mask test folds away).
EPCOMM_DEVICE int* ll_mask(const LLParams& p) {
  return p.shrink ? reinterpret_cast<int*>(p.heap + p.mask_off) : nullptr;
}

// The masked ranks as bits (bit r: rank r), read once where a kernel fixes its view of the mask.
EPCOMM_DEVICE u64 ll_dead_bits(const LLParams& p) {
  const int* mask = ll_mask(p);
  u64 bits = 0;
  if (mask != nullptr)
    for (int r = 0; r < p.num_ranks; ++r)
      if (rank_masked(mask, r)) bits |= 1ull << r;
  return bits;
}

// Shrink mode: every rank this rank masked goes into the mask of every unmasked peer (stores
// over NVLink, puts otherwise), as intra_publish_mask does for the normal mode (docs/design.md,
// "Rank masks").  One thread.
EPCOMM_DEVICE void ll_publish_mask(const LLParams& p) {
  const u64 dead = ll_dead_bits(p);
  if (dead == 0) return;
  for (int r = 0; r < p.num_ranks; ++r) {
    if (!((dead >> r) & 1ull)) continue;
    const u64 off = p.mask_off + static_cast<u64>(r) * 4;
    for (int q = 0; q < p.num_ranks; ++q) {
      if (q == p.rank || ((dead >> q) & 1ull)) continue;
      if (use_put(p, q)) nvshmem_int_p(reinterpret_cast<int*>(p.heap + off), 1, q);
      else st_relaxed_sys_i32(reinterpret_cast<int*>(remote(p, q, off)), 1);
    }
  }
  fence_sys();
  if (p.any_put) nvshmem_quiet();
}

// This block's arrival at every destination's flag [slot][rank], once its writes are done (a
// put destination's after nvshmem_quiet).  NVLink destinations get one add per block, after a
// system fence that orders the whole block's stores (through the barrier) before it; the add
// is NVSHMEM's signal, which uses a native atomic where the two GPUs have them (NVLink) and its
// proxy otherwise.  Put destinations get one add per call, of the whole grid's count, from the
// block that finishes last (a ticket on `counter`): R network signals per call, not R per block.
// `word(d)` runs first, in the signalling thread, in block 0 (NVLink: a receiver that saw every
// block arrive saw block 0's word) or in the ticket's last block (puts): the dispatch's shape word.
template <typename Word>
EPCOMM_DEVICE void ll_arrive(const LLParams& p, u64 flag_off, bool req, int* counter, Word word) {
  __syncthreads();  // the block's writes are done
  const int R = p.num_ranks;
  const u64 G = gridDim.x;
  u64* sig = reinterpret_cast<u64*>(p.heap + flag_off + (static_cast<u64>(p.slot) * R + p.rank) * 8);
  const int* mask = ll_mask(p);
  for (int d = threadIdx.x; d < R; d += blockDim.x) {
    if (use_put(p, d) || rank_masked(mask, d)) continue;
    if (blockIdx.x == 0) word(d);
    fence_sys();
    nvshmemx_signal_op(sig, 1ull + (G << 32) + (req && blockIdx.x == 0 ? kArrivalReq : 0), NVSHMEM_SIGNAL_ADD, d);
  }
  if (p.any_put && last_block(counter)) {
    for (int d = threadIdx.x; d < R; d += blockDim.x) {
      if (!use_put(p, d) || rank_masked(mask, d)) continue;
      word(d);
      nvshmemx_signal_op(sig, G + ((G * G) << 32) + (req ? kArrivalReq : 0), NVSHMEM_SIGNAL_ADD, d);
    }
  }
}

// Thread r < R of the block waits until every block of source r's current call has arrived at
// flag [slot][r] (base: the counters at the previous completion).  A source whose block 0
// asked for the shape check sets *req (shared) to 1.  Shrink mode: a masked source is not
// waited for, one that times out is masked; *dead gets the masked ranks (bits) after the waits,
// the block's view of the mask for the rest of the call (0 without shrink).
EPCOMM_DEVICE bool ll_wait_arrivals(const LLParams& p, u64 flag_off, const u64* base, int phase, u64 deadline,
                                    u64* dead, int* req = nullptr) {
  __shared__ int s_ok;
  __shared__ u64 s_dead;
  int* const mask = ll_mask(p);
  if (threadIdx.x == 0) s_ok = 1;
  __syncthreads();
  const int R = p.num_ranks;
  // Block 0 times its waits for the caller's statistics (every block waits for the same flags).
  const bool timed = p.wait_stats != nullptr && blockIdx.x == 0;
  for (int r = threadIdx.x; r < R; r += blockDim.x) {
    const u64* f = reinterpret_cast<const u64*>(p.heap + flag_off) + p.slot * R + r;
    const u64 b = base[p.slot * kLLMaxRanks + r];
    const u64 t0 = timed ? globaltimer_ns() : 0;
    // Acquire polls (the value that completes the wait is already acquired: no second round
    // trip after it, ~0.5 us of the hand-off); host memory (the error record) and the timer
    // only every 1024 polls.
    u64 v = ld_acquire_sys_u64(f);
    for (u32 i = 1; !ll_arrived(v - b) && !rank_masked(mask, r); ++i) {
      if ((i & 1023u) == 0) {
        if (aborted(p.err)) { s_ok = 0; break; }
        // Never this rank itself (its own blocks' arrival is late: a local fault, reported).
        if (mask != nullptr && r != p.rank && globaltimer_ns() > deadline) {
          mask_rank(mask, r);
          break;
        }
        if (globaltimer_ns() > deadline) {  // the peer's blocks: expected (0: unknown), arrived
          const u64 n = (v - b) & 0xffffffffull;
          report_error(p.err, kErrTimeout, p.rank, phase, p.slot, r, n ? (((v - b) >> 32) & 0x7fffffffull) / n : 0, n);
          s_ok = 0;
          break;
        }
      }
      v = ld_acquire_sys_u64(f);
    }
    if (s_ok && req != nullptr && ((v - b) & kArrivalReq)) *req = 1;
    if (timed && ll_arrived(v - b))
      atomicAdd(reinterpret_cast<unsigned long long*>(p.wait_stats + r), globaltimer_ns() - t0);
  }
  __syncthreads();
  if (threadIdx.x == 0) s_dead = ll_dead_bits(p);
  __syncthreads();
  *dead = s_dead;
  return s_ok != 0;
}

// The receiver's last block, before acknowledging: the counters as they stand now (complete,
// and no source adds more before our acknowledgement) are the next call's bases.  Thread r
// reads flag r and then sends rank r's acknowledgement (the acquire orders the two).
EPCOMM_DEVICE void ll_rebase(const LLParams& p, u64 flag_off, u64* base) {
  const int R = p.num_ranks;
  for (int r = threadIdx.x; r < R; r += blockDim.x)
    base[p.slot * kLLMaxRanks + r] = ld_acquire_sys_u64(reinterpret_cast<const u64*>(p.heap + flag_off) + p.slot * R + r);
}

// Regions of different layouts overlap (a shape's dispatch messages can sit where another's
// combine rows do), and the acknowledgements a send waits for cover only the previous call of
// its own operation and slot: when this rank's last receive ended, a peer may still be reading
// its own copy of that call (its receive ends after ours), and a send of another layout would
// write over it.  So before a send writes into its peers with a layout other than that of the
// last call received here (`prev`, LLCtrl.layout at the kernel's start), each of this thread's
// (peer, operation, slot) waits until the peer acknowledged every receive that ended here.
// Those receives need nothing from this rank's later calls, so the wait ends; while the layout
// stays it is one comparison.  A receive still pending in a hook is not covered: the host
// refuses a call of another layout meanwhile (LowLatencyState.check_hooks).  Returns false if
// a wait failed (recorded).
EPCOMM_DEVICE bool ll_wait_layout_quiet(const LLParams& p, u64 prev, u64 layout, u64 deadline, int phase) {
  if (prev == layout) return true;
  const int R = p.num_ranks;
  bool ok = true;
  for (int i = threadIdx.x; i < 4 * R; i += blockDim.x) {
    const int d = i % R, s = (i / R) & 1;
    const bool comb = i >= 2 * R;
    const u64 done = ld_volatile_u64(comb ? &p.ctrl->comb_seq[s] : &p.ctrl->disp_seq[s]);
    const u64* ack = reinterpret_cast<const u64*>(p.heap + (comb ? p.comb_ack_off : p.disp_ack_off)) + s * R + d;
    if (wait_geq_u64_masked(ack, done, p.err, deadline, p.rank, phase, s, d, ll_mask(p)) == kWaitFailed) ok = false;
  }
  return ok;
}

// After ll_wait_arrivals on the dispatch flags (thread r acquired source r's flag, so it sees
// the shape words its blocks wrote before arriving): does every source's dispatch have our shape?  A source with
// another T, H, E, top-k or format wrote its messages with another layout; the first difference
// is recorded (kErrMismatch: both words, decoded by the host) and the block reads nothing.  The
// host asks for it on the first dispatch of each shape in each slot (not in the fast paths), and
// so does any source whose block 0 added kArrivalReq.
EPCOMM_DEVICE bool ll_shapes_agree(const LLParams& p, u64 dead) {
  __shared__ int s_bad;
  if (threadIdx.x == 0) s_bad = 0;
  __syncthreads();
  const int R = p.num_ranks;
  for (int r = threadIdx.x; r < R; r += blockDim.x) {
    if ((dead >> r) & 1ull) continue;  // a masked source's word may be stale
    const u64 theirs = ld_volatile_u64(reinterpret_cast<const u64*>(p.heap + p.disp_shape_off) + p.slot * R + r);
    if (theirs != p.shape_word) {
      report_error(p.err, kErrMismatch, p.rank, kPhaseLLDispatchRecv, p.slot, r, p.shape_word, theirs);
      s_bad = 1;
    }
  }
  __syncthreads();
  return s_bad == 0;
}

// ------------------------------------------------------------------------------------------
// Dispatch.
// ------------------------------------------------------------------------------------------
template <int kHidden, bool kFp8, bool kDeepepScale>
EPCOMM_DEVICE void ll_dispatch_send(const LLParams& p, u64 tag, u64 prev_layout, u64 deadline) {
  using Msg = LLMsg<kHidden, kFp8>;
  const int R = p.num_ranks, K = p.num_topk, N = p.num_tokens, T = p.max_tokens;
  const int L = p.num_experts / R;
  const int lane = lane_id(), warp = warp_id();
  __shared__ int s_ok;
  if (threadIdx.x == 0) s_ok = 1;
  __syncthreads();
  // The destinations must have consumed this slot's previous tokens from us.
  __shared__ u64 s_dead;
  for (int d = threadIdx.x; d < R; d += blockDim.x) {
    const u64* ack = reinterpret_cast<const u64*>(p.heap + p.disp_ack_off) + p.slot * R + d;
    if (wait_geq_u64_masked(ack, tag - 1, p.err, deadline, p.rank, kPhaseLLDispatchSendAck, p.slot, d, ll_mask(p)) ==
        kWaitFailed)
      s_ok = 0;
  }
  // A peer's receive of that call may wait for others itself: one timeout more (shrink_deadline).
  if (!ll_wait_layout_quiet(p, prev_layout, ll_layout_word(p, kHidden),
                            shrink_deadline(deadline, p.timeout_ns, p.shrink, 1), kPhaseLLDispatchSendAck))
    s_ok = 0;
  __syncthreads();
  if (threadIdx.x == 0) s_dead = ll_dead_bits(p);
  __syncthreads();
  ll_stamp(p, 0, 1);
  const bool ok = s_ok != 0;
  const u64 dead = s_dead;  // shrink mode: masked ranks' experts are sent nothing
  const u64 region = p.disp_region_off + (static_cast<u64>(p.slot) * R + p.rank) * T * p.msg_bytes;
  const u64 msg_tag = ll_msg_tag(tag, p.slot);
  // Token t is sent by all warps of block t % grid, each taking every kLLWarps-th 32-word step
  // of the row: a token then costs one or two memory latencies, not the 7 or more of a single
  // warp walking the whole row (decode batches have fewer tokens than the GPU has SMs).
  for (int t = blockIdx.x; ok && t < N; t += gridDim.x) {
    // Distinct destination ranks of this token (lane k looks at expert k).
    i64 e = -1;
    if (lane < K) e = p.topk_idx[static_cast<i64>(t) * K + lane];
    const bool valid = lane < K && e >= 0 && e < p.num_experts;
    // Out of range: skipped like -1, and recorded for the host's next check (the host check
    // is off in production: EPCOMM_CHECK_INDICES=0).
    if (warp == 0 && (e < -1 || e >= p.num_experts))
      report_error(p.err, kErrBadInput, p.rank, kPhaseLLDispatchSend, t, -1, static_cast<u64>(p.num_experts),
                   static_cast<u64>(e));
    const int r = valid ? static_cast<int>(e) / L : -1 - lane;  // invalid lanes never match
    const unsigned same = __match_any_sync(0xffffffffu, r);
    const bool leader = valid && (__ffs(same) - 1) == lane && !((dead >> r) & 1ull);
    const unsigned dests = __ballot_sync(0xffffffffu, leader);
    // Message = [ll_msg_tag u64][K int16 global expert ids][pad][payload][scales].
    const u64 msg_off = region + static_cast<u64>(t) * p.msg_bytes;
    u8* staging = p.heap + p.disp_send_off + (static_cast<u64>(p.slot) * T + t) * p.msg_bytes;
    // Every destination gets identical bytes; targets: peer pointers, and the local staging
    // copy if any destination is reached with puts.
    u8* tgt[kLLMaxTopk + 1];  // distinct destinations (<= K) + the put staging copy
    int ntgt = 0;
    bool any_put = false;
    for (unsigned m = dests; m; m &= m - 1) {
      const int d = __shfl_sync(0xffffffffu, r, __ffs(m) - 1);
      if (use_put(p, d)) any_put = true;
      else tgt[ntgt++] = remote(p, d, msg_off);
    }
    if (any_put) tgt[ntgt++] = staging;
    if (warp == 0) {
      for (int i = 0; i < ntgt; ++i) {
        u8* m = tgt[i];
        if (lane == 0) *reinterpret_cast<u64*>(m) = msg_tag;
        if (lane < K) reinterpret_cast<short*>(m + 8)[lane] = valid ? static_cast<short>(e) : static_cast<short>(-1);
      }
    }
    const u16* xrow = p.x + static_cast<i64>(t) * kHidden;
    constexpr int kV = kHidden / 8;            // 16-byte words of the bf16 row
    constexpr int kSteps = (kV + 31) / 32;     // warp-wide steps over the row
    constexpr int kPerWarp = (kSteps + kLLWarps - 1) / kLLWarps;
    constexpr int kPipe = kPerWarp < 4 ? kPerWarp : 4;  // steps whose loads are issued together
    for (int i0 = 0; i0 < kPerWarp; i0 += kPipe) {
      V4 wv[kPipe];
#pragma unroll
      for (int u = 0; u < kPipe; ++u) {
        const int st = (i0 + u) * kLLWarps + warp;
        const int v = st * 32 + lane;
        wv[u] = V4{0, 0, 0, 0};
        if (i0 + u < kPerWarp && st < kSteps && v < kV) wv[u] = ld_nc_v4(reinterpret_cast<const V4*>(xrow) + v);
      }
#pragma unroll
      for (int u = 0; u < kPipe; ++u) {
        const int st = (i0 + u) * kLLWarps + warp;
        if (i0 + u >= kPerWarp || st >= kSteps) break;  // warp-uniform
        const int v = st * 32 + lane;
        const bool in = v < kV;
        const V4 w = wv[u];
        if constexpr (!kFp8) {
          if (in)
            for (int i = 0; i < ntgt; ++i) st_na_v4(reinterpret_cast<V4*>(tgt[i] + p.hdr_bytes) + v, w);
        } else {
          const u32 ww[4] = {static_cast<u32>(w.x), static_cast<u32>(w.y), static_cast<u32>(w.z), static_cast<u32>(w.w)};
          float f[8];
          float amax = 0.0f;
#pragma unroll
          for (int j = 0; j < 4; ++j) {
            f[2 * j] = bf16_to_f32(static_cast<u16>(ww[j] & 0xFFFFu));
            f[2 * j + 1] = bf16_to_f32(static_cast<u16>(ww[j] >> 16));
            amax = fmaxf(amax, fmaxf(fabsf(f[2 * j]), fabsf(f[2 * j + 1])));
          }
          // 16 lanes hold one 128-channel group.
#pragma unroll
          for (int o = 8; o > 0; o >>= 1) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, o));
          float inv;
          const float sc = fp8_group_scale<kDeepepScale>(amax, p.round_scale || p.use_ue8m0, &inv);
          u32 q[2];
#pragma unroll
          for (int j = 0; j < 2; ++j) {
            const u16 lo = f32x2_to_e4m3x2(__fmul_rn(f[4 * j], inv), __fmul_rn(f[4 * j + 1], inv));
            const u16 hi = f32x2_to_e4m3x2(__fmul_rn(f[4 * j + 2], inv), __fmul_rn(f[4 * j + 3], inv));
            q[j] = static_cast<u32>(lo) | (static_cast<u32>(hi) << 16);
          }
          if (in) {
            const int g = v / 16;
            for (int i = 0; i < ntgt; ++i) {
              u8* m = tgt[i];
              *reinterpret_cast<uint2*>(m + p.hdr_bytes + static_cast<u64>(v) * 8) = make_uint2(q[0], q[1]);
              if ((lane & 15) == 0) {
                u8* scp = m + p.hdr_bytes + Msg::kPayload;
                if (p.use_ue8m0) scp[g] = static_cast<u8>(ue8m0_of(sc));
                else reinterpret_cast<float*>(scp)[g] = sc;
              }
            }
          }
        }
      }
    }
    // Puts from the staging copy (written by every warp).
    if (any_put) {  // block-uniform: every warp computed the same destinations
      __syncthreads();
      if (warp == 0) {
        for (unsigned m = dests; m; m &= m - 1) {
          const int d = __shfl_sync(0xffffffffu, r, __ffs(m) - 1);
          if (use_put(p, d)) {
            __syncwarp();
            nvshmemx_putmem_nbi_warp(p.heap + msg_off, staging, p.msg_bytes, d);
          }
        }
      }
    }
  }
  // Every message's bytes must be delivered before its destination sees the flag.
  if (p.any_put) nvshmem_quiet();
  __syncthreads();
  ll_stamp(p, 0, 2);
  // A block whose acknowledgement wait failed does not arrive: its destinations time out and
  // report, rather than count it into a call (or the previous one, not yet rebased).
  if (!ok) return;
  // Our shape word, then the arrival, by the same thread.
  const u64 shape_at = p.disp_shape_off + (static_cast<u64>(p.slot) * R + p.rank) * 8;
  ll_arrive(p, p.disp_flag_off, p.check_shape != 0, &p.ctrl->disp_send_done[p.slot], [&](int d) {
    if (use_put(p, d)) {
      nvshmem_uint64_p(reinterpret_cast<u64*>(p.heap + shape_at), p.shape_word, d);
      nvshmem_fence();
    } else {
      *reinterpret_cast<u64*>(remote(p, d, shape_at)) = p.shape_word;
    }
  });
  ll_stamp(p, 0, 3);
}

// Component c (compile-time after unrolling) of a 16-byte word.
EPCOMM_DEVICE int v4_get(const V4& v, int c) { return c == 0 ? v.x : c == 1 ? v.y : c == 2 ? v.z : v.w; }

// Does the message at m carry this round's tag (`tag`: ll_msg_tag's), and which of its K
// expert ids (lowest k) is my_e?  Returns that k, or -1; *local gets the mask of the k whose
// expert lies in [lo, hi) (this rank's experts).  The tag and every id are loaded together
// (five 16-byte loads at most, at L2 where peers' writes land) so a slot costs one memory
// latency, not two.
EPCOMM_DEVICE int ll_msg_match(const u8* m, u64 tag, int K, int my_e, int lo, int hi, u32* local) {
  constexpr int kHdrWords = (8 + 2 * kLLMaxTopk + 15) / 16;
  const int nw = (8 + 2 * K + 15) / 16;
  V4 w[kHdrWords];
#pragma unroll
  for (int i = 0; i < kHdrWords; ++i)
    if (i < nw) w[i] = ld_cg_v4(reinterpret_cast<const V4*>(m) + i);
  const u64 got = static_cast<u64>(static_cast<u32>(w[0].x)) | (static_cast<u64>(static_cast<u32>(w[0].y)) << 32);
  *local = 0;
  if (got != tag) return -1;
  int kk = -1;
  u32 mask = 0;
#pragma unroll
  for (int k = kLLMaxTopk - 1; k >= 0; --k) {
    if (k < K) {
      const int word = 2 + k / 2;  // id k sits at byte 8 + 2k
      const int v = v4_get(w[word / 4], word % 4);
      const short id = static_cast<short>((k & 1) ? (v >> 16) : (v & 0xFFFF));
      if (id == my_e) kk = k;
      if (id >= lo && id < hi) mask |= 1u << k;
    }
  }
  *local = mask;
  return kk;
}

template <int kHidden, bool kFp8>
EPCOMM_DEVICE void ll_dispatch_recv(const LLParams& p, u64 tag, u64 deadline) {
  using Msg = LLMsg<kHidden, kFp8>;
  const int R = p.num_ranks, K = p.num_topk, T = p.max_tokens;
  const int L = p.num_experts / R;
  const int RT = R * T;
  const int lane = lane_id(), warp = warp_id();
  const int NG = (T + 31) / 32;  // 32-slot groups per source
  // Dynamic shared memory (epcomm.kernels.low_latency.dispatch_smem_bytes): [R*NG] row counts then
  // prefixes, [R*T] packed row list, [R*T] matching k of every slot (-1: none).
  extern __shared__ int s_dyn[];
  int* s_base = s_dyn;
  u32* s_rows = reinterpret_cast<u32*>(s_dyn + R * NG);
  signed char* s_kk = reinterpret_cast<signed char*>(s_rows + RT);
  __shared__ int s_range[kLLMaxRanks][2];
  __shared__ int s_total;
  __shared__ int s_req;
  if (threadIdx.x == 0) s_req = 0;
  u64 dead = 0;  // shrink mode: sources masked; their slots are not read
  if (!ll_wait_arrivals(p, p.disp_flag_off, &p.ctrl->disp_base[0][0], kPhaseLLDispatchRecv, deadline, &dead, &s_req) ||
      ((p.check_shape || s_req) && !ll_shapes_agree(p, dead))) {
    // Recorded; the outputs were not written, so no later kernel may use them.
    if (threadIdx.x == 0) p.ctrl->failed = 1;
    return;
  }
  ll_stamp(p, 0, 4);
  const u8* region = p.heap + p.disp_region_off + static_cast<u64>(p.slot) * R * T * p.msg_bytes;
  const u64 msg_tag = ll_msg_tag(tag, p.slot);
  for (int j = blockIdx.x; j < L; j += gridDim.x) {
    const int my_e = p.rank * L + j;
    // Pass 1 (global memory): the matching k of every slot, and rows per (source, 32-slot group).
    for (int item = warp; item < R * NG; item += kLLWarps) {
      const int s = item / NG, g = item % NG;
      const int t = g * 32 + lane;
      int kk = -1;
      if (t < T && !((dead >> s) & 1ull)) {
        u32 local;
        kk = ll_msg_match(region + (static_cast<u64>(s) * T + t) * p.msg_bytes, msg_tag, K, my_e, p.rank * L,
                          p.rank * L + L, &local);
        // The block of the token's first local expert records which k are here, for the combine.
        if (kk >= 0 && kk == __ffs(local) - 1)
          p.recv_tok_meta[s * T + t] = (static_cast<u64>(static_cast<u32>(tag)) << 32) | local;
      }
      // Every slot pass 2 reads, a masked source's too (-1): shared memory holds whatever an
      // earlier kernel left there, which pass 2 would place as rows over the live sources' ones.
      if (t < T) s_kk[s * T + t] = static_cast<signed char>(kk);
      const unsigned b = __ballot_sync(0xffffffffu, kk >= 0);
      if (lane == 0) s_base[item] = __popc(b);
    }
    __syncthreads();
    ll_stamp(p, 0, 5);
    if (threadIdx.x == 0) {
      int acc = 0;
      for (int s = 0; s < R; ++s) {
        s_range[s][0] = acc;
        for (int g = 0; g < NG; ++g) {
          const int c = s_base[s * NG + g];
          s_base[s * NG + g] = acc;
          acc += c;
        }
        s_range[s][1] = acc - s_range[s][0];
      }
      s_total = acc;
      p.recv_count[j] = acc;
      if (p.cumulative_stats != nullptr) atomicAdd(p.cumulative_stats + j, acc);
    }
    __syncthreads();
    for (int s = threadIdx.x; s < R; s += blockDim.x) {
      p.recv_layout_range[(static_cast<i64>(j) * R + s) * 2] = s_range[s][0];
      p.recv_layout_range[(static_cast<i64>(j) * R + s) * 2 + 1] = s_range[s][1];
    }
    // Pass 2 (shared memory): every matching slot learns its packed position; the (message, k)
    // of each position goes to the row list, then all warps copy rows in parallel.
    for (int item = warp; item < R * NG; item += kLLWarps) {
      const int s = item / NG, g = item % NG;
      const int t = g * 32 + lane;
      const int kk = t < T ? s_kk[s * T + t] : -1;
      const unsigned b = __ballot_sync(0xffffffffu, kk >= 0);
      if (kk >= 0) {
        const int row = s_base[item] + __popc(b & ((1u << lane) - 1u));
        s_rows[row] = (static_cast<u32>(s * T + t) << 5) | static_cast<u32>(kk);
        const i64 out_row = static_cast<i64>(j) * RT + row;
        p.recv_src_info[out_row] = t;
        p.recv_src_k[out_row] = kk;
        p.recv_tok_rows[(static_cast<i64>(s) * T + t) * K + kk] = static_cast<int>(out_row);
      }
    }
    __syncthreads();
    ll_stamp(p, 0, 6);
    const int nrows = s_total;
    for (int row = warp; row < nrows; row += kLLWarps) {
      const u32 code = s_rows[row];
      const u8* m = region + static_cast<u64>(code >> 5) * p.msg_bytes;
      const i64 out_row = static_cast<i64>(j) * RT + row;
      warp_copy_row<Msg::kPayload / 16, true>(reinterpret_cast<V4*>(p.recv_x + out_row * Msg::kPayload),
                                              reinterpret_cast<const V4*>(m + p.hdr_bytes), lane);
      if constexpr (kFp8) {
        const u8* sc = m + p.hdr_bytes + Msg::kPayload;
        if (p.use_ue8m0) {
          const int nw = (Msg::kGroups + 3) / 4;
          for (int w = lane; w < nw; w += 32)
            reinterpret_cast<int*>(p.recv_scales)[(static_cast<i64>(j) * nw + w) * RT + row] =
                reinterpret_cast<const int*>(sc)[w];
        } else {
          for (int g2 = lane; g2 < Msg::kGroups; g2 += 32)
            reinterpret_cast<float*>(p.recv_scales)[(static_cast<i64>(j) * Msg::kGroups + g2) * RT + row] =
                reinterpret_cast<const float*>(sc)[g2];
        }
      }
    }
    __syncthreads();
  }
  if (last_block(&p.ctrl->disp_recv_done[p.slot])) {
    ll_rebase(p, p.disp_flag_off, &p.ctrl->disp_base[0][0]);
    if (threadIdx.x == 0) ll_publish_mask(p);
    __syncthreads();
    for (int s = threadIdx.x; s < R; s += blockDim.x)
      if (!((dead >> s) & 1ull)) ll_signal(p, s, p.disp_ack_off + (static_cast<u64>(p.slot) * R + p.rank) * 8, tag);
    if (threadIdx.x == 0) {
      p.ctrl->disp_seq[p.slot] = tag;
      p.ctrl->layout = ll_layout_word(p, kHidden);
    }
  }
  ll_stamp(p, 0, 7);
}

// kDeepepScale: the FP8 scales in DeepEP V1's arithmetic (fp8_group_scale<true>).
template <int kHidden, bool kFp8, int kPhases, bool kDeepepScale = false>
__global__ void __launch_bounds__(kLLThreads) ll_dispatch(const __grid_constant__ LLParams p) {
  __shared__ u64 s_tag;
  __shared__ u64 s_layout;
  __shared__ int s_failed;
  if (threadIdx.x == 0) {
    s_tag = *reinterpret_cast<volatile u64*>(&p.ctrl->disp_seq[p.slot]) + 1;
    s_layout = *reinterpret_cast<volatile u64*>(&p.ctrl->layout);
    s_failed = *reinterpret_cast<volatile int*>(&p.ctrl->failed);
  }
  __syncthreads();
  if (s_failed) return;
  ll_stamp(p, 0, 0);
  const u64 tag = s_tag;
  const u64 deadline = globaltimer_ns() + p.timeout_ns;
  if (kPhases & 1) ll_dispatch_send<kHidden, kFp8, kDeepepScale>(p, tag, s_layout, deadline);
  // A source arrives after its acknowledgement waits, and after a layout's quiet wait (one more
  // timeout) where the layout changed (shrink_deadline).
  const int hops = 1 + (kPhases == 3 && s_layout != ll_layout_word(p, kHidden));
  if (kPhases & 2) ll_dispatch_recv<kHidden, kFp8>(p, tag, shrink_deadline(deadline, p.timeout_ns, p.shrink, hops));
}

// ------------------------------------------------------------------------------------------
// Combine.
//
// A source token (s, t) has c of its K experts on this rank.  With c >= 2 and the source
// reached over NVLink ("partials", the default), this rank reduces those c rows itself,
// weighted (fp32, k ascending, no FMA), and sends one fp32 partial row: channels [0, H/2) into
// slot (t, k1) of the source's region, [H/2, H) into slot (t, k2), k1 < k2 the two lowest such
// k (a bf16 row slot holds H/2 fp32).  That is never more bytes than the c bf16 rows, and c/2
// times fewer (top-8 of 256 experts on 2 ranks: c ~ 4, half the NVLink bytes).  The weights
// are the source's combine arguments: block 0 of every rank's combine copies its [N, K]
// weights into each NVLink peer first and raises a flag there.  A token with c == 1, and every
// peer reached with NVSHMEM puts, gets one bf16 row per (token, k) in slot (t, k), as DeepEP's
// low-latency combine does; the source then adds everything in k order, a partial at its k1.
// ------------------------------------------------------------------------------------------

// Does the expert-side rank `peer` (or, at the expert side, the source `peer`) reduce a token's
// c rows into one partial?  Both ends decide alike: `partials` and force_put are in the
// dispatch's shape word (ranks that differ raise there), and NVLink reachability is symmetric.
EPCOMM_DEVICE bool ll_partial(const LLParams& p, int peer, int c) {
  return p.partials && c >= 2 && !use_put(p, peer);
}

// 16-byte words per lane in a combine work item (both halves): 2 = 512 channels, so a decode
// batch has about as many items as the GPU has warps (fewer rounds of memory latency).
constexpr int kLLCombW = 2;

EPCOMM_DEVICE V4 f32x4_as_v4(float a, float b, float c, float d) {
  return V4{__float_as_int(a), __float_as_int(b), __float_as_int(c), __float_as_int(d)};
}

// Combine variants (the kMode template argument of ll_combine; 0: the default above).
// * kLLCombFma: DeepEP V1's sum at the source, acc = fma(x, w, acc) in k order (nvcc contracts
//   DeepEP's `accum += x * weight` into one FFMA); the host turns partials off for it, so every
//   row arrives as its own bf16 row.
// * kLLCombLogfmt: every row travels in LogFMT-10 (logfmt.cuh), also without partials; with
//   kLLCombFma too, it is summed with FMA.
constexpr int kLLCombFma = 1;
constexpr int kLLCombLogfmt = 2;

template <bool kFma>
EPCOMM_DEVICE float ll_acc(float acc, float w, float x) {
  if constexpr (kFma) return __fmaf_rn(x, w, acc);
  else return __fadd_rn(acc, __fmul_rn(w, x));
}

// ---- LogFMT rows ---------------------------------------------------------------------------
// Row (s, t, k) goes to slot (t, k) of the source's region as its groups in order, each 160
// bytes (cast) or 256 (bf16), packed without gaps; group g's u64 word at [slot][t][k][g] of the
// source's LogFMT region holds its byte offset (high half) and, if cast, its bf16 amax | amin << 16
// (low half; 0: not cast).  A warp encodes a whole row, 1024 channels a step (lane: 32, 4 lanes
// a group), so the offsets follow from a running count of cast groups.  NVLink: stores straight
// into the source; puts: the row and its words staged in this rank's heap, one put each.
// A lane's 40 cast bytes start 8 bytes past a 16-byte boundary for odd lanes of the group: they
// move as (v4, v4, v2) from an even lane, (v2, v4, v4) from an odd one.
template <int kHidden>
EPCOMM_DEVICE void ll_logfmt_send_row(const LLParams& p, const float* tab, int s, int t, int k, int row) {
  constexpr int kRow = kHidden * 2;
  constexpr int kG = kHidden / kLogfmtGroup;
  constexpr int kSteps = (kHidden + 1023) / 1024;
  const int lane = lane_id(), q = lane & 3;
  const int R = p.num_ranks, K = p.num_topk, T = p.max_tokens;
  const i64 nrows = static_cast<i64>(p.num_experts / R) * R * T;
  const u64 slot_row = (static_cast<u64>(p.slot) * T + t) * K + k;
  const u64 data_off = p.comb_region_off + slot_row * kRow;
  const u64 meta_off = p.lf_meta_off + slot_row * kG * 8;
  const bool put = use_put(p, s);
  const u64 stage_row = static_cast<u64>(p.slot) * nrows + row;
  u8* data = put ? p.heap + p.comb_send_off + stage_row * kRow : remote(p, s, data_off);
  u64* meta = reinterpret_cast<u64*>(put ? p.heap + p.lf_stage_off + stage_row * kG * 8 : remote(p, s, meta_off));
  const V4* src = reinterpret_cast<const V4*>(reinterpret_cast<const u8*>(p.x) + static_cast<i64>(row) * kRow);
  u32 before = 0;  // cast groups of the steps done (warp-uniform)
#pragma unroll 1
  for (int step = 0; step < kSteps; ++step) {
    const int ch0 = step * 1024 + lane * 32;
    const bool in = ch0 < kHidden;  // a whole group is in or out (kHidden % 128 == 0)
    u32 w[16];
    u32 mx = 0, mn = 0xFFFFFFFFu;  // per bf16 half: max and min magnitude
#pragma unroll
    for (int u = 0; u < 4; ++u) {
      const V4 v = in ? ld_nc_v4(src + ch0 / 8 + u) : V4{0, 0, 0, 0};
      w[4 * u] = static_cast<u32>(v.x), w[4 * u + 1] = static_cast<u32>(v.y);
      w[4 * u + 2] = static_cast<u32>(v.z), w[4 * u + 3] = static_cast<u32>(v.w);
    }
#pragma unroll
    for (int j = 0; j < 16; ++j) {
      mx = __vmaxu2(mx, w[j] & 0x7FFF7FFFu);
      mn = __vminu2(mn, w[j] & 0x7FFF7FFFu);
    }
    u32 amax = max(mx & 0xFFFFu, mx >> 16), amin = min(mn & 0xFFFFu, mn >> 16);
#pragma unroll
    for (int o = 1; o < 4; o <<= 1) {
      amax = max(amax, __shfl_xor_sync(0xffffffffu, amax, o));
      amin = min(amin, __shfl_xor_sync(0xffffffffu, amin, o));
    }
    const LogfmtGroup g = logfmt_group(tab, amax, amin);
    const bool cast = in && g.cast;
    const u32 lead = __ballot_sync(0xffffffffu, cast && q == 0);
    const int gi = step * 8 + (lane >> 2);
    const u32 off = kLogfmtRawBytes * gi -
                    (kLogfmtRawBytes - kLogfmtCastBytes) * (before + __popc(lead & ((1u << (lane & ~3)) - 1u)));
    if (in) {
      if (cast) {
        u32 v[32], o[10];
#pragma unroll
        for (int j = 0; j < 16; ++j) {
          v[2 * j] = logfmt_word(tab, g, w[j] & 0xFFFFu);
          v[2 * j + 1] = logfmt_word(tab, g, w[j] >> 16);
        }
        logfmt_pack32(v, o);
        u8* d = data + off + q * 40;
        if (q & 1) {
          st_na_v2(d, o[0], o[1]);
          st_na_v4(reinterpret_cast<V4*>(d + 8), V4{int(o[2]), int(o[3]), int(o[4]), int(o[5])});
          st_na_v4(reinterpret_cast<V4*>(d + 24), V4{int(o[6]), int(o[7]), int(o[8]), int(o[9])});
        } else {
          st_na_v4(reinterpret_cast<V4*>(d), V4{int(o[0]), int(o[1]), int(o[2]), int(o[3])});
          st_na_v4(reinterpret_cast<V4*>(d + 16), V4{int(o[4]), int(o[5]), int(o[6]), int(o[7])});
          st_na_v2(d + 32, o[8], o[9]);
        }
      } else {
        V4* d = reinterpret_cast<V4*>(data + off + q * 64);
#pragma unroll
        for (int u = 0; u < 4; ++u)
          st_na_v4(d + u, V4{int(w[4 * u]), int(w[4 * u + 1]), int(w[4 * u + 2]), int(w[4 * u + 3])});
      }
      if (q == 0) meta[gi] = (cast ? static_cast<u64>(amax | (amin << 16)) : 0ull) | (static_cast<u64>(off) << 32);
    }
    before += __popc(lead);
  }
  if (put) {
    __syncwarp();
    nvshmemx_putmem_nbi_warp(p.heap + data_off, data,
                             kLogfmtRawBytes * kG - (kLogfmtRawBytes - kLogfmtCastBytes) * before, s);
    nvshmemx_putmem_nbi_warp(p.heap + meta_off, meta, kG * 8, s);
  }
}

// The expert side's LogFMT sends: every row of every listed source token (whole rows per warp,
// see ll_logfmt_send_row).  Called by every thread of the block, after the list is built.
template <int kHidden>
EPCOMM_DEVICE void ll_combine_send_logfmt(const LLParams& p, const u32* list, int total, bool ok) {
  __shared__ float s_tab[128];
  logfmt_load_table(s_tab);
  if (!ok) return;
  const int R = p.num_ranks, K = p.num_topk, T = p.max_tokens;
  const i64 nrows = static_cast<i64>(p.num_experts / R) * R * T;
  const int lane = lane_id(), warp = warp_id();
  for (int i = blockIdx.x * kLLWarps + warp; i < total; i += gridDim.x * kLLWarps) {
    const u32 st = list[i];
    const int s = static_cast<int>(st) / T, t = static_cast<int>(st) % T;
    const int r_any = lane < K ? p.h_tok_rows[static_cast<i64>(st) * K + lane] : -1;
    const u32 mask = static_cast<u32>(p.h_tok_meta[st]);
    // As in ll_combine_send: only the k recorded on this rank, with an entry in range.
    int rowk = -1;
    if (lane < K && ((mask >> lane) & 1u) && r_any >= 0 && r_any < nrows) rowk = r_any;
    for (u32 rem = mask; rem; rem &= rem - 1) {
      const int k = __ffs(rem) - 1;
      const int row = __shfl_sync(0xffffffffu, rowk, k);
      if (row >= 0) ll_logfmt_send_row<kHidden>(p, s_tab, s, t, k, row);
    }
  }
}

// The source's LogFMT receive: items (token, 1024 channels), lane: 32 channels (its group: 4
// lanes); rows in k order, kRB at a time (their group words first, then the bytes they point at).
template <int kHidden, bool kFma>
EPCOMM_DEVICE void ll_combine_recv_logfmt(const LLParams& p, u64 dead) {
  __shared__ float s_tab[128];
  logfmt_load_table(s_tab);
  constexpr int kRow = kHidden * 2;
  constexpr int kG = kHidden / kLogfmtGroup;
  constexpr int kSteps = (kHidden + 1023) / 1024;
  constexpr int kRB = 2;
  const int K = p.num_topk, N = p.num_tokens, T = p.max_tokens;
  const int lane = lane_id(), warp = warp_id(), q = lane & 3;
  const u8* region = p.heap + p.comb_region_off + static_cast<u64>(p.slot) * T * K * kRow;
  const u64* metas = reinterpret_cast<const u64*>(p.heap + p.lf_meta_off) + static_cast<u64>(p.slot) * T * K * kG;
  for (int item = blockIdx.x * kLLWarps + warp; item < N * kSteps; item += gridDim.x * kLLWarps) {
    const int t = item / kSteps, step = item % kSteps;
    float w_l = 0.0f;
    bool has = false;
    if (lane < K) {
      const i64 e = p.topk_idx[static_cast<i64>(t) * K + lane];
      has = e >= 0 && e < p.num_experts && !((dead >> (static_cast<int>(e) / (p.num_experts / p.num_ranks))) & 1ull);
      w_l = p.topk_weights[static_cast<i64>(t) * K + lane];
      if (step == 0 && (e < -1 || e >= p.num_experts))
        report_error(p.err, kErrBadInput, p.rank, kPhaseLLCombineReduce, t, -1,
                     static_cast<u64>(p.num_experts), static_cast<u64>(e));
    }
    const int ch0 = step * 1024 + lane * 32;
    const bool in = ch0 < kHidden;
    const int gi = step * 8 + (lane >> 2);
    float acc[32];
#pragma unroll
    for (int j = 0; j < 32; ++j) acc[j] = 0.0f;
    for (u32 rem = __ballot_sync(0xffffffffu, has); rem;) {  // k ascending
      int kq[kRB];
      bool use[kRB];
      float wk[kRB];
      u64 m[kRB];
#pragma unroll
      for (int u = 0; u < kRB; ++u) {
        kq[u] = rem ? __ffs(rem) - 1 : 0;
        use[u] = rem != 0 && in;
        rem &= rem - 1;
        wk[u] = __shfl_sync(0xffffffffu, w_l, kq[u]);
        m[u] = use[u] ? ld_cg_u64(metas + (static_cast<u64>(t) * K + kq[u]) * kG + gi) : 0ull;
      }
      u32 d[kRB][16];
#pragma unroll
      for (int u = 0; u < kRB; ++u) {
        if (!use[u]) continue;
        const u8* row = region + (static_cast<u64>(t) * K + kq[u]) * kRow + (m[u] >> 32);
        if (static_cast<u32>(m[u]) != 0) {
          const u8* a = row + q * 40;
          if (q & 1) {
            const U2 h = ld_cg_v2(a);
            const V4 b = ld_cg_v4(reinterpret_cast<const V4*>(a + 8)), c = ld_cg_v4(reinterpret_cast<const V4*>(a + 24));
            d[u][0] = h.x, d[u][1] = h.y, d[u][2] = b.x, d[u][3] = b.y, d[u][4] = b.z, d[u][5] = b.w;
            d[u][6] = c.x, d[u][7] = c.y, d[u][8] = c.z, d[u][9] = c.w;
          } else {
            const V4 b = ld_cg_v4(reinterpret_cast<const V4*>(a)), c = ld_cg_v4(reinterpret_cast<const V4*>(a + 16));
            const U2 h = ld_cg_v2(a + 32);
            d[u][0] = b.x, d[u][1] = b.y, d[u][2] = b.z, d[u][3] = b.w, d[u][4] = c.x, d[u][5] = c.y;
            d[u][6] = c.z, d[u][7] = c.w, d[u][8] = h.x, d[u][9] = h.y;
          }
        } else {
          const V4* a = reinterpret_cast<const V4*>(row + q * 64);
#pragma unroll
          for (int i = 0; i < 4; ++i) {
            const V4 b = ld_cg_v4(a + i);
            d[u][4 * i] = b.x, d[u][4 * i + 1] = b.y, d[u][4 * i + 2] = b.z, d[u][4 * i + 3] = b.w;
          }
        }
      }
#pragma unroll
      for (int u = 0; u < kRB; ++u) {
        if (!use[u]) continue;
        const u32 mw = static_cast<u32>(m[u]);
        if (mw != 0) {
          const LogfmtGroup g = logfmt_group(s_tab, mw & 0xFFFFu, mw >> 16);
#pragma unroll
          for (int j = 0; j < 32; ++j) acc[j] = ll_acc<kFma>(acc[j], wk[u], logfmt_value(g, logfmt_unpack(d[u], j)));
        } else {
#pragma unroll
          for (int j = 0; j < 16; ++j) {
            acc[2 * j] = ll_acc<kFma>(acc[2 * j], wk[u], bf16_to_f32(static_cast<u16>(d[u][j] & 0xFFFFu)));
            acc[2 * j + 1] = ll_acc<kFma>(acc[2 * j + 1], wk[u], bf16_to_f32(static_cast<u16>(d[u][j] >> 16)));
          }
        }
      }
    }
    if (in) {
      V4* out = reinterpret_cast<V4*>(p.out + static_cast<i64>(t) * kHidden + ch0);
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        u32 o[4];
#pragma unroll
        for (int e = 0; e < 4; ++e)
          o[e] = f32_to_bf16(acc[8 * i + 2 * e]) | (static_cast<u32>(f32_to_bf16(acc[8 * i + 2 * e + 1])) << 16);
        st_na_v4(out + i, V4{int(o[0]), int(o[1]), int(o[2]), int(o[3])});
      }
    }
  }
}

// NVSHMEM puts of a source token's whole rows (the RDMA path), from the symmetric send buffer
// (staged there unless zero_copy).  Out of line: it would take registers from the NVLink paths.
template <int kHidden>
__device__ __noinline__ void ll_combine_put_rows(const LLParams& p, int s, u32 mask, int rowk, u64 tok_off) {
  constexpr int kRow = kHidden * 2;
  const int lane = lane_id();
  const i64 nrows = static_cast<i64>(p.num_experts / p.num_ranks) * p.num_ranks * p.max_tokens;
  for (u32 rem = mask; rem; rem &= rem - 1) {
    const int k = __ffs(rem) - 1;
    const int row = __shfl_sync(0xffffffffu, rowk, k);
    if (row < 0) continue;
    const u8* src = reinterpret_cast<const u8*>(p.x) + static_cast<i64>(row) * kRow;
    const u8* sym = src;
    if (!p.zero_copy) {
      u8* stg = p.heap + p.comb_send_off + (static_cast<u64>(p.slot) * nrows + row) * kRow;
      warp_copy_row<kRow / 16, false>(reinterpret_cast<V4*>(stg), reinterpret_cast<const V4*>(src), lane);
      __syncwarp();
      sym = stg;
    }
    nvshmemx_putmem_nbi_warp(p.heap + tok_off + static_cast<u64>(k) * kRow, sym, kRow, s);
  }
}

template <int kHidden, int kMode>
EPCOMM_DEVICE void ll_combine_send(const LLParams& p, u64 tag, u64 prev_layout, u64 deadline) {
  const int R = p.num_ranks, K = p.num_topk, N = p.num_tokens, T = p.max_tokens;
  const int L = p.num_experts / R;
  const i64 nrows = static_cast<i64>(L) * R * T;
  constexpr int kRow = kHidden * 2;
  constexpr int kN16 = kRow / 16;            // 16-byte words of a bf16 row
  constexpr int kChunks = (kN16 + 32 * kLLCombW - 1) / (32 * kLLCombW);  // items per source token
  constexpr int kHalf = kHidden / 2;         // channels of a partial in each of its two slots
  constexpr int kBatch = 4;                  // rows loaded at once (x kLLCombW words per lane)
  const int lane = lane_id(), warp = warp_id();
  const int NG = (T + 31) / 32;
  // Dynamic shared memory (epcomm.kernels.low_latency.combine_smem_bytes): per 32-token group
  // of each source the mask of tokens with rows here and its prefix, then the ordered list.
  extern __shared__ int s_dyn[];
  u32* s_gmask = reinterpret_cast<u32*>(s_dyn);
  int* s_gbase = s_dyn + R * NG;
  u32* s_list = reinterpret_cast<u32*>(s_dyn + 2 * R * NG);
  __shared__ int s_ok;
  __shared__ int s_total;
  __shared__ u32 s_dtag;
  if (threadIdx.x == 0) {
    s_ok = 1;
    s_dtag = static_cast<u32>(ld_volatile_u64(&p.ctrl->disp_seq[p.h_slot]));
  }
  __syncthreads();
  __shared__ u64 s_dead;
  for (int s = threadIdx.x; s < R; s += blockDim.x) {
    const u64* ack = reinterpret_cast<const u64*>(p.heap + p.comb_ack_off) + p.slot * R + s;
    if (wait_geq_u64_masked(ack, tag - 1, p.err, deadline, p.rank, kPhaseLLCombineSendAck, p.slot, s, ll_mask(p)) ==
        kWaitFailed)
      s_ok = 0;
  }
  // Before the weights, the first writes into the peers (as in ll_dispatch_send).
  if (!ll_wait_layout_quiet(p, prev_layout, ll_layout_word(p, kHidden),
                            shrink_deadline(deadline, p.timeout_ns, p.shrink, 1), kPhaseLLCombineSendAck))
    s_ok = 0;
  // A peer publishes its weights after its acknowledgement waits and, where the layout changed
  // (at this same call on every rank), after that quiet wait too: one timeout more each.
  const int w_hops = 1 + (prev_layout != ll_layout_word(p, kHidden));
  __syncthreads();
  if (threadIdx.x == 0) s_dead = ll_dead_bits(p);
  __syncthreads();
  const u64 dead = s_dead;  // shrink mode: masked sources get nothing back
  ll_stamp(p, 1, 1);
  if (p.partials && blockIdx.x == 0 && s_ok) {
    // Our weights to every NVLink peer, before this block waits for anything.
    const u64 w_off = p.comb_w_off + (static_cast<u64>(p.slot) * R + p.rank) * T * K * 4;
    const int nw = N * K;
    for (int d = 0; d < R; ++d) {
      if (d == p.rank || use_put(p, d) || ((dead >> d) & 1ull)) continue;
      float* dst = reinterpret_cast<float*>(remote(p, d, w_off));
      for (int i = threadIdx.x; i < nw; i += blockDim.x) dst[i] = p.topk_weights[i];
    }
    __syncthreads();
    for (int d = threadIdx.x; d < R; d += blockDim.x) {
      if (d == p.rank || use_put(p, d) || ((dead >> d) & 1ull)) continue;
      fence_sys();
      ll_signal(p, d, p.comb_wflag_off + (static_cast<u64>(p.slot) * R + p.rank) * 8, tag);
    }
  }
  // The source tokens with rows here (the dispatch recorded them with its tag), this rank's
  // own tokens first, then rank + 1, ...: with partials, a peer's items wait for its weights
  // (published by its block 0 a few us in), ours do not, so the first wave of warps should
  // hold ours.  On 2x H200 rank 1 (peer first in source order) finished its sending items
  // 2.3 us after rank 0 (last block 19.6 vs 17.2 us, profile-low-latency-h200-x2-coalesced.json),
  // and every receive waits for the slower rank.  Any order gives the same result (the source
  // adds in k order).
  const auto src_of = [&](int item) { return (p.rank + item / NG) % R; };
  for (int item = warp; item < R * NG; item += kLLWarps) {
    const int s = src_of(item), t = (item % NG) * 32 + lane;
    bool here = false;
    if (t < T && !((dead >> s) & 1ull)) {
      const u64 m = p.h_tok_meta[static_cast<i64>(s) * T + t];
      here = static_cast<u32>(m >> 32) == s_dtag && static_cast<u32>(m) != 0;
    }
    const u32 b = __ballot_sync(0xffffffffu, here);
    if (lane == 0) s_gmask[item] = b;
  }
  __syncthreads();
  if (warp == 0) {
    int running = 0;
    for (int base = 0; base < R * NG; base += 32) {
      const int v = base + lane < R * NG ? __popc(s_gmask[base + lane]) : 0;
      int incl = v;
#pragma unroll
      for (int o = 1; o < 32; o <<= 1) {
        const int y = __shfl_up_sync(0xffffffffu, incl, o);
        if (lane >= o) incl += y;
      }
      if (base + lane < R * NG) s_gbase[base + lane] = running + incl - v;
      running += __shfl_sync(0xffffffffu, incl, 31);
    }
    if (lane == 0) s_total = running;
  }
  __syncthreads();
  for (int item = warp; item < R * NG; item += kLLWarps) {
    const u32 b = s_gmask[item];
    if ((b >> lane) & 1u) {
      const int s = src_of(item), t = (item % NG) * 32 + lane;
      s_list[s_gbase[item] + __popc(b & ((1u << lane) - 1u))] = static_cast<u32>(s * T + t);
    }
  }
  __syncthreads();
  ll_stamp(p, 1, 2);
  // LogFMT rows are sent after this loop, whole rows per warp (ll_combine_send_logfmt).
  const int items = (kMode & kLLCombLogfmt) ? 0 : s_total * kChunks;
  const float* wbase = reinterpret_cast<const float*>(p.heap + p.comb_w_off) + static_cast<i64>(p.slot) * R * T * K;
  const V4* xv = reinterpret_cast<const V4*>(p.x);
  volatile int* ok = &s_ok;
  // Sources whose weights this warp has acquired (each warp acquires the flag itself, so its
  // loads of the weights are ordered after it).  Warp-uniform.
  unsigned long long have_w = 1ull << p.rank;
  for (int i = blockIdx.x * kLLWarps + warp; i < items; i += gridDim.x * kLLWarps) {
    if (!__shfl_sync(0xffffffffu, *ok, 0)) break;  // lane 0's view: the warp leaves together
    const u32 st = s_list[i / kChunks];
    const int s = static_cast<int>(st) / T, t = static_cast<int>(st) % T;
    // The record and every k's row entry are loaded together (one memory latency, not two);
    // entries of k not on this rank are stale and masked out.
    const int r_any = lane < K ? p.h_tok_rows[static_cast<i64>(st) * K + lane] : -1;
    // Weights too, where already known to be here (ours, or a source whose flag this warp saw).
    const bool w_ready = s == p.rank || ((have_w >> s) & 1ull);
    float w_pre = 0.0f;
    if (lane < K && w_ready)
      w_pre = s == p.rank ? p.topk_weights[static_cast<i64>(t) * K + lane]
                          : __ldcg(wbase + (static_cast<i64>(s) * T + t) * K + lane);
    const u32 mask = static_cast<u32>(p.h_tok_meta[st]);
    int rowk = -1;
    // In range whatever the entry holds: a repeated expert id in a token's top-k (invalid
    // input, unchecked on the device) leaves a stale entry, which may only garble that token.
    if (lane < K && ((mask >> lane) & 1u) && r_any >= 0 && r_any < nrows) rowk = r_any;
    const int idx0 = (i % kChunks) * 32 * kLLCombW + lane;  // word w of the lane: idx0 + 32 w
    const u64 tok_off = p.comb_region_off + (static_cast<u64>(p.slot) * T + t) * K * kRow;  // slot (t, 0)
    if (ll_partial(p, s, __popc(mask))) {
      float wk = w_pre;
      if (!w_ready) {  // a remote source's weights are read only after this warp acquired its flag
        int got = 0;
        if (lane == 0) {
          const u64* f = reinterpret_cast<const u64*>(p.heap + p.comb_wflag_off) + p.slot * R + s;
          // The source publishes its weights after its acknowledgement (and layout) waits.
          got = wait_geq_u64_masked(f, tag, p.err, shrink_deadline(deadline, p.timeout_ns, p.shrink, w_hops),
                                    p.rank, kPhaseLLCombineWeights, p.slot, s, ll_mask(p));
          if (got == kWaitFailed) *ok = 0;
        }
        __syncwarp();  // lane 0 acquired the flag: the other lanes' loads are ordered after it
        got = __shfl_sync(0xffffffffu, got, 0);
        if (got == kWaitMasked) continue;  // shrink mode: the source died; its token gets nothing
        if (got == kWaitFailed) break;
        have_w |= 1ull << s;
        if (lane < K) wk = __ldcg(wbase + (static_cast<i64>(s) * T + t) * K + lane);
      }
      float acc[kLLCombW][8];
#pragma unroll
      for (int w = 0; w < kLLCombW; ++w)
#pragma unroll
        for (int e = 0; e < 8; ++e) acc[w][e] = 0.0f;
      for (u32 rem = mask; rem;) {  // the rows in k order, kBatch x kLLCombW loads in flight
        V4 v[kBatch][kLLCombW];
        float wq[kBatch];
        bool use[kBatch];
#pragma unroll
        for (int u = 0; u < kBatch; ++u) {
          const int k = rem ? __ffs(rem) - 1 : 0;
          use[u] = rem != 0;
          rem &= rem - 1;
          const int row = __shfl_sync(0xffffffffu, rowk, k);
          wq[u] = __shfl_sync(0xffffffffu, wk, k);
          use[u] = use[u] && row >= 0;
#pragma unroll
          for (int w = 0; w < kLLCombW; ++w) {
            const int idx = idx0 + 32 * w;
            v[u][w] = V4{0, 0, 0, 0};
            if (use[u] && idx < kN16) v[u][w] = ld_nc_v4(xv + static_cast<i64>(row) * kN16 + idx);
          }
        }
#pragma unroll
        for (int u = 0; u < kBatch; ++u) {
          if (!use[u]) continue;
#pragma unroll
          for (int w = 0; w < kLLCombW; ++w) {
            const u32 ww[4] = {static_cast<u32>(v[u][w].x), static_cast<u32>(v[u][w].y),
                               static_cast<u32>(v[u][w].z), static_cast<u32>(v[u][w].w)};
#pragma unroll
            for (int r = 0; r < 4; ++r) {
              acc[w][2 * r] =
                  __fadd_rn(acc[w][2 * r], __fmul_rn(wq[u], bf16_to_f32(static_cast<u16>(ww[r] & 0xFFFFu))));
              acc[w][2 * r + 1] =
                  __fadd_rn(acc[w][2 * r + 1], __fmul_rn(wq[u], bf16_to_f32(static_cast<u16>(ww[r] >> 16))));
            }
          }
        }
      }
      const int k1 = __ffs(mask) - 1, k2 = __ffs(mask & (mask - 1)) - 1;
      // Lane l holds channels 8 idx .. 8 idx + 7 of word w: 32 fp32 bytes.  Stored as they are,
      // each warp store would write 16 of every 32 bytes over 1 KB, and half-filled sectors
      // cross NVLink at about half the rate.  So each store instruction h writes 512
      // contiguous bytes, lane l the 4 channels of lane 16 h + l / 2 (its half l & 1),
      // fetched by shuffles; every lane computes its own destination (the two halves of a
      // row may meet inside one store).
#pragma unroll
      for (int w = 0; w < kLLCombW; ++w) {
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const int from = 16 * h + (lane >> 1);
          const bool hi = lane & 1;
          float q[4];
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const float lo_v = __shfl_sync(0xffffffffu, acc[w][e], from);
            const float hi_v = __shfl_sync(0xffffffffu, acc[w][4 + e], from);
            q[e] = hi ? hi_v : lo_v;
          }
          const int idx = idx0 - lane + from + 32 * w;  // the source lane's word
          if (idx >= kN16) continue;
          const int ch = idx * 8 + (hi ? 4 : 0);
          const int kd = ch < kHalf ? k1 : k2;
          V4* dst = reinterpret_cast<V4*>(remote(p, s, tok_off + static_cast<u64>(kd) * kRow) +
                                          static_cast<u64>(ch < kHalf ? ch : ch - kHalf) * 4);
          st_na_v4(dst, f32x4_as_v4(q[0], q[1], q[2], q[3]));
        }
      }
    } else if (!use_put(p, s)) {
      // One bf16 row per k: this item's channels of each, kBatch x kLLCombW loads in flight.
      for (u32 rem = mask; rem;) {
        V4 v[kBatch][kLLCombW];
        int kq[kBatch];
        bool use[kBatch];
#pragma unroll
        for (int u = 0; u < kBatch; ++u) {
          kq[u] = rem ? __ffs(rem) - 1 : 0;
          use[u] = rem != 0;
          rem &= rem - 1;
          const int row = __shfl_sync(0xffffffffu, rowk, kq[u]);
          use[u] = use[u] && row >= 0;
#pragma unroll
          for (int w = 0; w < kLLCombW; ++w) {
            const int idx = idx0 + 32 * w;
            v[u][w] = V4{0, 0, 0, 0};
            if (use[u] && idx < kN16) v[u][w] = ld_nc_v4(xv + static_cast<i64>(row) * kN16 + idx);
          }
        }
#pragma unroll
        for (int u = 0; u < kBatch; ++u) {
          if (!use[u]) continue;
          V4* dst = reinterpret_cast<V4*>(remote(p, s, tok_off + static_cast<u64>(kq[u]) * kRow));
#pragma unroll
          for (int w = 0; w < kLLCombW; ++w)
            if (idx0 + 32 * w < kN16) st_na_v4(dst + idx0 + 32 * w, v[u][w]);
        }
      }
    } else if (i % kChunks == 0) {
      ll_combine_put_rows<kHidden>(p, s, mask, rowk, tok_off);
    }
  }
  if constexpr ((kMode & kLLCombLogfmt) != 0) ll_combine_send_logfmt<kHidden>(p, s_list, s_total, s_ok != 0);
  if (p.any_put) nvshmem_quiet();
  if (threadIdx.x == 0) ll_stamp(p, 1, 3);  // thread 0's warp done (others may still be busy)
  __syncthreads();
  if (!s_ok) return;  // an acknowledgement or weights wait failed: do not arrive (see dispatch)
  ll_arrive(p, p.comb_flag_off, false, &p.ctrl->comb_send_done[p.slot], [](int) {});
  ll_stamp(p, 1, 4);
}

template <int kHidden, int kMode>
EPCOMM_DEVICE void ll_combine_recv(const LLParams& p, u64 tag, u64 deadline) {
  const int R = p.num_ranks, K = p.num_topk, N = p.num_tokens, T = p.max_tokens;
  const int L = p.num_experts / R;
  constexpr int kRow = kHidden * 2;
  constexpr int kN16 = kRow / 16;
  constexpr int kHalf = kHidden / 2;
  const int lane = lane_id(), warp = warp_id();
  u64 dead = 0;  // shrink mode: expert-side ranks masked; their rows are left out of every sum
  if (!ll_wait_arrivals(p, p.comb_flag_off, &p.ctrl->comb_base[0][0], kPhaseLLCombineRecv, deadline, &dead)) {
    if (threadIdx.x == 0) p.ctrl->failed = 1;
    return;
  }
  ll_stamp(p, 1, 5);
  const u8* region = p.heap + p.comb_region_off + static_cast<u64>(p.slot) * T * K * kRow;
  // Work items are (token, 512 channels); each lane loads its words of up to kRB arriving rows
  // (or partials) at once, then adds them in k order, a partial at its lowest k.
  constexpr int kChunks = (kN16 + 32 * kLLCombW - 1) / (32 * kLLCombW);
  constexpr int kRB = 4;
  // LogFMT rows are read by ll_combine_recv_logfmt instead (after this loop, which it empties).
  constexpr bool kLogfmt = (kMode & kLLCombLogfmt) != 0;
  constexpr bool kFma = (kMode & kLLCombFma) != 0;
  for (int item = blockIdx.x * kLLWarps + warp; item < (kLogfmt ? 0 : N) * kChunks; item += gridDim.x * kLLWarps) {
    const int t = item / kChunks;
    const int idx0 = (item % kChunks) * 32 * kLLCombW + lane;
    int rk = -1 - lane;  // expert-side rank of lane k's expert; unique if none
    float w_l = 0.0f;
    bool has = false;
    if (lane < K) {
      const i64 e = p.topk_idx[static_cast<i64>(t) * K + lane];
      has = e >= 0 && e < p.num_experts && !((dead >> (static_cast<int>(e) / L)) & 1ull);
      if (has) rk = static_cast<int>(e) / L;
      w_l = p.topk_weights[static_cast<i64>(t) * K + lane];
      if (item % kChunks == 0 && (e < -1 || e >= p.num_experts))
        report_error(p.err, kErrBadInput, p.rank, kPhaseLLCombineReduce, t, -1,
                     static_cast<u64>(p.num_experts), static_cast<u64>(e));
    }
    const unsigned same = __match_any_sync(0xffffffffu, rk);
    // How lane k's row arrives: 0 not at all, 1 a bf16 row in slot k, 2 the partial of its rank
    // (k is that rank's lowest k; the other half sits in slot k2_l), 3 inside another k's partial.
    int how_l = 0, k2_l = 0;
    if (has) {
      if (ll_partial(p, rk, __popc(same))) {
        how_l = (__ffs(same) - 1 == lane) ? 2 : 3;
        k2_l = __ffs(same & (same - 1)) - 1;
      } else {
        how_l = 1;
      }
    }
    float acc[kLLCombW][8];
#pragma unroll
    for (int w = 0; w < kLLCombW; ++w)
#pragma unroll
      for (int e = 0; e < 8; ++e) acc[w][e] = 0.0f;
    const u8* tok = region + static_cast<u64>(t) * K * kRow;
    for (u32 rem = __ballot_sync(0xffffffffu, how_l == 1 || how_l == 2); rem;) {  // k ascending
      V4 a[kRB][kLLCombW], b[kRB][kLLCombW];
      int how[kRB];
      float wk[kRB];
#pragma unroll
      for (int q = 0; q < kRB; ++q) {
        const int k = rem ? __ffs(rem) - 1 : 0;
        const bool any = rem != 0;
        rem &= rem - 1;
        how[q] = __shfl_sync(0xffffffffu, how_l, k);
        if (!any) how[q] = 0;
        wk[q] = __shfl_sync(0xffffffffu, w_l, k);
        const int k2 = __shfl_sync(0xffffffffu, k2_l, k);
#pragma unroll
        for (int w = 0; w < kLLCombW; ++w) {
          const int idx = idx0 + 32 * w;
          a[q][w] = V4{0, 0, 0, 0};
          b[q][w] = V4{0, 0, 0, 0};
          if (idx >= kN16) continue;
          if (how[q] == 1) {
            a[q][w] = ld_cg_v4(reinterpret_cast<const V4*>(tok + static_cast<u64>(k) * kRow) + idx);
          } else if (how[q] == 2) {
            const int ch = idx * 8;
            const V4* src = reinterpret_cast<const V4*>(tok + static_cast<u64>(ch < kHalf ? k : k2) * kRow +
                                                        static_cast<u64>(ch < kHalf ? ch : ch - kHalf) * 4);
            a[q][w] = ld_cg_v4(src);
            b[q][w] = ld_cg_v4(src + 1);
          }
        }
      }
#pragma unroll
      for (int q = 0; q < kRB; ++q) {
#pragma unroll
        for (int w = 0; w < kLLCombW; ++w) {
          if (how[q] == 1) {
            const u32 ww[4] = {static_cast<u32>(a[q][w].x), static_cast<u32>(a[q][w].y),
                               static_cast<u32>(a[q][w].z), static_cast<u32>(a[q][w].w)};
#pragma unroll
            for (int r = 0; r < 4; ++r) {
              acc[w][2 * r] = ll_acc<kFma>(acc[w][2 * r], wk[q], bf16_to_f32(static_cast<u16>(ww[r] & 0xFFFFu)));
              acc[w][2 * r + 1] = ll_acc<kFma>(acc[w][2 * r + 1], wk[q], bf16_to_f32(static_cast<u16>(ww[r] >> 16)));
            }
          } else if (how[q] == 2) {
            acc[w][0] = __fadd_rn(acc[w][0], __int_as_float(a[q][w].x));
            acc[w][1] = __fadd_rn(acc[w][1], __int_as_float(a[q][w].y));
            acc[w][2] = __fadd_rn(acc[w][2], __int_as_float(a[q][w].z));
            acc[w][3] = __fadd_rn(acc[w][3], __int_as_float(a[q][w].w));
            acc[w][4] = __fadd_rn(acc[w][4], __int_as_float(b[q][w].x));
            acc[w][5] = __fadd_rn(acc[w][5], __int_as_float(b[q][w].y));
            acc[w][6] = __fadd_rn(acc[w][6], __int_as_float(b[q][w].z));
            acc[w][7] = __fadd_rn(acc[w][7], __int_as_float(b[q][w].w));
          }
        }
      }
    }
#pragma unroll
    for (int w = 0; w < kLLCombW; ++w) {
      const int idx = idx0 + 32 * w;
      if (idx >= kN16) continue;
      V4 o;
      o.x = static_cast<int>(f32_to_bf16(acc[w][0]) | (static_cast<u32>(f32_to_bf16(acc[w][1])) << 16));
      o.y = static_cast<int>(f32_to_bf16(acc[w][2]) | (static_cast<u32>(f32_to_bf16(acc[w][3])) << 16));
      o.z = static_cast<int>(f32_to_bf16(acc[w][4]) | (static_cast<u32>(f32_to_bf16(acc[w][5])) << 16));
      o.w = static_cast<int>(f32_to_bf16(acc[w][6]) | (static_cast<u32>(f32_to_bf16(acc[w][7])) << 16));
      st_na_v4(reinterpret_cast<V4*>(p.out + static_cast<i64>(t) * kHidden) + idx, o);
    }
  }
  if constexpr (kLogfmt) ll_combine_recv_logfmt<kHidden, kFma>(p, dead);
  if (threadIdx.x == 0) ll_stamp(p, 1, 6);  // thread 0's warp done
  if (last_block(&p.ctrl->comb_recv_done[p.slot])) {
    ll_rebase(p, p.comb_flag_off, &p.ctrl->comb_base[0][0]);
    if (threadIdx.x == 0) ll_publish_mask(p);
    __syncthreads();
    for (int d = threadIdx.x; d < R; d += blockDim.x)
      if (!((dead >> d) & 1ull)) ll_signal(p, d, p.comb_ack_off + (static_cast<u64>(p.slot) * R + p.rank) * 8, tag);
    if (threadIdx.x == 0) {
      p.ctrl->comb_seq[p.slot] = tag;
      p.ctrl->layout = ll_layout_word(p, kHidden);
    }
  }
  ll_stamp(p, 1, 7);
}

// kMode: 0, or kLLCombFma and/or kLLCombLogfmt (see there).
template <int kHidden, int kPhases, int kMode = 0>
__global__ void __launch_bounds__(kLLThreads) ll_combine(const __grid_constant__ LLParams p) {
  __shared__ u64 s_tag;
  __shared__ u64 s_layout;
  __shared__ int s_failed;
  if (threadIdx.x == 0) {
    s_tag = *reinterpret_cast<volatile u64*>(&p.ctrl->comb_seq[p.slot]) + 1;
    s_layout = *reinterpret_cast<volatile u64*>(&p.ctrl->layout);
    // A failed dispatch receive left its routing outputs unwritten: combining them would send
    // rows to arbitrary addresses.
    s_failed = *reinterpret_cast<volatile int*>(&p.ctrl->failed);
  }
  __syncthreads();
  if (s_failed) return;
  ll_stamp(p, 1, 0);
  const u64 tag = s_tag;
  const u64 deadline = globaltimer_ns() + p.timeout_ns;
  if (kPhases & 1) ll_combine_send<kHidden, kMode>(p, tag, s_layout, deadline);
  // An expert-side rank arrives after its weights waits, which count its acknowledgement wait
  // and, where the layout changed, its peers' quiet wait (shrink_deadline).
  const int hops = 2 + (kPhases == 3 && s_layout != ll_layout_word(p, kHidden));
  if (kPhases & 2) ll_combine_recv<kHidden, kMode>(p, tag, shrink_deadline(deadline, p.timeout_ns, p.shrink, hops));
}

}  // namespace epcomm
