"""One entry point for every method: build an importance function by name, score, prune, fine-tune, report.

from fusionlens.prune import prune
result = prune(model, "altermoma", 0.85, loss_fn=loss, batches=train_batches, finetune_steps=200)
result.model          # masked model (plain PyTorch, torch.nn.utils.prune masks)
result.report         # sparsity, scoring backward passes, timings, method settings
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from fusionlens.prune.altermoma import AlterMOMA
from fusionlens.prune.baselines import IMP, SNIP, Importance, MagnitudeImportance, RandomImportance, SynFlow
from fusionlens.prune.params import (
    DEFAULT_PRUNABLE_TYPES,
    LossFn,
    check_sparsity,
    named_parameters,
    prunable_parameters,
    resolve_groups,
)
from fusionlens.prune.prospr import ProsPr
from fusionlens.prune.pruner import finetune, prune_with_scores, sparsity_report

METHODS: tuple[str, ...] = ("random", "magnitude", "imp", "snip", "synflow", "prospr", "altermoma")
#: Options each method accepts (passed through ``options``), for validation and the CLI.
METHOD_OPTIONS: dict[str, tuple[str, ...]] = {
    "random": ("seed",),
    "magnitude": (),
    "imp": ("rounds", "steps_per_round", "lr"),
    "snip": ("n_batches",),
    "synflow": ("iterations", "keep_inputs"),
    "prospr": ("inner_steps", "inner_lr", "momentum"),
    "altermoma": ("alpha", "beta", "reactivation_steps", "reactivation_lr", "same_batch_reri", "normalise"),
}


def build_importance(
    method: str,
    *,
    loss_fn: LossFn | None = None,
    batches: Iterable[Any] | None = None,
    input_factory: Callable[[], Any] | None = None,
    groups: Mapping[str, Sequence[str]] | None = None,
    **options: Any,
) -> Importance:
    """The importance function ``method`` with its ``options``; raises ``ValueError`` for an unknown method,
    an option the method does not take, or missing data plumbing."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {list(METHODS)}, got {method!r}")
    unknown = sorted(set(options) - set(METHOD_OPTIONS[method]))
    if unknown:
        raise ValueError(f"method {method!r} takes options {list(METHOD_OPTIONS[method])}, not {unknown}")
    if method in ("imp", "snip", "prospr", "altermoma") and (loss_fn is None or batches is None):
        raise ValueError(f"method {method!r} needs loss_fn and batches")
    if method == "synflow" and input_factory is None:
        raise ValueError("method 'synflow' needs input_factory (example inputs; they are replaced by ones)")
    if method == "random":
        return RandomImportance(**options)
    if method == "magnitude":
        return MagnitudeImportance()
    if method == "imp":
        return IMP(loss_fn, batches, **options)  # type: ignore[arg-type]
    if method == "snip":
        return SNIP(loss_fn, batches, **options)  # type: ignore[arg-type]
    if method == "synflow":
        return SynFlow(input_factory, **options)  # type: ignore[arg-type]
    if method == "prospr":
        return ProsPr(loss_fn, batches, **options)  # type: ignore[arg-type]
    return AlterMOMA(loss_fn, batches, groups=groups, **options)  # type: ignore[arg-type]


@dataclass
class PruneResult:
    model: nn.Module
    scores: dict[str, torch.Tensor]
    report: dict[str, Any] = field(default_factory=dict)


def prune(
    model: nn.Module,
    method: str | Importance,
    sparsity: float,
    *,
    loss_fn: LossFn | None = None,
    batches: Iterable[Any] | None = None,
    input_factory: Callable[[], Any] | None = None,
    groups: Mapping[str, Sequence[str]] | None = None,
    prunable_types: Sequence[type[nn.Module]] = DEFAULT_PRUNABLE_TYPES,
    include_bias: bool = False,
    finetune_steps: int = 0,
    finetune_lr: float = 1e-4,
    finetune_batches: Iterable[Any] | None = None,
    progress: bool = False,
    **options: Any,
) -> PruneResult:
    """Score ``model``'s prunable parameters with ``method``, keep the top ``1 - sparsity`` globally (masks
    applied to the given weights), then fine-tune ``finetune_steps`` Adam steps with the masks fixed.

    Every setting is validated before any work: the sparsity, the method and its options, the groups
    (AlterMOMA needs the model's ``modality_groups()`` or ``groups`` prefixes), the data plumbing."""
    rho = check_sparsity(sparsity)
    if finetune_steps < 0:
        raise ValueError(f"finetune_steps must be >= 0, got {finetune_steps}")
    if finetune_steps and loss_fn is None:
        raise ValueError("fine-tuning needs loss_fn")
    names = prunable_parameters(model, prunable_types, include_bias)
    name = method if isinstance(method, str) else method.name
    if name == "altermoma":
        resolve_groups(model, groups)  # fail on bad groups before any backward pass
    importance = (
        method
        if isinstance(method, Importance)
        else build_importance(
            method, loss_fn=loss_fn, batches=batches, input_factory=input_factory, groups=groups, **options
        )
    )
    start = time.perf_counter()
    scores = importance(model, names, rho)
    scored = time.perf_counter() - start
    pruned = prune_with_scores(model, scores, rho)
    losses: list[float] = []
    if finetune_steps:
        losses = finetune(
            pruned,
            loss_fn,
            finetune_batches if finetune_batches is not None else batches,  # type: ignore[arg-type]
            finetune_steps,
            lr=finetune_lr,
            progress=progress,
        )
    measured = sparsity_report(pruned, names)
    report = {
        "method": name,
        "sparsity_requested": rho,
        "sparsity": measured["sparsity"],
        "n_prunable": measured["n_params"],
        "n_zero": measured["n_zero"],
        "scoring_backward_passes": importance.backward_passes,
        "scoring_seconds": scored,
        "finetune_steps": finetune_steps,
        "finetune_lr": finetune_lr,
        "finetune_final_loss": losses[-1] if losses else None,
        "options": options,
        "prunable": names,
    }
    kept = kept_per_group(pruned, names, measured["per_parameter"], groups)
    if kept:
        report["kept_per_group"] = kept
    return PruneResult(pruned, scores, report)


def kept_per_group(model: nn.Module, names: Sequence[str], zero_fraction: Mapping[str, float],
                   groups: Mapping[str, Sequence[str]] | None = None) -> dict[str, float]:
    """Fraction of each group's prunable weights that survived (modality backbones and ``fusion``).

    One global threshold over per-group-normalised scores (AlterMOMA eq. 11-13) decides how the budget splits
    between backbones and fusion; this is where that split shows. Empty for a model without modality groups.
    """
    try:
        resolved = resolve_groups(model, groups).restrict(names)
    except ValueError:
        return {}
    params = named_parameters(model)  # public names, also while torch.nn.utils.prune holds weight_orig
    sizes = {n: params[n].numel() for n in names}
    parts = {**resolved.modalities, "fusion": resolved.fusion}
    out = {}
    for group, members in parts.items():
        total = sum(sizes[n] for n in members)
        if total:
            out[group] = 1.0 - sum(zero_fraction[n] * sizes[n] for n in members) / total
    return out
