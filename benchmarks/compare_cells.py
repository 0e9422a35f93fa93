"""Compare the cells of two ``fusionlens reproduce`` runs (say, before and after a refactor): every measured value
must agree; wall-clock timings, checkpoint paths and fingerprints are left out, and pairs are compared in their one
spelling (``camera_radar``, ``camera,radar`` and ``camera-radar`` are the same pair).

    python benchmarks/compare_cells.py OUT_BEFORE OUT_AFTER     # exit status 1 when any value differs
"""

from __future__ import annotations

import argparse
import json
import math
import re
from pathlib import Path
from typing import Any

from fusionlens.modalities import combination_name

#: keys that differ between identical measurements: timings, and where the (identical) checkpoint lies
VOLATILE = frozenset({"seconds", "scoring_seconds", "latency_ms", "latency_ms_std", "checkpoint", "checkpoint_sha1",
                      "camera_trunk", "reference"})
_PAIR = re.compile(r"\b(?:camera|radar|lidar)(?:[_,-](?:camera|radar|lidar))+\b")
_SETTINGS = ("config.json", "protocol.json", "recipe.json")


def _pairs(text: str) -> str:
    return _PAIR.sub(lambda m: combination_name(m.group(0)), text)


def _strip(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _strip(v) for k, v in value.items() if k not in VOLATILE}
    if isinstance(value, list):
        return [_strip(v) for v in value]
    return _pairs(value) if isinstance(value, str) else value


def differences(a: Any, b: Any, where: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        return [f"{where}/{k}: only in {'the second' if k in b else 'the first'}" for k in sorted(set(a) ^ set(b))] \
            + [d for k in sorted(set(a) & set(b)) for d in differences(a[k], b[k], f"{where}/{k}")]
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in differences(x, y, f"{where}[{i}]")]
    both_nan = isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b)
    return [] if a == b or both_nan else [f"{where}: {a!r} vs {b!r}"]


def cells(root: Path) -> dict[str, Any]:
    """Every cell file under ``root`` (reference models and the trees' settings files left out), by relative path."""
    return {_pairs(p.relative_to(root).as_posix()): _strip(json.loads(p.read_text()))
            for p in sorted(root.rglob("*.json")) if "checkpoints" not in p.parts and p.name not in _SETTINGS}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("first", type=Path)
    ap.add_argument("second", type=Path)
    args = ap.parse_args()
    a, b = cells(args.first), cells(args.second)
    found = [f"{rel}: only in {'the second' if rel in b else 'the first'} run" for rel in sorted(set(a) ^ set(b))]
    found += [f"{rel}{d}" for rel in sorted(set(a) & set(b)) for d in differences(a[rel], b[rel])]
    print("\n".join(found) or f"{len(a)} cells, every measured value equal")
    return 1 if found else 0


if __name__ == "__main__":
    raise SystemExit(main())
