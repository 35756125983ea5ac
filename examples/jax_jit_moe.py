"""A jitted MoE layer in JAX: router, epcomm.jax dispatch, the local experts, combine; forward and
jax.grad, inside shard_map; each rank checks that the output and gradients are finite and that
the compiled step gives the same loss again (tests/gpu/test_jax_jit_gpu.py checks the operations
against epcomm.reference bit for bit).

Each process is one expert-parallel rank with its own GPU (or ranks sharing one GPU with
EPCOMM_SHARE_GPU=1); the epcomm.Buffer is made once per process, outside jit, and passed in as a
static value.  In a multi-process JAX job (jax.distributed, one GPU per process) the Buffer is
made with ``epcomm.Buffer("jax", ...)`` after ``jax.distributed.initialize()`` and the mesh's
expert axis is the process axis; here each process runs its own JAX and shard_map maps the
layer over its one local device, the same code a larger mesh would run per block.

Run: python examples/jax_jit_moe.py   (EPCOMM_SHARE_GPU=1 for 2 ranks on one GPU)
"""
import os
import sys

import numpy as np

N, H, K, E, F = 64, 512, 2, 8, 256  # tokens per rank, hidden, top-k, experts, expert width


def moe_layer(buf, num_ranks, params, x):
    """One MoE layer on this rank's tokens x [N, H] (bf16): top-K routing, dispatch, each local
    expert's ReLU MLP on its rows, weighted combine."""
    import jax
    import jax.numpy as jnp

    import epcomm.jax as ej
    logits = x.astype(jnp.float32) @ params["router"]
    w, idx = jax.lax.top_k(jax.nn.softmax(logits), K)
    M = N * num_ranks  # worst case: every token of every rank
    recv_x, recv_idx, recv_w, handle = ej.dispatch(buf, x, idx, w, num_experts=E, num_worst_tokens=M)
    L = E // num_ranks
    hid = recv_x.astype(jnp.float32)
    out = jnp.zeros((M, H), jnp.float32)
    for j in range(L):  # each local expert on the rows that chose it, scaled by the weight
        gate = jnp.sum(jnp.where(recv_idx == j, recv_w, 0.0), axis=1, keepdims=True)
        y = jax.nn.relu(hid @ params["w1"][j]) @ params["w2"][j]
        out = out + gate * y
    return ej.combine(buf, out.astype(jnp.bfloat16), handle)


def worker(rank, world, group):
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # ranks may share a GPU
    import jax
    import jax.numpy as jnp
    from jax.sharding import Mesh, PartitionSpec as P

    import epcomm
    from epcomm.tools import spawn
    dev = [d for d in jax.devices("gpu") if d.local_hardware_id == spawn.device_of(rank)][0]
    buf = epcomm.Buffer(group, epcomm.Buffer.get_nvl_buffer_size_hint(H, world, N, K), device=spawn.device_of(rank))
    rng = np.random.default_rng(0)  # the same parameters on every rank; rank r holds experts r*L..
    L = E // world
    params = {"router": rng.standard_normal((H, E)).astype(np.float32) / H,
              "w1": rng.standard_normal((E, H, F)).astype(np.float32)[rank * L:(rank + 1) * L] / H,
              "w2": rng.standard_normal((E, F, H)).astype(np.float32)[rank * L:(rank + 1) * L] / F}
    x = np.random.default_rng(100 + rank).standard_normal((N, H)).astype(jnp.bfloat16)
    with jax.default_device(dev):
        params = jax.device_put(params, dev)
        xj = jax.device_put(x, dev)
        mesh = Mesh(np.array([dev]), ("ep",))
        layer = jax.shard_map(lambda p, a: moe_layer(buf, world, p, a), mesh=mesh, in_specs=(P(), P("ep")),
                              out_specs=P("ep"), check_vma=False)
        y = jax.jit(layer)(params, xj)
        loss = jax.jit(jax.value_and_grad(lambda p, a: jnp.mean(layer(p, a).astype(jnp.float32) ** 2)))
        value, grads = loss(params, xj)
        for _ in range(3):  # the compiled step again: no retrace, same result
            value2, _ = loss(params, xj)
        ok = bool(np.isfinite(np.asarray(y, np.float32)).all() and float(value) == float(value2)
                  and all(np.isfinite(np.asarray(g)).all() for g in jax.tree_util.tree_leaves(grads)))
    buf.destroy()
    return {"rank": rank, "out": tuple(y.shape), "loss": float(value), "ok": ok}


if __name__ == "__main__":
    from epcomm.tools import spawn
    sys.exit(spawn.run_example(worker, 2, divides=E, timeout=600))
