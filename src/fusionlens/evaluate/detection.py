"""nuScenes 3-D detection metrics (mAP, ATE/ASE/AOE/AVE/AAE, NDS) on in-memory boxes.

Matching and scoring are nuscenes-devkit's own (``nuscenes.eval.detection.algo.accumulate``, ``calc_ap``,
``calc_tp`` and ``DetectionMetrics``), so the built-in world and real nuScenes are scored by the code of the
official leaderboard. This module adds the part of ``DetectionEval`` that needs a ``NuScenes`` object:

* boxes ``(N, 9)`` in :data:`~fusionlens.data.sample.BOX_FIELDS` (ego frame) become ``DetectionBox`` objects,
  the yaw a quaternion about +z; our boxes are in the ego frame, so ``ego_translation`` is the centre itself;
* the class-range filter (``class_range``: boxes farther than 50 m for vehicles, 40 m for pedestrians are
  dropped, ground truth and predictions alike) and the "no points inside" filter for ground truth when point
  counts are given; the bike-rack filter is skipped (our classes have no cycles);
* attributes: our boxes carry none, so by default ground truth and predictions both get the motion attribute
  implied by their velocity (``vehicle.moving`` / ``vehicle.parked``, ``pedestrian.moving`` /
  ``pedestrian.standing`` at speed > ``moving_speed`` m/s); AAE then measures motion-state errors. With
  ``attributes="none"`` no box has an attribute and AAE is 1 for every class, as the devkit rules for
  classes without attributes, which caps NDS at 0.9.

Definitions (nuScenes paper, Caesar et al. 2020, Sec. 4): AP is the normalised area under the precision/recall
curve above 10 % recall and precision, matched by BEV centre distance d in {0.5, 1, 2, 4} m; mAP averages it
over classes and thresholds; TP errors are averaged over the matches at d = 2 m;
``NDS = (5 mAP + sum_k (1 - min(1, err_k))) / 10`` over the five TP errors k.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any, Literal

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from fusionlens.data.sample import BOX_FIELDS, CLASSES, VEHICLE_CLASSES

TP_METRIC_NAMES: dict[str, str] = {
    "trans_err": "mATE", "scale_err": "mASE", "orient_err": "mAOE", "vel_err": "mAVE", "attr_err": "mAAE",
}
_MOVING = {"pedestrian": ("pedestrian.moving", "pedestrian.standing")}
_MOVING.update({name: ("vehicle.moving", "vehicle.parked") for name in VEHICLE_CLASSES})


def _devkit() -> SimpleNamespace:
    try:
        from nuscenes.eval.common.data_classes import EvalBoxes
        from nuscenes.eval.detection import algo
        from nuscenes.eval.detection.config import config_factory
        from nuscenes.eval.detection.constants import DETECTION_NAMES
        from nuscenes.eval.detection.data_classes import DetectionBox, DetectionConfig, DetectionMetrics
    except ImportError as err:  # pragma: no cover - depends on the optional extra
        raise ImportError(
            "nuScenes detection metrics need nuscenes-devkit: pip install 'fusionlens[nuscenes]'"
        ) from err
    return SimpleNamespace(
        EvalBoxes=EvalBoxes, accumulate=algo.accumulate, calc_ap=algo.calc_ap, calc_tp=algo.calc_tp,
        config_factory=config_factory, DETECTION_NAMES=DETECTION_NAMES, DetectionBox=DetectionBox,
        DetectionConfig=DetectionConfig, DetectionMetrics=DetectionMetrics,
    )


def yaw_to_quaternion(yaw: float) -> tuple[float, float, float, float]:
    """Rotation about +z by ``yaw`` radians as a unit quaternion ``(w, x, y, z)`` (pyquaternion's order)."""
    return (math.cos(yaw / 2.0), 0.0, 0.0, math.sin(yaw / 2.0))


def motion_attribute(class_name: str, velocity: Sequence[float], moving_speed: float = 0.2) -> str:
    """The nuScenes attribute implied by a box's velocity, or ``""`` for classes without motion attributes."""
    if class_name not in _MOVING:
        return ""
    moving, still = _MOVING[class_name]
    speed = math.hypot(float(velocity[0]), float(velocity[1]))
    return moving if speed > moving_speed else still


@dataclass
class DetectionReport:
    """Scores of one evaluation. ``class_aps`` is each class's AP averaged over the distance thresholds."""

    mean_ap: float
    nds: float
    class_aps: dict[str, float]
    label_aps: dict[str, dict[float, float]]
    tp_errors: dict[str, float]
    label_tp_errors: dict[str, dict[str, float]]
    tp_scores: dict[str, float]
    num_gt: dict[str, int]
    num_pred: dict[str, int]
    config: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly summary: ``mAP``, ``NDS``, the TP errors under their nuScenes names, per class."""
        out: dict[str, Any] = {"mAP": self.mean_ap, "NDS": self.nds}
        out.update({TP_METRIC_NAMES[k]: v for k, v in self.tp_errors.items()})
        out.update(class_aps=self.class_aps, label_aps={c: {str(d): ap for d, ap in v.items()}
                                                        for c, v in self.label_aps.items()},
                   label_tp_errors=self.label_tp_errors, num_gt=self.num_gt, num_pred=self.num_pred,
                   config=self.config)
        return out

    def format_table(self) -> str:
        """A Markdown table: one row per class (AP and TP errors), then the means and NDS."""
        names = list(TP_METRIC_NAMES)
        head = "| class | GT | AP | " + " | ".join(TP_METRIC_NAMES[n][1:] for n in names) + " |"
        rows = [head, "|" + "---|" * (3 + len(names))]
        for cls, ap in self.class_aps.items():
            errs = " | ".join(f"{self.label_tp_errors[cls][n]:.3f}" for n in names)
            rows.append(f"| {cls} | {self.num_gt[cls]} | {ap:.3f} | {errs} |")
        errs = " | ".join(f"{self.tp_errors[n]:.3f}" for n in names)
        rows.append(f"| **mean** | {sum(self.num_gt.values())} | **{self.mean_ap:.3f}** | {errs} |")
        rows.append(f"\nNDS = **{self.nds:.3f}**")
        return "\n".join(rows)


class DetectionEvaluator:
    """Accumulates per-sample predictions and ground truth, then scores them with nuscenes-devkit.

    ``add`` takes tensors or arrays: boxes ``(N, 9)`` in BOX_FIELDS, integer labels into ``classes`` and, for
    predictions, scores in (0, 1]. ``compute`` returns a :class:`DetectionReport`.
    """

    def __init__(
        self,
        classes: Sequence[str] = CLASSES,
        *,
        config_name: str = "detection_cvpr_2019",
        class_range: dict[str, float] | None = None,
        attributes: Literal["velocity", "none"] = "velocity",
        moving_speed: float = 0.2,
    ) -> None:
        self._dk = _devkit()
        unknown = [c for c in classes if c not in self._dk.DETECTION_NAMES]
        if not classes or unknown or len(set(classes)) != len(classes):
            raise ValueError(f"classes must be distinct nuScenes detection names, got {list(classes)!r}")
        if attributes not in ("velocity", "none"):
            raise ValueError(f"attributes must be 'velocity' or 'none', got {attributes!r}")
        if not moving_speed >= 0:
            raise ValueError(f"moving_speed must be >= 0, got {moving_speed}")
        self.classes = tuple(classes)
        self.cfg = self._dk.config_factory(config_name)
        if class_range is not None:
            bad = {k: v for k, v in class_range.items() if k not in self.classes or not v > 0}
            if bad:
                raise ValueError(f"class_range must map evaluated classes to positive metres, got {bad!r}")
            self.cfg.class_range = {**self.cfg.class_range, **class_range}
        # The devkit averages TP errors over cfg.class_names; restrict it to the classes we score, otherwise
        # the classes we never add would count as zero error.
        self.cfg.class_names = list(self.classes)
        self.attributes = attributes
        self.moving_speed = float(moving_speed)
        self.gt = self._dk.EvalBoxes()
        self.pred = self._dk.EvalBoxes()
        self._count = 0

    def __len__(self) -> int:
        return self._count

    def add(
        self,
        pred_boxes: torch.Tensor | np.ndarray,
        pred_scores: torch.Tensor | np.ndarray,
        pred_labels: torch.Tensor | np.ndarray,
        gt_boxes: torch.Tensor | np.ndarray,
        gt_labels: torch.Tensor | np.ndarray,
        *,
        token: str | None = None,
        gt_num_points: torch.Tensor | np.ndarray | None = None,
        gt_velocity_known: torch.Tensor | np.ndarray | None = None,
    ) -> None:
        """Add one sample. Ground-truth boxes with ``gt_num_points == 0`` (LiDAR + radar points inside, as
        nuScenes counts them) are ignored; those with ``gt_velocity_known`` false get a NaN velocity and no
        attribute, which the devkit leaves out of AVE and AAE."""
        token = f"sample-{self._count}" if token is None else str(token)
        if token in self.gt.boxes:
            raise ValueError(f"token {token!r} was already added")
        pb, pl = _boxes(pred_boxes, pred_labels, "pred", len(self.classes))
        gb, gl = _boxes(gt_boxes, gt_labels, "gt", len(self.classes))
        ps = _as_numpy(pred_scores, "pred_scores").reshape(-1)
        if len(ps) != len(pb):
            raise ValueError(f"pred_scores has {len(ps)} entries for {len(pb)} boxes")
        if len(pb) and not (np.all(ps > 0) and np.all(ps <= 1)):
            raise ValueError("pred_scores must lie in (0, 1] (the devkit treats score 0 as 'no detection')")
        if len(pb) > self.cfg.max_boxes_per_sample:
            raise ValueError(f"{len(pb)} predictions in {token!r}, more than the nuScenes limit of "
                             f"max_boxes_per_sample={self.cfg.max_boxes_per_sample}")
        keep_gt = np.ones(len(gb), dtype=bool)
        if gt_num_points is not None:
            npts = _as_numpy(gt_num_points, "gt_num_points").reshape(-1)
            if len(npts) != len(gb):
                raise ValueError(f"gt_num_points has {len(npts)} entries for {len(gb)} boxes")
            keep_gt = npts != 0
        if gt_velocity_known is not None:
            known = _as_numpy(gt_velocity_known, "gt_velocity_known").reshape(-1).astype(bool)
            if len(known) != len(gb):
                raise ValueError(f"gt_velocity_known has {len(known)} entries for {len(gb)} boxes")
            gb[~known, 7:9] = np.nan
        gt = self._convert(token, gb[keep_gt], gl[keep_gt], None)
        self.gt.add_boxes(token, [b for b in gt if self._in_range(b)])
        self.pred.add_boxes(token, [b for b in self._convert(token, pb, pl, ps) if self._in_range(b)])
        self._count += 1

    def _in_range(self, box: Any) -> bool:
        return box.ego_dist < self.cfg.class_range[box.detection_name]

    def _convert(
        self, token: str, boxes: np.ndarray, labels: np.ndarray, scores: np.ndarray | None
    ) -> list[Any]:
        out = []
        for i, (b, lab) in enumerate(zip(boxes, labels)):
            name = self.classes[int(lab)]
            vel = (float(b[7]), float(b[8]))
            known = math.isfinite(vel[0]) and math.isfinite(vel[1])
            attr = motion_attribute(name, vel, self.moving_speed) if self.attributes == "velocity" and known \
                else ""
            out.append(self._dk.DetectionBox(
                sample_token=token, translation=(float(b[0]), float(b[1]), float(b[2])),
                size=(float(b[3]), float(b[4]), float(b[5])), rotation=yaw_to_quaternion(float(b[6])),
                velocity=vel, ego_translation=(float(b[0]), float(b[1]), float(b[2])),
                detection_name=name, detection_score=-1.0 if scores is None else float(scores[i]),
                attribute_name=attr,
            ))
        return out

    def compute(self) -> DetectionReport:
        """Run the devkit's accumulate/calc_ap/calc_tp per class and distance, as DetectionEval.evaluate."""
        if self._count == 0:
            raise ValueError("no samples were added to the DetectionEvaluator")
        dk, cfg = self._dk, self.cfg
        metrics = dk.DetectionMetrics(cfg)
        for cls in self.classes:
            for dist in cfg.dist_ths:
                md = dk.accumulate(self.gt, self.pred, cls, cfg.dist_fcn_callable, dist)
                metrics.add_label_ap(cls, dist, dk.calc_ap(md, cfg.min_recall, cfg.min_precision))
                if dist == cfg.dist_th_tp:
                    for metric in TP_METRIC_NAMES:
                        metrics.add_label_tp(cls, metric, dk.calc_tp(md, cfg.min_recall, metric))
        summary = metrics.serialize()
        return DetectionReport(
            mean_ap=float(summary["mean_ap"]), nds=float(summary["nd_score"]),
            class_aps={c: float(summary["mean_dist_aps"][c]) for c in self.classes},
            label_aps={c: {float(d): float(v) for d, v in summary["label_aps"][c].items()}
                       for c in self.classes},
            tp_errors={k: float(v) for k, v in summary["tp_errors"].items()},
            label_tp_errors={c: {k: float(v) for k, v in summary["label_tp_errors"][c].items()}
                             for c in self.classes},
            tp_scores={k: float(v) for k, v in summary["tp_scores"].items()},
            num_gt={c: sum(b.detection_name == c for b in self.gt.all) for c in self.classes},
            num_pred={c: sum(b.detection_name == c for b in self.pred.all) for c in self.classes},
            config={**cfg.serialize(), "classes": list(self.classes), "attributes": self.attributes,
                    "moving_speed": self.moving_speed},
        )


def evaluate_detection(
    predictions: Sequence[dict[str, torch.Tensor]],
    ground_truth: Sequence[dict[str, torch.Tensor]],
    **evaluator_kwargs: Any,
) -> DetectionReport:
    """Score a list of per-sample predictions ``{"boxes", "scores", "labels"}`` against ground truth
    ``{"boxes", "labels"[, "num_points", "velocity_known"]}``; keyword arguments go to
    :class:`DetectionEvaluator`."""
    if len(predictions) != len(ground_truth):
        raise ValueError(f"{len(predictions)} predictions for {len(ground_truth)} ground-truth samples")
    ev = DetectionEvaluator(**evaluator_kwargs)
    for pred, gt in zip(predictions, ground_truth):
        ev.add(pred["boxes"], pred["scores"], pred["labels"], gt["boxes"], gt["labels"],
               gt_num_points=gt.get("num_points"), gt_velocity_known=gt.get("velocity_known"))
    return ev.compute()


# per-box point counts in a Sample's visibility dict: nuScenes' annotation fields, then the built-in world's
_POINT_COUNT_KEYS: tuple[tuple[str, ...], ...] = (("num_lidar_pts", "num_radar_pts"), ("lidar_points", "radar_points"))


def ground_truth_extras(visibility: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """nuScenes-style per-box extras from a Sample's ``visibility`` dict: ``num_points`` = LiDAR + radar points
    inside the box (nuScenes' ``num_lidar_pts`` / ``num_radar_pts``, or the world's ``lidar_points`` /
    ``radar_points``, whichever are present) and ``velocity_known``."""
    out: dict[str, torch.Tensor] = {}
    keys = next((ks for ks in _POINT_COUNT_KEYS if any(k in visibility for k in ks)), ())
    counts = [visibility[k] for k in keys if k in visibility]
    if counts:
        out["num_points"] = torch.stack([c.long() for c in counts]).sum(0)
    if "velocity_known" in visibility:
        out["velocity_known"] = visibility["velocity_known"]
    return out


@torch.no_grad()
def evaluate_detector(
    model: torch.nn.Module,
    dataset: Dataset,
    *,
    batch_size: int = 4,
    device: str | torch.device = "cpu",
    progress: bool = True,
    decode_kwargs: dict[str, Any] | None = None,
    **evaluator_kwargs: Any,
) -> DetectionReport:
    """nuScenes detection metrics of a fusion model with a CenterPoint head over ``dataset`` (Samples).

    The model runs in eval mode (restored afterwards); its head decodes boxes (``decode_kwargs`` override
    the head's decoding settings); ground truth is filtered as nuScenes does (:meth:`DetectionEvaluator.add`,
    :func:`ground_truth_extras`). Classes are the head's; other keyword arguments go to
    :class:`DetectionEvaluator`.
    """
    from fusionlens.data.collate import collate_samples
    from fusionlens.models import batch_to_inputs
    from fusionlens.models.centerpoint import find_detection_head

    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    module = getattr(model, "module", model)
    head = find_detection_head(module)
    evaluator = DetectionEvaluator(classes=head.classes, **evaluator_kwargs)
    device = torch.device(device)
    was_training = module.training
    module.eval()
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate_samples)
    try:
        for batch in tqdm(loader, desc="detect", disable=not progress, leave=False):
            moved = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
            inputs, kwargs = batch_to_inputs(module, moved)
            detections = head.decode(module(**inputs, **kwargs), **(decode_kwargs or {}))
            for det, boxes, labels, vis in zip(detections, batch["boxes"], batch["box_labels"],
                                               batch["visibility"]):
                extras = ground_truth_extras(vis)
                keep = torch.isin(labels.long(), torch.tensor([CLASSES.index(c) for c in head.classes]))
                gt_boxes, gt_labels = head.select(boxes, labels)
                evaluator.add(det["boxes"], det["scores"], det["labels"], gt_boxes, gt_labels,
                              **{f"gt_{k}": v[keep] for k, v in extras.items()})
    finally:
        module.train(was_training)
    return evaluator.compute()


def _as_numpy(x: torch.Tensor | np.ndarray, name: str) -> np.ndarray:
    arr = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
    if arr.dtype.kind in "fc" and not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} contains NaN or infinite values")
    return arr


def _boxes(boxes: Any, labels: Any, name: str, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    b = _as_numpy(boxes, f"{name}_boxes").astype(np.float64)
    if b.size == 0:
        b = b.reshape(0, len(BOX_FIELDS))
    if b.ndim != 2 or b.shape[1] != len(BOX_FIELDS):
        raise ValueError(f"{name}_boxes must be (N, {len(BOX_FIELDS)}) in BOX_FIELDS, got {tuple(b.shape)}")
    lab = _as_numpy(labels, f"{name}_labels").reshape(-1)
    if len(lab) != len(b):
        raise ValueError(f"{name}_labels has {len(lab)} entries for {len(b)} boxes")
    if len(lab) and (lab.dtype.kind not in "iu" or lab.min() < 0 or lab.max() >= num_classes):
        raise ValueError(f"{name}_labels must be integers in [0, {num_classes}), got {lab.tolist()!r}")
    if len(b) and not np.all(b[:, 3:6] > 0):
        raise ValueError(f"{name}_boxes must have positive sizes (w, l, h)")
    return b, lab.astype(np.int64)
