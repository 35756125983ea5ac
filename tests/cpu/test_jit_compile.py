"""Every shipped kernel specialization compiles for sm_90 with NVRTC (NVSHMEM ones also link
with libnvshmem_device.a through nvJitLink).  No GPU needed; this is what CI runs."""
from __future__ import annotations

import concurrent.futures as cf
import multiprocessing as mp
import os

import pytest

from epcomm.kernels import catalogue


def _compile(label_spec):
    label, spec = label_spec
    from epcomm.jit import compiler
    m = compiler.build(spec, "sm_90")
    assert m.cubin[:4] == b"\x7fELF", label
    return label, len(m.cubin), sorted(m.symbols)


def test_every_shipped_specialization_compiles_for_sm90(tmp_path_factory):
    specs = catalogue.shipped()
    labels = [s.label() for s in specs]
    assert len(set(labels)) == len(labels), "duplicate specializations in the catalogue"
    # Families that must be covered: a new kernel family must be added to the catalogue.
    fams = {s.family for s in specs}
    assert {"layout", "intranode_dispatch", "intranode_combine", "low_latency", "smoke", "smoke_nvshmem",
            "timing"} <= fams
    cache = os.environ.get("EPCOMM_CACHE_DIR") or str(tmp_path_factory.mktemp("jit-cache"))
    os.environ["EPCOMM_CACHE_DIR"] = cache
    jobs = min(len(specs), max(2, os.cpu_count() or 2))
    failures = []
    with cf.ProcessPoolExecutor(jobs, mp_context=mp.get_context("spawn")) as ex:
        futs = {ex.submit(_compile, (s.label(), s)): s.label() for s in specs}
        for f in cf.as_completed(futs):
            try:
                label, size, syms = f.result()
                assert size > 1000 and syms
            except Exception as e:  # collect all failures, not only the first
                failures.append(f"{futs[f]}: {e}")
    assert not failures, "\n\n".join(failures)


@pytest.mark.parametrize("spec_name", ["IntranodeDispatchSpec", "IntranodeCombineSpec", "LowLatencySpec"])
def test_unsupported_hidden_sizes_are_rejected_with_a_reason(spec_name):
    from epcomm.kernels import intranode, low_latency
    bad = {"IntranodeDispatchSpec": lambda: intranode.IntranodeDispatchSpec(2, 2880, True),
           "IntranodeCombineSpec": lambda: intranode.IntranodeCombineSpec(2, 2884),
           "LowLatencySpec": lambda: low_latency.LowLatencySpec(2880, False)}[spec_name]()
    with pytest.raises(ValueError, match="hidden=28"):
        bad.render()


def test_catalogue_skips_impossible_combinations_and_strict_mode_raises():
    specs = catalogue.specs_for((2880,), (2,), ("bf16", "fp8"), ("normal", "low-latency"))
    labels = [s.label() for s in specs]
    assert any("fp8=False" in l and "hidden=2880" in l for l in labels)
    assert not any("fp8=True" in l for l in labels)
    assert not any(l.startswith("low_latency") for l in labels)
    with pytest.raises(ValueError, match="multiple of 128"):
        catalogue.specs_for((2880,), (2,), ("fp8",), ("normal",), strict=True)
    with pytest.raises(ValueError, match="mode"):
        catalogue.specs_for((7168,), (2,), ("bf16",), ("bogus",))


# ---- found by mutation testing: each fails if the check it names is removed or loosened ----


def test_catalogue_holds_every_operation_of_a_shape_and_the_shipped_extras():
    from epcomm.kernels.internode import InternodeSpec
    from epcomm.kernels.intranode import IntranodeCombineSpec, IntranodeDispatchSpec
    from epcomm.kernels.layout import LayoutSpec
    from epcomm.kernels.low_latency import LowLatencySpec
    from epcomm.kernels.smoke import SmokeNvshmemSpec, SmokePeerStoreSpec
    from epcomm.kernels.timing import SpinWaitSpec
    got = catalogue.specs_for((7168,), (2, 4))
    want = [LayoutSpec()] + [s for R in (2, 4) for s in (IntranodeDispatchSpec(R, 7168, False),
                                                         IntranodeDispatchSpec(R, 7168, True),
                                                         IntranodeCombineSpec(R, 7168))]
    want += [InternodeSpec(7168, False), InternodeSpec(7168, True)]
    want += [LowLatencySpec(7168, False), LowLatencySpec(7168, True)]
    assert sorted(map(repr, got)) == sorted(map(repr, want))
    shipped = catalogue.shipped()
    for name in catalogue.PRESETS:
        assert all(s in shipped for s in catalogue.preset(name)), name
    for s in (SmokePeerStoreSpec(), SmokeNvshmemSpec(), SpinWaitSpec()):
        assert s in shipped


def _numerics_specs(H: int) -> list:
    from epcomm.kernels.internode import InternodeSpec
    from epcomm.kernels.intranode import IntranodeCombineSpec
    from epcomm.kernels.low_latency import LowLatencySpec
    return [LowLatencySpec(H, True, deepep=True), LowLatencySpec(H, False, deepep=True),
            LowLatencySpec(H, False, logfmt=True), LowLatencySpec(H, False, deepep=True, logfmt=True),
            IntranodeCombineSpec(2, H, deepep=True), InternodeSpec(H, False, deepep=True)]


def test_numerics_and_logfmt_specializations_compile_for_sm90(tmp_path_factory):
    """The modules of numerics="deepep" and use_logfmt (at a small hidden size; the presets' sizes
    are in the catalogue, which the every-shipped test compiles), each with only its kernels."""
    specs = _numerics_specs(1024)
    kernels = [sorted(k.short for k in s.kernels()) for s in specs]
    assert kernels == [["dispatch_both", "dispatch_recv", "dispatch_send"]] + \
        [["combine_both", "combine_recv", "combine_send"]] * 3 + [["combine"], ["crecv", "reduce", "stage"]]
    cache = os.environ.get("EPCOMM_CACHE_DIR") or str(tmp_path_factory.mktemp("jit-cache"))
    os.environ["EPCOMM_CACHE_DIR"] = cache
    failures = []
    with cf.ProcessPoolExecutor(min(len(specs), max(2, os.cpu_count() or 2)), mp_context=mp.get_context("spawn")) as ex:
        futs = {ex.submit(_compile, (s.label(), s)): s for s in specs}
        for f in cf.as_completed(futs):
            try:
                label, size, syms = f.result()
                assert size > 1000 and syms == sorted(k.short for k in futs[f].kernels())
            except Exception as e:
                failures.append(f"{futs[f].label()}: {e}")
    assert not failures, "\n\n".join(failures)


def test_catalogue_variants_add_the_numerics_and_logfmt_modules():
    from epcomm.kernels.low_latency import LowLatencySpec
    base = catalogue.specs_for((7168,), (2,))
    both = catalogue.specs_for((7168,), (2,), variants=("deepep", "logfmt"))
    added = [s for s in both if s not in base]
    assert sorted(map(repr, added)) == sorted(map(repr, _numerics_specs(7168)))
    only_logfmt = catalogue.specs_for((7168,), (2,), ("bf16",), ("low-latency",), ("logfmt",))
    assert LowLatencySpec(7168, False, logfmt=True) in only_logfmt
    assert not any(getattr(s, "deepep", False) for s in only_logfmt)
    with pytest.raises(ValueError, match="variant 'fast'"):
        catalogue.specs_for((7168,), (2,), variants=("fast",))
    shipped = catalogue.shipped()
    for H in (7168, 4096):
        assert all(s in shipped for s in _numerics_specs(H) if getattr(s, "num_ranks", 2) == 2)
    # A flag left at its default is not in the label: the default modules keep their names.
    assert LowLatencySpec(7168, False).label() == "low_latency[hidden=7168,fp8=False]"
    assert LowLatencySpec(7168, True, deepep=True).label() == "low_latency[hidden=7168,fp8=True,deepep=True]"
    with pytest.raises(ValueError, match="logfmt"):
        LowLatencySpec(7168, True, logfmt=True).validate()
