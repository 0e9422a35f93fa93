"""A tiny two-branch fusion network shared by the pruning tests: camera and lidar branches -> concat ->
fusion conv -> head, with ``modality_groups()`` as the reference models declare them."""

from __future__ import annotations

import torch
from torch import nn


class TinyFusion(nn.Module):
    def __init__(self, c_in: int = 2, width: int = 4, norm: bool = False) -> None:
        super().__init__()

        def branch() -> nn.Sequential:
            layers: list[nn.Module] = [nn.Conv2d(c_in, width, 3, padding=1)]
            if norm:
                layers.append(nn.BatchNorm2d(width))
            layers += [nn.ReLU(), nn.Conv2d(width, width, 3, padding=1), nn.ReLU()]
            return nn.Sequential(*layers)

        self.camera = branch()
        self.lidar = branch()
        self.fuse = nn.Conv2d(2 * width, width, 1)
        self.head = nn.Conv2d(width, 1, 1)

    def forward(self, camera: torch.Tensor, lidar: torch.Tensor) -> dict[str, torch.Tensor]:
        bev = torch.cat([self.camera(camera), self.lidar(lidar)], dim=1)
        return {"seg": self.head(torch.relu(self.fuse(bev)))}

    def modality_groups(self) -> dict[str, list[str]]:
        names = [n for n, _ in self.named_parameters()]
        return {
            "camera": [n for n in names if n.startswith("camera.")],
            "lidar": [n for n in names if n.startswith("lidar.")],
            "fusion": [n for n in names if n.startswith(("fuse.", "head."))],
        }


def make_batches(n: int, seed: int = 0, size: int = 6, c_in: int = 2, batch: int = 2) -> list[dict]:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        cam = torch.randn(batch, c_in, size, size, generator=gen)
        lid = torch.randn(batch, c_in, size, size, generator=gen)
        target = ((cam[:, :1] + lid[:, :1]) > 0).float()
        out.append({"camera": cam, "lidar": lid, "target": target})
    return out


def tiny_loss(model: nn.Module, batch: dict) -> torch.Tensor:
    out = model(camera=batch["camera"], lidar=batch["lidar"])["seg"]
    return nn.functional.binary_cross_entropy_with_logits(out, batch["target"])
