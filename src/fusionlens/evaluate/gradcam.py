"""Per-modality Seg-Grad-CAM (LMD appendix E.3, eqs. 16-19).

Seg-Grad-CAM (eqs. 16-17 with ``y^c`` replaced by ``sum_{(i,j) in R} y_ij``) weights each channel ``k`` of a layer's
activation ``A`` by the spatial mean of the gradient of the region-of-interest score:
``alpha_k = (1/Z) sum_ij d(sum_R y)/dA^k_ij``. The modality version (eqs. 18-19) keeps these weights -- gradients of
the original network at the actual input -- and replaces the activation by one modality's component of it from the
decomposition: ``L_m = ReLU(sum_k alpha_k A_m^k)``, where ``A_m`` is what ``decompose(..., layers=[name])`` reports
for modality ``m`` (the paper's ``A(0_c, x_r) - A(0_c, 0_r)`` of the linearized network, its bias part removed).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_flatten

from fusionlens.spec import ModelSpec, as_spec, eval_mode


def _first_tensor(output: Any) -> torch.Tensor | None:
    return next((x for x in tree_flatten(output)[0] if isinstance(x, torch.Tensor)), None)


def layer_gradient(module: nn.Module, inputs: Mapping[str, torch.Tensor], forward_kwargs: Mapping[str, Any] | None,
                   layer: str, roi: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Activation of submodule ``layer`` of ``module`` (whose forward returns the studied tensor ``y``) and the
    gradient of ``sum_{R} y`` (``roi``: bool/float mask broadcastable to ``y``; ``None`` = every pixel) with respect
    to it, from one plain forward/backward in eval mode (training flags and hooks restored, also on error)."""
    modules = dict(module.named_modules())
    if layer not in modules:
        raise ValueError(f"layer {layer!r} not found (some valid names: {list(modules)[1:8]})")
    captured: list[torch.Tensor] = []

    def hook(_m: nn.Module, _a: Any, out: Any) -> None:
        t = _first_tensor(out)
        if t is not None:
            captured.append(t)

    handle = modules[layer].register_forward_hook(hook)
    try:
        with torch.enable_grad(), eval_mode(module):
            y = module(**inputs, **dict(forward_kwargs or {}))
            if not captured:
                raise ValueError(f"layer {layer!r} produced no tensor output in the forward pass")
            act = captured[-1]
            if act.dim() != 4:
                raise ValueError(f"layer {layer!r} gives a {act.dim()}-D activation; Grad-CAM needs (B, C, H, W)")
            if not act.requires_grad:
                raise ValueError(f"layer {layer!r}'s activation does not depend on parameters or inputs with grad")
            if roi is not None:
                y = y * roi.to(y.dtype)
            (grad,) = torch.autograd.grad(y.sum(), act)
    finally:
        handle.remove()
    return act.detach(), grad.detach()


def seg_grad_cam(model: ModelSpec | nn.Module, batch: Any, layer: str, roi: torch.Tensor | None = None, *,
                 level: str = "input", rules: str = "paper", bias: str = "local") -> dict[str, torch.Tensor]:
    """Seg-Grad-CAM of the region ``roi`` of the studied output at module ``layer`` (a module path of the user's
    model): ``"total"`` (eq. 16 on the full activation) and one map ``(B, H, W)`` per modality and the bias
    component (eq. 18 on that component's activation).

    Args:
        model: a :class:`~fusionlens.spec.ModelSpec` (or a model that describes itself).
        batch: one batch as the spec's ``inputs`` takes it.
        roi: bool/float mask broadcastable to the studied output; ``None`` = every pixel.
        level: ``"input"`` (default: ``layer`` may be anywhere in the model) or ``"fusion"`` (``layer`` after the
            fusion point).
    """
    spec = as_spec(model)
    names = dict(spec.model.named_modules())
    if layer not in names or not layer:
        raise ValueError(f"layer {layer!r} not found in {type(spec.model).__name__} "
                         f"(some valid names: {list(names)[1:8]})")
    subject = spec.subject(level)
    x = subject.prepare(batch)
    path = subject.layer_name(layer)
    act, grad = layer_gradient(subject.module, x.inputs, x.kwargs, path, roi)
    alpha = grad.mean(dim=(2, 3), keepdim=True)  # eq. 17/19: Z = H * W
    d = subject.decompose(x, rules=rules, layers=[path], bias=bias)
    parts = d.layer(path)
    cams = {name: torch.relu((alpha * parts[name]).sum(1)) for name in d.names}
    cams["total"] = torch.relu((alpha * act).sum(1))
    return cams
