"""The benchmark's wait kernel (``cuda_src/timing.cuh``, epcomm.bench's start aligner) without a
GPU: it compiles for sm_90, its parameter mirror matches the C++ struct, it is in the shipped
catalogue, and the aligner accepts only its two modes."""
from __future__ import annotations

import ctypes

import pytest

from epcomm.jit import compiler, registry
from epcomm.kernels.timing import SpinParams, SpinWaitSpec



def test_spin_wait_kernel_compiles_for_sm90(cache_dir):
    spec = SpinWaitSpec()
    m = compiler.build(spec, "sm_90")
    assert m.cubin[:4] == b"\x7fELF"
    assert set(m.symbols) == {"spin_wait_ns"}
    # The rendered source carries static_asserts of the mirror's size (and field offsets where
    # NVRTC has __builtin_offsetof), so the compile above also checked the params layout.
    assert "sizeof(epcomm::SpinParams) == 8" in spec.render()


def test_spin_params_mirror_is_one_u64_of_nanoseconds():
    assert ctypes.sizeof(SpinParams) == 8
    p = SpinParams()
    p.ns = 1_500_000
    assert p.ns == 1_500_000


def test_wait_kernel_is_in_the_shipped_catalogue():
    # tests/test_jit_compile.py compiles every shipped specialization; `epcomm warmup --smoke`
    # adds the same spec.
    assert SpinWaitSpec() in registry.shipped()


def test_aligner_rejects_an_unknown_mode_before_touching_the_gpu():
    from epcomm.bench import _Aligner
    with pytest.raises(ValueError, match="aligner mode"):
        _Aligner(object(), object(), mode="sm-cycles")
