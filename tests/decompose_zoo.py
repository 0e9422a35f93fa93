"""Small multi-modal models for the LMD tests: each exercises a family of ops the engine must handle."""

from __future__ import annotations

import torch
import torch.nn.functional as F
import torchvision
from torch import nn


def randomise_norm_stats(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give BatchNorms non-trivial running statistics and affine parameters, so eval mode is not an identity."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
            if m.affine:
                m.weight.data.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                m.bias.data.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
    return model


class CameraRadarClassifier(nn.Module):
    """A torchvision backbone as the camera branch, an MLP radar branch, fused by addition."""

    def __init__(self, backbone: nn.Module, width: int = 16) -> None:
        super().__init__()
        self.camera_branch = backbone
        self.radar_branch = nn.Sequential(nn.Linear(5, width), nn.ReLU(), nn.Linear(width, width))
        self.head = nn.Sequential(nn.ReLU(), nn.Linear(width, 3))

    def forward(self, camera: torch.Tensor, radar: torch.Tensor) -> torch.Tensor:
        return self.head(self.camera_branch(camera) + self.radar_branch(radar))


class PiecewiseLinearFusion(nn.Module):
    """ReLU, max-pool, BN (eval), conv, linear, add, concat only: locally linear, so LMD with ``bias="global"``
    must equal the Jacobian-vector products."""

    def __init__(self) -> None:
        super().__init__()
        self.cam = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(), nn.MaxPool2d(2))
        self.rad = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))
        self.fuse = nn.Sequential(nn.Conv2d(10, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.head = nn.Linear(8 * 4 * 4, 5)

    def forward(self, camera: torch.Tensor, radar: torch.Tensor) -> torch.Tensor:
        x = self.fuse(torch.cat([self.cam(camera), self.rad(radar)], dim=1))
        x = x + F.relu(x)  # a residual add of two decomposed tensors
        return self.head(F.max_pool2d(x, 2).flatten(1))


class TokenFusionTransformer(nn.Module):
    """Camera and radar tokens concatenated, then a pre-norm transformer block: LayerNorm, softmax attention
    (both the fused SDPA kernel and an explicit softmax), GELU MLP, residuals."""

    def __init__(self, dim: int = 16, heads: int = 2) -> None:
        super().__init__()
        self.heads = heads
        self.cam_embed, self.rad_embed = nn.Linear(6, dim), nn.Linear(4, dim)
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))
        self.head = nn.Linear(dim, 2)

    def attend(self, x: torch.Tensor, explicit: bool) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        if explicit:
            weights = torch.softmax(q @ k.transpose(-2, -1) / (d // self.heads) ** 0.5, dim=-1)
            out = weights @ v
        else:
            out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))

    def forward(self, camera: torch.Tensor, radar: torch.Tensor, explicit: bool = False) -> torch.Tensor:
        x = torch.cat([self.cam_embed(camera), self.rad_embed(radar)], dim=1)
        x = x + self.attend(self.norm1(x), explicit)
        x = x + self.mlp(self.norm2(x))
        return self.head(x.mean(1))


class InstanceNormUNet(nn.Module):
    """Two modalities concatenated into a small U-Net with InstanceNorm, LeakyReLU, skips and interpolation;
    returns a dict."""

    def __init__(self, c_cam: int = 3, c_rad: int = 2, width: int = 8) -> None:
        super().__init__()

        def block(cin: int, cout: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.InstanceNorm2d(cout, affine=True),
                                 nn.LeakyReLU(0.1))

        self.down1, self.down2 = block(c_cam + c_rad, width), block(width, 2 * width)
        self.up = block(3 * width, width)
        self.seg, self.offset = nn.Conv2d(width, 1, 1), nn.Conv2d(width, 2, 1)

    def forward(self, camera: torch.Tensor, radar: torch.Tensor) -> dict[str, torch.Tensor]:
        skip = self.down1(torch.cat([camera, radar], 1))
        deep = self.down2(F.avg_pool2d(skip, 2))
        x = self.up(torch.cat([skip, F.interpolate(deep, scale_factor=2, mode="bilinear")], 1))
        return {"seg": self.seg(x), "offset": torch.tanh(self.offset(x))}


class EarlyFusionNet(nn.Module):
    """One tensor whose channels come from different sensors (split with ``modality_mask``)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(5, 8, 3, padding=1), nn.GroupNorm(2, 8), nn.SiLU(), nn.Conv2d(8, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class PillarScatterFusion(nn.Module):
    """A PointPillars-like LiDAR branch (per-point MLP, max over the points of each pillar by ``scatter_reduce``,
    scatter to a BEV canvas by an in-place write) fused with a camera BEV map, and three modalities if asked."""

    def __init__(self, grid: int = 8, with_radar: bool = False) -> None:
        super().__init__()
        self.grid = grid
        self.point_mlp = nn.Sequential(nn.Linear(4, 8), nn.ReLU())
        self.cam = nn.Conv2d(3, 8, 3, padding=1)
        self.radar = nn.Conv2d(2, 8, 1) if with_radar else None
        self.fuse = nn.Sequential(nn.Conv2d(16 + (8 if with_radar else 0), 8, 3, padding=1),
                                  nn.InstanceNorm2d(8, affine=True), nn.GELU(), nn.Conv2d(8, 1, 1))

    def forward(self, camera: torch.Tensor, lidar: torch.Tensor, radar: torch.Tensor | None = None) -> torch.Tensor:
        b, p, _ = lidar.shape
        cell = (lidar[..., :2].clamp(0, 0.999) * self.grid).floor().long()
        flat = (cell[..., 0] * self.grid + cell[..., 1]) + torch.arange(b).unsqueeze(1) * self.grid**2
        feats = self.point_mlp(lidar).reshape(b * p, -1)
        pillars = feats.new_zeros(b * self.grid**2, feats.shape[1])
        index = flat.reshape(-1, 1).expand_as(feats)
        pillars = pillars.scatter_reduce(0, index, feats, reduce="amax", include_self=False)
        canvas = torch.zeros(b, 8, self.grid, self.grid)
        canvas[:] = pillars.reshape(b, self.grid, self.grid, 8).permute(0, 3, 1, 2)
        maps = [self.cam(camera), canvas]
        if self.radar is not None:
            maps.append(self.radar(radar))
        return self.fuse(torch.cat(maps, 1))


class SelectionFusion(nn.Module):
    """Selections and a scale-only norm after the fusion: elementwise maximum, max with indices, amax over
    several dims, top-k, max-pooling and RMSNorm."""

    def __init__(self) -> None:
        super().__init__()
        self.fuse = nn.Conv2d(5, 6, 3, padding=1)
        self.norm = nn.RMSNorm(6)

    def forward(self, camera: torch.Tensor, radar: torch.Tensor) -> torch.Tensor:
        x = self.fuse(torch.cat([camera, radar], 1))
        x = torch.maximum(x, x.flip(-1))
        pooled = F.max_pool2d(x, 2)
        top = pooled.flatten(2).topk(3, dim=-1).values.sum(-1)
        peak = x.amax(dim=(2, 3))
        channel_max = x.max(dim=1).values.mean((1, 2)).unsqueeze(-1)
        return self.norm(x.permute(0, 2, 3, 1)).mean((1, 2)) + peak + top + channel_max


class CrossAttentionFusion(nn.Module):
    """Camera-LiDAR fusion by cross-attention (TransFusion / CMT style): camera BEV cells are the queries of an
    ``nn.MultiheadAttention`` over per-point LiDAR features (keys and values, padded points masked), then a
    residual, LayerNorm, a GELU feed-forward and a per-cell head."""

    def __init__(self, dim: int = 8, heads: int = 2, batch_first: bool = True) -> None:
        super().__init__()
        self.batch_first = batch_first
        self.cam = nn.Conv2d(3, dim, 3, padding=1)
        self.points = nn.Sequential(nn.Linear(4, dim), nn.ReLU(), nn.Linear(dim, dim))
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=batch_first)
        self.norm = nn.LayerNorm(dim)
        self.ffn = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))
        self.head = nn.Linear(dim, 1)

    def forward(self, camera: torch.Tensor, lidar: torch.Tensor, padding: torch.Tensor | None = None) -> torch.Tensor:
        queries = self.cam(camera).flatten(2).transpose(1, 2)  # (B, cells, dim)
        keys = self.points(lidar)  # (B, points, dim)
        if not self.batch_first:
            queries, keys = queries.transpose(0, 1), keys.transpose(0, 1)
        fused, _ = self.attn(queries, keys, keys, key_padding_mask=padding, need_weights=False)
        x = self.norm(queries + fused)
        x = x + self.ffn(x)
        if not self.batch_first:
            x = x.transpose(0, 1)
        return self.head(x).squeeze(-1).unflatten(-1, camera.shape[-2:])


def resnet_camera(depth: int) -> CameraRadarClassifier:
    backbone = {18: torchvision.models.resnet18, 50: torchvision.models.resnet50}[depth](num_classes=16)
    return randomise_norm_stats(CameraRadarClassifier(backbone)).eval()


def mobilenet_camera() -> CameraRadarClassifier:
    return randomise_norm_stats(CameraRadarClassifier(torchvision.models.mobilenet_v3_small(num_classes=16))).eval()
