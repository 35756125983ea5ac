"""Dispatch and combine with JAX arrays (no torch): JAX in, JAX out, through DLPack.

JAX's default int32 expert indices are accepted.  Outputs are JAX arrays that alias memory
epcomm allocated.  Checked against epcomm.reference.  Run: python examples/jax_moe.py (2+ GPUs,
or one with EPCOMM_SHARE_GPU=1: 2 ranks then share it; XLA_PYTHON_CLIENT_PREALLOCATE=false is
set so JAX leaves GPU memory for epcomm).
"""
import os
import sys

import numpy as np

from epcomm.tools import spawn

N, H, E, K = 256, 2048, 16, 4


def worker(rank, world, group):
    os.environ["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"
    import jax
    import jax.numpy as jnp
    import ml_dtypes

    import epcomm
    from epcomm import reference
    from epcomm.testing import random_bf16, random_topk, random_weights
    rng = np.random.default_rng(0)
    ins = []
    for _ in range(world):
        topk = random_topk(rng, N, E, K)
        ins.append((random_bf16(rng, (N, H)), topk, random_weights(rng, topk)))
    x, topk, w = ins[rank]
    dev = [d for d in jax.devices("gpu") if d.local_hardware_id == spawn.device_of(rank)][0]
    xd, td, wd = (jax.device_put(a, dev) for a in (jnp.asarray(x), jnp.asarray(topk.astype(np.int32)), jnp.asarray(w)))
    buf = epcomm.Buffer(group, epcomm.Buffer.get_nvl_buffer_size_hint(H, world, N, K), device=spawn.device_of(rank))
    recv_x, recv_idx, recv_w, counts, handle, _ = buf.dispatch(xd, topk_idx=td, topk_weights=wd, num_experts=E)
    y = (recv_x.astype(jnp.float32) * 2.0).astype(jnp.bfloat16)   # the "experts" double their input
    out, out_w, _ = buf.combine(y, handle, topk_weights=recv_w)
    ref = reference.dispatch([i[0] for i in ins], E, topk_idx=[i[1] for i in ins], topk_weights=[i[2] for i in ins])
    ys = [(r.recv_x.astype(np.float32) * 2.0).astype(ml_dtypes.bfloat16) for r in ref]
    want, want_w = reference.combine(ys, [r.handle for r in ref], topk_weights=[r.recv_topk_weights for r in ref])[rank]
    ok = isinstance(out, jax.Array) and np.array_equal(np.asarray(out).view(np.uint16), want.view(np.uint16)) \
        and np.array_equal(np.asarray(out_w), want_w)
    buf.destroy()
    return {"rank": rank, "received": int(recv_x.shape[0]), "ok": bool(ok)}


if __name__ == "__main__":
    sys.exit(spawn.run_example(worker, 2, divides=E, timeout=300))
