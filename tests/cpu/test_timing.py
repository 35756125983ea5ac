"""The benchmark's wait kernels (``cuda_src/timing.cuh``, epcomm.tools.bench's start aligner) without a
GPU: they compile for sm_90, the parameter mirror matches the C++ struct, they are in the shipped
catalogue, and the aligner accepts only its modes."""
from __future__ import annotations

import ctypes

import pytest

from epcomm.jit import compiler
from epcomm.kernels import catalogue
from epcomm.kernels.timing import ALIGN_CHANNEL_BYTES, ALIGN_MAX_RANKS, AlignParams, SpinParams, SpinWaitSpec



def test_timing_kernels_compile_for_sm90(cache_dir):
    spec = SpinWaitSpec()
    m = compiler.build(spec, "sm_90")
    assert m.cubin[:4] == b"\x7fELF"
    assert set(m.symbols) == {"spin_wait_ns", "start_barrier"}
    # The rendered source carries static_asserts of the mirrors' sizes (and field offsets where
    # NVRTC has __builtin_offsetof), so the compile above also checked the params layouts.
    src = spec.render()
    assert "sizeof(epcomm::SpinParams) == 8" in src
    assert f"sizeof(epcomm::AlignParams) == {ctypes.sizeof(AlignParams)}" in src


def test_params_mirrors():
    assert ctypes.sizeof(SpinParams) == 8
    p = SpinParams()
    p.ns = 1_500_000
    assert p.ns == 1_500_000
    # chan[72], lead, cap, seq, report, rank, num_ranks
    assert ctypes.sizeof(AlignParams) == 8 * ALIGN_MAX_RANKS + 4 * 8 + 2 * 4
    assert AlignParams.rank.offset == 8 * ALIGN_MAX_RANKS + 32
    # The leader's pong words of the last rank fit the channel.
    assert ALIGN_CHANNEL_BYTES >= 8 * (9 + 2 * (ALIGN_MAX_RANKS - 1) + 1)


def test_timing_kernels_are_in_the_shipped_catalogue():
    # tests/cpu/test_jit_compile.py compiles every shipped specialization; `epcomm warmup --smoke`
    # adds the same spec.
    assert SpinWaitSpec() in catalogue.shipped()


def test_aligner_rejects_bad_arguments_before_touching_the_gpu():
    from epcomm.tools.bench import _Aligner
    with pytest.raises(ValueError, match="aligner mode"):
        _Aligner(object(), object(), mode="sm-cycles")
    with pytest.raises(ValueError, match="needs the epcomm group"):
        _Aligner(object(), object(), group=None, mode="clock")
