"""LMD rules against values worked out by hand (appendix B, C), plus the API's contract: restored model, errors."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fusionlens import decompose
from fusionlens.decompose import LinearizationSettings, UnsupportedOperationError, register_rule, unregister_rule
from fusionlens.decompose.rules_nonlinear import activation


class SumThen(nn.Module):
    """``op(camera + radar + b)``: the op sees components (camera, radar, b) — set by hand in each test."""

    def __init__(self, op, bias: float) -> None:
        super().__init__()
        self.op, self.b = op, bias
        self.eval()

    def forward(self, camera, radar):
        return self.op(camera + radar + self.b)


def _components(model, cam, rad, rules="paper"):
    d = decompose(model, {"camera": torch.tensor(cam), "radar": torch.tensor(rad)}, rules=rules)
    return [d.components[n].tolist() for n in ("camera", "radar", "bias")], d


def test_relu_identity_rule_keeps_components():
    comps, d = _components(SumThen(torch.relu, 0.5), [2.0, -3.0], [-1.0, 1.0])
    # element 0: total 1.5 > 0, slope 1; element 1: total -1.5, slope 0
    assert comps == [[2.0, 0.0], [-1.0, 0.0], [0.5, 0.0]]


def test_gelu_secant_slope():
    comps, _ = _components(SumThen(F.gelu, 0.5), [2.0], [-1.0])
    c = F.gelu(torch.tensor(1.5)).item() / 1.5  # Prop. 1: c = F(A)/A
    assert comps[0][0] == pytest.approx(2 * c) and comps[1][0] == pytest.approx(-c)
    assert comps[2][0] == pytest.approx(0.5 * c)


def test_zero_operating_point_sends_constant_to_bias():
    """A = 0 for sigmoid (F(0) = 0.5): F(0) is the bias's, and the modalities get the chord slope ~ F'(0) = 1/4."""
    comps, _ = _components(SumThen(torch.sigmoid, 0.0), [1.0], [-1.0])
    assert [c[0] for c in comps] == pytest.approx([0.25, -0.25, 0.5], abs=1e-4)
    comps, _ = _components(SumThen(torch.relu, 0.0), [1.0], [-1.0])  # F(0) = 0: the paper's slope 0/0 := 0
    assert comps == [[0.0], [0.0], [0.0]]


@pytest.mark.parametrize("cam, rad, bias, expected", [
    (2.0, -1.0, 0.5, [2.5, -1.0, 0.0]),    # bias shares the camera's sign only: Cam-condition, bias to camera
    (-1.0, 2.0, -0.5, [-1.5, 2.0, 0.0]),   # negative bias shares the camera's sign
    (1.0, 2.0, 0.5, [1.0, 2.0, 0.5]),      # both modalities share it: no condition, identity
])
def test_sum_splitting_by_hand(cam, rad, bias, expected):
    comps, _ = _components(SumThen(torch.relu, bias), [cam], [rad], rules="sum-splitting")
    assert [c[0] for c in comps] == pytest.approx(expected)


@pytest.mark.parametrize("cam, rad, bias, expected", [
    (1.0, 3.0, 2.0, [1.5, 4.5, 0.0]),      # Ratio-Condition: shares 1/4 and 3/4
    (1.0, 3.0, -2.0, [-0.5, 2.5, 0.0]),    # Ratio-Condition2: shares swapped, 3/4 and 1/4
    (1.0, -3.0, 4.0, [1.0, -3.0, 4.0]),    # modalities of opposite sign: identity
])
def test_ratio_splitting_by_hand(cam, rad, bias, expected):
    comps, _ = _components(SumThen(torch.relu, bias), [cam], [rad], rules="ratio-splitting")
    assert [c[0] for c in comps] == pytest.approx(expected)


class SumThenNorm(nn.Module):
    def __init__(self, norm: nn.Module) -> None:
        super().__init__()
        self.norm = norm
        self.eval()

    def forward(self, camera, radar):
        return self.norm(camera + radar)


@pytest.mark.parametrize("rule, expected", [
    ("ratio", [[-1.0, 1.0], [0.0, 0.0], [0.0, 0.0]]),
    ("identity", [[1.0, 3.0], [2.0, 2.0], [-4.0, -4.0]]),
    ("uniform", [[1 - 4 / 3, 3 - 4 / 3], [2 - 4 / 3, 2 - 4 / 3], [-4 / 3, -4 / 3]]),
])
def test_instance_norm_rules_by_hand(rule, expected):
    """Camera [1, 3] + radar [2, 2] = [3, 5]: mean 4, variance 1 (Prop. 3, variance from the total)."""
    model = SumThenNorm(nn.InstanceNorm1d(1, eps=0.0))
    cam, rad = torch.tensor([[[1.0, 3.0]]]), torch.tensor([[[2.0, 2.0]]])
    d = decompose(model, {"camera": cam, "radar": rad}, rules=LinearizationSettings(norm=rule))
    for name, want in zip(("camera", "radar", "bias"), expected):
        torch.testing.assert_close(d.components[name].flatten(), torch.tensor(want))


@pytest.mark.parametrize("rule", ["identity", "uniform"])
def test_batch_norm_rules_by_hand(rule):
    bn = nn.BatchNorm1d(1).eval()
    bn.running_mean.fill_(1.0)
    bn.running_var.fill_(4.0 - bn.eps)  # scale = gamma / 2
    bn.weight.data.fill_(3.0)
    bn.bias.data.fill_(0.5)
    d = decompose(SumThenNorm(bn), {"camera": torch.tensor([[2.0]]), "radar": torch.tensor([[6.0]])},
                  rules=LinearizationSettings(batch_norm=rule))
    shift = 0.5 - 1.0 * 1.5  # beta - mu * s with s = 1.5
    want = {"identity": [3.0, 9.0, shift], "uniform": [3.0 + shift / 3, 9.0 + shift / 3, shift / 3]}[rule]
    got = [d.components[n].item() for n in ("camera", "radar", "bias")]
    assert got == pytest.approx(want, abs=1e-5)  # float32; the bias is total - modalities


class LinearFusion(nn.Module):
    """out = W_c cam + W_r rad + b: components must be exactly W_c cam, W_r rad and b — the last layer's bias counted
    once (the public reference code adds it to every stream)."""

    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Conv2d(4, 2, 1)
        self.head.bias.data = torch.tensor([5.0, -7.0])
        self.eval()

    def forward(self, camera, radar):
        return self.head(torch.cat([camera, radar], 1))


def test_last_layer_bias_counted_once():
    model = LinearFusion()
    cam, rad = torch.randn(1, 2, 3, 3), torch.randn(1, 2, 3, 3)
    d = decompose(model, {"camera": cam, "radar": rad})
    w = model.head.weight
    torch.testing.assert_close(d.components["camera"], F.conv2d(cam, w[:, :2]))
    torch.testing.assert_close(d.components["radar"], F.conv2d(rad, w[:, 2:]))
    torch.testing.assert_close(d.components["bias"], model.head.bias.view(1, 2, 1, 1).expand(1, 2, 3, 3))


class Unsupported(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fuse = nn.Sequential(nn.Identity())
        self.mode_flag = nn.BatchNorm1d(2)

    def forward(self, camera, radar):
        return torch.special.erfinv(self.fuse(camera + radar).clamp(-0.9, 0.9))


def _state(model: nn.Module):
    return ({k: v.clone() for k, v in model.state_dict().items()},
            {m: m.training for m in model.modules()},
            sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()))


def test_unknown_op_names_op_and_module_and_model_is_restored():
    model = Unsupported().train()
    before = _state(model)
    with pytest.warns(UserWarning, match="training mode"), pytest.raises(UnsupportedOperationError, match="erfinv"):
        decompose(model, {"camera": torch.rand(2, 2), "radar": torch.rand(2, 2)})
    after = _state(model)
    assert all(torch.equal(before[0][k], after[0][k]) for k in before[0])
    assert before[1] == after[1] and after[2] == 0 and model.training


def test_registered_rule_for_custom_op():
    register_rule(torch.special.erfinv, activation)
    try:
        d = decompose(Unsupported().eval(), {"camera": torch.rand(2, 2) - 0.5, "radar": torch.rand(2, 2) - 0.5})
        assert d.conservation_error().relative < 1e-6
    finally:
        unregister_rule(torch.special.erfinv)


def test_model_unchanged_after_success():
    model = SumThenNorm(nn.BatchNorm1d(3)).eval()
    before = _state(model)
    decompose(model, {"camera": torch.randn(4, 3), "radar": torch.randn(4, 3)}, layers=["norm"])
    after = _state(model)
    assert all(torch.equal(before[0][k], after[0][k]) for k in before[0]) and before[1] == after[1]
    assert after[2] == 0


@pytest.mark.parametrize("inputs, kwargs, match", [
    ({"camera": torch.ones(1, 2), "lidar": torch.ones(1, 2)}, {}, "not arguments"),
    ({"camera": torch.tensor([[math.nan, 1.0]]), "radar": torch.ones(1, 2)}, {}, "NaN"),
    ({"camera": torch.ones(1, 2, dtype=torch.long), "radar": torch.ones(1, 2)}, {}, "floating-point"),
    ((torch.ones(1, 2), torch.ones(1, 2)), {"names": ["a"]}, "names"),
    ({"camera": torch.ones(1, 2), "radar": torch.ones(1, 2)}, {"bias": "everywhere"}, "bias must be"),
    ({"camera": torch.ones(1, 2), "radar": torch.ones(1, 2)}, {"rules": "fancy"}, "unknown rules preset"),
    ({"camera": torch.ones(1, 2), "radar": torch.ones(1, 2)}, {"layers": ["nope"]}, "layers not found"),
    ({"camera": torch.ones(1, 2), "radar": torch.ones(1, 2)}, {"modality_mask": torch.zeros(2, dtype=torch.long)},
     "exactly one input"),
    ({}, {}, "empty"),
])
def test_bad_input_errors(inputs, kwargs, match):
    model = SumThen(torch.relu, 0.0)
    with pytest.raises(ValueError, match=match):
        decompose(model, inputs, **kwargs)


def test_bad_rule_variant_names():
    with pytest.raises(ValueError, match="norm rule"):
        LinearizationSettings(norm="median")


class ConcatConv(nn.Module):
    """``conv(cat(...))`` as a fusion layer, in the variants the convolution rule must handle."""

    def __init__(self, variant: str) -> None:
        super().__init__()
        self.variant = variant
        self.register_buffer("const", torch.randn(1, 2, 5, 5))
        cin = {"constant": 7, "repeated": 8, "three": 6}.get(variant, 5)
        if variant == "transposed":
            self.conv = nn.ConvTranspose2d(cin, 4, 3, stride=2, bias=True)
        else:
            groups = 5 if variant == "grouped" else 1
            self.conv = nn.Conv2d(cin, 5 if variant == "grouped" else 4, 3, padding=1, groups=groups)
        self.eval()

    def forward(self, camera, radar, lidar=None):
        parts = {
            "constant": [camera, self.const.expand(camera.shape[0], -1, -1, -1), radar],
            "repeated": [camera, radar, 2 * camera],  # the camera holds two spans
            "three": [camera, lidar, radar],
            "unbatched": [camera[0], radar[0]],
        }.get(self.variant, [camera, radar])
        x = torch.cat(parts, 0 if self.variant == "unbatched" else 1)
        if self.variant == "scaled":
            x = x * 1.0  # a linear op in between: no spans reach the convolution
        return self.conv(x)


@pytest.mark.parametrize("variant", ["plain", "constant", "repeated", "three", "unbatched", "transposed", "grouped",
                                     "scaled"])
def test_convolution_after_concatenation_by_channel_spans(variant, monkeypatch):
    """Each modality's component of ``conv(cat(x_1, .., x_M))`` is the convolution of its own channels (every other
    channel zero) without the layer's bias: computed on those channels alone when the concatenation's spans reach
    the convolution, densely otherwise, with the same result."""
    from fusionlens.decompose import rules

    used = []
    blocked = rules._blocked_convolution
    monkeypatch.setattr(rules, "_blocked_convolution", lambda *a: used.append(blocked(*a) is not None) or blocked(*a))
    model = ConcatConv(variant)
    g = torch.Generator().manual_seed(0)
    inputs = {"camera": torch.randn(2, 3, 5, 5, generator=g), "radar": torch.randn(2, 2, 5, 5, generator=g)}
    if variant == "three":
        inputs["lidar"] = torch.randn(2, 1, 5, 5, generator=g)
    d = decompose(model, inputs)
    assert used == [variant not in ("grouped", "scaled")]
    for name in inputs:  # reference: the model with every other input zeroed, minus the model at zero
        only = {k: (v if k == name else torch.zeros_like(v)) for k, v in inputs.items()}
        zero = {k: torch.zeros_like(v) for k, v in inputs.items()}
        with torch.no_grad():
            want = model(**only) - model(**zero)
        torch.testing.assert_close(d.components[name], want, rtol=1e-5, atol=1e-5)
    assert d.conservation_error().relative <= 1e-6


class ScaleNorm(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.RMSNorm(4)
        self.eval()

    def forward(self, camera, radar):
        return self.norm(camera + radar)


def test_rms_norm_scale_is_frozen_with_the_coefficients():
    """The RMSNorm scale is an operating-point quantity: replaying the clean input's coefficients on another radar
    input keeps the camera component exactly (before, the scale was taken from the new total)."""
    model = ScaleNorm()
    g = torch.Generator().manual_seed(0)
    cam, rad, other = (torch.randn(3, 4, generator=g) for _ in range(3))
    clean = decompose(model, {"camera": cam, "radar": rad}, record_coefficients=True)
    swapped = decompose(model, {"camera": cam, "radar": other}, coefficients=clean.coefficients)
    torch.testing.assert_close(swapped.components["camera"], clean.components["camera"], rtol=0, atol=0)
    assert swapped.conservation_error().relative <= 1e-6
    scale = torch.rsqrt((cam + rad).pow(2).mean(-1, keepdim=True) + torch.finfo(torch.float32).eps)
    torch.testing.assert_close(clean.components["camera"], cam * scale * model.norm.weight)


def test_stream_traversal_matches_pytree():
    """The engine's walk over call arguments (plain tuples/lists/dicts directly, any other pytree node through
    pytree) finds and replaces the same leaves as pytree."""
    from collections import OrderedDict, deque, namedtuple

    from torch.utils._pytree import tree_flatten, tree_map

    from fusionlens.decompose._stream import Stream, replace_streams, streams_in

    pair = namedtuple("pair", "a b")
    s1, s2, s3, s4 = (Stream.single(torch.full((2,), float(i)), 0) for i in range(4))
    tree = (s1, [2, {"x": s2, "y": (None, "str")}], pair(s3, 1.5), deque([s4]), OrderedDict(z=torch.ones(1)),
            torch.Size([2, 3]), slice(0, 2))
    expected = [x for x in tree_flatten(tree)[0] if isinstance(x, Stream)]
    assert [id(x) for x in streams_in(tree)] == [id(x) for x in expected] == [id(s) for s in (s1, s2, s3, s4)]
    replaced = replace_streams(tree, lambda s: "S")
    assert replaced == tree_map(lambda x: "S" if isinstance(x, Stream) else x, tree)
    assert type(replaced[2]) is pair and type(replaced[3]) is deque and type(replaced[4]) is OrderedDict


def test_input_check_rejects_inf_and_accepts_a_sum_that_overflows():
    model = SumThen(torch.relu, 0.0)
    with pytest.raises(ValueError, match="NaN or inf"):
        decompose(model, {"camera": torch.tensor([[math.inf, -math.inf]]), "radar": torch.ones(1, 2)})
    big = torch.full((1, 2), 3e38)  # finite, though its sum is not
    d = decompose(model, {"camera": big, "radar": -big})
    assert torch.equal(d.output, torch.zeros(1, 2))
