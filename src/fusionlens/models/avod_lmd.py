"""LMD on region-crop fusion: the decomposition rule of ``torchvision.ops.roi_align`` and the
:class:`~fusionlens.spec.ModelSpec` of :class:`~fusionlens.models.avod.AvodDetector`.

``roi_align`` reaches ``__torch_function__`` of decomposed tensors as ``torch.ops.torchvision.roi_align``. For
boxes fixed at the operating point it is linear in its feature input -- every output value is a bilinear
interpolation of input values with weights set by the boxes alone -- so each modality's component is the op
applied to that modality's component (superposition, LMD eq. 21; :func:`fusionlens.decompose.rules.linear`).
Boxes that themselves carry modality components (boxes regressed from the features and cropped again in the
same decomposed forward) would make the op non-linear; the rule refuses them.

AVOD crops each view's own features, so with LMD's default local bias the crops are wholly camera or wholly
LiDAR and the rule is needed only where the modalities meet before a crop (a fused map cropped, or
``bias="global"``). The detector's ``ModelSpec`` studies the second stage at the operating point: the RPN runs
once on the clean batch, and its proposals are then constants of the forward (``proposals=``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torchvision  # noqa: F401  (registers torch.ops.torchvision)
from torch import nn

from fusionlens.decompose import register_rule
from fusionlens.decompose.rules import linear

_PLAIN = (torch.Tensor, nn.Parameter)


def roi_align_rule(engine: Any, func: Callable, args: tuple, kwargs: dict, total: Any) -> Any:
    """``roi_align(input, rois, ...)``: linear in ``input`` for constant ``rois`` (LMD eq. 21)."""
    rois = args[1] if len(args) > 1 else kwargs.get("rois", kwargs.get("boxes"))
    if isinstance(rois, torch.Tensor) and type(rois) not in _PLAIN:  # a decomposed tensor: boxes from features
        raise NotImplementedError(
            "roi_align with boxes computed from decomposed features is not linear in them; fix the boxes at the "
            "operating point (compute them without grad / from the clean forward) and pass them as constants")
    return linear(engine, func, args, kwargs, total)


register_rule(torch.ops.torchvision.roi_align.default, roi_align_rule)
register_rule(torch.ops.torchvision.roi_align, roi_align_rule)


def avod_inputs(model: nn.Module, batch: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The detector's modality inputs of a :func:`fusionlens.train.avod.collate_kitti` batch and its constants:
    ``lidar_to_image`` and the operating point's ``proposals`` / ``proposal_batch`` (the batch's own when it
    carries them, else the RPN's on this batch, computed once without grad)."""
    cfg = model.cfg
    image, bev = batch["image"], batch["bev"]
    if "proposals" not in batch:
        was = model.training
        model.eval()
        try:
            with torch.no_grad():
                out = model(image, bev, batch["lidar_to_image"])
        finally:
            model.train(was)
        batch["proposals"], batch["proposal_batch"] = out["proposals"], out["proposal_batch"]
    given = {"camera": image, "lidar": bev}
    kwargs = {"lidar_to_image": batch["lidar_to_image"], "proposals": batch["proposals"],
              "proposal_batch": batch["proposal_batch"]}
    for m in ("camera", "lidar"):
        if m not in cfg.modalities:  # the single-view partners still take the other input, unused
            kwargs[{"camera": "image", "lidar": "bev"}[m]] = given.pop(m)
    return given, kwargs


def avod_spec(model: nn.Module) -> Any:
    """The detector to the analyses: modalities camera (``image``) and LiDAR (``bev``), the second stage's
    outputs on the operating point's proposals as the studied tensor ``(K, C + 1 + 6 C + 4)`` (class logits,
    box regression per class, orientation, direction), the crop fusion as its fusion level."""
    from fusionlens.spec import ModelSpec
    from fusionlens.train.avod import collate_kitti

    return ModelSpec(
        model, inputs=lambda batch: avod_inputs(model, batch), arguments={"camera": "image", "lidar": "bev"},
        output="second", fusion="fusion" if len(model.cfg.modalities) > 1 else None,
        collate=lambda items: collate_kitti(items, model.cfg), modalities=tuple(model.cfg.modalities))


def detection_shares(model: nn.Module, batch: dict[str, Any], kind: str = "signed",
                     **decompose_kwargs: Any) -> list[dict[str, Any]]:
    """Per proposal of the operating point: its sample, box ``(6,)``, predicted class (index into the detector's
    classes, -1 for background), that class's probability and each modality's share of the class's logit (the
    LMD components of the second stage's class logit, :func:`fusionlens.evaluate.regions.modality_shares`)."""
    from fusionlens.evaluate.regions import modality_shares

    spec = avod_spec(model)
    d = spec.decompose(batch, **decompose_kwargs)
    n_cls = len(model.cfg.classes)
    logits = d.output[:, : n_cls + 1]
    probs = logits.softmax(1)
    rows = []
    for k in range(len(logits)):
        c = int(probs[k].argmax())
        where = torch.zeros_like(d.output, dtype=torch.bool)
        where[k, c] = True
        rows.append({"sample": int(batch["proposal_batch"][k]), "box": batch["proposals"][k].tolist(),
                     "class": c - 1, "probability": float(probs[k, c]),
                     "shares": modality_shares(d, where, kind=kind)})
    return rows
