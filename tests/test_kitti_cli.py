"""The KITTI commands: export the world as a KITTI split, train the AVOD-style detector on it and evaluate it."""

from __future__ import annotations

import json

from fusionlens.cli import main


def test_export_train_evaluate(tmp_path, capsys):
    root, ckpt, report = tmp_path / "kitti", tmp_path / "avod.pt", tmp_path / "eval.json"
    assert main(["kitti", "export", "--out", str(root), "--train", "2", "--val", "1", "--image-size", "64", "112",
                 "--no-progress"]) == 0
    assert (root / "ImageSets" / "val.txt").read_text().split() == ["000002"]
    assert main(["train", "--data", "kitti", "--dataroot", str(root), "--model", "avod", "--steps", "3",
                 "--batch-size", "1", "--out", str(ckpt), "--no-progress", "--val-size", "0"]) == 0
    capsys.readouterr()
    assert main(["evaluate", "--data", "kitti", "--dataroot", str(root), "--checkpoint", str(ckpt),
                 "--out", str(report)]) == 0
    saved = json.loads(report.read_text())
    assert saved["samples"] == 1 and saved["modalities"] == ["camera", "lidar"]
    assert set(saved["kitti"]["ap"]) == {"bbox", "bev", "3d"}
    assert "Car" in capsys.readouterr().out


def test_bad_kitti_options_are_named(tmp_path, capsys):
    assert main(["train", "--data", "kitti", "--model", "avod", "--steps", "1", "--out", str(tmp_path / "m.pt")]) == 2
    assert "KITTI data need --dataroot" in capsys.readouterr().err
    assert main(["train", "--data", "kitti", "--dataroot", str(tmp_path), "--model", "avod", "--modalities",
                 "camera,radar", "--out", str(tmp_path / "m.pt")]) == 2
    assert "choose from camera,lidar" in capsys.readouterr().err
    assert main(["train", "--data", "kitti", "--dataroot", str(tmp_path / "none"), "--model", "avod",
                 "--out", str(tmp_path / "m.pt")]) == 2
    assert "KITTI dataroot" in capsys.readouterr().err
    assert main(["evaluate", "--data", "kitti", "--dataroot", str(tmp_path), "--checkpoint",
                 str(tmp_path / "absent.pt")]) == 2
    assert "absent.pt" in capsys.readouterr().err


def test_reproduce_altermoma_task_kitti(tmp_path, capsys):
    root = tmp_path / "kitti"
    assert main(["reproduce", "altermoma", "--task", "kitti", "--out", str(tmp_path / "r")]) == 2
    assert "KITTI data need --dataroot" in capsys.readouterr().err
    assert main(["kitti", "export", "--out", str(root), "--train", "2", "--val", "1", "--image-size", "64", "112",
                 "--no-progress"]) == 0
    assert main(["reproduce", "altermoma", "--task", "kitti", "--dataroot", str(root), "--out", str(tmp_path / "r"),
                 "--methods", "snip", "--sparsities", "0.9", "--seeds", "0", "--reference-steps", "2",
                 "--finetune-steps", "1", "--no-progress"]) == 0
    tables = (tmp_path / "r" / "kitti" / "tables.md").read_text()
    assert "| Car | SNIP | 1 |" in tables and "/ 62.7 |" in tables  # the paper's SNIP AP-3D easy at 90 %
