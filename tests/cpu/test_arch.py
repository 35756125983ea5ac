"""The target architecture: checked before anything compiles, per specialization where one needs more."""
from __future__ import annotations

import pytest

from epcomm.errors import ToolchainError
from epcomm.jit import compiler, toolchain
from epcomm.kernels.intranode import IntranodeCombineSpec
from epcomm.kernels.low_latency import LowLatencySpec
from epcomm.tools import cli


@pytest.mark.parametrize("raw,want", [("sm_90", "sm_90"), ("90a", "sm_90a"), ("SM_80", "sm_80"), ("compute_89", "sm_89"),
                                      ("sm_100f", "sm_100f")])
def test_normalize_arch_accepts_supported_names(raw, want):
    assert toolchain.normalize_arch(raw) == want
    assert toolchain.arch_number(want) == int(want[3:].rstrip("af"))


@pytest.mark.parametrize("raw", ["sm_75", "70", "sm_10"])
def test_archs_older_than_the_minimum_are_refused_with_the_reason(raw):
    with pytest.raises(ValueError, match=r"need sm_80 or newer"):
        toolchain.normalize_arch(raw)


@pytest.mark.parametrize("raw", ["sm_9", "hopper", "sm_90x", ""])
def test_malformed_archs_are_refused(raw):
    with pytest.raises(ValueError, match="expected e.g. sm_90"):
        toolchain.normalize_arch(raw)


def test_the_fp8_low_latency_specialization_needs_sm89():
    assert LowLatencySpec(2048, True).min_sm == 89
    assert LowLatencySpec(2048, False).min_sm == toolchain.MIN_SM == 80
    assert IntranodeCombineSpec(2, 2048).min_sm == 80
    with pytest.raises(ToolchainError, match=r"low_latency\[hidden=2048,fp8=True\] needs sm_89 or newer; the target is sm_80"):
        compiler.build(LowLatencySpec(2048, True), "sm_80")


def test_warmup_refuses_an_old_arch_in_one_line_before_compiling(capsys, monkeypatch):
    monkeypatch.setattr("epcomm.tools.warmup._build_all", lambda *a: pytest.fail("compiled despite a bad --arch"))
    assert cli.main(["warmup", "--arch", "sm_10", "--hidden", "2048"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "need sm_80 or newer" in err[0] and err[0].startswith("epcomm warmup: error: ")


def test_warmup_skips_what_the_arch_cannot_build_and_builds_the_rest(capsys, monkeypatch):
    seen = []
    monkeypatch.setattr("epcomm.tools.warmup._build_all",
                        lambda specs, arch, jobs: seen.extend((s, arch) for s in specs) or
                        [(s.label(), "cached", 0.0, None) for s in specs])
    assert cli.main(["warmup", "--arch", "sm_80", "--hidden", "2048", "--mode", "low-latency"]) == 0
    labels = {s.label() for s, _ in seen}
    assert "low_latency[hidden=2048,fp8=False]" in labels and "low_latency[hidden=2048,fp8=True]" not in labels
    assert all(arch == "sm_80" for _, arch in seen)
    assert "skipping low_latency[hidden=2048,fp8=True]: needs sm_89" in capsys.readouterr().err

