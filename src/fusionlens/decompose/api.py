"""``decompose``: Layer-wise Modality Decomposition (LMD) of any ``nn.Module``.

The model runs once, with its modality inputs replaced by decomposed tensors. Every torch call they reach is
intercepted (``__torch_function__``): the op runs as usual on the operating point, and its rule carries the
modality components through a linearization at that point (Prop. 1–3, appendix F). Nothing in the model is
rewritten, so functional calls (``torch.cat``, ``+``, ``F.relu``, ``F.grid_sample``, indexing, scatter) and
data-dependent control flow work as they are.
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import nn
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten

from ._engine import Engine, carries_values, input_batch
from ._stream import ActiveEngine, Stream
from .ruleset import LinearizationSettings, RuleSet, resolve_rules

BIAS_MODES = ("local", "global")


class ModalityNotReachedWarning(UserWarning):
    """A modality's component is zero at every output: its values reach the output through no op that carries
    them (only through integer indices, comparisons or piecewise-constant ops, or not at all)."""


class ConservationError(NamedTuple):
    absolute: float  # max |sum of components - output|
    relative: float  # absolute / max |output|


@dataclass
class Decomposition:
    """Result of :func:`decompose`: ``output`` (the model's own output, same structure), ``components``
    (name -> same structure; modality names then ``"bias"``) and the captures of ``layers=``."""

    output: Any  # None for a replay with_output=False
    components: dict[str, Any]
    names: list[str]  # without "bias" for a replay with_output=False
    layers: dict[str, list[dict[str, torch.Tensor]]]
    coefficients: list[Any] | None = None  # the linearization's operating-point quantities, if recorded

    def layer(self, name: str, call: int = -1) -> dict[str, torch.Tensor]:
        """Components at the output of module ``name`` (``"total"`` holds the operating point). A module called
        several times in one forward keeps every call; ``call`` picks one (default: the last)."""
        if name not in self.layers:
            raise KeyError(f"layer {name!r} was not captured; pass layers=[{name!r}] (captured: {sorted(self.layers)})")
        return self.layers[name][call]

    def stacked(self, leaf: int = 0) -> torch.Tensor:
        """Components of output leaf ``leaf`` as one ``(K, ...)`` tensor, in the order of ``names``."""
        return torch.stack([tree_flatten(self.components[n])[0][leaf] for n in self.names])

    def conservation_error(self) -> ConservationError:
        """Max ``|sum of components - output|`` over every floating output tensor, and that over ``max|output|``."""
        if self.output is None:
            raise ValueError("a replay with with_output=False has no output and no bias component to conserve")
        outputs = tree_flatten(self.output)[0]
        worst, scale = 0.0, 0.0
        for i, out in enumerate(outputs):
            if isinstance(out, torch.Tensor) and out.is_floating_point() and out.numel():
                total = self.stacked(i).sum(0)
                worst = max(worst, (total - out).abs().max().item())
                scale = max(scale, out.abs().max().item())
        return ConservationError(worst, worst / scale if scale > 0 else worst)


def decompose(
    model: nn.Module,
    inputs: Mapping[str, torch.Tensor] | Sequence[torch.Tensor] | torch.Tensor,
    *,
    names: Sequence[str] | None = None,
    additional_forward_args: Sequence[Any] = (),
    forward_kwargs: Mapping[str, Any] | None = None,
    rules: str | RuleSet | LinearizationSettings = "paper",
    layers: Sequence[str] | None = None,
    modality_mask: torch.Tensor | None = None,
    bias: str = "local",
    record_coefficients: bool = False,
    coefficients: list[Any] | None = None,
    with_output: bool = True,
) -> Decomposition:
    """Split ``model``'s output into one component per modality plus a bias component that sum to the output.

    Args:
        model: any ``nn.Module``. Decomposition uses evaluation behaviour: a model in training mode is put in
            eval mode for the call (with a warning) and restored afterwards.
        inputs: the modality inputs: a dict name -> tensor (passed as keyword arguments; the keys name the
            modalities unless ``names`` is given) or a tuple of tensors (passed positionally, named by ``names``,
            default ``input0, input1, ...``).
        names: modality names: for tuple inputs, for the values of a dict in its order (the keys still name the
            forward's arguments), or for the values of ``modality_mask``.
        additional_forward_args: non-modality positional arguments, passed through as constants (Captum's
            convention: after the tuple inputs; before the keyword modality inputs of a dict).
        forward_kwargs: non-modality keyword arguments (calibration, valid masks), constants.
        rules: a preset name (``"paper"``: BN identity, IN/LN/GN ratio, activation identity; ``"bn-uniform+norm-
            identity"`` etc.; ``"sum-splitting"``, ``"ratio-splitting"``, ``"activations-only"``, ``"norms-only"``;
            ``"naive"``: each modality run alone with the others zeroed), a ``LinearizationSettings`` or a
            ``RuleSet``.
        layers: module names (as in ``model.named_modules()``) whose output components to keep.
        modality_mask: early fusion: an integer tensor broadcastable to the single input, each value the index of
            the modality its element belongs to (Captum's ``feature_mask``).
        bias: ``"local"`` (default, eq. 20: constants inside a single-modality branch belong to that modality; the
            branch runs at the cost of a plain forward) or ``"global"`` (every constant goes to the bias component).
        record_coefficients: keep the linearization coefficients (``Decomposition.coefficients``).
        coefficients: evaluate the network *linearized at another operating point* (coefficients recorded there,
            including the bias shares moved by sum/ratio splitting) on these inputs — the "frozen" mode of the
            perturbation metrics. The modality components are those of that fixed affine system; the bias
            component is the rest of this input's nonlinear output, so the components still sum to it.
            Coefficients recorded on one sample (inputs of batch size 1) replay on a batch of any size: each
            sample goes through that same linearization, exactly as if replayed alone, provided the model treats
            the samples of a batch independently (no cross-sample statistics or reductions).
        with_output: ``False`` (with ``coefficients`` only): leave out the model's output at these inputs, and with
            it the bias component (the output minus the modalities). The modality components -- those of the fixed
            affine system, which the output does not enter -- are the same, for about the cost of the components
            alone: after the modalities meet, the ops run on meta tensors for their shapes only. ``output`` is then
            ``None``, ``names`` and ``components`` hold the modalities, layer captures have no ``"total"``. Model
            code that reads a fused tensor's values (``.item()``, ``if x.sum() > 0`` on it) cannot run so.
    """
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be an nn.Module, got {type(model).__name__}")
    if bias not in BIAS_MODES:
        raise ValueError(f"bias must be one of {BIAS_MODES}, got {bias!r}")
    if not with_output and (coefficients is None or record_coefficients or rules == "naive"):
        raise ValueError("with_output=False is for replaying recorded coefficients (coefficients=...), without "
                         "recording and not with rules='naive'")
    modality_names, tensors, as_kwargs = _normalise_inputs(model, inputs, names, modality_mask)
    forward_kwargs = dict(forward_kwargs or {})
    wanted = list(layers or [])
    modules = dict(model.named_modules())
    missing = [n for n in wanted if n not in modules]
    if missing:
        raise ValueError(f"layers not found in the model: {missing} (some valid names: {list(modules)[1:8]})")

    def call(values: list[Any]) -> Any:
        if as_kwargs:
            return model(*additional_forward_args, **dict(zip(as_kwargs, values)), **forward_kwargs)
        return model(*values, *additional_forward_args, **forward_kwargs)

    ruleset = None if rules == "naive" else resolve_rules(rules)
    with _evaluation(model):
        if ruleset is None:
            return _naive(call, modality_names, tensors, modality_mask)
        engine = Engine(modality_names, ruleset, bias, replay=coefficients, record=record_coefficients,
                        batch=input_batch(tensors), with_output=with_output, device=tensors[0].device)
        streams = _wrap_inputs(engine, tensors, modality_mask, bias)
        captures: dict[str, list[dict[str, torch.Tensor]]] = {n: [] for n in wanted}
        handles = _attach_hooks(model, engine, captures)
        try:
            with torch.no_grad(), ActiveEngine(engine):
                out = call(streams)
        finally:
            for handle in handles:
                handle.remove()
    if engine.shapes_only:
        return Decomposition(None, _split_modalities(engine, out), engine.names[:-1], captures)
    total, components = _split_output(engine, out)
    def given(m: int) -> bool:  # whether modality m's input is non-zero (read only for an unreached modality)
        return bool((tensors[0] * (modality_mask == m)).any() if modality_mask is not None else tensors[m].any())

    _warn_unreached(engine, out, engine.names[:-1], given)
    return Decomposition(total, components, engine.names, captures, engine.tape)


def _warn_unreached(engine: Engine, out: Any, names: list[str], given: Callable[[int], bool]) -> None:
    """Warn for each modality with a non-zero input that no output depends on through an op carrying its values:
    its component is zero everywhere and its whole effect sits in the bias, which no user should find out by
    chance. (A modality whose component is zero only because every activation on its path is off at this input
    is not warned about: its values do reach the output.)"""
    reach = 0
    for leaf in tree_flatten(out)[0]:
        if isinstance(leaf, Stream):
            reach |= leaf._fl_reach
    for i, name in enumerate(names):
        if reach & (1 << i) or not given(i):
            continue
        if i in engine.dropped:
            op, where = engine.dropped[i]
            warnings.warn(
                f"decompose: modality {name!r} reaches the output only through ops that carry none of its values "
                f"(first: op '{op}' in {where}; integer indices, comparisons, piecewise-constant ops and attention "
                "weights are constants of the linearization), so its component is zero everywhere and its effect "
                "is in the bias. If the model voxelizes or indexes this input itself (points to grid cells), pass "
                "the voxelized tensor (the features or counts it builds) as the modality input instead.",
                ModalityNotReachedWarning, stacklevel=3)
        else:
            warnings.warn(f"decompose: modality {name!r} does not reach the output: the model does not use this "
                          "input (its component is zero everywhere)", ModalityNotReachedWarning, stacklevel=3)


def _normalise_inputs(model: nn.Module, inputs: Any, names: Sequence[str] | None,
                      mask: torch.Tensor | None) -> tuple[list[str], list[torch.Tensor], list[str] | None]:
    if isinstance(inputs, torch.Tensor):
        inputs = (inputs,)
    if isinstance(inputs, Mapping):
        keys, tensors = list(inputs), list(inputs.values())
        params = inspect.signature(model.forward).parameters
        accepts_any = any(p.kind is p.VAR_KEYWORD for p in params.values())
        unknown = [k for k in keys if k not in params and not accepts_any]
        if unknown:
            raise ValueError(f"inputs {unknown} are not arguments of {type(model).__name__}.forward "
                             f"(it takes {list(params)})")
        as_kwargs = keys
        modality_names = keys
        if names is not None and mask is None:
            if isinstance(names, str) or len(names) != len(keys):
                raise ValueError(f"names={names!r} must give one modality name per input of the dict "
                                 f"{keys} (in its order)")
            modality_names = list(names)
    elif isinstance(inputs, Sequence):
        tensors = list(inputs)
        default = [f"input{i}" for i in range(len(tensors))]
        modality_names = list(names) if names is not None and mask is None else default
        if len(modality_names) != len(tensors):
            raise ValueError(f"{len(tensors)} inputs but {len(modality_names)} names: {list(modality_names)}")
        as_kwargs = None
    else:
        raise ValueError(
            f"inputs must be a dict of tensors, a tuple of tensors or a tensor, got {type(inputs).__name__}"
        )
    if not tensors:
        raise ValueError("inputs is empty: give at least one modality tensor")
    for name, t in zip(modality_names, tensors):
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            raise ValueError(f"input {name!r} must be a floating-point tensor, got {type(t).__name__}"
                             f"{'' if not isinstance(t, torch.Tensor) else ' of ' + str(t.dtype)}")
        if not torch.isfinite(t.sum()) and not torch.isfinite(t).all():  # a finite sum: no NaN or inf (one pass)
            raise ValueError(f"input {name!r} contains NaN or inf values")
    if len(set(modality_names)) != len(modality_names) or "bias" in modality_names:
        raise ValueError(f"modality names must be unique and not 'bias': {modality_names}")
    if mask is not None:
        if len(tensors) != 1:
            raise ValueError("modality_mask splits exactly one input tensor; got "
                             f"{len(tensors)} inputs")
        if mask.is_floating_point() or mask.dtype == torch.bool:
            raise ValueError(f"modality_mask must be an integer tensor, got {mask.dtype}")
        try:
            torch.broadcast_shapes(mask.shape, tensors[0].shape)
        except RuntimeError as exc:
            raise ValueError(f"modality_mask of shape {tuple(mask.shape)} does not broadcast to the input "
                             f"{tuple(tensors[0].shape)}") from exc
        count = int(mask.max().item()) + 1
        if mask.min().item() < 0:
            raise ValueError("modality_mask values must be >= 0")
        mask_names = list(names) if names is not None else [f"modality{i}" for i in range(count)]
        if len(mask_names) < count:
            raise ValueError(f"modality_mask has values up to {count - 1} but only {len(mask_names)} names")
        modality_names = mask_names
    return list(modality_names), tensors, as_kwargs


def _wrap_inputs(engine: Engine, tensors: list[torch.Tensor], mask: torch.Tensor | None, bias: str) -> list[Stream]:
    k = engine.num_modalities
    if mask is not None:
        x = tensors[0]
        return [Stream.multi(x, torch.stack([x * (mask == m) for m in range(k)]))]
    if bias == "local":
        return [Stream.single(t, i) for i, t in enumerate(tensors)]
    streams = []
    for i, t in enumerate(tensors):
        parts = t.new_zeros((k, *t.shape))
        parts[i] = t
        streams.append(Stream.multi(t, parts, reach=1 << i))
    return streams


def _attach_hooks(model: nn.Module, engine: Engine, captures: dict[str, list]) -> list[Any]:
    handles = []
    for name, module in model.named_modules():
        def enter(_m: nn.Module, _a: Any, name: str = name) -> None:
            engine.module_path.append(name.rsplit(".", 1)[-1] if name else "")

        def leave(_m: nn.Module, _a: Any, output: Any, name: str = name) -> None:
            if engine.module_path:
                engine.module_path.pop()
            if name in captures:
                captures[name].append(_capture(engine, output))

        handles.append(module.register_forward_pre_hook(enter))
        handles.append(module.register_forward_hook(leave, always_call=True))
    return handles


def _capture(engine: Engine, output: Any) -> dict[str, torch.Tensor]:
    leaf = next((x for x in tree_flatten(output)[0] if isinstance(x, torch.Tensor)), None)
    if leaf is None:
        return {}
    if engine.shapes_only:
        return {n: p.detach().clone() for n, p in zip(engine.names, _modality_parts(engine, leaf))}
    parts = engine.components(leaf)
    captured = {n: parts[i].detach().clone() for i, n in enumerate(engine.names)}
    captured["total"] = (leaf.fl_total() if isinstance(leaf, Stream) else leaf).detach().clone()
    return captured


def _split_output(engine: Engine, out: Any) -> tuple[Any, dict[str, Any]]:
    leaves, spec = tree_flatten(out)
    total = tree_unflatten([x.fl_total() if isinstance(x, Stream) else x for x in leaves], spec)
    split = [engine.components(x) if carries_values(x) else None for x in leaves]
    components = {
        name: tree_unflatten([x if parts is None else parts[i] for x, parts in zip(leaves, split)], spec)
        for i, name in enumerate(engine.names)
    }
    return total, components


def _modality_parts(engine: Engine, x: torch.Tensor) -> torch.Tensor:
    """The ``(M, *shape)`` modality components of an output leaf (zeros for a constant one)."""
    if isinstance(x, Stream):
        return x.fl_parts(engine.num_modalities)
    return x.new_zeros((engine.num_modalities, *x.shape))


def _split_modalities(engine: Engine, out: Any) -> dict[str, Any]:
    leaves, spec = tree_flatten(out)
    split = [_modality_parts(engine, x) if carries_values(x) else None for x in leaves]
    return {name: tree_unflatten([x if parts is None else parts[i] for x, parts in zip(leaves, split)], spec)
            for i, name in enumerate(engine.names[:-1])}


def _naive(call: Any, names: list[str], tensors: list[torch.Tensor], mask: torch.Tensor | None) -> Decomposition:
    """Baseline row: modality ``m``'s component is ``F(x_m, 0, ...) - F(0, ..., 0)``, the bias ``F(0, ..., 0)``.
    Exact only for a network that is affine in its inputs; ``conservation_error`` shows the interaction left out."""
    with torch.no_grad():
        def only(m: int | None) -> list[torch.Tensor]:
            if mask is not None:
                return [tensors[0] * (mask == m)] if m is not None else [torch.zeros_like(tensors[0])]
            return [t if i == m else torch.zeros_like(t) for i, t in enumerate(tensors)]

        output = call(tensors)
        zero = call(only(None))
        components = {n: tree_map(lambda a, b: a - b, call(only(i)), zero) for i, n in enumerate(names)}
    components["bias"] = zero
    return Decomposition(output, components, [*names, "bias"], {})


class _evaluation:
    """Put the model in eval mode for the call (warning if it was training); restore every module's flag."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.flags = {m: m.training for m in model.modules()}

    def __enter__(self) -> None:
        if self.model.training:
            warnings.warn("decompose: model was in training mode; using eval mode for the decomposition "
                          "(restored afterwards)", stacklevel=3)
            self.model.eval()

    def __exit__(self, *exc: Any) -> None:
        for module, flag in self.flags.items():
            module.training = flag
