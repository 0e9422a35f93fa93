"""Camera branch of the SimpleBEV-style models: a truncated torchvision ResNet merged to stride 8, and the
parameter-free lifting of image features onto the BEV voxel grid (LMD appendix A.2; SimpleBEV).

Lifting: every voxel centre ``p`` (ego frame) is mapped into camera ``k`` as ``q = K_k [R|t]_k^{-1} p``; where
``q`` lies in front of the camera and inside the image, the feature map is sampled bilinearly at ``q``; the
voxel's feature is the mean over the cameras that see it (zero where none does). Nothing here is learned, so
the camera's contribution to the BEV tensor is exactly its image features -- which is why LMD decomposes
from the fusion layer on.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from fusionlens.data.sample import BEVGrid
from fusionlens.io import load_torch_file

# channels of (layer2, layer3) of each torchvision ResNet depth
_TRUNK_CHANNELS: dict[int, tuple[int, int]] = {
    18: (128, 256), 34: (128, 256), 50: (512, 1024), 101: (512, 1024),
}
_UNUSED_PREFIXES = ("layer4.", "fc.")
# CameraEncoder.stem = Sequential(conv1, bn1, relu, maxpool, layer1): its indices in torchvision's naming
_STEM_NAMES = {"stem.0.": "conv1.", "stem.1.": "bn1.", "stem.4.": "layer1."}
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)


class CameraEncoder(nn.Module):
    """ResNet trunk to ``layer3`` (stride 16), upsampled x2 and concatenated with ``layer2`` (stride 8), then
    a 3x3 conv + BatchNorm + ReLU and a 1x1 projection to ``out_channels`` (SimpleBEV's encoder).

    ``weights`` is an optional *local* file with a torchvision ResNet state dict (nothing is downloaded).
    """

    def __init__(self, depth: int, out_channels: int, weights: str | Path | None = None) -> None:
        super().__init__()
        if depth not in _TRUNK_CHANNELS:
            raise ValueError(f"camera_depth must be one of {sorted(_TRUNK_CHANNELS)}, got {depth}")
        resnet = getattr(torchvision.models, f"resnet{depth}")(weights=None)
        if weights is not None:
            resnet.load_state_dict(read_camera_weights(weights, depth, resnet), strict=False)
        self.stem = nn.Sequential(resnet.conv1, resnet.bn1, resnet.relu, resnet.maxpool, resnet.layer1)
        self.layer2 = resnet.layer2
        self.layer3 = resnet.layer3
        c2, c3 = _TRUNK_CHANNELS[depth]
        merged = max(out_channels * 4, 64)
        self.merge = nn.Sequential(
            nn.Conv2d(c2 + c3, merged, 3, padding=1, bias=False), nn.BatchNorm2d(merged), nn.ReLU(),
        )
        self.project = nn.Conv2d(merged, out_channels, 1)
        for module in self.modules():  # out-of-place activations keep autograd and decomposition hooks simple
            if isinstance(module, nn.ReLU):
                module.inplace = False
        self.register_buffer("mean", torch.tensor(_IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(_IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """``(N, 3, H, W)`` images in [0, 1] -> ``(N, C, ceil(H/8), ceil(W/8))`` features."""
        x = (images - self.mean) / self.std
        f2 = self.layer2(self.stem(x))
        f3 = self.layer3(f2)
        up = F.interpolate(f3, size=f2.shape[-2:], mode="bilinear", align_corners=False)
        return self.project(self.merge(torch.cat([f2, up], dim=1)))


def read_camera_weights(path: str | Path, depth: int, resnet: nn.Module | None = None) -> dict[str, torch.Tensor]:
    """The trunk (conv1 .. layer3) tensors of a local torchvision ResNet state dict file, checked against
    ``resnet{depth}``: ``ValueError`` naming the file when it is not a state dict (a full training checkpoint, JSON,
    random bytes) or not one of that depth. Called by the CLI before any work, and by :class:`CameraEncoder`."""
    path = Path(path)
    expected = f"a torchvision resnet{depth} state dict (e.g. written by fusionlens pretrain camera)"
    state = load_torch_file(path, what="camera_weights", expected=expected, weights_only=True)
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"camera_weights {path} holds a {type(state).__name__} that is not only tensors, "
                         f"not {expected}")
    # layer4 and fc are not part of the trunk: a full torchvision state dict and a trunk-only one
    # (``trunk_state_dict``, what ``fusionlens pretrain camera`` writes) both load
    state = {k: v for k, v in state.items() if not k.startswith(_UNUSED_PREFIXES)}
    if resnet is None:
        resnet = getattr(torchvision.models, f"resnet{depth}")(weights=None)
    ours = {k: v for k, v in resnet.state_dict().items() if not k.startswith(_UNUSED_PREFIXES)}
    missing, unexpected = sorted(set(ours) - set(state)), sorted(set(state) - set(ours))
    shapes = [k for k in set(ours) & set(state) if ours[k].shape != state[k].shape]
    if missing or unexpected or shapes:
        raise ValueError(f"camera_weights {path} is not a resnet{depth} state dict: "
                         f"missing {missing[:5]}, unexpected {unexpected[:5]}, other shapes {sorted(shapes)[:5]}")
    return state


def trunk_state_dict(encoder: CameraEncoder) -> dict[str, torch.Tensor]:
    """The encoder's ResNet trunk (conv1 .. layer3) as a torchvision state dict, loadable as ``camera_weights``."""
    out = {}
    for key, value in encoder.state_dict().items():
        for ours, theirs in _STEM_NAMES.items():
            if key.startswith(ours):
                out[theirs + key[len(ours):]] = value.clone()
        if key.startswith(("layer2.", "layer3.")):
            out[key] = value.clone()
    return out


def voxel_centres(grid: BEVGrid, device: torch.device | None = None) -> torch.Tensor:
    """``(Z, X, Y, 3)`` ego-frame centres of the grid's voxels, ordered to match ``(C, Z, X, Y)`` features."""
    xs, ys, zs = (grid.cell_centres(a).to(device) for a in range(3))
    zz, xx, yy = torch.meshgrid(zs, xs, ys, indexing="ij")
    return torch.stack([xx, yy, zz], dim=-1)


def lift_to_bev(features: torch.Tensor, intrinsics: torch.Tensor, cam_to_ego: torch.Tensor,
                image_size: tuple[int, int], grid: BEVGrid) -> torch.Tensor:
    """Parameter-free lifting of per-camera features to a BEV tensor.

    ``features`` (B, Ncam, C, h, w) at any stride of images of ``image_size`` (H, W) described by
    ``intrinsics`` (B, Ncam, 3, 3) and ``cam_to_ego`` (B, Ncam, 4, 4). Returns ``(B, C*Z, X, Y)``: the voxel
    features ``(C, Z, X, Y)`` averaged over the cameras that see each voxel, compressed along height.
    """
    b, ncam, c, _, _ = features.shape
    height, width = image_size
    X, Y, Z = grid.shape
    centres = voxel_centres(grid, features.device).to(features.dtype).reshape(1, 1, -1, 3)
    ego_to_cam = torch.linalg.inv(cam_to_ego.to(features.dtype))
    rot, trans = ego_to_cam[..., :3, :3], ego_to_cam[..., :3, 3]
    cam_pts = torch.einsum("bkij,bkpj->bkpi", rot, centres.expand(b, ncam, -1, -1)) + trans.unsqueeze(2)
    pix = torch.einsum("bkij,bkpj->bkpi", intrinsics.to(features.dtype), cam_pts)
    depth = pix[..., 2]
    in_front = depth > 1e-3
    safe_depth = torch.where(in_front, depth, torch.ones_like(depth))
    # pixel centres sit at integer coordinates (OpenCV); grid_sample with align_corners=False puts the image
    # edges at -1/+1, so pixel u maps to (u + 0.5) / W * 2 - 1 -- the same at every feature stride.
    u = (pix[..., 0] / safe_depth + 0.5) / width * 2.0 - 1.0
    v = (pix[..., 1] / safe_depth + 0.5) / height * 2.0 - 1.0
    seen = in_front & (u.abs() <= 1.0) & (v.abs() <= 1.0)
    coords = torch.stack([u, v], dim=-1).reshape(b * ncam, 1, -1, 2)
    coords = torch.where(seen.reshape(b * ncam, 1, -1, 1), coords, torch.full_like(coords, -2.0))
    sampled = F.grid_sample(features.reshape(b * ncam, c, *features.shape[-2:]), coords, mode="bilinear",
                            padding_mode="zeros", align_corners=False)  # (B*Ncam, C, 1, P)
    sampled = sampled.reshape(b, ncam, c, -1)
    weight = seen.to(features.dtype).unsqueeze(2)  # (B, Ncam, 1, P)
    summed = (sampled * weight).sum(dim=1)
    count = weight.sum(dim=1).clamp(min=1.0)
    voxels = (summed / count).reshape(b, c * Z, X, Y)  # (C, Z) -> C*Z as voxel_centres' (Z, X, Y)
    return voxels
