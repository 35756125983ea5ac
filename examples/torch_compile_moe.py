"""A compiled PyTorch MoE layer (torch.compile(fullgraph=True): no graph break), forward and
backward, over every GPU of this machine, with epcomm.torch_ops.

Each rank routes its tokens to top-2 of 16 experts; the compiled layer dispatches them with a
fixed output size (num_worst_tokens: every token of every rank, the most a rank can receive),
runs the local experts (padding rows have top-k index -1 and are masked out) and combines.
The gradients flow back through the combine (a cached dispatch) and the dispatch (a combine),
into the tokens and the routing weights.  Checked: the compiled layer matches the same layer
called eagerly, forward and backward, to bf16 rounding (Inductor fuses the float work around the
collectives, the router's softmax and the experts' sums, in its own order), and the layer
computed densely.
Run: python examples/torch_compile_moe.py   (needs torch and 2+ GPUs, or one with
EPCOMM_SHARE_GPU=1: 2 ranks then share it)
"""
import sys

import torch

import epcomm
from epcomm import torch_ops
from epcomm.tools import spawn

N, H, E, K = 256, 1024, 16, 2


def layer_weights():
    g = torch.Generator().manual_seed(0)
    return (torch.randn(E, H, H, generator=g) / H ** 0.5).cuda(), (torch.randn(H, E, generator=g) / H ** 0.5).cuda()


def make_layer(buf, W, router, rank, world):
    L = E // world

    def layer(x):
        scores = torch.softmax(x.float() @ router, dim=-1)
        w, idx = scores.topk(K, dim=-1)
        recv_x, recv_idx, recv_w, handle = torch_ops.dispatch(buf, x, idx, w, E, num_worst_tokens=N * world)
        y = torch.zeros(recv_x.shape[0], H, device=x.device)
        for j in range(L):  # the local experts; recv_idx holds local indices, -1 elsewhere and in padding
            hit = recv_idx == j
            wj = (recv_w * hit).sum(dim=1, keepdim=True)
            y = y + torch.where(hit.any(dim=1, keepdim=True), wj * (recv_x.float() @ W[rank * L + j]), 0.0)
        out, _ = torch_ops.combine(buf, y.to(torch.bfloat16), handle)
        return out, idx
    return layer


def run(fn, x0):
    x = x0.detach().clone().requires_grad_(True)
    out, idx = fn(x)
    out.float().square().mean().backward()
    return out.detach(), x.grad, idx


def worker(rank, world, group):
    torch.cuda.set_device(spawn.device_of(rank))
    W, router = layer_weights()
    x0 = torch.randn(N, H, generator=torch.Generator().manual_seed(100 + rank)).cuda().to(torch.bfloat16)
    buf = epcomm.Buffer(group, epcomm.Buffer.get_nvl_buffer_size_hint(H, world, N, K))
    layer = make_layer(buf, W, router, rank, world)
    eager_out, eager_grad, idx = run(layer, x0)
    compiled = torch.compile(layer, fullgraph=True)
    comp_out, comp_grad, _ = run(compiled, x0)
    def rel(a, b):
        return ((a.float() - b.float()).norm() / b.float().norm()).item()

    vs_eager = max(rel(comp_out, eager_out), rel(comp_grad, eager_grad))

    # Dense reference of the same layer on this rank's tokens.
    xr = x0.float().requires_grad_(True)
    wr = torch.softmax(xr @ router, dim=-1).gather(1, idx)
    ref = torch.zeros(N, H, device="cuda")
    for k in range(K):
        ref = ref + wr[:, k:k + 1] * torch.einsum("nh,nhd->nd", xr, W[idx[:, k]])
    ref.square().mean().backward()
    err, gerr = rel(comp_out, ref), rel(comp_grad, xr.grad)
    buf.destroy()
    return {"rank": rank, "rel_err_compiled_vs_eager": vs_eager, "rel_err_out": err, "rel_err_grad_x": gerr,
            "ok": vs_eager < 1e-2 and err < 2e-2 and gerr < 5e-2}


if __name__ == "__main__":
    sys.exit(spawn.run_example(worker, 2, divides=E, timeout=600))
