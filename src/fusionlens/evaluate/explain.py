"""One sample explained: the decomposition of the studied output, per-modality Seg-Grad-CAM, and region
attributions -- the numbers behind ``fusionlens explain``'s panel (:func:`fusionlens.viz.explanation_figure` draws
an :class:`Explanation`; this module computes, ``viz`` only draws).

:func:`explain` works on any :class:`~fusionlens.spec.ModelSpec`; :func:`explain_world_sample` is the built-in
world's client: its regions are the vehicles' BEV cells and ``seen_by`` comes from the world's visibility truth.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from fusionlens.data.sample import CAMERA_NAMES, BEVGrid, Sample
from fusionlens.evaluate.attribution import Visibility, single_sensor_objects
from fusionlens.evaluate.gradcam import seg_grad_cam
from fusionlens.evaluate.regions import RegionAttribution, box_masks, modality_shares, score_regions
from fusionlens.spec import ModelSpec, as_spec


@dataclass
class Explanation:
    """One sample of a batch, explained. Maps are the studied output's last two dimensions (summed over any leading
    channel dimension); ``components`` holds the modalities then ``"bias"``."""

    modalities: tuple[str, ...]
    output: torch.Tensor
    components: dict[str, torch.Tensor]
    conservation_error: float  # relative; a NaN guard: the bias is the output minus the modalities
    shares: dict[str, dict[str, float]]  # where ("all", "positive") -> signed share per modality
    cams: dict[str, torch.Tensor] = field(default_factory=dict)
    cam_layer: str | None = None
    regions: list[RegionAttribution] = field(default_factory=list)
    grid: BEVGrid | None = None
    boxes: torch.Tensor | None = None  # (N, 5) or (N, >=7), the regions' boxes where they were boxes
    seen_by: list[tuple[str, ...]] | None = None  # per box
    images: torch.Tensor | None = None  # (Ncam, 3, H, W) in [0, 1], for the figure
    image_titles: list[str] | None = None
    target: torch.Tensor | None = None  # ground-truth map, for the figure
    title: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """The numbers (no maps), JSON-ready."""
        return {"title": self.title, "modalities": list(self.modalities),
                "conservation_error": self.conservation_error, "shares": self.shares, "cam_layer": self.cam_layer,
                "regions": [{"region": r.region, "cells": r.cells, "value": r.value, "scores": r.scores,
                             "shares": r.shares, "seen_by": list(r.seen_by) if r.seen_by is not None else None,
                             "top": r.top, "correct": r.correct} for r in self.regions],
                **self.extra}


def flat_map(t: torch.Tensor) -> torch.Tensor:
    """One sample's tensor as a 2-D map: leading (channel) dimensions summed."""
    t = t.detach()
    return t.reshape(-1, *t.shape[-2:]).sum(0) if t.dim() > 2 else t


def explain(model: ModelSpec | Any, batch: Any, *, sample: int = 0, rules: str = "paper", level: str | None = None,
            cam_layer: str | None = None, regions: torch.Tensor | None = None,
            seen_by: Sequence[Sequence[str]] | None = None, positive: float = 0.0) -> Explanation:
    """Explain sample ``sample`` of ``batch`` (module docstring).

    Args:
        rules: the LMD rules preset.
        cam_layer: a module path for per-modality Seg-Grad-CAM of the predicted positives (``None``: no CAM).
        regions: boxes / masks of this sample (:func:`~.regions.attribute_regions`).
        seen_by: per region, the sensors that saw it.
        positive: the threshold on the studied output above which a cell counts as predicted positive (0 for a
            logit map).
    """
    spec = as_spec(model)
    subject = spec.subject(level)
    x = subject.prepare(batch)
    d = subject.decompose(x, rules=rules)
    out = d.output[sample]
    comps = {n: d.components[n][sample] for n in d.names}
    pos = out > positive
    shares = {"all": modality_shares(comps), "positive": modality_shares(comps, pos)}
    cams: dict[str, torch.Tensor] = {}
    if cam_layer is not None:
        roi = (d.output > positive) if pos.any() else None
        cams = {k: v[sample] for k, v in seg_grad_cam(spec, batch, cam_layer, roi, rules=rules).items()}
    rows: list[RegionAttribution] = []
    if regions is not None and len(regions):
        rows = score_regions({m: comps[m][None] for m in subject.modalities}, out[None], regions, grid=spec.grid,
                             seen_by=None if seen_by is None else [list(seen_by)])
    return Explanation(subject.modalities, flat_map(out), {n: flat_map(c) for n, c in comps.items()},
                       d.conservation_error().relative, shares, {k: flat_map(v) for k, v in cams.items()}, cam_layer,
                       rows, spec.grid, regions if regions is not None and not regions.dtype == torch.bool else None,
                       None if seen_by is None else [tuple(s) for s in seen_by])


def explain_world_sample(model: ModelSpec | Any, sample: Sample, *, rules: str = "paper", cam_layer: str | None = None,
                         visibility: Visibility | None = None, name: str = "") -> Explanation:
    """:func:`explain` for a built-in-world (or nuScenes) :class:`Sample`: every box in the grid is a region,
    ``seen_by`` from the visibility truth where the sample has it; the ground truth and camera images go with it
    for the figure."""
    spec = as_spec(model)
    visibility = visibility or Visibility()
    batch = spec.collate([sample])
    spec.ensure_checked(batch)
    mods = spec.modalities
    boxes = sample.boxes
    truth = sample.visibility
    seen = (visibility.sensors(truth, mods) if truth and boxes.shape[0]
            else torch.zeros(boxes.shape[0], len(mods), dtype=torch.bool))
    seen_by = [tuple(m for j, m in enumerate(mods) if seen[i, j]) for i in range(boxes.shape[0])]
    e = explain(spec, batch, rules=rules, cam_layer=cam_layer, regions=boxes if boxes.shape[0] else None,
                seen_by=seen_by if boxes.shape[0] else None)
    inside = box_masks(boxes, sample.grid).flatten(1).any(1) if boxes.shape[0] else torch.zeros(0, dtype=torch.bool)
    single = dict(single_sensor_objects(sample, mods, visibility)) if truth else {}
    tags = sample.meta.get("tags", [])
    e.images, e.target, e.boxes, e.seen_by = sample.images, sample.bev_seg, boxes, seen_by
    if sample.images is not None and sample.images.shape[0] == len(CAMERA_NAMES):
        e.image_titles = [n.replace("CAM_", "").replace("_", " ").lower() for n in CAMERA_NAMES]
    e.title = f"{name} [{', '.join(tags)}] -- LMD ({rules}); outline colour = sensor that saw the vehicle"
    e.extra = {"sample": name, "tags": list(tags), "boxes_in_grid": int(inside.sum()),
               "single_sensor": {str(i): s for i, s in single.items()},
               "labels": [int(v) for v in sample.box_labels]}
    return e
