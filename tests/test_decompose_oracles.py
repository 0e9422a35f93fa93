"""Every rule family of docs/lmd.md against its documented formula, written out by hand in the test.

The operand of each op is ``x = camera + radar + b`` (float64): its components are known exactly -- camera, radar
and the constant ``b`` -- so each op's components can be computed from the documented formula outside the
engine and compared with what ``decompose`` returns. Conservation is no check here (the bias is the output minus
the modalities, so it holds by construction); the modality components are. A last test runs a bias-free network
through every family at once: there the bias component must vanish, which fails as soon as any rule on the path
gives a modality too little or too much.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fusionlens import decompose
from fusionlens.decompose import LinearizationSettings

DT = torch.float64
NAMES = ("camera", "radar")


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


class Fused(nn.Module):
    """``op(camera + radar + b)``; ``op`` is any callable of the fused tensor (plain functions and modules)."""

    def __init__(self, op, b: torch.Tensor | float = 0.0) -> None:
        super().__init__()
        self.op = op
        self.register_buffer("b", torch.as_tensor(b, dtype=DT))
        self.eval()

    def forward(self, camera, radar):
        return self.op(camera + radar + self.b)


def _run(model: nn.Module, cam: torch.Tensor, rad: torch.Tensor, rules="paper"):
    d = decompose(model, {"camera": cam, "radar": rad}, rules=rules)
    return d, [d.components[n] for n in NAMES]


def _check(got: list[torch.Tensor], want: list[torch.Tensor]) -> None:
    for name, g, w in zip(NAMES, got, want):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-10, msg=lambda m, n=name: f"{n}: {m}")


def _randn(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=_gen(seed), dtype=DT)


# -- activations with F(0) = 0: Prop. 1, c = F(A)/A -------------------------------------------------------------
ZERO_AT_ZERO = {
    "relu": F.relu, "leaky_relu": lambda x: F.leaky_relu(x, 0.1), "gelu": F.gelu, "silu": F.silu,
    "tanh": torch.tanh, "elu": F.elu, "selu": F.selu, "hardswish": F.hardswish, "mish": F.mish,
    "softsign": F.softsign, "relu6": F.relu6, "hardtanh": F.hardtanh,
}


@pytest.mark.parametrize("name", sorted(ZERO_AT_ZERO))
def test_activation_secant_slope(name):
    fn = ZERO_AT_ZERO[name]
    assert fn(torch.zeros((), dtype=DT)) == 0
    cam, rad, b = _randn(2, 3, 4, seed=1) * 3, _randn(2, 3, 4, seed=2) * 3, _randn(2, 3, 4, seed=3)
    d, got = _run(Fused(fn, b), cam, rad)
    a = cam + rad + b
    c = fn(a) / a  # no |A| here is near the rounding floor
    _check(got, [c * cam, c * rad])
    torch.testing.assert_close(d.components["bias"], c * b)  # F(A) - c (cam + rad) = c b: the bias's own share


# -- normalizations: Prop. 2 (BatchNorm), Prop. 3 (InstanceNorm / LayerNorm / GroupNorm), RMSNorm ----------------
@pytest.mark.parametrize("rule", ["identity", "uniform"])
def test_batch_norm(rule):
    bn = nn.BatchNorm2d(3).to(DT).eval()
    bn.running_mean.copy_(_randn(3, seed=4))
    bn.running_var.copy_(_randn(3, seed=5).abs() + 0.5)
    bn.weight.data.copy_(_randn(3, seed=6))
    bn.bias.data.copy_(_randn(3, seed=7))
    cam, rad = _randn(2, 3, 4, 4, seed=8), _randn(2, 3, 4, 4, seed=9)
    d, got = _run(Fused(bn, 0.0), cam, rad, LinearizationSettings(batch_norm=rule))
    s = (bn.weight / torch.sqrt(bn.running_var + bn.eps)).view(1, 3, 1, 1)
    t = bn.bias.view(1, 3, 1, 1) - bn.running_mean.view(1, 3, 1, 1) * s
    share = t / 3 if rule == "uniform" else 0.0  # uniform: 1/K of the constant to each of K = 3 components
    _check(got, [s * cam + share, s * rad + share])


def _norm_oracle(parts: list[torch.Tensor], total: torch.Tensor, group: tuple[int, ...], eps: float, rule: str,
                 gamma: torch.Tensor | None, beta: torch.Tensor | None, k: int = 3) -> list[torch.Tensor]:
    """Prop. 3: variance of the total; mean by ``rule``; ``gamma`` on every component, ``beta`` the bias's (1/K
    each under ``uniform``). ``group`` reshapes a tensor so that its last axis holds one group's elements."""
    g = total.reshape(group)
    mu = g.mean(-1, keepdim=True)
    inv = 1.0 / torch.sqrt(((g - mu) ** 2).mean(-1, keepdim=True) + eps)
    out = []
    for h in parts:
        hg = h.reshape(group)
        centred = {"ratio": hg - hg.mean(-1, keepdim=True), "identity": hg, "uniform": hg - mu / k}[rule]
        y = (centred * inv).reshape(total.shape)
        if gamma is not None:
            y = y * gamma
        if beta is not None and rule == "uniform":
            y = y + beta / k
        out.append(y)
    return out


NORM_RULES = ["ratio", "identity", "uniform"]


@pytest.mark.parametrize("rule", NORM_RULES)
def test_instance_norm(rule):
    norm = nn.InstanceNorm1d(3, affine=True).to(DT).eval()
    norm.weight.data.copy_(_randn(3, seed=10))
    norm.bias.data.copy_(_randn(3, seed=11))
    cam, rad, b = _randn(2, 3, 5, seed=12), _randn(2, 3, 5, seed=13), _randn(1, 3, 1, seed=14)
    _, got = _run(Fused(norm, b), cam, rad, LinearizationSettings(norm=rule))
    want = _norm_oracle([cam, rad], cam + rad + b, (2, 3, -1), norm.eps, rule, norm.weight.view(1, 3, 1),
                        norm.bias.view(1, 3, 1))
    _check(got, want)


@pytest.mark.parametrize("rule", NORM_RULES)
def test_layer_norm(rule):
    norm = nn.LayerNorm((3, 4)).to(DT).eval()
    norm.weight.data.copy_(_randn(3, 4, seed=15))
    norm.bias.data.copy_(_randn(3, 4, seed=16))
    cam, rad, b = _randn(2, 5, 3, 4, seed=17), _randn(2, 5, 3, 4, seed=18), _randn(3, 4, seed=19)
    _, got = _run(Fused(norm, b), cam, rad, LinearizationSettings(norm=rule))
    _check(got, _norm_oracle([cam, rad], cam + rad + b, (2, 5, 12), norm.eps, rule, norm.weight, norm.bias))


@pytest.mark.parametrize("rule", NORM_RULES)
def test_group_norm(rule):
    norm = nn.GroupNorm(2, 4).to(DT).eval()
    norm.weight.data.copy_(_randn(4, seed=20))
    norm.bias.data.copy_(_randn(4, seed=21))
    cam, rad, b = _randn(2, 4, 3, 3, seed=22), _randn(2, 4, 3, 3, seed=23), _randn(1, 4, 1, 1, seed=24)
    _, got = _run(Fused(norm, b), cam, rad, LinearizationSettings(norm=rule))
    want = _norm_oracle([cam, rad], cam + rad + b, (2, 2, -1), norm.eps, rule, norm.weight.view(1, 4, 1, 1),
                        norm.bias.view(1, 4, 1, 1))
    _check(got, want)


def test_rms_norm():
    """No centring: every component times ``weight / sqrt(mean(A^2) + eps)`` of the total."""
    norm = nn.RMSNorm(6, eps=1e-6).to(DT).eval()
    norm.weight.data.copy_(_randn(6, seed=25))
    cam, rad, b = _randn(2, 3, 6, seed=26), _randn(2, 3, 6, seed=27), _randn(6, seed=28)
    _, got = _run(Fused(norm, b), cam, rad)
    a = cam + rad + b
    scale = norm.weight / torch.sqrt((a * a).mean(-1, keepdim=True) + 1e-6)
    _check(got, [cam * scale, rad * scale])


# -- attention: weights from the total, held constant; linear in the value's components ----------------------------
E, L = 6, 5


class Attention(nn.Module):
    """Single-head attention of the fused tokens, as SDPA or written out with softmax."""

    def __init__(self, explicit: bool, b: torch.Tensor) -> None:
        super().__init__()
        self.wq, self.wk, self.wv = (_randn(E, E, seed=s) / math.sqrt(E) for s in (30, 31, 32))
        self.register_buffer("b", b)
        self.explicit = explicit
        self.eval()

    def forward(self, camera, radar, mask=None):
        x = camera + radar + self.b
        q, k, v = x @ self.wq, x @ self.wk, x @ self.wv
        if self.explicit:
            return torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(E), -1) @ v
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


@pytest.mark.parametrize("explicit, masked", [(True, False), (False, False), (False, True)])
def test_attention(explicit, masked):
    cam, rad, b = _randn(2, L, E, seed=33) * 2, _randn(2, L, E, seed=34) * 2, _randn(E, seed=35)
    model = Attention(explicit, b)
    mask = torch.rand(L, L, generator=_gen(36)) > 0.4 if masked else None
    if mask is not None:
        mask[:, 0] = True  # every query sees at least one key
    d = decompose(model, {"camera": cam, "radar": rad}, forward_kwargs={"mask": mask})
    a = cam + rad + b
    scores = (a @ model.wq) @ (a @ model.wk).transpose(-2, -1) / math.sqrt(E)
    if mask is not None:
        scores = torch.where(mask, scores, -math.inf)
    weights = torch.exp(scores - scores.amax(-1, keepdim=True))
    weights = weights / weights.sum(-1, keepdim=True)
    assert not torch.allclose(weights, torch.full_like(weights, weights[0, 0, 0].item()))  # not uniform here
    _check([d.components[n] for n in NAMES], [weights @ (cam @ model.wv), weights @ (rad @ model.wv)])


# -- selections: the winner chosen on the total, gathered from every component -----------------------------------
def test_max_pool():
    cam, rad, b = _randn(1, 2, 4, 6, seed=40), _randn(1, 2, 4, 6, seed=41), _randn(1, 2, 4, 6, seed=42)
    _, got = _run(Fused(lambda x: F.max_pool2d(x, 2), b), cam, rad)
    a = cam + rad + b
    want = [torch.zeros(1, 2, 2, 3, dtype=DT) for _ in NAMES]
    for c, i, j in itertools.product(range(2), range(2), range(3)):
        window = a[0, c, 2 * i:2 * i + 2, 2 * j:2 * j + 2]
        r, s = divmod(int(window.argmax()), 2)
        for w, h in zip(want, (cam, rad)):
            w[0, c, i, j] = h[0, c, 2 * i + r, 2 * j + s]
    _check(got, want)


@pytest.mark.parametrize("op", ["amax", "max", "amin", "topk"])
def test_reductions(op):
    cam, rad, b = _randn(3, 7, seed=43), _randn(3, 7, seed=44), _randn(3, 7, seed=45)
    fn = {"amax": lambda x: x.amax(1), "max": lambda x: torch.max(x, 1).values, "amin": lambda x: x.amin(1),
          "topk": lambda x: x.topk(3, dim=1).values}[op]
    _, got = _run(Fused(fn, b), cam, rad)
    a = cam + rad + b
    picks = []  # the winners by hand, row by row
    for row in range(3):
        order = sorted(range(7), key=lambda j, r=row: a[r, j].item(), reverse=op != "amin")
        picks.append(order[:3] if op == "topk" else order[:1])
    want = [torch.tensor([[h[r, j].item() for j in picks[r]] for r in range(3)], dtype=DT) for h in (cam, rad)]
    _check(got, [w if op == "topk" else w[:, 0] for w in want])


def test_maximum_of_two_fused_tensors():
    cam, rad = _randn(4, 5, seed=46), _randn(4, 5, seed=47)
    model = Fused(lambda x: torch.maximum(x, 0.5 * x.flip(0)), 0.25)
    _, got = _run(model, cam, rad)
    a = cam + rad + 0.25
    first = a >= 0.5 * a.flip(0)
    _check(got, [torch.where(first, h, 0.5 * h.flip(0)) for h in (cam, rad)])


def test_scatter_reduce_amax_pillars():
    """PointPillars' max over the points of a pillar: each pillar's channel takes every component from the point
    whose total wins; an empty pillar keeps the zero canvas (a constant: nothing of a modality)."""
    cam, rad, b = _randn(7, 3, seed=48), _randn(7, 3, seed=49), _randn(7, 3, seed=50)
    pillar = torch.tensor([0, 2, 0, 2, 2, 4, 0])

    def scatter(x):
        index = pillar[:, None].expand(7, 3)
        return torch.zeros(5, 3, dtype=DT).scatter_reduce(0, index, x, "amax", include_self=False)

    _, got = _run(Fused(scatter, b), cam, rad)
    a = cam + rad + b
    want = [torch.zeros(5, 3, dtype=DT) for _ in NAMES]
    for p, ch in itertools.product(range(5), range(3)):
        points = [i for i in range(7) if pillar[i] == p]
        if points:
            winner = max(points, key=lambda i: a[i, ch].item())
            for w, h in zip(want, (cam, rad)):
                w[p, ch] = h[winner, ch]
    _check(got, want)


# -- grid_sample with a constant grid: linear, applied to each component; the constant's samples to the bias -------
def test_grid_sample():
    cam, rad = _randn(1, 2, 5, 6, seed=51), _randn(1, 2, 5, 6, seed=52)
    grid = torch.rand(1, 4, 3, 2, generator=_gen(53), dtype=DT) * 2.4 - 1.2  # some samples fall off the map

    def sample(x):
        return F.grid_sample(x, grid, align_corners=False)

    d, got = _run(Fused(sample, 0.75), cam, rad)
    # bilinear interpolation written out: the four neighbours of each sample, zero outside the map
    want = [torch.zeros(1, 2, 4, 3, dtype=DT) for _ in range(3)]
    for i, j in itertools.product(range(4), range(3)):
        u = ((grid[0, i, j, 0] + 1) * 6 - 1) / 2  # align_corners=False: pixel centres at -1 + (2k + 1)/W
        v = ((grid[0, i, j, 1] + 1) * 5 - 1) / 2
        u0, v0 = math.floor(u), math.floor(v)
        for du, dv in itertools.product((0, 1), (0, 1)):
            x_, y_ = u0 + du, v0 + dv
            weight = (1 - abs(u - x_)) * (1 - abs(v - y_))
            if 0 <= x_ < 6 and 0 <= y_ < 5:
                for w, h in zip(want, (cam, rad, torch.full_like(cam, 0.75))):
                    w[0, :, i, j] += weight * h[0, :, y_, x_]
    _check(got, want[:2])
    torch.testing.assert_close(d.components["bias"], want[2])


# -- products of decomposed tensors: each expanded term shared equally by the modality factors in it -------------
def _expanded_product(factors: list[list[torch.Tensor]], combine) -> list[torch.Tensor]:
    """``factors[f] = [camera, radar, bias]`` components of factor ``f``. Expands the product into its terms, one
    component from each factor, and gives each term to the modality factors in it in equal shares (the bias is no
    player: only the all-bias term is the bias's)."""
    out = [0.0, 0.0]
    for choice in itertools.product(range(3), repeat=len(factors)):
        term = combine([factors[f][c] for f, c in enumerate(choice)])
        players = [c for c in choice if c < 2]
        for c in players:
            out[c] = out[c] + term / len(players)
    return out


@pytest.mark.parametrize("n", [2, 3])
def test_elementwise_product(n):
    cam, rad = _randn(3, 4, seed=54), _randn(3, 4, seed=55)
    b = [_randn(3, 4, seed=56 + i) for i in range(n)]
    scales = [(1.0, 1.0), (2.0, -0.5), (-1.5, 0.75)][:n]  # factor f = s_c camera + s_r radar + b_f

    class Gates(nn.Module):  # one product op of n factors: ``*`` for two, a three-operand einsum for three
        def forward(self, camera, radar):
            f = [sc * camera + sr * radar + bf for (sc, sr), bf in zip(scales, b)]
            return f[0] * f[1] if n == 2 else torch.einsum("ij,ij,ij->ij", *f)

    _, got = _run(Gates().eval(), cam, rad)
    factors = [[sc * cam, sr * rad, bf] for (sc, sr), bf in zip(scales, b)]
    _check(got, _expanded_product(factors, math.prod))


def test_matmul_of_two_fused_tensors():
    cam, rad = _randn(2, 3, 4, seed=60), _randn(2, 3, 4, seed=61)
    b1, b2, w = _randn(3, 4, seed=62), _randn(3, 3, seed=63), _randn(4, 3, seed=64)

    class Bilinear(nn.Module):
        def forward(self, camera, radar):
            x = camera + radar + b1
            y = (camera - 2 * radar) @ w + b2
            return x.transpose(-2, -1) @ y

    _, got = _run(Bilinear().eval(), cam, rad)
    factors = [[cam, rad, b1], [cam @ w, -2 * rad @ w, b2]]
    _check(got, _expanded_product(factors, lambda t: t[0].transpose(-2, -1) @ t[1]))


# -- a bias-free network through every family: the bias component must vanish ----------------------------------
class BiasFree(nn.Module):
    """No constant anywhere: bias-free convolutions and projections, F(0) = 0 activations, ratio-mean norms
    without affine terms, selections, attention, a grid sample, a gate. Every output is a sum of modality terms."""

    def __init__(self) -> None:
        super().__init__()
        self.cam, self.rad = nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.Conv2d(2, 4, 1, bias=False)
        self.fuse = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.norm_in, self.norm_gn = nn.InstanceNorm2d(8), nn.GroupNorm(2, 8, affine=False)
        self.norm_ln, self.norm_rms = nn.LayerNorm(8, elementwise_affine=False), nn.RMSNorm(8, elementwise_affine=False)
        self.q, self.k, self.v = (nn.Linear(8, 8, bias=False) for _ in range(3))
        self.gate = nn.Conv2d(8, 8, 1, bias=False)
        self.grid = nn.Parameter(torch.rand(1, 4, 4, 2) * 2 - 1, requires_grad=False)

    def forward(self, camera, radar):
        x = self.fuse(torch.cat([F.gelu(self.cam(camera)), F.relu(self.rad(radar))], 1))
        x = F.silu(self.norm_gn(self.norm_in(x)))
        x = F.max_pool2d(x, 2) * torch.tanh(self.gate(x)).amax(dim=(2, 3), keepdim=True)  # a gate
        x = F.grid_sample(x, self.grid.expand(len(x), -1, -1, -1), align_corners=False)
        tokens = self.norm_ln(x.flatten(2).transpose(1, 2))
        tokens = self.norm_rms(F.scaled_dot_product_attention(self.q(tokens), self.k(tokens), self.v(tokens)))
        return tokens.topk(3, dim=-1).values


@pytest.mark.parametrize("bias", ["local", "global"])
def test_bias_free_network_has_no_bias_component(bias):
    torch.manual_seed(0)
    model = BiasFree().to(DT).eval()
    cam, rad = _randn(2, 3, 8, 8, seed=70), _randn(2, 2, 8, 8, seed=71)
    d = decompose(model, {"camera": cam, "radar": rad}, bias=bias)
    scale = d.output.abs().max()
    assert d.components["bias"].abs().max() <= 1e-9 * scale
    for name in NAMES:  # both modalities reach the output with a share of their own
        assert d.components[name].abs().max() > 1e-2 * scale
