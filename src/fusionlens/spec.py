"""How any fusion model is described to fusionlens's analyses: :class:`ModelSpec`.

A decomposition needs only a model and its modality tensors; everything around it -- perturbation metrics,
modality shares, region attribution, Grad-CAM, the audit, pruning harnesses -- also needs to know *how a batch
reaches the model*, *which output to study*, *what travels with a modality* when it is swapped for another sample's,
and optionally *where the modalities meet*. A :class:`ModelSpec` says exactly that, in the model's own names::

    spec = ModelSpec(
        model,
        inputs=lambda b: ({"camera": b["img"], "lidar": b["points"]}, {"img_metas": b["img_metas"]}),
        arguments={"camera": "img", "lidar": "points"},   # modality -> forward parameter
        output="seg",                                     # dict key / tuple index / callable / None
        travels={"camera": ("img_metas",)},               # kwargs swapped together with the camera
    )

fusionlens's own models describe themselves through the same class (``FusionModel.describe()``); nothing in the
analyses knows about them. Any object with a ``describe()`` method returning a :class:`ModelSpec` is accepted where a
spec is (:func:`as_spec`).

A spec sees the model at a *level* (:meth:`ModelSpec.subject`): ``"input"`` decomposes from the raw modality
tensors; ``"fusion"`` (when ``fusion`` is given) from each modality's features where the modalities meet -- exactly
the input-level decomposition with ``bias="local"`` (constants inside a single-modality branch belong to that
modality) at a fraction of the cost, and the level where zero/mean baselines of Shapley-type methods are meaningful.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils.data import default_collate

from fusionlens.data.sample import BEVGrid

LEVELS = ("input", "fusion")
Batch = Any
InputsFn = Callable[[Batch], tuple[Mapping[str, torch.Tensor], Mapping[str, Any]]]
FusionAt = str | tuple[Callable[..., Mapping[str, torch.Tensor]], Callable[[Mapping[str, torch.Tensor]], Any]]


class SpecError(ValueError):
    """A model description that does not fit the model or the batch (raised before any work)."""


@dataclass
class Prepared:
    """One batch as a method consumes it: modality tensors (by modality name) and constant keyword arguments."""

    inputs: dict[str, torch.Tensor]
    kwargs: dict[str, Any] = field(default_factory=dict)


@contextmanager
def eval_mode(module: nn.Module) -> Iterator[None]:
    """Evaluation behaviour for the block; every submodule's training flag restored afterwards (also on error)."""
    flags = {m: m.training for m in module.modules()}
    module.eval()
    try:
        yield
    finally:
        for m, flag in flags.items():
            m.training = flag


def select_output(out: Any, output: str | int | Callable[[Any], torch.Tensor] | None) -> torch.Tensor:
    """The studied tensor of a model output: a dict key, a tuple/list index, a callable, or the output itself."""
    if callable(output):
        picked = output(out)
    elif output is None:
        picked = out
    elif isinstance(out, Mapping):
        if output not in out:
            raise SpecError(f"output {output!r} is not a key of the model's output (keys: {list(out)})")
        picked = out[output]
    elif isinstance(out, (tuple, list)) and isinstance(output, int):
        if not -len(out) <= output < len(out):
            raise SpecError(f"output index {output} is out of range for a model output of {len(out)} items")
        picked = out[output]
    else:
        raise SpecError(f"cannot select output {output!r} from a model output of type {type(out).__name__}; "
                        "give output=None (the output is the tensor), a key, an index or a callable")
    if not isinstance(picked, torch.Tensor):
        raise SpecError(f"output {output!r} selects a {type(picked).__name__}, not a tensor")
    return picked


class InputView(nn.Module):
    """The model as a module of the modalities: ``forward(**{modality: tensor}, **kwargs)`` renames each modality to
    its forward parameter, calls the model and returns the studied output. The model is registered as ``model`` so
    module paths inside it read ``model.<path>``."""

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        self.model = spec.model
        self.spec = spec
        self.training = spec.model.training  # decompose() switches both to eval mode and restores them

    def forward(self, **given: Any) -> torch.Tensor:
        renamed = {self.spec.arguments.get(k, k): v for k, v in given.items()}
        return select_output(self.model(**renamed), self.spec.output)


class _Captured(Exception):
    """Stops a forward at the fusion module once its inputs are captured."""

    def __init__(self, args: tuple[Any, ...]) -> None:
        super().__init__()
        self.args = args


def _module_inputs(args: tuple[Any, ...], modalities: Sequence[str], path: str) -> dict[str, torch.Tensor]:
    """The fusion module's positional inputs as one tensor per modality: ``M`` tensors, one list/tuple of ``M``, or
    one dict keyed by modality."""
    if len(args) == 1 and isinstance(args[0], Mapping):
        given = dict(args[0])
        if set(given) != set(modalities):
            raise SpecError(f"fusion module {path!r} receives a dict with keys {sorted(given)}, expected the "
                            f"modalities {list(modalities)}")
        return {m: given[m] for m in modalities}
    items = list(args[0]) if len(args) == 1 and isinstance(args[0], (list, tuple)) else list(args)
    if len(items) != len(modalities) or not all(isinstance(t, torch.Tensor) for t in items):
        raise SpecError(f"fusion module {path!r} must take one tensor per modality ({list(modalities)}, in that "
                        f"order; as separate arguments, one list or one dict), but it received {len(items)} "
                        "items. Give fusion=(encode, decode) functions instead")
    return dict(zip(modalities, items))


class FusionView(nn.Module):
    """The part of the model after the modalities meet, as a module of each modality's features:
    ``forward(**{modality: features}, **raw)`` -> studied output. With ``fusion=(encode, decode)`` it calls
    ``decode``; with a module path it runs the whole model on the clean raw inputs (``raw``, constants) and
    substitutes the given features for the fusion module's inputs."""

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        self.model = spec.model
        self.spec = spec
        self.training = spec.model.training

    def forward(self, **given: Any) -> torch.Tensor:
        spec = self.spec
        features = {m: given.pop(m) for m in spec.modalities}
        if isinstance(spec.fusion, tuple):
            return select_output(spec.fusion[1](features), spec.output)
        module = spec.fusion_module()
        order = [features[m] for m in spec.modalities]

        def substitute(_m: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
            if len(args) == 1 and isinstance(args[0], Mapping):
                return (dict(features),)
            if len(args) == 1 and isinstance(args[0], (list, tuple)):
                return (type(args[0])(order),)
            return tuple(order)

        handle = module.register_forward_pre_hook(substitute)
        try:
            raw = {spec.arguments.get(k[len(_RAW):], k[len(_RAW):]): v for k, v in given.items() if k.startswith(_RAW)}
            rest = {k: v for k, v in given.items() if not k.startswith(_RAW)}
            return select_output(spec.model(**raw, **rest), spec.output)
        finally:
            handle.remove()


_RAW = "_raw_"  # prefix of the raw modality inputs a module-path FusionView carries as constants


@dataclass
class ModelSpec:
    """Describes any model to the analyses (module docstring).

    Args:
        model: the ``nn.Module``; called as ``model(**{arguments[m]: x_m}, **kwargs)``.
        inputs: ``batch -> (modality tensors by modality name, other forward kwargs)``.
        arguments: modality name -> forward parameter name (default: the same name).
        output: the studied output: a key of a dict output, an index of a tuple output, a callable ``out -> Tensor``,
            or ``None`` when the output is the tensor.
        travels: modality -> forward kwargs replaced together with that modality when it is swapped for another
            sample's (its calibration, its valid mask).
        fusion: where the modalities meet: ``None`` (input level only), a module path whose forward takes one
            tensor per modality in modality order (separately, as one list, or as one dict), or ``(encode, decode)``
            with ``encode(inputs, kwargs) -> {modality: features}`` and ``decode(features) -> model output``.
        collate: a list of dataset items -> one batch (default ``torch.utils.data.default_collate``).
        grid: the BEV grid of the studied output's last two dimensions (``[..., ix, iy]``, ix along ego x), needed for
            regions given as boxes in metres.
        modalities: the modality order (default: the order ``inputs`` returns).
    """

    model: nn.Module
    inputs: InputsFn
    arguments: Mapping[str, str] = field(default_factory=dict)
    output: str | int | Callable[[Any], torch.Tensor] | None = None
    travels: Mapping[str, Sequence[str]] = field(default_factory=dict)
    fusion: FusionAt | None = None
    collate: Callable[[list[Any]], Batch] = default_collate
    grid: BEVGrid | None = None
    modalities: tuple[str, ...] = ()
    _checked: bool = field(default=False, init=False, repr=False)

    def __post_init__(self) -> None:
        if not isinstance(self.model, nn.Module):
            raise SpecError(f"ModelSpec.model must be an nn.Module, got {type(self.model).__name__}")
        if not callable(self.inputs):
            raise SpecError("ModelSpec.inputs must be a function batch -> (modality inputs dict, forward kwargs)")
        if self.fusion is not None and not isinstance(self.fusion, str):
            if not (isinstance(self.fusion, tuple) and len(self.fusion) == 2 and all(map(callable, self.fusion))):
                raise SpecError("ModelSpec.fusion must be None, a module path, or a pair (encode, decode) of functions")
        if isinstance(self.fusion, str) and self.fusion not in dict(self.model.named_modules()):
            raise SpecError(f"fusion module {self.fusion!r} is not a module of {type(self.model).__name__} "
                            f"(some module paths: {[n for n, _ in self.model.named_modules()][1:8]})")
        self.modalities = tuple(self.modalities)
        self.arguments = dict(self.arguments)
        self.travels = {m: tuple(v) for m, v in self.travels.items()}

    # --------------------------------------------------------------------------------------------- validation
    def split(self, batch: Batch) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """``inputs(batch)`` checked: a dict of tensors keyed by the modalities, and a dict of kwargs."""
        got = self.inputs(batch)
        if not (isinstance(got, tuple) and len(got) == 2 and isinstance(got[0], Mapping)
                and isinstance(got[1], Mapping)):
            raise SpecError("ModelSpec.inputs(batch) must return a pair (modality inputs dict, forward kwargs dict), "
                            f"got {type(got).__name__}")
        tensors, kwargs = dict(got[0]), dict(got[1])
        if not tensors:
            raise SpecError("ModelSpec.inputs(batch) returned no modality inputs")
        for name, value in tensors.items():
            if not isinstance(value, torch.Tensor):
                raise SpecError(f"modality {name!r}: inputs(batch) gave a {type(value).__name__}, not a tensor")
        if not self.modalities:
            self.modalities = tuple(tensors)
        elif set(tensors) != set(self.modalities):
            raise SpecError(f"inputs(batch) returned modalities {sorted(tensors)}, but the spec names "
                            f"{list(self.modalities)}")
        return {m: tensors[m] for m in self.modalities}, kwargs

    def check(self, batch: Batch) -> None:
        """Validate the description on one batch, before any work: modality names the model does not take, kwargs
        said to travel that the batch lacks, an output that does not exist. One forward pass (eval mode)."""
        tensors, kwargs = self.split(batch)
        unknown = [m for m in self.arguments if m not in self.modalities]
        if unknown:
            raise SpecError(f"arguments= names {unknown}, which are not modalities ({list(self.modalities)})")
        params = inspect.signature(self.model.forward).parameters
        takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
        if not takes_any:
            for name in [*(self.arguments.get(m, m) for m in self.modalities), *kwargs]:
                if name not in params:
                    owner = next((m for m in self.modalities if self.arguments.get(m, m) == name), None)
                    what = f"modality {owner!r} is passed as" if owner else "inputs(batch) returns the kwarg"
                    raise SpecError(f"{what} {name!r}, which {type(self.model).__name__}.forward does not take "
                                    f"(its parameters: {[p for p in params if p != 'self']}); "
                                    "map modalities to parameters with arguments={modality: parameter}")
        for modality, keys in self.travels.items():
            if modality not in self.modalities:
                raise SpecError(f"travels= names {modality!r}, which is not a modality ({list(self.modalities)})")
            missing = [k for k in keys if k not in kwargs]
            if missing:
                raise SpecError(f"travels[{modality!r}] lists {missing}, but inputs(batch) returned no such forward "
                                f"kwargs (it returned: {sorted(kwargs)})")
        with torch.no_grad(), eval_mode(self.model):
            out = self.model(**{self.arguments.get(m, m): t for m, t in tensors.items()}, **kwargs)
        select_output(out, self.output)
        self._checked = True

    def ensure_checked(self, batch: Batch) -> None:
        if not self._checked:
            self.check(batch)

    # --------------------------------------------------------------------------------------------- levels
    def default_level(self) -> str:
        return "fusion" if self.fusion is not None else "input"

    def fusion_module(self) -> nn.Module:
        assert isinstance(self.fusion, str)
        return dict(self.model.named_modules())[self.fusion]

    def subject(self, level: str | None = None) -> Subject:
        """This model seen at ``level`` (default: ``"fusion"`` when ``fusion`` is given, else ``"input"``)."""
        return Subject(self, self.default_level() if level is None else level)

    def batch(self, dataset: Any, indices: Sequence[int]) -> Batch:
        """Items ``indices`` of ``dataset`` collated into one batch with :attr:`collate`."""
        return self.collate([dataset[int(i)] for i in indices])

    def forward(self, batch: Batch, *, level: str | None = None) -> torch.Tensor:
        """The studied output for ``batch`` (eval mode, no grad)."""
        subject = self.subject(level)
        return subject.forward(subject.prepare(batch))

    def decompose(self, batch: Batch, *, level: str | None = None, **kwargs: Any) -> Any:
        """``fusionlens.decompose`` of the studied output for ``batch`` (keyword arguments passed on)."""
        subject = self.subject(level)
        return subject.decompose(subject.prepare(batch), **kwargs)


class Subject:
    """A :class:`ModelSpec` seen at one level: prepares batches, swaps a modality for another sample's, and holds
    the module that methods decompose or run (``module(**prepared.inputs, **prepared.kwargs)`` -> studied output)."""

    def __init__(self, spec: ModelSpec, level: str = "input") -> None:
        if level not in LEVELS:
            raise SpecError(f"level must be one of {LEVELS}, got {level!r}")
        if level == "fusion" and spec.fusion is None:
            raise SpecError("level='fusion' needs ModelSpec(fusion=...) (a module path or (encode, decode)); "
                            "use level='input'")
        self.spec, self.level = spec, level
        self.model = spec.model
        self.module: nn.Module = FusionView(spec) if level == "fusion" else InputView(spec)

    @property
    def modalities(self) -> tuple[str, ...]:
        return self.spec.modalities

    def check_modality(self, name: str, setting: str = "modality") -> None:
        if name not in self.modalities:
            raise SpecError(f"{setting} {name!r} is not a modality of the model ({list(self.modalities)})")

    def prepare(self, batch: Batch) -> Prepared:
        """The batch's inputs at this subject's level."""
        self.spec.ensure_checked(batch)
        tensors, kwargs = self.spec.split(batch)
        if self.level == "input":
            return Prepared(tensors, kwargs)
        spec = self.spec
        with torch.no_grad(), eval_mode(spec.model):
            if isinstance(spec.fusion, tuple):
                features = dict(spec.fusion[0](tensors, kwargs))
                missing = [m for m in spec.modalities if m not in features]
                if missing:
                    raise SpecError(f"fusion encode() returned no features for modalities {missing}")
                return Prepared({m: features[m] for m in spec.modalities}, {})
            features = self._capture(tensors, kwargs)
        raw = {f"{_RAW}{m}": t for m, t in tensors.items()}
        return Prepared(features, {**raw, **kwargs})

    def _capture(self, tensors: dict[str, torch.Tensor], kwargs: dict[str, Any]) -> dict[str, torch.Tensor]:
        spec = self.spec

        def stop(_m: nn.Module, args: tuple[Any, ...]) -> None:
            raise _Captured(args)

        handle = spec.fusion_module().register_forward_pre_hook(stop)
        try:
            spec.model(**{spec.arguments.get(m, m): t for m, t in tensors.items()}, **kwargs)
        except _Captured as got:
            return _module_inputs(got.args, spec.modalities, str(spec.fusion))
        finally:
            handle.remove()
        raise SpecError(f"fusion module {spec.fusion!r} was not called in the model's forward")

    def swap(self, clean: Prepared, partner: Prepared, modality: str) -> Prepared:
        """``clean`` with ``modality`` (and the kwargs that travel with it) taken from ``partner``."""
        self.check_modality(modality)
        inputs = {**clean.inputs, modality: partner.inputs[modality]}
        kwargs = dict(clean.kwargs)
        for key in (*self.spec.travels.get(modality, ()), f"{_RAW}{modality}"):
            if key in partner.kwargs:
                kwargs[key] = partner.kwargs[key]
        return Prepared(inputs, kwargs)

    def forward(self, x: Prepared) -> torch.Tensor:
        """The studied output for ``x`` (eval mode, no grad)."""
        with torch.no_grad(), eval_mode(self.module):
            return self.module(**x.inputs, **x.kwargs)

    def decompose(self, x: Prepared, **kwargs: Any) -> Any:
        from fusionlens.decompose import decompose

        return decompose(self.module, x.inputs, forward_kwargs=x.kwargs, **kwargs)

    def layer_name(self, path: str) -> str:
        """A module path of the user's model as seen inside :attr:`module` (``model.<path>``)."""
        return f"model.{path}" if path else "model"


def as_spec(obj: Any) -> ModelSpec:
    """``obj`` if it is a :class:`ModelSpec`, else ``obj.describe()`` (models that describe themselves)."""
    if isinstance(obj, ModelSpec):
        return obj
    describe = getattr(obj, "describe", None)
    if callable(describe):
        spec = describe()
        if isinstance(spec, ModelSpec):
            return spec
    raise SpecError(f"{type(obj).__name__} is not described: wrap it in fusionlens.spec.ModelSpec(model, "
                    "inputs=..., ...) (docs/byo-model.md)")
