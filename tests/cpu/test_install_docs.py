"""The README's set-up: CI runs exactly its two commands, and it shows the install line of each
CUDA major that `epcomm info` recommends."""
from __future__ import annotations

import re
from pathlib import Path

from epcomm.jit import cuda_majors

ROOT = Path(__file__).resolve().parents[2]


def _readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text().split("## Set up and test", 1)[1]
    return [b.strip() for b in re.findall(r"```bash\n(.*?)```", text, re.S)[:2]]


def test_ci_runs_exactly_the_readme_commands():
    ci = [ln for ln in (ROOT / ".ci" / "run").read_text().splitlines()
          if ln.strip() and not ln.startswith(("#", "set ", "cd "))]
    assert ci == _readme_commands()
    assert "[cu13,test]" in ci[0] and "epcomm warmup" in ci[0] and ci[1].endswith("pytest -q -rs tests")


def test_the_readme_shows_each_cuda_majors_install_line():
    lines = (ROOT / "README.md").read_text().splitlines()
    for major, torch in cuda_majors.TORCH.items():
        want = (f'[cu{major},test]"', f"torch=={torch}", f'"jax[cuda{major}]"')
        assert any(all(w in ln for w in want) for ln in lines), f"README has no install line with {want}"
