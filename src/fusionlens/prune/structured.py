"""Structured (channel) pruning, appendix D: "modify the shape of the pruning mask mu and the parameter theta
... to represent each channel". Channel scores are aggregated from the parameter scores of any importance
method, and channels are removed physically with Torch-Pruning's ``DependencyGraph``, which also trims every
coupled layer (BatchNorm, the consumers' input channels, concatenations, attention embeddings).

Aggregation: a Torch-Pruning group couples channel ``j`` of a root layer with slices of other layers; the
channel score is the sum of the parameter scores of every slice coupled to it (output slice ``W[j]`` of a
producer, input slice ``W[:, j']`` of each consumer), the first-order score of removing them all at once. Each
group loses the ``floor(sparsity * C)`` channels of lowest score (at least one kept; a group holding an
``nn.MultiheadAttention`` keeps a multiple of its head count).

Checked, not trusted: Torch-Pruning mis-maps some wiring (open concat bugs #481, #146; one tensor concatenated
several times; a channel count held in a Python constant, such as a scatter canvas of fixed width). Every group
is applied to a copy and the copy must run on ``example_inputs`` with the original output shapes. The common case
costs one forward pass (all groups, one check); if it fails, groups are replayed one by one with a check after
each, and a failing group is retried through its fallback or left whole and reported with its error.

Fallback for a group reaching a concatenation *across* branches (the modality concat before the fusion conv,
where the camera lift's reshapes leave Torch-Pruning's concat without offsets): :func:`_prune_across_concat`
prunes each producer on a graph of its own branch (:func:`~fusionlens.prune.channel_map.branch_graph`) and
removes the consumer's input channels found by probing (:func:`~fusionlens.prune.channel_map.concat_mapping`),
each column attributed to the one layer feeding it directly (a column claimed twice is an error, never a double
removal). Exact oracles: tests/test_prune_structured.py and tests/test_prune_models.py.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch_pruning as tp
from torch import nn
from torch_pruning import ops
from tqdm import tqdm

from fusionlens.prune.channel_map import branch_graph, branch_of, concat_mapping
from fusionlens.prune.params import call_model, check_sparsity, clone_model, output_tensors

ROOT_TYPES: tuple[type[nn.Module], ...] = (nn.modules.conv._ConvNd, nn.Linear)


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


def _is_concat(node: Any) -> bool:
    return getattr(node, "type", None) == ops.OPTYPE.CONCAT


def _boundary_consumer(group: Any, names: Mapping[nn.Module, str]) -> str | None:
    """The Conv/Linear that reads a concatenation this group reaches (the fusion conv), if any."""
    for dep, _ in group:
        if _is_concat(dep.source) and isinstance(dep.target.module, ROOT_TYPES):
            return names[dep.target.module]
    return None


def _n_remove(module: nn.Module, ratio: float, group: Any = None) -> int:
    """``floor(ratio * C)`` channels, at least one kept; where the group holds an ``nn.MultiheadAttention`` or an
    ``nn.GroupNorm``, the kept width is rounded up to a multiple of its head / group count (the channels must split
    evenly into heads and groups)."""
    n = module.out_features if isinstance(module, nn.Linear) else module.out_channels
    remove = min(int(ratio * n), n - 1)
    members = [dep.target.module for dep, _ in (group or [])]
    splits = [m.num_heads for m in members if isinstance(m, nn.MultiheadAttention)]
    splits += [m.num_groups for m in members if isinstance(m, nn.GroupNorm)]
    for h in splits:
        remove = n - -(-(n - remove) // h) * h
    return max(remove, 0)


def _out_handler(module: nn.Module) -> Any:
    return tp.prune_linear_out_channels if isinstance(module, nn.Linear) else tp.prune_conv_out_channels


@dataclass
class PlanEntry:
    """Remove output channels ``idxs`` of layer ``module``; for a producer feeding a concatenation,
    ``consumer`` is the layer after it and ``columns`` its input channels fed by ``idxs`` (numbered as
    before any pruning)."""

    module: str
    handler: Any
    idxs: list[int]
    consumer: str | None = None
    columns: list[int] = field(default_factory=list)
    fallback: Callable[[], list[PlanEntry]] | None = None  # the entries tried instead if this one fails its check


def plan_channels(
    model: nn.Module,
    scores: Mapping[str, torch.Tensor],
    sparsity: float,
    example_inputs: Any,
    ignored_layers: Sequence[nn.Module] = (),
) -> tuple[list[PlanEntry], dict[str, str]]:
    """The channels to remove per group (numbered as before any pruning), and the layers that cannot be planned
    with the reason (``{layer: reason}``).

    A group reaching a concatenation *across* modality branches is replanned per producer layer on its own
    branch's graph (Torch-Pruning may have merged several modalities' producers into one corrupted group there),
    see :func:`_plan_across_concat`; every other group (concatenations inside one module, U-Net skips, dense
    blocks) is Torch-Pruning's own, and :func:`structured_prune` checks each by a forward pass."""
    ratio = check_sparsity(sparsity, "sparsity")
    graph = tp.DependencyGraph().build_dependency(model, example_inputs=example_inputs, verbose=False)
    names = {m: n for n, m in model.named_modules()}
    ignored = list(ignored_layers) + output_layers(model, example_inputs)
    plan: list[PlanEntry] = []
    left: dict[str, str] = {}
    planned: set[str] = set()
    graphs: dict[str, tp.DependencyGraph] = {}  # branch -> its own graph, built once
    claimed: dict[tuple[str, int], str] = {}  # (consumer, input channel) -> the producer channel feeding it
    for group in graph.get_all_groups(ignored_layers=ignored, root_module_types=ROOT_TYPES):
        root = group[0][0].target.module
        consumer = _boundary_consumer(group, names)
        if consumer is not None and consumer.startswith(branch_of(model, names[root]) + "."):
            consumer = None  # a concatenation inside one branch: Torch-Pruning's own mapping, checked when applied
        native: PlanEntry | None = None
        try:
            n_remove = _n_remove(root, ratio, group)
            if n_remove > 0:
                order = torch.sort(channel_scores(group, scores, names), stable=True).indices[:n_remove]
                native = PlanEntry(names[root], group[0][0].handler, sorted(int(i) for i in order))
        except (IndexError, RuntimeError) as exc:  # Torch-Pruning's concat offsets ran past a layer's width
            if consumer is None:
                left[names[root]] = f"cannot map its channels ({type(exc).__name__}: {str(exc).splitlines()[0]})"
        if consumer is None:
            plan += [native] if native is not None else []
            continue
        # the fallback if Torch-Pruning's own mapping of this group fails its forward check (planned only then)
        fallback = functools.partial(
            _plan_producers, model, group, consumer, scores, ratio, example_inputs, ignored, planned, claimed, graphs
        )
        if native is not None:
            native.fallback = fallback
            plan.append(native)
            continue
        try:
            plan += fallback()
        except RuntimeError as exc:  # the probe found a column fed by two producers
            left[names[root]] = f"cannot map its channels (RuntimeError: {str(exc).splitlines()[0]})"
    return plan, left


def _plan_producers(
    model: nn.Module,
    group: Any,
    consumer: str,
    scores: Mapping[str, torch.Tensor],
    ratio: float,
    example_inputs: Any,
    ignored: Sequence[nn.Module],
    planned: set[str],
    claimed: dict[tuple[str, int], str],
    graphs: dict[str, tp.DependencyGraph],
) -> list[PlanEntry]:
    """One entry per producer layer of a group that reaches ``consumer`` through a cross-branch concatenation."""
    names = {m: n for n, m in model.named_modules()}
    out = []
    for dep, _ in group:
        prod = dep.target.module
        if not isinstance(prod, ROOT_TYPES) or "out_channels" not in getattr(dep.handler, "__name__", ""):
            continue
        name = names[prod]
        if name == consumer or name in planned or any(prod is m for m in ignored):
            continue
        if _n_remove(prod, ratio) <= 0 or f"{name}.weight" not in scores:
            continue
        branch = branch_of(model, name)
        if branch not in graphs:
            graphs[branch] = branch_graph(model, branch, example_inputs)
        entry = _plan_across_concat(
            model, graphs[branch], name, consumer, scores, ratio, example_inputs, ignored, planned, claimed
        )
        if entry is not None:
            out.append(entry)
    return out


def _plan_across_concat(
    model: nn.Module,
    graph: tp.DependencyGraph,
    name: str,
    consumer: str,
    scores: Mapping[str, torch.Tensor],
    ratio: float,
    example_inputs: Any,
    ignored: Sequence[nn.Module],
    planned: set[str],
    claimed: dict[tuple[str, int], str],
) -> PlanEntry | None:
    """The entry for producer ``name`` feeding ``consumer`` across the concatenation, or None if nothing of it
    is pruned.

    Its group is taken from its branch's own graph, so it holds exactly the layers coupled to it inside the
    encoder (BatchNorm, the next layers' inputs -- e.g. the pillars' ``block2`` behind ``block1`` -- and the
    producers coupled by a residual add, all marked ``planned``). Its channel score is that group's
    aggregated score plus the consumer columns each channel feeds directly (:func:`concat_mapping`). Each
    consumer column must be fed by one producer channel only (``claimed``): a column claimed twice would be
    removed twice, the failure this bookkeeping exists to prevent. A channel whose columns the probe cannot
    find is kept (pruning it would leave the consumer's width inconsistent)."""
    names = {m: n for n, m in model.named_modules()}
    prod = model.get_submodule(name)
    width = prod.out_features if isinstance(prod, nn.Linear) else prod.out_channels
    group = graph.get_pruning_group(prod, _out_handler(prod), idxs=list(range(width)))
    tied: dict[str, list[list[int]]] = {}  # coupled producer -> its channels tied to each of ours
    for item in group:
        layer = item.dep.target.module
        if isinstance(layer, ROOT_TYPES) and "out_channels" in getattr(item.dep.handler, "__name__", ""):
            per_root = tied.setdefault(names[layer], [[] for _ in range(width)])
            for idx, root_idx in zip(item.idxs, item.root_idxs):
                if root_idx is not None:  # None: an attention-head mapping, not in conv encoders
                    per_root[root_idx].append(idx)
    planned.update(tied)
    if any(model.get_submodule(n) is m for n in tied for m in ignored):
        return None
    mapping = concat_mapping(
        model, name, consumer, example_inputs, coupled={n: c for n, c in tied.items() if n != name}
    )
    for j, columns in enumerate(mapping):
        for c in columns:
            other = claimed.setdefault((consumer, c), f"{name}[{j}]")
            if other != f"{name}[{j}]":
                raise RuntimeError(
                    f"input channel {c} of {consumer} is fed by both {other} and {name}[{j}] through a "
                    "channel-mixing op that is not a Conv/Linear layer; cannot prune them structurally, pass "
                    "these layers in ignored_layers"
                )
    score = channel_scores(group, scores, names)
    cons = model.get_submodule(consumer)
    if f"{consumer}.weight" in scores:
        cols = _slice_scores(scores[f"{consumer}.weight"].double(), cons, tp.prune_conv_in_channels)
        score = score + torch.stack([cols[m].sum() if m else cols.new_zeros(()) for m in mapping])
    mapped = torch.tensor([j for j, columns in enumerate(mapping) if columns], dtype=torch.long)
    n_remove = min(_n_remove(prod, ratio), len(mapped))
    if n_remove <= 0:
        return None
    idxs = sorted(int(i) for i in mapped[torch.sort(score[mapped], stable=True).indices[:n_remove]])
    return PlanEntry(name, _out_handler(prod), idxs, consumer, sorted({c for j in idxs for c in mapping[j]}))


def _prune_across_concat(model: nn.Module, entry: PlanEntry, columns: list[int], example_inputs: Any) -> None:
    """The one workaround for Torch-Pruning's concat bugs (#481, #146). On the reference models the
    ``_ConcatOp`` before the fusion conv gets no offsets (``None``) once a branch passes through reshapes (the
    camera lift), and the groups through it merge both modalities with indices far past the layers' widths.
    So the producer (with the layers coupled to it inside its encoder) is pruned on a graph of its own branch
    only (no cross-modality concatenation in it), and the consumer's input ``columns`` (current numbering) are
    removed directly."""
    graph = branch_graph(model, branch_of(model, entry.module), example_inputs)  # rebuilt: earlier entries pruned
    group = graph.get_pruning_group(model.get_submodule(entry.module), entry.handler, idxs=entry.idxs)
    if not graph.check_pruning_group(group):
        raise RuntimeError(f"Torch-Pruning refuses to prune {entry.module} (would empty a layer)")
    group.prune()
    cons = model.get_submodule(entry.consumer)  # type: ignore[arg-type]
    if columns:
        prune_in = tp.prune_linear_in_channels if isinstance(cons, nn.Linear) else tp.prune_conv_in_channels
        prune_in(cons, columns)


def _output_shapes(model: nn.Module, example_inputs: Any) -> list[torch.Size]:
    with torch.no_grad():
        return [t.shape for t in output_tensors(call_model(model, example_inputs))]


class _Failed(Exception):
    def __init__(self, index: int, reason: str) -> None:
        super().__init__(reason)
        self.index, self.reason = index, reason


def _apply(
    target: nn.Module,
    plan: Sequence[PlanEntry],
    skipped: Mapping[int, str],
    checked: int,
    example_inputs: Any,
    shapes: list[torch.Size],
    progress: bool,
) -> None:
    """Remove the channels of every entry of ``plan`` not in ``skipped`` from ``target``, in plan order; from entry
    ``checked`` on, a forward pass after each entry must give the original output shapes, else :class:`_Failed`
    names the entry (``target`` is then half-pruned and must be discarded)."""
    graph = tp.DependencyGraph().build_dependency(target, example_inputs=example_inputs, verbose=False)
    kept: dict[str, list[int]] = {}  # consumer -> its remaining input channels, in pre-pruning numbering
    todo = [i for i in range(len(plan)) if i not in skipped]
    for i in tqdm(todo, desc="remove channels", leave=False, disable=not progress):
        entry = plan[i]
        try:
            if entry.consumer is None:
                group = graph.get_pruning_group(target.get_submodule(entry.module), entry.handler, idxs=entry.idxs)
                if not graph.check_pruning_group(group):
                    raise RuntimeError("Torch-Pruning refuses (the group would empty a layer)")
                group.prune()
            else:
                cons = target.get_submodule(entry.consumer)
                width = cons.in_features if isinstance(cons, nn.Linear) else cons.in_channels
                current = kept.setdefault(entry.consumer, list(range(width)))
                _prune_across_concat(target, entry, [current.index(c) for c in entry.columns], example_inputs)
                kept[entry.consumer] = [c for c in current if c not in set(entry.columns)]
            if i >= checked:
                _check_shapes(target, example_inputs, shapes)
        except Exception as exc:  # noqa: BLE001 -- any failure of the mapping leaves this group whole
            raise _Failed(i, f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from exc
    if checked >= len(plan):
        _check_shapes(target, example_inputs, shapes)


def _check_shapes(target: nn.Module, example_inputs: Any, shapes: list[torch.Size]) -> None:
    after = _output_shapes(target, example_inputs)
    if after != shapes:
        raise RuntimeError(f"the output shapes changed from {shapes} to {after}")


def check_structured_inputs(model: nn.Module, example_inputs: Any, ignored_layers: Sequence[nn.Module] = ()) -> None:
    """``ValueError`` unless ``ignored_layers`` are modules of ``model`` and ``example_inputs`` run through it (one
    forward in eval mode without gradients; the model's mode is restored)."""
    names = {id(m) for m in model.modules()}
    unknown = [type(m).__name__ for m in ignored_layers if id(m) not in names]
    if unknown:
        raise ValueError(f"ignored_layers must be modules of the model, got foreign {unknown}")
    was_training = model.training
    try:
        _output_shapes(model.eval(), example_inputs)
    except Exception as exc:  # noqa: BLE001 -- any failure means the inputs do not fit the model
        raise ValueError(
            f"example_inputs do not run through {type(model).__name__} (a tensor is passed as the one positional "
            f"input, a tuple as positionals, a dict as keywords): {type(exc).__name__}: {exc}"
        ) from exc
    finally:
        model.train(was_training)


def _sync_parameter_free_norms(model: nn.Module, example_inputs: Any) -> None:
    """Set ``num_features`` of an InstanceNorm without affine parameters or running statistics to the width it now
    receives: it holds no tensor for Torch-Pruning to prune, so the attribute kept the old width (and PyTorch warns
    on every forward)."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.instancenorm._InstanceNorm)
             and m.weight is None and m.running_mean is None]
    seen: dict[nn.Module, int] = {}

    def record(mod: nn.Module, args: tuple) -> None:
        seen.setdefault(mod, args[0].shape[1])

    hooks = [m.register_forward_pre_hook(record) for m in norms]
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            call_model(model, example_inputs)
    finally:
        for h in hooks:
            h.remove()
    for m, width in seen.items():
        m.num_features = int(width)


def structured_prune(
    model: nn.Module,
    scores: Mapping[str, torch.Tensor],
    sparsity: float,
    example_inputs: Any,
    ignored_layers: Sequence[nn.Module] = (),
    report: dict[str, Any] | None = None,
    progress: bool = False,
) -> nn.Module:
    """A copy of ``model`` with the fraction ``sparsity`` of the output channels of every prunable layer group
    removed (lowest aggregated ``scores`` first). ``example_inputs``: a tensor, a tuple, or a dict of keyword
    inputs. ``model`` is never changed.

    Output layers are never pruned. Every group is applied on the copy and followed by a forward pass on
    ``example_inputs``; a group whose removal breaks that pass or changes an output shape -- where Torch-Pruning
    mis-maps channels, e.g. a channel count held in a Python constant (a scatter canvas of fixed width), or one
    tensor concatenated several times -- is left whole instead, the copy is rebuilt without it, and the layer is
    reported with the error it caused. ``report`` (if given) receives the number of pruned groups and
    ``left_whole``: ``{layer: reason}`` for every group left whole (pass such a layer in ``ignored_layers`` to
    leave it whole from the start, which skips the failed attempt)."""
    names = {id(m): n for n, m in model.named_modules()}
    check_structured_inputs(model, example_inputs, ignored_layers)
    check_sparsity(sparsity, "sparsity")
    base = clone_model(model).eval()
    shapes = _output_shapes(base, example_inputs)
    ignored = [base.get_submodule(names[id(m)]) for m in ignored_layers]  # the same layers in the copy
    plan, left = plan_channels(base, scores, sparsity, example_inputs, ignored)
    skipped: dict[int, str] = {}
    try:  # the common case first: every entry at once, one forward check at the end
        target = clone_model(base)
        _apply(target, plan, skipped, len(plan), example_inputs, shapes, progress)
        plan_ok = True
    except Exception:  # noqa: BLE001 -- find the culprits one entry at a time below
        plan_ok = False
    checked = 0  # entries before this one passed their forward check already
    while not plan_ok:
        target = clone_model(base)
        try:
            _apply(target, plan, skipped, checked, example_inputs, shapes, progress)
            break
        except _Failed as failed:  # rebuild from the unpruned copy, replay, and try the entry's fallback or skip it
            entry = plan[failed.index]
            try:
                fallback = entry.fallback() if entry.fallback is not None else []
            except RuntimeError as exc:  # the probe found a column fed by two producers
                fallback = []
                failed.reason += f"; the fallback cannot map it either ({str(exc).splitlines()[0]})"
            if fallback:  # failures come in plan order: later indices are not in `skipped` yet
                plan[failed.index : failed.index + 1] = fallback
                checked = failed.index
            else:
                skipped[failed.index] = failed.reason
                checked = failed.index + 1
    for i, reason in skipped.items():
        left[plan[i].module] = f"removing its channels broke the forward pass ({reason})"
    _sync_parameter_free_norms(target, example_inputs)
    if left:
        warnings.warn(
            f"structured pruning left {len(left)} layer group(s) whole: "
            + "; ".join(f"{k}: {v}" for k, v in left.items())
            + " -- pass these layers in ignored_layers to skip the attempt",
            stacklevel=2,
        )
    if report is not None:
        report.update(groups=len(plan) - len(skipped), left_whole=left)
    return target.train(model.training)
