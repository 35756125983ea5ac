"""The catalogue of kernel specializations: what ``epcomm warmup`` builds and what ships.

:func:`shipped` is the set CI compiles for sm_90 on every change (tests/test_jit_compile.py); the
presets name the model shapes users ask for most.  Specializations outside it still compile on
first use (any hidden size that is a multiple of 128, or of 8 for the BF16 normal mode).
"""
from __future__ import annotations

from epcomm.kernels.internode import InternodeSpec
from epcomm.kernels.intranode import IntranodeCombineSpec, IntranodeDispatchSpec
from epcomm.kernels.layout import LayoutSpec
from epcomm.kernels.low_latency import LowLatencySpec
from epcomm.kernels.smoke import SmokeNvshmemSpec, SmokePeerStoreSpec
from epcomm.kernels.timing import SpinWaitSpec
from epcomm.jit.spec import KernelSpec

MODES = ("normal", "internode", "low-latency")
DTYPES = ("bf16", "fp8")
#: Optional specializations: "deepep" (a Buffer with numerics="deepep": its combines and FP8
#: low-latency dispatch), "logfmt" (the low-latency combine with use_logfmt=True).
VARIANTS = ("deepep", "logfmt")

PRESETS: dict[str, dict] = {
    # DeepSeek-V3/R1: hidden 7168, 256 routed experts, top-8 (intranode up to 8 ranks; the
    # internode kernels serve EP16/32/64 at 8 GPUs per node with rank counts at run time).
    "deepseek-v3": dict(hidden=(7168,), ranks=(2, 4, 8), dtypes=DTYPES, modes=MODES),
    # Qwen3-235B-A22B: hidden 4096, 128 experts, top-8.
    "qwen3-235b": dict(hidden=(4096,), ranks=(2, 4, 8), dtypes=DTYPES, modes=MODES),
    # gpt-oss-120b: hidden 2880 (not a multiple of 128: BF16 normal mode only).
    "gpt-oss": dict(hidden=(2880,), ranks=(2, 4, 8), dtypes=("bf16",), modes=("normal", "internode")),
    # Shapes of the GPU test suite, with every variant (so they ship: CI compiles them).
    "tests": dict(hidden=(2048, 4096, 7168, 2880), ranks=(2, 4, 8), dtypes=DTYPES, modes=MODES, variants=VARIANTS),
}


def specs_for(hidden, ranks, dtypes=DTYPES, modes=MODES, variants=(), *, strict: bool = False,
              skipped: list | None = None) -> list[KernelSpec]:
    """Every specialization needed for these shapes (and the optional ``variants``, a subset of
    :data:`VARIANTS`).  Combinations a kernel cannot support (FP8 or low-latency with hidden %
    128 != 0, a rank count outside the kernels' range) are skipped, or raise ValueError if
    ``strict``; ``skipped`` collects (label, reason) of each."""
    for m in modes:
        if m not in MODES:
            raise ValueError(f"mode {m!r}: expected one of {MODES}")
    for d in dtypes:
        if d not in DTYPES:
            raise ValueError(f"dtype {d!r}: expected one of {DTYPES}")
    for v in variants:
        if v not in VARIANTS:
            raise ValueError(f"variant {v!r}: expected one of {VARIANTS}")
    deepep, logfmt = "deepep" in variants, "logfmt" in variants
    out: list[KernelSpec] = [LayoutSpec()]

    def add(spec: KernelSpec) -> None:
        try:
            spec.validate()
        except ValueError as e:
            if strict:
                raise
            if skipped is not None:
                skipped.append((spec.label(), str(e)))
            return
        if spec not in out:
            out.append(spec)

    for H in hidden:
        if "normal" in modes:
            for R in ranks:
                for d in dtypes:
                    add(IntranodeDispatchSpec(R, H, d == "fp8"))
                add(IntranodeCombineSpec(R, H))
                if deepep:
                    add(IntranodeCombineSpec(R, H, deepep=True))
        if "internode" in modes:  # rank and node counts are runtime parameters
            add(InternodeSpec(H, False))  # combine (and BF16 dispatch) always needed
            if "fp8" in dtypes:
                add(InternodeSpec(H, True))
            if deepep:
                add(InternodeSpec(H, False, deepep=True))
        if "low-latency" in modes:
            add(LowLatencySpec(H, False))  # combine (and BF16 dispatch) always needed
            if "fp8" in dtypes:
                add(LowLatencySpec(H, True))
            if deepep:
                add(LowLatencySpec(H, False, deepep=True))
                if "fp8" in dtypes:
                    add(LowLatencySpec(H, True, deepep=True))
            if logfmt:
                add(LowLatencySpec(H, False, logfmt=True))
                if deepep:
                    add(LowLatencySpec(H, False, deepep=True, logfmt=True))
    return out


def preset(name: str, variants=()) -> list[KernelSpec]:
    """The specializations of preset ``name``, plus those of ``variants`` (see :data:`VARIANTS`)
    for its shapes."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; known: {', '.join(PRESETS)}")
    args = dict(PRESETS[name])
    args["variants"] = tuple(dict.fromkeys((*args.get("variants", ()), *variants)))
    return specs_for(**args)


def shipped() -> list[KernelSpec]:
    """Every specialization of every preset, the layout kernel, the smoke-test kernels and the
    benchmark's wait kernel."""
    out: list[KernelSpec] = []
    for name in PRESETS:
        for s in preset(name):
            if s not in out:
                out.append(s)
    for s in (SmokePeerStoreSpec(), SmokeNvshmemSpec(), SpinWaitSpec()):
        out.append(s)
    return out
