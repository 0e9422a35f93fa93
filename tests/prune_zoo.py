"""Models written the way other people write them, for the structured-pruning tests: a U-Net with skip
concatenations, a camera+LiDAR BEV model that concatenates one lifted feature at three heights into a 1x1 neck
and scatters pillar features into a canvas whose channel count is a Python constant, and a camera+LiDAR model
fused by ``nn.MultiheadAttention``. Each comes with example inputs and a ``loss(model, batch)``."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


def _block(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True),
        nn.Conv2d(c_out, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True),
    )


class UNet(nn.Module):
    """The classic U-Net (two levels): each decoder stage concatenates the upsampled features with the skip."""

    def __init__(self, in_ch: int = 3, width: int = 8, n_classes: int = 2) -> None:
        super().__init__()
        self.enc1 = _block(in_ch, width)
        self.enc2 = _block(width, 2 * width)
        self.bottleneck = _block(2 * width, 4 * width)
        self.up2 = nn.ConvTranspose2d(4 * width, 2 * width, 2, stride=2)
        self.dec2 = _block(4 * width, 2 * width)
        self.up1 = nn.ConvTranspose2d(2 * width, width, 2, stride=2)
        self.dec1 = _block(2 * width, width)
        self.out = nn.Conv2d(width, n_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        e1 = self.enc1(x)
        e2 = self.enc2(F.max_pool2d(e1, 2))
        b = self.bottleneck(F.max_pool2d(e2, 2))
        d2 = self.dec2(torch.cat([self.up2(b), e2], dim=1))
        d1 = self.dec1(torch.cat([self.up1(d2), e1], dim=1))
        return self.out(d1)


class MyBEVFusion(nn.Module):
    """Camera + LiDAR to a BEV grid: the camera feature is lifted to three heights (the same tensor, scaled per
    height, concatenated) into a 1x1 neck; LiDAR points go through a point MLP and are scattered into a canvas of
    ``self.pillar_channels`` (a Python int) channels; the two BEV maps are concatenated and decoded."""

    def __init__(self, grid: int = 8, cam_ch: int = 12, pillar_channels: int = 10, bev_ch: int = 16) -> None:
        super().__init__()
        self.grid, self.pillar_channels = grid, pillar_channels
        self.img_backbone = nn.Sequential(
            nn.Conv2d(3, cam_ch, 3, padding=1), nn.BatchNorm2d(cam_ch), nn.ReLU(),
            nn.Conv2d(cam_ch, cam_ch, 3, padding=1), nn.BatchNorm2d(cam_ch), nn.ReLU(),
        )
        self.height_scale = nn.Parameter(torch.tensor([1.0, 0.5, 0.25]))
        self.neck = nn.Conv2d(3 * cam_ch, bev_ch, 1)
        self.point_mlp = nn.Sequential(nn.Linear(4, pillar_channels), nn.ReLU(), nn.Linear(pillar_channels,
                                                                                          pillar_channels))
        self.lidar_conv = nn.Sequential(nn.Conv2d(pillar_channels, bev_ch, 3, padding=1), nn.ReLU())
        self.fuser = nn.Sequential(nn.Conv2d(2 * bev_ch, bev_ch, 3, padding=1), nn.BatchNorm2d(bev_ch), nn.ReLU())
        self.seg_head = nn.Conv2d(bev_ch, 1, 1)

    def forward(self, image: torch.Tensor, points: torch.Tensor, pillar: torch.Tensor) -> dict[str, torch.Tensor]:
        f = F.adaptive_avg_pool2d(self.img_backbone(image), self.grid)
        lifted = torch.cat([f * self.height_scale[z] for z in range(3)], dim=1)
        cam_bev = self.neck(lifted)
        b, n, _ = points.shape
        feats = self.point_mlp(points).reshape(b * n, -1)
        canvas = feats.new_zeros(b * self.grid * self.grid, self.pillar_channels)
        index = (pillar + torch.arange(b)[:, None] * self.grid * self.grid).reshape(-1, 1)
        canvas = canvas.scatter_reduce(0, index.expand(-1, self.pillar_channels), feats, "amax", include_self=False)
        lidar_bev = self.lidar_conv(canvas.reshape(b, self.grid, self.grid, -1).permute(0, 3, 1, 2))
        return {"seg": self.seg_head(self.fuser(torch.cat([cam_bev, lidar_bev], dim=1)))}


def bev_inputs(batch: int = 2, grid: int = 8, n_points: int = 20, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {
        "image": torch.randn(batch, 3, 16, 16, generator=gen),
        "points": torch.randn(batch, n_points, 4, generator=gen),
        "pillar": torch.randint(0, grid * grid, (batch, n_points), generator=gen),
    }


class AttentionFusion(nn.Module):
    """Camera and LiDAR tokens embedded by small conv stems, fused by cross-attention (camera queries LiDAR)."""

    def __init__(self, dim: int = 16, heads: int = 4, n_classes: int = 3) -> None:
        super().__init__()
        self.cam_stem = nn.Sequential(nn.Conv2d(3, dim, 3, stride=2, padding=1), nn.ReLU(), nn.Conv2d(dim, dim, 1))
        self.lidar_stem = nn.Sequential(nn.Conv2d(2, dim, 3, stride=2, padding=1), nn.ReLU(), nn.Conv2d(dim, dim, 1))
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, n_classes)

    def forward(self, camera: torch.Tensor, lidar: torch.Tensor) -> torch.Tensor:
        q = self.cam_stem(camera).flatten(2).transpose(1, 2)
        kv = self.lidar_stem(lidar).flatten(2).transpose(1, 2)
        fused, _ = self.attn(q, kv, kv)
        return self.head(self.norm(fused + q).mean(1))


def attention_inputs(batch: int = 2, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {"camera": torch.randn(batch, 3, 8, 8, generator=gen), "lidar": torch.randn(batch, 2, 8, 8, generator=gen)}
