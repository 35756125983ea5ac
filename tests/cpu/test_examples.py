"""The CPU example of the README runs, prints what the README shows, and is the README's code."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "reference_cpu.py"


def _run() -> str:
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    r = subprocess.run([sys.executable, str(EXAMPLE)], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    return r.stdout


def test_reference_cpu_example_passes_and_matches_the_readme():
    out = _run()
    lines = out.splitlines()
    assert lines[0] == "tokens per rank from rank 0: [14  9]"
    assert any(line.startswith("normal mode: ") and line.endswith(" PASS") for line in lines)
    assert any(line.startswith("low-latency mode: ") and line.endswith(" PASS") for line in lines)
    assert "FAIL" not in out
    readme = (ROOT / "README.md").read_text()
    # the README shows this output and this code (the file less its docstring)
    assert f"```\n{out}```" in readme, "README's output of examples/reference_cpu.py is stale"
    code = EXAMPLE.read_text().split('"""', 2)[2].lstrip("\n")
    assert f"```python\n{code}```" in readme, "README's copy of examples/reference_cpu.py is stale"
