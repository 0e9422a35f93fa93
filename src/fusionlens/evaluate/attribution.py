"""Ground-truth attribution: does a method credit the sensor that actually saw the object?

The built-in world records, per object and sensor, what each sensor received (``Sample.visibility``: camera pixels
per camera, LiDAR and radar points). An object that exactly one of the model's sensors could see (a blacked-out
camera, out of radar field, LiDAR beam loss) can only have been found through that sensor, so a faithful modality
attribution must give it the largest share. For every such vehicle we sum each modality's component of the seg logit
over the object's BEV cells (``S_m``), report the signed share ``S_m / sum_m' |S_m'|``, and count the object as
attributed correctly when ``argmax_m S_m`` is the sensor that saw it. Objects the fused model did not detect
(mean probability over their cells <= 0.5) are reported separately: their attribution explains a miss.

A component can carry a large map that is the same in every scene (on the built-in world the camera's lifted BEV
features are ~95 % one fixed map: ``benchmarks/lmd_constancy.py``); its sum over an object's cells then says where
the object is more than what the sensor saw there. ``reference`` maps (:func:`mean_component_maps`: each
component's mean over a set of scenes) make the comparison a *contrast*: ``S_m - R_m`` summed over the same cells,
the evidence the scene added to each component at the object. The plain sums stay the default (the issue's
definition); the contrast is reported beside them.

With two modalities, naive zero-out, exact Shapley and feature ablation rank the modalities identically -- the
difference of their two values is ``F(x_1, 0) - F(0, x_2)`` in all three -- so their right-sensor fractions
coincide and only the shares differ.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from fusionlens.data.labels import vehicle_mask
from fusionlens.data.sample import Sample
from fusionlens.evaluate.regions import attribute_regions, box_masks, signed_shares
from fusionlens.evaluate.separation import Method
from fusionlens.spec import as_spec
from fusionlens.train.distributed import DistInfo, all_gather_objects


@dataclass(frozen=True)
class Visibility:
    """Thresholds for "sensor could see the object": at least this many camera pixels (all cameras) / points."""

    min_camera_pixels: int = 1
    min_points: int = 1

    def sensors(self, vis: dict[str, torch.Tensor], modalities: Sequence[str]) -> torch.Tensor:
        """``(Nb, M)`` bool: which of ``modalities`` saw each object."""
        seen = {"camera": lambda: vis["camera_pixels"].sum(-1) >= self.min_camera_pixels,
                "radar": lambda: vis["radar_points"] >= self.min_points,
                "lidar": lambda: vis["lidar_points"] >= self.min_points}
        missing = [k for k in ("camera_pixels", "radar_points", "lidar_points") if k not in vis]
        if missing:
            raise ValueError(f"sample has no visibility truth {missing} (ground-truth attribution needs the "
                             "built-in world)")
        return torch.stack([seen[m]() for m in modalities], dim=1)


def single_sensor_objects(sample: Sample, modalities: Sequence[str],
                          visibility: Visibility = Visibility()) -> list[tuple[int, str]]:
    """``(box index, sensor)`` of the vehicles that exactly one of ``modalities`` could see."""
    if sample.boxes.shape[0] == 0:
        return []
    seen = visibility.sensors(sample.visibility, modalities)
    vehicles = vehicle_mask(sample.box_labels)
    return [(i, modalities[int(seen[i].nonzero()[0])]) for i in range(seen.shape[0])
            if vehicles[i] and int(seen[i].sum()) == 1]


def object_cells(sample: Sample) -> torch.Tensor:
    """``(Nb, X, Y)`` bool: the BEV cells whose centre lies in each box's footprint."""
    return box_masks(sample.boxes, sample.grid)


@dataclass
class ObjectAttribution:
    sample: int
    box: int
    sensor: str
    detected: bool
    scores: dict[str, float]  # S_m: component logit summed over the object's cells

    @property
    def shares(self) -> dict[str, float]:
        return signed_shares(self.scores)

    @property
    def correct(self) -> bool:
        return max(self.scores, key=lambda m: self.scores[m]) == self.sensor


def _checked_indices(dataset: Dataset, indices: Sequence[int] | None) -> list[int]:
    n = len(dataset)  # type: ignore[arg-type]
    out = list(range(n)) if indices is None else [int(i) for i in indices]
    if any(not 0 <= i < n for i in out):
        raise ValueError(f"indices must lie in [0, {n})")
    return out


def mean_component_maps(model: Any, dataset: Dataset, method: Method, *, indices: Sequence[int] | None = None,
                        level: str | None = None) -> dict[str, torch.Tensor]:
    """Each component's map averaged over the scenes ``indices`` (the ``reference`` of a contrast attribution);
    ``model`` is a :class:`~fusionlens.spec.ModelSpec` or a model that describes itself."""
    spec = as_spec(model)
    subject = spec.subject(level)
    indices = _checked_indices(dataset, indices)
    if not indices:
        raise ValueError("mean_component_maps needs at least one scene")
    total: dict[str, torch.Tensor] = {}
    for idx in indices:
        maps, _ = method.clean(subject, subject.prepare(spec.batch(dataset, [idx])))
        for m in subject.modalities:
            total[m] = total.get(m, 0) + maps[m].detach().double()
    return {m: (t / len(indices)).to(torch.float32) for m, t in total.items()}


def attribute_objects(model: Any, dataset: Dataset, method: Method, *, indices: Sequence[int] | None = None,
                      level: str | None = None, visibility: Visibility = Visibility(),
                      reference: dict[str, torch.Tensor] | None = None,
                      info: DistInfo | None = None, progress: bool = True) -> list[ObjectAttribution]:
    """Attributions of every single-sensor vehicle in ``dataset`` (a dataset of :class:`Sample` with visibility
    truth; sharded over ranks under torchrun) through :func:`~.regions.attribute_regions`, each object's cells as
    its region; with ``reference`` maps (:func:`mean_component_maps`) the scores are contrasts ``sum(S_m - R_m)``.
    An object counts as detected when the probability (sigmoid of the studied logit) averages above 0.5 over its
    cells."""
    spec = as_spec(model)
    indices = _checked_indices(dataset, indices)
    if indices:
        spec.ensure_checked(spec.batch(dataset, [indices[0]]))  # a bad description fails before any work
    modalities = spec.subject(level).modalities
    info = info or DistInfo()
    rows: list[ObjectAttribution] = []
    for idx in tqdm(indices[info.rank::info.world_size], desc=f"attribution {method.name}",
                    disable=not progress or not info.is_main, leave=False):
        sample = dataset[idx]
        objects = single_sensor_objects(sample, modalities, visibility)
        if not objects:
            continue
        cells = object_cells(sample)[[box for box, _ in objects]]
        found = attribute_regions(spec, spec.collate([sample]), [cells], method=method, level=level,
                                  seen_by=[[[sensor] for _, sensor in objects]], reference=reference,
                                  activation=torch.sigmoid)
        for row in found:
            box, sensor = objects[row.region]
            rows.append(ObjectAttribution(idx, box, sensor, row.value > 0.5, row.scores))
    gathered = [r for part in all_gather_objects(info, rows) for r in part]
    order = {i: k for k, i in enumerate(indices)}
    return sorted(gathered, key=lambda r: (order[r.sample], r.box))


def summarise_attribution(rows: Sequence[ObjectAttribution], modalities: Sequence[str]) -> dict[str, Any]:
    """Per sensor and overall: objects, fraction attributed to the right sensor, mean share of that sensor --
    for all single-sensor objects and for those the fused model detected."""
    out: dict[str, Any] = {}
    for subset, keep in (("all", lambda r: True), ("detected", lambda r: r.detected)):
        part = [r for r in rows if keep(r)]
        groups = {"overall": part, **{m: [r for r in part if r.sensor == m] for m in modalities}}
        out[subset] = {
            g: {"objects": len(rs),
                "correct": (sum(r.correct for r in rs) / len(rs)) if rs else math.nan,
                "share": (sum(r.shares[r.sensor] for r in rs) / len(rs)) if rs else math.nan}
            for g, rs in groups.items()}
    return out
