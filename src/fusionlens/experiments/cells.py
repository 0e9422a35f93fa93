"""The one cell store of the reproductions: each measurement is a JSON file, written atomically, never recomputed.

A *cell* is one measurement of a paper table -- (pair, seed, method, mode) of an LMD table, (pair, method,
sparsity, seed) of an AlterMOMA one -- stored at a relative path that names it. An interrupted run leaves only
whole cells behind (:func:`fusionlens.io.atomic_write_json`), so a rerun resumes where it stopped and loses
nothing; the tables are made from the files alone.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fusionlens.io import atomic_write_json


class CellStore:
    """Cells as JSON files under ``root``; ``rel`` paths like ``"unstructured/camera-lidar/snip/s0.8/seed0.json"``."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def path(self, rel: str) -> Path:
        return self.root / rel

    def get(self, rel: str) -> dict[str, Any] | None:
        """The stored cell, or ``None`` when it was not measured yet."""
        path = self.path(rel)
        return json.loads(path.read_text()) if path.is_file() else None

    def put(self, rel: str, record: dict[str, Any]) -> None:
        atomic_write_json(self.path(rel), record)

    def compute(self, rel: str, measure: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        """The stored cell, else ``measure()`` stored first (nothing is stored when it raises)."""
        cell = self.get(rel)
        if cell is None:
            cell = measure()
            self.put(rel, cell)
        return cell

    def load(self, pattern: str) -> list[dict[str, Any]]:
        """Every cell whose relative path matches the glob ``pattern``, in path order."""
        return [json.loads(p.read_text()) for p in sorted(self.root.glob(pattern))]
