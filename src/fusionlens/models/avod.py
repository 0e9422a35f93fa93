"""A two-stage camera-LiDAR 3-D detector in the style of AVOD-FPN (Ku et al., IROS 2018), the KITTI model of the
AlterMOMA paper (section 4.1, Table 2, appendix E Table 6).

Inputs: the front image ``(B, 3, H, W)`` and a BEV map of the LiDAR ``(B, S + 1, X, Y)`` (:func:`bev_input`: the
highest point of each of ``S`` height slices per cell, plus a point density channel), with ``lidar_to_image``
``(B, 3, 4)`` (``P2 @ R0_rect @ Tr_velo_to_cam``) so 3-D boxes can be projected into the image.

Architecture, per AVOD-FPN: each view has a small feature pyramid (encoder strides 1, 2, 4, 8; a top-down path
back to full resolution) followed by a 1x1 bottleneck. Fixed 3-D anchors (one size per class, 0 and 90 degrees,
on a BEV grid; anchors with no LiDAR point under them or whose centre is outside the image are dropped, as
AVOD drops empty anchors) are projected into both views; ``torchvision.ops.roi_align`` crops each view's
features and the crops are fused by an element-wise mean. The RPN (objectness + axis-aligned box regression)
scores the anchors; after BEV NMS the top proposals are cropped again (larger crops) and the second stage
predicts the class, a class-specific box (centre offsets and sizes), the orientation as the doubled-angle vector
``(cos 2 yaw, sin 2 yaw)`` of the box axis and a front/back direction bin (the heading is an axis plus a
direction, so regressing it never averages opposite headings into nonsense).

For analysis, ``forward(..., proposals=P)`` skips the RPN and runs the second stage on fixed proposals (the
operating point): the crops are then linear in the features (``roi_align`` is bilinear interpolation with weights
fixed by the boxes), so LMD splits the second stage's outputs into camera and LiDAR parts exactly
(:mod:`fusionlens.models.avod_rules`). ``modalities=("camera",)`` or ``("lidar",)`` builds the single-view
partners (the crops of the one view, nothing fused).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import nms, roi_align

from fusionlens.models.avod_ops import bev_boxes, decode_aa, image_boxes, make_anchors

AVOD_MODALITIES: tuple[str, ...] = ("camera", "lidar")
AVOD_PRESETS: tuple[str, ...] = ("tiny", "paper")


@dataclass(frozen=True)
class AvodConfig:
    """Sizes and settings. Lengths in metres (Velodyne frame), ``anchor_sizes`` per class as (w, l, h) and the
    anchors' centre height ``anchor_z`` (both from the training labels' class means when training)."""

    classes: tuple[str, ...] = ("Car", "Pedestrian")
    modalities: tuple[str, ...] = AVOD_MODALITIES
    area: tuple[tuple[float, float], tuple[float, float], tuple[float, float]] = ((0.0, 48.0), (-24.0, 24.0),
                                                                                  (-2.3, 0.7))
    cell: float = 0.5  # BEV cell edge (AVOD: 0.1 m)
    height_slices: int = 5
    channels: tuple[int, ...] = (8, 16, 32, 32)  # encoder widths at strides 1, 2, 4, 8
    feature_channels: int = 16  # after the FPN's top-down path
    bottleneck: int = 8  # the 1x1 reduction before cropping
    anchor_stride: int = 2  # cells between anchor centres
    anchor_sizes: tuple[tuple[float, float, float], ...] = ((1.6, 3.9, 1.56), (0.6, 0.8, 1.73))
    anchor_z: tuple[float, ...] = (-0.95, -0.9)
    rpn_crop: int = 3
    rpn_hidden: int = 64
    rpn_pre_nms: int = 512
    rpn_post_nms: int = 64
    rpn_nms_iou: float = 0.8
    crop: int = 5
    hidden: int = 128
    image_mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    image_std: tuple[float, float, float] = (0.229, 0.224, 0.225)

    def __post_init__(self) -> None:
        unknown = [m for m in self.modalities if m not in AVOD_MODALITIES]
        if unknown or not self.modalities:
            raise ValueError(f"AvodConfig.modalities: {unknown or 'none'}; choose from {AVOD_MODALITIES}")
        if len(self.anchor_sizes) != len(self.classes) or len(self.anchor_z) != len(self.classes):
            raise ValueError(f"AvodConfig: {len(self.classes)} classes need as many anchor_sizes and anchor_z, got "
                             f"{len(self.anchor_sizes)} and {len(self.anchor_z)}")
        for axis, (lo, hi) in zip("xyz", self.area):
            if not hi > lo:
                raise ValueError(f"AvodConfig.area for {axis} must have max > min, got ({lo}, {hi})")
        shape = self.bev_shape
        if any(s % 8 for s in shape):
            raise ValueError(f"AvodConfig: the BEV map {shape} (area / cell) must be divisible by 8 (FPN strides)")

    @property
    def bev_shape(self) -> tuple[int, int]:
        return tuple(int(round((hi - lo) / self.cell)) for lo, hi in self.area[:2])  # type: ignore[return-value]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AvodConfig:
        def tup(v: Any) -> Any:
            return tuple(tup(x) for x in v) if isinstance(v, list) else v
        return cls(**{k: (tup(v) if isinstance(v, list) else v) for k, v in data.items()})


def avod_preset(name: str, **overrides: Any) -> AvodConfig:
    """``tiny`` (minutes on a CPU, 0.5 m cells over 48 x 48 m) or ``paper`` (AVOD-FPN's 0.1 m cells over
    70 x 80 m, VGG-like widths 32-256, 7x7 second-stage crops, 1024 / 300 proposals before / after NMS)."""
    if name == "tiny":
        return replace(AvodConfig(), **overrides)
    if name == "paper":
        base = AvodConfig(area=((0.0, 70.4), (-40.0, 40.0), (-2.3, 0.7)), cell=0.1, channels=(32, 64, 128, 256),
                          feature_channels=32, bottleneck=1, anchor_stride=5, rpn_pre_nms=1024, rpn_post_nms=300,
                          crop=7, hidden=2048, rpn_hidden=256)
        return replace(base, **overrides)
    raise ValueError(f"AVOD preset must be one of {AVOD_PRESETS}, got {name!r}")


def bev_input(points: torch.Tensor, cfg: AvodConfig) -> torch.Tensor:
    """``(S + 1, X, Y)`` BEV map of Velodyne points ``(N, >=3)``: per height slice the highest point's height above
    the slice bottom over the slice thickness (0 where empty), then ``min(1, log(n + 1) / log 16)`` of the cell's
    point count ``n`` (AVOD's density channel). Cell ``[ix, iy]`` covers ``x`` in ``xmin + cell * [ix, ix + 1)``."""
    (x0, _), (y0, _), (z0, z1) = cfg.area
    nx, ny = cfg.bev_shape
    s = cfg.height_slices
    pts = points[:, :3].float()
    ix = torch.floor((pts[:, 0] - x0) / cfg.cell).long()
    iy = torch.floor((pts[:, 1] - y0) / cfg.cell).long()
    thick = (z1 - z0) / s
    iz = torch.floor((pts[:, 2] - z0) / thick).long()
    inside = (ix >= 0) & (ix < nx) & (iy >= 0) & (iy < ny) & (iz >= 0) & (iz < s)
    ix, iy, iz, z = ix[inside], iy[inside], iz[inside], pts[inside, 2]
    rel = (z - (z0 + iz * thick)) / thick  # in [0, 1) within the slice
    maps = torch.zeros(s * nx * ny)
    maps.scatter_reduce_(0, (iz * nx + ix) * ny + iy, rel, reduce="amax", include_self=True)
    count = torch.zeros(nx * ny).index_add_(0, ix * ny + iy, torch.ones_like(z))
    density = torch.clamp(torch.log(count + 1) / math.log(16.0), max=1.0)
    return torch.cat([maps.view(s, nx, ny), density.view(1, nx, ny)])


class FeaturePyramid(nn.Module):
    """Encoder at strides 1, 2, 4, 8 (two 3x3 convs each) and a top-down path (upsample, add the 1x1-projected
    skip, 3x3 conv) back to full resolution, then the 1x1 bottleneck AVOD applies before cropping."""

    def __init__(self, in_channels: int, channels: tuple[int, ...], out_channels: int, bottleneck: int) -> None:
        super().__init__()
        self.stages = nn.ModuleList()
        prev = in_channels
        for k, ch in enumerate(channels):
            stride = 1 if k == 0 else 2
            self.stages.append(nn.Sequential(
                nn.Conv2d(prev, ch, 3, stride, 1, bias=False), nn.BatchNorm2d(ch), nn.ReLU(inplace=True),
                nn.Conv2d(ch, ch, 3, 1, 1, bias=False), nn.BatchNorm2d(ch), nn.ReLU(inplace=True)))
            prev = ch
        self.lateral = nn.ModuleList(nn.Conv2d(ch, out_channels, 1) for ch in channels)
        self.smooth = nn.ModuleList(nn.Sequential(nn.Conv2d(out_channels, out_channels, 3, 1, 1), nn.ReLU(inplace=True))
                                    for _ in channels[:-1])
        self.bottleneck = nn.Conv2d(out_channels, bottleneck, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for stage in self.stages:
            x = stage(x)
            skips.append(x)
        top = self.lateral[-1](skips[-1])
        for k in range(len(skips) - 2, -1, -1):
            top = F.interpolate(top, size=skips[k].shape[-2:], mode="nearest") + self.lateral[k](skips[k])
            top = self.smooth[k](top)
        return self.bottleneck(top)


class CropFusion(nn.Module):
    """AVOD's fusion of the views' crops: their element-wise mean (a module, so analyses can name it)."""

    def forward(self, *crops: torch.Tensor) -> torch.Tensor:
        return crops[0] if len(crops) == 1 else torch.stack(crops).mean(0)


class _Head(nn.Module):
    def __init__(self, in_features: int, hidden: int, outputs: dict[str, int]) -> None:
        super().__init__()
        self.trunk = nn.Sequential(nn.Flatten(), nn.Linear(in_features, hidden), nn.ReLU(inplace=True),
                                   nn.Linear(hidden, hidden), nn.ReLU(inplace=True))
        self.outputs = nn.ModuleDict({k: nn.Linear(hidden, n) for k, n in outputs.items()})

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.trunk(x)
        return {k: layer(h) for k, layer in self.outputs.items()}


class AvodDetector(nn.Module):
    """See the module docstring. ``forward`` returns a dict: with ``proposals=None`` (training and inference) the
    RPN's ``anchors`` / ``anchor_batch`` / ``rpn_logits`` / ``rpn_deltas``, the ``proposals`` and
    ``proposal_batch`` it kept, and the second stage's ``cls_logits`` (K, C + 1), ``box_deltas`` (K, C, 6),
    ``orientation`` (K, 2) and ``direction`` (K, 2) on them; with fixed ``proposals`` (K, 6) and
    ``proposal_batch`` (K,) only the second stage runs, and ``second`` (K, C + 1 + 6 C + 4) holds all its outputs."""

    def __init__(self, cfg: AvodConfig) -> None:
        super().__init__()
        self.cfg = cfg
        if "camera" in cfg.modalities:
            self.image_fpn = FeaturePyramid(3, cfg.channels, cfg.feature_channels, cfg.bottleneck)
        if "lidar" in cfg.modalities:
            self.bev_fpn = FeaturePyramid(cfg.height_slices + 1, cfg.channels, cfg.feature_channels, cfg.bottleneck)
        n_cls = len(cfg.classes)
        self.rpn_fusion, self.fusion = CropFusion(), CropFusion()
        self.rpn = _Head(cfg.bottleneck * cfg.rpn_crop ** 2, cfg.rpn_hidden, {"objectness": 1, "deltas": 6})
        self.second = _Head(cfg.bottleneck * cfg.crop ** 2, cfg.hidden,
                            {"cls": n_cls + 1, "box": 6 * n_cls, "orientation": 2, "direction": 2})
        self.roi_align: Callable[..., torch.Tensor] = roi_align  # roi_align_torch where double backward is needed
        anchors, anchor_cls = make_anchors(cfg)
        self.register_buffer("anchors", anchors, persistent=False)
        self.register_buffer("anchor_cls", anchor_cls, persistent=False)
        self.register_buffer("mean", torch.tensor(cfg.image_mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(cfg.image_std).view(1, 3, 1, 1), persistent=False)

    def features(self, image: torch.Tensor | None, bev: torch.Tensor | None) -> dict[str, torch.Tensor]:
        out = {}
        if "camera" in self.cfg.modalities:
            out["camera"] = self.image_fpn((image - self.mean) / self.std)
        if "lidar" in self.cfg.modalities:
            out["lidar"] = self.bev_fpn(bev)
        return out

    def crops(self, feats: dict[str, torch.Tensor], boxes: torch.Tensor, batch: torch.Tensor,
              lidar_to_image: torch.Tensor, size: int) -> list[torch.Tensor]:
        """Each view's ``roi_align`` crops ``(N, bottleneck, size, size)`` of axis-aligned boxes ``(N, 6)`` of
        samples ``batch``, in the order of ``cfg.modalities``."""
        views = []
        for view in self.cfg.modalities:
            if view == "lidar":
                rois = bev_boxes(boxes, self.cfg)
            else:
                rois = boxes.new_zeros(len(boxes), 4)
                for b in range(len(lidar_to_image)):
                    sel = batch == b
                    rois[sel] = image_boxes(boxes[sel], lidar_to_image[b], tuple(feats[view].shape[-2:]))
            rois = torch.cat([batch[:, None].to(boxes.dtype), rois], 1)
            views.append(self.roi_align(feats[view], rois, size, spatial_scale=1.0, sampling_ratio=2, aligned=True))
        return views

    def valid_anchors(self, bev: torch.Tensor | None, lidar_to_image: torch.Tensor,
                      image_size: tuple[int, int]) -> list[torch.Tensor]:
        """Per sample, indices of anchors whose centre projects into the image and, with LiDAR, whose footprint
        holds at least one point (the density channel of ``bev``)."""
        anchors = self.anchors
        out = []
        for b in range(len(lidar_to_image)):
            m = lidar_to_image[b]
            uvw = anchors[:, :3] @ m[:, :3].T + m[:, 3]
            h, w = image_size
            uv = uvw[:, :2] / uvw[:, 2:].clamp(min=1e-3)
            keep = (uvw[:, 2] > 0.5) & (uv[:, 0] >= 0) & (uv[:, 0] < w) & (uv[:, 1] >= 0) & (uv[:, 1] < h)
            if "lidar" in self.cfg.modalities and bev is not None:
                occupied = (bev[b, -1] > 0).float()
                integral = F.pad(occupied.cumsum(0).cumsum(1), (1, 0, 1, 0))
                cells = bev_boxes(anchors, self.cfg)
                iy1, ix1 = cells[:, 0].floor().clamp(0, integral.shape[1] - 1).long(), \
                    cells[:, 1].floor().clamp(0, integral.shape[0] - 1).long()
                iy2, ix2 = cells[:, 2].ceil().clamp(0, integral.shape[1] - 1).long(), \
                    cells[:, 3].ceil().clamp(0, integral.shape[0] - 1).long()
                count = integral[ix2, iy2] - integral[ix1, iy2] - integral[ix2, iy1] + integral[ix1, iy1]
                keep &= count > 0
            out.append(torch.nonzero(keep)[:, 0])
        return out

    def rpn_stage(self, feats: dict[str, torch.Tensor], bev: torch.Tensor | None, lidar_to_image: torch.Tensor,
                  image_size: tuple[int, int]) -> dict[str, torch.Tensor]:
        """Objectness and box regression of the valid anchors of every sample, and the proposals kept."""
        idx = self.valid_anchors(bev, lidar_to_image, image_size)
        batch = torch.cat([torch.full((len(i),), b, dtype=torch.long, device=lidar_to_image.device)
                           for b, i in enumerate(idx)])
        anchors = self.anchors[torch.cat(idx)]
        rpn = self.rpn(self.rpn_fusion(*self.crops(feats, anchors, batch, lidar_to_image, self.cfg.rpn_crop)))
        logits = rpn["objectness"][:, 0]
        proposals, proposal_batch = self.propose(anchors, batch, logits.detach(), rpn["deltas"].detach(),
                                                 len(lidar_to_image))
        return {"anchors": anchors, "anchor_batch": batch, "anchor_cls": self.anchor_cls[torch.cat(idx)],
                "rpn_logits": logits, "rpn_deltas": rpn["deltas"], "proposals": proposals,
                "proposal_batch": proposal_batch}

    def forward(self, image: torch.Tensor, bev: torch.Tensor, lidar_to_image: torch.Tensor,
                proposals: torch.Tensor | None = None,
                proposal_batch: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        feats = self.features(image, bev)
        out: dict[str, torch.Tensor] = {}
        if proposals is None:
            out.update(self.rpn_stage(feats, bev, lidar_to_image, tuple(image.shape[-2:])))
            proposals, proposal_batch = out["proposals"], out["proposal_batch"]
        elif proposal_batch is None:
            raise ValueError("AvodDetector: fixed proposals need proposal_batch (the sample of each)")
        else:
            out.update(proposals=proposals, proposal_batch=proposal_batch)
        out.update(self.second_stage(feats, proposals, proposal_batch, lidar_to_image))
        return out

    def second_stage(self, feats: dict[str, torch.Tensor], proposals: torch.Tensor, batch: torch.Tensor,
                     lidar_to_image: torch.Tensor) -> dict[str, torch.Tensor]:
        head = self.second(self.fusion(*self.crops(feats, proposals, batch, lidar_to_image, self.cfg.crop)))
        n_cls = len(self.cfg.classes)
        return {"cls_logits": head["cls"], "box_deltas": head["box"].view(-1, n_cls, 6),
                "orientation": head["orientation"], "direction": head["direction"],
                "second": torch.cat([head["cls"], head["box"], head["orientation"], head["direction"]], 1)}

    def propose(self, anchors: torch.Tensor, batch: torch.Tensor, logits: torch.Tensor, deltas: torch.Tensor,
                batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Decoded RPN boxes: per sample the ``rpn_pre_nms`` best, BEV NMS, then the ``rpn_post_nms`` best."""
        boxes = decode_aa(deltas, anchors)
        keep_boxes, keep_batch = [], []
        for b in range(batch_size):
            sel = torch.nonzero(batch == b)[:, 0]
            top = sel[torch.argsort(logits[sel], descending=True)[: self.cfg.rpn_pre_nms]]
            bx = boxes[top]
            flat = torch.stack([bx[:, 0] - bx[:, 3] / 2, bx[:, 1] - bx[:, 4] / 2,
                                bx[:, 0] + bx[:, 3] / 2, bx[:, 1] + bx[:, 4] / 2], 1)
            kept = nms(flat, logits[top], self.cfg.rpn_nms_iou)[: self.cfg.rpn_post_nms]
            keep_boxes.append(bx[kept])
            keep_batch.append(torch.full((len(kept),), b, dtype=torch.long, device=boxes.device))
        return torch.cat(keep_boxes), torch.cat(keep_batch)

    def modality_groups(self) -> dict[str, list[str]]:
        """Parameter names per view backbone (its feature pyramid) and ``"fusion"`` for the RPN and second stage,
        the groups AlterMOMA masks alternately (paper section 3)."""
        groups: dict[str, list[str]] = {m: [] for m in self.cfg.modalities}
        groups["fusion"] = []
        for name, _ in self.named_parameters():
            owner = {"image_fpn": "camera", "bev_fpn": "lidar"}.get(name.split(".")[0], "fusion")
            groups[owner].append(name)
        return groups

    def describe(self) -> Any:
        """This detector to the analyses (:func:`fusionlens.models.avod_lmd.avod_spec`)."""
        from fusionlens.models.avod_lmd import avod_spec

        return avod_spec(self)
