"""Parameter groups, prunable-parameter selection and the shared plumbing of every pruning method.

AlterMOMA (section 3.1) splits the parameters into one backbone per modality, ``theta_m``, and the fusion
module with its task heads, ``theta_f``. The groups come from the model's own ``modality_groups()`` (the
reference models declare them, see docs/DESIGN.md) or from module-name prefixes the user gives.

Which parameters are *prunable* (receive a score and may be masked) is a separate choice: by default the
``weight`` of every convolution and linear layer, as in the AlterMOMA and ProsPr experiments; biases and
normalisation affine parameters are left dense because they are a negligible share of the parameters and
pruning them mostly breaks normalisation. ``prunable_types`` / ``include_bias`` change that.
"""

from __future__ import annotations

import copy
import inspect
import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

#: Module types whose ``weight`` is prunable by default.
DEFAULT_PRUNABLE_TYPES: tuple[type[nn.Module], ...] = (
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.ConvTranspose1d,
    nn.ConvTranspose2d,
    nn.ConvTranspose3d,
    nn.Linear,
)
FUSION = "fusion"

#: ``loss_fn(model, batch) -> scalar tensor``: how every data-driven method evaluates the task loss.
LossFn = Callable[[nn.Module, Any], torch.Tensor]
#: A score per prunable parameter, keyed by the parameter's name in ``model.named_parameters()``.
Scores = dict[str, torch.Tensor]


def check_sparsity(sparsity: float, name: str = "sparsity") -> float:
    """Return ``sparsity`` as a float, or raise ``ValueError`` unless it lies in [0, 1)."""
    try:
        value = float(sparsity)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number in [0, 1), got {sparsity!r}") from None
    if not (0.0 <= value < 1.0) or math.isnan(value):
        raise ValueError(f"{name} must lie in [0, 1), got {sparsity!r}")
    return value


def parameter_name(name: str) -> str:
    """Map a name of a ``torch.nn.utils.prune``-reparametrised parameter (``conv.weight_orig``) to its public
    name (``conv.weight``), so scores and groups refer to the same keys before and after masking."""
    return name[: -len("_orig")] if name.endswith("_orig") else name


def named_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """``model.named_parameters()`` keyed by public names (see :func:`parameter_name`)."""
    return {parameter_name(n): p for n, p in model.named_parameters()}


def effective_weights(model: nn.Module, names: Iterable[str]) -> dict[str, torch.Tensor]:
    """The weights the next forward will use: ``orig * mask`` for a parameter masked by ``torch.nn.utils.prune``.

    Computed from ``*_orig`` and ``*_mask`` rather than read from the module's plain attribute, which
    ``torch.nn.utils.prune`` refreshes only in its forward pre-hook: after an optimiser step it still holds the
    weights before that step."""
    out = {}
    for n in names:
        mod_name, _, attr = n.rpartition(".")
        module = model.get_submodule(mod_name) if mod_name else model
        orig, mask = getattr(module, f"{attr}_orig", None), getattr(module, f"{attr}_mask", None)
        value = orig * mask if orig is not None and mask is not None else getattr(module, attr)
        out[n] = value.detach()
    return out


def prunable_parameters(
    model: nn.Module,
    prunable_types: Sequence[type[nn.Module]] = DEFAULT_PRUNABLE_TYPES,
    include_bias: bool = False,
) -> list[str]:
    """Names (public, in module order) of the parameters that pruning may mask."""
    types = tuple(prunable_types)
    names: list[str] = []
    for mod_name, module in model.named_modules():
        if not isinstance(module, types):
            continue
        for attr in ("weight", "bias") if include_bias else ("weight",):
            if getattr(module, attr, None) is not None:
                names.append(f"{mod_name}.{attr}" if mod_name else attr)
    if not names:
        raise ValueError(f"prunable_types {[t.__name__ for t in types]} match no parameter of {type(model).__name__}")
    return names


@dataclass(frozen=True)
class ParamGroups:
    """Every parameter name of a model assigned to exactly one group: ``modalities[m]`` is the backbone
    ``theta_m`` of modality ``m``; ``fusion`` is ``theta_f`` (fusion layer, decoder and heads)."""

    modalities: dict[str, tuple[str, ...]]
    fusion: tuple[str, ...]

    def group_of(self) -> dict[str, str]:
        out = {n: m for m, names in self.modalities.items() for n in names}
        out.update({n: FUSION for n in self.fusion})
        return out

    def restrict(self, names: Iterable[str]) -> ParamGroups:
        """The same groups limited to ``names`` (e.g. the prunable parameters), order preserved."""
        keep = set(names)
        return ParamGroups(
            {m: tuple(n for n in ns if n in keep) for m, ns in self.modalities.items()},
            tuple(n for n in self.fusion if n in keep),
        )


def _match(names: Sequence[str], prefixes: Sequence[str]) -> list[str]:
    def hit(n: str, p: str) -> bool:
        return n == p or n.startswith(p if p.endswith(".") else p + ".")

    return [n for n in names if any(hit(n, p) for p in prefixes)]


def resolve_groups(
    model: nn.Module,
    prefixes: Mapping[str, Sequence[str]] | None = None,
) -> ParamGroups:
    """The modality groups of ``model``.

    ``prefixes`` maps group names to module-name prefixes (``{"camera": ["cam_encoder"], "lidar":
    ["lidar_encoder"]}``); a ``"fusion"`` entry is optional and defaults to every parameter not claimed by a
    modality. Without ``prefixes`` the model's ``modality_groups()`` is used. At least two modality groups
    are required, each group must match at least one parameter and no parameter may be in two groups.
    """
    names = list(named_parameters(model))
    if prefixes is None:
        declare = getattr(model, "modality_groups", None)
        if not callable(declare):
            raise ValueError(
                f"{type(model).__name__} has no modality_groups(); pass groups= as module-name "
                "prefixes, e.g. {'camera': ['cam_encoder'], 'lidar': ['lidar_encoder']}"
            )
        declared = {k: [parameter_name(n) for n in v] for k, v in dict(declare()).items()}
        unknown = sorted({n for v in declared.values() for n in v} - set(names))
        if unknown:
            raise ValueError(f"modality_groups() names parameters the model does not have: {unknown[:5]}")
        groups = {k: [n for n in names if n in set(v)] for k, v in declared.items()}
    else:
        groups = {}
        for key, pre in prefixes.items():
            pre = [pre] if isinstance(pre, str) else list(pre)
            groups[key] = _match(names, pre)
            if not groups[key]:
                raise ValueError(f"group {key!r} (prefixes {pre}) matches no parameter of {type(model).__name__}")
    fusion = groups.pop(FUSION, None)
    if len(groups) < 2:
        raise ValueError(f"AlterMOMA needs at least two modality groups besides 'fusion', got {sorted(groups)}")
    for key, members in groups.items():
        if not members:
            raise ValueError(f"group {key!r} matches no parameter of {type(model).__name__}")
    seen: dict[str, str] = {}
    for key, members in groups.items():
        for n in members:
            if n in seen:
                raise ValueError(f"parameter {n!r} is in groups {seen[n]!r} and {key!r}")
            seen[n] = key
    if fusion is None:
        fusion = [n for n in names if n not in seen]
    if not fusion:
        raise ValueError("the fusion group (fusion layer + heads) matches no parameter")
    clash = sorted(set(fusion) & set(seen))
    if clash:
        raise ValueError(f"parameters in both a modality group and 'fusion': {clash[:5]}")
    return ParamGroups({k: tuple(v) for k, v in groups.items()}, tuple(fusion))


def clone_model(model: nn.Module) -> nn.Module:
    """``copy.deepcopy`` that also works on a model masked with ``torch.nn.utils.prune`` after a forward pass
    (its ``weight`` is then a non-leaf tensor, which deepcopy refuses; the copy recomputes it on its next
    forward)."""
    for module in model.modules():
        for hook in module._forward_pre_hooks.values():
            name = getattr(hook, "_tensor_name", None)
            if name is not None and isinstance(getattr(module, name, None), torch.Tensor):
                setattr(module, name, getattr(module, name).detach())
    return copy.deepcopy(model)


def call_model(model: nn.Module, inputs: Any) -> Any:
    """Call ``model`` with example inputs: a dict is passed as keywords, a tuple/list as positionals."""
    if isinstance(inputs, Mapping):
        return model(**inputs)
    if isinstance(inputs, (tuple, list)):
        return model(*inputs)
    return model(inputs)


def output_tensors(out: Any) -> list[torch.Tensor]:
    """Every floating tensor in a (nested) model output, in a deterministic order."""
    if isinstance(out, torch.Tensor):
        return [out] if out.is_floating_point() else []
    if isinstance(out, Mapping):
        return [t for k in sorted(out) for t in output_tensors(out[k])]
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in output_tensors(o)]
    return []


def batch_stream(batches: Iterable[Any]) -> Iterator[Any]:
    """Yield batches forever, re-iterating ``batches`` (a list, a DataLoader) when it is used up."""
    while True:
        empty = True
        for batch in batches:
            empty = False
            yield batch
        if empty:
            raise ValueError(
                "batches is empty (or a one-shot iterator that has been used up); pass a list or a DataLoader"
            )


def check_scores(scores: Mapping[str, torch.Tensor], params: Mapping[str, torch.Tensor]) -> None:
    """Scores must cover known parameters, match their shapes and be finite."""
    if not scores:
        raise ValueError("scores is empty")
    for name, s in scores.items():
        if name not in params:
            raise ValueError(f"score for unknown parameter {name!r}")
        if s.shape != params[name].shape:
            raise ValueError(f"score for {name!r} has shape {tuple(s.shape)}, parameter {tuple(params[name].shape)}")
        if not torch.isfinite(s).all():
            raise ValueError(f"score for {name!r} is not finite (a diverging loss or learning rate?)")


#: First parameter names that mark a criterion ``loss(outputs, batch)`` rather than ``loss_fn(model, batch)``.
_CRITERION_NAMES = (
    "out", "outs", "output", "outputs", "pred", "preds", "prediction", "predictions", "logits", "y_pred",
)


def check_loss_fn(model: nn.Module, loss_fn: LossFn, batches: Iterable[Any]) -> None:
    """Call ``loss_fn`` once on the first batch with a train-mode copy of ``model`` (the model's state untouched) and
    raise a ``TypeError`` showing the expected call if it fails or does not return a differentiable scalar tensor.

    A one-shot iterator is not checked (taking its first batch would steal it from the method)."""
    expected = (
        "loss_fn must be called as loss_fn(model, batch) and return a scalar tensor, e.g. "
        "loss_fn = lambda model, batch: criterion(model(batch['inputs']), batch['target'])"
    )
    try:
        first = next(iter(inspect.signature(loss_fn).parameters))
    except (TypeError, ValueError, StopIteration):
        first = None
    if first in _CRITERION_NAMES:
        raise TypeError(f"{expected}; its first argument is named {first!r}: a criterion of outputs?")
    if iter(batches) is batches:
        return
    batch = next(iter(batches), None)
    if batch is None:
        raise ValueError("batches is empty")
    probe = clone_model(model).train()  # train mode, as the methods call it; a copy: no running statistics change
    try:
        loss = loss_fn(probe, batch)
    except (TypeError, AttributeError, IndexError, KeyError) as exc:
        raise TypeError(f"{expected}; on the first batch it raised {type(exc).__name__}: {exc}") from exc
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        got = type(loss).__name__ if not isinstance(loss, torch.Tensor) else f"a tensor of shape {tuple(loss.shape)}"
        raise TypeError(f"{expected}; on the first batch it returned {got}")
    if not loss.requires_grad:
        raise TypeError(
            f"{expected}; on the first batch it returned a loss that does not depend on the model's parameters "
            "(computed under torch.no_grad() or detached?)"
        )
