"""Linearization rules: how one op splits its decomposed inputs into decomposed outputs.

Every rule has the signature ``rule(engine, func, args, kwargs, total) -> parts`` where ``total`` is the op's
ordinary output at the operating point (already computed with ``func``) and ``parts`` is a ``(M, *shape)`` tensor
of modality components, a list of those for tuple outputs (``None`` marks a constant output), or ``None`` when
the output is to be treated as a constant. The bias component is implicit — ``total`` minus the modalities — so a
rule states what each *modality* receives, and everything else (biases, added constants, ``F(0)`` terms, the
constant of a norm) is the bias's. ``engine.components(x)`` gives all ``M + 1`` components when a rule needs the
bias's own value (sum- and ratio-splitting).

Equation numbers refer to the LMD paper's appendix (``shared/papers/lmd-appendix.txt``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils._pytree import tree_flatten, tree_unflatten

from ._engine import carries_values
from ._stream import BlockedParts, Blocks, Stream

Rule = Callable[[Any, Callable, tuple, dict, Any], Any]


def _stack_leaves(outputs: list[Any]) -> Any:
    """Per-component outputs (each a tensor or tuple) -> one ``(K, ...)`` tensor per floating output leaf."""
    flat = [tree_flatten(o)[0] for o in outputs]
    stacked = []
    for leaf in zip(*flat):
        stacked.append(torch.stack(leaf) if carries_values(leaf[0]) else None)
    return stacked[0] if isinstance(outputs[0], torch.Tensor) else stacked


def linear(engine: Any, func: Callable, args: tuple, kwargs: dict, total: Any) -> Any:
    """A linear map with no constant term (reshape, indexing, pooling by average, interpolation, ``grid_sample``
    with a constant grid, sums, products with a constant): applied to every component (superposition, eq. 21)."""
    return _stack_leaves(engine.per_component(func, args, kwargs))


def affine(engine: Any, func: Callable, args: tuple, kwargs: dict, total: Any) -> Any:
    """An op affine in its decomposed inputs, ``f(h) = A h + c`` (``+``, ``cat`` with a constant, ``where``,
    ``pad`` with a value, scatter/``index_put`` of constants): ``f_m(h_m) = A h_m = f(h_m) - f(0)``, eq. 21–22;
    the constant ``c = f(0)`` stays in the bias component."""
    if getattr(func, "__name__", "") in _SUMS and len(args) == 2 and not kwargs and all(
            isinstance(a, Stream) for a in args):
        return _sum_of_streams(engine, func, args)
    outputs = engine.per_component(func, args, kwargs)
    zero = tree_flatten(engine.at_zero(func, args, kwargs))[0]
    stacked = _stack_leaves(outputs)
    for parts, const in zip(stacked if isinstance(stacked, list) else [stacked], zero):
        if parts is not None:
            parts -= const
    return stacked


# Sums and differences of two decomposed tensors (residual connections): no constant term, so every modality's
# component is the op on the two components, computed for all modalities in one call.
_SUMS = frozenset({"add", "__add__", "__radd__", "sub", "subtract", "__sub__", "__rsub__", "rsub"})


def _sum_of_streams(engine: Any, func: Callable, args: tuple) -> torch.Tensor:
    """``a + b`` / ``a - b`` of two streams: ``f(a_m, b_m)`` for all m at once (the same values as one call per
    modality: the op is elementwise), the operands' dimensions aligned behind the modality axis."""
    a, b = args
    rank = max(a.dim(), b.dim())
    pa, pb = engine.parts(a), engine.parts(b)
    pa = pa.reshape(pa.shape[0], *([1] * (rank - a.dim())), *pa.shape[1:])
    pb = pb.reshape(pb.shape[0], *([1] * (rank - b.dim())), *pb.shape[1:])
    with torch._C.DisableTorchFunctionSubclass():
        return func(pa, pb)


def concatenate(engine: Any, func: Callable, args: tuple, kwargs: dict, total: Any) -> Any:
    """``cat``: affine (eq. 21–22; constant operands belong to the bias). When every decomposed operand is wholly
    one modality's -- the single-modality branches meeting at the fusion layer -- each component is that modality's
    operands in place and zeros elsewhere, and the output records those slices (:class:`~._stream.Blocks`), so
    that a convolution right after computes each component on its own input channels only."""
    tensors = _arg(args, kwargs, 0, "tensors")
    dim = _arg(args, kwargs, 1, "dim", 0)
    if (not isinstance(total, torch.Tensor) or not isinstance(tensors, list | tuple) or not isinstance(dim, int)
            or any(isinstance(t, Stream) and t._fl_owner is None for t in tensors)
            or any(not isinstance(t, torch.Tensor) or t.dim() != total.dim() for t in tensors)):
        if (isinstance(total, torch.Tensor) and isinstance(tensors, list | tuple) and isinstance(dim, int)
                and all(isinstance(t, torch.Tensor) and t.dim() == total.dim() for t in tensors)):
            # one concatenation of the components; a constant operand's slots are zero (it is the bias's)
            m = engine.num_modalities
            parts = [engine.parts(t) if isinstance(t, Stream) else engine.zeros((m, *t.shape), total)
                     for t in tensors]
            with torch._C.DisableTorchFunctionSubclass():
                return torch.cat(parts, dim % total.dim() + 1)
        return affine(engine, func, args, kwargs, total)
    dim %= total.dim()
    parts = engine.zeros((engine.num_modalities, *total.shape), total)
    spans, start = [], 0
    for t in tensors:
        stop = start + t.shape[dim]
        if isinstance(t, Stream):
            parts[t._fl_owner].narrow(dim, start, stop - start).copy_(t.fl_total())
            spans.append((start, stop, t._fl_owner))
        start = stop
    return BlockedParts(parts, Blocks(dim, tuple(spans)))


def _arg(args: tuple, kwargs: dict, index: int, name: str, default: Any = None) -> Any:
    if len(args) > index:
        return args[index]
    return kwargs.get(name, default)


def _constant(value: Any, what: str, engine: Any) -> Any:
    if isinstance(value, Stream):
        raise NotImplementedError(f"{what} must not depend on a modality input in {engine.where()}")
    return value


def convolution(engine: Any, func: Callable, args: tuple, kwargs: dict, total: Any) -> torch.Tensor:
    """Convolution (1–3-d, transposed): linear in its input for a constant weight; the layer's bias belongs to the
    bias component (eq. 21). The modalities run as one batched call -- or, on a concatenation of single-modality
    inputs (the fusion layer), each modality on its own input channels only (the others are zero there)."""
    x = args[0]
    weight = _constant(_arg(args, kwargs, 1, "weight"), "the convolution weight", engine)
    _constant(_arg(args, kwargs, 2, "bias"), "the convolution bias", engine)
    rest = args[3:]
    call_kwargs = {k: v for k, v in kwargs.items() if k not in ("weight", "bias")}
    parts = engine.parts(x)
    blocked = _blocked_convolution(engine, func, x, parts, weight, rest, call_kwargs, total)
    if blocked is not None:
        return blocked
    batched = parts.dim() == weight.dim() + 1
    flat = parts.flatten(0, 1) if batched else parts
    with torch._C.DisableTorchFunctionSubclass():
        out = func(flat, weight, None, *rest, **call_kwargs)
    return out.unflatten(0, parts.shape[:2]) if batched else out


def _blocked_convolution(engine: Any, func: Callable, x: Any, parts: torch.Tensor, weight: torch.Tensor,
                         rest: tuple, call_kwargs: dict, total: torch.Tensor) -> torch.Tensor | None:
    """Component ``k`` of a convolution of ``x`` whose components are zero outside known input-channel spans:
    the convolution of those channels with the matching slice of the weight (exact: the other channels add
    zeros). ``None`` when ``x`` has no such spans or the convolution is grouped."""
    blocks = getattr(x, "_fl_blocks", None)
    channel = parts.dim() - weight.dim()  # 1 for a batch, 0 for one unbatched input
    groups = rest[3] if len(rest) > 3 else call_kwargs.get("groups", 1)
    if blocks is None or blocks.dim != channel or groups != 1 or channel not in (0, 1):
        return None
    in_dim = 0 if "transpose" in getattr(func, "__name__", "") else 1  # input channels of the weight
    out = []
    for k in range(engine.num_modalities):
        spans = [(a, b) for a, b, owner in blocks.spans if owner == k]
        if not spans:
            out.append(engine.zeros(total.shape, total))
            continue
        if len(spans) == 1:
            (a, b), = spans
            xk, wk = parts[k].narrow(channel, a, b - a), weight.narrow(in_dim, a, b - a)
        else:
            index = torch.cat([torch.arange(a, b, device=weight.device) for a, b in spans])
            xk, wk = parts[k].index_select(channel, index), weight.index_select(in_dim, index)
        with torch._C.DisableTorchFunctionSubclass():
            out.append(func(xk, wk, None, *rest, **call_kwargs))
    return torch.stack(out)


def dense(engine: Any, func: Callable, args: tuple, kwargs: dict, total: Any) -> torch.Tensor:
    """``F.linear``: ``y_m = W h_m`` for every modality; ``b`` belongs to the bias component (eq. 21)."""
    weight = _constant(_arg(args, kwargs, 1, "weight"), "the linear weight", engine)
    _constant(_arg(args, kwargs, 2, "bias"), "the linear bias", engine)
    with torch._C.DisableTorchFunctionSubclass():
        return F.linear(engine.parts(args[0]), weight)


def multilinear(engine: Any, func: Callable, args: tuple, kwargs: dict, total: Any) -> Any:
    """Products (``*``, ``@``, ``einsum``, ``bmm``). With one decomposed factor the op is linear in it. With ``n``
    decomposed factors ``X_i = b_i + M_i`` (bias component ``b_i``, modality sum ``M_i``: gating, SE blocks,
    attention scores), the product is a sum of terms, one component from each factor; a term is shared equally by
    the modality factors in it, and the bias is not a player: ``h_k * b_2`` (a modality scaled by a constant) is all
    modality ``k``'s, ``h_k * h_m`` is split half and half, only ``b_1 * b_2`` is the bias's. Computed as the path
    integral ``sum_j int_0^1 f(b_1 + t M_1, .., h_{j,k}, .., b_n + t M_n) dt`` (exact by Gauss-Legendre: the
    integrand is a polynomial of degree n - 1 in t; for two factors, ``x_k (g_b + g_M / 2) + (x_b + x_M / 2) g_k``).
    Linear in the components with ``b_i``, ``M_i`` frozen at the operating point, and conserving: the modalities
    sum to ``f - f(b_1, .., b_n)``."""
    leaves, spec = tree_flatten((args, kwargs))
    positions = [i for i, x in enumerate(leaves) if isinstance(x, Stream)]
    if len(positions) == 1:
        return linear(engine, func, args, kwargs, total)
    m = engine.num_modalities
    current = [x.fl_total() if isinstance(x, Stream) else x for x in leaves]

    def split() -> list[tuple[torch.Tensor, torch.Tensor]]:
        out = []
        for i in positions:
            modalities = leaves[i].fl_parts(m).sum(0)
            out.append((current[i] - modalities, modalities))
        return out

    frozen = engine.coefficient(split, like=[(current[i], current[i]) for i in positions])
    nodes, weights = _gauss_legendre((len(positions) + 1) // 2)
    acc = None
    for t, w in zip(nodes, weights):
        base = list(current)
        for i, (b, mods) in zip(positions, frozen):
            base[i] = b + t * mods
        for j in positions:
            parts = leaves[j].fl_parts(m)
            outs = []
            for k in range(m):
                call = list(base)
                call[j] = parts[k]
                a, kw = tree_unflatten(call, spec)
                with torch._C.DisableTorchFunctionSubclass():
                    outs.append(func(*a, **kw))
            stacked = torch.stack(outs) if w == 1.0 else w * torch.stack(outs)
            acc = stacked if acc is None else acc + stacked
    return acc


def _gauss_legendre(count: int) -> tuple[list[float], list[float]]:
    """Nodes and weights on [0, 1] integrating polynomials of degree up to ``2 count - 1`` exactly."""
    import numpy as np

    x, w = np.polynomial.legendre.leggauss(count)
    return [float((xi + 1) / 2) for xi in x], [float(wi / 2) for wi in w]


def divide(engine: Any, func: Callable, args: tuple, kwargs: dict, total: Any) -> Any:
    """``a / b``: linear in ``a`` for a constant ``b``; ``c / b`` is the elementwise nonlinearity ``c/x`` (Prop. 1);
    with both decomposed, ``a * (1/b)`` by the product rule."""
    a, b = args[0], args[1] if len(args) > 1 else kwargs["other"]
    if not isinstance(b, Stream):
        return linear(engine, func, args, kwargs, total)
    reciprocal = engine.dispatch(torch.reciprocal, (b,), {})
    if not isinstance(a, Stream):
        return (reciprocal * a).fl_parts(engine.num_modalities)
    return multilinear(engine, torch.mul, (a, reciprocal), {}, total)


def as_constant(engine: Any, func: Callable, args: tuple, kwargs: dict, total: Any) -> None:
    """Treat the output as a constant at the operating point (softmax attention weights, piecewise-constant
    functions such as ``floor``): the default the issue asks for. The alternative — linearizing the softmax
    around its input — would make every downstream product bilinear in the modalities."""
    return None


def attention(engine: Any, func: Callable, args: tuple, kwargs: dict, total: Any) -> Any:
    """``F.scaled_dot_product_attention``: the weights ``softmax(QK^T/sqrt(d) + mask)`` are computed on the totals
    and held constant, so the output ``weights @ V`` is linear in ``V``'s components. Queries and keys then carry
    no attribution of their own (documented limitation; see :func:`as_constant`)."""
    weights = engine.coefficient(lambda: _attention_weights(args, kwargs))
    engine.carried_only("scaled_dot_product_attention", [args[2]], list(args[:2]))
    v_parts = engine.parts(args[2])
    return None if v_parts is None else weights @ v_parts


def _attention_weights(args: tuple, kwargs: dict) -> torch.Tensor:
    q, k, v = (a.fl_total() if isinstance(a, Stream) else a for a in args[:3])
    mask = _arg(args, kwargs, 3, "attn_mask")
    is_causal = _arg(args, kwargs, 5, "is_causal", False)
    scale = kwargs.get("scale") or q.shape[-1] ** -0.5
    with torch._C.DisableTorchFunctionSubclass():
        scores = q @ k.transpose(-2, -1) * scale
        if is_causal:
            causal = torch.ones(scores.shape[-2:], dtype=torch.bool, device=q.device).tril()
            scores = scores.masked_fill(~causal, float("-inf"))
        if mask is not None:
            mask = mask.fl_total() if isinstance(mask, Stream) else mask
            scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
        return scores.softmax(-1)


def dropout(engine: Any, func: Callable, args: tuple, kwargs: dict, total: Any) -> Any:
    """Dropout and friends decompose with their evaluation behaviour (identity)."""
    if _arg(args, kwargs, 2, "training", False):
        raise RuntimeError(f"dropout in training mode in {engine.where()}: decompose needs eval behaviour")
    return engine.parts(args[0]).clone()
