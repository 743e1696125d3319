"""What may import what: the product imports neither sibling package, and nothing in the
repository imports SecantusDB (GPL-2.0), which is only ever run as a separate server."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
FOLDERS = ["certyo_dagster", "certyo_sandbox", "certyo_demo", "tests", "benchmarks", "scripts"]


def _imports(path: Path) -> set[str]:
    """Top-level package of every import in `path`, including imports inside functions."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module.split(".")[0])
    return found


def _sources(folder: str) -> list[Path]:
    return sorted((REPO / folder).rglob("*.py"))


def test_the_product_imports_neither_the_sandbox_nor_the_demo() -> None:
    offending = {
        str(path.relative_to(REPO)): sorted(_imports(path) & {"certyo_sandbox", "certyo_demo"})
        for path in _sources("certyo_dagster")
    }
    assert _sources("certyo_dagster")
    assert {path: names for path, names in offending.items() if names} == {}


@pytest.mark.parametrize("folder", FOLDERS)
def test_nothing_imports_secantusdb(folder: str) -> None:
    importing = [str(p.relative_to(REPO)) for p in _sources(folder) if "secantus" in _imports(p)]
    assert importing == []
