"""SimpleBEV's training losses, masked by ``bev_valid``.

* segmentation: binary cross-entropy on the logits with positive weight ``pos_weight`` (SimpleBEV: 2.13),
  averaged over valid cells;
* centre: balanced squared error between ``sigmoid(center)`` and the Gaussian heatmap -- the mean over
  valid cells near a centre (target > 0.5) and the mean over the rest count equally;
* offset: L1 between predicted and true offsets (metres), averaged over valid vehicle cells.

total = w_seg * seg + w_center * center + w_offset * offset.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class LossConfig:
    pos_weight: float = 2.13
    seg_weight: float = 1.0
    center_weight: float = 1.0
    offset_weight: float = 0.1

    def __post_init__(self) -> None:
        for name in ("pos_weight", "seg_weight", "center_weight", "offset_weight"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"LossConfig.{name} must be >= 0, got {getattr(self, name)}")


def masked_mean(values: torch.Tensor, mask: torch.Tensor,
                reduce_count: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """``sum(values * mask) / max(sum(mask), 1e-6)`` -- 0 when the mask is empty. ``reduce_count`` replaces the
    count ``sum(mask)`` (e.g. by its mean over the ranks of a distributed run)."""
    mask = mask.expand_as(values)
    count = mask.sum()
    if reduce_count is not None:
        count = reduce_count(count)
    return (values * mask).sum() / count.clamp(min=1e-6)


def simplebev_loss(
    outputs: dict[str, torch.Tensor], batch: dict[str, Any], config: LossConfig = LossConfig(),
    reduce_count: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """The loss terms and their weighted ``"total"`` for one batch.

    Under DDP each rank holds part of the global batch, and the masked means' counts differ between ranks; with
    ``reduce_count`` mapping a rank's count to the mean count over the ranks, each rank's term is its share of
    the global batch's masked mean times the world size, so DDP's gradient averaging gives exactly the gradient of
    one process's loss on the whole global batch."""
    seg_logit = outputs["seg"].float()
    target = batch["bev_seg"].to(seg_logit.device)
    valid = batch["bev_valid"].to(seg_logit.device)
    if seg_logit.shape != target.shape:
        raise ValueError(
            f"seg output {tuple(seg_logit.shape)} does not match bev_seg {tuple(target.shape)}; "
            "is the model's grid the dataset's grid?"
        )
    pos_weight = torch.tensor(config.pos_weight, device=seg_logit.device)
    seg = masked_mean(
        F.binary_cross_entropy_with_logits(seg_logit, target, pos_weight=pos_weight, reduction="none"), valid,
        reduce_count,
    )
    center_gt = batch["bev_center"].to(seg_logit.device)
    err = (torch.sigmoid(outputs["center"].float()) - center_gt) ** 2
    near = (center_gt > 0.5).float()
    center = 0.5 * (masked_mean(err, valid * near, reduce_count) + masked_mean(err, valid * (1 - near), reduce_count))
    offset_err = (
        (outputs["offset"].float() - batch["bev_offset"].to(seg_logit.device)).abs().sum(1, keepdim=True)
    )
    offset = masked_mean(offset_err, valid * target, reduce_count)
    total = config.seg_weight * seg + config.center_weight * center + config.offset_weight * offset
    return {"total": total, "seg": seg.detach(), "center": center.detach(), "offset": offset.detach()}
