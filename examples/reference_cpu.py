"""epcomm's semantics on the CPU: 2 simulated ranks, 8 experts, top-2, through epcomm.reference
(the NumPy oracle the GPU kernels are tested against). No GPU, no CUDA; prints PASS or FAIL."""
import ml_dtypes, numpy as np
from epcomm import reference as ref

R, E, N, H, K = 2, 8, 16, 256, 2                  # ranks, experts, tokens per rank, hidden, top-k
L = E // R                                         # experts per rank: expert e lives on rank e // L
rng = np.random.default_rng(0)
x = [rng.standard_normal((N, H)).astype(ml_dtypes.bfloat16) for _ in range(R)]
topk_idx = [np.stack([rng.choice(E, K, replace=False) for _ in range(N)]).astype(np.int64) for _ in range(R)]
topk_w = [rng.random((N, K)).astype(np.float32) for _ in range(R)]
scale = np.arange(1, E + 1, dtype=np.float32)      # a toy expert: expert e multiplies its input by e + 1
dense = [sum(w[:, k:k + 1] * scale[i[:, k]][:, None] * xr.astype(np.float32) for k in range(K))
         for xr, i, w in zip(x, topk_idx, topk_w)]  # what the MoE layer should output, per rank

# normal mode (training, prefill): each token goes once to every rank holding one of its experts
print("tokens per rank from rank 0:", ref.get_dispatch_layout(topk_idx[0], E, R).num_tokens_per_rank)
got = ref.dispatch(x, E, topk_idx=topk_idx, topk_weights=topk_w)
y = []
for d, r in enumerate(got):                        # rank d applies its experts to the rows it received
    i, w = r.recv_topk_idx, r.recv_topk_weights    # local expert indices (-1: not on this rank)
    f = (w * np.where(i >= 0, scale[d * L + np.maximum(i, 0)], 0)).sum(1, keepdims=True)
    y.append((f * r.recv_x.astype(np.float32)).astype(ml_dtypes.bfloat16))
out = [o for o, _ in ref.combine(y, [r.handle for r in got])]  # sums each token's rows back home
err = max(np.abs(o.astype(np.float32) - t).max() / np.abs(t).max() for o, t in zip(out, dense))
print(f"normal mode: max |combine - dense| / max |dense| = {err:.4f}", "PASS" if err < 1e-2 else "FAIL")

# low-latency mode (decoding): one packed [local expert, R*T, H] array per rank, weighted combine
T = N                                              # most tokens a rank dispatches per call
ll = ref.low_latency_dispatch(x, topk_idx, T, E, use_fp8=False)
y = [(scale[d * L:(d + 1) * L, None, None] * r.recv_x.astype(np.float32)).astype(ml_dtypes.bfloat16)
     for d, r in enumerate(ll)]                    # local expert j of rank d is global d * L + j
out = ref.low_latency_combine(y, topk_idx, topk_w, [r.handle for r in ll])
err = max(np.abs(o.astype(np.float32) - t).max() / np.abs(t).max() for o, t in zip(out, dense))
print("rows per local expert on rank 0:", ll[0].recv_count)
print(f"low-latency mode: max |combine - dense| / max |dense| = {err:.4f}", "PASS" if err < 1e-2 else "FAIL")
