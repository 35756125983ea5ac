// get_dispatch_layout: per-token destination ranks and per-rank / per-expert token counts.
#pragma once
#include "epcomm_common.cuh"

namespace epcomm {

struct LayoutParams {
  const i64* topk_idx;            // [N, K], -1 = no expert
  int* num_tokens_per_rank;       // [R], zeroed by the launcher (memset on the same stream)
  int* num_tokens_per_rdma_rank;  // [R / ranks_per_node] zeroed, or null within one node
  int* num_tokens_per_expert;     // [E], zeroed
  u8* is_token_in_rank;           // [N, R] bool
  ErrorRecord* err;
  int num_tokens;
  int num_topk;
  int num_experts;
  int num_ranks;
  int ranks_per_node;
  int num_nodes;                  // 0 within one node
};

// One thread per token; per-block counts in shared memory, then one global atomic per
// non-zero counter.  Integer atomics commute, so the counts are deterministic.
// Dynamic shared memory: (E + R + num_nodes) ints.
template <int kThreads>
__global__ void __launch_bounds__(kThreads) get_dispatch_layout_kernel(const __grid_constant__ LayoutParams p) {
  extern __shared__ int s_counts[];
  int* s_expert = s_counts;
  int* s_rank = s_counts + p.num_experts;
  int* s_node = s_rank + p.num_ranks;
  const int ncount = p.num_experts + p.num_ranks + p.num_nodes;
  for (int i = threadIdx.x; i < ncount; i += kThreads) s_counts[i] = 0;
  __syncthreads();

  const int experts_per_rank = p.num_experts / p.num_ranks;
  const int K = p.num_topk;
  for (int t = blockIdx.x * kThreads + threadIdx.x; t < p.num_tokens; t += gridDim.x * kThreads) {
    const i64* row = p.topk_idx + static_cast<i64>(t) * K;
    u8* in_rank = p.is_token_in_rank + static_cast<i64>(t) * p.num_ranks;
    for (int r = 0; r < p.num_ranks; ++r) in_rank[r] = 0;
    for (int k = 0; k < K; ++k) {
      const i64 e = row[k];
      if (e == -1) continue;
      if (e < 0 || e >= p.num_experts) {
        report_error(p.err, kErrBadInput, -1, kPhaseLayout, t, -1, static_cast<u64>(p.num_experts),
                     static_cast<u64>(e));
        continue;
      }
      atomicAdd(&s_expert[e], 1);
      const int r = static_cast<int>(e) / experts_per_rank;
      // A token counts once per rank (and per node) however many of its experts live there.
      bool seen_rank = false, seen_node = false;
      for (int k2 = 0; k2 < k; ++k2) {
        const i64 e2 = row[k2];
        if (e2 < 0 || e2 >= p.num_experts) continue;
        const int r2 = static_cast<int>(e2) / experts_per_rank;
        seen_rank |= (r2 == r);
        if (p.num_nodes > 0) seen_node |= (r2 / p.ranks_per_node == r / p.ranks_per_node);
      }
      if (!seen_rank) {
        atomicAdd(&s_rank[r], 1);
        in_rank[r] = 1;
      }
      if (p.num_nodes > 0 && !seen_node) atomicAdd(&s_node[r / p.ranks_per_node], 1);
    }
  }
  __syncthreads();
  for (int i = threadIdx.x; i < ncount; i += kThreads) {
    const int c = s_counts[i];
    if (c == 0) continue;
    if (i < p.num_experts) atomicAdd(&p.num_tokens_per_expert[i], c);
    else if (i < p.num_experts + p.num_ranks) atomicAdd(&p.num_tokens_per_rank[i - p.num_experts], c);
    else atomicAdd(&p.num_tokens_per_rdma_rank[i - p.num_experts - p.num_ranks], c);
  }
}

}  // namespace epcomm
