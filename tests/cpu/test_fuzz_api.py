"""Fuzz of the public API (hypothesis) on the fake runtime of tests/helpers/fake_rig.py.

Every example is one call through a real entry point (``Buffer.get_dispatch_layout``,
``dispatch``, ``combine``, ``low_latency_dispatch``, ``low_latency_combine``,
``epcomm.api.get_dispatch_layout``), built from valid arguments with at most one argument
spoiled.  The property: the call raises TypeError/ValueError whose message names the spoiled
argument, before any kernel launch (the fake runtime records none), or it is accepted, and then
its outputs have the shapes, dtypes and framework of ``epcomm.reference``'s results for this rank
(the fake notify kernel publishes the reference's counts), and the kernels got the call's sizes.
A call on a destroyed Buffer raises BufferStateError.  Any other exception fails the test.

Profiles (tests/conftest.py): the default keeps the whole file well under a minute on 2 cores;
``--hypothesis-profile=epcomm-long`` runs 20 times more examples.
"""
from __future__ import annotations

import re

import numpy as np
import pytest

hypothesis = pytest.importorskip("hypothesis")
torch = pytest.importorskip("torch")

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from epcomm import api, reference  # noqa: E402
from epcomm.errors import BufferStateError  # noqa: E402
from epcomm.reference import BF16, FP8  # noqa: E402
from fake_rig import FakeRuntime  # noqa: E402

FUZZ = settings()  # the profile loaded (tests/conftest.py: epcomm-default, or the command line's)

try:
    import jax.numpy as jnp
    from jax import config as jax_config
    FRAMEWORKS = ("torch", "numpy", "jax")
except ImportError:  # pragma: no cover - jax is optional
    jnp = jax_config = None
    FRAMEWORKS = ("torch", "numpy")


# --------------------------------------------------------------------------- arrays


def to_fw(a: np.ndarray, fw: str):
    """``a`` (NumPy, ml_dtypes for bf16/FP8) in framework ``fw``."""
    if fw == "numpy":
        return a
    if fw == "jax":
        return jnp.asarray(a)
    if a.dtype == BF16:
        return torch.from_numpy(a.view(np.uint16).copy()).view(torch.bfloat16)
    if a.dtype == FP8:
        return torch.from_numpy(a.view(np.uint8).copy()).view(torch.float8_e4m3fn)
    return torch.from_numpy(a.copy())


def strided(a, fw: str):
    """A non-contiguous view holding ``a``'s values (every other column of a wider array)."""
    wide = np.zeros(a.shape[:-1] + (2 * a.shape[-1],), a.dtype)
    wide[..., ::2] = a
    return to_fw(wide, fw)[..., ::2]


def as_numpy(obj) -> np.ndarray:
    if isinstance(obj, torch.Tensor):
        if obj.dtype == torch.bfloat16:
            return obj.view(torch.int16).numpy().view(BF16)
        if obj.dtype == torch.float8_e4m3fn:
            return obj.view(torch.uint8).numpy().view(FP8)
        return obj.numpy()
    return np.asarray(obj)


def fw_of(obj) -> str:
    if isinstance(obj, torch.Tensor):
        return "torch"
    if isinstance(obj, np.ndarray):
        return "numpy"
    return "jax"


def routing(draw, N: int, K: int, E: int, unique: bool) -> np.ndarray:
    """int64 [N, K] of experts in [0, E) or -1 (a row lists an expert once when ``unique``)."""
    rows = []
    for _ in range(N):
        if unique:
            picks = draw(st.lists(st.integers(0, E - 1), min_size=0, max_size=min(K, E), unique=True))
            row = picks + [-1] * (K - len(picks))
            row = draw(st.permutations(row))
        else:
            row = draw(st.lists(st.integers(-1, E - 1), min_size=K, max_size=K))
        rows.append(row)
    return np.array(rows, np.int64).reshape(N, K)


# --------------------------------------------------------------------------- the property


def _names(msg: str, blame) -> bool:
    return any(re.search(rf"(?<![\w.]){re.escape(n)}(?![\w])", msg) for n in blame)


def expect(rig, call, blame=(), *, may_accept=False, check=None, destroyed=False):
    """Run ``call`` under the property of the module docstring.  ``blame``: the spoiled
    argument's possible names (empty: a valid call, which must be accepted); ``may_accept``: a
    spoiling the API may legitimately take; ``check(result)``: the checks of an accepted call."""
    rig.clear()
    try:
        result = call()
    except BufferStateError as e:
        assert destroyed and "destroyed" in str(e), f"unexpected BufferStateError: {e}"
        assert rig.kernels == [], f"launched {rig.launched()} before raising {e}"
        return None
    except (TypeError, ValueError) as e:
        assert blame and not destroyed, f"a valid call raised {type(e).__name__}: {e}"
        assert _names(str(e), blame), f"{type(e).__name__} does not name {blame}: {e}"
        assert rig.kernels == [], f"launched {rig.launched()} before raising {e}"
        return None
    assert not destroyed, "a call on a destroyed Buffer was accepted"
    assert not blame or may_accept, f"accepted a call with {blame} spoiled"
    if check is not None:
        check(result)
    return result


def sent_sizes(rig, **want) -> None:
    """Every launch record that carries one of ``want``'s fields carries its value."""
    for fn, _, fields in rig.kernels:
        for k, v in want.items():
            if fields.get(k) is not None and fn not in ("layout", "compact_scales"):
                assert fields[k] == v, (fn, k, fields[k], v)


def same_form(got, want: np.ndarray, fw: str, what: str) -> None:
    """``got`` is a ``fw`` array of ``want``'s shape and dtype (JAX without 64-bit types gives
    int32 for int64: epcomm.interop.finish)."""
    assert got is not None, what
    assert fw_of(got) == fw, (what, type(got))
    assert tuple(got.shape) == want.shape, (what, tuple(got.shape), want.shape)
    dt = want.dtype
    if fw == "jax" and dt == np.int64 and not jax_config.jax_enable_x64:
        dt = np.dtype(np.int32)
    assert as_numpy(got).dtype == dt, (what, as_numpy(got).dtype, dt)


# --------------------------------------------------------------------------- layout


def _layout_case(draw, R: int):
    fw = draw(st.sampled_from(FRAMEWORKS))
    E = R * draw(st.integers(1, 4))
    N, K = draw(st.integers(0, 12)), draw(st.integers(1, 4))
    idx = routing(draw, N, K, E, unique=False)
    spoil = draw(st.sampled_from([None, None, "range", "dtype", "ndim", "noncontig", "experts", "experts_type",
                                  "int32", "meta"]))
    args, blame, may = dict(topk_idx=to_fw(idx, fw), num_experts=E), (), False
    if spoil == "range" and N:
        bad = idx.copy()
        bad[draw(st.integers(0, N - 1)), draw(st.integers(0, K - 1))] = draw(st.sampled_from([E, E + 7, -2, -9]))
        args["topk_idx"], blame = to_fw(bad, fw), ("topk_idx",)
    elif spoil == "dtype":
        args["topk_idx"], blame = to_fw(idx.astype(draw(st.sampled_from([np.float32, np.int16, np.bool_]))), fw), \
            ("topk_idx",)
    elif spoil == "ndim":
        args["topk_idx"], blame = to_fw(idx.reshape(-1), fw), ("topk_idx",)
    elif spoil == "noncontig" and fw != "jax" and N and K > 1:
        args["topk_idx"], blame = strided(idx, fw), ("topk_idx",)
    elif spoil == "experts":
        args["num_experts"], blame = draw(st.sampled_from([0, -R, E + 1 if R > 1 else 0])), ("num_experts",)
    elif spoil == "experts_type":
        args["num_experts"], blame = draw(st.sampled_from([float(E), str(E), True, None])), ("num_experts",)
    elif spoil == "int32":
        args["topk_idx"], blame, may = to_fw(idx.astype(np.int32), fw), ("topk_idx",), True
    elif spoil == "meta" and fw == "torch":
        args["topk_idx"], blame = torch.from_numpy(idx).to("meta"), ("topk_idx",)
    return fw, idx, E, args, blame, may


@given(data=st.data())
@FUZZ
def test_fuzz_get_dispatch_layout(rig, data):
    draw = data.draw
    R = draw(st.sampled_from([2, 4, 8]))
    fw, idx, E, args, blame, may = _layout_case(draw, R)
    ref = reference.get_dispatch_layout(idx, E, R, R) if not blame or may else None

    def check(res):
        ntr, nrdma, nte, itr = res[:4]
        for got, want, what in ((ntr, ref.num_tokens_per_rank, "num_tokens_per_rank"),
                                (nte, ref.num_tokens_per_expert, "num_tokens_per_expert"),
                                (itr, ref.is_token_in_rank, "is_token_in_rank")):
            same_form(got, want, fw, what)
        assert nrdma is None
        assert rig.launched() == (["layout"] if idx.shape[0] else [])  # no tokens: only the counters zeroed

    use_api = draw(st.booleans())
    if not blame and draw(st.booleans()):  # a call option spoiled instead
        if use_api:
            args["stream"], blame = draw(st.sampled_from(["s", -1, 1.5])), ("stream",)
        else:
            name = draw(st.sampled_from(["async_finish", "allocate_on_comm_stream", "previous_event"]))
            args[name], blame = "no", (name,)
    if use_api:
        opts = {k: v for k, v in args.items() if k == "stream"}
        expect(rig, lambda: api.get_dispatch_layout(args["topk_idx"], args["num_experts"], R,
                                                    num_ranks_per_node=R, **opts), blame, may_accept=may, check=check)
    else:
        b = rig.normal_buffer(R)
        expect(rig, lambda: b.get_dispatch_layout(**args), blame, may_accept=may, check=check)


# --------------------------------------------------------------------------- normal mode


def _dispatch_inputs(draw, R: int, fw: str):
    """(per-rank NumPy inputs, the Buffer call's kwargs, E, K): rank 0's x, top-k and weights
    in ``fw`` with the other ranks' routing for the reference."""
    L, K = draw(st.integers(1, 3)), draw(st.integers(1, 4))
    E = R * L
    fp8 = draw(st.booleans())
    H = draw(st.sampled_from([128, 256])) if fp8 else draw(st.sampled_from([8, 64, 128, 2880]))
    Ns = [draw(st.integers(0, 10)) for _ in range(R)]
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    xs = [rng.standard_normal((n, H)).astype(np.float32) for n in Ns]
    xs = [x.astype(FP8) if fp8 else x.astype(BF16) for x in xs]
    scales = [rng.random((n, H // 128)).astype(np.float32) for n in Ns] if fp8 else None
    idx = [routing(draw, n, K, E, unique=False) for n in Ns]
    w = [rng.random((n, K)).astype(np.float32) for n in Ns] if draw(st.booleans()) else None
    inp = dict(xs=xs, scales=scales, idx=idx, w=w, E=E, K=K, H=H, fp8=fp8, Ns=Ns)
    if fp8:
        col = draw(st.booleans())
        s0 = to_fw(np.ascontiguousarray(scales[0].T), fw).T if col and fw != "jax" else to_fw(scales[0], fw)
        x = (to_fw(xs[0], fw), s0)
    else:
        x = to_fw(xs[0], fw)
    kw = dict(x=x, topk_idx=to_fw(idx[0], fw), num_experts=E)
    if w is not None:
        kw["topk_weights"] = to_fw(w[0], fw)
    return inp, kw


def _dispatch_spoil(draw, inp: dict, kw: dict, fw: str, R: int):
    """One spoiled argument (or none, or an accepted variation): (kwargs, blame, may_accept)."""
    N, K, E, H = inp["Ns"][0], inp["K"], inp["E"], inp["H"]
    idx = inp["idx"][0]
    spoil = draw(st.sampled_from([None, None, None, "range", "x_dtype", "x_noncontig", "x_ndim", "hidden",
                                  "idx_rows", "w_shape", "w_dtype", "other_fw", "experts", "worst", "worst_big",
                                  "align", "flag", "repeat", "layout", "event", "config"]))
    kw = dict(kw)
    if spoil == "range" and N:
        bad = idx.copy()
        bad[draw(st.integers(0, N - 1)), draw(st.integers(0, K - 1))] = draw(st.sampled_from([E, E + 3, -2]))
        kw["topk_idx"] = to_fw(bad, fw)
        return kw, ("topk_idx",), False
    if spoil == "x_dtype" and not inp["fp8"]:
        kw["x"] = to_fw(inp["xs"][0].astype(draw(st.sampled_from([np.float32, np.float16, np.int32]))), fw)
        return kw, ("x",), False
    if spoil == "x_noncontig" and fw != "jax" and N and not inp["fp8"]:
        kw["x"] = strided(inp["xs"][0], fw)
        return kw, ("x",), False
    if spoil == "x_ndim":
        kw["x"] = to_fw(inp["xs"][0].reshape(-1), fw) if not inp["fp8"] else (to_fw(inp["xs"][0], fw),)
        return kw, ("x",), False
    if spoil == "hidden" and not inp["fp8"]:
        kw["x"] = to_fw(np.zeros((N, H + draw(st.integers(1, 7))), BF16), fw)
        return kw, ("x",), False
    if spoil == "idx_rows":
        kw["topk_idx"] = to_fw(np.zeros((N + 1, K), np.int64), fw)
        return kw, ("topk_idx",), False
    if spoil == "w_shape":
        kw["topk_weights"] = to_fw(np.ones((N, K + 1), np.float32), fw)
        return kw, ("topk_weights",), False
    if spoil == "w_dtype":
        kw["topk_weights"] = to_fw(np.ones((N, K), np.float16), fw)
        return kw, ("topk_weights",), False
    if spoil == "other_fw":
        other = draw(st.sampled_from([f for f in FRAMEWORKS if f != fw]))
        name = draw(st.sampled_from(["topk_idx", "topk_weights"]))
        kw[name] = to_fw(idx if name == "topk_idx" else np.ones((N, K), np.float32), other)
        return kw, (name,), False
    if spoil == "experts":
        kw["num_experts"] = draw(st.sampled_from([0, E + 1, float(E), "8", 1024 * R * 1024]))
        return kw, ("num_experts", "experts per rank"), False
    if spoil == "worst":
        kw["num_worst_tokens"] = draw(st.sampled_from([-1, 2.0, "4"]))
        return kw, ("num_worst_tokens",), False
    if spoil == "worst_big":
        kw["num_worst_tokens"] = draw(st.sampled_from([2**31, 2**40]))
        return kw, ("num_worst_tokens",), False
    if spoil == "align":
        kw["expert_alignment"] = draw(st.sampled_from([0, -4, 2**31, 3.0]))
        return kw, ("expert_alignment",), False
    if spoil == "flag":
        name = draw(st.sampled_from(["async_finish", "allocate_on_comm_stream"]))
        kw[name] = draw(st.sampled_from(["no", 2, None]))
        return kw, (name,), False
    if spoil == "event":
        kw["previous_event"] = draw(st.sampled_from([object(), "ev", 1]))
        return kw, ("previous_event",), False
    if spoil == "config":
        kw["config"] = draw(st.sampled_from([24, {"num_sms": 24}]))
        return kw, ("config",), False
    if spoil == "layout":
        # The layout's outputs, right (accepted) or of the wrong shape.
        lay = reference.get_dispatch_layout(idx, E, R, R)
        kw["is_token_in_rank"] = to_fw(lay.is_token_in_rank, fw)
        kw["num_tokens_per_expert"] = to_fw(lay.num_tokens_per_expert, fw)
        kw["num_tokens_per_rank"] = to_fw(lay.num_tokens_per_rank, fw)
        if draw(st.booleans()):
            return kw, (), False
        kw["num_tokens_per_rank"] = to_fw(np.zeros(R + 1, np.int32), fw)
        return kw, ("num_tokens_per_rank",), False
    return kw, (), False  # "repeat" and None: repeated experts are fine in the normal mode


def _check_dispatch(rig, inp, ref, fw: str, worst: int):
    K, H = inp["K"], inp["H"]

    def check(res):
        recv_x, rti, rtw, experts, handle, _ = res
        rows = worst or ref.recv_x.shape[0]
        if inp["fp8"]:
            same_form(recv_x[0], np.zeros((rows, H), FP8), fw, "recv_x[0]")
            same_form(recv_x[1], np.zeros((rows, H // 128), np.float32), fw, "recv_x[1]")
        else:
            same_form(recv_x, np.zeros((rows, H), BF16), fw, "recv_x")
        same_form(rti, np.zeros((rows, K), np.int64), fw, "recv_topk_idx")
        if inp["w"] is None:
            assert rtw is None
        else:
            same_form(rtw, np.zeros((rows, K), np.float32), fw, "recv_topk_weights")
        assert list(experts) == ([] if worst else ref.num_recv_tokens_per_expert_list)
        assert handle.num_tokens == inp["Ns"][0] and handle.out_rows == rows
        assert [k for k in rig.launched() if k != "layout"][:2] == ["notify", "send"] and "recv" in rig.launched()
        sent_sizes(rig, num_tokens=inp["Ns"][0], hidden=H, num_topk=K, num_experts=inp["E"])
    return check


def _normal_setup(rig, data, options: bool):
    """(draw, R, framework, inputs, the dispatch's kwargs, a Buffer of R ranks, the reference's
    result for rank 0) of one example; with ``options`` a random expert_alignment and
    num_worst_tokens.  The fake notify kernel publishes the reference's counts."""
    draw = data.draw
    R = draw(st.sampled_from([2, 4]))
    fw = draw(st.sampled_from(FRAMEWORKS))
    inp, kw = _dispatch_inputs(draw, R, fw)
    align = draw(st.sampled_from([1, 1, 4])) if options else 1
    worst = draw(st.sampled_from([0, 0, 64])) if options else 0
    kw.update(expert_alignment=align, num_worst_tokens=worst)
    ref = reference.dispatch(inp["xs"], inp["E"], topk_idx=inp["idx"], topk_weights=inp["w"],
                             x_scales=inp["scales"], expert_alignment=align, num_worst_tokens=worst)[0]
    b = rig.normal_buffer(R)
    if not worst:
        b._intra.publish(np.diff(ref.handle.rank_prefix).tolist(), ref.num_recv_tokens_per_expert_list)
    return draw, R, fw, inp, kw, b, ref


@given(data=st.data())
@FUZZ
def test_fuzz_dispatch(rig, data):
    draw, R, fw, inp, kw, b, ref = _normal_setup(rig, data, options=True)
    worst = kw["num_worst_tokens"]
    kw, blame, may = _dispatch_spoil(draw, inp, kw, fw, R)
    destroyed = draw(st.integers(0, 9)) == 0
    if destroyed:
        b.destroy()
    expect(rig, lambda: b.dispatch(**kw), blame, may_accept=may, check=_check_dispatch(rig, inp, ref, fw, worst),
           destroyed=destroyed)


def _handle_spoil(draw, rig, b, h, R: int, fw: str):
    """A wrong handle for a call of ``b`` (or None): (handle, blame)."""
    kind = draw(st.sampled_from(["other_buffer", "object", "none", "ll_handle"]))
    if kind == "other_buffer":
        return _handle_spoil_normal(rig, R, fw, h.num_tokens, h.hidden)
    if kind == "object":
        return object()
    if kind == "none":
        return None
    bl, _ = rig.ll_buffer(R)
    return bl.low_latency_dispatch(torch.zeros(1, 128, dtype=torch.bfloat16), torch.zeros(1, 1, dtype=torch.long),
                                   4, R, use_fp8=False)[2]


@given(data=st.data())
@FUZZ
def test_fuzz_combine_and_cached_dispatch(rig, data):
    draw, R, fw, inp, kw, b, ref = _normal_setup(rig, data, options=False)
    h = b.dispatch(**kw)[4]
    rows, N, H, K = h.out_rows, inp["Ns"][0], inp["H"], inp["K"]
    cached = draw(st.booleans())
    spoil = draw(st.sampled_from([None, None, "handle", "x_rows", "x_dtype", "w_cols", "bias", "route", "destroy",
                                  "flag"]))
    blame, args = (), {}
    if cached:
        args = dict(x=kw["x"])
        if spoil == "x_rows" and not inp["fp8"]:
            args["x"], blame = to_fw(np.zeros((N + 1, H), BF16), fw), ("x",)
        elif spoil == "route":
            name = draw(st.sampled_from(["topk_idx", "num_experts", "expert_alignment"]))
            args[name] = kw.get(name, 4) if name != "expert_alignment" else 2
            if name == "topk_idx":
                args[name] = kw["topk_idx"]
            blame = (name,)
    else:
        args = dict(x=to_fw(np.zeros((rows, H), BF16), fw))
        if "topk_weights" in kw and draw(st.booleans()):
            args["topk_weights"] = to_fw(np.ones((rows, K), np.float32), fw)
        if spoil == "x_rows":
            args["x"], blame = to_fw(np.zeros((rows + 1, H), BF16), fw), ("x",)
        elif spoil == "x_dtype":
            args["x"], blame = to_fw(np.zeros((rows, H), np.float32), fw), ("x",)
        elif spoil == "w_cols":
            args["topk_weights"], blame = to_fw(np.ones((rows, K + 1), np.float32), fw), ("topk_weights",)
        elif spoil == "bias":
            args["bias"] = draw(st.sampled_from([to_fw(np.zeros((N, H), np.float32), fw),
                                                 to_fw(np.zeros((N + 1, H), BF16), fw), "bias"]))
            blame = ("bias", "bias[0]")
    if spoil == "flag":
        name = draw(st.sampled_from(["async_finish", "allocate_on_comm_stream"]))
        args[name], blame = draw(st.sampled_from(["no", 2, None])), (name,)
    if spoil == "handle":
        h = _handle_spoil(draw, rig, b, h, R, fw)
        # handle=None makes a dispatch without routing: its error names what is missing.
        blame = ("handle", "is_token_in_rank") if cached and h is None else ("handle",)
    destroyed = spoil == "destroy"
    if destroyed:
        b.destroy()

    def check_combine(res):
        out, wout, _ = res
        same_form(out, np.zeros((N, H), BF16), fw, "combined_x")
        assert (wout is None) == ("topk_weights" not in args)
        assert rig.launched() == ["combine"]
        sent_sizes(rig, num_tokens=N, num_experts=inp["E"])

    def check_cached(res):
        assert res[4] is h and list(res[3]) == []
        sent_sizes(rig, num_tokens=N, hidden=H)

    if cached:
        expect(rig, lambda: b.dispatch(handle=h, **args), blame, check=check_cached, destroyed=destroyed)
    else:
        expect(rig, lambda: b.combine(handle=h, **args), blame, check=check_combine, destroyed=destroyed)


# --------------------------------------------------------------------------- low-latency mode


def _ll_inputs(draw, R: int, fw: str):
    L = draw(st.integers(1, 3))
    E, T = R * L, draw(st.integers(1, 8))
    K = draw(st.integers(1, min(E, 4)))
    H = draw(st.sampled_from([128, 256, 640]))
    Ns = [draw(st.integers(0, T)) for _ in range(R)]
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    xs = [rng.standard_normal((n, H)).astype(BF16) for n in Ns]
    idx = [routing(draw, n, K, E, unique=True) for n in Ns]
    use_fp8 = draw(st.booleans())
    round_scale = use_fp8 and draw(st.booleans())
    flags = dict(use_fp8=use_fp8, round_scale=round_scale, use_ue8m0=round_scale and draw(st.booleans()))
    return dict(xs=xs, idx=idx, E=E, T=T, K=K, H=H, L=L, Ns=Ns, flags=flags)


def _ll_dispatch_spoil(draw, inp, args: dict, fw: str):
    N, K, E, T, H = inp["Ns"][0], inp["K"], inp["E"], inp["T"], inp["H"]
    idx = inp["idx"][0]
    spoil = draw(st.sampled_from([None, None, None, "range", "repeat", "over_T", "hidden", "T", "experts", "flag",
                                  "ue8m0", "topk_cols", "stats", "x_dtype", "other_fw"]))
    if spoil == "range" and N:
        bad = idx.copy()
        bad[draw(st.integers(0, N - 1)), 0] = draw(st.sampled_from([E, -3]))
        args["topk_idx"] = to_fw(bad, fw)
        return ("topk_idx",)
    if spoil == "repeat" and N and K > 1 and idx[0, 0] >= 0:
        bad = idx.copy()
        bad[0, 1] = bad[0, 0]
        args["topk_idx"] = to_fw(bad, fw)
        return ("topk_idx",)
    if spoil == "over_T":
        args["num_max_dispatch_tokens_per_rank"] = N - 1 if N > 1 else 0
        return ("x", "num_max_dispatch_tokens_per_rank")
    if spoil == "hidden":
        args["x"] = to_fw(np.zeros((N, H + 64), BF16), fw)
        return ("x",)
    if spoil == "T":
        args["num_max_dispatch_tokens_per_rank"] = draw(st.sampled_from([float(T), "8", 2**40]))
        return ("num_max_dispatch_tokens_per_rank",)
    if spoil == "experts":
        # E + 1 is not a multiple of the rank count only with 2 or more ranks.
        args["num_experts"] = draw(st.sampled_from([0, -1, 2**20] + ([E + 1] if E // inp["L"] > 1 else [])))
        return ("num_experts",)
    if spoil == "flag":
        name = draw(st.sampled_from(["use_fp8", "round_scale", "async_finish", "return_recv_hook"]))
        args[name] = draw(st.sampled_from(["yes", 2]))
        return (name,)
    if spoil == "ue8m0":
        args.update(use_fp8=True, round_scale=False, use_ue8m0=True)
        return ("use_ue8m0", "round_scale")
    if spoil == "topk_cols":
        args["topk_idx"] = to_fw(np.full((N, 33), -1, np.int64), fw)
        return ("topk_idx",)
    if spoil == "stats":
        args["cumulative_local_expert_recv_stats"] = to_fw(np.zeros(inp["L"] + 1, np.int32), fw)
        return ("cumulative_local_expert_recv_stats",)
    if spoil == "x_dtype":
        args["x"] = to_fw(inp["xs"][0].astype(np.float32), fw)
        return ("x",)
    if spoil == "other_fw":
        args["topk_idx"] = to_fw(idx, draw(st.sampled_from([f for f in FRAMEWORKS if f != fw])))
        return ("topk_idx",)
    return ()


def _ll_check_dispatch(rig, inp, ref, fw, args):
    L, R, T, H = inp["L"], len(inp["Ns"]), inp["T"], inp["H"]

    def check(res):
        recv_x, count, handle, _, hook = res
        if args["use_fp8"]:
            same_form(recv_x[0], ref.recv_x, fw, "recv_x[0]")
            same_form(recv_x[1], ref.recv_x_scales, fw, "recv_x[1]")
        else:
            same_form(recv_x, ref.recv_x, fw, "recv_x")
        same_form(count, ref.recv_count, fw, "recv_count")
        assert (hook is not None) == bool(args.get("return_recv_hook"))
        assert handle.num_tokens == inp["Ns"][0] and (handle.num_max_tokens, handle.hidden) == (T, H)
        sent_sizes(rig, num_tokens=inp["Ns"][0], num_topk=inp["K"], num_experts=inp["E"], max_tokens=T)
        if hook is not None:
            hook()
        assert tuple(recv_x[0].shape if args["use_fp8"] else recv_x.shape) == (L, R * T, H)
    return check


def _ll_setup(rig, data):
    """(draw, R, framework, inputs, a low-latency Buffer of R ranks) of one example."""
    draw = data.draw
    R = draw(st.sampled_from([1, 2, 4]))
    fw = draw(st.sampled_from(FRAMEWORKS))
    b, _ = rig.ll_buffer(R)
    return draw, R, fw, _ll_inputs(draw, R, fw), b


@given(data=st.data())
@FUZZ
def test_fuzz_low_latency_dispatch(rig, data):
    draw, R, fw, inp, b = _ll_setup(rig, data)
    args = dict(x=to_fw(inp["xs"][0], fw), topk_idx=to_fw(inp["idx"][0], fw),
                num_max_dispatch_tokens_per_rank=inp["T"], num_experts=inp["E"], **inp["flags"])
    if fw == "torch" and draw(st.booleans()):
        args["return_recv_hook"] = True
    blame = _ll_dispatch_spoil(draw, inp, args, fw)
    ref = None
    if not blame:
        ref = reference.low_latency_dispatch(inp["xs"], inp["idx"], inp["T"], inp["E"], **inp["flags"])[0]
    destroyed = draw(st.integers(0, 9)) == 0
    if destroyed:
        b.destroy()
    expect(rig, lambda: b.low_latency_dispatch(**args), blame, check=_ll_check_dispatch(rig, inp, ref, fw, args),
           destroyed=destroyed)


@given(data=st.data())
@FUZZ
def test_fuzz_low_latency_combine(rig, data):
    draw, R, fw, inp, b = _ll_setup(rig, data)
    N, K, L, T, H, E = inp["Ns"][0], inp["K"], inp["L"], inp["T"], inp["H"], inp["E"]
    idx = inp["idx"][0]
    h = b.low_latency_dispatch(to_fw(inp["xs"][0], fw), to_fw(idx, fw), T, E, **inp["flags"])[2]
    args = dict(x=to_fw(np.zeros((L, R * T, H), BF16), fw), topk_idx=to_fw(idx, fw),
                topk_weights=to_fw(np.ones((N, K), np.float32), fw), handle=h)
    spoil = draw(st.sampled_from([None, None, "idx_changed", "x_shape", "w_dtype", "handle", "out", "zero_copy",
                                  "logfmt_zero_copy", "flag", "destroy", "stale"]))
    blame, destroyed = (), False
    if spoil == "idx_changed" and N:
        bad = idx.copy()
        bad[0] = np.roll(bad[0], 1) if K > 1 and len(set(bad[0])) > 1 else -1
        if not np.array_equal(bad, idx):
            args["topk_idx"], blame = to_fw(bad, fw), ("topk_idx",)
    elif spoil == "x_shape":
        args["x"], blame = to_fw(np.zeros((L, R * T + 1, H), BF16), fw), ("x",)
    elif spoil == "w_dtype":
        args["topk_weights"], blame = to_fw(np.ones((N, K), np.float16), fw), ("topk_weights",)
    elif spoil == "handle":
        kind = draw(st.sampled_from(["other", "object", "normal"]))
        if kind == "other":
            b2, _ = rig.ll_buffer(R)
            args["handle"] = b2.low_latency_dispatch(to_fw(inp["xs"][0], fw), to_fw(idx, fw), T, E,
                                                     **inp["flags"])[2]
        else:
            args["handle"] = object() if kind == "object" else _handle_spoil_normal(rig, R, fw)
        blame = ("handle",)
    elif spoil == "out":
        args["out"], blame = to_fw(np.zeros((N + 1, H), BF16), fw), ("out",)
    elif spoil == "zero_copy":
        args["zero_copy"], blame = True, ("x",)
    elif spoil == "logfmt_zero_copy":
        args.update(zero_copy=True, use_logfmt=True)
        blame = ("use_logfmt", "zero_copy")
    elif spoil == "flag":
        name = draw(st.sampled_from(["zero_copy", "async_finish", "return_recv_hook", "use_logfmt"]))
        args[name], blame = "yes", (name,)
    elif spoil == "destroy":
        destroyed = True
        b.destroy()
    elif spoil == "stale":
        for _ in range(2):  # two more dispatches reuse the handle's slot
            b.low_latency_dispatch(to_fw(inp["xs"][0], fw), to_fw(idx, fw), T, E, **inp["flags"])
        rig.clear()
        with pytest.raises(BufferStateError, match="overwritten"):
            b.low_latency_combine(**args)
        assert rig.kernels == []
        return

    def check(res):
        out, _, hook = res
        same_form(out, np.zeros((N, H), BF16), fw, "combined_x")
        assert hook is None
        sent_sizes(rig, num_tokens=N, num_topk=K, num_experts=E, max_tokens=T)

    expect(rig, lambda: b.low_latency_combine(**args), blame, check=check, destroyed=destroyed)


def _handle_spoil_normal(rig, R: int, fw: str, N: int = 1, H: int = 128):
    """The handle of a normal-mode dispatch of N tokens of hidden H on another Buffer (of at
    least 2 ranks: the normal mode's least)."""
    R = max(R, 2)
    b = rig.normal_buffer(R)
    b._intra.publish([0] * R, [])
    return b.dispatch(to_fw(np.zeros((N, H), BF16), fw), is_token_in_rank=to_fw(np.ones((N, R), bool), fw))[4]


# --------------------------------------------------------------------------- without the stand-in


@pytest.fixture
def host_rig(monkeypatch):
    return FakeRuntime(monkeypatch, cpu_as_cuda=False)


@pytest.fixture
def rig(monkeypatch):
    return FakeRuntime(monkeypatch)


@given(data=st.data())
@FUZZ
def test_fuzz_host_arrays_are_refused_naming_the_argument(host_rig, data):
    """Without CPU arrays standing in for CUDA ones, every host array given to a device call is
    refused before any launch, naming the first array argument the call checks."""
    draw = data.draw
    rig = host_rig
    R = draw(st.sampled_from([2, 4]))
    fw = draw(st.sampled_from(FRAMEWORKS))
    N, H = draw(st.integers(0, 6)), 128
    x = to_fw(np.zeros((N, H), BF16), fw)
    idx = to_fw(np.zeros((N, 2), np.int64), fw)
    op = draw(st.sampled_from(["layout", "api_layout", "dispatch", "ll_dispatch"]))
    if op == "layout":
        b = rig.normal_buffer(R)
        expect(rig, lambda: b.get_dispatch_layout(idx, 2 * R), ("topk_idx",))
    elif op == "api_layout":
        expect(rig, lambda: api.get_dispatch_layout(idx, 2 * R, R), ("topk_idx",))
    elif op == "dispatch":
        b = rig.normal_buffer(R)
        expect(rig, lambda: b.dispatch(x, topk_idx=idx, num_experts=2 * R), ("x",))
    else:
        b, _ = rig.ll_buffer(R)
        expect(rig, lambda: b.low_latency_dispatch(x, idx, max(N, 1), 2 * R), ("x",))
