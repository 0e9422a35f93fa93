"""Tables and the ablation figure of ``fusionlens reproduce altermoma``, from the finished cell files.

Segmentation cells give Table 3's layout (vehicle IoU per method and sparsity); cells of models with a detection
head give Table 1's (mAP and NDS per method and sparsity); ``task="both"`` gives both. The head line names how
the reference models were made (the tree's ``recipe.json``, :mod:`fusionlens.experiments.reference_models`).
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

from fusionlens.experiments.cells import CellStore
from fusionlens.prune.api import METHODS


def _mean_std(values: list[float]) -> str:
    if not values:
        return "--"
    mean = statistics.fmean(values)
    if len(values) == 1:
        return f"{100 * mean:.1f} (n=1)"
    return f"{100 * mean:.1f} ± {100 * statistics.stdev(values):.1f} (n={len(values)})"


#: metric columns: the cell key and its header; all in % of the cell's value
IOU: tuple[tuple[str, str], ...] = (("iou", "IoU"),)
DETECTION: tuple[tuple[str, str], ...] = (("mAP", "mAP"), ("NDS", "NDS"))


def _metrics(cells: list[dict[str, Any]]) -> tuple[tuple[str, str], ...]:
    """The metric columns the cells carry: IoU unless every cell is detection-only, mAP / NDS when scored."""
    iou = IOU if any(c.get("task", "segmentation") != "detection" for c in cells) else ()
    return iou + (DETECTION if any("mAP" in c for c in cells) else ())


def _pct(cell: dict[str, Any], columns: tuple[tuple[str, str], ...]) -> str:
    return " | ".join(f"{100 * cell[k]:.1f}" if k in cell else "--" for k, _ in columns)


def _method_table(pair: str, cells: list[dict[str, Any]], dense: dict[str, Any] | None,
                  columns: tuple[tuple[str, str], ...], layout: str) -> list[str]:
    """Method x sparsity, ``columns`` per sparsity (mean ± std over seeds), then the scoring backward passes."""
    rhos = sorted({c["sparsity"] for c in cells})
    names = " / ".join(label for _, label in columns)
    title = f"**{pair}**, {names} % ({layout} layout)"
    if dense is not None and all(k in dense for k, _ in columns):
        title += " -- dense " + ", ".join(f"{label} {100 * dense[k]:.1f}" for k, label in columns)
    single = len(columns) == 1
    head = [f"{100 * r:g}%" if single else f"{100 * r:g}% {label}" for r in rhos for _, label in columns]
    lines = [title, "", "| method | " + " | ".join(head) + " | backward passes |", "|---" * (len(head) + 2) + "|"]
    for method in [m for m in METHODS if any(c["method"] == m for c in cells)]:
        mine = [c for c in cells if c["method"] == method]
        row = [_mean_std([c[k] for c in mine if c["sparsity"] == r and k in c]) for r in rhos for k, _ in columns]
        passes = {c["scoring_backward_passes"] for c in mine}
        lines.append(f"| {method} | " + " | ".join(row) + f" | {'/'.join(map(str, sorted(passes)))} |")
    return lines + [""]


def summarise(out_dir: str | Path) -> str:
    """Markdown tables (metrics in %) of every finished cell under ``out_dir`` (one variant's cell tree)."""
    out = Path(out_dir)
    load = CellStore(out).load
    lines: list[str] = []
    recipe = out / "recipe.json"
    if recipe.is_file():
        lines += [f"Reference models: {json.loads(recipe.read_text())['reference']}.", ""]
    dense = {d["pair"]: d for d in load("dense/*.json")}
    cells = load("unstructured/*/*/*/*.json")
    for pair in sorted({c["pair"] for c in cells}):
        mine = [c for c in cells if c["pair"] == pair]
        columns = _metrics(mine)
        if IOU[0] in columns:
            lines += _method_table(pair, mine, dense.get(pair), IOU, "Table 3")
        if DETECTION[0] in columns:
            lines += _method_table(pair, mine, dense.get(pair), DETECTION, "Table 1")
    scells = load("structured/*/*/*/*.json")
    if scells:
        columns = _metrics(scells)
        names = " | ".join(label for _, label in columns)
        lines += [
            f"| pair | method | ratio | {names} | GFLOPs before → after | params | latency ms before → after |",
            "|---" * (6 + len(columns)) + "|",
        ]
        for c in sorted(scells, key=lambda c: (c["pair"], c["ratio"], c["method"])):
            b, a = c["before"], c["after"]
            lines.append(
                f"| {c['pair']} | {c['method']} | {100 * c['ratio']:g}% | {_pct(c, columns)} | "
                f"{b['gflops']:.2f} → {a['gflops']:.2f} | {b['params'] / 1e6:.2f}M → {a['params'] / 1e6:.2f}M"
                f" | {b['latency_ms']:.0f} → {a['latency_ms']:.0f} |"
            )
        lines.append("")
    ablation = load("ablation/*/*/*/*.json")
    if ablation:
        keys = {(a["pair"], a["sparsity"]) for a in ablation}
        rows = ablation + [
            {**c, "beta": 1.0} for c in cells if c["method"] == "altermoma" and (c["pair"], c["sparsity"]) in keys
        ]
        columns = _metrics(rows)
        names = " | ".join(label for _, label in columns)
        lines += [f"| pair | sparsity | β/α | seed | {names} |", "|---" * (4 + len(columns)) + "|"]
        for c in sorted(rows, key=lambda c: (c["pair"], c["sparsity"], c["beta"], c["seed"])):
            lines.append(
                f"| {c['pair']} | {100 * c['sparsity']:g}% | {c['beta']:g} | {c['seed']} | {_pct(c, columns)} |"
            )
        lines.append("")
    other = load("sweep/*/*/*/*.json") + load("variant/*/*/*/*.json") + load("readings/*/*/*/*.json")
    if other:
        columns = _metrics(other)
        names = " | ".join(label for _, label in columns)
        lines += [f"| pair | AlterMOMA options | sparsity | {names} | backward passes |",
                  "|---" * (4 + len(columns)) + "|"]
        for c in sorted(other, key=lambda c: (c["pair"], str(c.get("extra_options")), c["sparsity"])):
            opts = ", ".join(f"{k}={v}" for k, v in sorted(c.get("extra_options", {}).items()))
            lines.append(
                f"| {c['pair']} | {opts} | {100 * c['sparsity']:g}% | {_pct(c, columns)} | "
                f"{c['scoring_backward_passes']} |"
            )
        lines.append("")
    return "\n".join(lines)


def plot_ablation(out_dir: str | Path, path: str | Path) -> Path | None:
    """Appendix F figure: IoU (mAP for detection-only cells) against beta/alpha, one line per (pair, sparsity)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from fusionlens.io import atomic_save_with

    store = CellStore(out_dir)
    cells = store.load("ablation/*/*/*/*.json")
    if not cells:
        return None
    keys = {(c["pair"], c["sparsity"]) for c in cells}
    for main in store.load("unstructured/*/altermoma/*/*.json"):  # alpha = beta = 1
        if (main["pair"], main["sparsity"]) in keys:
            cells.append({**main, "beta": 1.0})
    key, label = _metrics(cells)[0]
    fig, ax = plt.subplots(figsize=(5.0, 3.4))
    for pair, rho in sorted(keys):
        mine = [c for c in cells if (c["pair"], c["sparsity"]) == (pair, rho)]
        betas = sorted({c["beta"] for c in mine})
        values = [statistics.fmean(c[key] for c in mine if c["beta"] == b) for b in betas]
        ax.plot(betas, [100 * v for v in values], marker="o", label=f"{pair} {100 * rho:g}%")
    ax.set_xlabel("β / α")
    ax.set_ylabel(f"val {label} (%)")
    ax.set_title(f"AlterMOMA: {label} against β/α (mean over seeds)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    atomic_save_with(path, lambda p: fig.savefig(p, dpi=120))
    plt.close(fig)
    return Path(path)
