"""The audit's static report: ``index.html`` (headline, figures, sortable / filterable tables), one page per flagged
or selected sample with its LMD panels, and every number beside them as ``audit.json`` and one CSV per table.

Self-contained: HTML from the jinja2 templates shipped in this package, CSS and JS inline, figures as PNG files next
to the pages (relative links), no network -- it opens from ``file://``.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from jinja2 import Environment, PackageLoader, select_autoescape
from markupsafe import escape
from tqdm.auto import tqdm

from fusionlens.audit.labels import LabelsFn, resolve_labels
from fusionlens.audit.sample import flat_map
from fusionlens.audit.tables import finite
from fusionlens.data.sample import CAMERA_NAMES, Sample
from fusionlens.evaluate.attribution import Visibility
from fusionlens.evaluate.explain import explain
from fusionlens.io import atomic_write_json, atomic_write_text
from fusionlens.spec import ModelSpec
from fusionlens.viz import audit as figures
from fusionlens.viz.explain import explanation_figure, modality_colour

if TYPE_CHECKING:
    from fusionlens.audit.api import AuditResult

TABLE_TITLES = {
    "reliance": "Reliance: each modality's share by group and region",
    "samples": "Samples",
    "faults": "Faults: one sensor blacked out",
    "right_sensor": "Right sensor: objects exactly one sensor saw",
    "partners": "Fusion vs single-modality partners",
    "lost_found": "Objects lost by fusion / found only by fusion",
    "objects": "Ground-truth objects",
}


def _env() -> Environment:
    env = Environment(loader=PackageLoader("fusionlens.audit", "templates"), autoescape=select_autoescape(["j2"]))
    env.filters["cell"] = _cell
    env.filters["sortkey"] = _sortkey
    return env


def _cell(value: Any) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value)


def _sortkey(value: Any) -> str:
    if isinstance(value, bool):
        return str(int(value))
    if isinstance(value, (int, float)) and not (isinstance(value, float) and not math.isfinite(value)):
        return repr(float(value))
    return "" if value is None else str(value)


def _clean(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    return finite(obj)


def write_csv(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    columns = list(dict.fromkeys(k for r in rows for k in r))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns)
    writer.writeheader()
    for r in rows:
        writer.writerow({k: "" if finite(r.get(k)) is None else r.get(k) for k in columns})
    atomic_write_text(path, buf.getvalue())


def headline(result: AuditResult) -> list[str]:
    """Sentences (HTML; every name from the model or the labels escaped): which sensor the model relies on, where
    that changes, which samples to worry about."""
    mods = result.modalities
    rows = result.tables["reliance"]
    lines = []
    overall = next((r for r in rows if r["group"] == "all" and r["where"] == "positive"), None)
    if overall:
        top = max(mods, key=lambda m: overall[m])
        parts = ", ".join(f"{escape(m)} {overall[m]:+.2f} ± {overall[f'{m} sd']:.2f}" for m in mods)
        lines.append(f"On its predicted positives the model relies most on <b>{escape(top)}</b> ({parts}; mean ± sd "
                     f"of the signed LMD share over {overall['n']} samples).")
        moves = [(abs(r[top] - overall[top]), r) for r in rows if r["where"] == "positive"
                 and r["group"] in ("condition", "distance") and r[top] is not None and r["n"] >= 2]
        for _, r in sorted(moves, key=lambda t: -t[0])[:3]:
            lines.append(f"{r['group']} <b>{escape(r['value'])}</b> (n={r['n']}): {escape(top)} share {r[top]:+.2f} "
                         f"(overall {overall[top]:+.2f})" + (f", IoU {r['iou']:.3f}" if r["iou"] is not None else "")
                         + ".")
    mon = result.monitor.get("samples")
    if mon:
        auroc = "n/a" if mon["auroc"] is None else f"{mon['auroc']:.2f}"
        lines.append(f"The share monitor flags <b>{len(mon['flagged_samples'])}</b> of {len(result.records)} samples "
                     f"(threshold {mon['threshold']:.2f} = the {mon['quantile']:.0%} quantile on "
                     f"{result.monitor['reference']}); AUROC of its score for the model's errors "
                     f"({mon['error']}): {auroc}.")
        flagged = [r for r in result.records if r["flagged"]]
        worst = sorted(flagged or result.records, key=lambda r: -r["monitor"])[:5 if flagged else 3]
        if worst:
            named = []
            for r in worst:
                label = f"<a href=\"{escape(r['page'])}\">{escape(r['name'])}</a>" if r.get("page") else r["name"]
                iou = r["iou"]
                score = f"score {r['monitor']:.2f}"
                if iou and iou["union"] > 0:
                    score += f", IoU {iou['inter'] / iou['union']:.2f}"
                named.append(f"{label} ({score}; {escape(' '.join(r['tags'])) or 'no tags'})")
            lines.append(("Samples to look at first: " if flagged else "None is flagged; the most unusual: ")
                         + "; ".join(named) + ".")
    for r in result.tables["faults"]:
        if r["iou change"] is not None:
            moved = ", ".join(f"{escape(m)} {r[f'{m} clean']:+.2f} → {r[f'{m} faulted']:+.2f}" for m in mods
                              if r[f"{m} clean"] is not None and r[f"{m} faulted"] is not None)
            lines.append(f"With <b>{escape(r['fault'])}</b> the IoU moves {r['iou clean']:.3f} → {r['iou faulted']:.3f}"
                         + (f"; shares on the positives {moved}" if moved else "") + ".")
    return lines


def _sample_page(result: AuditResult, spec: ModelSpec, dataset: Any, index: int, labels: LabelsFn | None,
                 visibility: Visibility, level: str | None, rules: str, folder: Path) -> Path:
    record = next(r for r in result.records if r["index"] == index)
    item = dataset[index]
    lab = resolve_labels(item, labels, spec.modalities, visibility, f"sample {index}")
    regions = lab.boxes if lab.boxes is not None and lab.boxes.shape[0] else None
    seen_by = None if lab.seen_by is None or regions is None else [list(s) for s in lab.seen_by]
    e = explain(spec, spec.collate([item]), rules=rules, level=level, regions=regions, seen_by=seen_by)
    if lab.target is not None:
        e.target = flat_map(lab.target.float())
    if isinstance(item, Sample) and item.images is not None:
        e.images = item.images
        if item.images.shape[0] == len(CAMERA_NAMES):
            e.image_titles = [n.replace("CAM_", "").replace("_", " ").lower() for n in CAMERA_NAMES]
    tags = ", ".join(record["tags"]) or "no tags"
    e.title = f"{record['name']} [{tags}] -- LMD ({rules}); outline colour = sensor that saw the object"
    png = explanation_figure(folder / f"{record['name']}.png", e)
    objects = [r for r in result.tables["objects"] if r["index"] == index]
    faults = [{"fault": k, "positives": v["positive_cells"],
               "iou": (v["iou"]["inter"] / v["iou"]["union"]) if v["iou"] and v["iou"]["union"] > 0 else None,
               **{f"{m} (positives)": (v["shares"]["positive"] or {}).get(m) for m in result.modalities}}
              for k, v in record["faults"].items()]
    shares = [{"region": w, **(record["shares"][w] or {m: None for m in result.modalities})}
              for w in ("positive", "objects", "map")]
    row = next(r for r in result.tables["samples"] if r["index"] == index)
    html = _env().get_template("sample.html.j2").render(
        record=record, row=row, image=png.name, shares=shares, objects=objects, faults=faults,
        modalities=result.modalities, threshold=(result.monitor.get("samples") or {}).get("threshold"),
        conservation=e.conservation_error, title=result.settings.get("title") or "Sensor-reliance audit")
    path = folder / f"{record['name']}.html"
    atomic_write_text(path, html)
    atomic_write_json(folder / f"{record['name']}.json", _clean({**record, "explanation": e.to_dict()}))
    return path


def write_report(result: AuditResult, spec: ModelSpec, dataset: Any, pages: Sequence[int], *,
                 labels: LabelsFn | None, visibility: Visibility, level: str | None, rules: str,
                 progress: bool = True) -> dict[int, Path]:
    """Write figures, pages, JSON and CSV of ``result`` into ``result.out``; returns the sample pages."""
    out, mods = result.out, result.modalities
    out.mkdir(parents=True, exist_ok=True)
    rel = result.tables["reliance"]
    plots: list[tuple[str, str]] = []

    def bars(name: str, rows: list[dict[str, Any]], title: str, label: str = "value") -> None:
        if rows:
            figures.share_bars(out / name, rows, mods, title=title, label=label)
            plots.append((name, title))

    bars("overview.png", [r for r in rel if r["group"] == "all"], "All samples: share by region", label="where")
    bars("conditions.png", [r for r in rel if r["group"] == "condition" and r["where"] == "positive"],
         "Predicted positives: share by condition tag")
    bars("distance.png", [{**r, "value": f"{r['value']} ({r['where']})"} for r in rel if r["group"] == "distance"],
         "Share by distance from the ego (positives: cells; objects: per object)")
    bars("classes.png", [r for r in rel if r["group"] == "class"], "Ground-truth objects: share by class")
    mon = result.monitor.get("samples")
    if mon:
        bound = mon.get("error_iou")
        errors = []
        for r in result.records:
            iou = r["iou"]
            errors.append(None if not iou or iou["union"] <= 0 or bound is None else
                          iou["inter"] / iou["union"] < bound)
        figures.monitor_plot(out / "monitor.png", [r["monitor"] for r in result.records],
                             [r["flagged"] for r in result.records], errors, mon["threshold"],
                             [r["name"] for r in result.records])
        plots.append(("monitor.png", "Share monitor scores"))
    if result.tables["faults"]:
        figures.fault_plot(out / "faults.png", result.tables["faults"], mods)
        plots.append(("faults.png", "Injected faults"))

    folder = out / "samples"
    folder.mkdir(exist_ok=True)
    written = {}
    for index in tqdm(pages, desc="audit pages", disable=not progress, leave=False):
        written[index] = _sample_page(result, spec, dataset, index, labels, visibility, level, rules, folder)

    for name, rows in result.tables.items():
        write_csv(out / f"{name}.csv", rows)
    atomic_write_json(out / "audit.json", _clean({"settings": result.settings, "modalities": list(mods),
                                                  "monitor": result.monitor, "tables": result.tables,
                                                  "samples": result.records}))
    tables = [{"id": name, "title": TABLE_TITLES[name], "rows": rows, "columns": list(dict.fromkeys(
        k for r in rows for k in r if k != "page")), "csv": f"{name}.csv"}
        for name, rows in result.tables.items() if rows]
    html = _env().get_template("index.html.j2").render(
        title=result.settings.get("title") or "Sensor-reliance audit", headline=headline(result), plots=plots,
        tables=tables, monitor=_clean(result.monitor), settings=result.settings, modalities=mods,
        colours={m: modality_colour(m, k) for k, m in enumerate(mods)}, samples=len(result.records))
    atomic_write_text(out / "index.html", html)
    return written


def load_report(path: str | Path) -> dict[str, Any]:
    """``audit.json`` of a written report."""
    return json.loads((Path(path) / "audit.json").read_text())


__all__ = ["headline", "load_report", "write_csv", "write_report"]
