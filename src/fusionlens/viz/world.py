"""Figures of one sample: the six cameras as a mosaic (nuScenes' layout) and the bird's-eye view with the LiDAR
and radar points, the ground-truth boxes and the vehicle mask."""

from __future__ import annotations

import math
import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from matplotlib.patches import Polygon  # noqa: E402

from fusionlens.data.sample import CAMERA_NAMES, CLASSES, RADAR_FIELDS, VEHICLE_CLASSES, Sample  # noqa: E402
from fusionlens.io import atomic_save_with  # noqa: E402

# Mosaic as nuScenes shows it: front row left-to-right, back row mirrored so left stays left.
_MOSAIC = (("CAM_FRONT_LEFT", "CAM_FRONT", "CAM_FRONT_RIGHT"), ("CAM_BACK_LEFT", "CAM_BACK", "CAM_BACK_RIGHT"))
_VEH = {CLASSES.index(c) for c in VEHICLE_CLASSES}


def box_corners_xy(boxes: torch.Tensor) -> np.ndarray:
    """Footprint corners ``(N, 4, 2)`` of boxes ``(N, >=7)`` (x, y, z, w, l, h, yaw)."""
    b = boxes.detach().cpu().numpy().astype(np.float64)
    hl, hw = b[:, 4] / 2, b[:, 3] / 2
    local = np.stack([np.stack([hl, hw], 1), np.stack([hl, -hw], 1), np.stack([-hl, -hw], 1),
                      np.stack([-hl, hw], 1)], axis=1)  # (N, 4, 2)
    c, s = np.cos(b[:, 6])[:, None], np.sin(b[:, 6])[:, None]
    x = local[..., 0] * c - local[..., 1] * s + b[:, 0:1]
    y = local[..., 0] * s + local[..., 1] * c + b[:, 1:2]
    return np.stack([x, y], axis=-1)


def camera_mosaic(sample: Sample) -> np.ndarray:
    """(2H, 3W, 3) uint8 mosaic of the six cameras (black where a camera is missing)."""
    if sample.images is None:
        raise ValueError("sample has no camera images to show")
    imgs = sample.images.clamp(0, 1).mul(255).byte().permute(0, 2, 3, 1).numpy()
    names = sample.meta.get("camera_names", list(CAMERA_NAMES))
    h, w = imgs.shape[1:3]
    out = np.zeros((2 * h, 3 * w, 3), dtype=np.uint8)
    for r, row in enumerate(_MOSAIC):
        for c, name in enumerate(row):
            if name in names:
                out[r * h:(r + 1) * h, c * w:(c + 1) * w] = imgs[names.index(name)]
    return out


def draw_bev(ax: plt.Axes, sample: Sample, max_lidar: int = 40000) -> None:
    """BEV panel: vehicle mask (grey), invalid cells (hatched red), LiDAR by height, radar with velocity."""
    (x0, x1), (y0, y1) = sample.grid.bounds[0], sample.grid.bounds[1]
    # Maps are [ix, iy]: rows along ego x (drawn upwards), columns along ego y; the y axis is inverted below
    # so that left of the ego is on the left, as a driver sees the road ahead.
    extent = (y0, y1, x0, x1)
    ax.imshow(sample.bev_seg.numpy(), origin="lower", extent=extent, cmap="Greys", vmin=0, vmax=2.5,
              interpolation="nearest")
    invalid = np.ma.masked_where(sample.bev_valid.numpy() > 0.5, np.ones_like(sample.bev_valid.numpy()))
    ax.imshow(invalid, origin="lower", extent=extent, cmap="autumn", alpha=0.35, interpolation="nearest")
    if sample.lidar is not None and sample.lidar.shape[0]:
        pts = sample.lidar.numpy()[:max_lidar]
        ax.scatter(pts[:, 1], pts[:, 0], c=np.clip(pts[:, 2], -0.5, 4.0), s=0.8, cmap="viridis", alpha=0.8,
                   linewidths=0)
    if sample.radar is not None and sample.radar.shape[0]:
        r = sample.radar.numpy()
        f = {n: i for i, n in enumerate(RADAR_FIELDS)}
        ax.scatter(r[:, 1], r[:, 0], s=9, c="orangered", edgecolors="k", linewidths=0.3, zorder=4)
        ax.quiver(r[:, 1], r[:, 0], r[:, f["vy_comp"]], r[:, f["vx_comp"]], color="orangered", angles="xy",
                  scale_units="xy", scale=2.0, width=0.002, zorder=4)
    for corners, label in zip(box_corners_xy(sample.boxes), sample.box_labels.tolist()):
        colour = "royalblue" if label in _VEH else "limegreen"
        ax.add_patch(Polygon(corners[:, ::-1], closed=True, fill=False, edgecolor=colour, linewidth=0.9,
                             zorder=5))
    ax.add_patch(Polygon(np.array([[1.0, 3.9], [-1.0, 3.9], [-1.0, -1.1], [1.0, -1.1]]), closed=True,
                         color="crimson", zorder=6))
    ax.set_xlim(y1, y0)
    ax.set_ylim(x0, x1)
    ax.set_xlabel("ego y (m, left)")
    ax.set_ylabel("ego x (m, forward)")
    ax.set_aspect("equal")


def sample_title(sample: Sample) -> str:
    m = sample.meta
    where = f"{m.get('split', '?')}[{m.get('index', '?')}] seed {m.get('seed', '?')}"
    tags = ", ".join(m.get("tags", [])) or "-"
    return f"{where} | {m.get('layout', '')} | {tags} | ego {m.get('ego_speed', math.nan):.1f} m/s"


def plot_sample(sample: Sample, path: str | os.PathLike[str], dpi: int = 110) -> Path:
    """Write the camera mosaic and the BEV of ``sample`` to a PNG at ``path`` (atomically)."""
    mosaic = camera_mosaic(sample)
    fig = plt.figure(figsize=(15, 6.2))
    grid = fig.add_gridspec(1, 2, width_ratios=[mosaic.shape[1] / mosaic.shape[0] * 1.0, 1.0])
    ax_cam = fig.add_subplot(grid[0, 0])
    ax_cam.imshow(mosaic, interpolation="nearest")
    ax_cam.set_axis_off()
    ax_cam.set_title("cameras (front row: FL, F, FR; back row: BL, B, BR)", fontsize=9)
    ax_bev = fig.add_subplot(grid[0, 1])
    draw_bev(ax_bev, sample)
    ax_bev.set_title("BEV: LiDAR (height), radar (red, comp. velocity), boxes, mask", fontsize=9)
    fig.suptitle(sample_title(sample), fontsize=10)
    fig.tight_layout()
    target = Path(path)
    try:
        atomic_save_with(target, lambda tmp: fig.savefig(tmp, dpi=dpi, format="png"))
    finally:
        plt.close(fig)
    return target
