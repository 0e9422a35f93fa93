"""ProsPr (Alizadeh et al. 2022, "Prospect pruning"): meta-gradients through a few inner training steps.

With a multiplicative mask ``c`` (all ones) on the prunable weights, ``theta_0(c) = c * theta``; take
``inner_steps`` SGD-with-momentum steps on fresh batches, differentiating through every update
(``create_graph=True``), and score each weight by the meta-gradient ``|dL(theta_K(c); D_K) / dc|`` at
``c = 1``. The whole computation runs through ``torch.func.functional_call`` on a wrapper that calls the
user's ``loss_fn(model, batch)``, so any module works (not only Conv/Linear/BN layers); every parameter,
prunable or not, takes part in the inner steps. Defaults follow the public ProsPr code: 3 inner steps,
inner lr 0.5,
momentum 0.9, a fresh batch per step. Their lr is tuned for CIFAR from scratch; pretrained fusion models need
a much smaller one (``inner_lr``), or the inner loss diverges and a clear error is raised.

Momentum buffer: with ``momentum > 0`` the public code's functional SGD (like ``torch.optim.SGD``) starts the
buffer from a *detached* copy of the first gradient, ``v_1 = g_1.detach()``, so the meta-gradient does not
flow through the first gradient (``theta_1 = c * theta - lr * v_1`` depends on ``c`` only through its first
term; later gradients ``g_k``, k > 1, stay differentiated). That is the default here
(``detach_first_momentum=True``); ``False`` differentiates through every step, the exact derivative of the
unrolled inner loop. Without momentum no buffer exists and both are the exact derivative.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn
from torch.func import functional_call

from fusionlens.prune.baselines import Importance
from fusionlens.prune.params import LossFn, Scores, batch_stream, clone_model, parameter_name


class _LossModule(nn.Module):
    """``forward(batch) = loss_fn(model, batch)``: lets ``functional_call`` swap the parameters of ``model``
    while the user's loss function calls it however it likes."""

    def __init__(self, model: nn.Module, loss_fn: LossFn) -> None:
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn

    def forward(self, batch: Any) -> torch.Tensor:
        return self.loss_fn(self.model, batch)


class ProsPr(Importance):
    """Meta-gradient importance ``|dL(theta_K(c)) / dc|`` at ``c = 1`` (see the module docstring)."""

    name = "prospr"
    needs_data = True

    def __init__(
        self,
        loss_fn: LossFn,
        batches: Iterable[Any],
        inner_steps: int = 3,
        inner_lr: float = 0.5,
        momentum: float = 0.9,
        detach_first_momentum: bool = True,
    ) -> None:
        super().__init__()
        if inner_steps < 0:
            raise ValueError(f"inner_steps must be >= 0, got {inner_steps}")
        if not inner_lr > 0 or not 0 <= momentum < 1:
            raise ValueError(f"need inner_lr > 0 and momentum in [0, 1), got {inner_lr}, {momentum}")
        self.loss_fn, self.batches = loss_fn, batches
        self.inner_steps, self.inner_lr, self.momentum = inner_steps, inner_lr, momentum
        self.detach_first_momentum = bool(detach_first_momentum)

    def scores(self, model: nn.Module, names: list[str], sparsity: float) -> Scores:
        # A copy: train-mode normalisation layers update running statistics during the inner steps.
        wrapper = _LossModule(clone_model(model).train(), self.loss_fn)
        return self._meta_gradient(wrapper, names)

    def _meta_gradient(self, wrapper: _LossModule, names: list[str]) -> Scores:
        # Keys as functional_call expects them (the raw names, ``*_orig`` for already-masked models).
        raw = {f"model.{n}": p.detach() for n, p in wrapper.model.named_parameters()}
        key_of = {parameter_name(k[len("model.") :]): k for k in raw}
        installed = {
            parameter_name(k[len("model.") :]): b.detach() for k, b in wrapper.named_buffers() if k.endswith("_mask")
        }
        masks = {n: torch.ones_like(raw[key_of[n]], requires_grad=True) for n in names}
        theta = {k: v.clone().requires_grad_(True) for k, v in raw.items()}
        for n in names:
            theta[key_of[n]] = raw[key_of[n]] * masks[n]
        velocity: dict[str, torch.Tensor | None] = {k: None for k in theta}
        stream = batch_stream(self.batches)
        for step in range(self.inner_steps + 1):
            loss = functional_call(wrapper, theta, (next(stream),))
            if not torch.isfinite(loss):
                raise RuntimeError(
                    f"ProsPr inner loss diverged at step {step} ({float(loss)}); lower inner_lr (now {self.inner_lr})"
                )
            if step == self.inner_steps:
                grads = torch.autograd.grad(loss, [masks[n] for n in names], allow_unused=True)
                self.backward_passes += 1
                return {
                    n: (torch.zeros_like(masks[n]) if g is None else g.detach().abs()) for n, g in zip(names, grads)
                }
            keys = [k for k, v in theta.items() if v.requires_grad]
            grads = torch.autograd.grad(loss, [theta[k] for k in keys], create_graph=True, allow_unused=True)
            self.backward_passes += 1
            for k, g in zip(keys, grads):
                if g is None:
                    continue
                # A pruned entry of an already-masked model must stay at zero in the inner loop too.
                mask = installed.get(parameter_name(k[len("model.") :]))
                g = g if mask is None else g * mask
                previous = velocity[k]
                if previous is None:  # the first step starts the buffer (see the module docstring)
                    v = g.detach().clone() if self.detach_first_momentum and self.momentum else g
                else:
                    v = self.momentum * previous + g
                velocity[k] = v
                theta[k] = theta[k] - self.inner_lr * v
        raise AssertionError("unreachable")
