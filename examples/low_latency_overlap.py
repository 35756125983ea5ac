"""Decoding with two micro-batches: low-latency dispatch/combine with receive hooks, so the
communication of one micro-batch overlaps the computation of the other while no SM waits.

    dispatch(mb0, hook)  dispatch(mb1, hook)      <- sends only; return at once
    hook0(); experts(mb0)                         <- mb1's tokens are still in flight
    hook1(); experts(mb1)
    combine(mb0, hook)   combine(mb1, hook); hooks

Checked against epcomm.reference.  Run: python examples/low_latency_overlap.py  (torch; one rank
per GPU, or 2 ranks sharing one GPU with EPCOMM_SHARE_GPU=1)
"""
import sys

import numpy as np
import torch

import epcomm
from epcomm import reference
from epcomm.tools import spawn
from epcomm.testing import random_bf16, random_topk, random_weights

T, H, E, K = 128, 7168, 64, 8


def worker(rank, world, group):
    import ml_dtypes
    torch.cuda.set_device(spawn.device_of(rank))
    buf = epcomm.Buffer(group, 0, epcomm.Buffer.get_low_latency_rdma_size_hint(T, H, world, E), low_latency_mode=True)
    mbs = []
    for m in range(2):
        rng = np.random.default_rng(10 + m)
        all_r = []
        for _ in range(world):
            tk = random_topk(rng, T, E, K)
            all_r.append((random_bf16(rng, (T, H)), tk, random_weights(rng, tk)))
        mbs.append(all_r)
    dev = [(torch.from_numpy(a[rank][0].view(np.int16)).cuda().view(torch.bfloat16),
            torch.from_numpy(a[rank][1]).cuda(), torch.from_numpy(a[rank][2]).cuda()) for a in mbs]
    d = [buf.low_latency_dispatch(x, t, T, E, use_fp8=False, return_recv_hook=True) for x, t, _ in dev]
    outs = []
    for m in range(2):
        d[m][4]()                                    # receive micro-batch m
        recv_x = d[m][0]
        y = (recv_x.float() * 0.5).to(torch.bfloat16)  # the "experts"
        outs.append(y)
    c = [buf.low_latency_combine(outs[m], dev[m][1], dev[m][2], d[m][2], return_recv_hook=True) for m in range(2)]
    for m in range(2):
        c[m][2]()
    ok = True
    for m in range(2):
        xs, tks, ws = zip(*mbs[m])
        ref = reference.low_latency_dispatch(list(xs), list(tks), T, E, use_fp8=False)
        ys = [(r.recv_x.astype(np.float32) * 0.5).astype(ml_dtypes.bfloat16) for r in ref]
        want = reference.low_latency_combine(ys, list(tks), list(ws), [r.handle for r in ref])[rank]
        got = c[m][0].view(torch.int16).cpu().numpy()
        ok &= np.array_equal(got, want.view(np.int16))
    buf.destroy()
    return {"rank": rank, "ok": bool(ok)}


if __name__ == "__main__":
    sys.exit(spawn.run_example(worker, 1, divides=E, timeout=300))
