"""One entry point for every method and both kinds of pruning: score, prune, fine-tune, report.

    from fusionlens.prune import prune, save_pruned
    # unstructured: the fraction `sparsity` of the prunable weights is masked (torch.nn.utils.prune masks)
    result = prune(model, "altermoma", 0.85, loss_fn=loss, batches=train_batches, finetune_steps=200,
                   groups={"camera": ["cam_encoder"], "lidar": ["lidar_encoder"]}, progress=True)
    # structured: the fraction `sparsity` of the output channels of every layer group is removed (Torch-Pruning)
    result = prune(model, "snip", 0.5, structured=True, example_inputs=inputs, loss_fn=loss, batches=train_batches)
    result.model          # the pruned copy (the model given is never changed)
    result.report         # sparsity, scoring backward passes, timings, layers left whole and why, cost
    save_pruned(result.model, "pruned.pt")

``loss_fn(model, batch) -> scalar tensor`` is checked on the first batch before any work.
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
    ParamGroups,
    check_loss_fn,
    check_sparsity,
    named_parameters,
    prunable_parameters,
    resolve_groups,
)
from fusionlens.prune.prospr import ProsPr
from fusionlens.prune.pruner import finetune, prune_with_scores, sparsity_report
from fusionlens.prune.structured import check_structured_inputs, structured_prune

METHODS: tuple[str, ...] = ("random", "magnitude", "imp", "snip", "synflow", "prospr", "altermoma")
#: Options each method accepts (passed through ``options``), for validation and the CLI.
METHOD_OPTIONS: dict[str, tuple[str, ...]] = {
    "random": ("seed",),
    "magnitude": (),
    "imp": ("rounds", "steps_per_round", "lr"),
    "snip": ("n_batches",),
    "synflow": ("iterations", "keep_inputs"),
    "prospr": ("inner_steps", "inner_lr", "momentum", "detach_first_momentum"),
    "altermoma": ("alpha", "beta", "reactivation_steps", "reactivation_lr", "same_batch_reri", "normalise",
                  "reference_batches", "reactivation_optimizer"),
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
    """``model``: the pruned copy; ``scores``: the importance of every prunable parameter entry; ``report``: what
    was done and measured (see :func:`prune`)."""

    model: nn.Module
    scores: dict[str, torch.Tensor]
    report: dict[str, Any] = field(default_factory=dict)


def prune(
    model: nn.Module,
    method: str | Importance,
    sparsity: float,
    *,
    structured: bool = False,
    example_inputs: Any = None,
    ignored_layers: Sequence[nn.Module] = (),
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
    """Score ``model``'s prunable parameters with ``method`` (a name of :data:`METHODS` with its ``options``, or an
    :class:`Importance` instance), prune a copy, then fine-tune it ``finetune_steps`` Adam steps.

    ``sparsity``: unstructured, the fraction of prunable weights masked under one global threshold (AlterMOMA
    Algorithm 1, lines 8-10); ``structured=True``, the fraction of output channels removed from every layer group,
    lowest aggregated score first (appendix D; :func:`fusionlens.prune.structured.structured_prune`, which needs
    ``example_inputs`` -- a tensor, a tuple of positionals or a dict of keyword inputs -- and leaves the layers in
    ``ignored_layers`` whole; the layers it must leave whole itself are listed in ``report["left_whole"]`` with the
    reason). ``loss_fn(model, batch)`` is checked on the first batch; ``progress`` shows tqdm bars for scoring and
    fine-tuning. Every setting is validated before any work, and ``model`` itself is never changed."""
    rho = check_sparsity(sparsity)
    if finetune_steps < 0:
        raise ValueError(f"finetune_steps must be >= 0, got {finetune_steps}")
    if finetune_steps and loss_fn is None:
        raise ValueError("fine-tuning needs loss_fn")
    if structured:
        if example_inputs is None:
            raise ValueError("structured pruning needs example_inputs (a forward pass traces the channel dependencies)")
        check_structured_inputs(model, example_inputs, ignored_layers)
    if input_factory is None and example_inputs is not None:
        input_factory = lambda: example_inputs  # noqa: E731  (SynFlow's input shapes)
    names = prunable_parameters(model, prunable_types, include_bias)
    name = method if isinstance(method, str) else method.name
    if isinstance(method, Importance):
        if options:
            raise ValueError(f"options {sorted(options)} go to the method's constructor, not to prune()")
        if groups is not None and isinstance(method, AlterMOMA):
            raise ValueError("give AlterMOMA's groups either to the AlterMOMA instance or to prune(), not both")
        importance = method
    else:
        importance = build_importance(
            method, loss_fn=loss_fn, batches=batches, input_factory=input_factory, groups=groups, **options
        )
    resolved = _groups(model, importance, groups)  # AlterMOMA: bad groups fail before any backward pass
    uses = [(getattr(importance, "loss_fn", None), getattr(importance, "batches", None))]
    if finetune_steps:
        uses.append((loss_fn, finetune_batches if finetune_batches is not None else batches))
    for fn, data in {(id(f), id(d)): (f, d) for f, d in uses}.values():  # each (loss, data) pair checked once
        if fn is not None and data is not None:
            check_loss_fn(model, fn, data)
    start = time.perf_counter()
    scores = importance(model, names, rho, progress=progress)
    scored = time.perf_counter() - start
    info: dict[str, Any] = {}
    if structured:
        pruned = structured_prune(model, scores, rho, example_inputs, ignored_layers, report=info, progress=progress)
    else:
        pruned = prune_with_scores(model, scores, rho)
    losses: list[float] = []
    if finetune_steps:
        losses = finetune(
            pruned,
            loss_fn,  # type: ignore[arg-type]
            finetune_batches if finetune_batches is not None else batches,  # type: ignore[arg-type]
            finetune_steps,
            lr=finetune_lr,
            progress=progress,
        )
    report: dict[str, Any] = {
        "method": name,
        "structured": structured,
        "sparsity_requested": rho,
        "scoring_backward_passes": importance.backward_passes,
        "scoring_seconds": scored,
        "finetune_steps": finetune_steps,
        "finetune_lr": finetune_lr,
        "finetune_final_loss": losses[-1] if losses else None,
        "options": options,
        "prunable": names,
    }
    before = {n: p.numel() for n, p in named_parameters(model).items()}
    if structured:
        after = {n: p.numel() for n, p in named_parameters(pruned).items()}
        kept = {n: after[n] / before[n] for n in names}
        report.update(info)
        report.update(n_params_before=sum(before.values()), n_params_after=sum(after.values()))
    else:
        measured = sparsity_report(pruned, names)
        kept = {n: 1.0 - z for n, z in measured["per_parameter"].items()}
        report.update(sparsity=measured["sparsity"], n_prunable=measured["n_params"], n_zero=measured["n_zero"])
    if resolved is not None:
        report["kept_per_group"] = kept_per_group(resolved, names, kept, before)
    return PruneResult(pruned, scores, report)


def _groups(model: nn.Module, importance: Importance, groups: Mapping[str, Sequence[str]] | None) -> ParamGroups | None:
    """The modality groups the report splits the kept weights by: AlterMOMA's own (given on the instance, to
    :func:`prune`, or the model's ``modality_groups()``; errors raised), else the model's if it declares them."""
    if isinstance(importance, AlterMOMA):
        return importance.resolve(model)
    try:
        return resolve_groups(model, groups)
    except ValueError:
        if groups is not None:
            raise
        return None


def kept_per_group(
    groups: ParamGroups, names: Sequence[str], kept: Mapping[str, float], sizes: Mapping[str, int]
) -> dict[str, float]:
    """Fraction of each group's prunable weights that survived (modality backbones and ``fusion``): ``kept[n]`` is
    the surviving fraction of parameter ``n`` (unmasked entries, or the remaining share of a reshaped tensor),
    ``sizes[n]`` its original size.

    One global threshold over per-group-normalised scores (AlterMOMA eq. 11-13) decides how the budget splits
    between backbones and fusion; this is where that split shows."""
    resolved = groups.restrict(names)
    out = {}
    for group, members in {**resolved.modalities, "fusion": resolved.fusion}.items():
        total = sum(sizes[n] for n in members)
        if total:
            out[group] = sum(kept[n] * sizes[n] for n in members) / total
    return out
