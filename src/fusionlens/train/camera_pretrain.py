"""Pre-training of the camera trunk on the built-in world's per-pixel semantics (the stand-in for ImageNet).

Every camera backbone of the papers starts from image-pretrained weights (SimpleBEV: ImageNet ResNet-101;
BEVFusion: nuImages Swin). None can be downloaded here, and a ResNet trained from scratch on a few hundred BEV
samples barely learns what a vehicle looks like before the BEV decoder has learnt anything else (issue 3:
camera-only IoU 0.0 after 250 CPU steps, although the lifting geometry is right -- an oracle vehicle mask lifted
through :func:`fusionlens.models.camera.lift_to_bev` covers 97 % of the vehicle cells at the 0-1.25 m bin).

The world renders an object-id buffer with every image, so a dense 2-D task is free: each pixel is sky, ground,
vehicle, pedestrian or other (buildings, poles, barriers, clutter); pixels behind a lens blob or of a
blacked-out camera are ignored. The network is the model's own :class:`~fusionlens.models.camera.CameraEncoder`
with one output channel per class (stride 8, upsampled to the image), trained with class-balanced cross-entropy.
Only the ResNet trunk is kept, saved in torchvision's naming, so it loads through ``ModelConfig.camera_weights``
exactly as a downloaded torchvision state dict would. Training frames come from the *train* split only.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from fusionlens.data.sample import CLASSES, VEHICLE_CLASSES
from fusionlens.io import atomic_torch_save, atomic_write_json, load_torch_file
from fusionlens.models.camera import CameraEncoder, trunk_state_dict
from fusionlens.models.config import CAMERA_DEPTHS
from fusionlens.train.distributed import barrier, init_distributed, mean_over_ranks
from fusionlens.world.config import WorldConfig
from fusionlens.world.generate import WorldFrame, render_frame

PIXEL_CLASSES: tuple[str, ...] = ("sky", "ground", "vehicle", "pedestrian", "other")
IGNORE = -100
_VEHICLE_IDS = [CLASSES.index(c) for c in VEHICLE_CLASSES]


@dataclass(frozen=True)
class CameraPretrainConfig:
    """How the camera trunk is pre-trained; stored with the weights so a run can be identified and resumed."""

    depth: int = 18
    image_size: tuple[int, int] = (64, 112)
    world_seed: int = 0
    frames: int = 256  # distinct train-split frames (x 6 cameras), rendered once and kept in memory
    val_frames: int = 32  # val-split frames for the pixel IoU report
    steps: int = 400
    batch_size: int = 4  # frames per step
    lr: float = 2e-3
    weight_decay: float = 1e-4
    seed: int = 0
    save_every: int = 100

    def __post_init__(self) -> None:
        if self.depth not in CAMERA_DEPTHS:
            raise ValueError(f"depth must be one of {CAMERA_DEPTHS}, got {self.depth}")
        for name in ("frames", "val_frames", "steps", "batch_size"):
            if int(getattr(self, name)) < (0 if name == "val_frames" else 1):
                raise ValueError(f"CameraPretrainConfig.{name} must be positive, got {getattr(self, name)}")
        if self.batch_size > self.frames:
            raise ValueError(f"batch_size {self.batch_size} exceeds the number of frames {self.frames}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        object.__setattr__(self, "image_size", tuple(int(v) for v in self.image_size))

    def to_dict(self) -> dict[str, Any]:
        return dict(asdict(self), image_size=list(self.image_size))


def pixel_targets(frame: WorldFrame) -> torch.Tensor:
    """``(Ncam, H, W)`` class index per pixel (``PIXEL_CLASSES``), ``IGNORE`` where the lens shows nothing."""
    ids = frame.camera.object_ids
    label = np.where(ids >= 0, frame.scene.label[np.clip(ids, 0, None)], -1)
    target = np.full(ids.shape, PIXEL_CLASSES.index("other"), dtype=np.int64)
    target[ids == -2] = PIXEL_CLASSES.index("sky")
    target[ids == -1] = PIXEL_CLASSES.index("ground")
    target[np.isin(label, _VEHICLE_IDS) & (ids >= 0)] = PIXEL_CLASSES.index("vehicle")
    target[(label == CLASSES.index("pedestrian")) & (ids >= 0)] = PIXEL_CLASSES.index("pedestrian")
    target[~frame.camera.seen] = IGNORE
    return torch.from_numpy(target)


def render_pixel_set(world: WorldConfig, seed: int, split: str, count: int,
                     progress: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Images ``(count*Ncam, 3, H, W)`` (uint8, to keep the set small) and their pixel targets."""
    images, targets = [], []
    for index in tqdm(range(count), desc=f"render {split}", disable=not progress, leave=False):
        frame = render_frame(world, seed, split, index)
        images.append((frame.sample.images * 255).round().to(torch.uint8))
        targets.append(pixel_targets(frame))
    return torch.cat(images), torch.cat(targets)


def class_weights(targets: torch.Tensor) -> torch.Tensor:
    """Inverse square-root frequency weights, normalised to mean 1 (rare vehicles and pedestrians count)."""
    counts = torch.bincount(targets[targets != IGNORE].flatten(), minlength=len(PIXEL_CLASSES)).double()
    weights = (counts.sum() / counts.clamp(min=1)).sqrt()
    return (weights / weights.mean()).float()


def segment(encoder: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Per-pixel class logits ``(N, K, H, W)`` for uint8 images."""
    logits = encoder(images.float() / 255.0)
    return F.interpolate(logits, size=images.shape[-2:], mode="bilinear", align_corners=False)


@torch.no_grad()
def pixel_iou(encoder: CameraEncoder, images: torch.Tensor, targets: torch.Tensor,
              batch: int = 24) -> dict[str, float]:
    """IoU per pixel class over the whole set (eval mode; the mode is restored)."""
    was_training = encoder.training
    encoder.eval()
    inter = torch.zeros(len(PIXEL_CLASSES))
    union = torch.zeros(len(PIXEL_CLASSES))
    for start in range(0, len(images), batch):
        pred = segment(encoder, images[start:start + batch]).argmax(1)
        tgt = targets[start:start + batch]
        keep = tgt != IGNORE
        for k in range(len(PIXEL_CLASSES)):
            p, t = (pred == k) & keep, (tgt == k) & keep
            inter[k] += (p & t).sum()
            union[k] += (p | t).sum()
    encoder.train(was_training)
    return {name: float(inter[k] / union[k]) if union[k] > 0 else float("nan")
            for k, name in enumerate(PIXEL_CLASSES)}


def _weight_settings(config: dict[str, Any]) -> dict[str, Any]:
    """The settings that decide the trunk's weights (how many val frames are scored and how often a partial run
    is saved do not)."""
    return {k: v for k, v in config.items() if k not in ("val_frames", "save_every")}


def pretrain_camera(config: CameraPretrainConfig, out: str | Path, *, resume: bool = True,
                    overwrite: bool = False, progress: bool = True) -> dict[str, Any]:
    """Pre-train a camera trunk and write it to ``out`` (torchvision ResNet state dict, atomically).

    ``out.with_suffix('.json')`` gets the config, loss curve and the val pixel IoU per class. A finished trunk
    of the same config is reused (its report returned, with ``reused=True``), one of another config is refused
    unless ``overwrite`` -- a trunk is never silently replaced or mistaken for another. A partial run is checkpointed to
    ``<out>.state.pt`` every ``save_every`` steps and, with ``resume``, continued from there (the same config is
    required); the state file is removed when the run completes.
    """
    out = Path(out)
    report_path = out.with_suffix(".json")
    if out.is_file() and report_path.is_file() and not overwrite:
        saved = json.loads(report_path.read_text())
        if _weight_settings(saved.get("config") or {}) != _weight_settings(config.to_dict()):
            raise ValueError(f"{out} was pre-trained with {saved.get('config')}, not {config.to_dict()}: pass the "
                             "same settings, another output, or overwrite")
        return dict(saved, reused=True)
    state_path = out.with_name(out.name + ".state.pt")
    world = WorldConfig().with_(image_size=config.image_size)
    info = init_distributed(torch.device("cpu"))  # under torchrun: each rank takes a share of every step's frames
    if config.batch_size % info.world_size:
        raise ValueError(f"batch_size {config.batch_size} is not divisible by the {info.world_size} ranks")
    torch.manual_seed(config.seed)
    encoder = CameraEncoder(config.depth, len(PIXEL_CLASSES))
    net = torch.nn.parallel.DistributedDataParallel(encoder) if info.enabled else encoder
    optimizer = torch.optim.AdamW(encoder.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=config.lr, total_steps=config.steps,
                                                    pct_start=0.1)
    start, losses = 0, []
    if resume and state_path.is_file():
        state = load_torch_file(state_path, what="pre-training state", expected="a partial run of fusionlens "
                                "pretrain camera (pass --restart to ignore it)")
        if state["config"] != config.to_dict():
            raise ValueError(f"{state_path} belongs to another pre-training config: {state['config']}; "
                             "delete it or pass the same settings")
        encoder.load_state_dict(state["encoder"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start, losses = int(state["step"]), list(state["losses"])
        torch.set_rng_state(state["rng"])

    images, targets = render_pixel_set(world, config.world_seed, "train", config.frames, progress)
    weights = class_weights(targets)
    n_cam = images.shape[0] // config.frames
    order = torch.Generator().manual_seed(config.seed)
    perms = [torch.randperm(config.frames, generator=order) for _ in range(
        (config.steps * config.batch_size) // config.frames + 1)]
    frame_order = torch.cat(perms)

    def save_state(step: int) -> None:
        if not info.is_main:
            return
        atomic_torch_save(state_path, {
            "config": config.to_dict(), "encoder": encoder.state_dict(), "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(), "step": step, "losses": losses, "rng": torch.get_rng_state(),
        })

    t0 = time.perf_counter()
    encoder.train()
    bar = tqdm(total=config.steps, initial=start, desc="pretrain camera", disable=not (progress and info.is_main))
    share = config.batch_size // info.world_size
    for step in range(start, config.steps):
        first = step * config.batch_size + info.rank * share
        frames = frame_order[first:first + share]
        rows = (frames[:, None] * n_cam + torch.arange(n_cam)).flatten()
        # the class-weighted mean over the global batch: this rank's weighted sum over the ranks' mean weight, so
        # that DDP's averaged gradient is the single process's
        target = targets[rows]
        loss = F.cross_entropy(segment(net, images[rows]), target, weight=weights, ignore_index=IGNORE,
                               reduction="sum")
        loss = loss / mean_over_ranks(info, weights[target[target != IGNORE]].sum()).clamp(min=1e-12)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        losses.append(float(loss.detach()))
        bar.update(1)
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
        if config.save_every and (step + 1) % config.save_every == 0 and step + 1 < config.steps:
            save_state(step + 1)
    bar.close()
    seconds = time.perf_counter() - t0
    report: dict[str, Any] = {"config": config.to_dict(), "losses": losses, "seconds": seconds,
                              "class_weights": weights.tolist()}
    if info.is_main:  # one writer; the other ranks wait until the trunk is there
        if config.val_frames:
            val_images, val_targets = render_pixel_set(world, config.world_seed, "val", config.val_frames, progress)
            report["val_pixel_iou"] = pixel_iou(encoder, val_images, val_targets)
        atomic_torch_save(out, trunk_state_dict(encoder))
        atomic_write_json(report_path, report)
        state_path.unlink(missing_ok=True)
    barrier(info)
    return report
