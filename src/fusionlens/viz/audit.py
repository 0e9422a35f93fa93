"""Figures of the sensor-reliance audit (:mod:`fusionlens.audit`): share bars per group, the monitor's scores,
the fault IoUs. Each draws rows the audit already computed (nothing is computed here) and writes a PNG atomically."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from fusionlens.io import atomic_save_with  # noqa: E402
from fusionlens.viz.explain import modality_colour  # noqa: E402


def _save(fig: Any, path: str | Path) -> Path:
    path = Path(path)
    fig.tight_layout()
    atomic_save_with(path, lambda p: fig.savefig(p, dpi=90, format="png"))
    plt.close(fig)
    return path


def share_bars(path: str | Path, rows: Sequence[Mapping[str, Any]], modalities: Sequence[str], *, title: str,
               label: str = "value") -> Path:
    """Horizontal bars: each row's mean signed share per modality, +- its spread over samples; ``n`` beside."""
    rows = list(rows)
    height = 0.8 / max(1, len(modalities))
    fig, ax = plt.subplots(figsize=(7.0, 0.9 + 0.45 * max(1, len(rows)) * max(1, len(modalities)) ** 0.5))
    y = np.arange(len(rows))
    for k, m in enumerate(modalities):
        means = [r[m] if r[m] is not None else np.nan for r in rows]
        sds = [r.get(f"{m} sd") or 0.0 for r in rows]
        ax.barh(y + (k - (len(modalities) - 1) / 2) * height, means, height, xerr=sds, color=modality_colour(m, k),
                edgecolor="black", linewidth=0.4, label=m, error_kw={"elinewidth": 0.8, "alpha": 0.6})
    ax.set_yticks(y, [f"{r[label]}  (n={r['n']})" for r in rows], fontsize=8)
    ax.invert_yaxis()
    ax.axvline(0, color="black", linewidth=0.6)
    ax.set_xlim(-1.05, 1.05)
    ax.set_xlabel("signed share of the output (LMD): + supports, - suppresses")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8, loc="lower right")
    ax.grid(axis="x", alpha=0.3)
    return _save(fig, path)


def monitor_plot(path: str | Path, scores: Sequence[float], flagged: Sequence[bool], errors: Sequence[bool | None],
                 threshold: float, names: Sequence[str]) -> Path:
    """Each audited sample's monitor score (sorted), the threshold, errors marked: which samples to worry about."""
    order = np.argsort(scores)[::-1]
    fig, ax = plt.subplots(figsize=(7.0, 3.0))
    colours = ["#d62728" if errors[i] else ("#7f7f7f" if errors[i] is None else "#1f77b4") for i in order]
    ax.bar(np.arange(len(order)), [scores[i] for i in order], color=colours, width=0.9)
    ax.axhline(threshold, color="black", linestyle="--", linewidth=1, label=f"threshold {threshold:.2f}")
    for rank, i in enumerate(order[:5]):  # the five most unusual, named
        if flagged[i]:
            ax.annotate(names[i].replace("sample-", "#"), (rank, scores[i]), fontsize=7,
                        xytext=(6 + 26 * rank, -4 - 9 * rank), textcoords="offset points",
                        arrowprops={"arrowstyle": "-", "linewidth": 0.5})
    ax.set_xlabel("audited samples, most unusual first")
    ax.set_ylabel("monitor score")
    ax.set_title("share monitor: red = model error (IoU below the error bound), blue = fine, grey = no label",
                 fontsize=9)
    ax.legend(fontsize=8)
    return _save(fig, path)


def fault_plot(path: str | Path, rows: Sequence[Mapping[str, Any]], modalities: Sequence[str]) -> Path:
    """Per injected fault: IoU clean vs faulted, and the positives' mean shares clean vs faulted."""
    fig, (a, b) = plt.subplots(1, 2, figsize=(8.0, 0.8 + 0.6 * max(2, len(rows))))
    y = np.arange(len(rows))
    names = [r["fault"] for r in rows]
    a.barh(y - 0.2, [r["iou clean"] or 0 for r in rows], 0.4, color="#bbbbbb", label="clean")
    a.barh(y + 0.2, [r["iou faulted"] or 0 for r in rows], 0.4, color="#d62728", label="faulted")
    a.set_yticks(y, names)
    a.invert_yaxis()
    a.set_xlabel("IoU")
    a.legend(fontsize=8)
    a.set_title("IoU with one sensor blacked out", fontsize=9)
    height = 0.8 / max(1, len(modalities))
    for k, m in enumerate(modalities):
        off = (k - (len(modalities) - 1) / 2) * height
        b.barh(y + off, [r[f"{m} faulted"] if r[f"{m} faulted"] is not None else np.nan for r in rows], height,
               color=modality_colour(m, k), edgecolor="black", linewidth=0.4, label=f"{m} (faulted)")
        b.scatter([r[f"{m} clean"] if r[f"{m} clean"] is not None else np.nan for r in rows], y + off, marker="|",
                  color="black", s=80, zorder=3)
    b.set_yticks(y, names)
    b.invert_yaxis()
    b.set_xlim(-1.05, 1.05)
    b.axvline(0, color="black", linewidth=0.6)
    b.set_xlabel("share on predicted positives (| = clean)")
    b.legend(fontsize=7)
    b.set_title("where the shares move", fontsize=9)
    return _save(fig, path)
