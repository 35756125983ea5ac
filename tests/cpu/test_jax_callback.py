"""epcomm.jax's operations run by XLA on the CPU backend, end to end through the engines with the
driver recorded (tests/helpers/fake_rig.py): the callback gets XLA's buffers (every dtype, FP8
included, whose addresses jaxlib's __cuda_array_interface__ does not give), runs the engine on
XLA's stream, and keeps nothing of the program's memory.  The CPU backend has no stream, so the
callback is handed a fake one; its buffers are host memory, so the device check is widened to
the CPU for these runs (and checked on its own: a program lowered for the CPU is refused)."""
from __future__ import annotations

import pytest

jax = pytest.importorskip("jax")
jnp = pytest.importorskip("jax.numpy")

from fake_rig import FakeRuntime  # noqa: E402

from epcomm.errors import EpcommError  # noqa: E402
from epcomm.interop import jax_callback as jx  # noqa: E402
from epcomm.interop import xla_buffers  # noqa: E402
from epcomm.interop.dlpack import kDLCPU  # noqa: E402

ej = pytest.importorskip("epcomm.jax")

N, H, K, E, M = 8, 256, 2, 4, 16
XLA_STREAM = 0x5151


class _Ctx:
    """What the GPU backend's ExecutionContext gives the callback: XLA's stream."""
    stream = XLA_STREAM


def _fresh_caches(monkeypatch):
    monkeypatch.setattr(jx, "_OPS", {})
    monkeypatch.setattr(ej, "_RUNNERS", {})


@pytest.fixture
def rig(monkeypatch):
    """The fake runtime, with the callback handed XLA's stream and its buffers' addresses and
    shapes recorded (``rig.xla``: address -> (shape, dtype) of every program buffer seen)."""
    r = FakeRuntime(monkeypatch)
    real = jx.buffer_callback()
    r.xla = {}

    def bc(cb, result, **kw):
        def seen(ctx, outs, *ins):
            for b in (*ins, *outs):
                r.xla[xla_buffers._address(b)] = (tuple(b.shape), b.dtype.name)
            cb(_Ctx, outs, *ins)
        return real(seen, result, **kw)

    monkeypatch.setattr(jx, "_CALLBACK", [bc])
    monkeypatch.setattr(xla_buffers, "DEVICE_TYPES", xla_buffers.DEVICE_TYPES + (kDLCPU,))
    _fresh_caches(monkeypatch)
    return r


def _inputs():
    return (jnp.ones((N, H), jnp.bfloat16), jnp.asarray([[0, 3], [1, -1]] * (N // 2), jnp.int32),
            jnp.ones((N, K), jnp.float32))


def test_normal_calls_run_the_engine_on_xla_stream(rig, monkeypatch):
    from epcomm.runtime import driver
    records = []
    monkeypatch.setattr(driver, "event_record", lambda ev, s: records.append(s) or rig.event_record(ev, s))
    b = rig.normal_buffer()
    x, t, w = _inputs()
    rx, ri, rw, h = jax.jit(lambda x, t, w: ej.dispatch(b, x, t, w, num_experts=E, num_worst_tokens=M))(x, t, w)
    assert rig.launched() == ["layout", "notify", "send", "recv"]
    # The comm stream (0 here) is ordered after XLA's stream (an event recorded there first),
    # and XLA's stream waits for the call's event last: the kernels are ordered in the program.
    assert records[0] == XLA_STREAM and rig.waits[-1][0] == XLA_STREAM
    assert rx.shape == (M, H) and ri.shape == (M, K) and rw.shape == (M, K) and h.recv_src_idx.shape == (M,)
    rig.clear()
    y = jax.jit(lambda x, h: ej.combine(b, x, h))(rx, h)
    assert rig.launched() == ["combine"] and y.shape == (N, H)
    rig.clear()
    lay = jax.jit(lambda t: ej.get_dispatch_layout(b, t, E))(t)
    assert rig.launched() == ["layout"] and [a.shape for a in lay] == [(2,), (E,), (N, 2)]


def test_gradients_run_a_combine_and_a_cached_dispatch(rig):
    b = rig.normal_buffer()
    x, t, w = _inputs()

    def loss(x, w, t):
        rx, _, rw, h = ej.dispatch(b, x, t, w, num_experts=E, num_worst_tokens=M)
        return jnp.sum(ej.combine(b, rx, h).astype(jnp.float32)) + jnp.sum(rw)

    gx, gw = jax.jit(jax.grad(loss, argnums=(0, 1)))(x, w, t)
    assert gx.shape == (N, H) and gx.dtype == jnp.bfloat16 and gw.shape == (N, K)
    # forward dispatch; backward: the cached dispatch (combine's rule), then the combine
    # (dispatch's); the forward combine's output is unused by grad, so XLA drops it.
    assert rig.launched() == ["layout", "notify", "send", "recv", "notify", "send", "recv", "combine"]


def test_fp8_buffers_reach_the_engine(rig):
    """jaxlib's __cuda_array_interface__ refuses FP8 buffers (and every buffer on the CPU) with
    its runtime error: the address then comes through DLPack."""
    b = rig.normal_buffer()
    _, t, _ = _inputs()
    d, s = jnp.ones((N, H), jnp.float8_e4m3fn), jnp.ones((N, H // 128), jnp.float32)
    (rx, rs), ri, rw, h = jax.jit(lambda d, s, t: ej.dispatch(b, (d, s), t, num_experts=E, num_worst_tokens=M))(
        d, s, t)
    assert rig.launched() == ["layout", "notify", "send", "recv"]
    assert rx.dtype == jnp.float8_e4m3fn and rs.shape == (M, H // 128) and rw is None
    assert ((N, H), "float8_e4m3fn") in rig.xla.values() and ((M, H), "float8_e4m3fn") in rig.xla.values()


@pytest.mark.parametrize("fp8", [False, True])
def test_low_latency_pair_launches_on_xla_stream(rig, fp8):
    b, st = rig.ll_buffer()
    x, t, w = _inputs()

    def pair(x, t, w):
        rx, cnt, h = ej.low_latency_dispatch(b, x, t, num_max_dispatch_tokens_per_rank=N, num_experts=E,
                                             use_fp8=fp8, slot=1)
        return rx, cnt, ej.low_latency_combine(b, jnp.zeros((E // 2, 2 * N, H), jnp.bfloat16), t, w, h)

    rx, cnt, y = jax.jit(pair)(x, t, w)
    assert rig.launched() == ["dispatch_both", "combine_both"]
    assert [s for s, _ in rig.launch_streams] == [XLA_STREAM, XLA_STREAM]
    assert cnt.shape == (E // 2,) and y.shape == (N, H)
    # The slot is the caller's (static), whatever the host alternation says.
    assert st._disp_slot == 0 and st._comb_slot == 0


def test_nothing_of_the_program_is_kept_after_its_call(rig):
    """clean_low_latency_buffer zeroes the tag records of the slot results the engine keeps:
    a compiled dispatch's are the program's buffers, reused by XLA once the call returned."""
    b, st = rig.ll_buffer()
    x, t, _ = _inputs()
    jax.jit(lambda x, t: ej.low_latency_dispatch(b, x, t, num_max_dispatch_tokens_per_rank=N, num_experts=E,
                                                 use_fp8=False))(x, t)
    assert rig.xla and st._results == [None, None]
    rig.log.clear()
    b.clean_low_latency_buffer(N, H, E)
    touched = [e[1] for e in rig.log if e[0] == "memset"]
    assert touched and not set(touched) & set(rig.xla)


def test_a_program_lowered_for_the_cpu_is_refused(monkeypatch):
    """The real device check: host buffers never reach the kernels."""
    rig = FakeRuntime(monkeypatch)
    real = jx.buffer_callback()
    monkeypatch.setattr(jx, "_CALLBACK", [lambda cb, result, **kw: real(lambda c, o, *i: cb(_Ctx, o, *i), result,
                                                                           **kw)])
    _fresh_caches(monkeypatch)
    b = rig.normal_buffer()
    _, t, _ = _inputs()
    with pytest.raises(Exception, match="not a CUDA GPU"):
        jax.jit(lambda t: ej.get_dispatch_layout(b, t, E))(t)
    assert rig.launched() == []


def test_xla_arg_views_a_buffer_with_its_logical_dtype():
    """int64 travels as int32 pairs: the view has the logical shape and the buffer's address;
    a buffer of another byte size is refused."""
    seen = []

    def cb(ctx, outs, a):
        seen.append(xla_buffers._address(a))
        r = xla_buffers.xla_arg(a, (3,), "int64", 0).ref
        seen.append((r.ptr, r.shape, r.dtype, r.strides))
        with pytest.raises(EpcommError, match="cannot hold int64 \\(4,\\)"):
            xla_buffers.xla_arg(a, (4,), "int64", 0)

    import jax.experimental.buffer_callback as bcm
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(xla_buffers, "DEVICE_TYPES", (kDLCPU,))
        jax.jit(bcm.buffer_callback(cb, jax.ShapeDtypeStruct((1,), jnp.int32)))(jx.int64_pairs(jnp.arange(3)))
    addr, (ptr, shape, dtype, strides) = seen
    assert ptr == addr and shape == (3,) and dtype == "int64" and strides == (1,)


def test_the_example_layer_runs_in_shard_map_with_its_gradient(rig):
    """examples/jax_jit_moe.py's layer, as its worker runs it (one-device mesh, value_and_grad)."""
    import sys
    from pathlib import Path

    import numpy as np
    from jax.sharding import Mesh, PartitionSpec as P
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples"))
    try:
        import jax_jit_moe as ex
    finally:
        sys.path.pop(0)
    world, b = 2, rig.normal_buffer(R=2)
    L = ex.E // world
    rng = np.random.default_rng(0)
    params = {"router": jnp.asarray(rng.standard_normal((ex.H, ex.E)), jnp.float32),
              "w1": jnp.asarray(rng.standard_normal((L, ex.H, ex.F)), jnp.float32),
              "w2": jnp.asarray(rng.standard_normal((L, ex.F, ex.H)), jnp.float32)}
    x = jnp.ones((ex.N, ex.H), jnp.bfloat16)
    mesh = Mesh(np.array(jax.devices()[:1]), ("ep",))
    layer = jax.shard_map(lambda p, a: ex.moe_layer(b, world, p, a), mesh=mesh, in_specs=(P(), P("ep")),
                          out_specs=P("ep"), check_vma=False)
    assert jax.jit(layer)(params, x).shape == (ex.N, ex.H)
    _, grads = jax.jit(jax.value_and_grad(lambda p, a: jnp.mean(layer(p, a).astype(jnp.float32) ** 2)))(params, x)
    assert jax.tree_util.tree_map(jnp.shape, grads) == jax.tree_util.tree_map(jnp.shape, params)
    # the layer: a dispatch and a combine; value_and_grad: those again, then the backward's
    # cached dispatch (combine's rule) and combine (dispatch's rule, with the weights' gradient)
    assert rig.launched().count("recv") == 3 and rig.launched().count("combine") == 3


def test_calls_without_a_gradient_say_so_under_grad(rig):
    """An FP8 dispatch and the low-latency pair have no VJP: differentiating through one raises
    a TypeError naming it (not JAX's generic buffer_callback error); with nothing
    differentiated (stop_gradient, or integer inputs only) they run as usual."""
    b = rig.normal_buffer()
    _, t, w = _inputs()
    d, s = jnp.ones((N, H), jnp.float8_e4m3fn), jnp.ones((N, H // 128), jnp.float32)

    def fp8_loss(w, stop=False):
        w = jax.lax.stop_gradient(w) if stop else w
        _, _, rw, _ = ej.dispatch(b, (d, s), t, w, num_experts=E, num_worst_tokens=M)
        return jnp.sum(rw) + jnp.sum(w)

    with pytest.raises(TypeError, match="epcomm.jax.dispatch of an FP8 x is not differentiable"):
        jax.grad(fp8_loss)(w)
    assert rig.launched() == []
    _, g = jax.jit(jax.value_and_grad(lambda w: fp8_loss(w, stop=True)))(w)
    assert g.shape == (N, K) and rig.launched() == ["layout", "notify", "send", "recv"]
    lb, _ = rig.ll_buffer()
    x, t, w = _inputs()

    def ll_loss(x, w):
        _, _, h = ej.low_latency_dispatch(lb, x, t, num_max_dispatch_tokens_per_rank=N, num_experts=E,
                                          use_fp8=False)
        y = ej.low_latency_combine(lb, jnp.zeros((E // 2, 2 * N, H), jnp.bfloat16), t, w, h)
        return jnp.sum(y.astype(jnp.float32))

    with pytest.raises(TypeError, match="epcomm.jax.low_latency_dispatch is not differentiable"):
        jax.grad(ll_loss)(x, w)
    with pytest.raises(TypeError, match="epcomm.jax.low_latency_combine is not differentiable"):
        jax.grad(ll_loss, argnums=1)(x, w)


def test_a_buffer_of_another_gpu_is_refused():
    """A program run on several local GPUs hands each run its own GPU's buffers; the Buffer
    serves one GPU, so a buffer of another is refused before any launch."""
    import numpy as np

    class OnGpu1:
        shape, dtype = (4,), np.dtype("int32")
        __cuda_array_interface__ = {"data": (4096, False)}

        def __dlpack_device__(self):
            return (xla_buffers.kDLCUDA, 1)

    assert xla_buffers.xla_arg(OnGpu1(), (4,), "int32", 1).ref.ptr == 4096
    with pytest.raises(EpcommError, match="on cuda:1 but the Buffer uses cuda:0"):
        xla_buffers.xla_arg(OnGpu1(), (4,), "int32", 0)


def test_a_destroyed_buffers_run_functions_are_dropped_at_the_next_new_one(rig):
    """The memoised run functions and wrapped callbacks hold their Buffer: those of a destroyed
    Buffer go when a run function is next made, so a rebuilt Buffer does not leave the old one
    alive through epcomm's caches."""
    x, t, w = _inputs()

    def dispatch(b):
        return ej.low_latency_dispatch(b, x, t, num_max_dispatch_tokens_per_rank=N, num_experts=E, use_fp8=False)

    old, _ = rig.ll_buffer()
    dispatch(old)
    assert any(k[1] is old for k in ej._RUNNERS) and jx._OPS
    old.destroy()
    new, _ = rig.ll_buffer()
    dispatch(new)
    assert all(k[1] is new for k in ej._RUNNERS)
    runs = set(map(id, ej._RUNNERS.values()))
    assert jx._OPS and all(id(k[0]) in runs for k in jx._OPS)
