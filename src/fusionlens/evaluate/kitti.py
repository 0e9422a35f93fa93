"""KITTI 3-D object evaluation: AP-2D, AP-BEV and AP-3D per class and difficulty by the benchmark's rules.

The rules of KITTI's devkit (``evaluate_object.cpp``), written once here:

* **Difficulty** (easy / moderate / hard): a ground-truth object counts when its 2-D box is taller than
  40 / 25 / 25 px, its occlusion level is at most 0 / 1 / 2 and its truncation at most 0.15 / 0.30 / 0.50;
  otherwise it is *ignored*: a detection matched to it is neither a true nor a false positive. Detections
  shorter than the minimum height are ignored the same way.
* **Neighbouring classes** (Van for Car, Person_sitting for Pedestrian) are ignored rather than counted false;
  detections inside a DontCare region (more than the class's overlap threshold of the detection's 2-D box lies
  in it) are dropped.
* **Matching**: per frame, each ground truth takes the unassigned detection of highest overlap above the class's
  threshold (IoU 0.7 for Car, 0.5 for Pedestrian and Cyclist; a non-ignored detection before an ignored one).
* **AP**: score thresholds are picked from the true positives' scores so that recall steps through
  ``recall_points`` + 1 evenly spaced values; precision is made monotone (max over higher recalls) and averaged
  over the 40 points 1/40 .. 1 (``recall_points=40``, the benchmark's metric since 2019) or the 11 points
  0, 0.1, .. 1 (``recall_points=11``, the original one). As in the devkit, the k-th precision belongs to the
  k-th threshold, one per true positive at most, so a class with fewer than 41 counted objects cannot reach
  100 (a perfect detector of 4 cars scores 3 / 40); the benchmark's splits have thousands.

Overlaps: 2-D IoU of image boxes; BEV IoU of the rotated footprints in the camera's x-z plane, through the exact
:func:`fusionlens.models.rotated_iou.rotated_iou_bev`; 3-D IoU = BEV intersection x height overlap over the union
of the volumes. ``min_height_scale`` scales the pixel heights for images smaller than KITTI's 375 px rows (the
world's export is 128 px tall: scale 128 / 375), since the thresholds are sizes in KITTI's images.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from fusionlens.data.kitti import KittiObject
from fusionlens.models.rotated_iou import rotated_iou_bev

DIFFICULTIES: tuple[str, ...] = ("easy", "moderate", "hard")
MIN_HEIGHT: tuple[float, ...] = (40.0, 25.0, 25.0)
MAX_OCCLUSION: tuple[int, ...] = (0, 1, 2)
MAX_TRUNCATION: tuple[float, ...] = (0.15, 0.30, 0.50)
MIN_OVERLAP: dict[str, float] = {"Car": 0.7, "Pedestrian": 0.5, "Cyclist": 0.5}
NEIGHBOURS: dict[str, str] = {"Car": "Van", "Pedestrian": "Person_sitting"}
METRICS: tuple[str, ...] = ("bbox", "bev", "3d")
KITTI_IMAGE_HEIGHT = 375.0


def _bboxes(objects: Sequence[KittiObject]) -> np.ndarray:
    return np.array([o.bbox for o in objects], dtype=np.float64).reshape(-1, 4)


def _bev_boxes(objects: Sequence[KittiObject]) -> torch.Tensor:
    """Footprints in the camera's x-z plane as BOX_FIELDS rows: the heading (cos ry, -sin ry) has angle -ry."""
    rows = [(o.location[0], o.location[2], 0.0, o.dimensions[1], o.dimensions[2], o.dimensions[0], -o.rotation_y)
            for o in objects]
    return torch.tensor(rows, dtype=torch.float64).reshape(-1, 7)


def box_overlap_2d(a: np.ndarray, b: np.ndarray, over: str = "union") -> np.ndarray:
    """``(N, M)`` overlap of image boxes (left, top, right, bottom): IoU, or intersection over ``a``'s area."""
    iw = np.clip(np.minimum(a[:, None, 2], b[None, :, 2]) - np.maximum(a[:, None, 0], b[None, :, 0]), 0, None)
    ih = np.clip(np.minimum(a[:, None, 3], b[None, :, 3]) - np.maximum(a[:, None, 1], b[None, :, 1]), 0, None)
    inter = iw * ih
    area_a = ((a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1]))[:, None]
    area_b = ((b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1]))[None, :]
    denom = area_a + area_b - inter if over == "union" else np.broadcast_to(area_a, inter.shape)
    return np.where(denom > 0, inter / np.where(denom > 0, denom, 1.0), 0.0)


def overlaps(dt: Sequence[KittiObject], gt: Sequence[KittiObject], metric: str) -> np.ndarray:
    """``(len(dt), len(gt))`` overlaps of detections with ground truths under ``metric`` (bbox, bev or 3d)."""
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    if not dt or not gt:
        return np.zeros((len(dt), len(gt)))
    if metric == "bbox":
        return box_overlap_2d(_bboxes(dt), _bboxes(gt))
    a, b = _bev_boxes(dt), _bev_boxes(gt)
    iou = rotated_iou_bev(a, b).numpy()
    if metric == "bev":
        return iou
    area_a, area_b = (a[:, 3] * a[:, 4]).numpy(), (b[:, 3] * b[:, 4]).numpy()
    inter_bev = iou * (area_a[:, None] + area_b[None, :]) / (1.0 + iou)  # IoU = I / (A + B - I)
    y_a, y_b = np.array([o.location[1] for o in dt]), np.array([o.location[1] for o in gt])  # bottoms (y down)
    h_a, h_b = np.array([o.dimensions[0] for o in dt]), np.array([o.dimensions[0] for o in gt])
    overlap_h = np.clip(np.minimum(y_a[:, None], y_b[None, :])
                        - np.maximum(y_a[:, None] - h_a[:, None], y_b[None, :] - h_b[None, :]), 0, None)
    inter = inter_bev * overlap_h
    union = (area_a * h_a)[:, None] + (area_b * h_b)[None, :] - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1.0), 0.0)


@dataclass
class _Frame:
    """One frame's objects for one (class, difficulty): ignore flags as in the devkit (0 counts, 1 ignored,
    -1 another class) and the overlaps of every metric."""

    gt_flag: np.ndarray
    dt_flag: np.ndarray
    scores: np.ndarray
    dc_boxes: np.ndarray
    dt_boxes: np.ndarray
    overlap: np.ndarray  # (dt, gt)


def _flags(gt: Sequence[KittiObject], dt: Sequence[KittiObject], cls: str, difficulty: int,
           height_scale: float) -> tuple[np.ndarray, np.ndarray]:
    min_height = MIN_HEIGHT[difficulty] * height_scale
    gt_flag = np.full(len(gt), -1)
    for i, o in enumerate(gt):
        relevant = 1 if o.type == cls else 0 if NEIGHBOURS.get(cls) == o.type else -1
        hard = (o.occluded > MAX_OCCLUSION[difficulty] or o.truncated > MAX_TRUNCATION[difficulty]
                or o.bbox[3] - o.bbox[1] <= min_height)
        if relevant == 1 and not hard:
            gt_flag[i] = 0
        elif relevant == 0 or relevant == 1:
            gt_flag[i] = 1
    dt_flag = np.array([1 if abs(o.bbox[3] - o.bbox[1]) < min_height else 0 if o.type == cls else -1 for o in dt],
                       dtype=np.int64)
    return gt_flag, dt_flag


def _statistics(f: _Frame, min_overlap: float, threshold: float, compute_fp: bool) -> tuple[int, int, int, list]:
    """(tp, fp, fn, scores of the true positives) of one frame at one score threshold (the devkit's
    ``computeStatistics``)."""
    n_dt = len(f.dt_flag)
    below = f.scores < threshold
    assigned = np.zeros(n_dt, dtype=bool)
    tp = fp = fn = 0
    tp_scores = []
    for i, g in enumerate(f.gt_flag):
        if g == -1:
            continue
        best, best_val, best_overlap, took_ignored = -1, -math.inf, 0.0, False
        for j in range(n_dt):
            if f.dt_flag[j] == -1 or assigned[j] or below[j]:
                continue
            ov = f.overlap[j, i]
            if ov <= min_overlap:
                continue
            if not compute_fp:
                if f.scores[j] > best_val:
                    best, best_val = j, f.scores[j]
            elif (ov > best_overlap or took_ignored) and f.dt_flag[j] == 0:
                best, best_overlap, best_val, took_ignored = j, ov, 1.0, False
            elif best_val == -math.inf and f.dt_flag[j] == 1:
                best, best_val, took_ignored = j, 1.0, True
        if best == -1:
            fn += int(g == 0)
        elif g == 1 or f.dt_flag[best] == 1:
            assigned[best] = True
        else:
            tp += 1
            tp_scores.append(float(f.scores[best]))
            assigned[best] = True
    if compute_fp:
        free = ~(assigned | (f.dt_flag != 0) | below)
        fp = int(free.sum())
        if len(f.dc_boxes) and free.any():
            in_dontcare = (box_overlap_2d(f.dt_boxes, f.dc_boxes, over="a") > min_overlap).any(1)
            fp -= int((free & in_dontcare).sum())
    return tp, fp, fn, tp_scores


def _thresholds(scores: list[float], num_gt: int, points: int = 41) -> list[float]:
    """Score thresholds at which recall passes 0, 1/(points-1), ... (the devkit's ``getThresholds``)."""
    scores = sorted(scores, reverse=True)
    out, current = [], 0.0
    for i, s in enumerate(scores):
        left = (i + 1) / num_gt
        right = (i + 2) / num_gt if i < len(scores) - 1 else left
        if right - current < current - left and i < len(scores) - 1:
            continue
        out.append(s)
        current += 1.0 / (points - 1)
    return out


def average_precision(frames: Sequence[_Frame], min_overlap: float, recall_points: int = 40) -> float:
    """AP (percent) over ``frames``; NaN when no ground truth counts."""
    num_gt = int(sum((f.gt_flag == 0).sum() for f in frames))
    if num_gt == 0:
        return math.nan
    scores = [s for f in frames for s in _statistics(f, min_overlap, -math.inf, False)[3]]
    thresholds = _thresholds(scores, num_gt)[:41]
    precision = np.zeros(41)
    for k, t in enumerate(thresholds):
        tp = fp = fn = 0
        for f in frames:
            a, b, c, _ = _statistics(f, min_overlap, t, True)
            tp, fp, fn = tp + a, fp + b, fn + c
        precision[k] = tp / (tp + fp) if tp + fp else 0.0
    precision = np.maximum.accumulate(precision[::-1])[::-1]
    if recall_points == 40:
        return float(precision[1:].sum() / 40 * 100)
    if recall_points == 11:
        return float(precision[::4].sum() / 11 * 100)
    raise ValueError(f"recall_points must be 40 or 11, got {recall_points}")


@dataclass
class KittiEvaluation:
    """``ap[metric][class][difficulty]`` in percent (NaN where the split has no such object) and the number of
    counted ground truths ``num_gt[class][difficulty]``."""

    ap: dict[str, dict[str, dict[str, float]]]
    num_gt: dict[str, dict[str, int]]
    recall_points: int
    settings: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"ap": self.ap, "num_gt": self.num_gt, "recall_points": self.recall_points, **self.settings}

    def table(self) -> str:
        """Plain-text table: one row per class and metric, easy / moderate / hard columns."""
        lines = [f"{'class':<12}{'metric':<8}" + "".join(f"{d:>10}" for d in DIFFICULTIES)]
        for cls in next(iter(self.ap.values())):
            for metric, per_cls in self.ap.items():
                lines.append(f"{cls:<12}{metric:<8}" + "".join(f"{per_cls[cls][d]:>10.2f}" for d in DIFFICULTIES))
        return "\n".join(lines)


def evaluate_kitti(gt: Sequence[Sequence[KittiObject]], dt: Sequence[Sequence[KittiObject]],
                   classes: Sequence[str] = ("Car", "Pedestrian", "Cyclist"), metrics: Sequence[str] = METRICS,
                   recall_points: int = 40, min_height_scale: float = 1.0,
                   min_overlap: dict[str, float] | None = None) -> KittiEvaluation:
    """Evaluate detections ``dt`` (per frame, :class:`KittiObject` with ``score``) against labels ``gt``."""
    if len(gt) != len(dt):
        raise ValueError(f"evaluate_kitti: {len(gt)} frames of labels but {len(dt)} of detections")
    unknown = [m for m in metrics if m not in METRICS]
    if unknown:
        raise ValueError(f"evaluate_kitti: unknown metrics {unknown}; choose from {list(METRICS)}")
    if recall_points not in (11, 40):
        raise ValueError(f"recall_points must be 40 or 11, got {recall_points}")
    thresholds = {**MIN_OVERLAP, **(min_overlap or {})}
    missing = [c for c in classes if c not in thresholds]
    if missing:
        raise ValueError(f"evaluate_kitti: no overlap threshold for {missing}; pass min_overlap={{name: iou}}")
    for k, frame in enumerate(dt):
        if any(o.score is None for o in frame):
            raise ValueError(f"evaluate_kitti: frame {k} has a detection without a score")
    cache = {m: [overlaps(d, g, m) for g, d in zip(gt, dt)] for m in metrics}
    ap: dict[str, dict[str, dict[str, float]]] = {m: {c: {} for c in classes} for m in metrics}
    num_gt: dict[str, dict[str, int]] = {c: {} for c in classes}
    for cls in classes:
        for level, name in enumerate(DIFFICULTIES):
            flags = [_flags(g, d, cls, level, min_height_scale) for g, d in zip(gt, dt)]
            num_gt[cls][name] = int(sum((gf == 0).sum() for gf, _ in flags))
            for m in metrics:
                frames = [
                    _Frame(gf, df, np.array([o.score for o in d], dtype=np.float64),
                           _bboxes([o for o in g if o.type == "DontCare"]), _bboxes(d), ov)
                    for (gf, df), g, d, ov in zip(flags, gt, dt, cache[m])]
                ap[m][cls][name] = average_precision(frames, thresholds[cls], recall_points)
    return KittiEvaluation(ap=ap, num_gt=num_gt, recall_points=recall_points,
                           settings={"min_height_scale": min_height_scale, "min_overlap": thresholds})
