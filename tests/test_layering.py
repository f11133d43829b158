"""Who may import whom, across the repository's top folders: the product (``server/``,
``client/``) and the benchmarks (``bench/``) import nothing from ``tests/``.

Read from the source with :mod:`ast`, so an import inside a function counts too.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def imported_modules(path: Path) -> set[str]:
    """Every module ``path`` imports by absolute name (``import a.b``, ``from a.b import c``)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module is not None:
            names.add(node.module)
    return names


@pytest.mark.parametrize("folder", ["server", "client", "bench"])
def test_nothing_outside_tests_imports_tests(folder: str) -> None:
    offenders = {
        str(path.relative_to(REPO)): sorted(
            name for name in imported_modules(path) if name == "tests" or name.startswith("tests.")
        )
        for path in sorted((REPO / folder).rglob("*.py"))
    }
    assert {path: names for path, names in offenders.items() if names} == {}
