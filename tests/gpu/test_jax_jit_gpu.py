"""epcomm.jax on the GPU, against epcomm.reference, bit for bit: jitted normal-mode dispatch and
combine (BF16 and FP8), the jitted low-latency pair (BF16 and FP8), jax.grad through dispatch ->
expert -> combine, a jitted lax.scan of 8 layers, and the low-latency pair run 4 times with new
routing inside a command buffer (every execution's result is checked; the Python callback's
runs are counted and reported: fewer runs than executions means XLA replayed its capture).

One process per rank (epcomm.tools.spawn), each with its own JAX on the rank's GPU (memory not
preallocated: ranks may share one GPU, EPCOMM_SHARE_GPU=1); EPCOMM_TEST_RANKS picks 2 or 4.
Skips without jax or a GPU."""
from __future__ import annotations

import numpy as np
import pytest

from epcomm.tools import spawn
from gpu_checks import (TEST_TIMEOUT, assert_bits, assert_every_rank_ok, device_of, needs_ranks, normal_ranks,
                        random_job)

pytest.importorskip("jax")
pytestmark = [pytest.mark.gpu, pytest.mark.multigpu, needs_ranks]

# XLA puts custom calls into command buffers (CUDA graphs), however small the program.
_ENV = {"XLA_PYTHON_CLIENT_PREALLOCATE": "false",
        "XLA_FLAGS": "--xla_gpu_enable_command_buffer=FUSION,CUSTOM_CALL --xla_gpu_graph_min_graph_size=1"}
N, H, K, E = 64, 1024, 4, 16


def _setup(rank, world, group):
    import jax

    import epcomm
    dev = [d for d in jax.devices("gpu") if d.local_hardware_id == device_of(rank)][0]
    nvl = epcomm.Buffer.get_nvl_buffer_size_hint(H, world, N, K)
    rdma = epcomm.Buffer.get_low_latency_rdma_size_hint(N, H, world, E)
    buf = epcomm.Buffer(group, nvl, rdma, low_latency_mode=True, device=device_of(rank))
    return jax, dev, buf


def _job(seed, world):
    return random_job(np.random.default_rng(seed), world, N, H, E, K, 0.1)


def _normal(jax, dev, buf, rank, world, out):
    import jax.numpy as jnp

    import epcomm.jax as ej
    from epcomm import reference
    M = N * world
    for fp8 in (False, True):
        xs, tks, ws = _job(10 + fp8, world)
        scales = None
        if fp8:
            q = [reference.fp8_quantize(x) for x in xs]
            xs, scales = [a for a, _ in q], [s for _, s in q]
        ref = reference.dispatch(xs, E, topk_idx=tks, topk_weights=ws, x_scales=scales, num_worst_tokens=M)[rank]
        x = jax.device_put(xs[rank], dev)
        xin = (x, jax.device_put(scales[rank], dev)) if fp8 else x

        @jax.jit
        def f(xin, t, w):
            rx, ri, rw, h = ej.dispatch(buf, xin, t, w, num_experts=E, num_worst_tokens=M)
            y = ej.combine(buf, rx[0].astype(jnp.bfloat16) if fp8 else rx, h)
            return rx, ri, rw, h.recv_src_idx, y

        rx, ri, rw, src, y = f(xin, jax.device_put(tks[rank].astype(np.int32), dev), jax.device_put(ws[rank], dev))
        tag = "fp8" if fp8 else "bf16"
        keep = np.asarray(src) >= 0
        assert_bits(f"{tag} recv_src_idx", np.asarray(src), ref.handle.recv_src_idx)
        data = np.asarray(rx[0] if fp8 else rx)
        assert_bits(f"{tag} recv_x", data[keep], ref.recv_x[keep])
        if fp8:
            assert_bits(f"{tag} scales", np.asarray(rx[1])[keep], ref.recv_x_scales[keep])
        else:
            assert not np.any(data[~keep].astype(np.float32)), f"{tag}: padding rows not zero"
        assert_bits(f"{tag} recv_topk_idx", np.asarray(ri), ref.recv_topk_idx.astype(np.int32))
        assert_bits(f"{tag} recv_topk_weights", np.asarray(rw)[keep], ref.recv_topk_weights[keep])
        allref = reference.dispatch(xs, E, topk_idx=tks, topk_weights=ws, x_scales=scales, num_worst_tokens=M)
        inputs = [(r.recv_x.astype(np.float32)).astype(_bf16()) for r in allref]
        want = reference.combine(inputs, [r.handle for r in allref])[rank][0]
        assert_bits(f"{tag} combined", np.asarray(y), want)
        out[f"normal {tag}"] = "ok"


def _bf16():
    import ml_dtypes
    return ml_dtypes.bfloat16


def _low_latency(jax, dev, buf, rank, world, out, calls):
    import epcomm.jax as ej
    from epcomm import reference
    T = N
    partials = buf._ll.partials and not buf._ll.force_put
    for fp8 in (False, True):
        @jax.jit
        def pair(x, t, w, y):
            rx, cnt, h = ej.low_latency_dispatch(buf, x, t, num_max_dispatch_tokens_per_rank=T, num_experts=E,
                                                 use_fp8=fp8)
            return rx, cnt, h.src_info, ej.low_latency_combine(buf, y, t, w, h)

        runs = 4
        before = calls[0]
        for i in range(runs):  # new routing every time: a replay must see it
            xs, tks, ws = _job(100 + 10 * fp8 + i, world)
            ref = reference.low_latency_dispatch(xs, tks, T, E, use_fp8=fp8)
            ys = [np.asarray(np.random.default_rng(7 + i + s).standard_normal((E // world, world * T, H)),
                             np.float32).astype(_bf16()) for s in range(world)]
            put = lambda a: jax.device_put(a, dev)  # noqa: E731
            # Host copies at once: no device array of this run outlives it, so the next run's
            # buffers can take the same addresses, which XLA needs to replay its capture
            # (any changed address re-records it, running the callback again).
            rx, cnt, src, comb = jax.device_get(
                pair(put(xs[rank]), put(tks[rank].astype(np.int32)), put(ws[rank]), put(ys[rank])))
            tag = f"ll {'fp8' if fp8 else 'bf16'} run {i}"
            r = ref[rank]
            c = np.asarray(cnt)
            assert_bits(f"{tag} recv_count", c, r.recv_count)
            data = np.asarray(rx[0] if fp8 else rx)
            for j, n in enumerate(c):
                assert_bits(f"{tag} expert {j} rows", data[j, :n], r.recv_x[j, :n])
                assert_bits(f"{tag} expert {j} src_info", np.asarray(src)[j, :n], r.handle.src_info[j, :n])
                if fp8:
                    assert_bits(f"{tag} expert {j} scales", np.asarray(rx[1])[j, :n], r.recv_x_scales[j, :n])
            want = reference.low_latency_combine(ys, tks, ws, [q.handle for q in ref], partials=partials)[rank]
            assert_bits(f"{tag} combined", np.asarray(comb), want)
        # Reported, not asserted: whether XLA replays depends on its allocator handing the
        # same addresses again (a correct run may re-record every time).
        python_runs = calls[0] - before
        out[f"ll {'fp8' if fp8 else 'bf16'}: the callback ran {python_runs} times for {runs} executions"] = "ok"


def _grad(jax, dev, buf, rank, world, out):
    import jax.numpy as jnp

    import epcomm.jax as ej
    from epcomm import reference
    M = N * world
    xs, tks, ws = _job(200, world)
    gs = [np.asarray(np.random.default_rng(300 + s).standard_normal((N, H)), np.float32).astype(_bf16())
          for s in range(world)]

    def loss(x, w, t, g):
        rx, _, rw, h = ej.dispatch(buf, x, t, w, num_experts=E, num_worst_tokens=M)
        y = ej.combine(buf, rx * 2, h)  # the expert: times two (exact in bf16)
        return jnp.sum(y.astype(jnp.float32) * g.astype(jnp.float32)) + jnp.sum(rw)

    put = lambda a: jax.device_put(a, dev)  # noqa: E731
    gx, gw = jax.jit(jax.grad(loss, argnums=(0, 1)))(put(xs[rank]), put(ws[rank]), put(tks[rank].astype(np.int32)),
                                                   put(gs[rank]))
    # d loss / d x: the output gradient dispatched along the route, doubled, and combined back.
    back = reference.dispatch(gs, E, topk_idx=tks, num_worst_tokens=M)
    dbl = [(r.recv_x.astype(np.float32) * 2).astype(_bf16()) for r in back]
    assert_bits("grad x", np.asarray(gx), reference.combine(dbl, [r.handle for r in back])[rank][0])
    # d loss / d w: each weight is received once, by the rank of its expert.
    assert_bits("grad w", np.asarray(gw), (tks[rank] >= 0).astype(np.float32))
    out["grad"] = "ok"


def _scan(jax, dev, buf, rank, world, out):
    import epcomm.jax as ej
    from epcomm import reference
    M, layers = N * world, 8
    xs, _, _ = _job(400, world)
    tk = [[_job(500 + i, world)[1][s] for i in range(layers)] for s in range(world)]

    def layer(x, t):
        rx, _, _, h = ej.dispatch(buf, x, t, num_experts=E, num_worst_tokens=M)
        return ej.combine(buf, rx, h), None

    f = jax.jit(lambda x, ts: jax.lax.scan(layer, x, ts)[0])
    got = f(jax.device_put(xs[rank], dev), jax.device_put(np.stack(tk[rank]).astype(np.int32), dev))
    cur = xs
    for i in range(layers):
        ref = reference.dispatch(cur, E, topk_idx=[tk[s][i] for s in range(world)], num_worst_tokens=M)
        cur = [c[0] for c in reference.combine([r.recv_x for r in ref], [r.handle for r in ref])]
    assert_bits("scan of 8 layers", np.asarray(got), cur[rank])
    out["scan"] = "ok"


def _worker(rank, world, group):
    jax, dev, buf = _setup(rank, world, group)
    calls = [0]
    inner = buf.low_latency_dispatch

    def counted(*a, **kw):
        calls[0] += 1
        return inner(*a, **kw)

    buf.low_latency_dispatch = counted  # the callback's Python runs (a replay runs none)
    out = {}
    with jax.default_device(dev):
        for step in (_normal, _grad, _scan):
            step(jax, dev, buf, rank, world, out)
            group.barrier()
        _low_latency(jax, dev, buf, rank, world, out, calls)
    buf.synchronize()
    buf.destroy()
    return out


def test_jax_jit_against_reference():
    res = spawn.run(_worker, normal_ranks(), timeout=TEST_TIMEOUT.get(), env=_ENV)
    assert_every_rank_ok(res)
