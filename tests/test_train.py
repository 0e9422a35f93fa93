"""Training loop, losses, IoU, checkpoints: hand-computed oracles, exact resume, clear errors."""

from __future__ import annotations

import math

import pytest
import torch

from fusionlens.models import build_model, preset_config
from fusionlens.train.checkpoint import load_checkpoint, load_model, load_model_state
from fusionlens.train.distributed import DistInfo
from fusionlens.train.loop import NonFiniteLossError, StepSampler, TrainConfig, evaluate, train
from fusionlens.train.losses import LossConfig, masked_mean, simplebev_loss
from fusionlens.train.metrics import IoUAccumulator, condition_tags
from fusionlens.train.synthetic import TEST_GRID, SyntheticDataset

torch.set_num_threads(1)
SMALL = dict(grid=TEST_GRID, latent_dim=4, fusion_dim=8, decoder_width=8, head_dim=8, point_bev_channels=8)
CFG = preset_config("tiny", "radar,lidar", **SMALL)


def test_masked_mean_and_seg_loss_by_hand() -> None:
    v = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    assert masked_mean(v, torch.tensor([[1.0, 0.0], [0.0, 1.0]])) == pytest.approx(2.5)
    assert masked_mean(v, torch.zeros(2, 2)) == 0.0
    logits = torch.tensor([0.0, 2.0]).reshape(1, 1, 1, 2)
    batch = {
        "bev_seg": torch.tensor([1.0, 0.0]).reshape(1, 1, 1, 2),
        "bev_valid": torch.ones(1, 1, 1, 2),
        "bev_center": torch.zeros(1, 1, 1, 2),
        "bev_offset": torch.zeros(1, 2, 1, 2),
    }
    out = {"seg": logits, "center": torch.zeros(1, 1, 1, 2), "offset": torch.zeros(1, 2, 1, 2)}
    terms = simplebev_loss(out, batch, LossConfig(pos_weight=2.0))
    expected = (2.0 * math.log(2.0) + math.log(1 + math.exp(2.0))) / 2  # pos-weighted BCE, mean over valid
    assert terms["seg"] == pytest.approx(expected, rel=1e-6)
    assert terms["center"] == pytest.approx(0.5 * 0.25)  # only the "far" half is non-empty: (0.5 - 0)^2
    assert terms["offset"] == 0.0  # predicted = true offsets
    batch["bev_valid"] = torch.tensor([1.0, 0.0]).reshape(1, 1, 1, 2)  # masked cells do not count
    assert simplebev_loss(out, batch, LossConfig(pos_weight=2.0))["seg"] == pytest.approx(2.0 * math.log(2.0))


def test_iou_accumulates_over_the_set_not_per_sample() -> None:
    acc = IoUAccumulator(TEST_GRID, distance_bands=(0.0, 10.0, math.inf))
    X, Y, _ = TEST_GRID.shape
    pred, gt, valid = torch.full((2, 1, X, Y), -1.0), torch.zeros(2, 1, X, Y), torch.ones(2, 1, X, Y)
    pred[0, 0, 0, :4] = 1.0  # sample 0: 4 predicted corner cells (far), 2 of them true -> 2/4
    gt[0, 0, 0, :2] = 1.0
    pred[1, 0, 16, 16] = 1.0  # sample 1: 1 centre cell (near), true, plus a missed true cell -> 1/2
    gt[1, 0, 16, 16:18] = 1.0
    valid[1, 0, 0, 0] = 0.0  # invalid cells are ignored
    pred[1, 0, 0, 0] = 1.0
    acc.update(
        pred,
        gt,
        valid,
        [
            {"conditions": {"weather": "rain"}, "faults": []},
            {"conditions": {"weather": "fog"}, "faults": ["radar_dropout"]},
        ],
    )
    iou = acc.compute()
    assert iou["all"] == pytest.approx(3 / 6)  # not the mean of 1/2 and 1/2 by accident: check a third sample
    acc.update(pred[:1], gt[:1] * 0, valid[:1], [{}])  # 4 false positives, no truth
    assert acc.compute()["all"] == pytest.approx(3 / 10)
    assert iou["cond/weather=rain"] == pytest.approx(0.5) and iou[
        "cond/fault=radar_dropout"
    ] == pytest.approx(0.5)
    assert iou["dist/0-10m"] == pytest.approx(1 / 2) and iou["dist/10-infm"] == pytest.approx(2 / 4)
    assert condition_tags({"conditions": "night", "faults": {"a": True, "b": False}}) == ["night", "fault=a"]
    with pytest.raises(ValueError, match="shapes differ"):
        acc.update(pred, gt[:1], valid)


def test_step_sampler_shards_one_global_order() -> None:
    single = StepSampler(10, 4, 3, 0, 5, DistInfo())
    r0 = StepSampler(10, 2, 3, 0, 5, DistInfo(0, 2, 0))
    r1 = StepSampler(10, 2, 3, 0, 5, DistInfo(1, 2, 0))
    for step in range(5):
        assert single.indices(step) == r0.indices(step) + r1.indices(step)
    flat = [i for s in range(5) for i in single.indices(s)]
    assert sorted(flat[:10]) == list(range(10)) and sorted(flat[10:20]) == list(range(10))  # epochs


def test_training_learns_and_checkpoint_round_trips(tmp_path) -> None:
    ds, val = SyntheticDataset(24), SyntheticDataset(8, seed=1)
    res = train(
        CFG,
        TrainConfig(steps=40, batch_size=4, lr=1e-2),
        ds,
        val_set=val,
        checkpoint=tmp_path / "m.pt",
        progress=False,
    )
    assert len(res.losses) == 40 and all(math.isfinite(x) for x in res.losses)
    assert sum(res.losses[-5:]) < 0.6 * sum(res.losses[:5])
    assert res.metrics["all"] > 0.0 and (tmp_path / "m.metrics.json").is_file()
    model, payload = load_model(tmp_path / "m.pt")
    assert payload["step"] == 40 and payload["metrics"]["all"] == res.metrics["all"]
    assert evaluate(model, val, progress=False) == pytest.approx(res.metrics, nan_ok=True)
    other = build_model(preset_config("tiny", "radar", **SMALL))
    with pytest.raises(ValueError, match="modalities"):
        load_model_state(other, payload)


def test_resume_reproduces_the_uninterrupted_loss_curve(tmp_path) -> None:
    ds = SyntheticDataset(12)
    cfg = TrainConfig(steps=8, batch_size=2, lr=1e-2, save_every=4)
    full = train(CFG, cfg, ds, checkpoint=tmp_path / "full.pt", progress=False)
    part = tmp_path / "part.pt"

    def stop_at_5(model, step):  # simulate a crash after the step-4 checkpoint was written
        if step == 5:
            raise KeyboardInterrupt("simulated crash")

    with pytest.raises(KeyboardInterrupt, match="simulated crash"):
        train(CFG, cfg, ds, checkpoint=part, step_hook=stop_at_5, progress=False)
    assert load_checkpoint(part)["step"] == 4
    resumed = train(CFG, cfg, ds, checkpoint=part, resume=True, progress=False)
    assert resumed.losses == full.losses
    a, b = load_checkpoint(tmp_path / "full.pt")["model"], load_checkpoint(part)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ValueError, match="steps: now 9 vs saved 8"):
        train(
            CFG, TrainConfig(steps=9, batch_size=2, lr=1e-2), ds, checkpoint=part, resume=True, progress=False
        )
    with pytest.raises(ValueError, match="different model config"):
        train(preset_config("tiny", "radar", **SMALL), cfg, ds, checkpoint=part, resume=True, progress=False)
    with pytest.raises(FileNotFoundError, match="--resume"):
        train(CFG, cfg, ds, checkpoint=tmp_path / "none.pt", resume=True, progress=False)


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path) -> None:
    ds = SyntheticDataset(8)

    def poison(model, step):
        if step == 3:
            with torch.no_grad():
                model.heads["seg"].out.bias.fill_(float("nan"))

    path = tmp_path / "m.pt"
    with pytest.raises(NonFiniteLossError, match=r"at step 3; .*last good checkpoint: .*m\.pt"):
        train(
            CFG,
            TrainConfig(steps=6, batch_size=2, save_every=2),
            ds,
            checkpoint=path,
            step_hook=poison,
            progress=False,
        )
    payload = load_checkpoint(path)
    assert payload["step"] == 2 and all(
        torch.isfinite(v).all() for v in payload["model"].values() if v.is_floating_point()
    )


def test_bad_training_input_is_rejected_before_work(tmp_path) -> None:
    with pytest.raises(ValueError, match="grid"):
        train(preset_config("tiny", "radar"), TrainConfig(steps=1), SyntheticDataset(2), progress=False)
    with pytest.raises(ValueError, match="steps"):
        TrainConfig(steps=0)
    with pytest.raises(ValueError, match="pct_start"):
        TrainConfig(pct_start=1.5)
    with pytest.raises(FileNotFoundError, match="checkpoint: no such file .*missing.pt"):
        load_checkpoint(tmp_path / "missing.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(Exception, match="junk.pt|load"):
        load_checkpoint(tmp_path / "junk.pt")
