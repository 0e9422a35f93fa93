"""Rules for composite ops that model code calls as one function: ``nn.MultiheadAttention``'s
``F.multi_head_attention_forward``, ``F.normalize`` (cosine attention), vector norms and the magnitude of complex
tensors (degree-1 homogeneous functions, split by Euler's identity).

Same contract as :mod:`fusionlens.decompose.rules`: ``rule(engine, func, args, kwargs, total) -> parts``.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from ._stream import Stream
from .rules import _arg, _constant
from .rules_nonlinear import activation

_MHA_SIGNATURE = inspect.signature(F.multi_head_attention_forward)
_MHA_CONSTANTS = ("in_proj_weight", "in_proj_bias", "bias_k", "bias_v", "out_proj_weight", "out_proj_bias",
                  "q_proj_weight", "k_proj_weight", "v_proj_weight", "key_padding_mask", "attn_mask", "static_k",
                  "static_v")


def multi_head_attention(engine: Any, func: Callable, args: tuple, kwargs: dict, total: Any) -> Any:
    """``F.multi_head_attention_forward`` (every ``nn.MultiheadAttention`` with a decomposed input reaches it): the
    block ``out_proj(softmax(q k^T / sqrt(d) + masks) v)`` with the attention weights computed on the totals and held
    constant, as for :func:`~fusionlens.decompose.rules.attention`. The output is then linear in the value's
    components: ``W_o (weights @ (W_v h_m))`` per head; the projection biases, ``bias_v`` and ``add_zero_attn``'s
    zero slot add nothing to a modality (they are the bias's). Queries and keys steer the weights only. Masks
    (``key_padding_mask``, ``attn_mask``, ``is_causal``), separate q/k/v projections and unbatched inputs are those
    of the function itself: the weights come from it."""
    bound = _MHA_SIGNATURE.bind(*args, **kwargs)
    bound.apply_defaults()
    a = bound.arguments
    if a["training"] and a["dropout_p"] > 0:
        raise RuntimeError(f"multi-head attention with dropout in training mode in {engine.where()}: decompose "
                           "needs eval behaviour")
    for name in _MHA_CONSTANTS:
        _constant(a[name], f"multi-head attention's {name}", engine)
    value = a["value"]
    engine.carried_only("multi_head_attention_forward", [value], [a["query"], a["key"]])
    if a["static_v"] is not None or not isinstance(value, Stream):
        return [None, None]  # the values are constants: so is the output (the weights carry no attribution)
    weights = engine.coefficient(lambda: _mha_weights(a))
    embed, heads = a["embed_dim_to_check"], a["num_heads"]
    v_proj = a["v_proj_weight"] if a["use_separate_proj_weight"] else a["in_proj_weight"][2 * embed:]
    unbatched = a["query"].dim() == 2
    parts = engine.parts(value)
    with torch._C.DisableTorchFunctionSubclass():
        if unbatched:
            parts = parts.unsqueeze(2)
        v = F.linear(parts, v_proj)  # (M, S, N, E): the projection's bias is the bias component's
        extra = int(a["bias_v"] is not None) + int(bool(a["add_zero_attn"]))
        if extra:  # bias_v's slot and the zero slot hold constants: nothing of a modality
            v = torch.cat([v, v.new_zeros((v.shape[0], extra, *v.shape[2:]))], 1)
        m, s, n, _ = v.shape
        v = v.reshape(m, s, n, heads, embed // heads).permute(0, 2, 3, 1, 4)  # (M, N, H, S, d)
        out = weights @ v  # (N, H, L, S) @ (M, N, H, S, d)
        out = out.permute(0, 3, 1, 2, 4).reshape(m, out.shape[3], n, embed)
        out = F.linear(out, a["out_proj_weight"])
    return [out.squeeze(2) if unbatched else out, None]


def _mha_weights(a: dict[str, Any]) -> torch.Tensor:
    """Per-head attention weights ``(N, H, L, S)`` of the call at the operating point, from the function itself."""
    call = {k: (v.fl_total() if isinstance(v, Stream) else v) for k, v in a.items()}
    call.update(need_weights=True, average_attn_weights=False, training=False, dropout_p=0.0)
    with torch._C.DisableTorchFunctionSubclass():
        weights = F.multi_head_attention_forward(**call)[1]
    return weights.unsqueeze(0) if a["query"].dim() == 2 else weights


def normalize(engine: Any, func: Callable, args: tuple, kwargs: dict, total: torch.Tensor) -> torch.Tensor:
    """``F.normalize`` (cosine attention, Swin v2; normalised embeddings): ``x / max(||x||_p, eps)`` with the norm
    taken from the total and held constant -- as the variance in Prop. 3 and RMSNorm's scale -- so the output is
    linear in every component and conserves exactly."""
    x = args[0]
    p, dim, eps = _arg(args, kwargs, 1, "p", 2.0), _arg(args, kwargs, 2, "dim", 1), _arg(args, kwargs, 3, "eps", 1e-12)
    for extra in (p, dim, eps):
        _constant(extra, "normalize's p, dim and eps", engine)
    if not isinstance(x, Stream):
        return None
    value = x.fl_total()
    with torch._C.DisableTorchFunctionSubclass():
        denominator = engine.coefficient(lambda: value.norm(p, dim, keepdim=True).clamp_min(eps))
        return engine.parts(x) / denominator


def homogeneous(engine: Any, func: Callable, args: tuple, kwargs: dict, total: torch.Tensor) -> torch.Tensor:
    """A function positively homogeneous of degree 1 (vector norms, ``|z|`` of a complex tensor): by Euler's
    identity ``f(A) = J_f(A) A``, so component ``m`` is the directional derivative ``J_f(A) h_m`` at the operating
    point (``torch.func.jvp``), and the components sum to ``f(A)`` exactly; for the 2-norm, ``<A/||A||, h_m>``.
    Where ``f`` has no derivative (``A = 0``, where ``f(A) = 0``) a component is 0. The point ``A`` is an
    operating-point quantity (frozen with the other coefficients)."""
    x = args[0]
    if any(isinstance(v, Stream) for v in list(args[1:]) + list(kwargs.values())):
        raise NotImplementedError(f"'{getattr(func, '__name__', func)}' with a decomposed argument other than its "
                                  f"input in {engine.where()}")
    order = _arg(args, kwargs, 1, "p", 2)
    if isinstance(order, str) and order != "fro":
        raise NotImplementedError(f"norm of order {order!r} in {engine.where()}: only vector norms and 'fro' have a "
                                  "rule (a nuclear or spectral norm is not a sum over elements)")
    point = x.fl_total()
    point = engine.coefficient(lambda: point, like=point)
    rest = args[1:]

    def f(t: torch.Tensor) -> torch.Tensor:
        return func(t, *rest, **kwargs)

    out = []
    with torch._C.DisableTorchFunctionSubclass():
        for part in engine.parts(x):
            tangent = torch.func.jvp(f, (point,), (part,))[1]
            out.append(torch.where(torch.isfinite(tangent), tangent, 0.0))
    return torch.stack(out)


def log_softmax(engine: Any, func: Callable, args: tuple, kwargs: dict, total: torch.Tensor) -> torch.Tensor:
    """``log_softmax(A) = A - logsumexp(A)`` (a classifier's log-probabilities, not attention weights): linearized
    along its Jacobian at the operating point, component ``m`` is ``h_m - <p, h_m>`` with ``p = softmax(A)`` held
    constant; the bias takes the rest, ``<p, A> - logsumexp(A)`` plus its own share. (Softmax itself stays a
    constant: as attention weights it only steers the values.)"""
    x = args[0]
    dim = _arg(args, kwargs, 1, "dim")
    if dim is None or isinstance(dim, Stream):
        raise NotImplementedError(f"log_softmax without an explicit dim in {engine.where()}")
    value = x.fl_total()
    with torch._C.DisableTorchFunctionSubclass():
        p = engine.coefficient(lambda: total.exp(), like=value)
        parts = engine.parts(x)
        return parts - (p * parts).sum(dim if dim < 0 else dim + 1, keepdim=True)


def absolute(engine: Any, func: Callable, args: tuple, kwargs: dict, total: torch.Tensor) -> torch.Tensor:
    """``abs``: the magnitude of a complex tensor is homogeneous (:func:`homogeneous`); of a real one, an
    activation (Prop. 1)."""
    x = args[0]
    if isinstance(x, Stream) and x.is_complex() and not total.is_complex():
        return homogeneous(engine, func, args, kwargs, total)
    return activation(engine, func, args, kwargs, total)
