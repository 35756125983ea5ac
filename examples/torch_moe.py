"""A PyTorch MoE layer, forward and backward, over every GPU of this machine.

Each rank routes its tokens to top-2 of 16 experts, dispatches them with epcomm (autograd:
dispatch backward = combine, combine backward = cached dispatch), runs its local experts and
combines.  The result and the input gradient are checked against the same layer computed densely
on one GPU.  Run: python examples/torch_moe.py   (needs torch and 2+ GPUs,
or one with EPCOMM_SHARE_GPU=1: 2 ranks then share it)
"""
import sys

import torch

import epcomm
from epcomm.tools import spawn
from epcomm.torch_autograd import combine, dispatch

N, H, E, K = 512, 1024, 16, 2


def layer_weights():
    g = torch.Generator().manual_seed(0)
    return (torch.randn(E, H, H, generator=g) / H ** 0.5).cuda(), (torch.randn(H, E, generator=g) / H ** 0.5).cuda()


def worker(rank, world, group):
    torch.cuda.set_device(spawn.device_of(rank))
    W, router = layer_weights()
    x = torch.randn(N, H, generator=torch.Generator().manual_seed(100 + rank)).cuda().to(torch.bfloat16)
    x.requires_grad_(True)
    L = E // world
    buf = epcomm.Buffer(group, epcomm.Buffer.get_nvl_buffer_size_hint(H, world, N, K))

    scores = torch.softmax(x.float() @ router, dim=-1)
    w, idx = scores.topk(K, dim=-1)
    recv_x, recv_idx, recv_w, counts, handle = dispatch(buf, x, idx, w, E)
    y = torch.zeros(recv_x.shape[0], H, device="cuda")
    for j in range(L):  # the local experts; recv_idx holds local indices, -1 elsewhere
        hit = recv_idx == j
        rows = hit.any(dim=1)
        wj = (recv_w * hit).sum(dim=1, keepdim=True)
        y = y + rows[:, None] * wj * (recv_x.float() @ W[rank * L + j])
    out = combine(buf, y.to(torch.bfloat16), handle)
    out.float().square().mean().backward()

    # Dense reference of the same layer on this rank's tokens (gradients through the experts and,
    # as in the epcomm path, through the routing weights into the router's input).
    xr = x.detach().float().requires_grad_(True)
    wr = torch.softmax(xr @ router, dim=-1).gather(1, idx)
    ref = torch.zeros(N, H, device="cuda")
    for k in range(K):
        ref = ref + wr[:, k:k + 1] * torch.einsum("nh,nhd->nd", xr, W[idx[:, k]])
    ref.square().mean().backward()
    err = ((out.float() - ref).norm() / ref.norm()).item()
    gerr = ((x.grad.float() - xr.grad).norm() / xr.grad.norm()).item()
    buf.destroy()
    return {"rank": rank, "tokens per local expert": counts, "rel_err_out": err, "rel_err_grad_x": gerr,
            "ok": err < 2e-2 and gerr < 5e-2}


if __name__ == "__main__":
    sys.exit(spawn.run_example(worker, 2, divides=E, timeout=300))
