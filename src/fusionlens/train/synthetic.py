"""A small deterministic synthetic dataset in the :class:`~fusionlens.data.sample.Sample` schema, for tests
and smoke runs that must not depend on the simulated world: vehicles are random boxes; radar returns sit on
them (with plausible metadata) plus clutter; LiDAR hits their footprints plus ground; images are seeded
noise (the camera carries no signal here -- use the built-in world for camera experiments).
"""

from __future__ import annotations

import math

import torch
from torch.utils.data import Dataset

from fusionlens.data.labels import boxes_to_bev
from fusionlens.data.sample import CLASSES, LIDAR_FIELDS, RADAR_FIELDS, BEVGrid, Sample

TEST_GRID = BEVGrid(((-16.0, 16.0), (-16.0, 16.0), (-3.0, 3.0)), (32, 32, 4))


def _camera_rig(n_cameras: int, image_size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Cameras evenly spread in yaw at 1.5 m height, looking outwards; OpenCV camera axes."""
    h, w = image_size
    focal = w / (2 * math.tan(math.radians(60)))
    k = torch.tensor([[focal, 0, (w - 1) / 2], [0, focal, (h - 1) / 2], [0, 0, 1.0]])
    poses = []
    for i in range(n_cameras):
        yaw = 2 * math.pi * i / n_cameras
        forward = torch.tensor([math.cos(yaw), math.sin(yaw), 0.0])
        right = torch.tensor([math.sin(yaw), -math.cos(yaw), 0.0])
        down = torch.tensor([0.0, 0.0, -1.0])
        pose = torch.eye(4)
        pose[:3, :3] = torch.stack([right, down, forward], dim=1)
        pose[:3, 3] = torch.tensor([0.0, 0.0, 1.5])
        poses.append(pose)
    return k.expand(n_cameras, 3, 3).clone(), torch.stack(poses)


class SyntheticDataset(Dataset):
    """``length`` samples; sample ``i`` depends only on ``(seed, i)``."""

    def __init__(
        self,
        length: int,
        grid: BEVGrid = TEST_GRID,
        *,
        seed: int = 0,
        n_cameras: int = 2,
        image_size: tuple[int, int] = (32, 48),
        max_vehicles: int = 4,
    ) -> None:
        if length <= 0:
            raise ValueError(f"SyntheticDataset: length must be positive, got {length}")
        self.length, self.grid, self.seed = length, grid, seed
        self.n_cameras, self.image_size, self.max_vehicles = n_cameras, image_size, max_vehicles
        self.intrinsics, self.cam_to_ego = _camera_rig(n_cameras, image_size)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> Sample:
        if not 0 <= index < self.length:
            raise IndexError(index)
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        (x0, x1), (y0, y1), _ = self.grid.bounds
        nb = int(torch.randint(1, self.max_vehicles + 1, (1,), generator=gen))
        u = torch.rand(nb, 5, generator=gen)
        boxes = torch.zeros(nb, 9)
        boxes[:, 0] = x0 + 3 + u[:, 0] * (x1 - x0 - 6)
        boxes[:, 1] = y0 + 3 + u[:, 1] * (y1 - y0 - 6)
        boxes[:, 2] = 0.8
        boxes[:, 3] = 1.8 + 0.4 * u[:, 2]
        boxes[:, 4] = 4.0 + 1.0 * u[:, 3]
        boxes[:, 5] = 1.6
        boxes[:, 6] = u[:, 4] * math.pi
        labels = torch.full((nb,), CLASSES.index("car"), dtype=torch.long)
        maps = boxes_to_bev(boxes, labels, self.grid)

        per_box = 3
        jitter = (torch.rand(nb * per_box, 2, generator=gen) - 0.5) * 1.5
        radar = torch.zeros(nb * per_box + 4, len(RADAR_FIELDS))
        radar[: nb * per_box, :2] = boxes[:, :2].repeat_interleave(per_box, 0) + jitter
        radar[nb * per_box :, :2] = torch.rand(4, 2, generator=gen) * (x1 - x0) + x0  # clutter
        radar[:, 5] = torch.rand(radar.shape[0], generator=gen) * 10
        radar[: nb * per_box, 5] += 10.0  # vehicles reflect strongly
        lidar_hits = (torch.rand(nb * 20, 2, generator=gen) - 0.5) * 2.0 + boxes[:, :2].repeat_interleave(
            20, 0
        )
        ground = torch.rand(60, 2, generator=gen) * (x1 - x0) + x0
        lidar = torch.zeros(lidar_hits.shape[0] + 60, len(LIDAR_FIELDS))
        lidar[:, :2] = torch.cat([lidar_hits, ground])
        lidar[: lidar_hits.shape[0], 2] = 0.8
        lidar[:, 2] += -1.4 * (torch.arange(lidar.shape[0]) >= lidar_hits.shape[0])
        lidar[:, 3] = torch.rand(lidar.shape[0], generator=gen) * 255
        images = 0.5 + 0.1 * torch.randn(self.n_cameras, 3, *self.image_size, generator=gen)
        return Sample(
            images=images.clamp(0, 1),
            intrinsics=self.intrinsics,
            cam_to_ego=self.cam_to_ego,
            radar=radar,
            lidar=lidar,
            bev_seg=maps["seg"],
            bev_valid=maps["valid"],
            bev_center=maps["center"],
            bev_offset=maps["offset"],
            boxes=boxes,
            box_labels=labels,
            visibility={},
            grid=self.grid,
            meta={"index": index, "conditions": {"weather": "rain" if index % 2 else "clear"}, "faults": []},
        )
