"""Rules for the layers that LMD linearizes at the operating point: activations (Prop. 1, appendix C), batch
normalization (Prop. 2), instance/layer/group normalization (Prop. 3), and selections (max-pooling and friends).

The behaviour of activation and normalization rules is set by the rule set's :class:`LinearizationSettings`
(``engine.rules.settings``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from ._stream import Stream
from .rules import _arg, _stack_leaves, affine


def _plain_call(func: Callable, *args: Any, **kwargs: Any) -> Any:
    with torch._C.DisableTorchFunctionSubclass():
        return func(*args, **kwargs)


def secant_slope(output: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """Prop. 1: ``c = F(A) / A`` with a safe division — where ``|A|`` is at the rounding floor the slope is 0 and
    ``F(A)`` is left to the bias component by the caller, so no epsilon enters the sum."""
    tiny = torch.finfo(value.dtype).eps ** 2
    safe = value.abs() > tiny
    return torch.where(safe, output / value, 0.0)  # the quotients at the floor (inf, nan) are discarded


def chord_slope(func: Callable, args: tuple, kwargs: dict, output: torch.Tensor, value: torch.Tensor,
                at_zero: torch.Tensor) -> torch.Tensor:
    """Prop. 1 for an activation with ``F(0) != 0`` (sigmoid, softplus, exp, cos, clamp with a positive floor):
    the slope of the chord through ``(0, F(0))`` and ``(A, F(A))``, ``c = (F(A) - F(0)) / A``, with ``F(0)`` the
    bias's. The chord through the origin, ``F(A) / A``, grows without bound as ``A -> 0`` (a component a million
    times the output); this one tends to ``F'(0)``. Where ``|A|`` is below ``tau = sqrt(eps)`` of the dtype --
    where ``F(A) - F(0)`` is mostly rounding -- the chord ends at ``+-tau`` instead (the sign of ``A``), so the
    slope stays within the range of ``F'`` near 0 and float32 agrees with float64."""
    tau = torch.finfo(value.dtype).eps ** 0.5
    small = value.abs() < tau
    end = torch.where(value < 0, -tau, tau)
    if small.any():
        tensor_args = any(isinstance(a, torch.Tensor) for a in list(args) + list(kwargs.values()))
        if tensor_args:  # F's parameters vary by element: evaluate it at every chord end
            at_end = _plain_call(func, end, *args, **kwargs)
        else:  # elementwise with scalar parameters: F(+tau) and F(-tau) serve every element
            ends = _plain_call(func, torch.tensor([tau, -tau], dtype=value.dtype, device=value.device), *args,
                               **kwargs)
            at_end = torch.where(value < 0, ends[1], ends[0])
        output = torch.where(small, at_end, output)
        value = torch.where(small, end, value)
    return (output - at_zero) / value


def split_bias_sum(parts: torch.Tensor, bias: int) -> torch.Tensor:
    """Sum-splitting (appendix C.1, eq. 13), generalised to M modalities: where the bias pre-activation ``h_b``
    has the sign of some but not all modalities, ``h_b`` is moved (split equally) to the modalities that share
    its sign — for M = 2 exactly the Cam-/Rad-conditions — and the bias keeps nothing there. Evaluated per
    neuron, as the appendix defines it."""
    mods, hb = parts[:bias], parts[bias]
    share = (torch.sign(mods) == torch.sign(hb)) & (hb != 0)
    count = share.sum(0)
    moved = (count >= 1) & (count < mods.shape[0])
    weight = torch.where(moved, share / count.clamp(min=1), torch.zeros_like(hb))
    out = parts.clone()
    out[:bias] = mods + weight * hb
    out[bias] = torch.where(moved, torch.zeros_like(hb), hb)
    return out


def split_bias_ratio(parts: torch.Tensor, bias: int) -> torch.Tensor:
    """Ratio-splitting (appendix C.2), generalised to M modalities. Where all modalities share one sign:
    if ``h_b`` has that sign too (Ratio-Condition) it is re-partitioned in proportion to ``|h_m|``; if it has the
    opposite sign (Ratio-Condition2) the shares are swapped, ``(sum|h| - |h_m|) / ((M-1) sum|h|)``, which for
    M = 2 is the appendix's ``1 - alpha`` exchange. Elsewhere the identity rule applies. Shares sum to one, so
    eq. (7) is preserved."""
    mods, hb = parts[:bias], parts[bias]
    m = mods.shape[0]
    pos, neg = (mods > 0).all(0), (mods < 0).all(0)
    same = (pos & (hb > 0)) | (neg & (hb < 0))
    opposite = (pos & (hb < 0)) | (neg & (hb > 0))
    mag = mods.abs()
    total = mag.sum(0)
    safe_total = torch.where(total > 0, total, torch.ones_like(total))
    proportional = mag / safe_total
    swapped = (total - mag) / (safe_total * (m - 1)) if m > 1 else torch.ones_like(mag)
    weight = torch.where(same, proportional, torch.where(opposite, swapped, torch.zeros_like(mag)))
    out = parts.clone()
    out[:bias] = mods + weight * hb
    out[bias] = torch.where(same | opposite, torch.zeros_like(hb), hb)
    return out


_SPLITS: dict[str, Callable[[torch.Tensor, int], torch.Tensor] | None] = {
    "identity": None, "sum": split_bias_sum, "ratio": split_bias_ratio,
}


def activation(engine: Any, func: Callable, args: tuple, kwargs: dict, total: torch.Tensor) -> torch.Tensor:
    """Elementwise nonlinearity ``F`` (ReLU, GELU, SiLU, sigmoid, tanh, clamp, ...), Prop. 1:
    ``f(h_m) = c * h_m`` with the secant slope ``c = F(A)/A`` at the operating point ``A`` (for ``F(0) != 0`` the
    chord through ``(0, F(0))``, :func:`chord_slope`), after the activation's bias-splitting variant (identity,
    sum C.1, ratio C.2). The residual ``F(A) - c * sum_m h_m`` (the bias's own share, ``F(0)``, float rounding)
    goes to the bias component, so components sum to ``F(A)`` exactly."""
    x = args[0]
    others = [a for a in list(args[1:]) + list(kwargs.values()) if isinstance(a, Stream)]
    if not isinstance(x, Stream) or others:
        raise NotImplementedError(
            f"elementwise op '{getattr(func, '__name__', func)}' with more than one decomposed operand "
            f"in {engine.where()}"
        )
    settings = engine.rules.settings
    if not settings.linearize_activations:  # ablation row: each modality through the original function
        return _stack_leaves([_plain_call(func, p, *args[1:], **kwargs) for p in engine.parts(x)])
    split = _SPLITS[settings.activation]
    parts = engine.parts(x)
    if split is not None:
        # The share of the bias each modality receives is an operating-point quantity: recorded with the
        # slopes, so that under frozen coefficients the split is that of the clean input (a fixed affine map).
        parts = parts + engine.coefficient(lambda: split(engine.components(x), engine.num_modalities)[: len(parts)]
                                           - parts)
    slope = engine.coefficient(lambda: _slope(func, args[1:], kwargs, total, x.fl_total()))
    # The bias receives c * h_b plus F(A) - c * A (F(0) where the slope is 0): exactly total - sum of these.
    return slope * parts[: engine.num_modalities]


_AT_ZERO: dict[Any, torch.Tensor | None] = {}


def _value_at_zero(func: Callable, args: tuple, kwargs: dict, value: torch.Tensor) -> torch.Tensor | None:
    """``F(0)`` of an activation with scalar parameters (memoized: the same few activations recur in every layer);
    ``None`` when it is 0 or not finite (the chord through the origin applies)."""
    try:
        key = (func, value.dtype, value.device, args, tuple(sorted(kwargs.items())))
        hash(key)
    except TypeError:
        key = None
    if key is not None and key in _AT_ZERO:
        return _AT_ZERO[key]
    at_zero = _plain_call(func, value.new_zeros(()), *args, **kwargs)
    result = at_zero if bool(torch.isfinite(at_zero)) and bool(at_zero != 0) else None
    if key is not None and len(_AT_ZERO) < 1024:
        _AT_ZERO[key] = result
    return result


def _slope(func: Callable, args: tuple, kwargs: dict, output: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """The chord through the origin where ``F(0)`` is 0 or not finite (``log``, ``rsqrt``: there is no chord through
    ``(0, F(0))``), else the chord through ``(0, F(0))``."""
    if getattr(func, "__name__", "") == "relu":
        # ReLU(A)/A is exactly 1 where A > 0 and 0 elsewhere: secant_slope's values, in one comparison
        return (value > torch.finfo(value.dtype).eps ** 2).to(value.dtype)
    if value.is_complex():
        return secant_slope(output, value)
    tensor_args = any(isinstance(a, torch.Tensor) for a in list(args) + list(kwargs.values()))
    if tensor_args:
        at_zero = _plain_call(func, value.new_zeros(value.shape), *args, **kwargs)
    else:
        at_zero = _value_at_zero(func, args, kwargs, value)
        if at_zero is None:
            return secant_slope(output, value)
    through = torch.isfinite(at_zero) & (at_zero != 0)
    if not through.any():
        return secant_slope(output, value)
    chord = chord_slope(func, args, kwargs, output, value, at_zero)
    return chord if bool(through.all()) else torch.where(through, chord, secant_slope(output, value))


def _norm_core(engine: Any, parts: torch.Tensor, value: torch.Tensor, groups: tuple[int, ...], eps: float,
               rule: str) -> torch.Tensor:
    """Normalise components with the variance of the total (Prop. 3). ``groups`` reshapes one tensor so that its
    last axis holds the elements sharing one mean/variance. Mean rules: ``ratio`` centres each component by its
    own mean (eq. of B.3); ``identity`` gives the whole mean to the bias; ``uniform`` gives each of the K
    components ``1/K`` of it."""
    k = engine.num_components
    grouped_value = value.reshape(groups)
    mean, inv_std = engine.coefficient(lambda: (
        grouped_value.mean(-1, keepdim=True),
        torch.rsqrt(grouped_value.var(-1, unbiased=False, keepdim=True) + eps),
    ))
    grouped = parts.reshape(parts.shape[0], *groups)
    if rule == "ratio":
        out = (grouped - grouped.mean(-1, keepdim=True)) * inv_std
    elif rule == "identity":  # the modalities are not centred: the whole mean is the bias's
        out = grouped * inv_std
    else:  # uniform
        out = (grouped - mean / k) * inv_std
    return out.reshape(parts.shape)


def _affine_tail(engine: Any, out: torch.Tensor, weight: Any, bias: Any, channel_dim: int | None,
                 rule: str) -> torch.Tensor:
    """Apply the norm's ``gamma`` to every component and its ``beta`` to the bias (identity/ratio) or ``1/K``
    to each component (uniform)."""
    def shaped(p: torch.Tensor) -> torch.Tensor:
        if channel_dim is None:
            return p
        shape = [1] * (out.dim() - 1)
        shape[channel_dim] = -1
        return p.view(shape)

    if weight is not None:
        out = out * shaped(weight)
    if bias is not None and rule == "uniform":
        out = out + shaped(bias) / engine.num_components
    return out


def _ablation_norm(engine: Any, func: Callable, args: tuple, kwargs: dict) -> torch.Tensor | None:
    if engine.rules.settings.linearize_norms:
        return None
    return _stack_leaves([_plain_call(func, p, *args[1:], **kwargs) for p in engine.parts(args[0])])


def batch_norm(engine: Any, func: Callable, args: tuple, kwargs: dict, total: torch.Tensor) -> torch.Tensor:
    """BatchNorm with running statistics (Prop. 2): ``y = s * h + t`` with ``s = gamma/sqrt(var+eps)`` and
    ``t = beta - s*mu``. Every component is scaled by ``s``; the constant ``t`` goes to the bias component
    (identity, ``delta_b = 1``) or ``t/K`` to each component (uniform)."""
    if _arg(args, kwargs, 5, "training", False):
        raise RuntimeError(f"batch_norm in training mode in {engine.where()}: decompose needs eval mode")
    ablated = _ablation_norm(engine, func, args, kwargs)
    if ablated is not None:
        return ablated
    mean, var = _arg(args, kwargs, 1, "running_mean"), _arg(args, kwargs, 2, "running_var")
    weight, bias = _arg(args, kwargs, 3, "weight"), _arg(args, kwargs, 4, "bias")
    eps = _arg(args, kwargs, 7, "eps", 1e-5)
    scale = torch.rsqrt(var + eps) * (weight if weight is not None else 1.0)
    shift = (bias if bias is not None else 0.0) - mean * scale
    return _affine_tail(engine, engine.parts(args[0]), scale, shift, 1, engine.rules.settings.batch_norm)


def instance_norm(engine: Any, func: Callable, args: tuple, kwargs: dict, total: torch.Tensor) -> torch.Tensor:
    """InstanceNorm with per-sample statistics, Prop. 3 (variance cached from the total); with running
    statistics it is a BatchNorm (Prop. 2)."""
    use_input_stats = _arg(args, kwargs, 5, "use_input_stats", True)
    if not use_input_stats:
        mean, var = _arg(args, kwargs, 1, "running_mean"), _arg(args, kwargs, 2, "running_var")
        return batch_norm(engine, func, (args[0], mean, var, _arg(args, kwargs, 3, "weight"),
                                         _arg(args, kwargs, 4, "bias"), False, 0.0, _arg(args, kwargs, 7, "eps", 1e-5)),
                          {}, total)
    ablated = _ablation_norm(engine, func, args, kwargs)
    if ablated is not None:
        return ablated
    x = args[0].fl_total()
    rule = engine.rules.settings.norm
    out = _norm_core(engine, engine.parts(args[0]), x, (*x.shape[:2], -1), _arg(args, kwargs, 7, "eps", 1e-5), rule)
    return _affine_tail(engine, out, _arg(args, kwargs, 3, "weight"), _arg(args, kwargs, 4, "bias"), 1, rule)


def layer_norm(engine: Any, func: Callable, args: tuple, kwargs: dict, total: torch.Tensor) -> torch.Tensor:
    """LayerNorm, Prop. 3 over the normalised trailing dimensions."""
    ablated = _ablation_norm(engine, func, args, kwargs)
    if ablated is not None:
        return ablated
    x = args[0].fl_total()
    shape = tuple(_arg(args, kwargs, 1, "normalized_shape"))
    lead = x.shape[: x.dim() - len(shape)]
    rule = engine.rules.settings.norm
    out = _norm_core(engine, engine.parts(args[0]), x, (*lead, math.prod(shape)), _arg(args, kwargs, 4, "eps", 1e-5),
                     rule)
    return _affine_tail(engine, out, _arg(args, kwargs, 2, "weight"), _arg(args, kwargs, 3, "bias"), None, rule)


def group_norm(engine: Any, func: Callable, args: tuple, kwargs: dict, total: torch.Tensor) -> torch.Tensor:
    """GroupNorm, Prop. 3 with statistics per (sample, group)."""
    ablated = _ablation_norm(engine, func, args, kwargs)
    if ablated is not None:
        return ablated
    x = args[0].fl_total()
    groups = _arg(args, kwargs, 1, "num_groups")
    rule = engine.rules.settings.norm
    out = _norm_core(engine, engine.parts(args[0]), x, (x.shape[0], groups, -1), _arg(args, kwargs, 4, "eps", 1e-5),
                     rule)
    return _affine_tail(engine, out, _arg(args, kwargs, 2, "weight"), _arg(args, kwargs, 3, "bias"), 1, rule)


def rms_norm(engine: Any, func: Callable, args: tuple, kwargs: dict, total: torch.Tensor) -> torch.Tensor:
    """RMSNorm: no centring, so with the scale cached from the total it is linear in every component (the scale is
    an operating-point quantity, frozen with the other coefficients)."""
    x = args[0].fl_total()
    shape = tuple(_arg(args, kwargs, 1, "normalized_shape"))
    dims = tuple(range(x.dim() - len(shape), x.dim()))
    eps = _arg(args, kwargs, 3, "eps") or torch.finfo(x.dtype).eps
    inv = engine.coefficient(lambda: torch.rsqrt(x.pow(2).mean(dims, keepdim=True) + eps))
    weight = _arg(args, kwargs, 2, "weight")
    out = engine.parts(args[0]) * inv
    return out * weight if weight is not None else out


# -- selections: the winner is chosen on the total and gathered from every component ---------------------------
def max_pool(engine: Any, func: Callable, args: tuple, kwargs: dict, total: Any) -> Any:
    """Max-pooling (1–3-d, adaptive): the winners' indices come from the total, and every component is gathered
    at them."""
    x = args[0]
    value = x.fl_total()
    dims = _pool_dims(func)
    indices_at = 2 if "adaptive" in getattr(func, "__name__", "") else 6
    call_kwargs = {k: v for k, v in kwargs.items() if k != "return_indices"}
    def winners() -> torch.Tensor:
        with torch._C.DisableTorchFunctionSubclass():
            return func(value, *args[1:indices_at], **call_kwargs, return_indices=True)[1]

    out_total = total[0] if isinstance(total, tuple) else total
    index = engine.coefficient(winners, like=out_total)
    parts = engine.parts(x)
    flat_index = index.flatten(-dims)
    picked = parts.flatten(-dims).gather(-1, flat_index.unsqueeze(0).expand(parts.shape[0], *flat_index.shape))
    out = picked.reshape(parts.shape[0], *index.shape)
    return [out, None] if isinstance(total, tuple) else out


def _pool_dims(func: Callable) -> int:
    name = getattr(func, "__name__", "")
    for d in (3, 2, 1):
        if f"{d}d" in name:
            return d
    raise NotImplementedError(f"cannot tell the pooling dimension of {name}")


def reduce_select(engine: Any, func: Callable, args: tuple, kwargs: dict, total: Any) -> Any:
    """``max``/``min``/``amax``/``amin``/``topk``/``sort``/``kthvalue``/``median`` along a dim: the selected
    entries of the total are gathered from every component (ties: the op's own index, or the first maximum)."""
    x = args[0]
    if not isinstance(x, Stream) or any(isinstance(a, Stream) for a in list(args[1:]) + list(kwargs.values())):
        return _elementwise_select(engine, func, args, kwargs, total)
    name = getattr(func, "__name__", "")
    value = x.fl_total()
    parts = engine.parts(x)
    if isinstance(total, torch.Tensor) and name in ("amax", "amin", "max", "min"):
        dims = _arg(args, kwargs, 1, "dim", None)
        keepdim = _arg(args, kwargs, 2, "keepdim", False)
        if dims is None or dims == ():
            dims = tuple(range(value.dim()))
        elif not isinstance(dims, tuple | list):
            dims = (dims,)
        dims = tuple(d % value.dim() for d in dims)
        moved = value.movedim(dims, tuple(range(-len(dims), 0))).flatten(-len(dims))
        pmoved = parts.movedim(tuple(d + 1 for d in dims), tuple(range(-len(dims), 0))).flatten(-len(dims))
        pick = engine.coefficient(lambda: moved.argmax(-1) if "max" in name else moved.argmin(-1),
                                  like=moved.select(-1, 0))
        out = pmoved.gather(-1, pick.unsqueeze(0).unsqueeze(-1).expand(parts.shape[0], *pick.shape, 1)).squeeze(-1)
        if keepdim:
            for d in sorted(dims):
                out = out.unsqueeze(d + 1)
        return out
    index = engine.coefficient(lambda: total[1], like=total[1])
    dim = _arg(args, kwargs, 2 if name in ("topk", "kthvalue") else 1, "dim", -1)
    dim = (dim if dim is not None else -1) % value.dim()
    keepdim = _arg(args, kwargs, 2, "keepdim", False) if name in ("max", "min", "median", "mode") else True
    idx = index if keepdim or name in ("topk", "sort") else index.unsqueeze(dim)
    out = parts.gather(dim + 1, idx.unsqueeze(0).expand(parts.shape[0], *idx.shape))
    if not (keepdim or name in ("topk", "sort")):
        out = out.squeeze(dim + 1)
    return [out, None]


def _elementwise_select(engine: Any, func: Callable, args: tuple, kwargs: dict, total: Any) -> Any:
    """``maximum(a, b)`` / ``minimum`` / ``fmax``: the winner of each element chosen on the totals, then the
    selection ``where(win, a, b)`` is affine in (a, b)."""
    a, b = args[0], args[1] if len(args) > 1 else kwargs["other"]
    at, bt = (t.fl_total() if isinstance(t, Stream) else t for t in (a, b))
    name = getattr(func, "__name__", "")
    win = engine.coefficient(lambda: (at >= bt) if "max" in name else (at <= bt))
    return affine(engine, torch.where, (win, a, b), {}, total)


def scatter_reduce(engine: Any, func: Callable, args: tuple, kwargs: dict, total: torch.Tensor) -> torch.Tensor:
    """``scatter_reduce`` (max over the points of a pillar, PointPillars). ``sum``/``mean`` are affine in
    (self, src). ``amax``/``amin`` are selections: each destination's winner — the first source equal to the
    reduced total, or ``self`` where it is kept — is found on the totals and each component is routed from it."""
    target, dim = args[0], _arg(args, kwargs, 1, "dim")
    index, src = _arg(args, kwargs, 2, "index"), _arg(args, kwargs, 3, "src")
    reduce = _arg(args, kwargs, 4, "reduce")
    include_self = _arg(args, kwargs, 5, "include_self", True)
    if reduce in ("sum", "mean"):
        return affine(engine, func, args, kwargs, total)
    if reduce not in ("amax", "amin"):
        raise NotImplementedError(f"scatter_reduce '{reduce}' on decomposed tensors in {engine.where()}")
    t_self = target.fl_total() if isinstance(target, Stream) else target
    t_src = src.fl_total() if isinstance(src, Stream) else src
    keep_self, winner = engine.coefficient(lambda: _scatter_winners(total, t_self, t_src, dim, index, include_self))
    k = engine.num_modalities
    # a constant operand contributes to the bias only, i.e. nothing to the modality slices
    self_parts = engine.parts(target)
    if self_parts is None:
        self_parts = engine.zeros((k, *total.shape), total)
    src_parts = engine.parts(src)
    if src_parts is None:
        src_parts = engine.zeros((k, *t_src.shape), total)
    with torch._C.DisableTorchFunctionSubclass():
        out = torch.where(keep_self, self_parts, torch.zeros_like(self_parts))
        routed = torch.where(winner, src_parts, torch.zeros_like(src_parts))
        return out.scatter_add(dim + 1, index.unsqueeze(0).expand(k, *index.shape), routed)


def _scatter_winners(total: torch.Tensor, t_self: torch.Tensor, t_src: torch.Tensor, dim: int, index: torch.Tensor,
                     include_self: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Where ``self`` is kept, and which single source element wins each destination of an amax/amin scatter."""
    with torch._C.DisableTorchFunctionSubclass():
        reached = torch.zeros_like(total, dtype=torch.bool).scatter(dim, index, True)
        keep_self = ~reached | ((t_self == total) if include_self else torch.zeros_like(reached))
        candidate = (t_src == total.gather(dim, index)) & ~keep_self.gather(dim, index)
        position = torch.arange(t_src.numel(), device=t_src.device).view(t_src.shape)
        big = torch.full_like(position, t_src.numel())
        first = big.new_full(total.shape, t_src.numel()).scatter_reduce(
            dim, index, torch.where(candidate, position, big), "amin", include_self=True)
        winner = candidate & (position == first.gather(dim, index))
    return keep_self, winner


def grid_sample(engine: Any, func: Callable, args: tuple, kwargs: dict, total: torch.Tensor) -> Any:
    """``grid_sample`` is linear in its input for a constant sampling grid (camera lifting)."""
    grid = _arg(args, kwargs, 1, "grid")
    if isinstance(grid, Stream):
        raise NotImplementedError(f"grid_sample with a grid that depends on a modality in {engine.where()}")
    from .rules import linear

    return linear(engine, func, args, kwargs, total)


__all__ = [
    "activation", "batch_norm", "instance_norm", "layer_norm", "group_norm", "rms_norm", "max_pool",
    "reduce_select", "scatter_reduce", "grid_sample", "secant_slope", "chord_slope", "split_bias_sum",
    "split_bias_ratio", "F",
]
