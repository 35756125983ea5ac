"""The spoiled calls of the GPU fuzz (tests/gpu/test_fuzz_gpu.py), made here on the fake runtime
(tests/helpers/fake_rig.py): each raises TypeError/ValueError naming what the GPU fuzz expects,
before any launch, so a failure of the GPU fuzz is the library's and not the test's.  Also: the
fuzz's plan spoils every argument in each mode, on every seed."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from fake_rig import FakeRuntime  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT / "benchmarks") not in sys.path:
    sys.path.insert(0, str(ROOT / "benchmarks"))

import soak_check as sc  # noqa: E402


def _fuzz_module():
    spec = importlib.util.spec_from_file_location("gpu_fuzz_under_test", ROOT / "tests" / "gpu" / "test_fuzz_gpu.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


fuzz = _fuzz_module()


@pytest.mark.parametrize("seed", [1, 2, 3, 17])
def test_the_plan_spoils_every_argument_in_both_modes(seed):
    plan = fuzz.plan(np.random.default_rng(seed))
    assert len(plan) == fuzz.STEPS and plan[:2] == [("normal", "none"), ("ll", "none")]
    assert {(m, k) for m, k in plan if k != "none"} == {(m, k) for m in ("normal", "ll") for k in fuzz.SPOILS}
    assert plan == fuzz.plan(np.random.default_rng(seed))  # every rank draws the same plan


def _inputs(case, R):
    """Rank 0's step inputs as the GPU fuzz makes them (CPU tensors standing in for CUDA ones)."""
    inp = sc.case_inputs(case, R)
    s = {"x": sc.to_torch(inp["xs"][0], "cpu"), "idx": sc.to_torch(inp["idx"][0], "cpu"),
         "w": sc.to_torch(inp["w"][0], "cpu")}
    if inp["scales"] is not None:
        s["x"] = (s["x"], sc.to_torch(inp["scales"][0], "cpu", col_major=case.col_scales))
    return s


def _normal_handle(rig, R, H):
    b = rig.normal_buffer(R)
    b._intra.publish([0] * R, [])
    return b.dispatch(torch.zeros(1, H, dtype=torch.bfloat16), is_token_in_rank=torch.ones(1, R, dtype=torch.bool))[4]


def _ll_handle(rig, R):
    b, _ = rig.ll_buffer(R)
    return b.low_latency_dispatch(torch.zeros(1, 128, dtype=torch.bfloat16), torch.zeros(1, 1, dtype=torch.long),
                                  4, R, use_fp8=False)[2]


@pytest.mark.parametrize("R", [2, 4])
@pytest.mark.parametrize("mode", ["normal", "ll"])
@pytest.mark.parametrize("fp8", [False, True])
@pytest.mark.parametrize("spoil", fuzz.SPOILS)
def test_each_spoiled_call_raises_naming_what_the_gpu_fuzz_expects(monkeypatch, R, mode, fp8, spoil):
    rig = FakeRuntime(monkeypatch)
    buf, _ = rig.ll_buffer(R, normal=True)
    rng = np.random.default_rng(5)
    case = sc.make_case(rng, 0, R, mode, max_tokens=64)
    # the shapes of the GPU fuzz, made to have tokens on rank 0 and the wanted format
    case = type(case)(**{**case.__dict__, "Ns": (max(case.Ns[0], 3),) + case.Ns[1:], "fp8": fp8,
                         "H": 2048, "col_scales": fp8 and mode == "normal"})
    s = _inputs(case, R)
    s["y"] = None  # a combine with a wrong handle is refused on the handle before x is read
    other = _ll_handle(rig, R) if mode == "normal" else _normal_handle(rig, R, case.H)
    call, blame = fuzz._spoil(spoil, s, case, buf, other)
    rig.clear()
    with pytest.raises((TypeError, ValueError)) as e:
        call()
    assert any(b in str(e.value) for b in blame), f"{type(e.value).__name__}: {e.value} names none of {blame}"
    assert not rig.kernels, "a kernel was launched before the error"
