"""benchmarks/gpu_steps.sh, the step runner of the multi-check device calls: a step's own
environment reaches its command, ONLY picks steps by name, a step's limit ends it, and the
summary says what each step did."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.skipif(shutil.which("bash") is None or sys.platform != "linux", reason="needs bash")


def _run(tmp_path, body: str, **env):
    tmp_path = tmp_path / f"call{len(list(tmp_path.iterdir()))}"
    fake = tmp_path / "bin"
    fake.mkdir(parents=True)
    (fake / "nvidia-smi").write_text("#!/bin/sh\necho 'GPU 0: a stand-in'\n")
    (fake / "nvidia-smi").chmod(0o755)
    script = tmp_path / "call.sh"
    script.write_text(f"source {ROOT / 'benchmarks' / 'gpu_steps.sh'}\n{body}\n")
    out = tmp_path / "out"
    run_env = dict(os.environ, PATH=f"{fake}:{os.environ['PATH']}", OUT=str(out), **env)
    subprocess.run(["bash", str(script)], cwd=tmp_path, env=run_env, check=True, capture_output=True, timeout=60)
    return (out / "summary.txt").read_text().splitlines(), out


def test_steps_get_their_environment_limits_and_a_summary(tmp_path):
    lines, out = _run(tmp_path, "A=7 step one 20 sh -c 'echo \"3 passed with A=$A, shared=$EPCOMM_SHARE_GPU\"'\n"
                                "step slow 1 sleep 30\n"
                                "step other 20 sh -c 'echo 1 failed; exit 1'", BUDGET="100")
    assert lines[0].startswith("one: rc=0 ") and lines[0].endswith(":: 3 passed with A=7, shared=1")
    assert lines[1].startswith("slow: rc=124 limit 1s")
    assert lines[2].startswith("other: rc=1 ") and lines[2].endswith(":: 1 failed")
    assert (out / "machine.txt").read_text().startswith("GPU 0")


def test_only_picks_steps_and_the_budget_skips_what_cannot_start(tmp_path):
    lines, _ = _run(tmp_path, "step keep_a 20 true\nstep drop 20 true\nstep keep_b 20 true", ONLY="^keep", BUDGET="100")
    assert [ln.split(":")[0] for ln in lines] == ["keep_a", "keep_b"]
    lines, _ = _run(tmp_path, "step late 20 true", BUDGET="10")
    assert lines == ["late: SKIPPED (5s left)"]


def test_a_pytest_step_cut_by_its_limit_still_reports_the_failures_so_far(tmp_path):
    """The step's `timeout` ends pytest with SIGTERM; tests/conftest.py turns it into an interrupt,
    so the log keeps the failure of the test that finished (killed outright, pytest printed only
    its progress dots) and the summary line has pytest's verdict."""
    work = tmp_path / "suite"
    work.mkdir()
    # tests/conftest.py's hooks, in a directory of its own (nothing written into the tree).
    (work / "conftest.py").write_text(
        "import importlib.util\n"
        f"spec = importlib.util.spec_from_file_location('epcomm_tests_conftest', {str(ROOT / 'tests' / 'conftest.py')!r})\n"
        "mod = importlib.util.module_from_spec(spec)\n"
        "spec.loader.exec_module(mod)\n"
        "globals().update({k: v for k, v in vars(mod).items() if k.startswith('pytest_')})\n")
    (work / "test_cut.py").write_text(
        "import time\n"
        "def test_a_fails():\n"
        "    assert 1 == 2, 'the detail of the failure'\n"
        "def test_b_outlives_the_limit():\n"
        "    time.sleep(120)\n")
    lines, out = _run(tmp_path, f"step cut 12 {sys.executable} -m pytest -q -p no:cacheprovider "
                                f"--rootdir {work} {work / 'test_cut.py'}", BUDGET="100")
    assert lines[0].startswith("cut: rc=124 limit 12s") and "1 failed" in lines[0].split("::", 1)[1], lines[0]
    log = (out / "cut.log").read_text()
    assert "the detail of the failure" in log and "KeyboardInterrupt" in log, log
