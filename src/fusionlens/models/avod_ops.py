"""Geometry and crop operations of :mod:`fusionlens.models.avod`: axis-aligned 3-D boxes projected onto the BEV
map and into the image, the anchor grid, box encoding, and ``roi_align`` written in plain torch."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from fusionlens.models.avod import AvodConfig


def roi_align_torch(features: torch.Tensor, rois: torch.Tensor, output_size: int, spatial_scale: float = 1.0,
                    sampling_ratio: int = 2, aligned: bool = True) -> torch.Tensor:
    """``torchvision.ops.roi_align`` (a fixed ``sampling_ratio``) in plain torch indexing, with its sampling and
    border rules (a sample beyond one pixel outside the map is 0, one within is clamped to the edge), so that it
    can be differentiated twice -- torchvision's kernel has no double backward, which ProsPr's meta-gradient
    needs. ``rois`` ``(K, 5)`` = (sample, x1, y1, x2, y2)."""
    _, _, h, w = features.shape
    p, s = output_size, sampling_ratio
    offset = 0.5 if aligned else 0.0
    x1, y1 = rois[:, 1] * spatial_scale - offset, rois[:, 2] * spatial_scale - offset
    rw, rh = rois[:, 3] * spatial_scale - offset - x1, rois[:, 4] * spatial_scale - offset - y1
    if not aligned:
        rw, rh = rw.clamp(min=1.0), rh.clamp(min=1.0)
    steps = ((torch.arange(p)[:, None] * s + torch.arange(s)[None, :] + 0.5) / s).reshape(-1).to(rois)  # bin units
    ys = (y1[:, None] + steps[None] * (rh / p)[:, None])[:, :, None].expand(-1, p * s, p * s)
    xs = (x1[:, None] + steps[None] * (rw / p)[:, None])[:, None, :].expand(-1, p * s, p * s)
    inside = (ys >= -1.0) & (ys <= h) & (xs >= -1.0) & (xs <= w)  # False for NaN too
    # outside samples are zeroed below; keep their indices finite and in range (NaN or inf boxes from a diverged
    # regression would otherwise index at int64 min)
    ys = torch.where(inside, ys, torch.zeros_like(ys))
    xs = torch.where(inside, xs, torch.zeros_like(xs))

    def corners(v: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        v = v.clamp(min=0.0)
        low = v.floor().long()
        edge = low >= size - 1
        low = torch.where(edge, size - 1, low)
        high = torch.where(edge, size - 1, low + 1)
        frac = torch.where(edge, torch.zeros_like(v), v - low.to(v.dtype))
        return low, high, frac

    yl, yh, ly = corners(ys, h)
    xl, xh, lx = corners(xs, w)
    b = rois[:, 0].long()[:, None, None]
    value = (((1 - ly) * (1 - lx))[..., None] * features[b, :, yl, xl]
             + ((1 - ly) * lx)[..., None] * features[b, :, yl, xh]
             + (ly * (1 - lx))[..., None] * features[b, :, yh, xl] + (ly * lx)[..., None] * features[b, :, yh, xh])
    value = value * inside[..., None].to(value.dtype)  # (K, P*S, P*S, C)
    k, c = value.shape[0], value.shape[-1]
    return value.view(k, p, s, p, s, c).mean(dim=(2, 4)).permute(0, 3, 1, 2)


def box_corners_aa(boxes: torch.Tensor) -> torch.Tensor:
    """Corners ``(N, 8, 3)`` of axis-aligned 3-D boxes ``(N, 6)`` = (x, y, z, extent x, extent y, h)."""
    sign = torch.tensor([[i, j, k] for i in (-0.5, 0.5) for j in (-0.5, 0.5) for k in (-0.5, 0.5)],
                        dtype=boxes.dtype, device=boxes.device)
    return boxes[:, None, :3] + sign[None] * boxes[:, None, 3:6]


def image_boxes(boxes: torch.Tensor, lidar_to_image: torch.Tensor, image_size: tuple[int, int]) -> torch.Tensor:
    """``(N, 4)`` image boxes (u1, v1, u2, v2) enclosing the projections of axis-aligned boxes ``(N, 6)``, clipped to
    the image; corners behind the camera are projected from just in front of it (depth 0.1 m)."""
    corners = box_corners_aa(boxes)
    uvw = corners @ lidar_to_image[:, :3].T + lidar_to_image[:, 3]
    uv = uvw[..., :2] / uvw[..., 2:].clamp(min=0.1)
    h, w = image_size
    lo, hi = uv.amin(1), uv.amax(1)
    return torch.stack([lo[:, 0].clamp(0, w), lo[:, 1].clamp(0, h), hi[:, 0].clamp(0, w), hi[:, 1].clamp(0, h)], 1)


def bev_boxes(boxes: torch.Tensor, cfg: AvodConfig) -> torch.Tensor:
    """``(N, 4)`` roi_align boxes on the BEV map of axis-aligned boxes ``(N, 6)``: (iy1, ix1, iy2, ix2) in cells,
    since the map's width axis is y and its height axis x."""
    (x0, _), (y0, _), _ = cfg.area
    ix1 = (boxes[:, 0] - boxes[:, 3] / 2 - x0) / cfg.cell
    ix2 = (boxes[:, 0] + boxes[:, 3] / 2 - x0) / cfg.cell
    iy1 = (boxes[:, 1] - boxes[:, 4] / 2 - y0) / cfg.cell
    iy2 = (boxes[:, 1] + boxes[:, 4] / 2 - y0) / cfg.cell
    return torch.stack([iy1, ix1, iy2, ix2], 1)


def make_anchors(cfg: AvodConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Axis-aligned anchors ``(A, 6)`` on the BEV grid (each class's size at 0 and 90 degrees) and their class."""
    (x0, x1), (y0, y1), _ = cfg.area
    step = cfg.cell * cfg.anchor_stride
    xs = torch.arange(x0 + step / 2, x1, step)
    ys = torch.arange(y0 + step / 2, y1, step)
    gx, gy = torch.meshgrid(xs, ys, indexing="ij")
    rows, cls = [], []
    for c, ((w, length, h), z) in enumerate(zip(cfg.anchor_sizes, cfg.anchor_z)):
        for ex, ey in ((length, w), (w, length)):
            rows.append(torch.stack([gx.ravel(), gy.ravel(), torch.full_like(gx.ravel(), z),
                                     torch.full_like(gx.ravel(), ex), torch.full_like(gx.ravel(), ey),
                                     torch.full_like(gx.ravel(), h)], 1))
            cls.append(torch.full((gx.numel(),), c, dtype=torch.long))
    return torch.cat(rows), torch.cat(cls)


def encode_aa(boxes: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Regression targets of axis-aligned boxes against references (both ``(N, 6)``): offsets over the extents,
    log size ratios."""
    return torch.cat([(boxes[:, :3] - reference[:, :3]) / reference[:, 3:6],
                      torch.log(boxes[:, 3:6].clamp(min=1e-3) / reference[:, 3:6])], 1)


def decode_aa(deltas: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    return torch.cat([reference[:, :3] + deltas[:, :3] * reference[:, 3:6],
                      reference[:, 3:6] * torch.exp(deltas[:, 3:6].clamp(max=4.0))], 1)
