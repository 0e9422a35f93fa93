"""Baseline importance functions: random, global magnitude, IMP, SNIP and SynFlow (ProsPr: ``prospr.py``).

Every method is a callable ``importance(model, names, sparsity) -> {name: score}`` over the prunable
parameter ``names``; :func:`fusionlens.prune.pruner.prune_with_scores` turns scores into masks with one global
threshold. Methods never modify the model they are given (they work on copies) and count the backward
passes they spend in ``backward_passes``. Iterative methods (IMP, SynFlow) need the target ``sparsity``; they
mark entries they removed in earlier rounds with score -1 (below every real score, which are all >= 0), so the
final threshold keeps them removed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from fusionlens.prune.params import (
    LossFn,
    Scores,
    batch_stream,
    call_model,
    check_sparsity,
    clone_model,
    effective_weights,
    named_parameters,
    output_tensors,
)
from fusionlens.prune.pruner import apply_masks, finetune, global_masks

DEAD = -1.0


class Importance:
    """Base class: subclasses implement :meth:`scores`; ``__call__`` validates and counts.

    Subclasses count their backward passes with ``self.backward_passes += 1``; while ``__call__`` runs with
    ``progress=True`` each count also advances a tqdm bar (the scoring's progress)."""

    name = "importance"
    needs_data = False

    def __init__(self) -> None:
        self._passes = 0
        self._bar: Any = None

    @property
    def backward_passes(self) -> int:
        return getattr(self, "_passes", 0)

    @backward_passes.setter
    def backward_passes(self, value: int) -> None:
        bar = getattr(self, "_bar", None)  # a subclass may count before calling Importance.__init__
        if bar is not None and value > self.backward_passes:
            bar.update(value - self.backward_passes)
        self._passes = value

    def __call__(
        self, model: nn.Module, names: Sequence[str], sparsity: float = 0.0, progress: bool = False
    ) -> Scores:
        check_sparsity(sparsity)
        params = named_parameters(model)
        missing = [n for n in names if n not in params]
        if missing:
            raise ValueError(f"{self.name}: unknown parameters {missing[:5]}")
        if not names:
            raise ValueError(f"{self.name}: no parameters to score")
        self._passes = 0
        if progress:
            from tqdm import tqdm

            self._bar = tqdm(desc=f"score ({self.name})", unit=" backward", leave=False)
        try:
            out = self.scores(model, list(names), sparsity)
        finally:
            if self._bar is not None:
                self._bar.close()
            self._bar = None
        return {n: out[n].detach().to(torch.float64) for n in names}

    def scores(self, model: nn.Module, names: list[str], sparsity: float) -> Scores:
        raise NotImplementedError


def loss_gradients(model: nn.Module, loss_fn: LossFn, batch: Any, names: Sequence[str]) -> Scores:
    """``dL/dtheta`` for ``names`` on one batch (one backward pass); other parameters get no gradient."""
    params = named_parameters(model)
    loss = loss_fn(model, batch)
    if not torch.isfinite(loss):
        raise RuntimeError(f"loss is not finite ({float(loss)}) while scoring")
    grads = torch.autograd.grad(loss, [params[n] for n in names], allow_unused=True)
    return {n: (torch.zeros_like(params[n]) if g is None else g.detach()) for n, g in zip(names, grads)}


class RandomImportance(Importance):
    """Uniform random scores (a seeded generator): the sanity floor every method should beat."""

    name = "random"

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        self.seed = seed

    def scores(self, model: nn.Module, names: list[str], sparsity: float) -> Scores:
        gen = torch.Generator().manual_seed(self.seed)
        params = named_parameters(model)
        return {n: torch.rand(params[n].shape, generator=gen, dtype=torch.float64) for n in names}


class MagnitudeImportance(Importance):
    """Global magnitude pruning: ``S(theta) = |theta|``."""

    name = "magnitude"

    def scores(self, model: nn.Module, names: list[str], sparsity: float) -> Scores:
        return {n: w.abs() for n, w in effective_weights(model, names).items()}


class SNIP(Importance):
    """SNIP (Lee et al. 2019): connection sensitivity ``|g * theta| / sum |g * theta|`` with ``g`` the loss
    gradient averaged over ``n_batches`` batches (one backward pass each)."""

    name = "snip"
    needs_data = True

    def __init__(self, loss_fn: LossFn, batches: Iterable[Any], n_batches: int = 1) -> None:
        super().__init__()
        if n_batches < 1:
            raise ValueError(f"n_batches must be >= 1, got {n_batches}")
        self.loss_fn, self.batches, self.n_batches = loss_fn, batches, n_batches

    def scores(self, model: nn.Module, names: list[str], sparsity: float) -> Scores:
        work = clone_model(model).train()
        stream = batch_stream(self.batches)
        total = {n: torch.zeros_like(p, dtype=torch.float64) for n, p in effective_weights(work, names).items()}
        for _ in range(self.n_batches):
            for n, g in loss_gradients(work, self.loss_fn, next(stream), names).items():
                total[n] += g.to(torch.float64)
            self.backward_passes += 1
        weights = effective_weights(work, names)
        raw = {n: (total[n] / self.n_batches * weights[n].to(torch.float64)).abs() for n in names}
        norm = sum(float(s.sum()) for s in raw.values()) or 1.0
        return {n: s / norm for n, s in raw.items()}


def _ones_like_inputs(inputs: Any, keep: Sequence[str] = ()) -> Any:
    """Every floating tensor replaced by ones (float64), except dict entries named in ``keep``."""
    if isinstance(inputs, torch.Tensor):
        return torch.ones_like(inputs, dtype=torch.float64) if inputs.is_floating_point() else inputs
    if isinstance(inputs, Mapping):
        return {
            k: (v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v)
            if k in keep
            else _ones_like_inputs(v)
            for k, v in inputs.items()
        }
    if isinstance(inputs, (tuple, list)):
        return type(inputs)(_ones_like_inputs(v) for v in inputs)
    return inputs


class _AffineOnly(nn.Module):
    """A normalisation layer reduced to its affine part (``x * weight + bias``), same parameter names."""

    def __init__(self, norm: nn.Module) -> None:
        super().__init__()
        self.weight = getattr(norm, "weight", None)
        self.bias = getattr(norm, "bias", None)
        self.channel_dim = not isinstance(norm, nn.LayerNorm)  # LayerNorm's affine spans the trailing dims

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w, b = self.weight, self.bias
        if self.channel_dim:
            shape = (-1,) + (1,) * (x.dim() - 2)
            w = None if w is None else w.reshape(shape)
            b = None if b is None else b.reshape(shape)
        x = x if w is None else x * w
        return x if b is None else x + b


def _statistics_free(model: nn.Module) -> nn.Module:
    """Replace normalisations that use the *input's* statistics even in eval mode (InstanceNorm without
    running statistics, GroupNorm, LayerNorm) by their affine part: on SynFlow's constant all-ones signal they
    would subtract the mean and erase the flow. BatchNorm in eval mode is already affine and stays."""
    kinds = (nn.GroupNorm, nn.LayerNorm, nn.modules.instancenorm._InstanceNorm)
    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, kinds) and not getattr(child, "track_running_stats", False):
                setattr(module, child_name, _AffineOnly(child))
            elif isinstance(child, nn.modules.batchnorm._BatchNorm) and child.running_mean is not None:
                # SynFlow was made for networks at initialisation (running mean 0). On a trained model the
                # absolute running mean is subtracted from the all-ones flow and a ReLU can cut it (the whole
                # LiDAR branch of a reference model scored 0), so the mean is dropped: BN acts as |gamma|/sigma.
                child.running_mean.zero_()
    return model


class SynFlow(Importance):
    """SynFlow (Tanaka et al. 2020), data-free and iterative.

    Each of ``iterations`` rounds: take the absolute value of every floating parameter and buffer (signs saved
    and restored afterwards), put BatchNorm in eval mode and reduce input-statistics normalisations
    (InstanceNorm, GroupNorm, LayerNorm) to their affine part, which would otherwise normalise the all-ones
    signal away, feed an all-ones input in float64, ``R = sum(outputs)`` and score
    ``|theta * dR/dtheta|``; then keep the top ``(1 - rho)^(k / iterations)`` fraction (exponential schedule).
    ``input_factory()`` returns example inputs (tensor, tuple or dict of keyword inputs); only their shapes
    and non-float entries (validity masks) are used, and the dict entries named in ``keep_inputs`` (e.g.
    camera calibration, which must stay invertible) are passed unchanged.
    """

    name = "synflow"

    def __init__(
        self, input_factory: Callable[[], Any], iterations: int = 100, keep_inputs: Sequence[str] = ()
    ) -> None:
        super().__init__()
        if iterations < 1:
            raise ValueError(f"iterations must be >= 1, got {iterations}")
        self.input_factory, self.iterations, self.keep_inputs = input_factory, iterations, tuple(keep_inputs)

    def _round(self, work: nn.Module, names: list[str], inputs: Any) -> Scores:
        state = [t for t in list(work.parameters()) + list(work.buffers()) if t.is_floating_point()]
        signs = [torch.sign(t.detach()) for t in state]
        with torch.no_grad():
            for t in state:
                t.abs_()
        work.zero_grad(set_to_none=True)
        params = named_parameters(work)
        total = sum(o.sum() for o in output_tensors(call_model(work, inputs)))
        grads = torch.autograd.grad(total, [params[n] for n in names], allow_unused=True)
        self.backward_passes += 1
        weights = effective_weights(work, names)
        out = {n: torch.zeros_like(weights[n]) if g is None else (g * weights[n]).abs() for n, g in zip(names, grads)}
        with torch.no_grad():
            for t, s in zip(state, signs):
                t.mul_(torch.where(s == 0, torch.ones_like(s), s))
        return out

    def scores(self, model: nn.Module, names: list[str], sparsity: float) -> Scores:
        work = _statistics_free(clone_model(model)).double().eval()
        inputs = _ones_like_inputs(self.input_factory(), self.keep_inputs)
        params = named_parameters(work)
        alive = {n: torch.ones_like(params[n], dtype=torch.bool) for n in names}
        for k in range(1, self.iterations + 1):
            with torch.no_grad():
                for n in names:
                    params[n].mul_(alive[n])
            raw = self._round(work, names, inputs)
            scores = {n: torch.where(alive[n], raw[n], torch.full_like(raw[n], DEAD)) for n in names}
            if k < self.iterations:
                alive = global_masks(scores, 1.0 - (1.0 - sparsity) ** (k / self.iterations))
        return scores


class IMP(Importance):
    """Iterative magnitude pruning with rewinding (Frankle & Carbin 2019).

    ``rounds`` rounds of: train the masked model for ``steps_per_round`` Adam steps, rank by trained
    magnitude, keep the top ``(1 - rho)^(r / rounds)``, rewind the surviving weights to their initial
    values. The last round's trained magnitudes are returned; the pruner's global threshold performs the
    final prune, and masks
    are applied to the initial (rewound) weights. ``rounds=1, steps_per_round=0`` is global magnitude.
    """

    name = "imp"
    needs_data = True

    def __init__(
        self,
        loss_fn: LossFn,
        batches: Iterable[Any],
        rounds: int = 3,
        steps_per_round: int = 100,
        lr: float = 1e-4,
    ) -> None:
        super().__init__()
        if rounds < 1 or steps_per_round < 0:
            raise ValueError(f"rounds must be >= 1 and steps_per_round >= 0, got {rounds}, {steps_per_round}")
        self.loss_fn, self.batches = loss_fn, batches
        self.rounds, self.steps_per_round, self.lr = rounds, steps_per_round, lr

    def scores(self, model: nn.Module, names: list[str], sparsity: float) -> Scores:
        params = named_parameters(model)
        alive = {n: torch.ones_like(params[n], dtype=torch.bool) for n in names}
        for r in range(1, self.rounds + 1):
            work = apply_masks(clone_model(model), alive)  # rewound: always restart from theta_init
            finetune(work, self.loss_fn, self.batches, self.steps_per_round, lr=self.lr)
            self.backward_passes += self.steps_per_round
            trained = effective_weights(work, names)
            scores = {n: torch.where(alive[n], trained[n].abs(), torch.full_like(trained[n], DEAD)) for n in names}
            if r < self.rounds:
                alive = global_masks(scores, 1.0 - (1.0 - sparsity) ** (r / self.rounds))
        return scores
