"""Structured (channel) pruning, appendix D: "modify the shape of the pruning mask mu and the parameter theta
... to represent each channel". Channel scores are aggregated from the parameter scores of any importance
method, and channels are removed physically with Torch-Pruning's ``DependencyGraph``, which also trims every
coupled layer (BatchNorm, the consumer's input channels -- including the fusion conv behind the modality
concatenation).

Aggregation: a Torch-Pruning group couples channel ``j`` of a root layer with slices of other layers; the
channel score is the sum of the parameter scores of every slice coupled to it (output slice ``W[j]`` of a
producer, input slice ``W[:, j']`` of each consumer), i.e. the first-order score of removing all of them at
once (for DeCI/SNIP-type scores the Taylor terms add). Each group then loses the ``floor(ratio * C)`` channels
of lowest score (at least one channel is always kept), so every layer keeps its share of width.

Concatenation: Torch-Pruning has open index-mapping bugs around ``torch.cat`` (issues #481, #146). Version
1.6.1 maps a two-modality concat correctly, also when both branches are pruned one after the other (tested
against an exact oracle in tests/test_prune_structured.py). The one guard lives in :func:`_prune_groups`:
after every group the concat offsets are re-read from a freshly traced graph, so a stale offset can never
pick the wrong input columns of the fusion conv.
"""

from __future__ import annotations

import copy
import statistics
import time
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch_pruning as tp
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from fusionlens.prune.params import call_model, check_sparsity, output_tensors

ROOT_TYPES: tuple[type[nn.Module], ...] = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


def output_layers(model: nn.Module, example_inputs: Any) -> list[nn.Module]:
    """Conv/Linear layers whose output *is* a model output (heads): their output channels are never pruned,
    so the pruned model's outputs keep their shapes."""
    seen: dict[int, nn.Module] = {}
    hooks = [
        m.register_forward_hook(lambda mod, _i, out: seen.__setitem__(out.data_ptr(), mod))
        for m in model.modules()
        if isinstance(m, ROOT_TYPES)
    ]
    try:
        with torch.no_grad():
            outs = output_tensors(call_model(model, example_inputs))
    finally:
        for h in hooks:
            h.remove()
    return list({id(seen[t.data_ptr()]): seen[t.data_ptr()] for t in outs if t.data_ptr() in seen}.values())


def _slice_scores(weight_score: torch.Tensor, module: nn.Module, handler: Any) -> torch.Tensor | None:
    """Per-channel sum of a weight's scores along the dimension ``handler`` prunes."""
    name = getattr(handler, "__name__", str(handler))
    transposed = isinstance(module, nn.modules.conv._ConvTransposeNd)
    if "out_channels" in name:
        dim = 1 if transposed else 0
    elif "in_channels" in name:
        dim = 0 if transposed else 1
    else:
        return None
    other = [d for d in range(weight_score.dim()) if d != dim]
    return weight_score.sum(dim=other) if other else weight_score


def channel_scores(
    group: Any, scores: Mapping[str, torch.Tensor], module_names: Mapping[nn.Module, str]
) -> torch.Tensor:
    """Score of each channel of a Torch-Pruning group's root, summed over every coupled weight slice."""
    root_dep, root_idxs = group[0]
    total = torch.zeros(len(root_idxs), dtype=torch.float64)
    for dep, idxs in group:
        module = dep.target.module
        name = module_names.get(module)
        key = f"{name}.weight" if name else None
        if key is None or key not in scores:
            continue
        per_channel = _slice_scores(scores[key].to(torch.float64), module, dep.handler)
        if per_channel is None:
            continue
        total += per_channel[torch.as_tensor(list(idxs), dtype=torch.long)]
    return total


def plan_channels(
    model: nn.Module,
    scores: Mapping[str, torch.Tensor],
    ratio: float,
    example_inputs: Any,
    ignored_layers: Sequence[nn.Module] = (),
) -> list[tuple[str, Any, list[int]]]:
    """``[(root module name, pruning function, channel indices to remove)]`` for every prunable group."""
    ratio = check_sparsity(ratio, "channel ratio")
    graph = tp.DependencyGraph().build_dependency(model, example_inputs=example_inputs)
    names = {m: n for n, m in model.named_modules()}
    ignored = list(ignored_layers) + output_layers(model, example_inputs)
    plan = []
    for group in graph.get_all_groups(ignored_layers=ignored, root_module_types=ROOT_TYPES):
        root_dep, root_idxs = group[0]
        n_channels = len(root_idxs)
        n_remove = min(int(ratio * n_channels), n_channels - 1)
        if n_remove <= 0:
            continue
        score = channel_scores(group, scores, names)
        order = torch.sort(score, stable=True).indices[:n_remove]
        plan.append((names[root_dep.target.module], root_dep.handler, sorted(int(i) for i in order)))
    return plan


def _prune_groups(model: nn.Module, plan: Sequence[tuple[str, Any, list[int]]], example_inputs: Any) -> None:
    for module_name, handler, idxs in plan:
        # Workaround for Torch-Pruning's concat offset bugs (#481, #146): trace afresh before each group so
        # the _ConcatOp offsets reflect the current (already partly pruned) widths.
        graph = tp.DependencyGraph().build_dependency(model, example_inputs=example_inputs)
        module = model.get_submodule(module_name)
        group = graph.get_pruning_group(module, handler, idxs=idxs)
        if not graph.check_pruning_group(group):
            raise RuntimeError(f"Torch-Pruning refuses to prune {module_name} (would empty a layer)")
        group.prune()


def structured_prune(
    model: nn.Module,
    scores: Mapping[str, torch.Tensor],
    ratio: float,
    example_inputs: Any,
    ignored_layers: Sequence[nn.Module] = (),
    inplace: bool = False,
) -> nn.Module:
    """Remove ``ratio`` of the channels of every prunable group (by aggregated ``scores``) from ``model``.

    ``example_inputs``: a tensor, a tuple, or a dict of keyword inputs (multi-modal models). Output shapes are
    preserved (output layers are never pruned) and checked."""
    target = model if inplace else copy.deepcopy(model)
    target.eval()
    with torch.no_grad():
        before = [t.shape for t in output_tensors(call_model(target, example_inputs))]
    plan = plan_channels(target, scores, ratio, example_inputs, ignored_layers)
    _prune_groups(target, plan, example_inputs)
    with torch.no_grad():
        after = [t.shape for t in output_tensors(call_model(target, example_inputs))]
    if before != after:
        raise RuntimeError(f"structured pruning changed the output shapes {before} -> {after}")
    return target


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def count_flops(model: nn.Module, example_inputs: Any) -> int:
    """Forward FLOPs (``torch.utils.flop_counter``; a multiply-add counts 2)."""
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        call_model(model, example_inputs)
    return int(counter.get_total_flops())


def cpu_latency(model: nn.Module, example_inputs: Any, repeats: int = 10, warmup: int = 2) -> float:
    """Median wall-clock seconds of one forward pass (no grad, eval mode) on the current thread setting."""
    model.eval()
    times = []
    with torch.no_grad():
        for i in range(warmup + repeats):
            start = time.perf_counter()
            call_model(model, example_inputs)
            if i >= warmup:
                times.append(time.perf_counter() - start)
    return statistics.median(times)


def cost_report(model: nn.Module, example_inputs: Any, repeats: int = 10) -> dict[str, float]:
    """Parameters, GFLOPs and median CPU latency (ms) of ``model`` on ``example_inputs``."""
    return {
        "params": count_parameters(model),
        "gflops": count_flops(model, example_inputs) / 1e9,
        "latency_ms": 1e3 * cpu_latency(model, example_inputs, repeats),
        "threads": torch.get_num_threads(),
    }
