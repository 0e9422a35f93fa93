"""One sample audited: the numbers every table of the report is aggregated from (a JSON-ready dict per sample,
cached on disk so that a long audit resumes).

For sample ``x`` with LMD components ``c_m`` of the studied output ``y`` (summed over any leading channel
dimension; the decomposition is exact, ``y = sum_m c_m + bias``, LMD eqs. 1-3):

* **shares** -- the signed share ``S_m / sum_m' |S_m'|`` with ``S_m = sum_{cells} c_m`` (:func:`modality_shares`)
  over three regions: the predicted positives (``y > threshold``), the ground-truth objects (the union of their
  cells) and the whole map; and over the predicted positives in each distance band around the ego.
* **objects** -- per ground-truth object (its cells: a box footprint or a mask): each modality's score and share,
  whether the model found it (the mean of ``y`` over its cells above ``threshold``), whether each single-modality
  partner found it, and, where the labels say which sensors saw it, whether the top-scoring modality is the one
  sensor that did (the right-sensor criterion of the LMD paper's ground-truth evaluation).
* **faults** -- the same model on the sample with one sensor blacked out / dropped (:func:`blackout_spec`):
  the shares and the predicted positives / IoU under the fault.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from fusionlens.audit.labels import SampleLabels
from fusionlens.evaluate.explain import flat_map
from fusionlens.evaluate.regions import box_masks, modality_shares, score_regions
from fusionlens.spec import ModelSpec


def band_name(lo: float, hi: float) -> str:
    return f"{lo:g}-{hi:g} m" if math.isfinite(hi) else f">= {lo:g} m"


def band_of(distance: float, bands: Sequence[float]) -> str | None:
    for lo, hi in zip(bands, bands[1:]):
        if lo <= distance < hi:
            return band_name(lo, hi)
    return None


def blackout_spec(spec: ModelSpec, modality: str) -> ModelSpec:
    """``spec`` with ``modality`` blacked out / dropped: its input tensor zeroed and every boolean tensor that
    travels with it (a valid mask: points become absent) set to False. Calibration and other travelling values are
    kept, so the model still runs; for a camera this is a black image, for a point cloud an empty sweep."""
    inputs = spec.inputs
    travels = tuple(spec.travels.get(modality, ()))

    def faulted(batch: Any) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        tensors, kwargs = inputs(batch)
        tensors, kwargs = dict(tensors), dict(kwargs)
        tensors[modality] = torch.zeros_like(tensors[modality])
        for key in travels:
            value = kwargs.get(key)
            if isinstance(value, torch.Tensor) and value.dtype == torch.bool:
                kwargs[key] = torch.zeros_like(value)
        return tensors, kwargs

    return dataclasses.replace(spec, inputs=faulted)


def _region_shares(comps: Mapping[str, torch.Tensor], where: torch.Tensor | None) -> dict[str, float] | None:
    if where is not None and not bool(where.any()):
        return None
    return modality_shares(comps, where)


def _iou_counts(pred: torch.Tensor, labels: SampleLabels) -> dict[str, float] | None:
    if labels.target is None:
        return None
    gt = flat_map(labels.target.float()) > 0.5
    valid = torch.ones_like(gt) if labels.valid is None else flat_map(labels.valid.float()) > 0.5
    return {"inter": float((pred & gt & valid).sum()), "union": float(((pred | gt) & valid).sum())}


def object_masks(labels: SampleLabels, spec: ModelSpec, shape: tuple[int, int]) -> torch.Tensor | None:
    """``(N, H, W)`` bool cells of each labelled object (``None`` without boxes)."""
    if labels.boxes is None:
        return None
    if labels.boxes.dtype == torch.bool:
        return labels.boxes
    if spec.grid is None:
        raise ValueError("labels give boxes in metres, which need the output's grid: ModelSpec(grid=BEVGrid(...)); "
                         "or give the objects as bool masks (N, H, W)")
    if tuple(spec.grid.shape[:2]) != shape:
        raise ValueError(f"the spec's grid has {spec.grid.shape[:2]} cells but the output's last two dimensions are "
                         f"{shape}")
    return box_masks(labels.boxes, spec.grid)


def _distances(spec: ModelSpec, shape: tuple[int, int]) -> torch.Tensor | None:
    if spec.grid is None:
        return None
    xs, ys = spec.grid.cell_centres(0), spec.grid.cell_centres(1)
    return torch.sqrt(xs[:, None] ** 2 + ys[None, :] ** 2)


def _object_distance(labels: SampleLabels, i: int, mask: torch.Tensor, dist: torch.Tensor | None) -> float | None:
    if labels.boxes is not None and labels.boxes.dtype != torch.bool:
        return float(torch.linalg.vector_norm(labels.boxes[i, :2].double()))
    return float(dist[mask].mean()) if dist is not None else None


def decompose_one(spec: ModelSpec, batch: Any, level: str | None, rules: str) -> tuple[torch.Tensor, dict, float]:
    """The studied output and each component of the batch's first sample as 2-D maps, and the relative
    conservation error of the decomposition."""
    d = spec.decompose(batch, level=level, rules=rules)
    return (flat_map(d.output[0]), {n: flat_map(d.components[n][0]) for n in d.names},
            d.conservation_error().relative)


def audit_sample(spec: ModelSpec, item: Any, labels: SampleLabels, *, level: str | None, rules: str,
                 threshold: float, bands: Sequence[float], partners: Mapping[str, ModelSpec],
                 faults: Mapping[str, ModelSpec]) -> dict[str, Any]:
    """The audit's numbers for one dataset item (module docstring); JSON-ready."""
    batch = spec.collate([item])
    out, comps, conservation = decompose_one(spec, batch, level, rules)
    mods = {m: comps[m] for m in spec.modalities}
    shape = tuple(out.shape)
    pred = out > threshold
    masks = object_masks(labels, spec, shape)  # type: ignore[arg-type]
    dist = _distances(spec, shape)  # type: ignore[arg-type]
    on_objects = masks.any(0) if masks is not None and masks.shape[0] else None
    record: dict[str, Any] = {
        "tags": [str(t) for t in labels.tags], "positive_cells": int(pred.sum()), "conservation_error": conservation,
        "shares": {"positive": _region_shares(mods, pred), "map": _region_shares(mods, None),
                   "objects": _region_shares(mods, on_objects) if on_objects is not None else None},
        "bands": {}, "iou": _iou_counts(pred, labels), "objects": [], "faults": {}}
    if dist is not None:
        for lo, hi in zip(bands, bands[1:]):
            record["bands"][band_name(lo, hi)] = _region_shares(mods, pred & (dist >= lo) & (dist < hi))
    partner_outputs = {}
    for name, p in partners.items():
        subject = p.subject("input")
        partner_outputs[name] = flat_map(subject.forward(subject.prepare(p.collate([item])))[0])
    if masks is not None and masks.shape[0]:
        rows = score_regions({m: c[None] for m, c in mods.items()}, out[None], masks)
        for row in rows:
            i, mask = row.region, masks[row.region]
            seen = None if labels.seen_by is None else tuple(str(s) for s in labels.seen_by[i])
            single = [m for m in spec.modalities if seen is not None and m in seen]
            distance = _object_distance(labels, i, mask, dist)
            record["objects"].append({
                "box": i, "class": None if labels.classes is None else str(labels.classes[i]), "cells": row.cells,
                "distance": distance, "band": None if distance is None else band_of(distance, bands),
                "value": row.value, "detected": row.value > threshold, "scores": row.scores, "shares": row.shares,
                "top": row.top, "seen_by": None if seen is None else list(seen),
                "single_sensor": single[0] if len(single) == 1 else None,
                "right_sensor": (row.top == single[0]) if len(single) == 1 else None,
                "partners": {n: float(o[mask].mean()) > threshold for n, o in partner_outputs.items()}})
    for name, faulted in faults.items():
        f_out, f_comps, _ = decompose_one(faulted, faulted.collate([item]), level, rules)
        f_pred = f_out > threshold
        f_mods = {m: f_comps[m] for m in spec.modalities}
        record["faults"][name] = {
            "positive_cells": int(f_pred.sum()), "iou": _iou_counts(f_pred, labels),
            "shares": {"positive": _region_shares(f_mods, f_pred), "map": _region_shares(f_mods, None)},
            "objects_detected": (int(sum(float(f_out[m].mean()) > threshold for m in masks if m.any()))
                                 if masks is not None else None)}
    return record
