"""Perturbation metrics (appendix D.2): pairing, PCC/MSE oracles, frozen-mode invariants, a hand-computed anchor,
level equivalence, calibration swapping, bad input, and the batched path against one decomposition per input."""

from __future__ import annotations

import math

import pytest
import torch

from fusionlens import decompose
from fusionlens.data.collate import collate_samples
from fusionlens.evaluate.baselines import LMD, concat_prepared
from fusionlens.evaluate.separation import (
    Subject,
    metric_key,
    mse,
    pairing_offsets,
    pcc,
    perturbation_metrics,
    visiting_order,
)
from fusionlens.models import batch_to_inputs, build_model, preset_config
from fusionlens.train.synthetic import TEST_GRID, SyntheticDataset

torch.set_num_threads(1)
SMALL = dict(grid=TEST_GRID, latent_dim=4, fusion_dim=8, decoder_width=8, head_dim=8, point_bev_channels=8)


def tiny(mods: str = "camera,radar"):
    torch.manual_seed(0)
    return build_model(preset_config("tiny", mods, **SMALL)).eval()


def test_pairing_offsets_default_stride_and_errors():
    assert pairing_offsets(26) == [2 * j for j in range(1, 13)]  # stride 26 // 13 = 2
    assert pairing_offsets(6019) == [(463 * j) % 6019 for j in range(1, 13)]
    assert pairing_offsets(10, count=3, stride=3) == [3, 6, 9]
    with pytest.raises(ValueError, match="at least 13 samples"):
        pairing_offsets(12)
    with pytest.raises(ValueError, match="too few samples"):
        pairing_offsets(10, count=2, stride=5)  # 5, 10 = 0 mod 10
    with pytest.raises(ValueError, match="too few samples"):
        pairing_offsets(4, count=5, stride=1)  # only 3 distinct partners exist
    with pytest.raises(ValueError, match="count"):
        pairing_offsets(30, count=0)


def test_pcc_and_mse_hand_values():
    a = torch.tensor([1.0, 2.0, 3.0, 4.0])
    assert pcc(a, 2 * a + 5) == pytest.approx(1.0)
    assert pcc(a, -a) == pytest.approx(-1.0)
    assert pcc(a, torch.tensor([1.0, -1.0, -1.0, 1.0])) == pytest.approx(0.0)
    assert math.isnan(pcc(a, torch.ones(4)))
    assert mse(torch.zeros(2), torch.tensor([1.0, 3.0])) == pytest.approx(5.0)
    assert metric_key("radar", "camera") == "Rp/C" and metric_key("lidar", "lidar") == "Lp/L"


def test_fusion_level_equals_full_model_decomposition():
    model, data = tiny(), SyntheticDataset(2, seed=0)
    batch = collate_samples([data[0]])
    inputs, kwargs = batch_to_inputs(model, batch)
    full = decompose(model, inputs, forward_kwargs=kwargs)
    subject = model.describe().subject("fusion")
    x = subject.prepare(batch)
    fused = decompose(subject.module, x.inputs, forward_kwargs=x.kwargs)
    for name in full.names:
        torch.testing.assert_close(fused.components[name], full.components[name]["seg"], rtol=0, atol=1e-6)


def test_swap_replaces_calibration_and_valid_masks():
    model, data = tiny(), SyntheticDataset(4, seed=0)
    subject = model.describe().subject("input")
    clean = subject.prepare(collate_samples([data[0]]))
    other = subject.prepare(collate_samples([data[3]]))
    other.kwargs["intrinsics"] = other.kwargs["intrinsics"] * 2  # make the calibrations distinguishable
    cam = subject.swap(clean, other, "camera")
    assert cam.inputs["camera"] is other.inputs["camera"] and cam.inputs["radar"] is clean.inputs["radar"]
    assert cam.kwargs["intrinsics"] is other.kwargs["intrinsics"]
    assert cam.kwargs["radar_valid"] is clean.kwargs["radar_valid"]
    rad = subject.swap(clean, other, "radar")
    assert rad.kwargs["radar_valid"] is other.kwargs["radar_valid"] and rad.kwargs["intrinsics"] is clean.kwargs[
        "intrinsics"]
    with pytest.raises(ValueError, match="lidar"):
        subject.swap(clean, other, "lidar")


def test_frozen_mode_keeps_the_unperturbed_modality_exactly():
    model, data = tiny(), SyntheticDataset(14, seed=1)
    res = perturbation_metrics(model, data, LMD("paper", "frozen"), count=3, stride=4, anchors=[0, 5],
                               progress=False)
    s = res.summary()
    assert s["pcc"]["Rp/C"][0] == pytest.approx(1.0, abs=1e-9) and s["mse"]["Rp/C"][0] == 0.0
    assert s["pcc"]["Cp/R"][0] == pytest.approx(1.0, abs=1e-9) and s["mse"]["Cp/R"][0] == 0.0
    assert s["pcc"]["Rp/R"][0] < 0.999 and s["mse"]["Rp/R"][0] > 0  # the perturbed modality does change
    assert res.anchors == [0, 5] and res.stride == 4 and res.n == 14
    assert "Rp/C" in res.to_markdown() and res.to_dict()["summary"]["pcc"]["Rp/C"][2] == 2


def test_recomputed_metrics_match_a_hand_computed_anchor():
    model, data = tiny(), SyntheticDataset(13, seed=2)
    res = perturbation_metrics(model, data, LMD("paper", "recomputed"), count=2, anchors=[3], progress=False)
    subject = model.describe().subject()
    prep = [subject.prepare(collate_samples([data[i]])) for i in range(13)]

    clean = decompose(subject.module, prep[3].inputs).components["camera"]
    expected_pcc, expected_mse = [], []
    for partner in (4, 5):  # stride 13 // 13 = 1: partners 3 + 1, 3 + 2
        swapped = {**prep[3].inputs, "radar": prep[partner].inputs["radar"]}
        a, b = clean, decompose(subject.module, swapped).components["camera"]
        expected_pcc.append(pcc(a, b))
        expected_mse.append(mse(a, b))
    assert res.pcc[0]["Rp/C"] == pytest.approx(sum(expected_pcc) / 2, rel=1e-9)
    assert res.mse[0]["Rp/C"] == pytest.approx(sum(expected_mse) / 2, rel=1e-9)


def test_bad_input_is_rejected_before_work():
    model, data = tiny(), SyntheticDataset(14, seed=0)
    method = LMD("paper", "frozen")
    with pytest.raises(ValueError, match="lidar"):
        perturbation_metrics(model, data, method, perturbed=["lidar"], progress=False)
    with pytest.raises(ValueError, match="anchors"):
        perturbation_metrics(model, data, method, anchors=[14], progress=False)
    with pytest.raises(ValueError, match="at least 13"):
        perturbation_metrics(model, SyntheticDataset(5), method, progress=False)
    with pytest.raises(ValueError, match="level"):
        model.describe().subject("pixels")
    with pytest.raises(ValueError, match="naive"):
        LMD("naive", "frozen")


class OneAtATime:
    """The method without ``perturbed_many``: one ``perturbed`` call per (partner, perturbed modality), as
    before the batched path."""

    def __init__(self, method) -> None:
        self.method, self.name = method, method.name

    def clean(self, subject, x):
        return self.method.clean(subject, x)

    def perturbed(self, subject, x, state):
        return self.method.perturbed(subject, x, state)


def _same_rows(a, b, rel=1e-9):
    assert a.anchors == b.anchors and a.keys == b.keys
    for rows_a, rows_b in ((a.pcc, b.pcc), (a.mse, b.mse)):
        for ra, rb in zip(rows_a, rows_b):
            for key in a.keys:
                assert (math.isnan(ra[key]) and math.isnan(rb[key])) or ra[key] == pytest.approx(rb[key], rel=rel,
                                                                                                 abs=1e-12)


@pytest.mark.parametrize("mode", ["frozen", "recomputed"])
@pytest.mark.parametrize("level, perturbed", [("fusion", None), ("fusion", ["radar"]), ("input", None)])
def test_batched_path_gives_the_one_at_a_time_metrics(mode, level, perturbed):
    """LMD.perturbed_many (frozen: one output-free replay per partner for every perturbed modality, the others'
    maps the clean ones; recomputed: swapped inputs decomposed together) against one decomposition per perturbed
    input, for several batch sizes; at the input level point clouds of different sizes are decomposed apart."""
    model, data = tiny(), SyntheticDataset(14, seed=3)
    kw = dict(count=3, stride=4, anchors=[0, 5, 9], perturbed=perturbed, level=level, progress=False)
    reference = perturbation_metrics(model, data, OneAtATime(LMD("paper", mode)), **kw)
    for batch_size in (None, 1, 3):
        # A frozen batch replays each sample as alone; a recomputed one decomposes each sample exactly up to float32
        # rounding (MSEs of small map differences show it in their 6th digit), hence the default batch size of 1.
        rel = 1e-4 if mode == "recomputed" and batch_size == 3 else 1e-6
        _same_rows(perturbation_metrics(model, data, LMD("paper", mode, batch_size=batch_size), **kw), reference, rel)


@pytest.mark.parametrize("rules", ["sum-splitting", "none", "naive"])
def test_batched_path_for_other_rules(rules):
    model, data = tiny(), SyntheticDataset(14, seed=4)
    mode = "recomputed" if rules == "naive" else "frozen"
    kw = dict(count=2, stride=3, anchors=[1, 7], progress=False)
    reference = perturbation_metrics(model, data, OneAtATime(LMD(rules, mode)), **kw)
    _same_rows(perturbation_metrics(model, data, LMD(rules, mode, batch_size=2), **kw), reference,
               1e-4 if mode == "recomputed" else 1e-6)


def test_batched_decompositions_conserve_and_match_single_ones():
    model, data = tiny(), SyntheticDataset(4, seed=5)
    subject = model.describe().subject()
    xs = [subject.prepare(collate_samples([data[i]])) for i in range(3)]
    joined = concat_prepared(xs)
    together = decompose(subject.module, joined.inputs)
    assert together.conservation_error().relative <= 1e-5
    clean = decompose(subject.module, xs[0].inputs, record_coefficients=True)
    replayed = decompose(subject.module, joined.inputs, coefficients=clean.coefficients)
    assert replayed.conservation_error().relative <= 1e-5
    for i, x in enumerate(xs):
        alone = decompose(subject.module, x.inputs)
        for name in alone.names:
            torch.testing.assert_close(together.components[name][i:i + 1], alone.components[name],
                                       rtol=1e-5, atol=1e-5)
    raw = model.describe().subject("input")
    a, b = (raw.prepare(collate_samples([data[i]])) for i in (0, 1))
    if a.inputs["radar"].shape != b.inputs["radar"].shape:
        assert concat_prepared([a, b]) is None  # point clouds of different sizes: decomposed one by one
    with pytest.raises(ValueError, match="batch_size"):
        LMD("paper", "frozen", batch_size=0)


def test_visiting_order_runs_and_one_preparation_per_sample(monkeypatch):
    assert visiting_order([0, 1, 2, 3, 4, 5], 6, 2) == [0, 2, 4, 1, 3, 5]
    assert visiting_order([6, 4, 2], 10, 2) == [2, 4, 6]  # back to the start of the run
    assert visiting_order([4, 0, 2], 6, 2) == [4, 0, 2]  # a whole cycle: it starts where it is met
    assert visiting_order([2, 1, 2], 10, 1) == [1, 2, 2]  # duplicates kept
    assert sorted(visiting_order(list(range(40)), 40, 7)) == list(range(40))  # one cycle through all
    model, data = tiny(), SyntheticDataset(26, seed=0)
    prepared = []
    original = Subject.prepare
    monkeypatch.setattr(Subject, "prepare", lambda self, batch: prepared.append(1) or original(self, batch))
    res = perturbation_metrics(model, data, LMD("paper", "frozen"), progress=False)  # stride 2, count 12
    assert res.anchors == list(range(26))  # rows in the order of the anchors, whatever the visiting order
    assert len(prepared) == 26  # every sample once (anchors in order 0, 1, 2, ... prepared ~13 per anchor)
