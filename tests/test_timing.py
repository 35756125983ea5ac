"""The benchmark's wait kernels (``cuda_src/timing.cuh``, epcomm.bench's start aligner) without a
GPU: they compile for sm_90, the parameter mirror matches the C++ struct, they are in the shipped
catalogue, and the aligner accepts only its modes."""
from __future__ import annotations

import ctypes

import pytest

from epcomm.jit import compiler, registry
from epcomm.kernels.timing import SpinParams, SpinWaitSpec



def test_spin_wait_kernel_compiles_for_sm90(cache_dir):
    spec = SpinWaitSpec()
    m = compiler.build(spec, "sm_90")
    assert m.cubin[:4] == b"\x7fELF"
    assert set(m.symbols) == {"spin_wait_ns", "deadline_stamp"}
    # The rendered source carries static_asserts of the mirror's size (and field offsets where
    # NVRTC has __builtin_offsetof), so the compile above also checked the params layout.
    assert "sizeof(epcomm::SpinParams) == 16" in spec.render()


def test_spin_params_mirror_is_nanoseconds_then_a_deadline_pointer():
    assert ctypes.sizeof(SpinParams) == 16
    assert SpinParams.ns.offset == 0 and SpinParams.deadline.offset == 8
    p = SpinParams()
    p.ns, p.deadline = 1_500_000, 0x7F0000001000
    assert (p.ns, p.deadline) == (1_500_000, 0x7F0000001000)


def test_wait_kernel_is_in_the_shipped_catalogue():
    # tests/test_jit_compile.py compiles every shipped specialization; `epcomm warmup --smoke`
    # adds the same spec.
    assert SpinWaitSpec() in registry.shipped()


def test_aligner_rejects_an_unknown_mode_before_touching_the_gpu():
    from epcomm.bench import _Aligner
    with pytest.raises(ValueError, match="aligner mode"):
        _Aligner(object(), object(), mode="sm-cycles")
