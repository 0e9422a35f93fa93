"""Cross-modality redundancy of a trained fusion model (AlterMOMA sections 1 and 3.2).

Masking a modality's backbone = replacing its BEV features with zeros at the fusion layer's input (what the
fusion layer sees when that sensor's backbone is switched off). Redundancy shows in two numbers per modality:

* ``masked_iou``: IoU with the backbone masked -- how much the model still gets from the other modalities;
* ``reactivated_iou``: IoU after a few training steps of the *remaining* network with the backbone still
  masked -- the paper's "redundancy reactivation": features of the other backbone that duplicated the masked
  one's are brought back into use. ``recovered`` = (reactivated - masked) / (full - masked).
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from fusionlens.data.collate import collate_samples
from fusionlens.models import FusionModel, batch_to_inputs
from fusionlens.train.distributed import DistInfo
from fusionlens.train.loop import StepSampler, evaluate, move_batch
from fusionlens.train.losses import simplebev_loss


class ModalityMasked(nn.Module):
    """``model`` with the BEV features of ``masked`` modalities replaced by zeros (same interface)."""

    def __init__(self, model: FusionModel, masked: tuple[str, ...]) -> None:
        super().__init__()
        unknown = [m for m in masked if m not in model.modalities]
        if unknown:
            raise ValueError(f"cannot mask {unknown}: the model's modalities are {list(model.modalities)}")
        self.model, self.masked = model, tuple(masked)
        self.config = model.config

    @property
    def modalities(self) -> tuple[str, ...]:
        return self.model.modalities

    def forward(self, **inputs: Any) -> dict[str, torch.Tensor]:
        bev = self.model.bev_features(**inputs)
        bev = {m: torch.zeros_like(f) if m in self.masked else f for m, f in bev.items()}
        return self.model.decode(bev)


def reactivate(
    model: FusionModel, masked: str, train_set: Dataset, *, steps: int, lr: float, batch_size: int = 4, seed: int = 0
) -> FusionModel:
    """A copy of ``model`` trained ``steps`` steps (AdamW, constant ``lr``) with ``masked``'s backbone masked."""
    if steps < 0 or not lr > 0:
        raise ValueError(f"reactivation needs steps >= 0 and lr > 0, got steps={steps}, lr={lr}")
    work = copy.deepcopy(model).train()
    work.encoders[masked].eval()  # the masked backbone stays as it was, BatchNorm statistics included
    wrapped = ModalityMasked(work, (masked,))
    params = [p for n, p in work.named_parameters() if not n.startswith(f"encoders.{masked}.")]
    opt = torch.optim.AdamW(params, lr=lr)
    sampler = StepSampler(len(train_set), batch_size, seed, 0, steps, DistInfo())  # type: ignore[arg-type]
    for batch in DataLoader(train_set, batch_sampler=sampler, collate_fn=collate_samples):
        batch = move_batch(batch, next(work.parameters()).device)
        inputs, kwargs = batch_to_inputs(work, batch)
        loss = simplebev_loss(wrapped(**inputs, **kwargs), batch)["total"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return work.eval()


def redundancy_report(
    model: FusionModel,
    train_set: Dataset,
    val_set: Dataset,
    *,
    steps: int = 20,
    lr: float = 1e-3,
    batch_size: int = 4,
    progress: bool = False,
) -> dict[str, dict[str, float]]:
    """Per modality: full, masked and reactivated IoU on ``val_set`` and the recovered fraction."""
    full = evaluate(model, val_set, batch_size=batch_size, progress=progress)["all"]
    report: dict[str, dict[str, float]] = {}
    for modality in model.modalities:
        masked = evaluate(ModalityMasked(model, (modality,)), val_set, batch_size=batch_size, progress=progress)["all"]
        again = reactivate(model, modality, train_set, steps=steps, lr=lr, batch_size=batch_size)
        react = evaluate(ModalityMasked(again, (modality,)), val_set, batch_size=batch_size, progress=progress)["all"]
        gap = full - masked
        report[modality] = {
            "full_iou": full,
            "masked_iou": masked,
            "reactivated_iou": react,
            "recovered": (react - masked) / gap if gap > 1e-9 else float("nan"),
        }
    return report
