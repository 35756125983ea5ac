// High-throughput dispatch and combine across nodes: NVSHMEM puts between nodes, NVLink inside.
//
// Ranks form M nodes of P consecutive ranks (rank r = node * P + local).  Everything lives in
// the NVSHMEM symmetric heap; offsets are the same on every rank (epcomm.kernels.internode.
// InterLayout).
//
// Dispatch: a token crosses the network at most once per destination node, to the forwarder
// there, the rank with the sender's local index.  Every rank of that node that holds one of the
// token's experts then copies it over NVLink out of the forwarder's receive region into its own
// outputs (the NVLink hop is pulled by the receiver: its outputs are ordinary allocations no
// peer can address).  A token for the sender's own node goes to the sender itself (its own
// forwarder) through the same path.
// * The sender knows every slot itself: a token's slot in its region at the forwarder is its
//   index among the sender's tokens to that node, and its row at a receiver is the receiver's
//   offset for the sender plus its index among the sender's tokens to that receiver (carried in
//   the message).  So rows land in the final order (source rank, then source token) and only
//   counts cross in a header.
// * Messages are staged per destination node in the sender's heap, so each chunk of rows is one
//   contiguous put, followed by a fence and the chunk's flag (NVSHMEM delivers the flag after
//   the data).
// * Regions are sized for the worst case (every token of every source of the forwarder's local
//   index); a sender never waits for space inside a call, only for the previous call's
//   acknowledgements.
//
// Combine is the inverse.  Every rank copies its expert outputs into its heap (stage); the
// forwarder of each (source, node) pair reads the rows of that node's ranks over NVLink, adds
// them in fp32 in ascending rank order, and puts one fp32 partial per token to the source; the
// source adds the partials in ascending node order, then the biases.
//
// Flags carry 64-bit operation tags kept in device memory and advanced by the kernels, so a
// captured CUDA graph replays correctly.  Waits time out (EPCOMM_TIMEOUT_S) naming the phase,
// the hop, the channel and the peer.
#pragma once
#include "epcomm_common.cuh"
#include "epcomm_nvshmem.cuh"

namespace epcomm {

constexpr int kInterThreads = 512;
constexpr int kInterWarps = kInterThreads / 32;
constexpr int kInterMaxRanks = 256;
// The combine's reduction holds one row address per lane (one lane per rank of the node).
constexpr int kInterMaxRanksPerNode = 32;
constexpr int kInterMaxTopk = 32;

enum InterPhase : int {
  kPhaseInterSendAck = 60,      // dispatch send: the destination node's receivers have not released our region (network)
  kPhaseInterHeader = 61,       // dispatch notify: a source's counts have not arrived at the forwarder (network)
  kPhaseInterRecv = 62,         // dispatch receive: a chunk of a source's rows has not arrived at the forwarder (network)
  kPhaseInterStageAck = 63,     // combine stage: a forwarder of this node still reads our previous rows (NVLink)
  kPhaseInterStaged = 64,       // combine reduce: a rank of this node has not staged its rows (NVLink)
  kPhaseInterReduceAck = 65,    // combine reduce: a source has not released our partials region (network)
  kPhaseInterCombRecv = 66,     // combine receive: a chunk of partials from a node has not arrived (network)
  kPhaseInterDispatch = 67,     // a bad expert index seen by the dispatch (its record only)
};

// This rank's private control words (device memory).
struct InterCtrl {
  u64 disp_tag;     // tag of the last dispatch (advanced by the send kernel's last block)
  u64 comb_tag;     // tag of the last combine (advanced by the stage kernel's last block)
  u64 ok_tag;       // = disp_tag once this dispatch's notify found every source's shape equal
  int send_done, recv_done, stage_done, reduce_done, crecv_done, pad;
  int src_slots[kInterMaxRanks];  // notify: slots of each source at its forwarder in this node
};

struct InterParams {
  u64 peer_base[kInterMaxRanksPerNode];  // heap base of each rank of this node (by local index)
  u8* heap;                   // this rank's heap (symmetric address for NVSHMEM calls)
  InterCtrl* ctrl;
  ErrorRecord* err;
  int* host_info;             // host-mapped: [0] tag, [1] total rows, [2, 2+R) rows per source, then L expert counts
  // Heap layout (byte offsets, identical on every rank).
  u64 hdr_flag_off;           // u64 [R]: header of source s arrived (at s's forwarder)
  u64 hdr_off;                // [R][hdr_stride]
  u64 hdr_stage_off;          // [M][hdr_stride]: headers being sent (sender)
  u64 disp_ack_off;           // u64 [M]: receivers of node m done with our previous dispatch (ADD)
  u64 disp_flag_off;          // u64 [M][max_chunks]: chunk c from source node m arrived
  u64 stage_flag_off;         // u64 [P]: local rank j staged its combine rows (at each forwarder)
  u64 stage_ack_off;          // u64: forwarders done reading our staged rows (ADD)
  u64 comb_ack_off;           // u64 [M]: source of node m done reading our partials (ADD)
  u64 comb_flag_off;          // u64 [M][max_chunks]: chunk c of partials from node m arrived
  u64 offsets_off;            // int [R + 1]: receive offsets of the staged dispatch (read by forwarders)
  u64 disp_recv_off;          // [M][ncap][msg_stride]
  u64 disp_send_off;          // [M][ncap][msg_stride]
  u64 comb_recv_off;          // [M][ncap][part_stride]
  u64 comb_send_off;          // [M][ncap][part_stride]
  u64 stage_off;              // [stage_rows][stage_stride]
  // Inputs.
  const u8* x;                // dispatch: [N, payload]; combine: [rows, H] bf16
  const float* x_scales;      // FP8 dispatch: element (t, g) at t*scale_st + g*scale_sg
  const i64* topk_idx;        // [N, K] or null
  const float* topk_weights;  // dispatch: [N, K]; combine: [rows, K]; or null
  const u8* is_token_in_rank; // [N, R]
  const int* num_tokens_per_expert;  // [E] or null
  // Route (prep kernel; kept in the handle).
  int* rank_pos;              // [N, R]: index of token t among ours to rank r, -1 if not sent
  int* node_pos;              // [N, M]: slot of token t at node m's forwarder, -1 if not sent
  int* node_list;             // [M, N]: token of each slot
  int* rank_count;            // [R]
  int* node_count;            // [M]
  // Receive side (handle).
  int* recv_offsets;          // [R + 1]: first row of each source in our outputs (notify)
  int* fwd_count;             // [M]: slots of our local index's source on node m (we forward them)
  int* fwd_pos;               // [M][ncap][P]: rows at each rank of our node, -1 if none
  // Outputs.
  u8* recv_x;
  float* recv_scales;         // element (row, g) at row*rscale_st + g*rscale_sg
  i64* recv_topk_idx;
  float* recv_topk_weights;
  int* recv_src_idx;
  u16* out;                   // combine: [N, H] bf16
  float* out_weights;         // combine: [N, K]
  const u16* bias0;
  const u16* bias1;
  i64 scale_st, scale_sg, rscale_st, rscale_sg;
  u64 timeout_ns;
  u64 shape_word;
  int rank, num_ranks, rpn, num_nodes, node, local;
  int num_tokens;             // N
  int num_topk;               // K (0: none)
  int num_experts;
  int hidden;
  int fp8;
  int expert_alignment;
  int out_rows;               // rows of the receive outputs
  int worst_mode;
  int write_host;
  int chunk_rows;
  int max_chunks;
  int ncap;                   // slots per source node in the regions
  int msg_stride, part_stride, stage_stride, hdr_stride;
  int stage_rows;             // rows the combine stage holds
  int comb_rows;              // combine: rows of x to stage (-1: recv_offsets[R], the device count)
};

// ---- message layout: [payload][scales G x f32][src i32][topk K x i32][weights K x f32][rank_pos R x i32]
template <int kHidden, bool kFp8>
struct InterMsg {
  static constexpr int kPayload = kHidden * (kFp8 ? 1 : 2);
  static constexpr int kGroups = kFp8 ? kHidden / 128 : 0;
  static constexpr int kScalesOff = kPayload;
  static constexpr int kSrcOff = kScalesOff + 4 * kGroups;
  static constexpr int kTopkOff = kSrcOff + 4;
  EPCOMM_DEVICE static int weights_off(int K) { return kTopkOff + 4 * K; }
  EPCOMM_DEVICE static int pos_off(int K) { return kTopkOff + 8 * K; }
};
// Header: [shape u64][slots i32][pad i32][counts P x i32][expert counts P*L x i32]
constexpr int kHdrCountsOff = 16;

EPCOMM_DEVICE int ld_cg_i32(const int* p) {
  int v;
  asm volatile("ld.global.cg.s32 %0, [%1];" : "=r"(v) : "l"(p));
  return v;
}
EPCOMM_DEVICE float ld_cg_f32(const float* p) {
  float v;
  asm volatile("ld.global.cg.f32 %0, [%1];" : "=f"(v) : "l"(p));
  return v;
}

template <typename T>
EPCOMM_DEVICE T* ptr_at(u64 base, u64 off) {
  return reinterpret_cast<T*>(base + off);
}
EPCOMM_DEVICE u64 heap_addr(const InterParams& p) { return reinterpret_cast<u64>(p.heap); }

// One chunk to `pe`: the warp puts `bytes` from our heap, then lane 0 fences (NVSHMEM delivers
// a PE's operations to one destination in order across a fence) and sets the chunk's flag.
// (NVSHMEM's fused warp put-with-signal did not link from libnvshmem_device.a 3.8.0.)
EPCOMM_DEVICE void put_chunk_signal(u8* dst, const u8* src, size_t bytes, u64* sig, u64 tag, int pe) {
  nvshmemx_putmem_nbi_warp(dst, src, bytes, pe);
  fence_sys();  // over NVLink the put is every lane's stores: each lane orders its own
  __syncwarp();
  if (lane_id() == 0) {
    nvshmem_fence();
    nvshmemx_signal_op(sig, tag, NVSHMEM_SIGNAL_SET, pe);
  }
  __syncwarp();
}

EPCOMM_DEVICE bool inter_wait(const u64* flag, u64 target, const InterParams& p, u64 deadline, int phase,
                              int channel, int peer) {
  return wait_geq_u64(flag, target, p.err, deadline, p.rank, phase, channel, peer);
}

// ---------------------------------------------------------------------------------------------
// prep: block b < R scans is_token_in_rank's column b (rank_pos, rank_count); block R + m the
// node-m columns (node_pos, node_list, node_count).  Ascending token order: deterministic slots.
// ---------------------------------------------------------------------------------------------
EPCOMM_DEVICE int block_exclusive_scan(int in, int* s_warp, int* s_total) {
  const int lane = threadIdx.x & 31, w = threadIdx.x >> 5;
  const unsigned ballot = __ballot_sync(0xffffffffu, in);
  if (lane == 0) s_warp[w] = __popc(ballot);
  __syncthreads();
  if (w == 0) {
    const int v = lane < kInterWarps ? s_warp[lane] : 0;
    int incl = v;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
      const int y = __shfl_up_sync(0xffffffffu, incl, o);
      if (lane >= o) incl += y;
    }
    if (lane < kInterWarps) s_warp[lane] = incl - v;
    if (lane == kInterWarps - 1) *s_total = incl;
  }
  __syncthreads();
  const int r = s_warp[w] + __popc(ballot & ((1u << lane) - 1u));
  return r;
}

// (Templates so that every kernel of a module is instantiated the same way; kThreads == kInterThreads.)
template <int kThreads>
__global__ void __launch_bounds__(kThreads) internode_prep(const __grid_constant__ InterParams p) {
  __shared__ int s_warp[kInterWarps];
  __shared__ int s_total;
  const int R = p.num_ranks, P = p.rpn, M = p.num_nodes, N = p.num_tokens;
  const int col = blockIdx.x;
  int running = 0;
  for (int base = 0; base < N; base += kInterThreads) {
    const int t = base + threadIdx.x;
    int in = 0;
    if (t < N) {
      const u8* row = p.is_token_in_rank + static_cast<i64>(t) * R;
      if (col < R) {
        in = row[col] != 0;
      } else {
        const int m = col - R;
        for (int j = 0; j < P; ++j) in |= row[m * P + j] != 0;
      }
    }
    const int slot = running + block_exclusive_scan(in, s_warp, &s_total);
    if (t < N) {
      if (col < R) {
        p.rank_pos[static_cast<i64>(t) * R + col] = in ? slot : -1;
      } else {
        const int m = col - R;
        p.node_pos[static_cast<i64>(t) * M + m] = in ? slot : -1;
        if (in) p.node_list[static_cast<i64>(m) * N + slot] = t;
      }
    }
    running += s_total;
    __syncthreads();
  }
  if (threadIdx.x == 0) {
    if (col < R) p.rank_count[col] = running;
    else p.node_count[col - R] = running;
  }
}

// ---------------------------------------------------------------------------------------------
// dispatch send: waits for the previous dispatch's acknowledgements, sends one header per
// destination node (counts), then work items (node m, chunk c): a warp writes the chunk's
// messages into its staging and puts them, with the chunk's flag as signal, into the
// forwarder's region for our node.
// ---------------------------------------------------------------------------------------------
template <int kHidden, bool kFp8>
EPCOMM_DEVICE void build_message(const InterParams& p, u8* msg, int t, int lane) {
  using Msg = InterMsg<kHidden, kFp8>;
  const int K = p.num_topk, R = p.num_ranks;
  warp_copy_row<Msg::kPayload / 16, false>(reinterpret_cast<V4*>(msg),
                                          reinterpret_cast<const V4*>(p.x + static_cast<i64>(t) * Msg::kPayload),
                                          lane);
  if constexpr (kFp8) {
    float* sc = reinterpret_cast<float*>(msg + Msg::kScalesOff);
    for (int g = lane; g < Msg::kGroups; g += 32) sc[g] = p.x_scales[t * p.scale_st + g * p.scale_sg];
  }
  if (lane == 0) *reinterpret_cast<int*>(msg + Msg::kSrcOff) = t;
  int* tk = reinterpret_cast<int*>(msg + Msg::kTopkOff);
  float* wt = reinterpret_cast<float*>(msg + Msg::weights_off(K));
  for (int k = lane; k < K; k += 32) {
    const i64 e = p.topk_idx[static_cast<i64>(t) * K + k];
    tk[k] = (e >= 0 && e < p.num_experts) ? static_cast<int>(e) : -1;
    wt[k] = p.topk_weights != nullptr ? p.topk_weights[static_cast<i64>(t) * K + k] : 0.0f;
    if (e < -1 || e >= p.num_experts)
      report_error(p.err, kErrBadInput, p.rank, kPhaseInterDispatch, t, -1, p.num_experts, static_cast<u64>(e));
  }
  int* pos = reinterpret_cast<int*>(msg + Msg::pos_off(K));
  for (int r = lane; r < R; r += 32) pos[r] = p.rank_pos[static_cast<i64>(t) * R + r];
}

template <int kHidden, bool kFp8>
__global__ void __launch_bounds__(kInterThreads) internode_dispatch_send(const __grid_constant__ InterParams p) {
  const int M = p.num_nodes, P = p.rpn, R = p.num_ranks;
  const int lane = lane_id(), warp = warp_id();
  const u64 tag = p.ctrl->disp_tag + 1;
  const u64 deadline = globaltimer_ns() + p.timeout_ns;
  const u64 hb = heap_addr(p);
  __shared__ int s_fail;
  if (threadIdx.x == 0) s_fail = 0;
  __syncthreads();
  // Our staging and every forwarder's region for us are free once the previous dispatch's
  // receivers (P per node) all acknowledged.
  for (int m = threadIdx.x; m < M; m += kInterThreads) {
    if (!inter_wait(ptr_at<u64>(hb, p.disp_ack_off) + m, static_cast<u64>(P) * (tag - 1), p, deadline,
                    kPhaseInterSendAck, m, m * P + p.local))
      s_fail = 1;
  }
  __syncthreads();
  if (s_fail) return;  // the peers time out and report too; nothing was sent

  if (blockIdx.x == 0) {
    const int L = p.num_experts / R;
    for (int m = warp; m < M; m += kInterWarps) {
      u8* h = ptr_at<u8>(hb, p.hdr_stage_off + static_cast<u64>(m) * p.hdr_stride);
      int* cnt = reinterpret_cast<int*>(h + kHdrCountsOff);
      if (lane == 0) {
        *reinterpret_cast<u64*>(h) = p.shape_word;
        reinterpret_cast<int*>(h)[2] = p.node_count[m];
      }
      for (int j = lane; j < P; j += 32) cnt[j] = p.rank_count[m * P + j];
      for (int e = lane; e < P * L; e += 32)
        cnt[P + e] = (p.num_tokens_per_expert != nullptr && p.num_topk > 0)
                         ? p.num_tokens_per_expert[m * P * L + e] : 0;
      __syncwarp();
      fence_sys();
      put_chunk_signal(p.heap + p.hdr_off + static_cast<u64>(p.rank) * p.hdr_stride, h,
                       kHdrCountsOff + 4 * (P + P * L), reinterpret_cast<u64*>(p.heap + p.hdr_flag_off) + p.rank,
                       tag, m * P + p.local);
    }
  }

  // Work items: chunk-major over nodes, starting at our own node's successor so that every
  // destination is busy from the start.
  int chunks_max = 0;
  for (int m = 0; m < M; ++m) chunks_max = max(chunks_max, (p.node_count[m] + p.chunk_rows - 1) / p.chunk_rows);
  const int items = chunks_max * M;
  const int gw = blockIdx.x * kInterWarps + warp, nw = gridDim.x * kInterWarps;
  for (int it = gw; it < items; it += nw) {
    const int c = it / M;
    const int m = (it % M + p.node + 1) % M;
    const int n = p.node_count[m];
    const int q0 = c * p.chunk_rows;
    if (q0 >= n) continue;
    const int rows = min(p.chunk_rows, n - q0);
    const u64 soff = p.disp_send_off + (static_cast<u64>(m) * p.ncap + q0) * p.msg_stride;
    for (int i = 0; i < rows; ++i) {
      const int t = p.node_list[static_cast<i64>(m) * p.num_tokens + q0 + i];
      build_message<kHidden, kFp8>(p, ptr_at<u8>(hb, soff + static_cast<u64>(i) * p.msg_stride), t, lane);
    }
    __syncwarp();
    fence_sys();
    __syncwarp();
    put_chunk_signal(p.heap + p.disp_recv_off + (static_cast<u64>(p.node) * p.ncap + q0) * p.msg_stride,
                     p.heap + soff, static_cast<size_t>(rows) * p.msg_stride,
                     reinterpret_cast<u64*>(p.heap + p.disp_flag_off) + static_cast<u64>(p.node) * p.max_chunks + c,
                     tag, m * P + p.local);
  }
  nvshmem_quiet();
  if (last_block(&p.ctrl->send_done) && threadIdx.x == 0) p.ctrl->disp_tag = tag;
}

// ---------------------------------------------------------------------------------------------
// dispatch notify (one block): every source's header, read at the forwarder of its local index
// in our node; shapes compared; receive offsets, per-expert counts, the host record.
// ---------------------------------------------------------------------------------------------
template <int kThreads>
__global__ void __launch_bounds__(kThreads) internode_dispatch_notify(const __grid_constant__ InterParams p) {
  const int R = p.num_ranks, P = p.rpn;
  const int L = p.num_experts / R;
  const u64 tag = p.ctrl->disp_tag;
  const u64 deadline = globaltimer_ns() + p.timeout_ns;
  __shared__ int s_cnt[kInterMaxRanks + 1];
  __shared__ int s_bad;
  if (threadIdx.x == 0) s_bad = 0;
  __syncthreads();
  for (int s = threadIdx.x; s < R; s += kInterThreads) {
    const int f = s % P;  // the forwarder holding s's messages for our node
    const u64 fb = p.peer_base[f];
    int c = 0;
    if (!inter_wait(ptr_at<u64>(fb, p.hdr_flag_off) + s, tag, p, deadline, kPhaseInterHeader, s / P, s)) {
      s_bad = 1;
    } else {
      const u8* h = ptr_at<u8>(fb, p.hdr_off + static_cast<u64>(s) * p.hdr_stride);
      const u64 w = ld_volatile_u64(reinterpret_cast<const u64*>(h));
      if (w != p.shape_word) {
        report_error(p.err, kErrMismatch, p.rank, kPhaseInterHeader, s / P, s, p.shape_word, w);
        s_bad = 1;
      }
      c = ld_volatile_i32(reinterpret_cast<const int*>(h + kHdrCountsOff) + p.local);
      p.ctrl->src_slots[s] = ld_volatile_i32(reinterpret_cast<const int*>(h) + 2);
    }
    s_cnt[s] = c;
  }
  __syncthreads();
  if (s_bad) return;
  if (threadIdx.x == 0) {
    int acc = 0;
    for (int s = 0; s < R; ++s) {
      const int c = s_cnt[s];
      p.recv_offsets[s] = acc;
      acc += c;
    }
    p.recv_offsets[R] = acc;
    s_cnt[R] = acc;
    if (p.worst_mode && acc > p.out_rows)
      report_error(p.err, kErrOverflow, p.rank, kPhaseInterRecv, 0, -1, p.out_rows, acc);
  }
  for (int m = threadIdx.x; m < p.num_nodes; m += kInterThreads)
    p.fwd_count[m] = p.ctrl->src_slots[m * P + p.local];
  __syncthreads();
  if (p.write_host) {
    int* hi = p.host_info;
    for (int s = threadIdx.x; s < R; s += kInterThreads) hi[2 + s] = s_cnt[s];
    for (int e = threadIdx.x; e < L; e += kInterThreads) {
      int sum = 0;
      for (int s = 0; s < R; ++s) {
        const u8* h = ptr_at<u8>(p.peer_base[s % P], p.hdr_off + static_cast<u64>(s) * p.hdr_stride);
        sum += ld_volatile_i32(reinterpret_cast<const int*>(h + kHdrCountsOff) + P + p.local * L + e);
      }
      const int a = p.expert_alignment;
      hi[2 + R + e] = (sum + a - 1) / a * a;
    }
    if (threadIdx.x == 0) hi[1] = s_cnt[R];
    __syncthreads();
    if (threadIdx.x == 0) {
      __threadfence_system();
      st_release_sys_i32(hi, 1);  // the host zeroed it before the launch
    }
  }
  if (threadIdx.x == 0) {
    fence_gpu();
    p.ctrl->ok_tag = tag;
  }
}

// ---------------------------------------------------------------------------------------------
// dispatch receive: items (source s, chunk c) of the slots s sent to our node; a warp waits for
// the chunk's flag at the forwarder, then copies the chunk's messages that name us into our
// outputs (peer loads over NVLink).  The forwarder of a source also keeps each slot's row
// positions for its combine.  The last block acknowledges every source.
// ---------------------------------------------------------------------------------------------
template <int kHidden, bool kFp8>
EPCOMM_DEVICE void copy_message(const InterParams& p, const u8* msg, int row, int lane) {
  using Msg = InterMsg<kHidden, kFp8>;
  const int K = p.num_topk;
  warp_copy_row<Msg::kPayload / 16, true>(reinterpret_cast<V4*>(p.recv_x + static_cast<i64>(row) * Msg::kPayload),
                                         reinterpret_cast<const V4*>(msg), lane);
  if constexpr (kFp8) {
    const float* sc = reinterpret_cast<const float*>(msg + Msg::kScalesOff);
    for (int g = lane; g < Msg::kGroups; g += 32) p.recv_scales[row * p.rscale_st + g * p.rscale_sg] = sc[g];
  }
  if (lane == 0 && p.recv_src_idx != nullptr) p.recv_src_idx[row] = *reinterpret_cast<const int*>(msg + Msg::kSrcOff);
  if (K > 0 && p.recv_topk_idx != nullptr) {
    const int L = p.num_experts / p.num_ranks;
    const int* tk = reinterpret_cast<const int*>(msg + Msg::kTopkOff);
    const float* wt = reinterpret_cast<const float*>(msg + Msg::weights_off(K));
    for (int k = lane; k < K; k += 32) {
      const int local = tk[k] - p.rank * L;
      const bool keep = tk[k] >= 0 && local >= 0 && local < L;
      p.recv_topk_idx[static_cast<i64>(row) * K + k] = keep ? local : -1;
      if (p.recv_topk_weights != nullptr) p.recv_topk_weights[static_cast<i64>(row) * K + k] = keep ? wt[k] : 0.0f;
    }
  }
}

template <int kHidden, bool kFp8>
__global__ void __launch_bounds__(kInterThreads) internode_dispatch_recv(const __grid_constant__ InterParams p) {
  using Msg = InterMsg<kHidden, kFp8>;
  const int R = p.num_ranks, P = p.rpn, K = p.num_topk;
  const int lane = lane_id(), warp = warp_id();
  const u64 tag = p.ctrl->disp_tag;
  if (p.ctrl->ok_tag != tag) return;  // notify failed: the error is recorded
  const u64 deadline = globaltimer_ns() + p.timeout_ns;
  __shared__ int s_chunk_prefix[kInterMaxRanks + 1];
  if (threadIdx.x == 0) {
    int acc = 0;
    for (int s = 0; s < R; ++s) {
      s_chunk_prefix[s] = acc;
      acc += (p.ctrl->src_slots[s] + p.chunk_rows - 1) / p.chunk_rows;
    }
    s_chunk_prefix[R] = acc;
  }
  __syncthreads();
  const int items = s_chunk_prefix[R];
  const int total = p.recv_offsets[R];
  const int gw = blockIdx.x * kInterWarps + warp, nw = gridDim.x * kInterWarps;
  const int pos_off = Msg::pos_off(K);
  for (int it = gw; it < items; it += nw) {
    int s = 0;
    while (s_chunk_prefix[s + 1] <= it) ++s;
    const int c = it - s_chunk_prefix[s];
    const int f = s % P, sn = s / P;
    const u64 fb = p.peer_base[f];
    const u64* flag = ptr_at<u64>(fb, p.disp_flag_off) + static_cast<u64>(sn) * p.max_chunks + c;
    bool ok = true;
    if (lane == 0) ok = inter_wait(flag, tag, p, deadline, kPhaseInterRecv, c, s);
    if (!__shfl_sync(0xffffffffu, ok, 0)) break;
    __syncwarp();  // orders the other lanes' loads after lane 0's acquire
    const int n = p.ctrl->src_slots[s];
    const int q0 = c * p.chunk_rows, rows = min(p.chunk_rows, n - q0);
    const int base = p.recv_offsets[s];
    for (int i = 0; i < rows; ++i) {
      const u8* msg = ptr_at<u8>(fb, p.disp_recv_off + (static_cast<u64>(sn) * p.ncap + q0 + i) * p.msg_stride);
      const int* pos = reinterpret_cast<const int*>(msg + pos_off);
      if (f == p.local) {  // we forward s's tokens: keep where each of our node's ranks put them
        int* fp = p.fwd_pos + (static_cast<i64>(sn) * p.ncap + q0 + i) * P;
        for (int j = lane; j < P; j += 32) fp[j] = ld_cg_i32(pos + p.node * P + j);
      }
      const int my = __shfl_sync(0xffffffffu, lane == 0 ? ld_cg_i32(pos + p.rank) : 0, 0);
      if (my < 0) continue;
      const int row = base + my;
      if (row < p.out_rows) copy_message<kHidden, kFp8>(p, msg, row, lane);
    }
  }
  // Padding rows of a num_worst_tokens receive.
  if (p.worst_mode) {
    const int gt = blockIdx.x * kInterThreads + threadIdx.x, nt = gridDim.x * kInterThreads;
    for (int row = total + gt; row < p.out_rows; row += nt) {
      if (p.recv_src_idx != nullptr) p.recv_src_idx[row] = -1;
      for (int k = 0; k < K; ++k) {
        if (p.recv_topk_idx != nullptr) p.recv_topk_idx[static_cast<i64>(row) * K + k] = -1;
        if (p.recv_topk_weights != nullptr) p.recv_topk_weights[static_cast<i64>(row) * K + k] = 0.0f;
      }
    }
  }
  if (last_block(&p.ctrl->recv_done)) {
    if (aborted(p.err)) return;
    for (int s = threadIdx.x; s < R; s += kInterThreads)
      nvshmemx_signal_op(reinterpret_cast<u64*>(p.heap + p.disp_ack_off) + p.node, 1, NVSHMEM_SIGNAL_ADD, s);
    nvshmem_quiet();
  }
}

// ---------------------------------------------------------------------------------------------
// combine stage: our expert outputs (and weights) into our heap, our receive offsets beside
// them, then a flag at every forwarder of our node.
// ---------------------------------------------------------------------------------------------
template <int kHidden>
__global__ void __launch_bounds__(kInterThreads) internode_combine_stage(const __grid_constant__ InterParams p) {
  const int R = p.num_ranks, P = p.rpn, K = p.num_topk;
  const int lane = lane_id(), warp = warp_id();
  const u64 tag = p.ctrl->comb_tag + 1;
  const u64 deadline = globaltimer_ns() + p.timeout_ns;
  const u64 hb = heap_addr(p);
  __shared__ int s_fail;
  if (threadIdx.x == 0) {
    s_fail = !inter_wait(ptr_at<u64>(hb, p.stage_ack_off), static_cast<u64>(P) * (tag - 1), p, deadline,
                         kPhaseInterStageAck, 0, -1);
  }
  __syncthreads();
  if (s_fail) return;
  const int rows = p.comb_rows >= 0 ? p.comb_rows : min(p.recv_offsets[R], p.stage_rows);
  const int gw = blockIdx.x * kInterWarps + warp, nw = gridDim.x * kInterWarps;
  for (int r = gw; r < rows; r += nw) {
    u8* dst = ptr_at<u8>(hb, p.stage_off + static_cast<u64>(r) * p.stage_stride);
    warp_copy_row<kHidden * 2 / 16, false>(reinterpret_cast<V4*>(dst),
                                           reinterpret_cast<const V4*>(p.x + static_cast<i64>(r) * kHidden * 2), lane);
    if (p.topk_weights != nullptr) {
      float* w = reinterpret_cast<float*>(dst + kHidden * 2);
      for (int k = lane; k < K; k += 32) w[k] = p.topk_weights[static_cast<i64>(r) * K + k];
    }
  }
  if (blockIdx.x == 0)
    for (int s = threadIdx.x; s <= R; s += kInterThreads) ptr_at<int>(hb, p.offsets_off)[s] = p.recv_offsets[s];
  if (last_block(&p.ctrl->stage_done) && threadIdx.x == 0) {
    p.ctrl->comb_tag = tag;
    fence_sys();
    for (int j = 0; j < P; ++j)
      nvshmemx_signal_op(reinterpret_cast<u64*>(p.heap + p.stage_flag_off) + p.local, tag, NVSHMEM_SIGNAL_SET,
                         p.node * P + j);
  }
}

// ---------------------------------------------------------------------------------------------
// combine reduce (forwarder): items (source node m, chunk c) of the slots we forwarded for the
// source of our local index on node m.  A warp sums each slot's rows from our node's staged
// rows in ascending rank order (fp32), writes the partial into its staging and puts the chunk to
// the source with the chunk's flag.  The last block releases every rank's stage.
// kDeepep: the partial rounded to bf16 (still sent as fp32), as DeepEP V1's forwarder sends it
// (csrc/kernels/legacy/internode.cu, combine: combine_token into the bf16 RDMA send buffer).
// ---------------------------------------------------------------------------------------------
template <int kHidden, bool kDeepep = false>
__global__ void __launch_bounds__(kInterThreads) internode_combine_reduce(const __grid_constant__ InterParams p) {
  const int M = p.num_nodes, P = p.rpn, K = p.num_topk;
  const int lane = lane_id(), warp = warp_id();
  const u64 tag = p.ctrl->comb_tag;
  const u64 deadline = globaltimer_ns() + p.timeout_ns;
  const u64 hb = heap_addr(p);
  __shared__ int s_fail;
  if (threadIdx.x == 0) s_fail = 0;
  __syncthreads();
  for (int i = threadIdx.x; i < M + P; i += kInterThreads) {
    bool ok;
    if (i < M)  // the source on node i has read our previous partials
      ok = inter_wait(ptr_at<u64>(hb, p.comb_ack_off) + i, tag - 1, p, deadline, kPhaseInterReduceAck, i,
                      i * P + p.local);
    else  // local rank j has staged this combine's rows
      ok = inter_wait(ptr_at<u64>(hb, p.stage_flag_off) + (i - M), tag, p, deadline, kPhaseInterStaged, i - M,
                      p.node * P + (i - M));
    if (!ok) s_fail = 1;
  }
  __syncthreads();
  if (s_fail) return;
  int chunks_max = 0;
  for (int m = 0; m < M; ++m) chunks_max = max(chunks_max, (p.fwd_count[m] + p.chunk_rows - 1) / p.chunk_rows);
  const int items = chunks_max * M;
  const int gw = blockIdx.x * kInterWarps + warp, nw = gridDim.x * kInterWarps;
  constexpr int kWords = kHidden / 8;  // 16-byte words of a bf16 row
  __shared__ u64 s_src[kInterWarps][kInterMaxRanksPerNode];
  for (int it = gw; it < items; it += nw) {
    const int c = it / M;
    const int m = (it % M + p.node + 1) % M;
    const int n = p.fwd_count[m];
    const int q0 = c * p.chunk_rows;
    if (q0 >= n) continue;
    const int rows = min(p.chunk_rows, n - q0);
    const int s = m * P + p.local;  // the source we forward for
    const u64 soff = p.comb_send_off + (static_cast<u64>(m) * p.ncap + q0) * p.part_stride;
    for (int i = 0; i < rows; ++i) {
      const int* fp = p.fwd_pos + (static_cast<i64>(m) * p.ncap + q0 + i) * P;
      float* part = ptr_at<float>(hb, soff + static_cast<u64>(i) * p.part_stride);
      // Each j's row address (its offset for s plus the position), lane j finds it.
      u64* srcs = s_src[warp];
      if (lane < P) {
        const int pos = fp[lane];
        u64 a = 0;
        if (pos >= 0) {
          const int off = ld_cg_i32(ptr_at<int>(p.peer_base[lane], p.offsets_off) + s);
          a = p.peer_base[lane] + p.stage_off + static_cast<u64>(off + pos) * p.stage_stride;
        }
        srcs[lane] = a;
      }
      __syncwarp();
      for (int w = lane; w < kWords; w += 32) {
        float acc[8];
#pragma unroll
        for (int u = 0; u < 8; ++u) acc[u] = 0.0f;
        for (int j = 0; j < P; ++j) {
          const u64 src = srcs[j];
          if (src == 0) continue;
          const V4 v = ld_cg_v4(reinterpret_cast<const V4*>(src) + w);
          const u32 words[4] = {static_cast<u32>(v.x), static_cast<u32>(v.y), static_cast<u32>(v.z),
                                static_cast<u32>(v.w)};
#pragma unroll
          for (int u = 0; u < 4; ++u) {
            acc[2 * u] += bf16_to_f32(static_cast<u16>(words[u] & 0xFFFFu));
            acc[2 * u + 1] += bf16_to_f32(static_cast<u16>(words[u] >> 16));
          }
        }
        if constexpr (kDeepep) {
#pragma unroll
          for (int u = 0; u < 8; ++u) acc[u] = bf16_to_f32(f32_to_bf16(acc[u]));
        }
        V4* dst = reinterpret_cast<V4*>(part + 8 * w);
        st_v4(dst, V4{__float_as_int(acc[0]), __float_as_int(acc[1]), __float_as_int(acc[2]), __float_as_int(acc[3])});
        st_v4(dst + 1, V4{__float_as_int(acc[4]), __float_as_int(acc[5]), __float_as_int(acc[6]), __float_as_int(acc[7])});
      }
      if (p.topk_weights != nullptr) {
        for (int k = lane; k < K; k += 32) {
          float acc = 0.0f;
          for (int j = 0; j < P; ++j) {
            const int pos = fp[j];
            if (pos < 0) continue;
            const int off = ld_cg_i32(ptr_at<int>(p.peer_base[j], p.offsets_off) + s);
            const float* wrow = reinterpret_cast<const float*>(p.peer_base[j] + p.stage_off +
                                                               static_cast<u64>(off + pos) * p.stage_stride +
                                                               kHidden * 2);
            acc += ld_cg_f32(wrow + k);
          }
          part[kHidden + k] = acc;
        }
      }
      __syncwarp();  // srcs is rewritten for the next slot
    }
    __syncwarp();
    fence_sys();
    __syncwarp();
    put_chunk_signal(p.heap + p.comb_recv_off + (static_cast<u64>(p.node) * p.ncap + q0) * p.part_stride,
                     p.heap + soff, static_cast<size_t>(rows) * p.part_stride,
                     reinterpret_cast<u64*>(p.heap + p.comb_flag_off) + static_cast<u64>(p.node) * p.max_chunks + c,
                     tag, s);
  }
  nvshmem_quiet();
  if (last_block(&p.ctrl->reduce_done)) {
    if (aborted(p.err)) return;
    for (int j = threadIdx.x; j < P; j += kInterThreads)
      nvshmemx_signal_op(reinterpret_cast<u64*>(p.heap + p.stage_ack_off), 1, NVSHMEM_SIGNAL_ADD, p.node * P + j);
    nvshmem_quiet();
  }
}

// ---------------------------------------------------------------------------------------------
// combine receive (source): a warp per token adds the partials of the nodes the token went to,
// in ascending node order, then the biases; the last block releases every forwarder's region.
// kDeepep: DeepEP V1's order, the biases first (bias_0 + bias_1, a missing one read as +0).
// ---------------------------------------------------------------------------------------------
template <int kHidden, bool kDeepep = false>
__global__ void __launch_bounds__(kInterThreads) internode_combine_recv(const __grid_constant__ InterParams p) {
  const int M = p.num_nodes, P = p.rpn, K = p.num_topk, N = p.num_tokens;
  const int lane = lane_id(), warp = warp_id();
  const u64 tag = p.ctrl->comb_tag;
  const u64 deadline = globaltimer_ns() + p.timeout_ns;
  const u64 hb = heap_addr(p);
  constexpr int kWords = kHidden / 8;
  const int gw = blockIdx.x * kInterWarps + warp, nw = gridDim.x * kInterWarps;
  bool failed = false;
  for (int t = gw; t < N && !failed; t += nw) {
    // Wait for the chunk of every node the token went to (lane m polls node m's flag).
    bool ok = true;
    for (int m = lane; m < M; m += 32) {
      const int q = p.node_pos[static_cast<i64>(t) * M + m];
      if (q < 0) continue;
      const u64* flag = ptr_at<u64>(hb, p.comb_flag_off) + static_cast<u64>(m) * p.max_chunks + q / p.chunk_rows;
      if (!inter_wait(flag, tag, p, deadline, kPhaseInterCombRecv, q / p.chunk_rows, m * P + p.local)) ok = false;
    }
    if (!__all_sync(0xffffffffu, ok)) {
      failed = true;
      break;
    }
    __syncwarp();  // orders every lane's loads after the other lanes' acquires
    for (int w = lane; w < kWords; w += 32) {
      float acc[8];
#pragma unroll
      for (int u = 0; u < 8; ++u) acc[u] = 0.0f;
      if constexpr (kDeepep) {
        const V4 z{0, 0, 0, 0};
        const V4 v0 = p.bias0 != nullptr ? ld_nc_v4(reinterpret_cast<const V4*>(p.bias0 + static_cast<i64>(t) * kHidden) + w) : z;
        const V4 v1 = p.bias1 != nullptr ? ld_nc_v4(reinterpret_cast<const V4*>(p.bias1 + static_cast<i64>(t) * kHidden) + w) : z;
        const u32 a0[4] = {static_cast<u32>(v0.x), static_cast<u32>(v0.y), static_cast<u32>(v0.z), static_cast<u32>(v0.w)};
        const u32 a1[4] = {static_cast<u32>(v1.x), static_cast<u32>(v1.y), static_cast<u32>(v1.z), static_cast<u32>(v1.w)};
#pragma unroll
        for (int u = 0; u < 4; ++u) {
          acc[2 * u] = bf16_to_f32(static_cast<u16>(a0[u] & 0xFFFFu)) + bf16_to_f32(static_cast<u16>(a1[u] & 0xFFFFu));
          acc[2 * u + 1] = bf16_to_f32(static_cast<u16>(a0[u] >> 16)) + bf16_to_f32(static_cast<u16>(a1[u] >> 16));
        }
      }
      for (int m = 0; m < M; ++m) {
        const int q = p.node_pos[static_cast<i64>(t) * M + m];
        if (q < 0) continue;
        const V4* src = ptr_at<V4>(hb, p.comb_recv_off + (static_cast<u64>(m) * p.ncap + q) * p.part_stride) + 2 * w;
        const V4 a = ld_cg_v4(src), b = ld_cg_v4(src + 1);
        acc[0] += __int_as_float(a.x); acc[1] += __int_as_float(a.y);
        acc[2] += __int_as_float(a.z); acc[3] += __int_as_float(a.w);
        acc[4] += __int_as_float(b.x); acc[5] += __int_as_float(b.y);
        acc[6] += __int_as_float(b.z); acc[7] += __int_as_float(b.w);
      }
      const u16* biases[2] = {p.bias0, p.bias1};
#pragma unroll
      for (int bi = 0; bi < 2; ++bi) {
        if (kDeepep || biases[bi] == nullptr) continue;  // kDeepep: added first, above
        const V4 v = ld_nc_v4(reinterpret_cast<const V4*>(biases[bi] + static_cast<i64>(t) * kHidden) + w);
        const u32 words[4] = {static_cast<u32>(v.x), static_cast<u32>(v.y), static_cast<u32>(v.z),
                              static_cast<u32>(v.w)};
#pragma unroll
        for (int u = 0; u < 4; ++u) {
          acc[2 * u] += bf16_to_f32(static_cast<u16>(words[u] & 0xFFFFu));
          acc[2 * u + 1] += bf16_to_f32(static_cast<u16>(words[u] >> 16));
        }
      }
      u32 o[4];
#pragma unroll
      for (int u = 0; u < 4; ++u)
        o[u] = static_cast<u32>(f32_to_bf16(acc[2 * u])) | (static_cast<u32>(f32_to_bf16(acc[2 * u + 1])) << 16);
      st_v4(reinterpret_cast<V4*>(p.out + static_cast<i64>(t) * kHidden) + w,
            V4{static_cast<int>(o[0]), static_cast<int>(o[1]), static_cast<int>(o[2]), static_cast<int>(o[3])});
    }
    if (p.out_weights != nullptr) {
      for (int k = lane; k < K; k += 32) {
        float acc = 0.0f;
        for (int m = 0; m < M; ++m) {
          const int q = p.node_pos[static_cast<i64>(t) * M + m];
          if (q < 0) continue;
          acc += ld_cg_f32(ptr_at<float>(hb, p.comb_recv_off + (static_cast<u64>(m) * p.ncap + q) * p.part_stride) +
                           kHidden + k);
        }
        p.out_weights[static_cast<i64>(t) * K + k] = acc;
      }
    }
  }
  if (last_block(&p.ctrl->crecv_done)) {
    if (aborted(p.err)) return;
    for (int m = threadIdx.x; m < M; m += kInterThreads)
      nvshmemx_signal_op(reinterpret_cast<u64*>(p.heap + p.comb_ack_off) + p.node, 1, NVSHMEM_SIGNAL_ADD,
                         m * P + p.local);
    nvshmem_quiet();
  }
}

}  // namespace epcomm
