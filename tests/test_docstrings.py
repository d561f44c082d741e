"""No docstring in rayssl quotes a measured speed or time: measurements go stale, so they live in
docs/benchmarks.md, and a docstring points there."""

from __future__ import annotations

import ast
from pathlib import Path

from test_help import STALE

ROOT = Path(__file__).resolve().parents[1]


def docstrings(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text())
    found = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node, clean=False)
            if doc:
                found.append((getattr(node, "lineno", 1), doc))
    return found


def test_no_docstring_quotes_a_measurement() -> None:
    stale = [f"{path.relative_to(ROOT)}:{line}: {STALE.search(doc).group(0)!r}"
             for path in sorted((ROOT / "rayssl").rglob("*.py")) for line, doc in docstrings(path) if STALE.search(doc)]
    assert stale == []


def test_the_check_sees_a_measurement_in_a_docstring(tmp_path) -> None:
    path = tmp_path / "m.py"
    path.write_text('def f():\n    """Fast: 1,034 img/s on 2 cores."""\n')
    assert [line for line, doc in docstrings(path) if STALE.search(doc)] == [1]
