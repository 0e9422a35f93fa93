"""Rule sets: which rule linearizes which op, and with which variant (Zennit's composite, for modalities).

``RuleSet.lookup`` first consults rules registered for a specific function object (``register_rule``), then the
op's name, so ``torch.relu``, ``Tensor.relu``, ``F.relu`` and ``Tensor.relu_`` all find the same rule.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from . import rules as lin
from . import rules_composite as comp
from . import rules_nonlinear as nl

_LINEAR_OPS = """
view view_as reshape reshape_as flatten unflatten permute transpose t T mT H mH data real squeeze unsqueeze expand
expand_as repeat tile repeat_interleave contiguous clone flip fliplr flipud roll rot90 narrow select __getitem__
index_select gather take take_along_dim split split_with_sizes chunk unbind tensor_split hsplit vsplit movedim
moveaxis swapaxes swapdims sum mean nansum cumsum trace diagonal diag_embed tril triu neg negative __neg__ __pos__
positive to float double half bfloat16 type type_as detach cpu cuda interpolate upsample upsample_nearest
upsample_bilinear avg_pool1d avg_pool2d avg_pool3d adaptive_avg_pool1d adaptive_avg_pool2d adaptive_avg_pool3d
pixel_shuffle pixel_unshuffle unfold fold masked_select conj resolve_conj resolve_neg imag conj_physical
view_as_real view_as_complex fft_fft fft_ifft fft_fft2 fft_ifft2 fft_fftn fft_ifftn fft_rfft fft_irfft fft_rfft2
fft_irfft2 fft_rfftn fft_irfftn fft_hfft fft_ihfft fft_hfft2 fft_ihfft2 fft_hfftn fft_ihfftn fft_fftshift
fft_ifftshift
"""
_AFFINE_OPS = """
add __add__ __radd__ sub subtract __sub__ __rsub__ rsub stack hstack vstack dstack
where masked_fill index_put index_add index_copy scatter scatter_add masked_scatter pad constant_pad_nd
_setitem_out _copy_out lerp
"""
_MULTILINEAR_OPS = "mul multiply __mul__ __rmul__ matmul __matmul__ __rmatmul__ mm bmm einsum dot mv outer inner " \
                   "tensordot kron bilinear"
_ACTIVATION_OPS = """
relu relu6 leaky_relu gelu silu sigmoid tanh elu selu celu softplus hardswish hardsigmoid hardtanh mish
logsigmoid softsign tanhshrink hardshrink softshrink threshold clamp clip clamp_min clamp_max exp exp2 expm1 log
log2 log10 log1p sqrt rsqrt square pow __pow__ __rpow__ reciprocal __rtruediv__ __rdiv__ sin cos erf
erfc rrelu sinh cosh atan asinh log_sigmoid prelu special_expit special_erf special_erfc
"""
_CONSTANT_OPS = "softmax _softmax floor ceil round trunc sign sgn heaviside new_zeros new_ones new_full " \
                "new_empty new_tensor zeros_like ones_like full_like empty_like rand_like randn_like randint_like"
_SELECT_OPS = "max min amax amin topk sort kthvalue median maximum minimum fmax fmin"
_POOL_OPS = "max_pool1d max_pool2d max_pool3d _max_pool1d _max_pool2d _max_pool3d max_pool1d_with_indices " \
            "max_pool2d_with_indices max_pool3d_with_indices adaptive_max_pool1d adaptive_max_pool2d " \
            "adaptive_max_pool3d adaptive_max_pool1d_with_indices adaptive_max_pool2d_with_indices " \
            "adaptive_max_pool3d_with_indices"


def _table() -> dict[str, Callable]:
    table: dict[str, Callable] = {}
    for names, rule in (
        (_LINEAR_OPS, lin.linear), (_AFFINE_OPS, lin.affine), (_MULTILINEAR_OPS, lin.multilinear),
        (_ACTIVATION_OPS, nl.activation), (_CONSTANT_OPS, lin.as_constant), (_SELECT_OPS, nl.reduce_select),
        (_POOL_OPS, nl.max_pool),
    ):
        table.update(dict.fromkeys(names.split(), rule))
    table.update({
        "conv1d": lin.convolution, "conv2d": lin.convolution, "conv3d": lin.convolution,
        "conv_transpose1d": lin.convolution, "conv_transpose2d": lin.convolution,
        "conv_transpose3d": lin.convolution, "linear": lin.dense,
        "cat": lin.concatenate, "concat": lin.concatenate, "concatenate": lin.concatenate,
        "div": lin.divide, "divide": lin.divide, "true_divide": lin.divide, "__truediv__": lin.divide,
        "__div__": lin.divide,
        "batch_norm": nl.batch_norm, "instance_norm": nl.instance_norm, "layer_norm": nl.layer_norm,
        "group_norm": nl.group_norm, "rms_norm": nl.rms_norm, "scatter_reduce": nl.scatter_reduce,
        "grid_sample": nl.grid_sample, "scaled_dot_product_attention": lin.attention,
        "dropout": lin.dropout, "dropout1d": lin.dropout, "dropout2d": lin.dropout, "dropout3d": lin.dropout,
        "alpha_dropout": lin.dropout, "feature_alpha_dropout": lin.dropout,
        "multi_head_attention_forward": comp.multi_head_attention, "normalize": comp.normalize,
        "norm": comp.homogeneous, "linalg_vector_norm": comp.homogeneous, "abs": comp.absolute,
        "__abs__": comp.absolute, "absolute": comp.absolute, "log_softmax": comp.log_softmax,
    })
    return table


_DEFAULT_TABLE = _table()
_USER_RULES: dict[Any, Callable] = {}

BN_RULES = ("identity", "uniform")
NORM_RULES = ("ratio", "identity", "uniform")
ACTIVATION_RULES = ("identity", "sum", "ratio")


@dataclass(frozen=True)
class LinearizationSettings:
    """The variant of each layer family's rule (the rows of the paper's tables).

    ``batch_norm``: Prop. 2's bias allocation (``identity``: the constant to the bias; ``uniform``: 1/K each).
    ``norm``: InstanceNorm/LayerNorm/GroupNorm mean rule (``ratio``: each component centred by its own mean).
    ``activation``: bias-splitting at activations (``identity``, ``sum`` C.1, ``ratio`` C.2).
    ``linearize_activations`` / ``linearize_norms``: switch linearization off for the ablation rows — each
    component then passes through the original nonlinear layer alone, so its outputs no longer sum to the layer's
    output; a later linearized activation returns that mismatch to the bias component (its residual term), a
    network without one ends unconserved.
    """

    batch_norm: str = "identity"
    norm: str = "ratio"
    activation: str = "identity"
    linearize_activations: bool = True
    linearize_norms: bool = True

    def __post_init__(self) -> None:
        for value, allowed, what in ((self.batch_norm, BN_RULES, "batch_norm"), (self.norm, NORM_RULES, "norm"),
                                     (self.activation, ACTIVATION_RULES, "activation")):
            if value not in allowed:
                raise ValueError(f"unknown {what} rule {value!r}; choose one of {allowed}")


@dataclass
class RuleSet:
    """Maps ops to rules. ``overrides`` (by function object or op name) take precedence over the defaults."""

    settings: LinearizationSettings = field(default_factory=LinearizationSettings)
    overrides: dict[Any, Callable] = field(default_factory=dict)

    def lookup(self, func: Callable, name: str) -> Callable | None:
        for table in (self.overrides, _USER_RULES):
            for key in (func, name):
                try:
                    if key in table:
                        return table[key]
                except TypeError:  # unhashable function objects
                    continue
        return _DEFAULT_TABLE.get(name)


def register_rule(op: Callable | str, rule: Callable) -> None:
    """Register ``rule(engine, func, args, kwargs, total) -> parts`` for ``op`` (a function object such as a custom
    sparse convolution or a torchvision op, or an op name) in every rule set; it takes precedence over the built-in
    rule of that op. The public registry for rules that live in other modules (e.g. one for
    ``torchvision.ops.roi_align``, linear in its input for constant boxes). See :mod:`fusionlens.decompose.rules`
    for the contract; ``fusionlens.decompose.rules.linear`` / ``affine`` / ``rules_nonlinear.activation`` are
    ready-made rules for linear, affine and elementwise ops."""
    if not callable(rule):
        raise ValueError(f"rule for {op!r} must be callable")
    _USER_RULES[op] = rule


def unregister_rule(op: Callable | str) -> None:
    """Remove the rule registered for ``op`` (nothing happens if there is none)."""
    _USER_RULES.pop(op, None)


PRESETS: dict[str, LinearizationSettings] = {
    "paper": LinearizationSettings(),
    "activations-only": LinearizationSettings(linearize_norms=False),
    "norms-only": LinearizationSettings(linearize_activations=False),
    "sum-splitting": LinearizationSettings(activation="sum"),
    "ratio-splitting": LinearizationSettings(activation="ratio"),
}
for _bn in BN_RULES:
    for _norm in NORM_RULES:
        PRESETS[f"bn-{_bn}+norm-{_norm}"] = LinearizationSettings(batch_norm=_bn, norm=_norm)


def resolve_rules(rules: str | RuleSet | LinearizationSettings) -> RuleSet:
    """``rules`` may be a preset name (``"paper"``, ``"bn-uniform+norm-identity"``, ``"sum-splitting"``, ...), a
    :class:`LinearizationSettings` or a :class:`RuleSet`. ``"naive"`` is handled by :func:`decompose` itself."""
    if isinstance(rules, RuleSet):
        return rules
    if isinstance(rules, LinearizationSettings):
        return RuleSet(settings=rules)
    if rules not in PRESETS:
        raise ValueError(f"unknown rules preset {rules!r}; choose one of {sorted(PRESETS) + ['naive']}")
    return RuleSet(settings=replace(PRESETS[rules]))
