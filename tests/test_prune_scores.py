"""Importance scores against hand-derived closed forms on a linear two-branch fusion network.

The network ``y = u . (A x_c) + v . (Bm x_l)`` (camera branch A, LiDAR branch Bm, fusion weights
``w = [u, v]`` over the concatenation) with loss ``mean_n 0.5 (y_n - t_n)^2``
has gradients we can write by hand:
``dL/du = mean r (A x_c)``, ``dL/dA = mean r u x_c^T`` (``r = y - t``), and likewise for the LiDAR side. The
oracles below use only those formulas, never autograd.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import nn

from fusionlens.prune.altermoma import AlterMOMA, altereva
from fusionlens.prune.baselines import IMP, SNIP, MagnitudeImportance, RandomImportance, SynFlow
from fusionlens.prune.params import prunable_parameters, resolve_groups
from fusionlens.prune.prospr import ProsPr
from prune_tiny import TinyFusion


class LinearFusion(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.camera = nn.Linear(2, 2, bias=False)
        self.lidar = nn.Linear(2, 2, bias=False)
        self.fuse = nn.Linear(4, 1, bias=False)

    def forward(self, camera: torch.Tensor, lidar: torch.Tensor) -> torch.Tensor:
        return self.fuse(torch.cat([self.camera(camera), self.lidar(lidar)], dim=-1)).squeeze(-1)


GROUPS = {"camera": ["camera"], "lidar": ["lidar"]}
NAMES = ["camera.weight", "lidar.weight", "fuse.weight"]


def make(seed: int = 0) -> tuple[LinearFusion, dict]:
    torch.manual_seed(seed)
    model = LinearFusion().double()
    gen = torch.Generator().manual_seed(seed + 1)
    batch = {
        k: torch.randn(*shape, generator=gen, dtype=torch.float64)
        for k, shape in (("camera", (5, 2)), ("lidar", (5, 2)), ("target", (5,)))
    }
    return model, batch


def loss_fn(model: nn.Module, batch: dict) -> torch.Tensor:
    return 0.5 * ((model(batch["camera"], batch["lidar"]) - batch["target"]) ** 2).mean()


def hand_grads(A: torch.Tensor, Bm: torch.Tensor, w: torch.Tensor, batch: dict) -> dict[str, torch.Tensor]:
    u, v = w[0, :2], w[0, 2:]
    hc, hl = batch["camera"] @ A.T, batch["lidar"] @ Bm.T
    r = hc @ u + hl @ v - batch["target"]
    n = r.shape[0]
    return {
        "camera.weight": torch.outer(u, r @ batch["camera"]) / n,
        "lidar.weight": torch.outer(v, r @ batch["lidar"]) / n,
        "fuse.weight": torch.cat([r @ hc, r @ hl])[None] / n,
    }


def weights(model: LinearFusion) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return (
        model.camera.weight.detach().clone(),
        model.lidar.weight.detach().clone(),
        model.fuse.weight.detach().clone(),
    )


def hand_reri(model: LinearFusion, batch: dict, masked: str, steps: int, lr: float) -> dict[str, torch.Tensor]:
    """Eq. 10/26/34-35 by hand: B SGD steps with backbone ``masked`` at zero, then |theta_0 (g_0 - g_B)|."""
    A, Bm, w = weights(model)
    theta0 = {"camera.weight": A.clone(), "lidar.weight": Bm.clone(), "fuse.weight": w.clone()}
    if masked == "camera":
        A = torch.zeros_like(A)
    else:
        Bm = torch.zeros_like(Bm)
    g0 = hand_grads(A, Bm, w, batch)
    for _ in range(steps):
        g = hand_grads(A, Bm, w, batch)
        w = w - lr * g["fuse.weight"]
        if masked == "camera":
            Bm = Bm - lr * g["lidar.weight"]
        else:
            A = A - lr * g["camera.weight"]
    gB = hand_grads(A, Bm, w, batch)
    return {n: (theta0[n] * (g0[n] - gB[n])).abs() for n in NAMES if not n.startswith(masked)}


def test_deci_reri_altereva_match_hand_computation() -> None:
    model, batch = make()
    steps, lr = 3, 0.1
    method = AlterMOMA(
        loss_fn, [batch], groups=GROUPS, reactivation_steps=steps, reactivation_lr=lr, same_batch_reri=True
    )
    scores = method(model, NAMES, 0.5)
    A, Bm, w = weights(model)
    g = hand_grads(A, Bm, w, batch)
    deci = {
        "camera.weight": (A * g["camera.weight"]).abs(),
        "lidar.weight": (Bm * g["lidar.weight"]).abs(),
        "fuse.weight": (w * g["fuse.weight"]).abs(),
    }  # eq. 6, 23, 29
    ind = method.last_indicators
    for n in NAMES:
        torch.testing.assert_close(ind.deci[n], deci[n])
    reri_l = hand_reri(model, batch, "lidar", steps, lr)  # mu_l = 0: ReRI for camera and fusion
    reri_c = hand_reri(model, batch, "camera", steps, lr)
    assert set(ind.reri["lidar"]) == {"camera.weight", "fuse.weight"}
    for n in reri_l:
        torch.testing.assert_close(ind.reri["lidar"][n], reri_l[n])
    for n in reri_c:
        torch.testing.assert_close(ind.reri["camera"][n], reri_c[n])

    def norm(x: torch.Tensor) -> torch.Tensor:
        return x / x.sum()

    # eq. 11 (camera: ReRI from masking LiDAR), eq. 12, eq. 13 (fusion: beta/2 twice)
    torch.testing.assert_close(scores["camera.weight"], norm(deci["camera.weight"]) - norm(reri_l["camera.weight"]))
    torch.testing.assert_close(scores["lidar.weight"], norm(deci["lidar.weight"]) - norm(reri_c["lidar.weight"]))
    fusion = norm(deci["fuse.weight"]) - 0.5 * norm(reri_l["fuse.weight"]) - 0.5 * norm(reri_c["fuse.weight"])
    torch.testing.assert_close(scores["fuse.weight"], fusion)
    # Scoring cost: 1 + M (B + 1) = 2B + 3 backward passes for two modalities.
    assert method.backward_passes == 2 * steps + 3
    assert torch.equal(model.camera.weight, A)  # the model handed in comes back unchanged


def test_alpha_beta_weighting_and_beta_zero_is_deci() -> None:
    model, batch = make(3)
    kw = dict(groups=GROUPS, reactivation_steps=2, reactivation_lr=0.05)
    only_deci = AlterMOMA(loss_fn, [batch], alpha=2.0, beta=0.0, **kw)(model, NAMES)
    m = AlterMOMA(loss_fn, [batch], **kw)
    m(model, NAMES)
    for n in NAMES:
        torch.testing.assert_close(only_deci[n], 2.0 * m.last_indicators.deci[n] / m.last_indicators.deci[n].sum())


def test_mean_normalisation_rescales_each_group_by_its_size() -> None:
    model, batch = make(6)
    method = AlterMOMA(loss_fn, [batch], groups=GROUPS, reactivation_steps=2, reactivation_lr=0.05)
    by_sum = method(model, NAMES)
    groups = resolve_groups(model, GROUPS).restrict(NAMES)
    by_mean = altereva(method.last_indicators, groups, normalise="mean")
    for n in NAMES:  # x / mean = N * x / sum, N = the group's size (4 weights each here)
        torch.testing.assert_close(by_mean[n], 4 * by_sum[n])
    with pytest.raises(ValueError, match="normalise"):
        AlterMOMA(loss_fn, [batch], normalise="max")


def test_three_modalities_average_reri_terms() -> None:
    torch.manual_seed(0)
    model = nn.ModuleDict({"a": nn.Linear(2, 2), "b": nn.Linear(2, 2), "c": nn.Linear(2, 2), "f": nn.Linear(6, 1)})

    def loss3(mod: nn.Module, batch: torch.Tensor) -> torch.Tensor:
        h = torch.cat([mod["a"](batch), mod["b"](batch), mod["c"](batch)], -1)
        return (mod["f"](h) ** 2).mean()

    batches = [torch.randn(4, 2) for _ in range(6)]
    names = prunable_parameters(model)
    method = AlterMOMA(loss3, batches, groups={"a": ["a"], "b": ["b"], "c": ["c"]}, reactivation_steps=1)
    s = method(model, names)
    ind = method.last_indicators
    assert set(ind.reri) == {"a", "b", "c"} and "a.weight" not in ind.reri["a"]
    assert method.backward_passes == 1 + 3 * 2

    def norm(x: torch.Tensor) -> torch.Tensor:
        return x / x.sum()

    exp_a = norm(ind.deci["a.weight"]) - 0.5 * (norm(ind.reri["b"]["a.weight"]) + norm(ind.reri["c"]["a.weight"]))
    torch.testing.assert_close(s["a.weight"], exp_a)
    exp_f = norm(ind.deci["f.weight"]) - sum(norm(ind.reri[m]["f.weight"]) for m in "abc") / 3
    torch.testing.assert_close(s["f.weight"], exp_f)


def test_magnitude_snip_random() -> None:
    model, batch = make(1)
    A, Bm, w = weights(model)
    mag = MagnitudeImportance()(model, NAMES)
    torch.testing.assert_close(mag["camera.weight"], A.abs())
    g = hand_grads(A, Bm, w, batch)
    raw = {
        "camera.weight": (A * g["camera.weight"]).abs(),
        "lidar.weight": (Bm * g["lidar.weight"]).abs(),
        "fuse.weight": (w * g["fuse.weight"]).abs(),
    }
    total = sum(t.sum() for t in raw.values())
    snip = SNIP(loss_fn, [batch])
    s = snip(model, NAMES)
    for n in NAMES:
        torch.testing.assert_close(s[n], raw[n] / total)
    assert snip.backward_passes == 1
    r1, r2 = RandomImportance(0)(model, NAMES), RandomImportance(0)(model, NAMES)
    assert all(torch.equal(r1[n], r2[n]) for n in NAMES)
    assert not torch.equal(r1["fuse.weight"], RandomImportance(1)(model, NAMES)["fuse.weight"])


def test_synflow_single_round_closed_form_and_sign_restore() -> None:
    model, _ = make(2)
    A, Bm, w = weights(model)
    s = SynFlow(ones_inputs, iterations=1)(model, NAMES, 0.5)
    # R = |u|.|A| 1 + |v|.|Bm| 1  =>  dR/dA_ij = |u_i|, dR/du_i = sum_j |A_ij|
    u, v = w[0, :2].abs(), w[0, 2:].abs()
    torch.testing.assert_close(s["camera.weight"], A.abs() * u[:, None])
    torch.testing.assert_close(s["lidar.weight"], Bm.abs() * v[:, None])
    torch.testing.assert_close(s["fuse.weight"], w.abs() * torch.cat([A.abs().sum(1), Bm.abs().sum(1)])[None])
    assert torch.equal(model.camera.weight, A)  # signs and values untouched


def test_synflow_iterations_prune_progressively() -> None:
    model, _ = make(2)
    method = SynFlow(ones_inputs, iterations=4)
    s = method(model, NAMES, 0.75)
    dead = sum(int((t == -1).sum()) for t in s.values())
    # after 3 of 4 rounds of the exponential schedule, round(12 * (1 - 0.25 ** 0.75)) entries are gone
    assert dead == round(12 * (1 - 0.25**0.75))
    assert method.backward_passes == 4


def ones_inputs() -> dict[str, torch.Tensor]:
    return {"camera": torch.zeros(1, 2, dtype=torch.float64), "lidar": torch.zeros(1, 2, dtype=torch.float64)}


def test_synflow_flows_through_instance_norm() -> None:
    """An InstanceNorm would erase the constant all-ones signal; SynFlow reduces it to its affine part, so the
    backbones still get scores, and the user's model keeps its InstanceNorm."""
    torch.manual_seed(0)
    model = TinyFusion()
    model.fuse = nn.Sequential(nn.Conv2d(8, 4, 1), nn.InstanceNorm2d(4, affine=True))
    names = prunable_parameters(model)
    s = SynFlow(lambda: {"camera": torch.zeros(1, 2, 6, 6), "lidar": torch.zeros(1, 2, 6, 6)}, 1)(model, names)
    assert all(float(s[n].sum()) > 0 for n in names)
    assert isinstance(model.fuse[1], nn.InstanceNorm2d)


def test_synflow_survives_trained_batchnorm_statistics() -> None:
    """A trained BN's running mean, made absolute and subtracted from the all-ones flow, would let the ReLU
    cut a whole branch; SynFlow drops the running mean (as at initialisation)."""
    torch.manual_seed(0)
    model = TinyFusion(norm=True)
    model.lidar[1].running_mean.fill_(1e3)
    names = prunable_parameters(model)
    s = SynFlow(lambda: {"camera": torch.zeros(1, 2, 6, 6), "lidar": torch.zeros(1, 2, 6, 6)}, 1)(model, names)
    assert float(s["lidar.0.weight"].sum()) > 0
    assert float(model.lidar[1].running_mean[0]) == 1e3  # the user's model is untouched


def hand_loss_after_inner_step(model: LinearFusion, batch: dict, c: dict, lr: float,
                               frozen: dict | None = None) -> torch.Tensor:
    """ProsPr with one plain SGD step, written without autograd: L(theta_1(c)), theta_1 = c theta - lr g; with
    ``frozen`` the step's gradient is held at that value (the public code's detached momentum buffer) instead of
    being differentiated."""
    A, Bm, w = weights(model)
    A, Bm, w = c["camera.weight"] * A, c["lidar.weight"] * Bm, c["fuse.weight"] * w
    g = frozen if frozen is not None else hand_grads(A, Bm, w, batch)
    A, Bm, w = A - lr * g["camera.weight"], Bm - lr * g["lidar.weight"], w - lr * g["fuse.weight"]
    u, v = w[0, :2], w[0, 2:]
    y = batch["camera"] @ A.T @ u + batch["lidar"] @ Bm.T @ v
    return 0.5 * ((y - batch["target"]) ** 2).mean()


def assert_scores_are_mask_derivatives(scores: dict, model: LinearFusion, loss_at: Callable[[dict], torch.Tensor],
                                       eps: float = 1e-6) -> None:
    """Each score equals |dL/dc| at c = 1 by central differences of ``loss_at`` (mask entries c, one per weight)."""
    ones = {n: torch.ones_like(model.get_parameter(n)) for n in NAMES}
    for n in NAMES:
        for idx in range(ones[n].numel()):
            plus = {k: v.clone() for k, v in ones.items()}
            minus = {k: v.clone() for k, v in ones.items()}
            plus[n].view(-1)[idx] += eps
            minus[n].view(-1)[idx] -= eps
            fd = (loss_at(plus) - loss_at(minus)) / (2 * eps)
            assert abs(float(scores[n].view(-1)[idx]) - abs(float(fd))) < 1e-7


def test_prospr_zero_steps_is_unnormalised_snip_and_one_step_matches_finite_differences() -> None:
    model, batch = make(4)
    A, Bm, w = weights(model)
    g = hand_grads(A, Bm, w, batch)
    s0 = ProsPr(loss_fn, [batch], inner_steps=0)(model, NAMES)
    torch.testing.assert_close(s0["camera.weight"], (A * g["camera.weight"]).abs())
    lr = 0.1
    method = ProsPr(loss_fn, [batch], inner_steps=1, inner_lr=lr, momentum=0.0)
    s1 = method(model, NAMES)
    assert method.backward_passes == 2
    assert_scores_are_mask_derivatives(s1, model, lambda c: hand_loss_after_inner_step(model, batch, c, lr))


def test_imp_one_round_without_training_is_magnitude_and_rounds_keep_pruned() -> None:
    model, batch = make(5)
    mag = MagnitudeImportance()(model, NAMES)
    imp = IMP(loss_fn, [batch], rounds=1, steps_per_round=0)(model, NAMES, 0.5)
    assert all(torch.equal(imp[n], mag[n]) for n in NAMES)
    method = IMP(loss_fn, [batch], rounds=3, steps_per_round=2, lr=1e-2)
    s = method(model, NAMES, 0.75)
    dead = sum(int((t == -1).sum()) for t in s.values())
    assert dead == round(12 * (1 - 0.25 ** (2 / 3)))
    assert method.backward_passes == 6


def test_bad_method_settings_raise() -> None:
    with pytest.raises(ValueError, match="reactivation_steps"):
        AlterMOMA(loss_fn, [], reactivation_steps=0)
    with pytest.raises(ValueError, match="inner_lr"):
        ProsPr(loss_fn, [], inner_lr=0.0)
    with pytest.raises(ValueError, match="iterations"):
        SynFlow(lambda: None, iterations=0)
    model, _ = make()
    with pytest.raises(ValueError, match="batches is empty"):
        SNIP(loss_fn, [])(model, NAMES)
    with pytest.raises(ValueError, match="sparsity"):
        MagnitudeImportance()(model, NAMES, 1.0)
