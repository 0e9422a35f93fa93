"""What the audit knows about each sample besides the model's inputs: :class:`SampleLabels`.

Every field is optional; the audit leaves out exactly the tables that need a missing one:

* ``boxes`` -- ground-truth objects, ``(N, 5)`` ``(x, y, w, l, yaw)`` or ``(N, >=7)`` in the built-in ``BOX_FIELDS``
  order, in metres on the spec's grid (``ModelSpec(grid=...)``), or bool masks ``(N, H, W)`` over the studied
  output's last two dimensions. Without them: no object shares, classes, lost/found or right-sensor tables.
* ``classes`` -- one class name per object (the per-class table).
* ``tags`` -- condition / fault names of the sample (``["night", "rain"]``; the per-condition tables).
* ``seen_by`` -- per object, the sensors (modality names) that saw it (the right-sensor table; objects that
  exactly one modality saw are scored).
* ``target`` / ``valid`` -- a ground-truth ``(H, W)`` map of the studied output (1 = positive) and where it counts:
  the IoU, the fault IoU change and the monitor's error labels.

fusionlens's own :class:`~fusionlens.data.sample.Sample` (built-in world, nuScenes) carries all of them
(:func:`sample_labels`). A user's dataset gives them through ``labels=``: a function ``item -> SampleLabels`` (or a
dict with the same keys), called on each dataset item before it is collated.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

import torch

from fusionlens.data.labels import vehicle_mask
from fusionlens.data.sample import CLASSES, Sample
from fusionlens.evaluate.attribution import Visibility
from fusionlens.train.metrics import condition_tags


@dataclass
class SampleLabels:
    """Per-sample ground truth and metadata the audit can use (module docstring); all optional."""

    boxes: torch.Tensor | None = None
    classes: Sequence[str] | None = None
    tags: Sequence[str] = ()
    seen_by: Sequence[Sequence[str]] | None = None
    target: torch.Tensor | None = None
    valid: torch.Tensor | None = None

    def check(self, shape: tuple[int, int], where: str) -> None:
        """Refuse inconsistent labels, naming the sample (``where``) and the field."""
        n = None if self.boxes is None else int(self.boxes.shape[0])
        if self.boxes is not None:
            if not isinstance(self.boxes, torch.Tensor):
                raise ValueError(f"{where}: labels.boxes must be a tensor, got {type(self.boxes).__name__}")
            if self.boxes.dtype == torch.bool:
                if self.boxes.ndim != 3 or tuple(self.boxes.shape[1:]) != shape:
                    raise ValueError(f"{where}: labels.boxes as masks must be (N, {shape[0]}, {shape[1]}), got "
                                     f"{tuple(self.boxes.shape)}")
            elif self.boxes.ndim != 2 or not (self.boxes.shape[1] == 5 or self.boxes.shape[1] >= 7):
                raise ValueError(f"{where}: labels.boxes must be (N, 5) = (x, y, w, l, yaw), (N, >=7) or bool "
                                 f"masks (N, H, W), got shape {tuple(self.boxes.shape)}")
        for name in ("classes", "seen_by"):
            value = getattr(self, name)
            if value is not None and (n is None or len(value) != n):
                raise ValueError(f"{where}: labels.{name} has {len(value)} entries but there are "
                                 f"{'no boxes' if n is None else f'{n} boxes'}")
        for name in ("target", "valid"):
            value = getattr(self, name)
            if value is not None and tuple(value.shape[-2:]) != shape:
                raise ValueError(f"{where}: labels.{name} must cover the output's last two dimensions {shape}, "
                                 f"got shape {tuple(value.shape)}")
        if isinstance(self.tags, str):
            raise ValueError(f"{where}: labels.tags must be a list of names, got the string {self.tags!r}")


DEFAULT_VISIBILITY = Visibility()
LabelsFn = Callable[[Any], "SampleLabels | Mapping[str, Any] | None"]


def sample_labels(sample: Sample, modalities: Sequence[str],
                  visibility: Visibility = DEFAULT_VISIBILITY) -> SampleLabels:
    """The labels of a built-in-world or nuScenes :class:`Sample`: its vehicles (the studied map is vehicle
    occupancy) with their class names, condition / fault tags, the vehicle map as target (with its valid mask) and,
    where the sample has the world's visibility truth, which of ``modalities`` saw each vehicle."""
    keep = vehicle_mask(sample.box_labels)
    truth = sample.visibility or {}
    seen_by = None
    if all(k in truth for k in ("camera_pixels", "radar_points", "lidar_points")) and bool(keep.any()):
        seen = visibility.sensors({k: v[keep] for k, v in truth.items()}, modalities)
        seen_by = [tuple(m for j, m in enumerate(modalities) if seen[i, j]) for i in range(seen.shape[0])]
    return SampleLabels(boxes=sample.boxes[keep], classes=[CLASSES[int(c)] for c in sample.box_labels[keep]],
                        tags=condition_tags(sample.meta), seen_by=seen_by, target=sample.bev_seg,
                        valid=sample.bev_valid)


def resolve_labels(item: Any, labels: LabelsFn | None, modalities: Sequence[str], visibility: Visibility,
                   where: str) -> SampleLabels:
    """The labels of one dataset item: ``labels(item)`` when given, a :class:`Sample`'s own, else none."""
    if labels is None:
        return sample_labels(item, modalities, visibility) if isinstance(item, Sample) else SampleLabels()
    got = labels(item)
    if got is None:
        return SampleLabels()
    if isinstance(got, SampleLabels):
        return got
    if isinstance(got, Mapping):
        known = {f.name for f in fields(SampleLabels)}
        unknown = sorted(set(got) - known)
        if unknown:
            raise ValueError(f"{where}: labels() returned unknown keys {unknown} (known: {sorted(known)})")
        return SampleLabels(**got)
    raise ValueError(f"{where}: labels() must return SampleLabels, a dict or None, got {type(got).__name__}")
