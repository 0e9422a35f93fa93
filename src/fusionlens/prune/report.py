"""Tables and the ablation figure of ``fusionlens reproduce altermoma``, from the finished cell files."""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

from fusionlens.prune.api import METHODS


def _slug(pair: str) -> str:
    return pair.replace(",", "_")


def _mean_std(values: list[float]) -> str:
    if not values:
        return "--"
    mean = statistics.fmean(values)
    if len(values) == 1:
        return f"{100 * mean:.1f} (n=1)"
    return f"{100 * mean:.1f} ± {100 * statistics.stdev(values):.1f} (n={len(values)})"


def summarise(out_dir: str | Path) -> str:
    """Markdown tables (IoU in %) of every finished cell under ``out_dir``."""
    out = Path(out_dir)

    def load(pattern: str) -> list[dict[str, Any]]:
        return [json.loads(p.read_text()) for p in sorted(out.glob(pattern))]

    lines: list[str] = []
    dense = {d["pair"]: d for d in load("dense/*.json")}
    cells = load("unstructured/*/*/*/*.json")
    for pair in sorted({c["pair"] for c in cells}):
        rhos = sorted({c["sparsity"] for c in cells if c["pair"] == pair})
        lines += [
            f"**{pair}** (dense IoU {100 * dense[pair]['iou']:.1f})" if pair in dense else f"**{pair}**",
            "",
            "| method | " + " | ".join(f"{100 * r:g}%" for r in rhos) + " | backward passes |",
            "|---" * (len(rhos) + 2) + "|",
        ]
        for method in [m for m in METHODS if any(c["method"] == m and c["pair"] == pair for c in cells)]:
            row = [
                _mean_std(
                    [c["iou"] for c in cells if c["pair"] == pair and c["method"] == method and c["sparsity"] == r]
                )
                for r in rhos
            ]
            passes = {c["scoring_backward_passes"] for c in cells if c["pair"] == pair and c["method"] == method}
            lines.append(f"| {method} | " + " | ".join(row) + f" | {'/'.join(map(str, sorted(passes)))} |")
        lines.append("")
    scells = load("structured/*/*/*/*.json")
    if scells:
        lines += [
            "| pair | method | ratio | IoU | GFLOPs before → after | params | latency ms before → after |",
            "|---|---|---|---|---|---|---|",
        ]
        for c in sorted(scells, key=lambda c: (c["pair"], c["ratio"], c["method"])):
            b, a = c["before"], c["after"]
            lines.append(
                f"| {c['pair']} | {c['method']} | {100 * c['ratio']:g}% | {100 * c['iou']:.1f} | "
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
        lines += ["| pair | sparsity | β/α | seed | IoU |", "|---|---|---|---|---|"]
        for c in sorted(rows, key=lambda c: (c["pair"], c["sparsity"], c["beta"], c["seed"])):
            lines.append(
                f"| {c['pair']} | {100 * c['sparsity']:g}% | {c['beta']:g} | {c['seed']} | {100 * c['iou']:.1f} |"
            )
        lines.append("")
    other = load("sweep/*/*/*/*.json") + load("variant/*/*/*/*.json")
    if other:
        lines += ["| pair | AlterMOMA options | sparsity | IoU | backward passes |", "|---|---|---|---|---|"]
        for c in sorted(other, key=lambda c: (c["pair"], str(c.get("extra_options")), c["sparsity"])):
            opts = ", ".join(f"{k}={v}" for k, v in sorted(c.get("extra_options", {}).items()))
            lines.append(
                f"| {c['pair']} | {opts} | {100 * c['sparsity']:g}% | {100 * c['iou']:.1f} | "
                f"{c['scoring_backward_passes']} |"
            )
        lines.append("")
    return "\n".join(lines)


def plot_ablation(out_dir: str | Path, path: str | Path) -> Path | None:
    """Appendix F figure: IoU against beta/alpha, one line per (pair, sparsity)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from fusionlens.io import atomic_save_with

    cells = [json.loads(p.read_text()) for p in sorted(Path(out_dir).glob("ablation/*/*/*/*.json"))]
    if not cells:
        return None
    keys = {(c["pair"], c["sparsity"]) for c in cells}
    for p in sorted(Path(out_dir).glob("unstructured/*/altermoma/*/*.json")):  # alpha = beta = 1
        main = json.loads(p.read_text())
        if (main["pair"], main["sparsity"]) in keys:
            cells.append({**main, "beta": 1.0})
    fig, ax = plt.subplots(figsize=(5.0, 3.4))
    for pair, rho in sorted(keys):
        mine = [c for c in cells if (c["pair"], c["sparsity"]) == (pair, rho)]
        betas = sorted({c["beta"] for c in mine})
        ious = [statistics.fmean(c["iou"] for c in mine if c["beta"] == b) for b in betas]
        ax.plot(betas, [100 * v for v in ious], marker="o", label=f"{pair} {100 * rho:g}%")
    ax.set_xlabel("β / α")
    ax.set_ylabel("val IoU (%)")
    ax.set_title("AlterMOMA: IoU against β/α (mean over seeds)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    atomic_save_with(path, lambda p: fig.savefig(p, dpi=120))
    plt.close(fig)
    return Path(path)
