"""Training and inference of :class:`fusionlens.models.avod.AvodDetector` on a KITTI-layout split.

Targets follow AVOD: anchors are matched to the ground truth's axis-aligned BEV boxes by 2-D IoU (positive at or
above the class's upper threshold, negative below its lower one, the best anchor of every object positive), the
RPN is trained on a mini-batch of 256 anchors per frame (at most half positive) with a binary cross-entropy and a
smooth-L1 box loss; the second stage sees the proposals plus the ground-truth boxes (a mini-batch of 64 per frame,
at most a quarter positive) with a cross-entropy over classes + background, a smooth-L1 loss on the class's box
regression and the doubled-angle orientation, and a cross-entropy on the direction bin.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.ops import box_iou

from fusionlens.data.kitti import (
    KittiDataset,
    KittiObject,
    lidar_boxes_to_camera,
    objects_to_lidar_boxes,
    observation_angle,
    project_boxes,
)
from fusionlens.evaluate.kitti import KITTI_IMAGE_HEIGHT, KittiEvaluation, evaluate_kitti
from fusionlens.io import atomic_torch_save, load_torch_file
from fusionlens.models.avod import AvodConfig, AvodDetector, bev_input
from fusionlens.models.avod_ops import encode_aa
from fusionlens.models.rotated_iou import rotated_nms

RPN_IOU: dict[str, tuple[float, float]] = {"Car": (0.3, 0.5), "Pedestrian": (0.2, 0.4), "Cyclist": (0.2, 0.4)}
SECOND_IOU: dict[str, tuple[float, float]] = {"Car": (0.4, 0.55), "Pedestrian": (0.3, 0.45), "Cyclist": (0.3, 0.45)}


def collate_kitti(items: Sequence[dict], cfg: AvodConfig) -> dict[str, Any]:
    """A batch of :class:`KittiDataset` items: ``image`` (B, 3, H, W), ``bev`` (B, S + 1, X, Y), ``lidar_to_image``
    (B, 3, 4), and per frame lists ``boxes`` / ``labels`` / ``objects`` / ``calib`` / ``id``."""
    sizes = {tuple(it["image"].shape) for it in items}
    if len(sizes) > 1:
        raise ValueError(f"collate_kitti: the frames' images differ in size {sorted(sizes)}; resize them first")
    l2i = [torch.from_numpy(it["calib"].P[2] @ it["calib"].velo_to_rect).float() for it in items]
    return {
        "image": torch.stack([it["image"] for it in items]), "bev": torch.stack([bev_input(it["points"], cfg)
                                                                                 for it in items]),
        "lidar_to_image": torch.stack(l2i), "boxes": [it["boxes"] for it in items],
        "labels": [it["labels"] for it in items], "objects": [it["objects"] for it in items],
        "calib": [it["calib"] for it in items], "id": [it["id"] for it in items],
    }


def fit_anchors(cfg: AvodConfig, dataset: KittiDataset) -> AvodConfig:
    """``cfg`` with each class's anchor size and centre height set to the class means of ``dataset``'s labels
    (AVOD clusters the training boxes; one cluster per class is their mean). Classes absent keep theirs."""
    sizes, zs = list(cfg.anchor_sizes), list(cfg.anchor_z)
    rows: dict[int, list[torch.Tensor]] = {}
    for i in range(len(dataset)):
        objs = [o for o in dataset.objects(i) if o.type in cfg.classes]
        boxes = objects_to_lidar_boxes(objs, dataset.calib(i))
        for o, b in zip(objs, boxes):
            rows.setdefault(cfg.classes.index(o.type), []).append(b)
    for c, bs in rows.items():
        mean = torch.stack(bs).mean(0)
        sizes[c] = (round(float(mean[3]), 3), round(float(mean[4]), 3), round(float(mean[5]), 3))
        zs[c] = round(float(mean[2]), 3)
    return replace(cfg, anchor_sizes=tuple(sizes), anchor_z=tuple(zs))


def aabb(boxes: torch.Tensor) -> torch.Tensor:
    """Axis-aligned ``(N, 6)`` (x, y, z, extent x, extent y, h) enclosing rotated boxes ``(N, 7)``."""
    c, s = boxes[:, 6].cos().abs(), boxes[:, 6].sin().abs()
    ex = boxes[:, 4] * c + boxes[:, 3] * s
    ey = boxes[:, 4] * s + boxes[:, 3] * c
    return torch.stack([boxes[:, 0], boxes[:, 1], boxes[:, 2], ex, ey, boxes[:, 5]], 1)


def _flat(boxes: torch.Tensor) -> torch.Tensor:
    return torch.stack([boxes[:, 0] - boxes[:, 3] / 2, boxes[:, 1] - boxes[:, 4] / 2,
                        boxes[:, 0] + boxes[:, 3] / 2, boxes[:, 1] + boxes[:, 4] / 2], 1)


def _match(boxes: torch.Tensor, gt: torch.Tensor, gt_cls: torch.Tensor, thresholds: torch.Tensor,
           force_best: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Per box: index of its best ground truth and a label 1 (positive), 0 (negative) or -1 (ignored)."""
    label = torch.zeros(len(boxes), dtype=torch.long)
    if not len(gt):
        return torch.zeros(len(boxes), dtype=torch.long), label
    iou = box_iou(_flat(boxes), _flat(aabb(gt)))
    best, arg = iou.max(1)
    lo, hi = thresholds[gt_cls[arg], 0], thresholds[gt_cls[arg], 1]
    label[best >= lo] = -1
    label[best >= hi] = 1
    if force_best:
        top = iou.argmax(0)
        ok = iou[top, torch.arange(len(gt))] > 0
        label[top[ok]], arg[top[ok]] = 1, torch.arange(len(gt))[ok]
    return arg, label


def _sample(label: torch.Tensor, size: int, positive_share: float, gen: torch.Generator) -> torch.Tensor:
    pos, neg = torch.nonzero(label == 1)[:, 0], torch.nonzero(label == 0)[:, 0]
    pos = pos[torch.randperm(len(pos), generator=gen)[: int(size * positive_share)]]
    neg = neg[torch.randperm(len(neg), generator=gen)[: size - len(pos)]]
    return torch.cat([pos, neg])


def box_targets(gt: torch.Tensor, gt_cls: torch.Tensor, proposals: torch.Tensor,
                cfg: AvodConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Second-stage targets of proposals ``(N, 6)`` for their objects ``gt`` ``(N, 7)``: the box (centre offsets
    over the proposal's extents, log sizes over the class's anchor size), the doubled-angle orientation and the
    direction bin (1 when the heading points away from the axis angle in (-pi/2, pi/2])."""
    size = torch.tensor(cfg.anchor_sizes, dtype=gt.dtype)[gt_cls]
    box = torch.cat([(gt[:, :3] - proposals[:, :3]) / proposals[:, 3:6], torch.log(gt[:, 3:6] / size)], 1)
    yaw = gt[:, 6]
    orientation = torch.stack([torch.cos(2 * yaw), torch.sin(2 * yaw)], 1)
    axis = torch.atan2(orientation[:, 1], orientation[:, 0]) / 2
    direction = (torch.cos(yaw - axis) < 0).long()
    return box, orientation, direction


def avod_loss(model: AvodDetector, batch: dict[str, Any], generator: torch.Generator | None = None
              ) -> dict[str, torch.Tensor]:
    """The training losses (``total`` and each term) of one batch."""
    cfg = model.cfg
    gen = generator or torch.Generator().manual_seed(0)
    rpn_thr = torch.tensor([RPN_IOU[c] for c in cfg.classes])
    sec_thr = torch.tensor([SECOND_IOU[c] for c in cfg.classes])
    feats = model.features(batch["image"], batch["bev"])
    rpn = model.rpn_stage(feats, batch["bev"], batch["lidar_to_image"], tuple(batch["image"].shape[-2:]))
    obj_logits, obj_target, reg_pred, reg_target = [], [], [], []
    props, prop_batch, prop_gt, prop_label = [], [], [], []
    for b, (gt, gt_cls) in enumerate(zip(batch["boxes"], batch["labels"])):
        sel = torch.nonzero(rpn["anchor_batch"] == b)[:, 0]
        anchors = rpn["anchors"][sel]
        arg, label = _match(anchors, gt, gt_cls, rpn_thr, force_best=True)
        keep = _sample(label, 256, 0.5, gen)
        obj_logits.append(rpn["rpn_logits"][sel][keep])
        obj_target.append((label[keep] == 1).float())
        pos = keep[label[keep] == 1]
        if len(pos):
            reg_pred.append(rpn["rpn_deltas"][sel][pos])
            reg_target.append(encode_aa(aabb(gt[arg[pos]]), anchors[pos]))
        mine = rpn["proposals"][rpn["proposal_batch"] == b]
        if len(gt):  # the ground truth joins the proposals, so the second stage sees positives from step one
            mine = torch.cat([mine, aabb(gt)])
        arg, label = _match(mine, gt, gt_cls, sec_thr, force_best=False)
        keep = _sample(label, 64, 0.25, gen)
        props.append(mine[keep])
        prop_batch.append(torch.full((len(keep),), b, dtype=torch.long))
        prop_gt.append(torch.cat([gt[arg[keep]], gt_cls[arg[keep], None].float()], 1) if len(gt)
                       else torch.zeros(len(keep), 8))
        prop_label.append(label[keep])
    loss = {"rpn_objectness": F.binary_cross_entropy_with_logits(torch.cat(obj_logits), torch.cat(obj_target))}
    loss["rpn_box"] = (F.smooth_l1_loss(torch.cat(reg_pred), torch.cat(reg_target), beta=1 / 9) if reg_pred
                       else rpn["rpn_deltas"].sum() * 0)
    proposals, proposal_batch = torch.cat(props), torch.cat(prop_batch)
    out = model.second_stage(feats, proposals, proposal_batch, batch["lidar_to_image"])
    gt_all, label = torch.cat(prop_gt), torch.cat(prop_label)
    positive = label == 1
    gt_cls = gt_all[:, 7].long()
    target_cls = torch.where(positive, gt_cls + 1, 0)
    loss["cls"] = F.cross_entropy(out["cls_logits"], target_cls)
    if positive.any():
        box_t, orient_t, dir_t = box_targets(gt_all[positive, :7], gt_cls[positive], proposals[positive], cfg)
        box_p = out["box_deltas"][positive, gt_cls[positive]]
        loss["box"] = F.smooth_l1_loss(box_p, box_t, beta=1 / 9)
        loss["orientation"] = F.smooth_l1_loss(out["orientation"][positive], orient_t, beta=1 / 9)
        loss["direction"] = F.cross_entropy(out["direction"][positive], dir_t)
    else:
        zero = out["second"].sum() * 0
        loss.update(box=zero, orientation=zero, direction=zero)
    loss["total"] = loss["rpn_objectness"] + 5 * loss["rpn_box"] + loss["cls"] + 5 * loss["box"] \
        + loss["orientation"] + 0.2 * loss["direction"]
    return loss


def decode_detections(model: AvodDetector, out: dict[str, torch.Tensor], score_threshold: float = 0.05,
                      nms_iou: float = 0.1, max_detections: int = 50) -> list[dict[str, torch.Tensor]]:
    """Per frame: ``boxes`` (N, 7) Velodyne-frame, ``scores`` (N,), ``labels`` (N,) after per-class rotated NMS."""
    cfg = model.cfg
    probs = out["cls_logits"].softmax(1)[:, 1:]
    size = torch.tensor(cfg.anchor_sizes, dtype=probs.dtype)
    axis = torch.atan2(out["orientation"][:, 1], out["orientation"][:, 0]) / 2
    yaw = axis + math.pi * (out["direction"].argmax(1) == 1)
    yaw = torch.remainder(yaw + math.pi, 2 * math.pi) - math.pi
    frames = []
    n_frames = int(out["proposal_batch"].max()) + 1 if len(out["proposal_batch"]) else 0
    for b in range(max(n_frames, 1)):
        rows, scores, labels = [], [], []
        sel = out["proposal_batch"] == b
        props = out["proposals"][sel]
        for c in range(len(cfg.classes)):
            d = out["box_deltas"][sel, c]
            centre = props[:, :3] + d[:, :3] * props[:, 3:6]
            dims = size[c] * torch.exp(d[:, 3:6].clamp(max=3.0))
            rows.append(torch.cat([centre, dims, yaw[sel, None]], 1))
            scores.append(probs[sel, c])
            labels.append(torch.full((int(sel.sum()),), c, dtype=torch.long))
        boxes, score, label = torch.cat(rows), torch.cat(scores), torch.cat(labels)
        ok = score > score_threshold
        boxes, score, label = boxes[ok], score[ok], label[ok]
        keep = rotated_nms(boxes, score, label, nms_iou)[:max_detections]
        frames.append({"boxes": boxes[keep], "scores": score[keep], "labels": label[keep]})
    return frames[:n_frames]


def to_kitti_objects(det: dict[str, torch.Tensor], calib: Any, image_size: tuple[int, int],
                     classes: Sequence[str]) -> list[KittiObject]:
    """Detections of one frame as KITTI result lines (2-D box = the projected 3-D box, clipped)."""
    boxes = det["boxes"].detach().double().numpy()
    if not len(boxes):
        return []
    loc, dims, ry = lidar_boxes_to_camera(boxes, calib)
    bbox, _ = project_boxes(boxes, calib, image_size)
    alpha = observation_angle(boxes, calib)
    return [KittiObject(classes[int(c)], 0.0, 0, float(alpha[i]), tuple(float(v) for v in bbox[i]),
                        tuple(float(v) for v in dims[i]), tuple(float(v) for v in loc[i]), float(ry[i]),
                        float(det["scores"][i]))
            for i, c in enumerate(det["labels"])]


@torch.no_grad()
def evaluate_avod(model: AvodDetector, dataset: KittiDataset, batch_size: int = 4, recall_points: int = 40,
                  classes: Sequence[str] | None = None) -> KittiEvaluation:
    """KITTI AP of ``model`` over ``dataset`` (pixel heights scaled to the images' height over KITTI's 375)."""
    was_training = model.training
    model.eval()
    try:
        gt, dt, height = [], [], None
        for start in range(0, len(dataset), batch_size):
            batch = collate_kitti([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))],
                                  model.cfg)
            height = batch["image"].shape[-2]
            out = model(batch["image"], batch["bev"], batch["lidar_to_image"])
            dets = decode_detections(model, out)
            dets += [{"boxes": torch.zeros(0, 7), "scores": torch.zeros(0), "labels": torch.zeros(0)}] * (
                len(batch["id"]) - len(dets))
            for det, calib, objects in zip(dets, batch["calib"], batch["objects"]):
                dt.append(to_kitti_objects(det, calib, tuple(batch["image"].shape[-2:]), model.cfg.classes))
                gt.append(objects)
    finally:
        model.train(was_training)
    return evaluate_kitti(gt, dt, classes=tuple(classes or model.cfg.classes), recall_points=recall_points,
                          min_height_scale=float(height) / KITTI_IMAGE_HEIGHT)


BACKBONES: dict[str, str] = {"camera": "image_fpn", "lidar": "bev_fpn"}


def load_backbones(model: AvodDetector, sources: dict[str, str | Path]) -> None:
    """Copy each view's feature pyramid from a checkpoint (``{"lidar": "lidar_only.pt"}``): the recipe of
    fusion models built on single-modality pre-trained backbones (AlterMOMA section 1). Every checkpoint is
    checked to hold that backbone, with the same shapes, before anything is copied."""
    states = {}
    for modality, path in sources.items():
        if modality not in BACKBONES or modality not in model.cfg.modalities:
            raise ValueError(f"backbone source for {modality!r}: the detector's views are {list(model.cfg.modalities)}")
        partner, _ = load_avod(path)
        if modality not in partner.cfg.modalities:
            raise ValueError(f"{path} has no {modality} backbone (its views: {list(partner.cfg.modalities)})")
        state = getattr(partner, BACKBONES[modality]).state_dict()
        mine = getattr(model, BACKBONES[modality]).state_dict()
        if {k: v.shape for k, v in state.items()} != {k: v.shape for k, v in mine.items()}:
            raise ValueError(f"{path}: its {modality} backbone has other shapes than this detector's (another preset?)")
        states[modality] = state
    for modality, state in states.items():
        getattr(model, BACKBONES[modality]).load_state_dict(state)


def train_avod(cfg: AvodConfig, train_set: KittiDataset, *, steps: int, batch_size: int = 2, lr: float = 2e-3,
               weight_decay: float = 1e-4, seed: int = 0, checkpoint: str | Path | None = None,
               init_from: dict[str, str | Path] | None = None,
               progress: bool = True) -> tuple[AvodDetector, dict[str, Any]]:
    """Train (AdamW, one-cycle schedule) from scratch or from single-view backbones ``init_from``
    (:func:`load_backbones`); anchors fitted to ``train_set``. Saves ``checkpoint``."""
    if steps <= 0 or batch_size <= 0:
        raise ValueError(f"train_avod: steps and batch_size must be positive, got {steps} and {batch_size}")
    cfg = fit_anchors(cfg, train_set)
    torch.manual_seed(seed)
    model = AvodDetector(cfg)
    if init_from:
        load_backbones(model, init_from)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    gen = torch.Generator().manual_seed(seed)
    order = np.random.default_rng(seed)
    losses, t0 = [], time.time()
    from tqdm import tqdm

    model.train()
    perm: list[int] = []
    for _ in tqdm(range(steps), desc="avod", disable=not progress):
        if len(perm) < batch_size:
            perm += order.permutation(len(train_set)).tolist()
        idx, perm = perm[:batch_size], perm[batch_size:]
        loss = avod_loss(model, collate_kitti([train_set[i] for i in idx], cfg), gen)
        if not torch.isfinite(loss["total"]):
            terms = {k: round(float(v), 4) for k, v in loss.items()}
            raise RuntimeError(f"train_avod: the loss became non-finite at step {len(losses)}: {terms}")
        opt.zero_grad(set_to_none=True)
        loss["total"].backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 10.0)
        opt.step()
        sched.step()
        losses.append(float(loss["total"].detach()))
    model.eval()
    info = {"steps": steps, "seconds": round(time.time() - t0, 1), "final_loss": float(np.mean(losses[-10:]))}
    if checkpoint is not None:
        atomic_torch_save(checkpoint, {"kind": "avod", "avod_config": cfg.to_dict(), "model": model.state_dict(),
                                       "step": steps, "seed": seed, **info})
    return model, info


def load_avod(path: str | Path) -> tuple[AvodDetector, dict[str, Any]]:
    payload = load_torch_file(path, what="checkpoint", expected="an AVOD checkpoint (fusionlens train --model avod)")
    if not isinstance(payload, dict) or payload.get("kind") != "avod":
        raise ValueError(f"{path} is not an AVOD checkpoint written by 'fusionlens train --model avod'")
    model = AvodDetector(AvodConfig.from_dict(payload["avod_config"]))
    model.load_state_dict(payload["model"])
    return model.eval(), payload
