"""Point modalities on the BEV voxel grid: radar rasterised with its metadata (SimpleBEV: 16 channels per
height bin), LiDAR voxelised as occupancy + mean intensity per height bin.

Points arrive zero-padded with a validity mask (``radar_valid``/``lidar_valid``); padded points and points
outside the grid are routed to a discarded "trash" slot, so they never touch the map. Every op is a plain
torch op on tensors (``index_add`` with indices computed from point coordinates), so the LMD engine can
trace the linear path from point features to the map.
"""

from __future__ import annotations

import torch
from torch import nn

from fusionlens.data.sample import LIDAR_FIELDS, RADAR_FIELDS, BEVGrid
from fusionlens.models.registry import register_point_encoder

# nominal magnitude of each radar metadata field (RADAR_FIELDS[3:]); dividing by it keeps the raster O(1)
RADAR_META_SCALE: tuple[float, ...] = (
    7.0,  # dyn_prop
    100.0,  # id
    30.0,  # rcs (dBsm)
    10.0, 10.0, 10.0, 10.0,  # vx, vy, vx_comp, vy_comp (m/s)
    1.0,  # is_quality_valid
    4.0,  # ambig_state
    10.0, 10.0,  # x_rms, y_rms
    17.0,  # invalid_state
    7.0,  # pdh0
    10.0, 10.0,  # vx_rms, vy_rms
    0.5,  # time_lag (s)
)
assert len(RADAR_META_SCALE) == len(RADAR_FIELDS) - 3


def check_point_inputs(modality: str, points: torch.Tensor, valid: torch.Tensor, fields: int) -> None:
    """Zero-padded points ``(B, P, fields)`` with a validity mask ``(B, P)``, else a ValueError naming them."""
    if points.dim() != 3 or points.shape[-1] != fields:
        raise ValueError(f"{modality}: expected points (B, P, {fields}), got {tuple(points.shape)}")
    if valid.shape != points.shape[:2]:
        raise ValueError(f"{modality}_valid: expected shape {tuple(points.shape[:2])}, got {tuple(valid.shape)}")


def rasterise(points: torch.Tensor, valid: torch.Tensor, values: torch.Tensor,
              grid: BEVGrid) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum ``values`` (B, P, V) of valid points (B, P, >=3 xyz) into voxels.

    Returns ``(sums, counts)``: ``(B, V, Z, X, Y)`` and ``(B, 1, Z, X, Y)``.
    """
    b, p = points.shape[:2]
    X, Y, Z = grid.shape
    idx, inside = grid.to_index(points[..., :3])
    keep = inside & valid.bool()
    n_vox = Z * X * Y
    flat = (idx[..., 2] * X + idx[..., 0]) * Y + idx[..., 1]
    batch_off = torch.arange(b, device=points.device).unsqueeze(1) * n_vox
    trash = b * n_vox  # one extra slot collects padded / out-of-grid points and is dropped
    flat = torch.where(keep, flat + batch_off, torch.full_like(flat, trash)).reshape(-1)
    vals = values.reshape(b * p, -1)
    sums = torch.zeros(b * n_vox + 1, vals.shape[1], dtype=vals.dtype, device=vals.device)
    sums = sums.index_add(0, flat, vals)
    ones = torch.ones(b * p, 1, dtype=vals.dtype, device=vals.device)
    counts = torch.zeros(b * n_vox + 1, 1, dtype=vals.dtype, device=vals.device).index_add(0, flat, ones)
    sums = sums[:-1].reshape(b, Z, X, Y, -1).permute(0, 4, 1, 2, 3)
    counts = counts[:-1].reshape(b, Z, X, Y, 1).permute(0, 4, 1, 2, 3)
    return sums, counts


class RasterEncoder(nn.Module):
    """Rasterise a point modality into ``(B, V*Z, X, Y)`` and optionally apply ``layers`` learnable
    3x3 conv + BatchNorm + ReLU blocks of ``channels`` channels (0 layers = SimpleBEV's parameter-free
    branch).

    radar: mean of the 16 scaled metadata fields per voxel (``use_metadata``) or occupancy only.
    lidar: occupancy (any point) and mean intensity / ``intensity_scale`` per voxel.
    """

    def __init__(self, modality: str, grid: BEVGrid, *, use_metadata: bool = True, layers: int = 0,
                 channels: int = 32, intensity_scale: float = 255.0) -> None:
        super().__init__()
        if modality not in ("radar", "lidar"):
            raise ValueError(f"RasterEncoder: modality must be 'radar' or 'lidar', got {modality!r}")
        if intensity_scale <= 0:
            raise ValueError(f"RasterEncoder: intensity_scale must be positive, got {intensity_scale}")
        self.modality, self.grid, self.use_metadata = modality, grid, use_metadata
        self.intensity_scale = float(intensity_scale)
        self.in_fields = len(RADAR_FIELDS) if modality == "radar" else len(LIDAR_FIELDS)
        per_bin = (len(RADAR_FIELDS) - 3 if use_metadata else 1) if modality == "radar" else 2
        self.raster_channels = per_bin * grid.shape[2]
        self.register_buffer("meta_scale", torch.tensor(RADAR_META_SCALE), persistent=False)
        blocks: list[nn.Module] = []
        in_ch = self.raster_channels
        for _ in range(layers):
            blocks += [nn.Conv2d(in_ch, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels),
                       nn.ReLU()]
            in_ch = channels
        self.convs = nn.Sequential(*blocks)
        self.out_channels = in_ch

    def raster(self, points: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """The parameter-free BEV raster ``(B, V*Z, X, Y)``."""
        check_point_inputs(self.modality, points, valid, self.in_fields)
        if self.modality == "radar":
            if self.use_metadata:
                values = points[..., 3:] / self.meta_scale.to(points.dtype)
            else:
                values = torch.ones_like(points[..., :1])
            sums, counts = rasterise(points, valid, values, self.grid)
            feats = sums / counts.clamp(min=1.0) if self.use_metadata else counts.clamp(max=1.0)
        else:
            values = points[..., 3:4] / self.intensity_scale
            sums, counts = rasterise(points, valid, values, self.grid)
            feats = torch.cat([counts.clamp(max=1.0), sums / counts.clamp(min=1.0)], dim=1)
        b, v, z, x, y = feats.shape
        return feats.reshape(b, v * z, x, y)

    def forward(self, points: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        return self.convs(self.raster(points, valid))


register_point_encoder("raster", RasterEncoder)
