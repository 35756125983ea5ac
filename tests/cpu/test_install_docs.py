"""The README: CI runs exactly its two set-up commands, it shows the install line of each CUDA
major that `epcomm info` recommends, and its code snippets define every name they use."""
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


def _unbound_names(code: str) -> set[str]:
    """Names a snippet reads but never binds (assignment, import, def, loop or comprehension
    variable, argument) and that are not builtins: one flat scope, enough for short snippets."""
    import ast
    import builtins
    tree = ast.parse(code)
    bound, used = set(dir(builtins)), set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Name):
            (used if isinstance(node.ctx, ast.Load) else bound).add(node.id)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            bound.update((a.asname or a.name).split(".")[0] for a in node.names)
        elif isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            bound.add(node.name)
        elif isinstance(node, ast.arg):
            bound.add(node.arg)
    return used - bound


def test_every_readme_snippet_defines_every_name_it_uses():
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    assert len(blocks) >= 4  # the CPU example, torch, JAX, the DeepEP drop-in
    for code in blocks:
        assert _unbound_names(code) == set(), code.splitlines()[0]
    for framework in ("import jax", "from epcomm.deep_ep import Buffer"):
        snippet = next(b for b in blocks if framework in b)
        assert len(snippet.splitlines()) <= 30, framework
    assert _unbound_names("y = x + 1") == {"x"}  # the check itself sees an undefined name
