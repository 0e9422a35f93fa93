"""PointPillars-style learnable point encoder (Lang et al., CVPR 2019, Sec. 2.1-2.2) for LiDAR and radar.

Pipeline, for zero-padded points ``(B, P, F)`` with a validity mask ``(B, P)``:

1. **Pillar index.** Each real point inside the grid's x/y/z bounds gets the pillar (BEV cell) it falls in,
   ``pid = b*X*Y + ix*Y + iy``; padded and out-of-grid points are dropped by a boolean index.
2. **Point decoration** (paper Sec. 2.1): the chosen raw fields (xyz, intensity or radar fields), the
   offset of the point to the arithmetic mean of its pillar's points (x_c, y_c, z_c) and to the pillar's
   centre (x_p, y_p) — the PointPillars decoration, D = len(fields) + 5.
3. **PointNet** (Sec. 2.1): ``Linear (no bias) -> BatchNorm1d -> ReLU`` per point, one or more layers.
4. **Max-pool over the points of each pillar and scatter to the BEV canvas**, in one op:
   ``canvas.scatter_reduce(0, pid, features, reduce="amax", include_self=False)`` on a zero canvas (the form
   docs/DESIGN.md names for the LMD engine): a pillar holds the max over its points, an empty one stays 0.
5. **2-D backbone** (Sec. 2.2, reduced): a stride-1 block and a stride-2 block of ``3x3 conv ->
   BatchNorm -> ReLU``; the coarse block is upsampled bilinearly to the grid and projected by ``1x1 conv ->
   BN -> ReLU``; the two are concatenated. Output ``(B, 2*channels, X, Y)`` on the model's grid.

Ops the LMD engine sees (for its rule set), in order: boolean-mask indexing ``points[keep]`` (``aten::index``,
a constant selection), slicing, ``index_add`` (pillar sums, constant indices), division by constant counts,
``index_select`` (gather of pillar means, constant indices), subtraction, ``cat``, ``nn.Linear``,
``nn.BatchNorm1d`` (subclass :class:`PointBatchNorm`), ``nn.ReLU``, ``Tensor.scatter_reduce(reduce="amax")``
with constant indices (the max-pool: a selection, the winning point per pillar and channel is
``canvas[pid] == features``), ``reshape``/``permute``, ``nn.Conv2d``, ``nn.BatchNorm2d``, ``F.interpolate``
(bilinear). Every index comes from point *coordinates* through ``floor`` and integer arithmetic, so it has no
gradient and is constant for a given input. No op is in-place.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from fusionlens.data.sample import LIDAR_FIELDS, RADAR_FIELDS, BEVGrid
from fusionlens.models.points import check_point_inputs
from fusionlens.models.registry import register_point_encoder

DEFAULT_FIELDS: dict[str, tuple[str, ...]] = {
    "lidar": ("x", "y", "z", "intensity"),
    # radar: position, radar cross-section, ego-motion-compensated velocity, dynamic property, sweep age
    "radar": ("x", "y", "z", "rcs", "vx_comp", "vy_comp", "dyn_prop", "time_lag"),
}
ALL_FIELDS: dict[str, tuple[str, ...]] = {"lidar": LIDAR_FIELDS, "radar": RADAR_FIELDS}


class PointBatchNorm(nn.BatchNorm1d):
    """BatchNorm1d over the real points of a batch. With fewer than two points in training (a nearly empty
    radar sweep) the batch has no variance to normalise by, so it uses the running statistics instead of
    failing; in eval mode it is exactly ``nn.BatchNorm1d``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and x.shape[0] < 2:
            return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                                training=False, eps=self.eps)
        return super().forward(x)


def _conv_bn_relu(cin: int, cout: int, kernel: int = 3, stride: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, kernel, stride=stride, padding=kernel // 2, bias=False),
            nn.BatchNorm2d(cout), nn.ReLU()]


def pillar_index(
    points: torch.Tensor, valid: torch.Tensor, grid: BEVGrid
) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat pillar ids ``b*X*Y + ix*Y + iy`` of the kept points and the ``(B, P)`` bool mask of kept points
    (real, and inside the grid's x, y and z bounds)."""
    idx, inside = grid.to_index(points[..., :3])
    keep = inside & valid.bool()
    X, Y, _ = grid.shape
    batch = torch.arange(points.shape[0], device=points.device).unsqueeze(1).expand_as(keep)
    pid = (batch * X + idx[..., 0]) * Y + idx[..., 1]
    return pid[keep], keep


class PillarEncoder(nn.Module):
    """PointPillars-style encoder for one point modality (see the module docstring for the pipeline).

    Args:
        modality: ``"lidar"`` or ``"radar"``; sets the input fields (``LIDAR_FIELDS`` / ``RADAR_FIELDS``).
        grid: the model's BEV grid; pillars are its x/y cells.
        fields: names of the raw per-point fields to decorate (default :data:`DEFAULT_FIELDS`); must include
            ``x``, ``y``, ``z``.
        pointnet_channels: widths of the PointNet layers (the last is the pillar feature width).
        channels: width of the 2-D backbone; the output has ``2 * channels`` channels.
        layers: 3x3 conv blocks per backbone stage (>= 1).
    """

    def __init__(self, modality: str, grid: BEVGrid, *, fields: Sequence[str] | None = None,
                 pointnet_channels: Sequence[int] = (32,), channels: int = 32, layers: int = 1) -> None:
        super().__init__()
        if modality not in ALL_FIELDS:
            raise ValueError(f"PillarEncoder: modality must be 'lidar' or 'radar', got {modality!r}")
        names = tuple(DEFAULT_FIELDS[modality] if fields is None else fields)
        unknown = [f for f in names if f not in ALL_FIELDS[modality]]
        if unknown or not {"x", "y", "z"} <= set(names) or len(set(names)) != len(names):
            raise ValueError(f"PillarEncoder: fields must be distinct {modality} fields including x, y, z "
                             f"(from {ALL_FIELDS[modality]}), got {list(names)}")
        widths = [int(c) for c in pointnet_channels]
        if not widths or min(widths) <= 0:
            raise ValueError(f"PillarEncoder: pointnet_channels must be positive, got {pointnet_channels}")
        if int(channels) <= 0 or int(layers) < 1:
            raise ValueError(f"PillarEncoder: need channels > 0 and layers >= 1, got {channels}, {layers}")
        self.modality, self.grid, self.fields = modality, grid, names
        self.in_fields = len(ALL_FIELDS[modality])
        self.register_buffer("field_index", torch.tensor([ALL_FIELDS[modality].index(f) for f in names]),
                             persistent=False)
        lo = torch.tensor([grid.bounds[0][0], grid.bounds[1][0]])
        self.register_buffer("cell_lo", lo, persistent=False)
        self.register_buffer("cell_size", torch.tensor(grid.cell_size[:2]), persistent=False)
        pointnet: list[nn.Module] = []
        prev = len(names) + 5
        for w in widths:
            pointnet += [nn.Linear(prev, w, bias=False), PointBatchNorm(w), nn.ReLU()]
            prev = w
        self.pointnet = nn.Sequential(*pointnet)
        self.pillar_channels = prev
        c = int(channels)
        self.block1 = nn.Sequential(*[m for i in range(layers)
                                      for m in _conv_bn_relu(prev if i == 0 else c, c)])
        self.block2 = nn.Sequential(*_conv_bn_relu(c, 2 * c, stride=2),
                                    *[m for _ in range(layers - 1) for m in _conv_bn_relu(2 * c, 2 * c)])
        self.up2 = nn.Sequential(*_conv_bn_relu(2 * c, c, kernel=1))
        self.out_channels = 2 * c

    def decorate(self, points: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Decorated features ``(N, len(fields) + 5)`` of the N kept points and their pillar ids ``(N,)``."""
        check_point_inputs(self.modality, points, valid, self.in_fields)
        pid, keep = pillar_index(points, valid, self.grid)
        pts = points[keep]  # (N, F): real points inside the grid
        xyz = pts[:, :3]
        n_pillars = points.shape[0] * self.grid.shape[0] * self.grid.shape[1]
        sums = torch.zeros(n_pillars, 3, dtype=pts.dtype, device=pts.device).index_add(0, pid, xyz)
        ones = torch.ones(pid.shape[0], 1, dtype=pts.dtype, device=pts.device)
        counts = torch.zeros(n_pillars, 1, dtype=pts.dtype, device=pts.device).index_add(0, pid, ones)
        means = sums / counts.clamp(min=1.0)
        to_mean = xyz - means.index_select(0, pid)
        Y = self.grid.shape[1]
        cell = torch.stack([(pid // Y) % self.grid.shape[0], pid % Y], dim=1).to(pts.dtype)
        centre = self.cell_lo.to(pts.dtype) + (cell + 0.5) * self.cell_size.to(pts.dtype)
        to_centre = xyz[:, :2] - centre
        return torch.cat([pts.index_select(1, self.field_index), to_mean, to_centre], dim=1), pid

    def scatter(self, features: torch.Tensor, pid: torch.Tensor, batch: int) -> torch.Tensor:
        """Max-pool point features ``(N, C)`` (>= 0) per pillar onto the BEV canvas ``(B, C, X, Y)``."""
        X, Y, _ = self.grid.shape
        canvas = torch.zeros(batch * X * Y, features.shape[1], dtype=features.dtype, device=features.device)
        index = pid.unsqueeze(1).expand(-1, features.shape[1])
        canvas = canvas.scatter_reduce(0, index, features, reduce="amax", include_self=False)
        return canvas.reshape(batch, X, Y, -1).permute(0, 3, 1, 2)

    def pillars(self, points: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """The pillar feature canvas ``(B, pillar_channels, X, Y)`` before the 2-D backbone."""
        feats, pid = self.decorate(points, valid)
        return self.scatter(self.pointnet(feats), pid, points.shape[0])

    def forward(self, points: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        x1 = self.block1(self.pillars(points, valid))
        x2 = self.block2(x1)
        up = F.interpolate(x2, size=x1.shape[-2:], mode="bilinear", align_corners=False)
        return torch.cat([x1, self.up2(up)], dim=1)


register_point_encoder("pillars", PillarEncoder)
