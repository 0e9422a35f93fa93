"""The ``paper`` preset (SimpleBEV as in LMD Table 3: ResNet-101, six 224x400 images, 200x200x8 grid)
builds and runs a forward and backward pass at its real size (batch 1)."""

from __future__ import annotations

import pytest
import torch

from fusionlens.data.sample import LIDAR_FIELDS, RADAR_FIELDS
from fusionlens.models import build_model, preset_config


@pytest.mark.slow
def test_paper_preset_forward_backward() -> None:
    torch.manual_seed(0)
    cfg = preset_config("paper", "camera,radar,lidar")
    assert (cfg.camera_depth, cfg.image_size, cfg.grid.shape) == (101, (224, 400), (200, 200, 8))
    model = build_model(cfg)
    h, w = cfg.image_size
    k = torch.tensor([[200.0, 0, (w - 1) / 2], [0, 200.0, (h - 1) / 2], [0, 0, 1]])
    radar = torch.zeros(1, 200, len(RADAR_FIELDS))
    radar[..., :2] = torch.rand(1, 200, 2) * 100 - 50
    lidar = torch.zeros(1, 4000, len(LIDAR_FIELDS))
    lidar[..., :3] = torch.rand(1, 4000, 3) * 20 - 10
    out = model(
        camera=torch.rand(1, 6, 3, h, w),
        radar=radar,
        lidar=lidar,
        intrinsics=k.expand(1, 6, 3, 3),
        cam_to_ego=torch.eye(4).expand(1, 6, 4, 4),
        radar_valid=torch.ones(1, 200, dtype=torch.bool),
        lidar_valid=torch.ones(1, 4000, dtype=torch.bool),
    )
    assert out["seg"].shape == (1, 1, 200, 200) and out["offset"].shape == (1, 2, 200, 200)
    out["seg"].mean().backward()
    first = model.encoders["camera"].stem[0].weight.grad
    assert first is not None and torch.isfinite(first).all() and first.abs().sum() > 0
