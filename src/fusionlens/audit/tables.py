"""The report's tables, aggregated from the per-sample records of :mod:`~fusionlens.audit.sample`.

Each table is a list of flat rows (dicts of str / number / None) so that the same rows go to JSON, CSV and the
HTML page. Shares are signed (``S_m / sum |S_m'|``); a sample or object enters a share mean only where its region
is non-empty. IoUs are pooled over the group (``sum inter / sum union``, as SimpleBEV's).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Iterable, Sequence
from typing import Any

Row = dict[str, Any]


def _stats(values: list[dict[str, float]], modalities: Sequence[str]) -> Row:
    row: Row = {"n": len(values)}
    for m in modalities:
        xs = [v[m] for v in values]
        row[m] = statistics.fmean(xs) if xs else None
        row[f"{m} sd"] = statistics.pstdev(xs) if len(xs) > 1 else (0.0 if xs else None)
    return row


def pooled_iou(counts: Iterable[dict[str, float] | None]) -> float | None:
    got = [c for c in counts if c is not None]
    union = sum(c["union"] for c in got)
    return sum(c["inter"] for c in got) / union if union > 0 else None


def reliance_table(records: Sequence[Row], modalities: Sequence[str]) -> list[Row]:
    """Mean and spread of each modality's share per group (overall, condition tag, distance band, object class,
    injected sensor fault) and region (predicted positives, ground-truth objects, whole map)."""
    rows: list[Row] = []

    def add(group: str, value: str, where: str, unit: str, shares: list[dict[str, float] | None],
            iou: float | None = None) -> None:
        got = [s for s in shares if s is not None]
        if got:
            rows.append({"group": group, "value": value, "where": where, "unit": unit, "iou": iou,
                         **_stats(got, modalities)})

    def sample_groups() -> Iterable[tuple[str, str, list[Row]]]:
        yield "all", "all", list(records)
        for tag in sorted({t for r in records for t in r["tags"]}):
            yield "condition", tag, [r for r in records if tag in r["tags"]]

    for group, value, part in sample_groups():
        iou = pooled_iou(r["iou"] for r in part)
        for where in ("positive", "objects", "map"):
            add(group, value, where, "samples", [r["shares"][where] for r in part], iou)
    for band in [b for b in (records[0]["bands"] if records else {})]:
        add("distance", band, "positive", "samples", [r["bands"].get(band) for r in records])
        add("distance", band, "objects", "objects", [o["shares"] for r in records for o in r["objects"]
                                                     if o["band"] == band])
    for cls in sorted({o["class"] for r in records for o in r["objects"] if o["class"] is not None}):
        add("class", cls, "objects", "objects", [o["shares"] for r in records for o in r["objects"]
                                                 if o["class"] == cls])
    for fault in sorted({f for r in records for f in r["faults"]}):
        iou = pooled_iou(r["faults"][fault]["iou"] for r in records if fault in r["faults"])
        for where in ("positive", "map"):
            add("fault", fault, where, "samples",
                [r["faults"][fault]["shares"][where] for r in records if fault in r["faults"]], iou)
    return rows


def object_rows(records: Sequence[Row], modalities: Sequence[str]) -> list[Row]:
    """One row per ground-truth object in the grid."""
    out = []
    for r in records:
        for o in r["objects"]:
            out.append({"sample": r["name"], "index": r["index"], "box": o["box"], "class": o["class"],
                        "distance": o["distance"], "band": o["band"], "cells": o["cells"], "value": o["value"],
                        "detected": o["detected"], **{m: o["shares"][m] for m in modalities},
                        "seen by": None if o["seen_by"] is None else "+".join(o["seen_by"]) or "none",
                        "right sensor": o["right_sensor"],
                        **{f"found by {p}": v for p, v in o["partners"].items()},
                        "monitor": o.get("monitor"), "flagged": o.get("flagged")})
    return out


def fusion_vs_partners(records: Sequence[Row], modalities: Sequence[str]) -> tuple[list[Row], list[Row]]:
    """Per partner: objects it found that the fusion model missed (lost by fusion) and the reverse; and the
    objects themselves with the fusion model's shares on them. Empty without partners."""
    partners = sorted({p for r in records for o in r["objects"] for p in o["partners"]})
    if not partners:
        return [], []
    objs = [(r, o) for r in records for o in r["objects"]]
    summary = []
    for p in partners:
        summary.append({"partner": p, "objects": len(objs), "found by partner": sum(o["partners"][p] for _, o in objs),
                        "found by fusion": sum(o["detected"] for _, o in objs),
                        "lost by fusion": sum(o["partners"][p] and not o["detected"] for _, o in objs),
                        "found only by fusion": sum(o["detected"] and not o["partners"][p] for _, o in objs)})
    summary.append({"partner": "any partner", "objects": len(objs),
                    "found by partner": sum(any(o["partners"].values()) for _, o in objs),
                    "found by fusion": sum(o["detected"] for _, o in objs),
                    "lost by fusion": sum(any(o["partners"].values()) and not o["detected"] for _, o in objs),
                    "found only by fusion": sum(o["detected"] and not any(o["partners"].values()) for _, o in objs)})
    rows = []
    for r, o in objs:
        finders = [p for p in partners if o["partners"][p]]
        kind = ("lost by fusion" if finders and not o["detected"] else
                "found only by fusion" if o["detected"] and not finders else None)
        if kind:
            rows.append({"kind": kind, "sample": r["name"], "index": r["index"], "box": o["box"], "class": o["class"],
                         "distance": o["distance"], "found by": "+".join(finders) or "fusion only",
                         "value": o["value"], **{m: o["shares"][m] for m in modalities}})
    return summary, rows


def right_sensor_table(records: Sequence[Row], modalities: Sequence[str]) -> list[Row]:
    """Right-sensor attribution of the objects exactly one modality saw, overall, per sensor and per condition."""
    singles = [(r, o) for r in records for o in r["objects"] if o["single_sensor"] is not None]
    if not singles:
        return []
    groups: list[tuple[str, str, Callable[[Row, Row], bool]]] = [("all", "all", lambda r, o: True)]
    groups += [("sensor", m, lambda r, o, m=m: o["single_sensor"] == m) for m in modalities]
    groups += [("condition", t, lambda r, o, t=t: t in r["tags"]) for t in sorted({t for r, _ in singles
                                                                                    for t in r["tags"]})]
    rows = []
    for group, value, keep in groups:
        part = [o for r, o in singles if keep(r, o)]
        found = [o for o in part if o["detected"]]
        if part:
            rows.append({"group": group, "value": value, "objects": len(part),
                         "right sensor": sum(o["right_sensor"] for o in part) / len(part),
                         "share of the sensor": statistics.fmean(o["shares"][o["single_sensor"]] for o in part),
                         "detected": len(found),
                         "right sensor (detected)": (sum(o["right_sensor"] for o in found) / len(found)
                                                     if found else None)})
    return rows


def fault_table(records: Sequence[Row], modalities: Sequence[str]) -> list[Row]:
    """Per injected fault: IoU, predicted positives, detected objects and the positives' shares, clean vs faulted."""
    rows = []
    for fault in sorted({f for r in records for f in r["faults"]}):
        part = [r for r in records if fault in r["faults"]]
        clean_iou, iou = pooled_iou(r["iou"] for r in part), pooled_iou(r["faults"][fault]["iou"] for r in part)
        row: Row = {"fault": fault, "samples": len(part), "iou clean": clean_iou, "iou faulted": iou,
                    "iou change": None if clean_iou is None or iou is None else iou - clean_iou,
                    "positives clean": sum(r["positive_cells"] for r in part),
                    "positives faulted": sum(r["faults"][fault]["positive_cells"] for r in part),
                    "objects detected clean": sum(o["detected"] for r in part for o in r["objects"]),
                    "objects detected faulted": sum(r["faults"][fault]["objects_detected"] or 0 for r in part)}
        clean = _stats([r["shares"]["positive"] for r in part if r["shares"]["positive"]], modalities)
        faulted = _stats([r["faults"][fault]["shares"]["positive"] for r in part
                          if r["faults"][fault]["shares"]["positive"]], modalities)
        for m in modalities:
            row[f"{m} clean"], row[f"{m} faulted"] = clean[m], faulted[m]
        rows.append(row)
    return rows


def sample_rows(records: Sequence[Row], modalities: Sequence[str]) -> list[Row]:
    """One row per audited sample: tags, IoU, positives, shares on the positives and the map, monitor score."""
    out = []
    for r in records:
        iou = r["iou"]
        pos, whole = r["shares"]["positive"] or {}, r["shares"]["map"] or {}
        out.append({"sample": r["name"], "index": r["index"], "tags": " ".join(r["tags"]),
                    "iou": iou["inter"] / iou["union"] if iou and iou["union"] > 0 else None,
                    "positives": r["positive_cells"], "objects": len(r["objects"]),
                    "missed": sum(not o["detected"] for o in r["objects"]),
                    **{f"{m} (positives)": pos.get(m) for m in modalities},
                    **{f"{m} (map)": whole.get(m) for m in modalities},
                    "monitor": r.get("monitor"), "flagged": r.get("flagged"), "page": r.get("page")})
    return out


def finite(value: Any) -> Any:
    """JSON has no NaN: non-finite floats become None."""
    return None if isinstance(value, float) and not math.isfinite(value) else value
