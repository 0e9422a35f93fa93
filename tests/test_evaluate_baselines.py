"""Baselines: exact Shapley on hand games, efficiency, naive zero-out, LMD+SHAP = LMD (the documented reduction),
the Captum bridge against direct forwards, and bad input."""

from __future__ import annotations

import pytest
import torch

from fusionlens import decompose
from fusionlens.data.collate import collate_samples
from fusionlens.evaluate.baselines import (
    LMD,
    Captum,
    LMDShap,
    Shapley,
    exact_shapley,
    feature_means,
    make_method,
)
from fusionlens.models import build_model, preset_config
from fusionlens.spec import Prepared
from fusionlens.train.synthetic import TEST_GRID, SyntheticDataset

torch.set_num_threads(1)
SMALL = dict(grid=TEST_GRID, latent_dim=4, fusion_dim=8, decoder_width=8, head_dim=8, point_bev_channels=8)


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    model = build_model(preset_config("tiny", "camera,radar", **SMALL)).eval()
    data = SyntheticDataset(6, seed=3)
    subject = model.describe().subject()
    return model, data, subject, subject.prepare(collate_samples([data[1]]))


def _seg(subject, inputs):
    return subject.forward(Prepared(inputs))


def test_exact_shapley_hand_games():
    table = {frozenset(): 1.0, frozenset("a"): 3.0, frozenset("b"): 4.0, frozenset("ab"): 10.0}
    phi = exact_shapley(["a", "b"], lambda s: torch.tensor(table[s]))
    assert phi["a"].item() == pytest.approx(4.0) and phi["b"].item() == pytest.approx(5.0)  # 0.5*(2+6), 0.5*(3+7)
    assert phi["bias"].item() == 1.0
    weights = {"x": 1.0, "y": -2.0, "z": 0.5}  # additive game: each player's value is its own weight
    calls = []

    def additive(s):
        calls.append(s)
        return torch.tensor(sum(weights[p] for p in s) + 7.0)

    phi = exact_shapley(list(weights), additive)
    assert len(calls) == 8  # 2^M evaluations, each subset once
    for p, w in weights.items():
        assert phi[p].item() == pytest.approx(w)


def test_shapley_efficiency_and_naive_zero_out(setup):
    model, _, subject, x = setup
    phi = Shapley().attribute(subject, x)
    out = _seg(subject, x.inputs)
    torch.testing.assert_close(sum(phi.values()), out, atol=1e-5, rtol=0)
    zeros = {m: torch.zeros_like(t) for m, t in x.inputs.items()}
    torch.testing.assert_close(phi["bias"], _seg(subject, zeros))
    naive, _ = make_method("naive").clean(subject, x)
    cam_only = _seg(subject, {**zeros, "camera": x.inputs["camera"]})
    torch.testing.assert_close(naive["camera"], cam_only - _seg(subject, zeros), atol=1e-6, rtol=0)


def test_lmd_shap_reduces_to_lmd_components(setup):
    _, data, subject, x = setup
    lmd, _ = LMD("paper", "frozen").clean(subject, x)
    shap, state = LMDShap("paper", "frozen").clean(subject, x)
    for name in ("camera", "radar", "bias"):
        torch.testing.assert_close(shap[name], lmd[name], atol=1e-5, rtol=0)
    # mean baseline: phi_m = J_m (x_m - z_m), the frozen LMD component of the difference
    means = feature_means(subject, data)
    shap_mean, _ = LMDShap("paper", "frozen", "mean", means).clean(subject, x)
    coefficients = state[0]
    diff = {m: x.inputs[m] - means[m] for m in x.inputs}
    frozen = decompose(subject.module, diff, coefficients=coefficients)
    for name in ("camera", "radar"):
        torch.testing.assert_close(shap_mean[name], frozen.components[name], atol=1e-5, rtol=0)


def test_no_linearization_baseline_row(setup):
    _, _, subject, x = setup
    maps, _ = LMD("none", "recomputed").clean(subject, x)
    assert set(maps) == {"camera", "radar", "bias"}
    # components through the original nonlinear layers: the bias holds the (non-zero) interaction left over, so the
    # sum is the output by construction: a NaN guard (the ablation rows' values: test_decompose_zoo.py)
    torch.testing.assert_close(sum(maps.values()), _seg(subject, x.inputs), atol=1e-5, rtol=0)


def test_lmd_shap_frozen_perturbation_keeps_other_modality(setup):
    _, data, subject, x = setup
    other = subject.prepare(collate_samples([data[4]]))
    method = LMDShap("paper", "frozen")
    clean, state = method.clean(subject, x)
    pert = method.perturbed(subject, subject.swap(x, other, "radar"), state)
    torch.testing.assert_close(pert["camera"], clean["camera"], atol=1e-5, rtol=0)


def test_captum_bridge_matches_direct_forwards(setup):
    _, _, subject, x = setup
    zeros = {m: torch.zeros_like(t) for m, t in x.inputs.items()}
    out = _seg(subject, x.inputs)
    ablation = Captum("feature-ablation").attribute(subject, x)
    for m in x.inputs:  # FeatureAblation: F(x) - F(x with m at the baseline), per pixel
        torch.testing.assert_close(ablation[m], out - _seg(subject, {**x.inputs, m: zeros[m]}), atol=1e-5, rtol=0)
    sampled = Captum("shapley-sampling", n_samples=4).attribute(subject, x)
    torch.testing.assert_close(sum(sampled.values()), out, atol=1e-5, rtol=0)  # every permutation is efficient
    # two players: each sampled permutation adds camera either first or last; the mean lies between the two
    first = _seg(subject, {**zeros, "camera": x.inputs["camera"]}) - _seg(subject, zeros)
    last = out - _seg(subject, {**zeros, "radar": x.inputs["radar"]})
    lo, hi = torch.minimum(first, last), torch.maximum(first, last)
    assert bool(((sampled["camera"] >= lo - 1e-5) & (sampled["camera"] <= hi + 1e-5)).all())


def test_bad_settings():
    with pytest.raises(ValueError, match="unknown method"):
        make_method("gradcam")
    with pytest.raises(ValueError, match="means"):
        Shapley("mean")
    with pytest.raises(ValueError, match="baseline"):
        Shapley("median")
    with pytest.raises(ValueError, match="captum kind"):
        Captum("integrated-gradients")
    with pytest.raises(ValueError, match="mode"):
        LMD("paper", "thawed")
    with pytest.raises(ValueError, match="unknown rules"):
        make_method("lmd:bn-magic")
    model = build_model(preset_config("tiny", "radar,lidar", **SMALL))
    with pytest.raises(ValueError, match="level='fusion'"):
        feature_means(model.describe().subject("input"), SyntheticDataset(2))
    assert make_method("lmd:sum-splitting", mode="recomputed").name == "lmd[sum-splitting]/recomputed"
