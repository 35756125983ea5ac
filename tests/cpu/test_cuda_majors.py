"""`epcomm info`'s check that the driver, NVRTC, NVSHMEM and the frameworks agree on the CUDA
major version, with faked versions."""
from __future__ import annotations

import pytest

from epcomm.jit import cuda_majors as cm
from epcomm.jit.cuda_majors import Part


@pytest.mark.parametrize("version, requires, major", [
    ("2.10.0+cu128", [], 12),
    ("2.13.0+cu130", [], 13),
    ("2.4.1+cu118", [], 11),
    ("2.13.0+cpu", ["nvidia-cuda-runtime-cu12==12.8.90"], None),   # the tag decides
    ("2.6.0+rocm6.2", [], None),
    ("2.10.0", ["filelock", 'cuda-bindings==12.9.4; platform_system == "Linux"',
                'nvidia-cuda-nvrtc-cu12==12.8.93; platform_system == "Linux"'], 12),
    ("2.13.0", ['cuda-toolkit[cublas,nvrtc]==13.0.3; platform_system == "Linux"',
                "cuda-bindings<14,>=13.0.3"], 13),
    ("2.13.0", ["filelock", "sympy>=1.13.3"], None),                   # e.g. macOS: no CUDA
])
def test_torch_cuda_major_from_its_metadata(version, requires, major):
    assert cm.torch_cuda_major(version, requires) == major


def _parts(**majors):
    names = {"driver": "CUDA {}.0", "NVRTC": "{}.0", "NVSHMEM": "nvidia-nvshmem-cu{} 3.4.5", "torch": "2.x (CUDA {})"}
    return [Part(k, names[k].format(v), v, "" if k in ("driver", "NVRTC") else f"dist-{k}") for k, v in majors.items()]


def test_agreement_and_a_newer_driver_are_fine():
    assert cm.disagreement(_parts(driver=13, NVRTC=13, NVSHMEM=13, torch=13)) is None
    assert cm.disagreement(_parts(driver=13, NVRTC=12, NVSHMEM=12, torch=12)) is None  # a driver runs older CUDA
    assert cm.disagreement([Part("torch", "2.13.0+cpu (no CUDA)", None, "torch"), *_parts(NVRTC=13)]) is None
    assert cm.disagreement([]) is None


def test_a_cuda12_torch_beside_cuda13_nvrtc_names_torch_and_both_fixes():
    line = cm.disagreement(_parts(driver=13, NVRTC=13, NVSHMEM=13, torch=12))
    assert "\n" not in line
    assert line.startswith("CUDA majors disagree: NVRTC is CUDA 13, but torch 2.x (CUDA 12)")
    assert "install torch==2.13.0 (built for CUDA 13)" in line
    assert f"or everything for CUDA 12: {cm.install_line(12)}" in line
    assert "NVSHMEM" not in line


def test_two_builds_of_one_component_are_told_to_uninstall_the_odd_one():
    parts = [*_parts(NVRTC=13), Part("NVSHMEM", "nvidia-nvshmem-cu13 3.4.5", 13, "nvidia-nvshmem-cu13"),
             Part("NVSHMEM", "nvidia-nvshmem-cu12 3.4.5", 12, "nvidia-nvshmem-cu12")]
    line = cm.disagreement(parts)
    assert "NVSHMEM nvidia-nvshmem-cu12 3.4.5" in line and "pip uninstall nvidia-nvshmem-cu12" in line


def test_without_nvrtc_the_majority_decides():
    line = cm.disagreement(_parts(NVSHMEM=12, torch=13, **{}) + [Part("cupy", "cupy-cuda12x 14", 12, "cupy-cuda12x")])
    assert "the rest is CUDA 12" in line and "torch==2.10.0 (built for CUDA 12)" in line


def test_an_old_driver_says_which_line_fits_it_or_which_driver_is_needed():
    line = cm.disagreement(_parts(driver=12, NVRTC=13, NVSHMEM=13, torch=13))
    assert line.startswith("the driver supports CUDA 12.0 but the packages are for CUDA 13")
    assert cm.install_line(12) in line and "R580" in line


def test_collect_reads_the_installed_packages(monkeypatch):
    monkeypatch.setattr(cm.driver, "cuda_version", lambda: (13, 0))
    monkeypatch.setattr(cm.toolchain, "nvrtc_version", lambda: "13.5")
    monkeypatch.setattr(cm, "_dist_parts", lambda: [Part("torch", "2.10.0 (CUDA 12)", 12, "torch")])
    parts = cm.collect()
    assert [(p.name, p.major) for p in parts] == [("driver", 13), ("NVRTC", 13), ("torch", 12)]
    assert cm.summary(parts) == "driver CUDA 13.0, NVRTC 13.5, torch 2.10.0 (CUDA 12)"


def test_info_prints_the_driver_and_one_error_line_with_exit_1(monkeypatch, capsys, tmp_path):
    from epcomm.tools import cli, info
    monkeypatch.setenv("EPCOMM_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(info.cuda_majors, "collect", lambda: _parts(driver=13, NVRTC=13, NVSHMEM=13, torch=12))
    assert cli.main(["info"]) == 1
    out, err = capsys.readouterr()
    assert "CUDA driver           CUDA 13.0" in out and "CUDA majors           DISAGREE" in out
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("epcomm info: error: CUDA majors disagree: NVRTC is CUDA 13")
    monkeypatch.setattr(info.cuda_majors, "collect", lambda: _parts(NVRTC=13, NVSHMEM=13))
    assert cli.main(["info"]) == 0
    out, err = capsys.readouterr()
    assert "CUDA driver           none found" in out and "CUDA majors           CUDA 13 throughout" in out and err == ""


def test_the_readme_shows_the_line_info_prints():
    from pathlib import Path
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    line = cm.disagreement([Part("driver", "CUDA 13.0", 13), Part("NVRTC", "13.0", 13),
                            Part("torch", "2.10.0 (CUDA 12)", 12, "torch")])
    assert f"`epcomm info: error: {line}`" in readme
