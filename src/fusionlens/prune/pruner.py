"""The one unstructured pruner every importance method shares.

Eq. 2 of AlterMOMA: keep the ``k = (1 - rho) * N`` parameters of highest score, i.e. the threshold ``tau`` is
the (1 - rho) percentile of ``S(theta)`` and ``mu = (tau <= S(theta))`` (Algorithm 1, lines 8-9). Here the
threshold is realised by a stable sort, so exactly ``round(rho * N)`` parameters are pruned even when scores
tie (ties are broken by position: earlier parameters in module order, then earlier flat indices, are pruned
first). Masks are installed with ``torch.nn.utils.prune`` so a pruned model stays plain PyTorch.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn
from torch.nn.utils import prune as torch_prune

from fusionlens.prune.params import (
    LossFn,
    batch_stream,
    check_scores,
    check_sparsity,
    clone_model,
    effective_weights,
    named_parameters,
)


def global_masks(scores: Mapping[str, torch.Tensor], sparsity: float) -> dict[str, torch.Tensor]:
    """Boolean keep-masks pruning the ``round(sparsity * N)`` lowest scores over all tensors in ``scores``."""
    rho = check_sparsity(sparsity)
    if not scores:
        raise ValueError("scores is empty")
    names = list(scores)
    flat = torch.cat([scores[n].detach().reshape(-1).to(torch.float64).cpu() for n in names])
    if not torch.isfinite(flat).all():
        raise ValueError("scores contain NaN or inf")
    n_prune = int(round(rho * flat.numel()))
    keep = torch.ones(flat.numel(), dtype=torch.bool)
    if n_prune:
        order = torch.sort(flat, stable=True).indices
        keep[order[:n_prune]] = False
    out: dict[str, torch.Tensor] = {}
    start = 0
    for n in names:
        size = scores[n].numel()
        out[n] = keep[start : start + size].reshape(scores[n].shape)
        start += size
    return out


def _owner(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    mod_name, _, attr = name.rpartition(".")
    return (model.get_submodule(mod_name) if mod_name else model), attr


def apply_masks(model: nn.Module, masks: Mapping[str, torch.Tensor]) -> nn.Module:
    """Install ``masks`` on ``model`` in place through ``torch.nn.utils.prune.custom_from_mask``.

    The model's current parameters are kept as ``*_orig``; the forward uses ``orig * mask``, so gradients of
    pruned entries are zero and the masks stay fixed through any later training. Existing masks are combined
    (logical and), as ``torch.nn.utils.prune`` does.
    """
    params = named_parameters(model)
    for name, mask in masks.items():
        if name not in params:
            raise ValueError(f"mask for unknown parameter {name!r}")
        if mask.shape != params[name].shape:
            raise ValueError(f"mask for {name!r} has shape {tuple(mask.shape)}, parameter {tuple(params[name].shape)}")
        module, attr = _owner(model, name)
        torch_prune.custom_from_mask(module, attr, mask.to(params[name].device, torch.float32))
    return model


def get_masks(model: nn.Module) -> dict[str, torch.Tensor]:
    """The installed ``torch.nn.utils.prune`` masks, keyed by public parameter name (bool tensors)."""
    out = {}
    for mod_name, module in model.named_modules():
        for buf_name, buf in module.named_buffers(recurse=False):
            if buf_name.endswith("_mask"):
                key = f"{mod_name}.{buf_name[:-5]}" if mod_name else buf_name[:-5]
                out[key] = buf.detach().bool().clone()
    return out


def make_dense(model: nn.Module) -> nn.Module:
    """Remove the re-parametrisation in place: each masked parameter becomes a plain tensor with zeros."""
    for module in model.modules():
        for hook in list(module._forward_pre_hooks.values()):
            if isinstance(hook, torch_prune.BasePruningMethod):
                torch_prune.remove(module, hook._tensor_name)
    return model


def dense_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """A state dict of the pruned model in the original architecture's keys, pruned entries zero."""
    return make_dense(clone_model(model)).state_dict()


def sparsity_report(model: nn.Module, names: Iterable[str]) -> dict[str, Any]:
    """Measured fraction of exact zeros over ``names`` (after masking), overall and per parameter."""
    effective = effective_weights(model, names)
    total = sum(t.numel() for t in effective.values())
    zeros = sum(int((t == 0).sum()) for t in effective.values())
    return {
        "sparsity": zeros / max(total, 1),
        "n_params": total,
        "n_zero": zeros,
        "per_parameter": {n: float((t == 0).float().mean()) for n, t in effective.items()},
    }


def prune_with_scores(
    model: nn.Module,
    scores: Mapping[str, torch.Tensor],
    sparsity: float,
    inplace: bool = False,
) -> nn.Module:
    """Global-threshold pruning (Algorithm 1, lines 8-10): masks from ``scores`` applied to ``model``'s
    parameters (the initial ones, theta_init). Returns a masked copy unless ``inplace``."""
    check_sparsity(sparsity)
    check_scores(scores, {n: p.detach() for n, p in named_parameters(model).items()})
    target = model if inplace else clone_model(model)
    return apply_masks(target, global_masks(scores, sparsity))


def finetune(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Iterable[Any],
    steps: int,
    lr: float = 1e-4,
    weight_decay: float = 0.0,
    progress: bool = False,
) -> list[float]:
    """Train ``model`` in place for ``steps`` Adam steps (the paper's optimiser, lr 1e-4) with its installed
    masks held fixed (Algorithm 1, line 11). Returns the loss per step."""
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    if not lr > 0:
        raise ValueError(f"lr must be > 0, got {lr}")
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    stream = batch_stream(batches)
    losses: list[float] = []
    model.train()
    iterator: Iterable[int] = range(steps)
    if progress:
        from tqdm import tqdm

        iterator = tqdm(iterator, desc="fine-tune", leave=False)
    for _ in iterator:
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(model, next(stream))
        if not torch.isfinite(loss):
            raise RuntimeError(f"fine-tuning diverged (loss {float(loss)}); lower lr (now {lr})")
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return losses
