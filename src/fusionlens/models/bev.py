"""BEV part of the reference models: the fusion layer, a ResNet-18-style BEV decoder with three
upsample-and-add blocks, and the segmentation / instance-centre / offset heads (SimpleBEV; LMD appendix A.2).

Every op is out-of-place (no ``+=``, no ``inplace=True``) so that the LMD engine can follow each stream.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class FusionLayer(nn.Module):
    """LMD's fusion layer l = 1: concat the modalities' BEV maps, 3x3 conv (no bias), InstanceNorm, GELU."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False)
        self.norm = nn.InstanceNorm2d(out_channels)
        self.act = nn.GELU()

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        return self.act(self.norm(self.conv(torch.cat(features, dim=1))))


class BasicBlock(nn.Module):
    """ResNet basic block (two 3x3 convs with BatchNorm, identity or 1x1 projection shortcut)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                                          nn.BatchNorm2d(out_channels))
        self.relu2 = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn2(self.conv2(self.relu1(self.bn1(self.conv1(x)))))
        return self.relu2(out + self.shortcut(x))


class UpsampleAdd(nn.Module):
    """Bilinear upsampling to the skip's size, 1x1 conv (no bias), InstanceNorm, then add the skip."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, 1, bias=False)
        self.norm = nn.InstanceNorm2d(out_channels)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        up = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
        return self.norm(self.conv(up)) + skip


class BEVDecoder(nn.Module):
    """ResNet-18-style encoder-decoder on the BEV map: a stride-1 stem, three stages of two basic blocks
    (widths w, 2w, 4w; each halves the resolution), then three upsample-and-add blocks back to full
    resolution.
    Output: ``(B, w, X, Y)``."""

    def __init__(self, in_channels: int, width: int) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, width, 3, padding=1, bias=False),
                                  nn.BatchNorm2d(width), nn.ReLU())
        widths = (width, 2 * width, 4 * width)
        stages = []
        prev = width
        for w in widths:
            stages.append(nn.Sequential(BasicBlock(prev, w, stride=2), BasicBlock(w, w)))
            prev = w
        self.stages = nn.ModuleList(stages)
        self.up3 = UpsampleAdd(widths[2], widths[1])
        self.up2 = UpsampleAdd(widths[1], widths[0])
        self.up1 = UpsampleAdd(widths[0], width)
        self.out_channels = width

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s0 = self.stem(x)
        s1 = self.stages[0](s0)
        s2 = self.stages[1](s1)
        s3 = self.stages[2](s2)
        return self.up1(self.up2(self.up3(s3, s2), s1), s0)


class Head(nn.Module):
    """3x3 conv, InstanceNorm, ReLU, 1x1 conv with bias -> ``out_channels`` maps."""

    def __init__(self, in_channels: int, hidden: int, out_channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, hidden, 3, padding=1, bias=False)
        self.norm = nn.InstanceNorm2d(hidden)
        self.act = nn.ReLU()
        self.out = nn.Conv2d(hidden, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.act(self.norm(self.conv(x))))
