"""The package's layering, as the import-linter contracts in pyproject.toml state it: imports go
down only, no cycle at any level, and only the interop layer (with runtime.streams and the group
adapters) imports a framework.  Fails with lint-imports' report of each broken contract."""
from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_import_contracts_hold():
    exe = shutil.which("lint-imports") or str(Path(sys.executable).with_name("lint-imports"))
    if not Path(exe).exists():
        pytest.skip("import-linter is not installed (pip install -e '.[test]')")
    r = subprocess.run([exe, "--no-cache"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    assert "Contracts: 3 kept, 0 broken." in r.stdout


def test_no_epcomm_import_inside_a_function():
    """Optional frameworks may be imported where they are used; epcomm's own modules only at the
    top of a module, where the layering contracts see them."""
    found = []
    for path in sorted((ROOT / "epcomm").rglob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        for fn in ast.walk(tree):
            if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(fn):
                mod = (node.module or "") if isinstance(node, ast.ImportFrom) else None
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
                if (isinstance(node, ast.ImportFrom) and (node.level or mod == "epcomm" or mod.startswith("epcomm."))) \
                        or any(n == "epcomm" or n.startswith("epcomm.") for n in names):
                    found.append(f"{path.relative_to(ROOT)}:{node.lineno} in {fn.name}")
    assert found == []


def _expand(path: str) -> list[str]:
    """``a/{b,c}.py`` -> ``a/b.py``, ``a/c.py`` (one brace group)."""
    if "{" not in path:
        return [path]
    head, rest = path.split("{", 1)
    inner, tail = rest.split("}", 1)
    return [head + part + tail for part in inner.split(",")]


def test_the_readme_layout_table_names_modules_that_exist():
    text = (ROOT / "README.md").read_text()
    table = text.split("## Layout of the repository", 1)[1].split("\n\n", 2)[1]
    cells = [p for row in table.splitlines()[2:] for p in row.split("|")[2].split("`")[1::2]]
    paths = [p for p in cells if "/" in p]  # the other code spans name markers, not files
    assert len(paths) > 20
    missing = [q for p in paths if "<" not in p for q in _expand(p) if not (ROOT / q).exists()]
    assert missing == []
    # and every module of the package is reachable from a row: its file, or a folder listed
    listed = {q for p in paths for q in _expand(p)}
    unlisted = [str(m.relative_to(ROOT)) for m in (ROOT / "epcomm").rglob("*.py")
                if m.name != "__init__.py" and m.name != "_version.py"
                and not any(str(m.relative_to(ROOT)) == q or str(m.relative_to(ROOT)).startswith(q.rstrip("/") + "/")
                            for q in listed)]
    assert unlisted == []
