"""epcomm.jax traced on the CPU: every operation's output shapes and dtypes (jax.eval_shape,
jax.make_jaxpr), argument errors at trace time, the handles as pytrees, the custom VJP's
cotangents, and the one error of a JAX without buffer_callback.  Nothing runs on a GPU."""
from __future__ import annotations

import pytest

jax = pytest.importorskip("jax")
jnp = pytest.importorskip("jax.numpy")

from fake_runtime import FakeNvlinkState, fake_context  # noqa: E402

from epcomm.buffer import Buffer  # noqa: E402
from epcomm.context import CallerOutputs  # noqa: E402
from epcomm.errors import EpcommError  # noqa: E402
from epcomm.interop import jax_callback  # noqa: E402
from epcomm.interop.refs import TensorRef  # noqa: E402

ej = pytest.importorskip("epcomm.jax")

R, N, H, K, E, M = 2, 16, 256, 4, 8, 40
S = jax.ShapeDtypeStruct


class _LL:
    serial = 7


def _buffer(R=R):
    return Buffer._assemble(fake_context(R), nvlink=FakeNvlinkState(R), low_latency=_LL())


@pytest.fixture(scope="module")
def buf():
    return _buffer()


def _sd(a):
    return (tuple(a.shape), jnp.dtype(a.dtype).name)


@pytest.mark.parametrize("idx_dtype", [jnp.int32, jnp.int64])
def test_dispatch_shapes_bf16(buf, idx_dtype):
    out = jax.eval_shape(lambda x, t, w: ej.dispatch(buf, x, t, w, num_experts=E, num_worst_tokens=M),
                         S((N, H), jnp.bfloat16), S((N, K), idx_dtype), S((N, K), jnp.float32))
    rx, ri, rw, h = out
    assert [_sd(a) for a in (rx, ri, rw)] == [((M, H), "bfloat16"), ((M, K), "int32"), ((M, K), "float32")]
    assert [_sd(getattr(h, k)) for k in ej.handles.HANDLE_ARRAYS] == [
        ((R + 1,), "int32"), ((R, N), "int32"), ((N, R), "int32"), ((R,), "int32"), ((N, R), "bool"),
        ((M,), "int32")]
    assert (h.num_tokens, h.hidden, h.num_experts, h.num_topk, h.num_worst_tokens) == (N, H, E, K, M)


def test_dispatch_shapes_fp8_and_without_weights(buf):
    rx, ri, rw, h = jax.eval_shape(
        lambda d, s, t: ej.dispatch(buf, (d, s), t, num_experts=E, num_worst_tokens=M),
        S((N, H), jnp.float8_e4m3fn), S((N, H // 128), jnp.float32), S((N, K), jnp.int32))
    assert [_sd(a) for a in rx] == [((M, H), "float8_e4m3fn"), ((M, H // 128), "float32")]
    assert rw is None and _sd(ri) == ((M, K), "int32")


def test_combine_layout_and_jaxpr(buf):
    def f(x, t):
        rx, _, _, h = ej.dispatch(buf, x, t, num_experts=E, num_worst_tokens=M)
        return ej.combine(buf, rx, h), ej.get_dispatch_layout(buf, t, E)

    y, lay = jax.eval_shape(f, S((N, H), jnp.bfloat16), S((N, K), jnp.int32))
    assert _sd(y) == ((N, H), "bfloat16")
    assert [_sd(a) for a in lay] == [((R,), "int32"), ((E,), "int32"), ((N, R), "bool")]
    text = str(jax.make_jaxpr(f)(jnp.zeros((N, H), jnp.bfloat16), jnp.zeros((N, K), jnp.int32)))
    assert text.count("buffer_callback") == 3 and "command_buffer_compatible=True" in text
    off = jax.make_jaxpr(lambda t: ej.get_dispatch_layout(buf, t, E, command_buffer=False))(jnp.zeros((N, K), int))
    assert "command_buffer_compatible=False" in str(off)


@pytest.mark.parametrize("fp8,ue8m0", [(False, False), (True, False), (True, True)])
def test_low_latency_pair_shapes(buf, fp8, ue8m0):
    T, L = 32, E // R

    def f(x, t, w):
        rx, cnt, h = ej.low_latency_dispatch(buf, x, t, num_max_dispatch_tokens_per_rank=T, num_experts=E,
                                             use_fp8=fp8, round_scale=ue8m0, use_ue8m0=ue8m0, slot=1)
        y = ej.low_latency_combine(buf, jnp.zeros((L, R * T, H), jnp.bfloat16), t, w, h)
        return rx, cnt, h, y

    rx, cnt, h, y = jax.eval_shape(f, S((N, H), jnp.bfloat16), S((N, K), jnp.int32), S((N, K), jnp.float32))
    if fp8:
        G = (H // 128 + 3) // 4 if ue8m0 else H // 128
        assert [_sd(a) for a in rx] == [((L, R * T, H), "float8_e4m3fn"),
                                        ((L, R * T, G), "int32" if ue8m0 else "float32")]
    else:
        assert _sd(rx) == ((L, R * T, H), "bfloat16")
    assert _sd(cnt) == ((L,), "int32") and _sd(y) == ((N, H), "bfloat16")
    assert _sd(h.tok_meta) == ((R * T, 2), "int32") and _sd(h.layout_range) == ((L, R, 2), "int32")
    assert (h.slot, h.num_max_tokens, h.num_tokens, h.num_topk) == (1, T, N, K)


def test_handles_round_trip_as_pytrees(buf):
    _, _, _, h = jax.eval_shape(lambda x, t: ej.dispatch(buf, x, t, num_experts=E, num_worst_tokens=M),
                                S((N, H), jnp.bfloat16), S((N, K), jnp.int32))
    leaves, tree = jax.tree_util.tree_flatten(h)
    assert len(leaves) == 6
    back = jax.tree_util.tree_unflatten(tree, leaves)
    assert back == h and isinstance(back, ej.Handle)
    # Through jit and lax.scan as a carried value.
    def body(c, _):
        return c, None
    carried = jax.eval_shape(lambda hh: jax.lax.scan(body, hh, None, length=3)[0], h)
    assert carried.num_worst_tokens == M and _sd(carried.recv_src_idx) == ((M,), "int32")


def test_gradients_have_the_primal_shapes(buf):
    def loss(x, w, t):
        rx, _, rw, h = ej.dispatch(buf, x, t, w, num_experts=E, num_worst_tokens=M)
        y = ej.combine(buf, rx * 2, h)
        return jnp.sum(y.astype(jnp.float32)) + jnp.sum(rw)

    gx, gw = jax.eval_shape(jax.grad(loss, argnums=(0, 1)), S((N, H), jnp.bfloat16), S((N, K), jnp.float32),
                            S((N, K), jnp.int32))
    assert _sd(gx) == ((N, H), "bfloat16") and _sd(gw) == ((N, K), "float32")
    # The backward is a combine (dispatch's) and a cached dispatch (combine's): 2 more operations.
    jaxpr = jax.make_jaxpr(jax.grad(loss, argnums=(0, 1)))(
        jnp.zeros((N, H), jnp.bfloat16), jnp.zeros((N, K)), jnp.zeros((N, K), jnp.int32))
    assert str(jaxpr).count("buffer_callback") == 4


def test_scan_of_layers_traces(buf):
    def layer(x, t):
        rx, _, _, h = ej.dispatch(buf, x, t, num_experts=E, num_worst_tokens=M)
        return ej.combine(buf, rx, h), None

    out = jax.eval_shape(lambda x, ts: jax.lax.scan(layer, x, ts)[0], S((N, H), jnp.bfloat16),
                         S((8, N, K), jnp.int32))
    assert _sd(out) == ((N, H), "bfloat16")
    pred = jax.eval_shape(lambda p, x, t: jax.lax.cond(p, lambda a: layer(a, t)[0], lambda a: a, x),
                          S((), bool), S((N, H), jnp.bfloat16), S((N, K), jnp.int32))
    assert _sd(pred) == ((N, H), "bfloat16")


def _raises(exc, match, f, *shapes):
    with pytest.raises(exc, match=match):
        jax.eval_shape(f, *shapes)


def test_bad_arguments_name_the_argument_at_trace_time(buf):
    x, t = S((N, H), jnp.bfloat16), S((N, K), jnp.int32)
    d = lambda **kw: (lambda x, t: ej.dispatch(buf, x, t, **kw))  # noqa: E731
    _raises(TypeError, "x: expected dtype bfloat16, got float32", d(num_experts=E, num_worst_tokens=M),
            S((N, H), jnp.float32), t)
    _raises(ValueError, "topk_idx: expected shape \\(16, N\\)", d(num_experts=E, num_worst_tokens=M), x,
            S((N + 1, K), jnp.int32))
    _raises(TypeError, "topk_idx: expected dtype int32 or int64, got float32", d(num_experts=E, num_worst_tokens=M),
            x, S((N, K), jnp.float32))
    _raises(ValueError, "num_worst_tokens", d(num_experts=E, num_worst_tokens=0), x, t)
    _raises(TypeError, "num_experts", d(num_experts=8.0, num_worst_tokens=M), x, t)
    _raises(ValueError, "num_experts", d(num_experts=7, num_worst_tokens=M), x, t)
    _raises(ValueError, "x: hidden size 100", d(num_experts=E, num_worst_tokens=M), S((N, 100), jnp.bfloat16), t)
    _raises(ValueError, "x\\[1\\]: expected shape", lambda a, s, t: ej.dispatch(buf, (a, s), t, num_experts=E,
                                                                              num_worst_tokens=M),
            S((N, H), jnp.float8_e4m3fn), S((N, 3), jnp.float32), t)
    _raises(ValueError, "topk_weights: expected shape", lambda x, t, w: ej.dispatch(buf, x, t, w, num_experts=E,
                                                                                   num_worst_tokens=M),
            x, t, S((N, K + 1), jnp.float32))
    with pytest.raises(TypeError, match="buffer: expected an epcomm.Buffer"):
        ej.dispatch(object(), jnp.zeros((N, H), jnp.bfloat16), jnp.zeros((N, K), int), num_experts=E,
                    num_worst_tokens=M)
    with pytest.raises(TypeError, match="handle: expected an epcomm.jax.Handle"):
        ej.combine(buf, jnp.zeros((M, H), jnp.bfloat16), object())


def test_low_latency_bad_arguments(buf):
    x, t = S((N, H), jnp.bfloat16), S((N, K), jnp.int32)
    ll = lambda **kw: (lambda x, t: ej.low_latency_dispatch(buf, x, t, num_experts=E, **kw))  # noqa: E731
    _raises(ValueError, "x: 16 tokens exceed num_max_dispatch_tokens_per_rank=8",
            ll(num_max_dispatch_tokens_per_rank=8), x, t)
    _raises(ValueError, "slot", ll(num_max_dispatch_tokens_per_rank=32, slot=2), x, t)
    _raises(ValueError, "use_ue8m0=True needs round_scale=True", ll(num_max_dispatch_tokens_per_rank=32,
                                                                    use_ue8m0=True), x, t)
    _raises(ValueError, "top-k 33", ll(num_max_dispatch_tokens_per_rank=32), x, S((N, 33), jnp.int32))
    _raises(ValueError, "hidden size 200", ll(num_max_dispatch_tokens_per_rank=32), S((N, 200), jnp.bfloat16), t)
    no_ll = Buffer._assemble(fake_context(R), nvlink=FakeNvlinkState(R))
    with pytest.raises(ValueError, match="buffer: has no low-latency state"):
        ej.low_latency_dispatch(no_ll, jnp.zeros((N, H), jnp.bfloat16), jnp.zeros((N, K), int),
                                num_max_dispatch_tokens_per_rank=32, num_experts=E)
    other = _buffer()
    _, _, h = jax.eval_shape(ll(num_max_dispatch_tokens_per_rank=32), x, t)
    with pytest.raises(ValueError, match="handle: was made by another Buffer"):
        jax.eval_shape(lambda y, t, w: ej.low_latency_combine(other, y, t, w, h),
                       S((E // R, R * 32, H), jnp.bfloat16), t, S((N, K), jnp.float32))


def test_a_jax_without_buffer_callback_names_the_version(monkeypatch):
    import jax.experimental.buffer_callback as bcm

    def old(callback, result_shape_dtypes, *, has_side_effect=False, vmap_method=None):
        raise AssertionError("not reached")

    monkeypatch.setattr(jax_callback, "_CALLBACK", [])
    monkeypatch.setattr(bcm, "buffer_callback", old)
    with pytest.raises(EpcommError, match=f"JAX {jax_callback.NEEDED_JAX} or newer"):
        jax_callback.buffer_callback()


def test_caller_outputs_check_name_shape_and_dtype():
    ref = TensorRef(64, (4, 8), (8, 1), "bfloat16", "cuda", 0, "xla")
    sink = CallerOutputs(5, {"recv_x": ("obj", ref)}, slot=1)
    assert sink.take("recv_x", (4, 8), "bfloat16") == ("obj", ref)
    with pytest.raises(EpcommError, match="no output 'recv_src_idx'"):
        sink.take("recv_src_idx", (4,), "int32")
    with pytest.raises(EpcommError, match="supplied bfloat16 \\(4, 8\\), the call writes float32"):
        sink.take("recv_x", (4, 8), "float32")
    ctx = fake_context(2)
    with ctx.supplying(sink):
        assert ctx.empty("xla", (4, 8), "bfloat16", name="recv_x")[1] is ref
        assert ctx.sink is sink
    assert ctx.sink is None


def test_a_callers_outputs_are_its_threads_only():
    """XLA may run a program's callback on a thread of its own: while it supplies its outputs,
    an eager call of another thread allocates its own (and runs on its own stream)."""
    import threading

    from epcomm import interop
    ref = TensorRef(64, (4, 8), (8, 1), "bfloat16", "cuda", 0, "xla")
    ctx = fake_context(2)
    inside, done = threading.Event(), threading.Event()
    seen = {}

    def program():
        with ctx.supplying(CallerOutputs(5, {"recv_x": ("obj", ref)})):
            seen["program"] = ctx.empty("xla", (4, 8), "bfloat16", name="recv_x")[1]
            inside.set()
            done.wait(10)

    t = threading.Thread(target=program)
    t.start()
    assert inside.wait(10)
    try:
        assert ctx.sink is None
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(interop, "empty", lambda *a: ("own", None))
            assert ctx.empty("jax", (4, 8), "bfloat16", name="recv_x") == ("own", None)
    finally:
        done.set()
        t.join()
    assert seen["program"] is ref and ctx.sink is None


def test_xla_drops_a_call_whose_results_a_rank_constant_discards(buf):
    """The operations are not side-effecting to XLA (a side effect would bar jax.checkpoint):
    XLA removes one whose results are unused, and folds a select on a Python constant first.
    A rank-dependent Python value that discards results thus removes the collective on some
    ranks only (the others then wait for them), which epcomm.jax's docstring warns of."""
    x, t = jnp.zeros((N, H), jnp.bfloat16), jnp.zeros((N, K), jnp.int32)

    def program(rank):
        def f(x, t):
            rx, _, _, h = ej.dispatch(buf, x, t, num_experts=E, num_worst_tokens=M)
            y = ej.combine(buf, rx, h)
            return jnp.where(rank == 0, y, jnp.zeros_like(y))
        return jax.jit(f).lower(x, t)

    kept, dropped = program(0), program(1)
    assert kept.as_text().count("custom_call") == dropped.as_text().count("custom_call") == 2
    assert kept.compile().as_text().count("custom-call") == 2
    assert dropped.compile().as_text().count("custom-call") == 0
    assert "has_side_effect" not in kept.as_text()
