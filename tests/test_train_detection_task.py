"""`--task detection|both` and `--point-encoder`: the CLI builds a CenterPoint-headed model, trains only the
losses asked for, and `evaluate` reports nuScenes mAP/NDS next to IoU."""

from __future__ import annotations

import json

import pytest

from fusionlens.cli import main
from fusionlens.models import preset_config
from fusionlens.train import TrainConfig, load_model, train
from fusionlens.train.synthetic import TEST_GRID, SyntheticDataset

SMALL = dict(grid=TEST_GRID, latent_dim=4, fusion_dim=8, decoder_width=8, head_dim=8, point_bev_channels=8)


def test_cli_detection_task_with_pillars_trains_and_reports_map(tmp_path, capsys):
    ckpt = tmp_path / "det.pt"
    common = ["--data", "synthetic", "--no-progress"]
    assert main(["train", "--modalities", "lidar", "--task", "both", "--point-encoder", "lidar=pillars",
                 "--train-size", "4", "--val-size", "0", "--steps", "2", "--batch-size", "2", "--out", str(ckpt),
                 *common]) == 0
    model, payload = load_model(ckpt)
    assert model.config.point_encoders == {"lidar": "pillars"} and "centerpoint" in model.config.extra_heads
    assert payload["train_config"]["task"] == "both"
    capsys.readouterr()
    out = tmp_path / "eval.json"
    assert main(["evaluate", "--checkpoint", str(ckpt), "--size", "2", "--out", str(out), *common]) == 0
    report = json.loads(out.read_text())
    assert "all" in report["iou"]
    det = report["detection"]  # nuScenes' mAP: over the classes, of each class's mean AP over the distance thresholds
    aps = {c: sum(by_distance.values()) / len(by_distance) for c, by_distance in det["label_aps"].items()}
    assert det["class_aps"] == pytest.approx(aps) and det["mAP"] == pytest.approx(sum(aps.values()) / len(aps))
    assert sum(det["num_gt"].values()) > 0  # the two val samples hold boxes to match


def test_detection_task_without_head_is_refused_before_work():
    config = preset_config("tiny", "lidar", **SMALL)
    with pytest.raises(ValueError, match="needs a detection head"):
        train(config, TrainConfig(steps=1, task="detection"), SyntheticDataset(2), progress=False)
    with pytest.raises(ValueError, match="task must be one of"):
        TrainConfig(task="tracking")
