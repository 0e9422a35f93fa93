"""The one data schema every source fills: the built-in world and real nuScenes alike.

Conventions (shared by every module; change them only here):

* Frames: the ego frame is x forward, y left, z up (metres), as nuScenes' ego pose. Points (LiDAR, radar) are
  given in the ego frame of the sample's reference time. Cameras: ``cam_to_ego`` maps camera coordinates
  (x right, y down, z forward, OpenCV) to the ego frame; ``intrinsics`` is the 3x3 pinhole matrix in pixels of
  the stored (possibly resized) image.
* BEV grid: :class:`BEVGrid` with bounds in metres and a shape ``(X, Y, Z)``; a BEV map is indexed ``[ix, iy]``
  with ``ix`` along ego x (forward) and ``iy`` along ego y (left); voxel features are ``(C, Z, X, Y)`` and are
  compressed to ``(C*Z, X, Y)``.
* Radar points carry :data:`RADAR_FIELDS` (the 18 nuScenes radar fields, then the sweep's time lag in seconds);
  LiDAR points carry :data:`LIDAR_FIELDS`.
* Boxes are ``(N, 9)``: centre x, y, z, size w (across), l (along heading), h, yaw (rad, about z, 0 = +x),
  then velocity vx, vy (m/s, ego frame) — see :data:`BOX_FIELDS`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

RADAR_FIELDS: tuple[str, ...] = (
    "x", "y", "z", "dyn_prop", "id", "rcs", "vx", "vy", "vx_comp", "vy_comp", "is_quality_valid",
    "ambig_state", "x_rms", "y_rms", "invalid_state", "pdh0", "vx_rms", "vy_rms", "time_lag",
)
LIDAR_FIELDS: tuple[str, ...] = ("x", "y", "z", "intensity", "ring")
BOX_FIELDS: tuple[str, ...] = ("x", "y", "z", "w", "l", "h", "yaw", "vx", "vy")
VEHICLE_CLASSES: tuple[str, ...] = ("car", "truck", "bus", "trailer", "construction_vehicle")
CLASSES: tuple[str, ...] = VEHICLE_CLASSES + ("pedestrian",)
CAMERA_NAMES: tuple[str, ...] = (
    "CAM_FRONT", "CAM_FRONT_RIGHT", "CAM_BACK_RIGHT", "CAM_BACK", "CAM_BACK_LEFT", "CAM_FRONT_LEFT",
)
RADAR_NAMES: tuple[str, ...] = (
    "RADAR_FRONT", "RADAR_FRONT_LEFT", "RADAR_FRONT_RIGHT", "RADAR_BACK_LEFT", "RADAR_BACK_RIGHT",
)


@dataclass(frozen=True)
class BEVGrid:
    """An axis-aligned voxel grid in the ego frame: ``bounds`` = ((xmin, xmax), (ymin, ymax), (zmin, zmax))."""

    bounds: tuple[tuple[float, float], tuple[float, float], tuple[float, float]] = (
        (-50.0, 50.0), (-50.0, 50.0), (-5.0, 5.0),
    )
    shape: tuple[int, int, int] = (100, 100, 8)

    def __post_init__(self) -> None:
        if len(self.shape) != 3 or any(int(n) <= 0 for n in self.shape):
            raise ValueError(f"BEVGrid.shape must be three positive integers, got {self.shape!r}")
        for axis, (lo, hi) in zip("xyz", self.bounds):
            if not hi > lo:
                raise ValueError(f"BEVGrid.bounds for {axis} must have max > min, got ({lo}, {hi})")

    @property
    def cell_size(self) -> tuple[float, float, float]:
        return tuple((hi - lo) / n for (lo, hi), n in zip(self.bounds, self.shape))  # type: ignore[return-value]

    def cell_centres(self, axis: int) -> torch.Tensor:
        (lo, hi), n = self.bounds[axis], self.shape[axis]
        step = (hi - lo) / n
        return lo + step * (torch.arange(n, dtype=torch.float32) + 0.5)

    def to_index(self, xyz: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Voxel index ``(N, 3)`` (long) of points ``(N, >=3)`` and a bool mask of those inside the grid."""
        lo = torch.tensor([b[0] for b in self.bounds], dtype=xyz.dtype, device=xyz.device)
        size = torch.tensor(self.cell_size, dtype=xyz.dtype, device=xyz.device)
        idx = torch.floor((xyz[..., :3] - lo) / size).long()
        shape = torch.tensor(self.shape, device=xyz.device)
        inside = ((idx >= 0) & (idx < shape)).all(dim=-1)
        return idx, inside


@dataclass
class Sample:
    """One multi-sensor sample. Tensors are CPU float32 unless stated; absent modalities are ``None``."""

    images: torch.Tensor | None  # (Ncam, 3, H, W) in [0, 1]
    intrinsics: torch.Tensor  # (Ncam, 3, 3)
    cam_to_ego: torch.Tensor  # (Ncam, 4, 4)
    radar: torch.Tensor | None  # (Nr, len(RADAR_FIELDS))
    lidar: torch.Tensor | None  # (Nl, len(LIDAR_FIELDS))
    bev_seg: torch.Tensor  # (X, Y) float {0, 1}: vehicle occupancy
    bev_valid: torch.Tensor  # (X, Y) float {0, 1}: where the label counts
    bev_center: torch.Tensor  # (X, Y) Gaussian instance-centre heatmap in [0, 1]
    bev_offset: torch.Tensor  # (2, X, Y) metres from each vehicle cell to its instance centre (x, y)
    boxes: torch.Tensor  # (Nb, 9), BOX_FIELDS
    box_labels: torch.Tensor  # (Nb,) long, index into CLASSES
    visibility: dict[str, torch.Tensor]  # per-object, per-sensor truth; each (Nb, ...) — see the world's docs
    grid: BEVGrid
    meta: dict[str, Any] = field(default_factory=dict)  # conditions, faults, seed/split/index or nuScenes tokens
