"""Dispatch and combine with CuPy arrays (no torch): CuPy in, CuPy out.

Bootstrap through epcomm's own FileGroup (epcomm.tools.spawn), toy experts (expert e scales its rows
by (e + 1) / E), and a check against epcomm.reference.  CuPy has no bfloat16: bf16 data travel
as uint16 arrays holding the bits.  Run: python examples/cupy_moe.py   (needs 2+ GPUs, or one
with EPCOMM_SHARE_GPU=1: 2 ranks then share it)
"""
import sys

import numpy as np

import epcomm
from epcomm import reference
from epcomm.tools import spawn
from epcomm.testing import random_bf16, random_topk, random_weights

N, H, E, K = 256, 2048, 16, 4


def inputs(world):
    rng = np.random.default_rng(0)
    out = []
    for _ in range(world):
        topk = random_topk(rng, N, E, K)
        out.append((random_bf16(rng, (N, H)), topk, random_weights(rng, topk)))
    return out


def worker(rank, world, group):
    import cupy as cp
    import ml_dtypes
    cp.cuda.Device(spawn.device_of(rank)).use()
    ins = inputs(world)
    x, topk, w = ins[rank]
    buf = epcomm.Buffer(group, epcomm.Buffer.get_nvl_buffer_size_hint(H, world, N, K), device=spawn.device_of(rank))
    xd = cp.asarray(x.view(np.uint16))
    recv_x, recv_idx, recv_w, counts, handle, _ = buf.dispatch(xd, topk_idx=cp.asarray(topk), topk_weights=cp.asarray(w),
                                                              num_experts=E)
    # Expert outputs: rows scaled by the mean of (e + 1) / E over the local experts they selected.
    L = E // world
    ids = cp.asnumpy(recv_idx)
    scale = np.where(ids >= 0, (ids + rank * L + 1) / E, 0).sum(1) / np.maximum((ids >= 0).sum(1), 1)
    y = (cp.asnumpy(recv_x).view(ml_dtypes.bfloat16).astype(np.float32) * scale[:, None]).astype(ml_dtypes.bfloat16)
    out, _, _ = buf.combine(cp.asarray(y.view(np.uint16)), handle)
    # The same with the reference.
    ref = reference.dispatch([i[0] for i in ins], E, topk_idx=[i[1] for i in ins], topk_weights=[i[2] for i in ins])
    ys = []
    for d, r in enumerate(ref):
        s = np.where(r.recv_topk_idx >= 0, (r.recv_topk_idx + d * L + 1) / E, 0).sum(1) / np.maximum((r.recv_topk_idx >= 0).sum(1), 1)
        ys.append((r.recv_x.astype(np.float32) * s[:, None]).astype(ml_dtypes.bfloat16))
    want = reference.combine(ys, [r.handle for r in ref])[rank][0]
    ok = type(out).__module__.startswith("cupy") and np.array_equal(cp.asnumpy(out), want.view(np.uint16))
    buf.destroy()
    return {"rank": rank, "received": recv_x.shape[0], "counts": counts, "ok": bool(ok)}


if __name__ == "__main__":
    sys.exit(spawn.run_example(worker, 2, divides=E, timeout=300))
