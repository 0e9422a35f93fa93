"""AlterMOMA: Alternative Modality Masking pruning (Sun et al., NeurIPS 2024), Algorithm 1 and AlterEva.

Notation (section 3.1): ``theta = {theta_m for each modality m} + theta_f`` (backbones; fusion + heads), the
masked loss ``L_m(mu_1, ..., mu_M, mu_f; D) = L(mu_1 * theta_1, ..., mu_f * theta_f; D)`` (eq. 3).

Algorithm 1, as implemented by :class:`AlterMOMA`:

1. DeCI, the *Deactivated Contribution Indicator* (eq. 4-6 for a camera backbone, 20-23 for LiDAR, 28-29 for
   fusion): the first-order Taylor estimate of the loss change when a parameter is switched off reduces to
   ``DeCI(theta^i) = |theta^i * dL_m(; D)/dtheta^i|`` on the *unmasked* model at ``theta_init``; one backward
   pass on the reference batch ``D`` serves every group ("a single backward propagation ... with initialized
   parameters", section 3.3).
2. For each modality ``m`` (lines 2-7): start from ``theta_init`` (line 6, reinitialisation; the first
   stage trivially), set ``mu_m = 0`` -- every parameter of backbone ``m`` is zeroed and frozen (line 3);
   *Redundancy Reactivation* (line 4): ``B`` plain SGD steps
   ``theta_j = theta_{j-1} - eps * dL_m(mu_m=0; D_{j-1})/dtheta`` (eq. 16, the update Proposition A
   assumes) on batches ``D_0 = D, D_1, ..., D_{B-1}``; then the *Reactivated
   Redundancy Indicator* of every parameter outside backbone ``m`` (eq. 7-10, 24-26, 30-35):
   ``ReRI_m(theta^i) = |theta_0^i * dL_m(mu_m=0; D)/dtheta_0^i - theta_0^i * dL_m(mu_m=0; D_B)/dtheta_B^i|``,
   where the gradient on ``theta_B`` replaces the one on ``theta_0`` by Proposition A (eq. 9, 14-19: dropping
   the ``eps * Hessian`` terms for a small ``eps``). The first gradient is the one the first reactivation step
   takes anyway, so each stage costs ``B + 1`` backward passes (``2n + B - 1`` with D made of ``n`` batches).
3. AlterEva (eq. 11-13, 27, 36) with per-group normalisation (sums over the group's prunable parameters):
   ``S(theta_k^i) = alpha * DeCI^i / sum_k DeCI - beta/(M-1) * sum_{m != k} ReRI_m^i / sum_k ReRI_m``
   for a backbone ``k``, and
   ``S(theta_f^i) = alpha * DeCI^i / sum_f DeCI - beta/M * sum_m ReRI_m^i / sum_f ReRI_m`` for fusion +
   heads. With two modalities this is exactly eq. 11-13 (``beta`` for a backbone, whose ReRI comes from
   masking the other one; ``beta/2`` twice for fusion); for ``M > 2`` the ``M - 1`` (backbone) or ``M``
   (fusion) ReRI terms are averaged, generalising ``beta/2`` to ``beta/M``.
4. The pruner keeps the top ``(1 - rho)`` of ``S`` globally and applies the masks to ``theta_init`` (lines
   8-10); fine-tuning with fixed masks is line 11.

Readings the text leaves open (options; docs/altermoma.md has the measurements):

* ``reference_batches = n``: D, the data of ``L(mu; D)`` (eq. 3-7), is ``n`` batches; DeCI, ``g_0`` and the first
  reactivation step use the mean gradient over them, and ``g_B`` is averaged over ``n`` batches too. The paper's
  D is the dataset the reactivation batches ``D_1..D_B`` are sampled from (Proposition A), so ``n > 1`` estimates a
  dataset quantity where ``n = 1`` uses one batch of it.
* ``same_batch_reri``: ``g_B`` on D's batches again instead of fresh ones, so ``g_0 - g_B`` is the change of the
  gradient along the reactivation and not, in addition, the batch-to-batch change.
* ``reactivation_optimizer``: ``"sgd"`` is eq. 16's update (the one Proposition A's derivation assumes);
  ``"adam"`` (lr 1e-4) is how the paper trains and fine-tunes its models.

The defaults are the paper-literal reading (``n = 1``, fresh batches for ``g_B``, SGD): none of the others did
better on the built-in world, and none reached SNIP. ReRI is not batch noise there (split-half Spearman 0.66-0.81
already at ``n = 1``), but it is rank-correlated with DeCI, so with alpha = beta the per-group-normalised score is a
difference of two nearly proportional indicators whose own split-half correlation is 0.0-0.27 (docs/altermoma.md).

Cost: ``n + M * (2n + B - 1)`` backward passes, i.e. ``2B + 3`` for a camera-LiDAR model with ``n = 1``
(``backward_passes``).
``B`` and ``eps`` are not given in the paper; the defaults (B = 8, eps = 1e-3) were chosen by a small sweep
on the built-in world (B in {2, 8} x eps in {1e-3, 1e-2}, camera-LiDAR, 85%, one seed: benchmarks/prune_sweep.py,
numbers in benchmarks/RESULTS.md); the differences there are within seed noise, so treat them as a starting
point, not a tuned optimum.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from fusionlens.prune.baselines import Importance, effective_weights, loss_gradients
from fusionlens.prune.params import (
    FUSION,
    LossFn,
    ParamGroups,
    Scores,
    batch_stream,
    clone_model,
    named_parameters,
    resolve_groups,
)

DEFAULT_REACTIVATION_STEPS = 8
DEFAULT_REACTIVATION_LR = 1e-3
#: the reactivation optimisers and their default learning rates: plain SGD is the update Proposition A assumes
#: (eq. 16); Adam at 1e-4 is how the paper trains and fine-tunes its models (section 4.1)
REACTIVATION_LRS: dict[str, float] = {"sgd": DEFAULT_REACTIVATION_LR, "adam": 1e-4}


@dataclass
class Indicators:
    """The raw indicators of one AlterMOMA run: ``deci[name]`` and ``reri[masked modality][name]``."""

    deci: Scores
    reri: dict[str, Scores]


NORMALISATIONS: tuple[str, ...] = ("sum", "mean")


def _normalised(scores: Mapping[str, torch.Tensor], names: Sequence[str], how: str = "sum") -> dict[str, torch.Tensor]:
    """``x / sum_group(x)`` over ``names`` (eq. 11-13), or ``x / mean_group(x)`` for ``how="mean"``; an
    all-zero group contributes zero rather than NaN."""
    total = sum(float(scores[n].sum()) for n in names)
    if how == "mean":
        total /= sum(scores[n].numel() for n in names)
    return {n: scores[n] / total if total > 0 else torch.zeros_like(scores[n]) for n in names}


def altereva(
    indicators: Indicators, groups: ParamGroups, alpha: float = 1.0, beta: float = 1.0, normalise: str = "sum"
) -> Scores:
    """Combine DeCI and ReRI into AlterEva scores (eq. 11-13, 27, 36), each group normalised on its own.

    ``groups`` must already be restricted to the scored (prunable) parameters. ``normalise="sum"`` is the
    paper's: every group's DeCI sums to ``alpha``, so under one global threshold a parameter of a small group
    (a 2k-weight LiDAR branch next to a 3M-weight camera ResNet) outranks one of a large group by the size
    ratio. ``"mean"`` divides by the group mean instead (the same within-group DeCI/ReRI balance, no size
    bias) -- an option of ours, not the paper's, reported separately."""
    if normalise not in NORMALISATIONS:
        raise ValueError(f"normalise must be one of {list(NORMALISATIONS)}, got {normalise!r}")
    modalities = list(groups.modalities)
    n_mod = len(modalities)
    out: Scores = {}
    parts = [(k, groups.modalities[k], [m for m in modalities if m != k], beta / (n_mod - 1)) for k in modalities] + [
        (FUSION, groups.fusion, modalities, beta / n_mod)
    ]
    for _key, names, maskers, weight in parts:
        if not names:
            continue
        deci = _normalised(indicators.deci, names, normalise)
        reri = [_normalised(indicators.reri[m], names, normalise) for m in maskers]
        for n in names:
            out[n] = alpha * deci[n] - weight * sum(r[n] for r in reri)
    return out


class AlterMOMA(Importance):
    """AlterMOMA importance (module docstring). ``groups``: a :class:`ParamGroups`, module-name prefixes
    (``{"camera": ["cam_encoder"], "lidar": ["lidar_encoder"]}``) or ``None`` for ``model.modality_groups()``.
    ``batches`` should yield ``n + M (n + B - 1)`` distinct batches (``n = reference_batches``; D first, then each
    stage's ``B - 1`` reactivation batches and ``n`` for ``g_B``); it is re-iterated if it holds fewer."""

    name = "altermoma"
    needs_data = True

    def __init__(
        self,
        loss_fn: LossFn,
        batches: Iterable[Any],
        groups: ParamGroups | Mapping[str, Any] | None = None,
        alpha: float = 1.0,
        beta: float = 1.0,
        reactivation_steps: int = DEFAULT_REACTIVATION_STEPS,
        reactivation_lr: float | None = None,
        same_batch_reri: bool = False,
        normalise: str = "sum",
        reference_batches: int = 1,
        reactivation_optimizer: str = "sgd",
    ) -> None:
        super().__init__()
        if reactivation_steps < 1:
            raise ValueError(f"reactivation_steps (B) must be >= 1, got {reactivation_steps}")
        if reactivation_optimizer not in REACTIVATION_LRS:
            raise ValueError(
                f"reactivation_optimizer must be one of {list(REACTIVATION_LRS)}, got {reactivation_optimizer!r}"
            )
        if reactivation_lr is None:
            reactivation_lr = REACTIVATION_LRS[reactivation_optimizer]
        if not reactivation_lr > 0:
            raise ValueError(f"reactivation_lr must be > 0, got {reactivation_lr}")
        if isinstance(reference_batches, bool) or not isinstance(reference_batches, int) or reference_batches < 1:
            raise ValueError(f"reference_batches (the batches D is made of) must be an integer >= 1, "
                             f"got {reference_batches!r}")
        if alpha < 0 or beta < 0:
            raise ValueError(f"alpha and beta must be >= 0, got {alpha}, {beta}")
        self.loss_fn, self.batches, self.groups = loss_fn, batches, groups
        self.alpha, self.beta = float(alpha), float(beta)
        self.steps, self.lr = reactivation_steps, reactivation_lr
        self.same_batch_reri = same_batch_reri
        self.reference_batches, self.optimizer = reference_batches, reactivation_optimizer
        if normalise not in NORMALISATIONS:
            raise ValueError(f"normalise must be one of {list(NORMALISATIONS)}, got {normalise!r}")
        self.normalise = normalise
        self.last_indicators: Indicators | None = None

    def resolve(self, model: nn.Module) -> ParamGroups:
        return self.groups if isinstance(self.groups, ParamGroups) else resolve_groups(model, self.groups)

    def indicators(self, model: nn.Module, names: Sequence[str]) -> Indicators:
        """DeCI (``n`` backward passes) and one ReRI per masked modality (``2n + B - 1`` backward passes each),
        ``n = reference_batches``."""
        groups = self.resolve(model)
        stream = batch_stream(self.batches)
        reference = [next(stream) for _ in range(self.reference_batches)]  # D: shared by DeCI and every stage
        theta0 = {n: w.to(torch.float64) for n, w in effective_weights(model, names).items()}
        start = clone_model(model).train()
        grads = self._mean_gradients(start, reference, names)
        deci = {n: (theta0[n] * grads[n].to(torch.float64)).abs() for n in names}  # eq. 6, 23, 29
        reri = {m: self._stage(model, groups, m, names, reference, stream, theta0) for m in groups.modalities}
        return Indicators(deci, reri)

    def _mean_gradients(self, model: nn.Module, batches: Sequence[Any], names: Sequence[str]) -> Scores:
        """``dL(; D)/dtheta`` for ``D`` the union of equal-sized ``batches``: the mean of their gradients."""
        total: Scores = {}
        for batch in batches:
            grads = loss_gradients(model, self.loss_fn, batch, names)
            self.backward_passes += 1
            total = grads if not total else {n: total[n] + grads[n] for n in names}
        return {n: g / len(batches) for n, g in total.items()}

    def _stage(
        self,
        model: nn.Module,
        groups: ParamGroups,
        masked: str,
        names: Sequence[str],
        reference: Sequence[Any],
        stream: Any,
        theta0: Mapping[str, torch.Tensor],
    ) -> Scores:
        work = clone_model(model).train()  # line 6: every stage starts from theta_init
        params = named_parameters(work)
        frozen = set(groups.modalities[masked])
        with torch.no_grad():
            for n in frozen:  # line 3: mu_m = 0 on the whole backbone m
                params[n].zero_()
                params[n].requires_grad_(False)
        scored = [n for n in names if n not in frozen]
        trainable = [p for n, p in params.items() if n not in frozen and p.requires_grad]
        opt_class = torch.optim.Adam if self.optimizer == "adam" else torch.optim.SGD
        opt = opt_class(trainable, lr=self.lr)
        first: Scores = {}
        for step in range(self.steps):  # line 4: Redundancy Reactivation, eq. 16
            opt.zero_grad(set_to_none=True)
            batches = reference if step == 0 else [next(stream)]
            for batch in batches:  # accumulated: the first step's gradient is the mean over D's batches
                loss = self.loss_fn(work, batch)
                if not torch.isfinite(loss):
                    raise RuntimeError(
                        f"reactivation loss diverged (masking {masked!r}, step {step}); lower "
                        f"reactivation_lr (now {self.lr})"
                    )
                (loss / len(batches)).backward()
                self.backward_passes += 1
            if step == 0:  # dL_m(mu_m=0; D)/dtheta_0, reused from the first update
                first = {
                    n: (torch.zeros_like(params[n]) if params[n].grad is None else params[n].grad.detach().clone())
                    for n in scored
                }
            opt.step()
        fresh = [next(stream) for _ in range(self.reference_batches)] if not self.same_batch_reri else reference
        last = self._mean_gradients(work, fresh, scored)  # dL_m(mu_m=0; D_B)/dtheta_B, D_B as large as D
        # eq. 10 / 26 / 34-35: theta is theta_0 in both terms (Proposition A moves the gradient, not theta).
        return {n: (theta0[n] * (first[n].to(torch.float64) - last[n].to(torch.float64))).abs() for n in scored}

    def scores(self, model: nn.Module, names: list[str], sparsity: float) -> Scores:
        groups = self.resolve(model)
        ind = self.indicators(model, names)
        self.last_indicators = ind
        return altereva(ind, groups.restrict(names), self.alpha, self.beta, self.normalise)
