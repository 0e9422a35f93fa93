"""The package's layering, read from the source: the paper harnesses (``fusionlens.experiments``) sit on top of the
library and only the command line and the demo import them; pruning neither scores (``evaluate``) nor trains
(``train``); the modality table imports nothing of fusionlens."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import fusionlens

ROOT = Path(fusionlens.__file__).parent


def _imports(path: Path) -> set[str]:
    """Every module a file imports, at any depth (lazy imports inside functions included)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def _offenders(files: list[Path], forbidden: tuple[str, ...]) -> dict[str, list[str]]:
    found = {}
    for path in files:
        bad = sorted(n for n in _imports(path) if any(n == f or n.startswith(f + ".") for f in forbidden))
        if bad:
            found[str(path.relative_to(ROOT))] = bad
    return found


def _library_files() -> list[Path]:
    shells = {ROOT / "cli", ROOT / "experiments"}
    return [p for p in ROOT.rglob("*.py")
            if not any(s in p.parents for s in shells) and not p.name.startswith("demo")]


def test_the_library_never_imports_the_harnesses():
    assert _library_files(), "no library files found"
    assert _offenders(_library_files(), ("fusionlens.experiments",)) == {}


@pytest.mark.parametrize("forbidden", ["fusionlens.evaluate", "fusionlens.train"])
def test_prune_neither_scores_nor_trains(forbidden):
    assert _offenders(sorted((ROOT / "prune").glob("*.py")), (forbidden,)) == {}


def test_the_modality_table_is_a_leaf():
    assert [n for n in _imports(ROOT / "modalities.py") if n.startswith("fusionlens")] == []


def test_the_checker_sees_lazy_imports(tmp_path):
    """The oracle itself: an import inside a function body counts."""
    probe = tmp_path / "probe.py"
    probe.write_text("def f():\n    from fusionlens.experiments.lmd import summarise\n    import fusionlens.train\n")
    assert {"fusionlens.experiments.lmd", "fusionlens.train"} <= _imports(probe)
