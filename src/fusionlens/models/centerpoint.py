"""CenterPoint-style 3-D detection head on fused BEV features (Yin et al., CVPR 2021, Sec. 3-4).

Outputs, all ``(B, C, X, Y)`` on the model's BEV grid (one cell = one heatmap pixel, stride 1):

==============  ===  ==========================================================================
key             C    meaning at an object's centre cell ``(ix, iy)``
==============  ===  ==========================================================================
det_heatmap     K    class logits; the target is a Gaussian per object (CenterNet/CornerNet)
det_offset      2    sub-cell offset of the centre, ``(x - x0) / dx - ix`` (same for y), in [0, 1)
det_height      1    centre z (m)
det_size        3    log w, log l, log h (m)
det_rot         2    sin(yaw), cos(yaw)
det_vel         2    vx, vy (m/s)
==============  ===  ==========================================================================

Training (CenterPoint Sec. 4): the heatmap loss is the penalty-reduced focal loss of CornerNet (Law & Deng,
ECCV 2018, Eq. 1) with alpha = 2, beta = 4, normalised by the number of objects; the box loss is L1 at the
centre cells (velocity weighted 0.2), added with weight 0.25. Gaussian radii follow CornerNet's
``gaussian_radius`` rule with CenterPoint's ``min_overlap = 0.1`` and ``min_radius = 2``.

Decoding: sigmoid, a 3x3 max-pool keeps local peaks (CenterNet's NMS), top-k over classes and cells, a score
threshold, then optionally class-wise NMS on the boxes' BEV footprints: axis-aligned (``torchvision.ops``) or
rotated, on the exact IoU of the rotated rectangles (:mod:`fusionlens.models.rotated_iou`, as CenterPoint's
rotated NMS).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import batched_nms

from fusionlens.data.sample import BOX_FIELDS, CLASSES, BEVGrid
from fusionlens.models.bev import Head
from fusionlens.models.registry import register_head
from fusionlens.models.rotated_iou import rotated_nms

REG_OUTPUTS: dict[str, int] = {"det_offset": 2, "det_height": 1, "det_size": 3, "det_rot": 2, "det_vel": 2}
DET_OUTPUTS: tuple[str, ...] = ("det_heatmap", *REG_OUTPUTS)
# L1 weight per regression channel (CenterPoint's nuScenes setting: velocity at 0.2)
CODE_WEIGHTS: tuple[float, ...] = (1.0,) * 8 + (0.2, 0.2)
NMS_MODES: tuple[str, ...] = ("aabb", "rotated")  # decode_detections' nms values besides None
_LOG_SIZE_RANGE = (-5.0, 5.0)  # decoded sizes stay within [7e-3, 148] m even for a wild prediction


def gaussian_radius(length: torch.Tensor, width: torch.Tensor, min_overlap: float = 0.1) -> torch.Tensor:
    """CornerNet's radius rule: the smallest of three quadratic roots bounding how far a corner pair may move
    while keeping IoU >= ``min_overlap``, for boxes ``length x width`` (in cells). Vectorised."""
    o = min_overlap
    s, p = length + width, length * width
    r1 = (s + torch.sqrt(s ** 2 - 4 * p * (1 - o) / (1 + o))) / 2
    r2 = (2 * s + torch.sqrt((2 * s) ** 2 - 16 * (1 - o) * p)) / 2
    r3 = (-2 * o * s + torch.sqrt((2 * o * s) ** 2 - 16 * o * (o - 1) * p)) / 2
    return torch.minimum(torch.minimum(r1, r2), r3)


@dataclass
class DetectionTargets:
    """Dense CenterPoint targets for a batch: ``heatmap`` (B, K, X, Y), ``reg`` (B, 10, X, Y) in the channel
    order of :data:`REG_OUTPUTS`, ``mask`` (B, 1, X, Y) = 1 at the centre cell of each kept object."""

    heatmap: torch.Tensor
    reg: torch.Tensor
    mask: torch.Tensor

    @property
    def num_objects(self) -> torch.Tensor:
        return self.mask.sum()


def encode_targets(boxes: Sequence[torch.Tensor], labels: Sequence[torch.Tensor], grid: BEVGrid,
                   num_classes: int, *, min_radius: int = 2, min_overlap: float = 0.1) -> DetectionTargets:
    """Encode per-sample boxes ``(N, 9)`` (BOX_FIELDS) and labels ``(N,)`` into dense targets.

    Objects whose centre lies outside the grid's x/y bounds are skipped. When two objects share a centre cell
    the first one (in input order) owns the regression target; both still draw their Gaussian.
    """
    if len(boxes) != len(labels):
        raise ValueError(f"{len(boxes)} box tensors for {len(labels)} label tensors")
    if min_radius < 0 or not 0 < min_overlap < 1:
        raise ValueError(f"need min_radius >= 0 and 0 < min_overlap < 1, got {min_radius}, {min_overlap}")
    X, Y, _ = grid.shape
    (x0, _), (y0, _), _ = grid.bounds
    dx, dy, _ = grid.cell_size
    B = len(boxes)
    heat = torch.zeros(B, num_classes, X * Y)
    reg = torch.zeros(B, len(CODE_WEIGHTS), X * Y)
    mask = torch.zeros(B, 1, X * Y)
    gx = torch.arange(X, dtype=torch.float32).view(1, X, 1)
    gy = torch.arange(Y, dtype=torch.float32).view(1, 1, Y)
    for b, (bx, lab) in enumerate(zip(boxes, labels)):
        bx = bx.detach().float().cpu().reshape(-1, len(BOX_FIELDS))
        lab = lab.detach().long().cpu().reshape(-1)
        if len(lab) != len(bx):
            raise ValueError(f"sample {b}: {len(bx)} boxes but {len(lab)} labels")
        if len(lab) and (lab.min() < 0 or lab.max() >= num_classes):
            raise ValueError(f"sample {b}: labels must lie in [0, {num_classes}), got {lab.tolist()}")
        if len(bx) and not torch.all(bx[:, 3:6] > 0):
            raise ValueError(f"sample {b}: boxes must have positive sizes (w, l, h)")
        fx, fy = (bx[:, 0] - x0) / dx, (bx[:, 1] - y0) / dy
        ix, iy = fx.floor().long(), fy.floor().long()
        inside = (ix >= 0) & (ix < X) & (iy >= 0) & (iy < Y)
        bx, lab, fx, fy, ix, iy = bx[inside], lab[inside], fx[inside], fy[inside], ix[inside], iy[inside]
        if len(bx) == 0:
            continue
        radius = gaussian_radius(bx[:, 4] / dx, bx[:, 3] / dy, min_overlap).floor().clamp(min=min_radius)
        sigma = ((2 * radius + 1) / 6).view(-1, 1, 1)
        ddx, ddy = gx - ix.view(-1, 1, 1), gy - iy.view(-1, 1, 1)
        window = (ddx.abs() <= radius.view(-1, 1, 1)) & (ddy.abs() <= radius.view(-1, 1, 1))
        gauss = torch.exp(-(ddx ** 2 + ddy ** 2) / (2 * sigma ** 2)) * window
        heat[b] = heat[b].scatter_reduce(0, lab.view(-1, 1).expand(-1, X * Y), gauss.reshape(len(bx), -1),
                                         reduce="amax")
        cell = ix * Y + iy
        order = torch.arange(len(bx))
        first = torch.full((X * Y,), len(bx)).scatter_reduce(0, cell, order, reduce="amin")
        own = first[cell] == order
        code = torch.stack([fx - ix, fy - iy, bx[:, 2], bx[:, 3].log(), bx[:, 4].log(), bx[:, 5].log(),
                            bx[:, 6].sin(), bx[:, 6].cos(), bx[:, 7], bx[:, 8]], dim=0)
        reg[b, :, cell[own]] = code[:, own]
        mask[b, 0, cell[own]] = 1.0
    return DetectionTargets(heat.view(B, num_classes, X, Y), reg.view(B, -1, X, Y), mask.view(B, 1, X, Y))


def focal_loss(logits: torch.Tensor, target: torch.Tensor, alpha: float = 2.0,
               beta: float = 4.0) -> torch.Tensor:
    """Penalty-reduced pixel-wise focal loss (CornerNet Eq. 1), normalised by the number of peaks (target 1).

    ``-(1/N) sum [(1-p)^alpha log p  if y = 1;  (1-y)^beta p^alpha log(1-p)  otherwise]`` with
    p = sigmoid(logits), computed with log-sigmoids for stability.
    """
    pos = target.eq(1.0).to(logits.dtype)
    p = torch.sigmoid(logits)
    pos_term = (1 - p) ** alpha * F.logsigmoid(logits) * pos
    neg_term = (1 - target) ** beta * p ** alpha * F.logsigmoid(-logits) * (1 - pos)
    return -(pos_term.sum() + neg_term.sum()) / pos.sum().clamp(min=1.0)


def detection_loss(outputs: dict[str, torch.Tensor], targets: DetectionTargets,
                   reg_weight: float = 0.25) -> dict[str, torch.Tensor]:
    """CenterPoint's loss: ``det_heatmap`` focal loss + ``reg_weight`` x weighted L1 at the centre cells.

    Returns ``{"det_heatmap": ..., "det_box": ..., "det_total": ...}`` (scalars)."""
    missing = [k for k in DET_OUTPUTS if k not in outputs]
    if missing:
        raise ValueError(f"detection_loss: outputs lack {missing}")
    dev = outputs["det_heatmap"].device
    heat, reg, mask = targets.heatmap.to(dev), targets.reg.to(dev), targets.mask.to(dev)
    if outputs["det_heatmap"].shape != heat.shape:
        raise ValueError(f"det_heatmap is {tuple(outputs['det_heatmap'].shape)} but targets are "
                         f"{tuple(heat.shape)} (grid or class count mismatch)")
    hm = focal_loss(outputs["det_heatmap"], heat)
    pred = torch.cat([outputs[k] for k in REG_OUTPUTS], dim=1)
    w = torch.tensor(CODE_WEIGHTS, dtype=pred.dtype, device=dev).view(1, -1, 1, 1)
    box = ((pred - reg).abs() * w * mask).sum() / mask.sum().clamp(min=1.0)
    return {"det_heatmap": hm, "det_box": box, "det_total": hm + reg_weight * box}


def decode_detections(outputs: dict[str, torch.Tensor], grid: BEVGrid, *, k: int = 100,
                      score_threshold: float = 0.1, nms: str | None = None,
                      nms_iou: float = 0.2) -> list[dict[str, torch.Tensor]]:
    """Boxes from head outputs: per sample ``{"boxes": (N, 9) BOX_FIELDS, "scores": (N,), "labels": (N,)}``,
    sorted by descending score. ``nms``: ``None`` (peak extraction only, CenterPoint's default), ``"aabb"``
    (class-wise NMS on the axis-aligned BEV footprint of each rotated box, IoU ``nms_iou``) or ``"rotated"``
    (class-wise NMS on the exact BEV IoU of the rotated boxes; ``"aabb"`` over-suppresses diagonal
    neighbours)."""
    _check_decode_settings(k, score_threshold, nms, nms_iou)
    heat = torch.sigmoid(outputs["det_heatmap"].detach())
    B, K, X, Y = heat.shape
    if (X, Y) != tuple(grid.shape[:2]):
        raise ValueError(f"det_heatmap is {X}x{Y} but the grid is {grid.shape[0]}x{grid.shape[1]}")
    peaks = heat * (heat == F.max_pool2d(heat, 3, stride=1, padding=1))
    scores, idx = peaks.reshape(B, -1).topk(min(k, K * X * Y), dim=1)
    reg = torch.cat([outputs[name].detach() for name in REG_OUTPUTS], dim=1).reshape(B, len(CODE_WEIGHTS), -1)
    (x0, _), (y0, _), _ = grid.bounds
    dx, dy, _ = grid.cell_size
    results = []
    for b in range(B):
        keep = scores[b] > score_threshold
        s, i = scores[b][keep], idx[b][keep]
        label, cell = i // (X * Y), i % (X * Y)
        r = reg[b][:, cell]
        x = x0 + ((cell // Y).to(r.dtype) + r[0]) * dx
        y = y0 + ((cell % Y).to(r.dtype) + r[1]) * dy
        size = r[3:6].clamp(*_LOG_SIZE_RANGE).exp()
        yaw = torch.atan2(r[6], r[7])
        boxes = torch.stack([x, y, r[2], size[0], size[1], size[2], yaw, r[8], r[9]], dim=1)
        if nms is not None and len(boxes):
            order = _class_nms(nms, boxes, s, label, nms_iou)
            boxes, s, label = boxes[order], s[order], label[order]
        results.append({"boxes": boxes, "scores": s, "labels": label})
    return results


def _check_decode_settings(k: int, score_threshold: float, nms: str | None, nms_iou: float) -> None:
    if k <= 0 or not 0 <= score_threshold < 1 or nms not in (None, *NMS_MODES) or not 0 < nms_iou <= 1:
        raise ValueError(f"decode: need k > 0, 0 <= score_threshold < 1, nms in {(None, *NMS_MODES)}, "
                         f"0 < nms_iou <= 1; got k={k}, score_threshold={score_threshold}, nms={nms!r}, "
                         f"nms_iou={nms_iou}")


def _class_nms(mode: str, boxes: torch.Tensor, scores: torch.Tensor, labels: torch.Tensor,
               iou: float) -> torch.Tensor:
    """Kept indices, by descending score, of class-wise NMS ``mode`` (one of :data:`NMS_MODES`)."""
    if mode == "rotated":
        return rotated_nms(boxes, scores, labels, iou)
    half = _footprint_half_extent(boxes)
    return batched_nms(torch.cat([boxes[:, :2] - half, boxes[:, :2] + half], dim=1), scores, labels, iou)


def _footprint_half_extent(boxes: torch.Tensor) -> torch.Tensor:
    """Half-extents (x, y) of the axis-aligned rectangle enclosing each rotated BEV box."""
    c, s = boxes[:, 6].cos().abs(), boxes[:, 6].sin().abs()
    w, l = boxes[:, 3], boxes[:, 4]
    return torch.stack([(l * c + w * s) / 2, (l * s + w * c) / 2], dim=1)


class CenterPointHead(nn.Module):
    """Detection head plug-in (registered as ``"centerpoint"``): one :class:`~fusionlens.models.bev.Head`
    (3x3 conv, InstanceNorm, ReLU, 1x1 conv) per output of :data:`DET_OUTPUTS`.

    Args:
        in_channels: channels of the decoder's BEV features.
        grid: the model's BEV grid (the heatmap resolution).
        classes: the classes to detect, a subset of :data:`CLASSES` (default: all). ``box_labels`` index
            :data:`CLASSES`; boxes of other classes are ignored, and decoded labels index ``classes``.
        hidden: hidden channels of each branch.
        reg_weight, min_radius, min_overlap: loss and target settings (module docstring).
        k, score_threshold, nms, nms_iou: decoding defaults (:func:`decode_detections`).
    """

    def __init__(self, in_channels: int, grid: BEVGrid, *, classes: Sequence[str] = CLASSES, hidden: int = 32,
                 reg_weight: float = 0.25, min_radius: int = 2, min_overlap: float = 0.1, k: int = 100,
                 score_threshold: float = 0.1, nms: str | None = None, nms_iou: float = 0.2) -> None:
        super().__init__()
        if not classes or len(set(classes)) != len(classes) or not set(classes) <= set(CLASSES):
            raise ValueError(f"CenterPointHead: classes must be distinct names from {CLASSES}, "
                             f"got {list(classes)}")
        if int(in_channels) <= 0 or int(hidden) <= 0 or reg_weight < 0:
            raise ValueError(f"CenterPointHead: need in_channels, hidden > 0 and reg_weight >= 0, got "
                             f"{in_channels}, {hidden}, {reg_weight}")
        self.grid, self.classes = grid, tuple(classes)
        self.reg_weight, self.min_radius, self.min_overlap = float(reg_weight), int(min_radius), min_overlap
        self.decode_kwargs: dict[str, Any] = dict(k=k, score_threshold=score_threshold, nms=nms,
                                                  nms_iou=nms_iou)
        _check_decode_settings(**self.decode_kwargs)
        self.branches = nn.ModuleDict({"det_heatmap": Head(in_channels, hidden, len(self.classes))})
        for name, ch in REG_OUTPUTS.items():
            self.branches[name] = Head(in_channels, hidden, ch)
        # CenterNet's prior: start every pixel at p = 0.1 so the focal loss is not swamped at step 0
        nn.init.constant_(self.branches["det_heatmap"].out.bias, -math.log((1 - 0.1) / 0.1))

    def forward(self, features: torch.Tensor) -> dict[str, torch.Tensor]:
        return {name: branch(features) for name, branch in self.branches.items()}

    def select(self, boxes: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The boxes of this head's classes, with labels re-indexed from :data:`CLASSES` into ``classes``."""
        lookup = torch.full((len(CLASSES),), -1, dtype=torch.long)
        lookup[[CLASSES.index(c) for c in self.classes]] = torch.arange(len(self.classes))
        labels = labels.detach().long().cpu().reshape(-1)
        if len(labels) and (labels.min() < 0 or labels.max() >= len(CLASSES)):
            raise ValueError(f"box_labels must index CLASSES (0..{len(CLASSES) - 1}), got {labels.tolist()}")
        mapped = lookup[labels]
        keep = mapped >= 0
        return boxes.detach().cpu().reshape(-1, len(BOX_FIELDS))[keep], mapped[keep]

    def targets(self, batch: dict[str, Any]) -> DetectionTargets:
        """Dense targets for a batch dict's ``boxes`` / ``box_labels`` (labels index :data:`CLASSES`)."""
        selected = [self.select(b, lab) for b, lab in zip(batch["boxes"], batch["box_labels"])]
        return encode_targets([b for b, _ in selected], [lab for _, lab in selected], self.grid,
                              len(self.classes), min_radius=self.min_radius, min_overlap=self.min_overlap)

    def loss(self, outputs: dict[str, torch.Tensor], batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """Training hook of the model's extra heads: CenterPoint's loss against ``batch["boxes"]``."""
        return detection_loss(outputs, self.targets(batch), self.reg_weight)

    def decode(self, outputs: dict[str, torch.Tensor], **overrides: Any) -> list[dict[str, torch.Tensor]]:
        """Per-sample boxes/scores/labels (see :func:`decode_detections`; keyword arguments override)."""
        return decode_detections(outputs, self.grid, **{**self.decode_kwargs, **overrides})


def find_detection_head(model: nn.Module) -> CenterPointHead:
    """The CenterPoint extra head of a :class:`~fusionlens.models.fusion.FusionModel` (DDP-unwrapped).

    Raises ``ValueError`` naming the config setting when the model has none."""
    module = getattr(model, "module", model)
    heads = [h for h in getattr(module, "extra_heads", {}).values() if isinstance(h, CenterPointHead)]
    if len(heads) != 1:
        raise ValueError(f"the model has {len(heads)} CenterPoint heads, need exactly 1; add "
                         "extra_heads={'centerpoint': {...}} to its ModelConfig")
    return heads[0]


register_head("centerpoint", CenterPointHead)
