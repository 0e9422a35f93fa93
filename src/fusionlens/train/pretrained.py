"""Fusion models built from separately pre-trained single-modality backbones (AlterMOMA section 3.2's setting).

:func:`load_backbone` copies ``encoders.<modality>.*`` from a checkpoint of the same toolkit into a fusion
model, after checking that the checkpoint's backbone has the same architecture and that every tensor matches in
name and shape -- any mismatch is reported in full. :func:`freeze_hooks` keeps the loaded backbones fixed (no
update, BatchNorm statistics frozen) for the first N steps of fusion training.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path

import torch

from fusionlens.models import FusionModel, ModelConfig
from fusionlens.train.checkpoint import load_checkpoint

# config fields that shape each backbone (a checkpoint must agree on them to be loadable)
_BACKBONE_FIELDS: dict[str, tuple[str, ...]] = {
    "camera": ("camera_depth", "latent_dim"),
    "radar": ("grid", "use_radar_metadata", "point_bev_layers", "point_bev_channels"),
    "lidar": ("grid", "point_bev_layers", "point_bev_channels"),
}


def backbone_mismatch(model_config: ModelConfig, source: ModelConfig, modality: str) -> dict[str, tuple]:
    """Architecture settings of ``modality``'s backbone that differ: name -> (model's, checkpoint's)."""
    a, b = model_config.to_dict(), source.to_dict()
    diff = {k: (a[k], b[k]) for k in _BACKBONE_FIELDS[modality] if a[k] != b[k]}
    if modality != "camera" and model_config.point_encoder(modality) != source.point_encoder(modality):
        diff["point_encoder"] = (model_config.point_encoder(modality), source.point_encoder(modality))
    return diff


def load_backbone(model: FusionModel, modality: str, checkpoint: str | Path) -> list[str]:
    """Copy ``modality``'s backbone weights from ``checkpoint`` into ``model``; return the loaded names."""
    if modality not in model.modalities:
        raise ValueError(
            f"--init-from {modality}: the model has no {modality} backbone (modalities {list(model.modalities)})"
        )
    payload = load_checkpoint(checkpoint)
    source = ModelConfig.from_dict(payload["model_config"])
    if modality not in source.modalities:
        raise ValueError(
            f"--init-from {modality}={checkpoint}: that checkpoint has no {modality} backbone "
            f"(its modalities: {list(source.modalities)})"
        )
    diff = backbone_mismatch(model.config, source, modality)
    if diff:
        raise ValueError(
            f"--init-from {modality}={checkpoint}: different backbone architecture: "
            + "; ".join(f"{k}: model {a!r} vs checkpoint {b!r}" for k, (a, b) in diff.items())
        )
    prefix = f"encoders.{modality}."
    theirs = {k: v for k, v in payload["model"].items() if k.startswith(prefix)}
    ours = {k: v for k, v in model.state_dict().items() if k.startswith(prefix)}
    missing, unexpected = sorted(set(ours) - set(theirs)), sorted(set(theirs) - set(ours))
    shapes = {
        k: (tuple(ours[k].shape), tuple(theirs[k].shape))
        for k in set(ours) & set(theirs)
        if ours[k].shape != theirs[k].shape
    }
    if missing or unexpected or shapes:
        raise ValueError(
            f"--init-from {modality}={checkpoint}: tensors do not match -- missing {missing}, "
            f"unexpected {unexpected}, shape (model, checkpoint) {shapes}"
        )
    with torch.no_grad():
        state = model.state_dict()
        for key, value in theirs.items():
            state[key].copy_(value)
    return sorted(theirs)


def backbone_initialiser(init_from: Mapping[str, str | Path]) -> Callable[[FusionModel], None]:
    """A ``prepare_model`` callback for :func:`fusionlens.train.loop.train` loading every named backbone."""
    sources = dict(init_from)
    for modality, path in sources.items():
        if not Path(path).is_file():
            raise FileNotFoundError(f"--init-from {modality}: no such checkpoint {path}")

    def prepare(model: FusionModel) -> None:
        for modality, path in sources.items():
            load_backbone(model, modality, path)

    return prepare


def freeze_hooks(
    modalities: list[str], steps: int
) -> tuple[Callable[[FusionModel, int], None], Callable[[FusionModel, int], None]]:
    """``(before_step, after_backward)`` hooks keeping ``modalities``' backbones frozen for ``steps`` steps.

    Frozen = BatchNorm in eval mode and gradients dropped before the optimizer step (AdamW then skips the
    parameters entirely, weight decay included); under DDP every rank drops them, so replicas stay equal.
    """
    if steps < 0:
        raise ValueError(f"--freeze-steps must be >= 0, got {steps}")

    def before_step(model: FusionModel, step: int) -> None:
        for modality in modalities:
            model.encoders[modality].train(step >= steps)

    def after_backward(model: FusionModel, step: int) -> None:
        if step < steps:
            for modality in modalities:
                for p in model.encoders[modality].parameters():
                    p.grad = None

    return before_step, after_backward
