"""Activations under LMD (Prop. 1): the chord through (0, F(0)) for F(0) != 0, the paper's slope F(A)/A otherwise."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fusionlens import decompose


class SigmoidHead(nn.Module):
    """A fusion conv and a centre-heatmap head ending in a sigmoid (SimpleBEV's centre head)."""

    def __init__(self) -> None:
        super().__init__()
        self.fuse = nn.Conv2d(5, 4, 3, padding=1)
        self.logit = nn.Conv2d(4, 1, 1)

    def forward(self, camera, radar):
        return torch.sigmoid(self.logit(torch.relu(self.fuse(torch.cat([camera, radar], 1)))))


def _near_zero_logits(model: SigmoidHead, inputs: dict) -> None:
    """Shift the head's bias so that pre-activations at the decomposition's operating point sit at 0 +- 1e-7, where
    the chord through the origin, sigmoid(A)/A, explodes."""
    with torch.no_grad():
        logit = model.logit(torch.relu(model.fuse(torch.cat(list(inputs.values()), 1))))
        model.logit.bias -= logit.flatten()[7] - 6.4e-8


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_sigmoid_head_components_bounded_by_a_quarter_of_the_logit_components(dtype):
    """sigmoid is 1/4-Lipschitz, so no chord of it is steeper: every modality's component at the sigmoid output is at
    most 1/4 of its component at the logit, at every pixel, near A = 0 too -- in float32 as in float64."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    inputs = {"camera": torch.randn(1, 3, 6, 6, generator=g), "radar": torch.randn(1, 2, 6, 6, generator=g)}
    model = SigmoidHead().eval()
    _near_zero_logits(model, inputs)
    model, inputs = model.to(dtype), {k: v.to(dtype) for k, v in inputs.items()}
    d = decompose(model, inputs, layers=["logit"])
    logit = d.layer("logit")
    assert logit["total"].abs().min() < 1e-6  # the case that broke the chord through the origin is in the data
    for name in ("camera", "radar"):
        bound = 0.25 * logit[name].abs() * (1 + 1e-6) + torch.finfo(dtype).eps
        assert (d.components[name].abs() <= bound).all()
    assert d.conservation_error().relative <= (1e-6 if dtype == torch.float32 else 1e-14)


def test_sigmoid_float32_agrees_with_float64_near_zero():
    """Pre-activations from 1e-9 to 1e-1 (both signs): the float32 components equal the float64 ones to float32
    precision, where F(A) - F(0) is mostly rounding."""
    a = torch.cat([torch.logspace(-9, -1, 41), -torch.logspace(-9, -1, 41)])
    cam = torch.linspace(-1, 1, a.numel())

    class Logit(nn.Module):
        def forward(self, camera, radar):
            return torch.sigmoid(camera + radar)

    out, given = {}, {"camera": cam.double(), "radar": a.double() - cam.double()}
    for dtype in (torch.float32, torch.float64):
        out[dtype] = decompose(Logit().eval(), {k: v.to(dtype) for k, v in given.items()})
    for name in ("camera", "radar"):
        lo, hi = out[torch.float32].components[name].double(), out[torch.float64].components[name]
        torch.testing.assert_close(lo, hi, rtol=1e-3, atol=1e-6)
        assert (hi.abs() <= 0.25 * given[name].abs() * (1 + 1e-6)).all()


NONZERO_AT_ZERO = [torch.sigmoid, F.softplus, F.logsigmoid, F.hardsigmoid, torch.exp, torch.cos, torch.erfc,
                   lambda x: x.clamp(min=0.3)]
ZERO_AT_ZERO = [torch.relu, F.gelu, F.silu, torch.tanh, F.elu, F.mish, F.leaky_relu, F.hardswish]


@pytest.mark.parametrize("act", NONZERO_AT_ZERO, ids=["sigmoid", "softplus", "logsigmoid", "hardsigmoid", "exp",
                                                      "cos", "erfc", "clamp_min"])
def test_chord_through_f0_by_hand(act):
    """F(0) != 0: component m = (F(A) - F(0)) / A * h_m, the bias F(0) + that slope times its own share."""
    g = torch.Generator().manual_seed(0)
    cam, rad = torch.randn(50, generator=g, dtype=torch.float64), torch.randn(50, generator=g, dtype=torch.float64)

    class Act(nn.Module):
        def forward(self, camera, radar):
            return act(camera + radar + 0.25)

    d = decompose(Act().eval(), {"camera": cam, "radar": rad})
    a = cam + rad + 0.25
    f0 = act(torch.zeros((), dtype=torch.float64))
    slope = (act(a) - f0) / a
    torch.testing.assert_close(d.components["camera"], slope * cam, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(d.components["radar"], slope * rad, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(d.components["bias"], f0 + slope * 0.25, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("act", ZERO_AT_ZERO, ids=["relu", "gelu", "silu", "tanh", "elu", "mish", "leaky_relu",
                                                   "hardswish"])
def test_paper_slope_unchanged_where_f0_is_zero(act):
    """F(0) = 0: the paper's secant F(A) / A times the pre-activation components (Prop. 1), bit for bit."""
    g = torch.Generator().manual_seed(1)
    cam, rad = torch.randn(50, generator=g), torch.randn(50, generator=g)

    class Mix(nn.Module):
        def forward(self, camera, radar):
            return camera + radar - 0.1

    class Act(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.mix = Mix()

        def forward(self, camera, radar):
            return act(self.mix(camera, radar))

    d = decompose(Act().eval(), {"camera": cam, "radar": rad}, layers=["mix"])
    pre = d.layer("mix")
    slope = act(pre["total"]) / pre["total"]
    assert torch.equal(d.components["camera"], slope * pre["camera"])
    assert torch.equal(d.components["radar"], slope * pre["radar"])


class Gated(nn.Module):
    """Squeeze-and-excitation after a fusion conv, ``depth`` times: ``x * sigmoid(fc(mean(x)))``."""

    def __init__(self, depth: int = 1) -> None:
        super().__init__()
        self.fuse = nn.Conv2d(5, 4, 1)
        self.gates = nn.ModuleList(nn.Linear(4, 4) for _ in range(depth))
        self.pre = nn.ModuleList(nn.Identity() for _ in range(depth))

    def forward(self, camera, radar):
        x = self.fuse(torch.cat([camera, radar], 1))
        for gate, pre in zip(self.gates, self.pre):
            x = pre(x) * torch.sigmoid(gate(x.mean((2, 3))))[:, :, None, None]
        return x


def test_gate_product_by_hand_bias_is_not_a_player():
    """x * g with x = x_b + sum x_m, g = g_b + sum g_m: component k = x_k (g_b + g_M/2) + (x_b + x_M/2) g_k, the
    bias exactly x_b g_b -- a modality scaled by the gate's constant part (sigmoid's F(0) = 1/2 among it) stays
    the modality's; and under frozen coefficients the camera component ignores the radar input."""
    torch.manual_seed(0)
    model = Gated().double().eval()
    g = torch.Generator().manual_seed(0)
    cam, rad = torch.randn(2, 3, 4, 4, generator=g, dtype=torch.float64), torch.randn(2, 2, 4, 4, generator=g,
                                                                                    dtype=torch.float64)
    d = decompose(model, {"camera": cam, "radar": rad}, layers=["pre.0"], record_coefficients=True)
    x = d.layer("pre.0")
    gate = torch.sigmoid(model.gates[0](x["total"].mean((2, 3))))[:, :, None, None]
    slope = (gate - 0.5) / model.gates[0](x["total"].mean((2, 3)))[:, :, None, None]  # the chord through (0, 1/2)
    lin = {n: model.gates[0].weight @ x[n].mean((2, 3)).T for n in ("camera", "radar")}
    g_parts = {n: (slope.squeeze(-1).squeeze(-1) * lin[n].T)[:, :, None, None] for n in lin}
    g_mod = g_parts["camera"] + g_parts["radar"]
    g_bias, x_mod = gate - g_mod, x["camera"] + x["radar"]
    for n in ("camera", "radar"):
        want = x[n] * (g_bias + g_mod / 2) + (x["bias"] + x_mod / 2) * g_parts[n]
        torch.testing.assert_close(d.components[n], want, rtol=0, atol=1e-12)
    torch.testing.assert_close(d.components["bias"], x["bias"] * g_bias, rtol=0, atol=1e-12)
    other = torch.randn(rad.shape, generator=g, dtype=torch.float64)
    moved = decompose(model, {"camera": cam, "radar": other}, coefficients=d.coefficients)
    torch.testing.assert_close(moved.components["camera"], d.components["camera"], rtol=0, atol=0)


def test_modality_shares_survive_a_stack_of_gates():
    """Eight SE gates in a row: the modalities keep most of the output (a rule that gave the bias half of every
    modality-times-constant term would leave them 2^-8 of it)."""
    torch.manual_seed(0)
    model = Gated(depth=8).double().eval()
    g = torch.Generator().manual_seed(1)
    inputs = {"camera": torch.randn(1, 3, 4, 4, generator=g, dtype=torch.float64),
              "radar": torch.randn(1, 2, 4, 4, generator=g, dtype=torch.float64)}
    d = decompose(model, inputs)
    modalities = (d.components["camera"] + d.components["radar"]).abs().sum()
    assert modalities > 0.5 * d.output.abs().sum() and d.conservation_error().relative <= 1e-12
