"""The tables of ``fusionlens reproduce lmd``, from the finished cell files, next to the paper's numbers: Table 1
(linearization ablation), Table 2 (BN x norm rules), Table 4 (sum vs ratio splitting, PCC and MSE), Table 3 (SHAP vs
LMD+SHAP) and the ground-truth attribution table. Cells measured on an earlier version of their checkpoint are
left out (their ``checkpoint_sha1``)."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from fusionlens.evaluate.separation import metric_key
from fusionlens.experiments.cells import CellStore
from fusionlens.experiments.lmd import ABLATION, ATTRIBUTION, BN_NORM, SHAP, SPLITTING, file_sha1
from fusionlens.modalities import TABLE, parse_modalities

# the paper's PCCs per pair (lmd-summary.md Tables 1-3, appendix Table 4) and Table 4's MSEs; "Xp/Y" = Y's map
# with X perturbed. Table 2's Identity-Ratio row is the paper preset.
PAPER: dict[str, dict[str, dict[str, float]]] = {
    "camera-radar": {
        "lmd:none": {"Rp/R": 0.22, "Rp/C": 0.76, "Cp/R": 0.22, "Cp/C": 0.09},
        "lmd:activations-only": {"Rp/R": 0.56, "Rp/C": 0.80, "Cp/R": 0.22, "Cp/C": 0.12},
        "lmd:norms-only": {"Rp/R": 0.50, "Rp/C": 0.99, "Cp/R": 0.93, "Cp/C": 0.38},
        "lmd:paper": {"Rp/R": 0.05, "Rp/C": 1.00, "Cp/R": 1.00, "Cp/C": 0.15},
        "lmd:bn-uniform+norm-identity": {"Rp/R": 0.50, "Rp/C": 1.00, "Cp/C": 0.42},
        "lmd:bn-identity+norm-identity": {"Rp/R": 0.15, "Rp/C": 1.00, "Cp/C": 0.38},
        "lmd:bn-identity+norm-uniform": {"Rp/R": 0.18, "Rp/C": 1.00, "Cp/C": 0.38},
        "lmd:sum-splitting": {"Rp/R": 0.12, "Rp/C": 1.00, "Cp/R": 1.00, "Cp/C": 0.23},
        "lmd:ratio-splitting": {"Rp/R": 0.08, "Rp/C": 1.00, "Cp/R": 1.00, "Cp/C": 0.18},
        "shapley": {"Rp/C": 0.69, "Cp/R": 0.67},
        "lmd+shap": {"Rp/C": 0.94, "Cp/R": 0.89},
    },
    "camera-lidar": {
        "lmd:paper": {"Lp/L": 0.09, "Cp/C": 0.44},
        "shapley": {"Lp/C": 0.71, "Cp/L": 0.72},
        "lmd+shap": {"Lp/C": 0.92, "Cp/L": 0.91},
    },
}
PAPER_MSE = {"lmd:sum-splitting": {"Rp/R": 9.63, "Rp/C": 0.0, "Cp/R": 0.0, "Cp/C": 40.43},
             "lmd:ratio-splitting": {"Rp/R": 4.46, "Rp/C": 0.0, "Cp/R": 0.0, "Cp/C": 30.35}}

def _fmt(values: Sequence[float], digits: int = 2) -> str:
    vals = [v for v in values if not math.isnan(v)]
    if not vals:
        return "—"
    t = torch.tensor(vals, dtype=torch.float64)
    std = float(t.std(unbiased=False)) if len(vals) > 1 else 0.0
    return f"{float(t.mean()):.{digits}f} ± {std:.{digits}f}"


def _columns(pair: str, keys: Sequence[str] | None = None) -> list[str]:
    mods = parse_modalities(pair)
    cols = [metric_key(p, m) for p in mods for m in mods]
    return [c for c in cols if keys is None or c in keys]


def _table(cells: list[dict[str, Any]], pair: str, rows: dict[str, str], metric: str,
           keys: Sequence[str] | None = None) -> str:
    cols = _columns(pair, keys)
    lines = ["| method | mode | seeds | " + " | ".join(cols) + " | paper |",
             "|---|---|---|" + "---|" * len(cols) + "---|"]
    for spec, label in rows.items():
        for mode in ("frozen", "recomputed"):
            mine = [c for c in cells if c["pair"] == pair and c["method"] == spec and c["mode"] == mode]
            if not mine:
                continue
            vals = {k: [c["result"]["summary"][metric][k][0] for c in mine] for k in cols}
            ref = (PAPER_MSE if metric == "mse" and pair == "camera-radar" else PAPER.get(pair, {})).get(spec, {})
            ref_txt = ", ".join(f"{k} {v:.2f}" for k, v in ref.items()) if metric == "pcc" or spec in PAPER_MSE else ""
            lines.append(f"| {label} | {mode} | {len(mine)} | " + " | ".join(_fmt(vals[k]) for k in cols)
                         + f" | {ref_txt or '—'} |")
    return "\n".join(lines) if len(lines) > 2 else "(not measured)"


def summarise(out_dir: str | Path, fingerprint: Callable[[Path], str] | None = None) -> str:
    """Markdown tables from the cells under ``out_dir`` (module docstring). ``fingerprint``: a checkpoint file's
    SHA-1 (default: read it; the CLI passes :meth:`LMDRunner.fingerprint`, which has read them already)."""
    cells = CellStore(Path(out_dir) / "cells").load("*/seed*/*.json")
    if not cells:
        raise FileNotFoundError(f"no result cells under {out_dir}/cells (run 'fusionlens reproduce lmd' first)")
    fingerprint = fingerprint or file_sha1
    prints = {p: fingerprint(Path(p)) if Path(p).is_file() else None for p in {c["checkpoint"] for c in cells}}
    fresh = [c for c in cells if prints[c["checkpoint"]] in (None, c.get("checkpoint_sha1"))]
    stale, cells = len(cells) - len(fresh), fresh
    sep = [c for c in cells if "result" in c]
    att = [c for c in cells if "summary" in c]
    parts = ["# LMD reproduction on the built-in world", "",
             "PCC (MSE where stated) of each modality's seg-logit map, mean ± std over seeds of the per-seed mean "
             "over anchor samples. *frozen*: perturbed inputs through the network linearized at the clean input "
             "(the paper's protocol); *recomputed*: a full decomposition of the perturbed input. Letters: Xp/Y = "
             "modality Y's map when X is perturbed (" + ", ".join(f"{m.letter} = {m.name}" for m in TABLE) + ")."]
    if sep:
        c0 = sep[0]["result"]
        # a seed is its own model only if no other seed of the pair used the same checkpoint
        models = {(c["pair"], c["seed"]): c["checkpoint"] for c in sep}
        by_pair: dict[str, set[str]] = {}
        for (pair, _seed), ckpt in models.items():
            by_pair.setdefault(pair, set()).add(ckpt)
        counts = ", ".join(f"{pair} {len(ckpts)} for {sum(p == pair for p, _ in models)} seeds"
                           for pair, ckpts in sorted(by_pair.items()))
        parts.append(f"N = {c0['n']}, pairing offsets k + {c0['stride']}·j, j = 1..{c0['count']}, "
                     f"{len(c0['anchors'])} anchors per seed; trained models: {counts} (seeds sharing a model "
                     "draw other anchors on it).")
    if stale:
        parts.append(f"({stale} cells measured on an earlier version of their checkpoint were left out.)")
    bn_rows = {f"lmd:{k}": v for k, v in BN_NORM.items()}
    bn_rows["lmd:paper"] = "Identity-Ratio (= paper preset)"
    # pairs in table order: camera-radar, camera-lidar, camera-radar-lidar
    names = [m.name for m in TABLE]
    pairs = sorted({c["pair"] for c in cells},
                   key=lambda p: (len(parse_modalities(p)), [names.index(m) for m in parse_modalities(p)]))
    for pair in pairs:
        if not any(c["pair"] == pair for c in sep):
            continue
        parts += ["", f"## {pair}", "", "### Table 1: linearization ablation (PCC)", "",
                  _table(sep, pair, ABLATION, "pcc"), "", "### Table 2: BN x norm rules (PCC)", "",
                  _table(sep, pair, bn_rows, "pcc"), "",
                  "### Table 4: activation sum vs ratio splitting (PCC, then MSE)", "",
                  _table(sep, pair, SPLITTING, "pcc"), "", _table(sep, pair, SPLITTING, "mse"), "",
                  "### Table 3: SHAP vs LMD+SHAP (PCC)", "", _table(sep, pair, SHAP, "pcc")]
    if att:
        parts += ["", "## Ground-truth attribution (vehicles only one sensor could see)", "",
                  "Right sensor = argmax over modalities of the component summed over the object's BEV cells; "
                  "objects counted over all seeds; detected = mean fused probability over its cells > 0.5.", "",
                  "| pair | method | seeds | objects (per sensor) | right sensor (all) | per sensor | detected | "
                  "right sensor (detected) | share to it |", "|---|---|---|---|---|---|---|---|---|"]
        for pair in pairs:
            for spec in ATTRIBUTION:
                mine = [c for c in att if c["pair"] == pair and c["method"] == f"attribution:{spec}"]
                if not mine:
                    continue
                mods = parse_modalities(pair)
                per = {m: sum(c["summary"]["all"][m]["objects"] for c in mine) for m in mods}
                detected = sum(c["summary"]["detected"]["overall"]["objects"] for c in mine)
                per_correct = " · ".join(f"{m} {_fmt([c['summary']['all'][m]['correct'] for c in mine])}" for m in mods)
                parts.append(f"| {pair} | {spec} | {len(mine)} | {sum(per.values())} ("
                             + ", ".join(f"{m} {n}" for m, n in per.items()) + ") | "
                             f"{_fmt([c['summary']['all']['overall']['correct'] for c in mine])} | {per_correct} | "
                             f"{detected} | {_fmt([c['summary']['detected']['overall']['correct'] for c in mine])} | "
                             f"{_fmt([c['summary']['all']['overall']['share'] for c in mine])} |")
    return "\n".join(parts)
