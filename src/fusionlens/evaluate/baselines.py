"""Attribution methods compared in the LMD paper's tables, all with the :class:`~.separation.Method` interface.

* :class:`LMD` -- ``fusionlens.decompose`` with any rules preset (``"paper"``, ``"activations-only"``,
  ``"norms-only"``, ``"sum-splitting"``, ``"ratio-splitting"``, ``"bn-identity+norm-ratio"``, ...), in
  ``frozen`` or ``recomputed`` mode (:mod:`~.separation`). ``rules="naive"`` is the zero-out baseline:
  ``F(x_m, 0) - F(0)`` per modality, ``F(0)`` as bias (no linearization, so it has no frozen mode).
* :class:`Shapley` -- exact modality Shapley values of the original network: all ``2^M`` subsets, the absent
  modalities replaced by zeros or by the dataset mean (per pixel of the output map). The bias is ``v(empty)``,
  so values plus bias sum to the output (efficiency).
* :class:`LMDShap` -- the same Shapley values over modalities, of the network *linearized at the clean input*
  (frozen LMD coefficients). That network is affine in the fused inputs, ``G(x) = sum_m J_m x_m + b``, so
  ``v(S) = sum_{m in S} J_m x_m + sum_{m not in S} J_m z_m + b`` for a baseline ``z`` and every marginal
  contribution of ``m`` is ``J_m (x_m - z_m)``: the Shapley value of ``m`` *is* its LMD component of ``x - z``
  (with the zero baseline at the fusion level: exactly the LMD component), and nothing else is shared. It is
  computed literally here (``2^M`` frozen evaluations) so that the identity is checked, not assumed.
* :class:`Captum` -- Captum's ``ShapleyValueSampling`` or ``FeatureAblation`` with one feature per modality. To get
  a map per output pixel without one call per pixel, each modality enters through a scalar gate
  ``x_m(g) = z_m + g_m (x_m - z_m)`` and the forward returns the whole map: Captum's aggregate-output mode then
  attributes every pixel in ``(M+1) * n_samples`` (sampling) or ``M+1`` (ablation) forwards. Captum is optional
  and imported on first use.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch.utils._pytree import tree_flatten, tree_unflatten
from torch.utils.data import Dataset

from fusionlens import decompose
from fusionlens.decompose import PRESETS, LinearizationSettings, UnsupportedOperationError
from fusionlens.spec import Prepared, Subject

BASELINES = ("zero", "mean")
MODES = ("frozen", "recomputed")


def pick(out: Any, output: str | None) -> torch.Tensor:
    """Leaf ``output`` of a model output (dict) or the tensor itself (a subject's module returns the studied
    tensor already)."""
    if isinstance(out, Mapping):
        if output not in out:
            raise ValueError(f"output {output!r} not in the model's outputs {list(out)}")
        return out[output]
    if isinstance(out, torch.Tensor):
        return out
    raise ValueError(f"cannot pick output {output!r} from a {type(out).__name__}")


def _shapley_weights(m: int) -> list[float]:
    """Weight of a coalition of size ``s`` not containing the player: ``s! (m - s - 1)! / m!``."""
    return [math.factorial(s) * math.factorial(m - s - 1) / math.factorial(m) for s in range(m)]


def exact_shapley(names: list[str], value: Callable[[frozenset[str]], torch.Tensor]) -> dict[str, torch.Tensor]:
    """Exact Shapley values of the players ``names`` for a tensor-valued game, each ``v(S)`` evaluated once
    (``2^M`` calls); ``"bias"`` holds ``v(empty)`` so that the values plus bias sum to ``v(all)``."""
    cache = {frozenset(s): value(frozenset(s)) for r in range(len(names) + 1)
             for s in itertools.combinations(names, r)}
    w = _shapley_weights(len(names))
    out: dict[str, torch.Tensor] = {}
    for name in names:
        others = [o for o in names if o != name]
        acc = torch.zeros_like(cache[frozenset()])
        for r in range(len(others) + 1):
            for s in itertools.combinations(others, r):
                acc = acc + w[r] * (cache[frozenset(s) | {name}] - cache[frozenset(s)])
        out[name] = acc
    out["bias"] = cache[frozenset()]
    return out


def feature_means(subject: Subject, dataset: Dataset, indices: list[int] | None = None) -> dict[str, torch.Tensor]:
    """Dataset-mean modality inputs at the subject's level (the ``"mean"`` baseline); the fusion level only, as raw
    point clouds of different sizes have no meaningful mean."""
    if subject.level != "fusion":
        raise ValueError("baseline='mean' needs level='fusion' (raw point clouds have no per-element mean)")
    indices = list(range(len(dataset))) if indices is None else indices  # type: ignore[arg-type]
    if not indices:
        raise ValueError("feature_means: no samples")
    total: dict[str, torch.Tensor] = {}
    for i in indices:
        x = subject.prepare(subject.spec.batch(dataset, [i]))
        for m, t in x.inputs.items():
            total[m] = total.get(m, 0) + t.double()
    return {m: (t / len(indices)).float() for m, t in total.items()}


def _baseline_inputs(x: Prepared, baseline: str, means: dict[str, torch.Tensor] | None) -> dict[str, torch.Tensor]:
    if baseline == "zero":
        return {m: torch.zeros_like(t) for m, t in x.inputs.items()}
    assert means is not None
    return {m: means[m].expand_as(t) for m, t in x.inputs.items()}


class _Baselined:
    def __init__(self, baseline: str, means: dict[str, torch.Tensor] | None, output: str) -> None:
        if baseline not in BASELINES:
            raise ValueError(f"baseline must be one of {BASELINES}, got {baseline!r}")
        if baseline == "mean" and means is None:
            raise ValueError("baseline='mean' needs means= (see feature_means)")
        self.baseline, self.means, self.output = baseline, means, output

    def coalition(self, x: Prepared, members: frozenset[str]) -> Prepared:
        base = _baseline_inputs(x, self.baseline, self.means)
        return Prepared({m: (t if m in members else base[m]) for m, t in x.inputs.items()}, x.kwargs)


def resolve(rules: str) -> Any:
    """A decompose ``rules`` argument: a preset name, ``"naive"``, or ``"none"`` -- the paper's Table 1 baseline
    row, neither activations nor norms linearized (each component through the original nonlinear layers)."""
    if rules == "none":
        return LinearizationSettings(linearize_activations=False, linearize_norms=False)
    if rules != "naive" and rules not in PRESETS:
        raise ValueError(f"unknown rules {rules!r}; choose from {sorted(PRESETS) + ['naive', 'none']}")
    return rules


class LMD:
    """LMD with a rules preset, in ``frozen`` or ``recomputed`` mode (``naive`` has only ``recomputed``).

    ``batch_size``: how many perturbed inputs :meth:`perturbed_many` (used by
    :func:`~.separation.perturbation_metrics`) decomposes in one call. Default: 4 in frozen mode (replaying a
    batch through the clean sample's coefficients gives each sample's components as replayed alone), 1 in
    recomputed mode (a batch decomposes each sample exactly up to float rounding in its last bits, and is no faster
    on a CPU; a GPU gains from more)."""

    def __init__(self, rules: str = "paper", mode: str = "frozen", output: str = "seg",
                 batch_size: int | None = None) -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if rules == "naive" and mode == "frozen":
            raise ValueError("rules='naive' has no linearization to freeze; use mode='recomputed'")
        if batch_size is None:
            batch_size = 4 if mode == "frozen" else 1
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.rules, self.mode, self.output, self.batch_size = resolve(rules), mode, output, batch_size
        self._replay_output = False  # set once a model's fused part turns out to read values (with_output=False)
        self.name = f"lmd[{rules}]/{mode}" if rules != "naive" else "naive"

    def _maps(self, d: Any) -> dict[str, torch.Tensor]:
        return {n: pick(d.components[n], self.output) for n in d.names}

    def clean(self, subject: Subject, x: Prepared) -> tuple[dict[str, torch.Tensor], Any]:
        d = decompose(subject.module, x.inputs, forward_kwargs=x.kwargs, rules=self.rules,
                      record_coefficients=self.mode == "frozen")
        return self._maps(d), d.coefficients

    def perturbed(self, subject: Subject, x: Prepared, state: Any) -> dict[str, torch.Tensor]:
        d = decompose(subject.module, x.inputs, forward_kwargs=x.kwargs, rules=self.rules,
                      coefficients=state if self.mode == "frozen" else None)
        return self._maps(d)

    def perturbed_many(self, subject: Subject, clean_x: Prepared, partners: list[Prepared], perturbed: list[str],
                       state: Any, clean_maps: dict[str, torch.Tensor]) -> dict[str, list[dict[str, torch.Tensor]]]:
        """The modality maps :meth:`perturbed` gives for ``subject.swap(clean_x, partner, p)``, for every ``p`` in
        ``perturbed`` (outer) and every partner (inner, in order), from decompositions of up to ``batch_size``
        inputs at once along the batch dimension -- exact as the model treats the samples of a batch independently
        (the fusionlens models do: convolutions, BatchNorm in eval mode, per-sample InstanceNorm).

        Frozen mode needs one input per partner, not one per (partner, p): under the clean input's coefficients
        the component of modality ``m`` depends on ``m``'s input (and its own calibration / valid mask) alone, so
        swapping *every* perturbed modality at once gives each one's component, and the unperturbed modalities'
        components are the clean maps (bit for bit -- the separation the frozen mode measures). The coefficients,
        recorded on the clean sample, replay on the whole batch (``decompose``'s ``coefficients``), without the
        model's output (``with_output=False``: the modality components do not need it)."""
        if self.mode == "recomputed":
            return {p: self._batched(subject, [subject.swap(clean_x, partner, p) for partner in partners], None)
                    for p in perturbed}
        packed = []
        for partner in partners:
            x = clean_x
            for p in perturbed:
                x = subject.swap(x, partner, p)
            packed.append(x)
        maps = self._batched(subject, packed, state)
        return {p: [{m: (row[m] if m == p else clean_maps[m]) for m in subject.modalities} for row in maps]
                for p in perturbed}

    def _batched(self, subject: Subject, xs: list[Prepared], coefficients: Any) -> list[dict[str, torch.Tensor]]:
        """Each input's modality maps, decomposing ``batch_size`` inputs per call where their shapes allow."""
        size = self.batch_size if coefficients is None or getattr(coefficients, "batch", None) == 1 else 1
        out: list[dict[str, torch.Tensor]] = []
        for start in range(0, len(xs), size):
            chunk = xs[start:start + size]
            joined = concat_prepared(chunk)
            for x, members in ([(joined, chunk)] if joined is not None else [(x, [x]) for x in chunk]):
                d = self._decompose(subject, x, coefficients)
                maps = {m: pick(d.components[m], self.output) for m in subject.modalities}
                offset = 0
                for member in members:
                    b = _batch_size(member)
                    out.append({m: t[offset:offset + b] for m, t in maps.items()})
                    offset += b
        return out

    def _decompose(self, subject: Subject, x: Prepared, coefficients: Any) -> Any:
        """``x`` decomposed (recomputed mode) or replayed through ``coefficients`` without the output where the
        model allows it."""
        kwargs = dict(forward_kwargs=x.kwargs, rules=self.rules, coefficients=coefficients)
        if coefficients is not None and not self._replay_output:
            try:
                return decompose(subject.module, x.inputs, with_output=False, **kwargs)
            except UnsupportedOperationError:  # the fused part reads values (e.g. ``.item()``): replay it whole
                self._replay_output = True
        return decompose(subject.module, x.inputs, **kwargs)


def _batch_size(x: Prepared) -> int:
    return next(iter(x.inputs.values())).shape[0]


def concat_prepared(xs: list[Prepared]) -> Prepared | None:
    """``xs`` as one batch: every tensor (also inside dicts / lists of keyword arguments such as ``img_metas``)
    concatenated along dimension 0; or ``None`` where that is not possible: inputs of different shapes (point clouds
    of different sizes), keyword arguments of different structure or with different non-tensor values."""
    if len(xs) == 1:
        return xs[0]
    flat = [tree_flatten((x.inputs, x.kwargs)) for x in xs]
    spec = flat[0][1]
    if any(f[1] != spec for f in flat[1:]):
        return None
    leaves: list[Any] = []
    for values in zip(*(f[0] for f in flat)):
        head = values[0]
        if isinstance(head, torch.Tensor):
            if not all(isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[1:] == head.shape[1:]
                       and v.dtype == head.dtype for v in values):
                return None
            leaves.append(torch.cat(values))
        elif all(v is head or v == head for v in values):
            leaves.append(head)
        else:
            return None
    inputs, kwargs = tree_unflatten(leaves, spec)
    return Prepared(inputs, kwargs)


class Shapley(_Baselined):
    """Exact modality Shapley values of the original network (``2^M`` forwards)."""

    def __init__(self, baseline: str = "zero", means: dict[str, torch.Tensor] | None = None,
                 output: str = "seg") -> None:
        super().__init__(baseline, means, output)
        self.name = f"shapley[{baseline}]"

    def attribute(self, subject: Subject, x: Prepared) -> dict[str, torch.Tensor]:
        return exact_shapley(list(x.inputs), lambda s: pick(subject.forward(self.coalition(x, s)), self.output))

    def clean(self, subject: Subject, x: Prepared) -> tuple[dict[str, torch.Tensor], Any]:
        return self.attribute(subject, x), None

    def perturbed(self, subject: Subject, x: Prepared, state: Any) -> dict[str, torch.Tensor]:
        return self.attribute(subject, x)


class LMDShap(_Baselined):
    """Modality Shapley values of the network linearized at the clean input (module docstring)."""

    def __init__(self, rules: str = "paper", mode: str = "frozen", baseline: str = "zero",
                 means: dict[str, torch.Tensor] | None = None, output: str = "seg") -> None:
        super().__init__(baseline, means, output)
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        self.rules, self.mode = resolve(rules), mode
        self.name = f"lmd+shap[{rules},{baseline}]/{mode}"

    def _linear_value(self, subject: Subject, x: Prepared, members: frozenset[str], state: Any) -> torch.Tensor:
        coefficients, bias = state
        xs = self.coalition(x, members)
        d = decompose(subject.module, xs.inputs, forward_kwargs=xs.kwargs, rules=self.rules, coefficients=coefficients)
        # The replayed modality components are the linear system's J_m x_m; its constant term is the bias found
        # at the operating point (the replay's own "bias" is output - modalities, which holds the nonlinearity).
        return sum(pick(d.components[n], self.output) for n in d.names if n != "bias") + bias

    def attribute(self, subject: Subject, x: Prepared, state: Any) -> dict[str, torch.Tensor]:
        return exact_shapley(list(x.inputs), lambda s: self._linear_value(subject, x, s, state))

    def _record(self, subject: Subject, x: Prepared) -> Any:
        d = decompose(subject.module, x.inputs, forward_kwargs=x.kwargs, rules=self.rules, record_coefficients=True)
        return d.coefficients, pick(d.components["bias"], self.output)

    def clean(self, subject: Subject, x: Prepared) -> tuple[dict[str, torch.Tensor], Any]:
        state = self._record(subject, x)
        return self.attribute(subject, x, state), state

    def perturbed(self, subject: Subject, x: Prepared, state: Any) -> dict[str, torch.Tensor]:
        return self.attribute(subject, x, state if self.mode == "frozen" else self._record(subject, x))


CAPTUM_KINDS = ("shapley-sampling", "feature-ablation")


class Captum(_Baselined):
    """Captum ``ShapleyValueSampling`` / ``FeatureAblation`` over modality gates (module docstring)."""

    def __init__(self, kind: str = "shapley-sampling", baseline: str = "zero",
                 means: dict[str, torch.Tensor] | None = None, n_samples: int = 25, output: str = "seg",
                 seed: int = 0) -> None:
        super().__init__(baseline, means, output)
        if kind not in CAPTUM_KINDS:
            raise ValueError(f"captum kind must be one of {CAPTUM_KINDS}, got {kind!r}")
        if n_samples < 1:
            raise ValueError(f"n_samples must be >= 1, got {n_samples}")
        try:
            import captum.attr  # noqa: F401
        except ImportError as exc:  # optional extra
            raise ValueError("the captum baselines need the optional 'captum' package (pip install captum)") from exc
        self.kind, self.n_samples, self.seed = kind, n_samples, seed
        self.name = f"captum-{kind}[{baseline}]"

    def attribute(self, subject: Subject, x: Prepared) -> dict[str, torch.Tensor]:
        from captum.attr import FeatureAblation, ShapleyValueSampling

        names = list(x.inputs)
        base = _baseline_inputs(x, self.baseline, self.means)
        shape: list[torch.Size] = []

        def forward(gates: torch.Tensor) -> torch.Tensor:
            mixed = {m: base[m] + gates[0, i] * (x.inputs[m] - base[m]) for i, m in enumerate(names)}
            out = pick(subject.forward(Prepared(mixed, x.kwargs)), self.output)
            shape[:] = [out.shape]
            return out.reshape(-1)  # a fixed-size map: Captum's aggregate-output mode, one value per pixel

        gates = torch.ones(1, len(names))
        mask = torch.arange(len(names)).unsqueeze(0)
        if self.kind == "feature-ablation":
            attr = FeatureAblation(forward).attribute(gates, baselines=torch.zeros_like(gates), feature_mask=mask)
        else:
            torch.manual_seed(self.seed)  # Captum draws the permutations from torch's global generator
            attr = ShapleyValueSampling(forward).attribute(gates, baselines=torch.zeros_like(gates),
                                                           feature_mask=mask, n_samples=self.n_samples)
        out = {m: attr[..., i].reshape(shape[0]) for i, m in enumerate(names)}
        out["bias"] = forward(torch.zeros_like(gates)).reshape(shape[0])
        return out

    def clean(self, subject: Subject, x: Prepared) -> tuple[dict[str, torch.Tensor], Any]:
        return self.attribute(subject, x), None

    def perturbed(self, subject: Subject, x: Prepared, state: Any) -> dict[str, torch.Tensor]:
        return self.attribute(subject, x)


def make_method(spec: str, *, mode: str = "frozen", means: dict[str, torch.Tensor] | None = None,
                output: str = "seg") -> Any:
    """A method by name: ``lmd:<rules>`` (any decompose preset), ``naive``, ``shapley`` / ``shapley-mean``,
    ``lmd+shap`` / ``lmd+shap-mean``, ``captum-sampling`` / ``captum-ablation`` (``-mean`` for the mean baseline)."""
    base = "mean" if spec.endswith("-mean") else "zero"
    core = spec[: -len("-mean")] if base == "mean" else spec
    if core.startswith("lmd:"):
        return LMD(core[4:], mode, output)
    if core == "naive":
        return LMD("naive", "recomputed", output)
    if core == "shapley":
        return Shapley(base, means, output)
    if core == "lmd+shap":
        return LMDShap("paper", mode, base, means, output)
    if core in ("captum-sampling", "captum-ablation"):
        kind = "shapley-sampling" if core == "captum-sampling" else "feature-ablation"
        return Captum(kind, base, means, output=output)
    raise ValueError(f"unknown method {spec!r}: use lmd:<rules>, naive, shapley[-mean], lmd+shap[-mean], "
                     "captum-sampling[-mean] or captum-ablation[-mean]")
