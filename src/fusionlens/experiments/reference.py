"""Glue between the generic pruning code and fusionlens' reference models: their loss as a
``loss_fn(model, batch)``, example inputs for SynFlow / Torch-Pruning, and pruned checkpoints.

A pruned checkpoint is an ordinary fusionlens checkpoint (``fusionlens.train.checkpoint``) of the *dense*
model with zeros (so ``fusionlens evaluate`` and ``load_model`` read it unchanged), with the masks and the
pruning report under ``extra["pruning"]``. Structured pruning changes the architecture, so those models are
saved whole (``torch.save`` of the module) next to their report instead.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from fusionlens.modalities import modality
from fusionlens.models import FusionModel, batch_to_inputs
from fusionlens.prune.params import LossFn
from fusionlens.prune.pruner import dense_state_dict, get_masks
from fusionlens.train.checkpoint import load_model, save_checkpoint
from fusionlens.train.loop import TASKS, extra_head_loss
from fusionlens.train.losses import LossConfig, simplebev_loss

#: Forward inputs of the reference models that are calibration, not sensor data (the camera's, which travel with
#: it): SynFlow's all-ones input must leave them alone (an all-ones camera pose is singular).
CALIBRATION_INPUTS: tuple[str, ...] = modality("camera").kwargs


def reference_loss(config: LossConfig | None = None, task: str = "segmentation") -> LossFn:
    """The reference models' training loss for ``task`` as a ``loss_fn(model, batch)``, exactly as
    :func:`fusionlens.train.loop.train` sums it, so pruning scores and fine-tunes what the model was trained for:
    the extra heads' losses (the CenterPoint detection head's focal + L1 terms, ``extra_head_loss``) plus, unless
    ``task == "detection"``, SimpleBEV's segmentation loss (``simplebev_loss(...)["total"]``)."""
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    cfg = config or LossConfig()

    def loss_fn(model: nn.Module, batch: dict[str, Any]) -> torch.Tensor:
        inputs, kwargs = batch_to_inputs(model, batch)  # type: ignore[arg-type]
        out = model(**inputs, **kwargs)
        loss = extra_head_loss(getattr(model, "module", model), out, batch)  # type: ignore[arg-type]
        if task != "detection":
            loss = loss + simplebev_loss(out, batch, cfg)["total"]
        return loss

    return loss_fn


def example_inputs(model: FusionModel, batch: dict[str, Any], n: int = 1) -> dict[str, Any]:
    """Keyword inputs (modalities + calibration / validity) of the first ``n`` samples of a batch."""
    inputs, kwargs = batch_to_inputs(model, batch)
    return {k: v[:n] if isinstance(v, torch.Tensor) else v for k, v in {**inputs, **kwargs}.items()}


def load_reference(path: str | Path) -> tuple[FusionModel, dict[str, Any]]:
    """A reference model from a fusionlens checkpoint (``FileNotFoundError`` / ``ValueError`` when the file
    is missing, not a checkpoint, or its weights do not fit the architecture its config describes)."""
    try:
        return load_model(path)
    except RuntimeError as exc:  # load_state_dict: missing / unexpected keys or shape mismatches
        raise ValueError(
            f"checkpoint {path} does not fit the architecture of its own config (pruned "
            f"structurally, or from another model?): {str(exc).splitlines()[0]}"
        ) from None


def save_pruned(path: str | Path, model: nn.Module, payload: dict[str, Any], report: dict[str, Any]) -> Path:
    """Save an unstructured-pruned model as a fusionlens checkpoint: dense weights with zeros, plus masks."""
    module = getattr(model, "module", model)
    dense = type(module)(module.config)  # type: ignore[call-arg, attr-defined]
    dense.load_state_dict(dense_state_dict(module))
    masks = {k: v.to(torch.bool) for k, v in get_masks(module).items()}
    return save_checkpoint(
        path,
        model=dense,
        model_config=module.config,  # type: ignore[attr-defined]
        train_config=payload.get("train_config"),
        step=int(payload.get("step", 0)),
        metrics=report.get("metrics", {}),
        extra={"pruning": {"report": report, "masks": masks}},
    )
