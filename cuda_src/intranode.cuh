// High-throughput dispatch and combine among the GPUs of one NVLink domain.
//
// Design (see docs/design.md for the measurements behind it):
// * Every rank owns one buffer, mapped into every peer (CUDA IPC).  It holds, per source rank s,
//   a fixed staging region sized for the worst case (no ring, no credits inside a call: a
//   sender never waits for a receiver, so a call cannot deadlock on buffer space), per-chunk
//   arrival flags, a mailbox for token counts and an acknowledgement word per peer.
// * A sender writes each token once per destination rank, straight into that rank's staging
//   region at a slot it computes itself (the token's index among the tokens it sends there),
//   so rows land in the final receive order and only counts cross in a separate message.
// * Rows of the rank itself never go through staging: the receive kernel copies them from the
//   input directly, so receive kernels wait only on *other* GPUs' senders, and senders wait only
//   on the previous call's acknowledgements: no wait cycle exists inside one GPU.
// * Flags carry a 64-bit operation tag (the count of operations on this buffer), kept in device
//   memory and advanced by the kernels themselves, so a captured CUDA graph replays correctly.
#pragma once
#include "epcomm_common.cuh"

namespace epcomm {

constexpr int kIntraMaxRanks = 72;  // one NVLink domain (NVL72)
constexpr int kIntraThreads = 512;

// This rank's private control words (device memory, never read by peers).
struct IntraCtrl {
  u64 op_seq;        // tag of the last operation started on this buffer
  u64 cur_tag;       // tag of the dispatch in flight (set by notify, read by send and receive)
  u64 ok_tag;        // = cur_tag once notify succeeded; send and receive run only then
  int scan_done;     // notify: scan blocks finished
  int recv_done;     // dispatch receive: blocks finished
  int comb_done;     // combine: blocks finished
  int pad;
  int recv_heads[kIntraMaxRanks];  // dispatch receive: next item of each source's queue
};

EPCOMM_DEVICE int* at_mask(u64 base, u64 off) { return reinterpret_cast<int*>(base + off); }

struct IntraParams {
  u64 peers[kIntraMaxRanks];  // base address of every rank's buffer, as mapped in this process
  IntraCtrl* ctrl;
  ErrorRecord* err;
  int* host_info;             // host-mapped: [0] ready, [1] total rows, [2, 2+R) rows per source, then L expert counts
  // Buffer layout: byte offsets inside every rank's buffer (identical on all ranks).
  u64 ack_off;                // u64 [R]: ack[d] = tag up to which rank d consumed our writes
  u64 mailbox_tag_off;        // u64 [R]
  u64 mailbox_off;            // int [R][mailbox_ints]
  u64 flags_off;              // u64 [R][max_chunks]
  u64 staging_off;            // [R][region_bytes]
  u64 region_bytes;
  // Inputs.
  const u8* x;                // dispatch: [N, payload]; combine: [num_recv, H] bf16
  const float* x_scales;      // FP8 dispatch: scales, element (t, g) at t*scale_st + g*scale_sg
  const i64* topk_idx;        // [N, K] or null
  const float* topk_weights;  // dispatch: [N, K]; combine: [num_recv, K]; or null
  const u8* is_token_in_rank; // [N, R]
  const int* num_tokens_per_expert;  // [E] (dispatch, for the per-expert counts) or null
  int* send_list;             // [R, N]: tokens sent to each rank, ascending
  int* send_pos;              // [N, R]: slot of token t at rank d, -1 if not sent
  int* send_count;            // [R]
  int* rank_prefix;           // [R + 1]: receive offsets per source rank
  // Outputs.
  u8* recv_x;                 // [M, payload]
  float* recv_scales;         // element (row, g) at row*rscale_st + g*rscale_sg
  i64* recv_topk_idx;         // [M, K]
  float* recv_topk_weights;   // [M, K]
  int* recv_src_idx;          // [M]
  u16* out;                   // combine: [N, H] bf16
  float* out_weights;         // combine: [N, K]
  const u16* bias0;           // combine: [N, H] bf16 or null
  const u16* bias1;
  i64 scale_st, scale_sg, rscale_st, rscale_sg;
  u64 timeout_ns;
  int rank;
  int num_ranks;
  int num_tokens;             // N: tokens of this rank
  int num_topk;               // K (0: no top-k)
  int num_experts;
  int expert_alignment;
  int out_rows;               // M: rows of the receive outputs
  int worst_mode;             // 1: M = num_worst_tokens, pad rows past the real ones
  int chunk_rows;             // rows per chunk flag
  int row_bytes;              // staging row stride
  int mailbox_ints;
  int max_chunks;
  int hidden;                 // dispatch: H (compared across ranks in the mailbox)
  int fp8;                    // dispatch: 1 for an FP8 payload
  int cached;                 // dispatch from a handle: no count exchange, no top-k
  int write_host;             // notify publishes counts to host_info
  int num_send_blocks;        // combine: blocks [0, S) send, the rest receive
  int speculative;            // dispatch receive: outputs sized before the counts were known
  u64* prof;                  // EPCOMM_PROFILE: per-block stamps, or null
  u64 mask_off;               // int [R]: the rank mask (shrink mode), see intra_mask
  int shrink;                 // 1: masked ranks are skipped, a peer that times out is masked
  int pad2;
};

// This rank's mask (in its own buffer, where peers publish what they masked), or null without
// shrink mode: every mask test then folds away.
EPCOMM_DEVICE int* intra_mask(const IntraParams& p) {
  return p.shrink ? at_mask(p.peers[p.rank], p.mask_off) : nullptr;
}

// Shrink mode: write every rank this rank masked into the mask of every unmasked peer, so they
// stop waiting for it too and start their next call with the same mask (the agreement rule of
// docs/design.md, "Rank masks").  One thread; the fence orders the stores before whatever this
// rank writes into its peers next (the next call's mailbox), so a peer that hears from this
// rank again has the mask already.
EPCOMM_DEVICE void intra_publish_mask(const IntraParams& p) {
  const int* mask = intra_mask(p);
  if (mask == nullptr) return;
  for (int r = 0; r < p.num_ranks; ++r) {
    if (!rank_masked(mask, r)) continue;
    for (int q = 0; q < p.num_ranks; ++q)
      if (q != p.rank && !rank_masked(mask, q)) st_relaxed_sys_i32(at_mask(p.peers[q], p.mask_off) + r, 1);
  }
  fence_sys();
}

// Profiling (EPCOMM_PROFILE=1): thread 0 of each block records, at
// prof[((kernel * kProfMaxBlocks) + block) * kProfSlots + i]: i = 0 start, 1 end (globaltimer ns),
// 2 the SM it ran on, 3 SM clock cycles between start and end (with the ns span: the clock rate;
// with the SM ids: whether blocks of concurrent kernels shared an SM).  Buffer.profile_stamps reads them.
constexpr int kProfMaxBlocks = 256;
constexpr int kProfSlots = 4;
enum ProfKernel { kProfNotify = 0, kProfSend = 1, kProfRecv = 2, kProfCombine = 3 };
EPCOMM_DEVICE void prof_stamp(const IntraParams& p, int kernel, int which) {
  if (p.prof != nullptr && threadIdx.x == 0 && blockIdx.x < kProfMaxBlocks) {
    u64* s = p.prof + (static_cast<u64>(kernel) * kProfMaxBlocks + blockIdx.x) * kProfSlots;
    const u64 now = globaltimer_ns();
    const u64 clk = static_cast<u64>(clock64());
    if (which == 0) {
      s[0] = now;
      s[2] = smid();
      s[3] = clk;
    } else {
      s[1] = now;
      s[3] = clk - s[3];
    }
  }
}

// An expert index outside [-1, E): skipped like -1 by the dispatch, and recorded for the host's
// next check, as the layout kernel does (a caller may pass a layout computed elsewhere, and the
// host check is off in production).  The first one wins the record.  Only tokens that go to some
// rank are read here: one whose every entry is -1 or bad is seen by the layout kernel alone.
EPCOMM_DEVICE void note_bad_index(const IntraParams& p, i64 e, int t) {
  if (e < -1 || e >= p.num_experts)
    report_error(p.err, kErrBadInput, -1, kPhaseDispatch, t, -1, static_cast<u64>(p.num_experts),
                 static_cast<u64>(e));
}

template <typename T>
EPCOMM_DEVICE T* at(u64 base, u64 off) {
  return reinterpret_cast<T*>(base + off);
}

// Row layout in staging.  Dispatch: [payload][scales G x f32][src idx i32][topk idx K x i32]
// [weights K x f32]; combine: [payload (bf16)][weights K x f32].  Strides are padded to 128 bytes
// (epcomm.kernels.intranode.ROW_ALIGN) so row copies write whole lines.
template <int kHidden, bool kFp8>
struct DispatchRow {
  static constexpr int kPayload = kHidden * (kFp8 ? 1 : 2);
  static constexpr int kGroups = kFp8 ? kHidden / 128 : 0;
  static constexpr int kScaleOff = kPayload;
  static constexpr int kMetaOff = kPayload + kGroups * 4;
  static_assert(kPayload % 16 == 0, "row payload must be a multiple of 16 bytes");
  static_assert(!kFp8 || kHidden % 128 == 0, "FP8 needs hidden % 128 == 0");
};

// Chunk arrival flags: one per sending warp, so a sending warp publishes its own rows of a chunk
// and moves on; one flag per chunk needed a block barrier and a system fence per chunk, which
// stalled every warp of the block (about a fifth of the send time at 8 sending SMs, 2x H200).
constexpr int kChunkFlagSlots = kIntraThreads / 32;

EPCOMM_DEVICE u64* chunk_flags(u64 base, const IntraParams& p, int src, int chunk) {
  return at<u64>(base, p.flags_off) + (static_cast<u64>(src) * p.max_chunks + chunk) * kChunkFlagSlots;
}

// Dispatch chunks of one (source, destination) pair of n rows: chunks of CR rows, except that the
// last rows form `tail` chunks of CR / 4 rows.  Every sending block finishes its last chunk at about
// the same time, and those rows only become visible then, so the receive has that whole last
// wave still to copy after the last arrival; with small last chunks that wave is a quarter of
// the size.  Sender and receiver derive the same plan from the same count and rank count (the
// number of small chunks covers a last wave of up to 16 sending blocks).
// epcomm.kernels.intranode.dispatch_tail_chunks mirrors kTailChunks.
template <int R>
constexpr int kTailChunks = (16 + R - 2) / (R - 1) > 2 ? (16 + R - 2) / (R - 1) : 2;

// An aggregate (no constructor) so that kernels can keep one per peer in shared memory, built
// once per block instead of once per work item.
struct ChunkPlan {
  int n, cr, n_big, nc_big, cr_small, nchunks;
  static EPCOMM_DEVICE ChunkPlan make(int rows, int CR, int tail) {
    ChunkPlan c;
    c.n = rows;
    c.cr = CR;
    c.cr_small = max(CR / 4, 1);
    const int n_small = min(rows, tail * c.cr_small);
    c.n_big = rows - n_small;
    c.nc_big = (c.n_big + CR - 1) / CR;
    c.nchunks = c.nc_big + (n_small + c.cr_small - 1) / c.cr_small;
    return c;
  }
  EPCOMM_DEVICE int begin(int c) const { return c < nc_big ? c * cr : n_big + (c - nc_big) * cr_small; }
  EPCOMM_DEVICE int end(int c) const { return c < nc_big ? min((c + 1) * cr, n_big) : min(begin(c) + cr_small, n); }
};

// Sending warp: every lane's stores of the chunk are ordered (system scope) before the flag.
EPCOMM_DEVICE void warp_publish_chunk(u64* flags, int warp, int lane, u64 tag) {
  fence_sys();
  __syncwarp();
  if (lane == 0) st_release_sys_u64(flags + warp, tag);
}

// Receiving warp: wait until every sending warp published the chunk; all lanes return together:
// kWaitArrived, kWaitFailed on timeout (recorded, naming the chunk and source) or if another
// waiter gave up, kWaitMasked once the source is masked (shrink mode; a timeout masks it).
EPCOMM_DEVICE int warp_wait_chunk(const u64* flags, u64 tag, const IntraParams& p, u64 deadline, int phase,
                                  int chunk, int src, int lane) {
  int* const mask = intra_mask(p);
  bool done = lane >= kChunkFlagSlots || ld_volatile_u64(flags + lane) >= tag;
  // A source already masked is not waited for (a chunk it published before is still taken).
  if (mask != nullptr && !__all_sync(0xffffffffu, done) && rank_masked(mask, src)) return kWaitMasked;
  for (u32 i = 1; !__all_sync(0xffffffffu, done); ++i) {
    if (!done) done = ld_volatile_u64(flags + lane) >= tag;
    if ((i & 1023u) == 0) {
      int bad = 0;
      if (lane == 0) {
        bad = aborted(p.err) ? 1 : rank_masked(mask, src) ? 3 : (globaltimer_ns() > deadline ? 2 : 0);
        if (bad == 2 && mask != nullptr) {
          mask_rank(mask, src);
          bad = 3;
        }
      }
      bad = __shfl_sync(0xffffffffu, bad, 0);
      if (bad == 3) return kWaitMasked;
      if (bad) {
        const unsigned pending = __ballot_sync(0xffffffffu, !done);
        const int first = pending ? __ffs(pending) - 1 : 0;
        const u64 seen = __shfl_sync(0xffffffffu, lane < kChunkFlagSlots ? ld_volatile_u64(flags + lane) : 0, first);
        if (bad == 2 && lane == 0) report_error(p.err, kErrTimeout, p.rank, phase, chunk, src, tag, seen);
        return kWaitFailed;
      }
    }
  }
  if (lane < kChunkFlagSlots) ld_acquire_sys_u64(flags + lane);
  __syncwarp();
  return kWaitArrived;
}

// A wait on one peer's flag: a WaitResult (kWaitMasked only in shrink mode).
EPCOMM_DEVICE int deadline_phase_wait(const u64* flag, u64 tag, const IntraParams& p, u64 deadline,
                                      int phase, int channel, int peer) {
  return wait_geq_u64_masked(flag, tag, p.err, deadline, p.rank, phase, channel, peer, intra_mask(p));
}

// The words of the mailbox every rank must agree on (a dispatch's shape); their order is
// epcomm.kernels.intranode.MAILBOX_AGREE_FIELDS, which names them in the host's error message.
constexpr int kMailboxAgree = 5;
EPCOMM_DEVICE int mailbox_agree_field(const IntraParams& p, int f) {
  switch (f) {
    case 0: return p.hidden;
    case 1: return p.fp8;
    case 2: return p.num_topk;
    case 3: return p.num_experts;
    default: return p.chunk_rows;  // last: the host derives it from the others and the Config
  }
}

// ---------------------------------------------------------------------------------------------
// notify: block 0 advances the tag, waits for the previous call's acknowledgements, exchanges
// counts and publishes them (device and host); blocks 1..R scan is_token_in_rank for one
// destination each (send list, slots, count).  Launched cooperatively (block 0 waits for the
// scan blocks).  Cached mode: block 0 only (tag and acknowledgements).
// ---------------------------------------------------------------------------------------------
template <int kNumRanks>
__global__ void __launch_bounds__(1024) intranode_notify(const __grid_constant__ IntraParams p) {
  const int tid = threadIdx.x;
  const int R = kNumRanks;
  const int N = p.num_tokens;
  __shared__ int s_warp[32];
  __shared__ int s_counts[kNumRanks];
  __shared__ int s_live[kNumRanks];  // 0: the source is masked (shrink mode), its mailbox unread
  __shared__ int s_ok;
  prof_stamp(p, kProfNotify, 0);

  if (blockIdx.x > 0) {
    // ---- scan for destination d: ascending token order gives deterministic slots ----
    const int d = blockIdx.x - 1;
    const bool skip = rank_masked(intra_mask(p), d);  // a masked rank receives nothing
    int running = 0;
    for (int base = 0; base < N; base += 1024) {
      const int t = base + tid;
      const int in = (t < N && !skip && p.is_token_in_rank[static_cast<i64>(t) * R + d]) ? 1 : 0;
      const unsigned ballot = __ballot_sync(0xffffffffu, in);
      const int lane = tid & 31, w = tid >> 5;
      if (lane == 0) s_warp[w] = __popc(ballot);
      __syncthreads();
      if (w == 0) {
        int v = s_warp[lane];
        int incl = v;
#pragma unroll
        for (int o = 1; o < 32; o <<= 1) {
          const int y = __shfl_up_sync(0xffffffffu, incl, o);
          if (lane >= o) incl += y;
        }
        s_warp[lane] = incl - v;  // exclusive prefix of warp counts
      }
      __syncthreads();
      const int slot = running + s_warp[w] + __popc(ballot & ((1u << lane) - 1u));
      if (t < N) {
        p.send_pos[static_cast<i64>(t) * R + d] = in ? slot : -1;
        if (in) p.send_list[static_cast<i64>(d) * N + slot] = t;
      }
      // The block's last thread knows the running total after this tile.
      if (tid == 1023) s_ok = slot + in;
      __syncthreads();
      running = s_ok;
      __syncthreads();
    }
    if (tid == 0) {
      p.send_count[d] = running;
      fence_gpu();
      atomicAdd(&p.ctrl->scan_done, 1);
    }
    prof_stamp(p, kProfNotify, 1);
    return;
  }

  // ---- block 0: control ----
  __shared__ u64 s_tag;
  if (tid == 0) {
    const u64 tag = p.ctrl->op_seq + 1;
    p.ctrl->op_seq = tag;
    p.ctrl->cur_tag = tag;
    s_tag = tag;
  }
  __syncthreads();
  const u64 tag = s_tag;
  const u64 deadline = globaltimer_ns() + p.timeout_ns;
  const u64 me_base = p.peers[p.rank];

  // The peers must have consumed what we wrote into them during the previous operation
  // before we overwrite their mailbox (and, later, their staging) again.
  int ack_failed = 0;
  for (int d = tid; d < R; d += blockDim.x) {
    if (d == p.rank) continue;
    if (deadline_phase_wait(at<u64>(me_base, p.ack_off) + d, tag - 1, p, deadline, kPhaseDispatchNotifyAck, -1, d) ==
        kWaitFailed)
      ack_failed = 1;
  }
  if (p.cached) {
    if (__syncthreads_or(ack_failed) == 0 && tid == 0) p.ctrl->ok_tag = tag;
    prof_stamp(p, kProfNotify, 1);
    return;
  }
  // Wait for our own scan blocks (cooperative launch: they are resident).
  if (tid == 0) {
    for (u32 i = 1; ld_volatile_i32(&p.ctrl->scan_done) < R; ++i)
      if ((i & 1023u) == 0 && aborted(p.err)) break;
    p.ctrl->scan_done = 0;
    fence_gpu();
  }
  __syncthreads();
  for (int d = tid; d < R; d += blockDim.x) s_counts[d] = ld_volatile_i32(p.send_count + d);
  __syncthreads();

  // Mailbox of rank d, slot of this rank: [rows we send to d, the call's shape (kMailboxAgree
  // words), then our token count for each of d's local experts].
  const int L = p.num_experts / R;
  const int mb = p.mailbox_ints;
  constexpr int kHead = 1 + kMailboxAgree;
  int* const mask = intra_mask(p);
  for (int i = tid; i < R * (kHead + L); i += blockDim.x) {
    const int d = i / (kHead + L), j = i % (kHead + L);
    if (rank_masked(mask, d)) continue;  // shrink mode: nothing goes into a masked rank's memory
    int* box = at<int>(p.peers[d], p.mailbox_off) + static_cast<i64>(p.rank) * mb;
    int v;
    if (j == 0) v = s_counts[d];
    else if (j < kHead) v = mailbox_agree_field(p, j - 1);
    else v = p.num_tokens_per_expert != nullptr ? p.num_tokens_per_expert[d * L + (j - kHead)] : 0;
    box[j] = v;
  }
  __syncthreads();
  if (tid < R && !rank_masked(mask, tid)) {
    fence_sys();
    st_release_sys_u64(at<u64>(p.peers[tid], p.mailbox_tag_off) + p.rank, tag);
  }
  // Wait for every source's mailbox; a masked source (or, in shrink mode, one that times out)
  // counts as sending nothing.  A source writes its mailbox after its own acknowledgement waits.
  const u64 mb_deadline = shrink_deadline(deadline, p.timeout_ns, p.shrink, 1);
  for (int s = tid; s < R; s += blockDim.x) {
    const int got = deadline_phase_wait(at<u64>(me_base, p.mailbox_tag_off) + s, tag, p, mb_deadline,
                                        kPhaseDispatchNotifyCounts, -1, s);
    s_live[s] = got == kWaitMasked ? 0 : 1;
    // Heard from (or masked): a CPU that gives up waiting for the counts names the others.
    if (p.write_host && got != kWaitFailed) p.host_info[2 + s] = 0;
  }
  const int* boxes = at<int>(me_base, p.mailbox_off);
  __syncthreads();
  // Ranks that disagree on the shape would read each other's rows with the wrong layout or wait
  // for chunks that are never sent: every rank compares every peer's words with its own (so all
  // of them stop here, and none sends); a peer's first differing word (in field order, root
  // causes before chunk_rows, which follows from them) is reported.
  for (int s = tid; s < R; s += blockDim.x) {
    if (s == p.rank || !s_live[s]) continue;
    for (int f = 0; f < kMailboxAgree; ++f) {
      const int mine = mailbox_agree_field(p, f);
      const int theirs = ld_volatile_i32(boxes + static_cast<i64>(s) * mb + 1 + f);
      if (theirs != mine) {
        report_error(p.err, kErrMismatch, p.rank, kPhaseDispatchNotifyCounts, f, s,
                     static_cast<u64>(static_cast<u32>(mine)), static_cast<u64>(static_cast<u32>(theirs)));
        break;
      }
    }
  }
  __syncthreads();
  if (tid == 0) s_ok = aborted(p.err) ? 1 : 0;  // block-uniform decision
  __syncthreads();
  if (s_ok) return;
  if (tid == 0) {
    int acc = 0;
    for (int s = 0; s < R; ++s) {
      const int c = s_live[s] ? ld_volatile_i32(boxes + static_cast<i64>(s) * mb) : 0;
      p.rank_prefix[s] = acc;
      if (p.write_host) p.host_info[2 + s] = c;
      acc += c;
    }
    p.rank_prefix[R] = acc;
    if (p.write_host) p.host_info[1] = acc;
  }
  if (p.write_host) {
    for (int j = tid; j < L; j += blockDim.x) {
      int c = 0;
      for (int s = 0; s < R; ++s)
        if (s_live[s]) c += ld_volatile_i32(boxes + static_cast<i64>(s) * mb + kHead + j);
      const int a = p.expert_alignment;
      p.host_info[2 + R + j] = (c + a - 1) / a * a;
    }
  }
  __syncthreads();
  if (tid == 0) {
    intra_publish_mask(p);
    p.ctrl->ok_tag = tag;
    if (p.write_host) {
      fence_sys();
      st_release_sys_i32(p.host_info, 1);
    }
  }
  prof_stamp(p, kProfNotify, 1);
}

// Token t's FP8 scales from the input (any strides); lane l gets groups l, l + 32, ... in sc[0], sc[1], ...
template <typename Row>
EPCOMM_DEVICE void load_input_scales(const IntraParams& p, int t, int lane, float* sc) {
  constexpr int kPerLane = (Row::kGroups + 31) / 32;
#pragma unroll
  for (int j = 0; j < kPerLane; ++j) {
    const int g = j * 32 + lane;
    if (g < Row::kGroups) sc[j] = p.x_scales[static_cast<i64>(t) * p.scale_st + static_cast<i64>(g) * p.scale_sg];
  }
}

// ---------------------------------------------------------------------------------------------
// dispatch send: rows of this rank's tokens into the other ranks' staging regions.
// Work items are (destination, chunk), chunk-major and staggered by rank so every link is busy
// from the start; after a chunk each sending warp publishes its own arrival flag (fence, then a
// release store).
// ---------------------------------------------------------------------------------------------
template <int kNumRanks, int kHidden, bool kFp8>
__global__ void __launch_bounds__(kIntraThreads) intranode_dispatch_send(const __grid_constant__ IntraParams p) {
  using Row = DispatchRow<kHidden, kFp8>;
  constexpr int R = kNumRanks;
  const int lane = lane_id(), warp = warp_id();
  constexpr int kWarps = kIntraThreads / 32;
  prof_stamp(p, kProfSend, 0);
  const u64 tag = *reinterpret_cast<volatile u64*>(&p.ctrl->cur_tag);
  // notify failed (recorded): the counts or the peers' consent are missing, so send nothing.
  if (*reinterpret_cast<volatile u64*>(&p.ctrl->ok_tag) != tag) return;
  const int N = p.num_tokens, K = p.num_topk, CR = p.chunk_rows;
  const int L = p.num_experts / R;
  // The plan (and so which block takes which item) must not depend on the mask: blocks read it
  // at different times, and a rank masked between two reads would shift the item numbering of
  // one block against another's, leaving chunks of a live destination to no block.  A masked
  // destination's items are numbered as usual and skipped (a rank masked by the notify's scan
  // already has send_count 0).
  __shared__ ChunkPlan s_plan[R];
  for (int d = threadIdx.x; d < R; d += blockDim.x)
    s_plan[d] = ChunkPlan::make(d == p.rank ? 0 : p.send_count[d], CR, kTailChunks<R>);
  __syncthreads();
  int max_nc = 0;
  for (int d = 0; d < R; ++d) max_nc = max(max_nc, s_plan[d].nchunks);
  const int* const mask = intra_mask(p);
  int item = 0;
  for (int c = 0; c < max_nc; ++c) {
    for (int j = 1; j < R; ++j) {
      const int d = (p.rank + j) % R;
      const ChunkPlan& plan = s_plan[d];
      if (c >= plan.nchunks) continue;
      if ((item++ % gridDim.x) != blockIdx.x) continue;
      if (rank_masked(mask, d)) continue;  // shrink mode: nothing goes into a masked rank's memory
      const int row_begin = plan.begin(c);
      const int row_end = plan.end(c);
      u8* region = at<u8>(p.peers[d], p.staging_off) + static_cast<u64>(p.rank) * p.region_bytes;
      const int* list = p.send_list + static_cast<i64>(d) * N;
      // Every load a row needs (its token id one row ahead, then top-k entries and scales) is
      // issued before its payload copy, so a row costs the copy's latencies and little more.
      int t_next = row_begin + warp < row_end ? list[row_begin + warp] : 0;
      for (int i = row_begin + warp; i < row_end; i += kWarps) {
        const int t = t_next;
        if (i + kWarps < row_end) t_next = list[i + kWarps];
        u8* dst = region + static_cast<u64>(i) * p.row_bytes;
        const bool meta_lane = !p.cached && lane < K;
        i64 e = -1;
        float wgt = 0.0f;
        if (meta_lane) {
          e = p.topk_idx[static_cast<i64>(t) * K + lane];
          if (p.topk_weights != nullptr) wgt = p.topk_weights[static_cast<i64>(t) * K + lane];
          note_bad_index(p, e, t);
        }
        constexpr int kScalesPerLane = (Row::kGroups + 31) / 32;
        float sc[kScalesPerLane > 0 ? kScalesPerLane : 1];
        if constexpr (kFp8) load_input_scales<Row>(p, t, lane, sc);
        warp_copy_row<Row::kPayload / 16, false>(reinterpret_cast<V4*>(dst),
                                                 reinterpret_cast<const V4*>(p.x + static_cast<i64>(t) * Row::kPayload),
                                                 lane);
        if constexpr (kFp8) {
          float* ds = reinterpret_cast<float*>(dst + Row::kScaleOff);
#pragma unroll
          for (int j = 0; j < kScalesPerLane; ++j) {
            const int g = j * 32 + lane;
            if (g < Row::kGroups) ds[g] = sc[j];
          }
        }
        int* meta = reinterpret_cast<int*>(dst + Row::kMetaOff);
        if (lane == 0) meta[0] = t;
        if (!p.cached && K > 0) {
          for (int k = lane; k < K; k += 32) {
            if (k >= 32) {
              e = p.topk_idx[static_cast<i64>(t) * K + k];
              wgt = p.topk_weights != nullptr ? p.topk_weights[static_cast<i64>(t) * K + k] : 0.0f;
              note_bad_index(p, e, t);
            }
            const bool mine = e >= 0 && e < p.num_experts && static_cast<int>(e) / L == d;
            meta[1 + k] = mine ? static_cast<int>(e) - d * L : -1;
            reinterpret_cast<float*>(meta + 1 + K)[k] = mine ? wgt : 0.0f;
          }
        }
      }
      warp_publish_chunk(chunk_flags(p.peers[d], p, p.rank, c), warp, lane, tag);
    }
  }
  prof_stamp(p, kProfSend, 1);
}

// ---------------------------------------------------------------------------------------------
// dispatch receive: copies rows into the outputs in (source rank, source token) order.  The
// rank's own rows come from the input directly.  The last block to finish acknowledges every
// source, releasing its staging region and mailbox for the next operation.
//
// Work is taken by each warp from per-source queues (counters in IntraCtrl, zero between calls):
// a peer item is what one sending warp published for one chunk (its flag), an own item is
// kOwnItemRows consecutive own rows.  A warp takes an arrived peer item if one is at the head of
// a queue, otherwise own rows, otherwise the next peer item of some source, on which it waits.
// Why not a fixed assignment (whole chunks dealt round-robin to blocks): half of the blocks
// would hold all the own rows and the other half all the peer chunks, and the chunks the
// senders finish last (one per sending block, all at about the same time) would be copied by
// one block each, a tail of one chunk's copy time (~45 us for 128 BF16 rows of 7168 channels
// at ~44 GB/s per SM, 2x H200, profile-normal-h200-x2-host-reads.json) after the last arrival.
// With the queues every receiving warp shares that last wave.  Rows have fixed output positions, so which warp copies
// a row does not change the result (bitwise deterministic).
// ---------------------------------------------------------------------------------------------
constexpr int kOwnItemRows = 8;

// Copy rows begin, begin + step, ... < end of source s (staging for a peer, the input for this
// rank) to output rows out_base + i.  Every small load of a row (top-k entries, weights, scales,
// source index) is issued before its payload copy, so their latency hides behind the copy's.
template <typename Row>
EPCOMM_DEVICE void recv_rows(const IntraParams& p, int s, int begin, int end, int step, int out_base,
                             const u8* region, int K, int L, int lane) {
  const bool own = s == p.rank;
  const int M = p.out_rows;
  const int* list = p.send_list + static_cast<i64>(s) * p.num_tokens;
  constexpr int kScalesPerLane = (Row::kGroups + 31) / 32;
  int t_next = own && begin < end ? list[begin] : 0;
  for (int i = begin; i < end; i += step) {
    const int out_row = out_base + i;
    int src_t = t_next;
    if (own && i + step < end) t_next = list[i + step];
    if (out_row >= M) continue;
    const u8* src;
    i64 e = -1;
    float wgt = 0.0f;
    float sc[kScalesPerLane > 0 ? kScalesPerLane : 1];
    if (own) {
      src = p.x + static_cast<i64>(src_t) * Row::kPayload;
      if (lane < K) {
        e = p.topk_idx[static_cast<i64>(src_t) * K + lane];
        if (p.topk_weights != nullptr) wgt = p.topk_weights[static_cast<i64>(src_t) * K + lane];
      }
      if constexpr (Row::kGroups > 0) load_input_scales<Row>(p, src_t, lane, sc);
    } else {
      src = region + static_cast<u64>(i) * p.row_bytes;
      const int* meta = reinterpret_cast<const int*>(src + Row::kMetaOff);
      src_t = lane == 0 ? meta[0] : 0;
      if (lane < K) {
        e = meta[1 + lane];
        wgt = reinterpret_cast<const float*>(meta + 1 + K)[lane];
      }
      if constexpr (Row::kGroups > 0) {
        const float* ss = reinterpret_cast<const float*>(src + Row::kScaleOff);
#pragma unroll
        for (int j = 0; j < kScalesPerLane; ++j) {
          const int g = j * 32 + lane;
          if (g < Row::kGroups) sc[j] = ss[g];
        }
      }
    }
    u8* dst = p.recv_x + static_cast<i64>(out_row) * Row::kPayload;
    if (own)
      warp_copy_row<Row::kPayload / 16, false>(reinterpret_cast<V4*>(dst), reinterpret_cast<const V4*>(src), lane);
    else
      warp_copy_row<Row::kPayload / 16, true>(reinterpret_cast<V4*>(dst), reinterpret_cast<const V4*>(src), lane);
    if constexpr (Row::kGroups > 0) {
#pragma unroll
      for (int j = 0; j < kScalesPerLane; ++j) {
        const int g = j * 32 + lane;
        if (g < Row::kGroups)
          p.recv_scales[static_cast<i64>(out_row) * p.rscale_st + static_cast<i64>(g) * p.rscale_sg] = sc[j];
      }
    }
    for (int k = lane; k < K; k += 32) {
      i64 idx;
      float wk;
      if (own) {
        if (k >= 32) {
          e = p.topk_idx[static_cast<i64>(src_t) * K + k];
          wgt = p.topk_weights != nullptr ? p.topk_weights[static_cast<i64>(src_t) * K + k] : 0.0f;
        }
        note_bad_index(p, e, src_t);
        const bool mine = e >= 0 && e < p.num_experts && static_cast<int>(e) / L == p.rank;
        idx = mine ? e - static_cast<i64>(p.rank) * L : -1;
        wk = mine ? wgt : 0.0f;
      } else {
        const int* meta = reinterpret_cast<const int*>(src + Row::kMetaOff);
        idx = k >= 32 ? meta[1 + k] : e;
        wk = k >= 32 ? reinterpret_cast<const float*>(meta + 1 + K)[k] : wgt;
      }
      p.recv_topk_idx[static_cast<i64>(out_row) * K + k] = idx;
      if (p.recv_topk_weights != nullptr) p.recv_topk_weights[static_cast<i64>(out_row) * K + k] = wk;
    }
    if (lane == 0 && p.recv_src_idx != nullptr) p.recv_src_idx[out_row] = src_t;
  }
}

// Shrink mode: rows of a source masked after its counts arrived (it died mid-call) are never
// copied; their top-k entries and source index say so (-1, weight 0), as padding rows do.
EPCOMM_DEVICE void clear_rows(const IntraParams& p, int out_base, int begin, int end, int step, int K, int lane) {
  for (int i = begin; i < end; i += step) {
    const int out_row = out_base + i;
    if (out_row >= p.out_rows) continue;
    for (int k = lane; k < K; k += 32) {
      p.recv_topk_idx[static_cast<i64>(out_row) * K + k] = -1;
      if (p.recv_topk_weights != nullptr) p.recv_topk_weights[static_cast<i64>(out_row) * K + k] = 0.0f;
    }
    if (lane == 0 && p.recv_src_idx != nullptr) p.recv_src_idx[out_row] = -1;
  }
}

template <int kNumRanks, int kHidden, bool kFp8>
__global__ void __launch_bounds__(kIntraThreads) intranode_dispatch_recv(const __grid_constant__ IntraParams p) {
  using Row = DispatchRow<kHidden, kFp8>;
  constexpr int R = kNumRanks;
  constexpr int kWarps = kIntraThreads / 32;
  const int lane = lane_id(), warp = warp_id();
  __shared__ int s_prefix[R + 1];
  __shared__ int s_items[R];  // queue length per source
  __shared__ ChunkPlan s_plan[R];
  prof_stamp(p, kProfRecv, 0);
  const u64 tag = *reinterpret_cast<volatile u64*>(&p.ctrl->cur_tag);
  // notify failed (recorded): rank_prefix was never written, so touch nothing.
  if (*reinterpret_cast<volatile u64*>(&p.ctrl->ok_tag) != tag) return;
  const u64 deadline = globaltimer_ns() + p.timeout_ns;
  const int K = p.cached ? 0 : p.num_topk, CR = p.chunk_rows;
  const int L = p.num_experts / R;
  const u64 me_base = p.peers[p.rank];
  const u8* my_staging = at<u8>(me_base, p.staging_off);
  const int M = p.out_rows;
  int* const heads = p.ctrl->recv_heads;

  for (int s = threadIdx.x; s <= R; s += blockDim.x) s_prefix[s] = ld_volatile_i32(p.rank_prefix + s);
  __syncthreads();
  for (int s = threadIdx.x; s < R; s += blockDim.x) {
    const int count = s_prefix[s + 1] - s_prefix[s];
    s_plan[s] = ChunkPlan::make(count, CR, kTailChunks<R>);
    s_items[s] = s == p.rank ? (count + kOwnItemRows - 1) / kOwnItemRows : s_plan[s].nchunks * kWarps;
  }
  __syncthreads();
  const int total = s_prefix[R];
  // Speculative outputs (allocated before the counts were known, from the sizes of earlier
  // calls) that are too small: every block leaves before writing anything (and before taking
  // work) and without acknowledging; the host sees the same counts and launches a receive with
  // exact outputs.
  if (total > M && p.speculative) return;
  if (total > M && blockIdx.x == 0 && threadIdx.x == 0)
    report_error(p.err, kErrOverflow, p.rank, kPhaseDispatchRecv, -1, -1, static_cast<u64>(M),
                 static_cast<u64>(total));

  const int gwarp = blockIdx.x * kWarps + warp;
  bool failed = false, own_left = true;
  for (int round = 0;; ++round) {
    int s = -1, h = -1;
    // 1. An arrived peer item at the head of a queue (lane q looks at source b + q).
    for (int b = 0; b < R && s < 0; b += 32) {
      const int src = b + lane;
      int hh = 0;
      bool ready = false;
      if (src < R && src != p.rank) {
        hh = ld_volatile_i32(heads + src);
        if (hh < s_items[src])
          ready = ld_volatile_u64(chunk_flags(me_base, p, src, hh / kWarps) + hh % kWarps) >= tag;
      }
      for (unsigned m = __ballot_sync(0xffffffffu, ready); m != 0u; m &= m - 1u) {
        const int q = __ffs(m) - 1;
        const int want = __shfl_sync(0xffffffffu, hh, q);
        int got = 0;
        if (lane == 0) got = atomicCAS(heads + b + q, want, want + 1);
        if (__shfl_sync(0xffffffffu, got, 0) == want) {
          s = b + q;
          h = want;
          break;
        }
      }
    }
    // 2. Own rows: they need no waiting.
    if (s < 0 && own_left) {
      int got = 0;
      if (lane == 0) got = atomicAdd(heads + p.rank, 1);
      got = __shfl_sync(0xffffffffu, got, 0);
      if (got < s_items[p.rank]) {
        s = p.rank;
        h = got;
      } else {
        own_left = false;
      }
    }
    // 3. The next peer item of some source (warps start at different sources), then wait for it.
    if (s < 0) {
      for (int j = 0; j < R - 1 && s < 0; ++j) {
        const int src = (p.rank + 1 + (gwarp + round + j) % (R - 1)) % R;
        int got = 0;
        if (lane == 0) got = atomicAdd(heads + src, 1);
        got = __shfl_sync(0xffffffffu, got, 0);
        if (got < s_items[src]) {
          s = src;
          h = got;
        }
      }
      if (s < 0) break;  // every queue is empty
    }
    const int count = s_prefix[s + 1] - s_prefix[s];
    if (s == p.rank) {
      recv_rows<Row>(p, s, h * kOwnItemRows, min(h * kOwnItemRows + kOwnItemRows, count), 1, s_prefix[s],
                     nullptr, K, L, lane);
      continue;
    }
    const int c = h / kWarps, w = h % kWarps;
    const ChunkPlan& plan = s_plan[s];
    const int begin = plan.begin(c) + w, end = plan.end(c);
    if (begin >= end) continue;  // that sending warp had no rows in this chunk
    const u64* flag = chunk_flags(me_base, p, s, c) + w;
    int ok = kWaitArrived;
    if (lane == 0) ok = deadline_phase_wait(flag, tag, p, deadline, kPhaseDispatchRecv, c, s);
    ok = __shfl_sync(0xffffffffu, ok, 0);
    if (ok == kWaitMasked) {  // shrink mode: the source died after its counts; its rows stay empty
      clear_rows(p, s_prefix[s], begin, end, kWarps, K, lane);
      continue;
    }
    if (ok == kWaitFailed) {
      failed = true;
      break;
    }
    recv_rows<Row>(p, s, begin, end, kWarps, s_prefix[s], my_staging + static_cast<u64>(s) * p.region_bytes, K,
                   L, lane);
  }
  // Padding rows of the num_worst_tokens mode: top-k -1, weight 0, source -1.
  if (p.worst_mode) {
    const int pad_begin = min(total, M);
    for (int r = pad_begin + blockIdx.x * kIntraThreads + threadIdx.x; r < M; r += gridDim.x * kIntraThreads) {
      for (int k = 0; k < K; ++k) {
        p.recv_topk_idx[static_cast<i64>(r) * K + k] = -1;
        if (p.recv_topk_weights != nullptr) p.recv_topk_weights[static_cast<i64>(r) * K + k] = 0.0f;
      }
      if (p.recv_src_idx != nullptr) p.recv_src_idx[r] = -1;
    }
  }
  // A failed wait (recorded) leaves the peers unacknowledged and the queues dirty: the buffer is
  // unusable anyway.  The last block resets the queues (every warp has stopped taking work).
  if (__syncthreads_or(failed) == 0 && threadIdx.x == 0) {
    fence_gpu();
    if (atomicAdd(&p.ctrl->recv_done, 1) == static_cast<int>(gridDim.x) - 1) {
      p.ctrl->recv_done = 0;
      for (int s = 0; s < R; ++s) heads[s] = 0;
      intra_publish_mask(p);
      fence_sys();
      for (int s = 0; s < R; ++s)
        if (s != p.rank && !rank_masked(intra_mask(p), s)) st_release_sys_u64(at<u64>(p.peers[s], p.ack_off) + p.rank, tag);
    }
  }
  prof_stamp(p, kProfRecv, 1);
}

// ---------------------------------------------------------------------------------------------
// Column-major FP8 scales of a speculative receive.  The receive ran before the row count was
// known, so it wrote the scales as [G, src_ld] (src_ld = the speculative allocation's rows).
// The caller gets [G, M] with leading dimension exactly M, as from a receive into exact outputs
// (GEMM scale loaders check that stride), so once M is known the host queues this kernel
// behind the receive to pack the M valid entries of each of the G rows into a fresh array.
// ---------------------------------------------------------------------------------------------
struct CompactScalesParams {
  const float* src;  // [groups, src_ld]
  float* dst;        // [groups, rows]
  i64 src_ld;
  i64 rows;
  int groups;
  int pad;
};

template <int kThreads>
__global__ void __launch_bounds__(kThreads) intranode_compact_scales(const __grid_constant__ CompactScalesParams p) {
  const i64 n = p.rows * p.groups;
  const i64 stride = static_cast<i64>(gridDim.x) * kThreads;
  for (i64 i = static_cast<i64>(blockIdx.x) * kThreads + threadIdx.x; i < n; i += stride) {
    const i64 g = i / p.rows;
    p.dst[i] = p.src[g * p.src_ld + (i - g * p.rows)];
  }
}

// ---------------------------------------------------------------------------------------------
// combine: blocks [0, S) send every row received from source s back into s's staging region
// (contiguous: the rows of source s are one range in our receive order and map 1:1 onto s's
// slots); blocks [S, grid) reduce, for each local token, the rows that came back from every
// rank in ascending rank order (fp32 accumulation, then the biases), as epcomm.reference does.
// kBiasFirst: DeepEP V1's order instead (csrc/kernels/legacy/intranode.cu, combine): the sum
// starts as bias_0 + bias_1 (a missing bias read as +0) and the ranks follow.
// Launched cooperatively.
// ---------------------------------------------------------------------------------------------
template <int kNumRanks, int kHidden, bool kBiasFirst = false>
__global__ void __launch_bounds__(kIntraThreads) intranode_combine(const __grid_constant__ IntraParams p) {
  constexpr int R = kNumRanks;
  constexpr int kPayload = kHidden * 2;
  constexpr int kN16 = kPayload / 16;
  static_assert(kPayload % 16 == 0, "combine row must be a multiple of 16 bytes");
  const int lane = lane_id(), warp = warp_id();
  constexpr int kWarps = kIntraThreads / 32;
  const int N = p.num_tokens, K = p.num_topk, CR = p.chunk_rows;
  const u64 me_base = p.peers[p.rank];
  __shared__ u64 s_tag;
  __shared__ int s_go, s_dead;
  prof_stamp(p, kProfCombine, 0);
  if (threadIdx.x == 0) {
    s_tag = *reinterpret_cast<volatile u64*>(&p.ctrl->op_seq) + 1;
    // The last dispatch's notify failed (recorded): its receive offsets were never written.
    s_dead = *reinterpret_cast<volatile u64*>(&p.ctrl->ok_tag) != *reinterpret_cast<volatile u64*>(&p.ctrl->cur_tag);
  }
  __syncthreads();
  if (s_dead) return;
  const u64 tag = s_tag;
  const u64 deadline = globaltimer_ns() + p.timeout_ns;
  int prefix[R + 1];
#pragma unroll
  for (int s = 0; s <= R; ++s) prefix[s] = p.rank_prefix[s];

  if (static_cast<int>(blockIdx.x) < p.num_send_blocks) {
    // ---- send role ----
    if (threadIdx.x < R && static_cast<int>(threadIdx.x) != p.rank)
      deadline_phase_wait(at<u64>(me_base, p.ack_off) + threadIdx.x, tag - 1, p, deadline,
                          kPhaseCombineSendAck, -1, threadIdx.x);
    __syncthreads();
    if (threadIdx.x == 0) s_go = aborted(p.err) ? 0 : 1;
    __syncthreads();
    int nchunks[R];
    int max_nc = 0;
#pragma unroll
    for (int s = 0; s < R; ++s) {
      nchunks[s] = s == p.rank ? 0 : (prefix[s + 1] - prefix[s] + CR - 1) / CR;
      max_nc = max(max_nc, nchunks[s]);
    }
    int item = 0;
    for (int c = 0; c < max_nc && s_go; ++c) {
      for (int j = 1; j < R; ++j) {
        const int s = (p.rank + j) % R;
        if (c >= nchunks[s]) continue;
        if ((item++ % p.num_send_blocks) != static_cast<int>(blockIdx.x)) continue;
        if (rank_masked(intra_mask(p), s)) continue;  // shrink mode: the source is gone
        const int count = prefix[s + 1] - prefix[s];
        const int row_begin = c * CR, row_end = min(row_begin + CR, count);
        u8* region = at<u8>(p.peers[s], p.staging_off) + static_cast<u64>(p.rank) * p.region_bytes;
        for (int i = row_begin + warp; i < row_end; i += kWarps) {
          const i64 src_row = prefix[s] + i;
          u8* dst = region + static_cast<u64>(i) * p.row_bytes;
          const float wv = p.topk_weights != nullptr && lane < K ? p.topk_weights[src_row * K + lane] : 0.0f;
          warp_copy_row<kN16, false>(reinterpret_cast<V4*>(dst), reinterpret_cast<const V4*>(p.x + src_row * kPayload),
                                     lane);
          if (p.topk_weights != nullptr) {
            float* dw = reinterpret_cast<float*>(dst + kPayload);
            for (int k = lane; k < K; k += 32) dw[k] = k < 32 ? wv : p.topk_weights[src_row * K + k];
          }
        }
        warp_publish_chunk(chunk_flags(p.peers[s], p, p.rank, c), warp, lane, tag);
      }
    }
  } else {
    // ---- receive role: one warp per token.  Tiles of kWarps tokens are dealt round-robin to
    // the blocks, so every block advances through the tokens at the pace the peers' rows arrive
    // (they send in token order); contiguous ranges per block left the last block all its work
    // after the last arrival. ----
    const int nrecv = gridDim.x - p.num_send_blocks;
    // A peer's send role sends after its acknowledgement waits (concurrent with these waits).
    const u64 rdeadline = shrink_deadline(deadline, p.timeout_ns, p.shrink, 1);
    const int rb = blockIdx.x - p.num_send_blocks;
    const u8* my_staging = at<u8>(me_base, p.staging_off);
    int known[R];  // last chunk of each rank known to have arrived (slots grow with t)
#pragma unroll
    for (int d = 0; d < R; ++d) known[d] = -1;
    for (int t = rb * kWarps + warp; t < N; t += nrecv * kWarps) {
      const u8* src[R];
      bool ok = true;
#pragma unroll
      for (int d = 0; d < R; ++d) {
        const int pos = p.send_pos[static_cast<i64>(t) * R + d];
        src[d] = nullptr;
        if (pos < 0) continue;
        if (d == p.rank) {
          src[d] = p.x + static_cast<i64>(prefix[d] + pos) * kPayload;
          continue;
        }
        const int c = pos / CR;
        if (c != known[d]) {
          const int got = warp_wait_chunk(chunk_flags(me_base, p, d, c), tag, p, rdeadline, kPhaseCombineRecv, c, d, lane);
          if (got == kWaitFailed) ok = false;
          if (got == kWaitMasked) continue;  // shrink mode: that rank's part is absent (known[d] unchanged)
          known[d] = c;
        }
        src[d] = my_staging + static_cast<u64>(d) * p.region_bytes + static_cast<u64>(pos) * p.row_bytes;
      }
      if (!ok) break;
      const u16* b0 = p.bias0 != nullptr ? p.bias0 + static_cast<i64>(t) * kHidden : nullptr;
      const u16* b1 = p.bias1 != nullptr ? p.bias1 + static_cast<i64>(t) * kHidden : nullptr;
      V4* out = reinterpret_cast<V4*>(p.out + static_cast<i64>(t) * kHidden);
      // 16-byte words per lane per round: every source's (and bias's) words are loaded before
      // any is added, so (R + 2) * kTV loads are in flight per lane; the sums then run word by
      // word, so only one word's 8 accumulators are live at a time.
      constexpr int kTV = R <= 2 ? 7 : (R <= 4 ? 4 : 2);
      const u16* bias[2] = {b0, b1};
      for (int base = 0; base < kN16; base += 32 * kTV) {
        V4 vals[R][kTV];
        V4 bvals[2][kTV];
#pragma unroll
        for (int d = 0; d < R; ++d) {
          const V4* sv = reinterpret_cast<const V4*>(src[d]);
#pragma unroll
          for (int u = 0; u < kTV; ++u) {
            const int idx = base + u * 32 + lane;
            vals[d][u] = V4{0, 0, 0, 0};
            if (sv != nullptr && idx < kN16) vals[d][u] = d == p.rank ? ld_nc_v4(sv + idx) : ld_cg_v4(sv + idx);
          }
        }
#pragma unroll
        for (int bi = 0; bi < 2; ++bi)
#pragma unroll
          for (int u = 0; u < kTV; ++u) {
            const int idx = base + u * 32 + lane;
            bvals[bi][u] = V4{0, 0, 0, 0};
            if (bias[bi] != nullptr && idx < kN16) bvals[bi][u] = ld_nc_v4(reinterpret_cast<const V4*>(bias[bi]) + idx);
          }
#pragma unroll
        for (int u = 0; u < kTV; ++u) {
          const int idx = base + u * 32 + lane;
          if (idx >= kN16) continue;
          float acc[8];
#pragma unroll
          for (int e = 0; e < 8; ++e) acc[e] = 0.0f;
          if constexpr (kBiasFirst) {
            const V4 b0v = bvals[0][u], b1v = bvals[1][u];  // zero words where a bias is missing
            const u32 x0[4] = {static_cast<u32>(b0v.x), static_cast<u32>(b0v.y), static_cast<u32>(b0v.z),
                               static_cast<u32>(b0v.w)};
            const u32 x1[4] = {static_cast<u32>(b1v.x), static_cast<u32>(b1v.y), static_cast<u32>(b1v.z),
                               static_cast<u32>(b1v.w)};
#pragma unroll
            for (int e = 0; e < 4; ++e) {
              acc[2 * e] = __fadd_rn(bf16_to_f32(static_cast<u16>(x0[e] & 0xFFFFu)),
                                     bf16_to_f32(static_cast<u16>(x1[e] & 0xFFFFu)));
              acc[2 * e + 1] = __fadd_rn(bf16_to_f32(static_cast<u16>(x0[e] >> 16)),
                                         bf16_to_f32(static_cast<u16>(x1[e] >> 16)));
            }
          }
          // Ascending rank order, then bias 0, then bias 1: the order epcomm.reference uses
          // (with kBiasFirst, the ranks only).
#pragma unroll
          for (int d = 0; d < (kBiasFirst ? R : R + 2); ++d) {
            if (d < R ? src[d] == nullptr : bias[d - R] == nullptr) continue;
            const V4 v = d < R ? vals[d][u] : bvals[d - R][u];
            const u32 w[4] = {static_cast<u32>(v.x), static_cast<u32>(v.y), static_cast<u32>(v.z), static_cast<u32>(v.w)};
#pragma unroll
            for (int e = 0; e < 4; ++e) {
              acc[2 * e] = __fadd_rn(acc[2 * e], bf16_to_f32(static_cast<u16>(w[e] & 0xFFFFu)));
              acc[2 * e + 1] = __fadd_rn(acc[2 * e + 1], bf16_to_f32(static_cast<u16>(w[e] >> 16)));
            }
          }
          V4 o;
          o.x = static_cast<int>(f32_to_bf16(acc[0]) | (static_cast<u32>(f32_to_bf16(acc[1])) << 16));
          o.y = static_cast<int>(f32_to_bf16(acc[2]) | (static_cast<u32>(f32_to_bf16(acc[3])) << 16));
          o.z = static_cast<int>(f32_to_bf16(acc[4]) | (static_cast<u32>(f32_to_bf16(acc[5])) << 16));
          o.w = static_cast<int>(f32_to_bf16(acc[6]) | (static_cast<u32>(f32_to_bf16(acc[7])) << 16));
          st_na_v4(out + idx, o);
        }
      }
      if (p.out_weights != nullptr) {
        for (int k = lane; k < K; k += 32) {
          float a = 0.0f;
#pragma unroll
          for (int d = 0; d < R; ++d) {
            if (src[d] == nullptr) continue;
            float w;
            if (d == p.rank) {
              const int pos = p.send_pos[static_cast<i64>(t) * R + d];
              w = p.topk_weights[static_cast<i64>(prefix[d] + pos) * K + k];
            } else {
              w = reinterpret_cast<const float*>(src[d] + kPayload)[k];
            }
            a = __fadd_rn(a, w);
          }
          p.out_weights[static_cast<i64>(t) * K + k] = a;
        }
      }
    }
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    fence_gpu();
    if (atomicAdd(&p.ctrl->comb_done, 1) == static_cast<int>(gridDim.x) - 1) {
      p.ctrl->comb_done = 0;
      p.ctrl->op_seq = tag;
      intra_publish_mask(p);
      fence_sys();
      for (int s = 0; s < R; ++s)
        if (s != p.rank && !rank_masked(intra_mask(p), s)) st_release_sys_u64(at<u64>(p.peers[s], p.ack_off) + p.rank, tag);
    }
  }
  prof_stamp(p, kProfCombine, 1);
}

}  // namespace epcomm
