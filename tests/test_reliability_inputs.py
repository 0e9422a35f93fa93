"""Every file the CLI reads is validated with one ``error:`` line naming the file, what it is and what was expected
(no traceback); non-finite and unbounded options are refused before any work."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import torchvision

from fusionlens.cli import main
from fusionlens.io import describe_torch_file, load_torch_file
from fusionlens.models import build_model, preset_config
from fusionlens.train.checkpoint import save_checkpoint
from fusionlens.train.loop import TrainConfig, train
from fusionlens.train.synthetic import TEST_GRID, SyntheticDataset

SMALL = dict(grid=TEST_GRID, latent_dim=4, fusion_dim=8, decoder_width=8, head_dim=8, point_bev_channels=8,
             image_size=(32, 48))
TRAIN = ["train", "--data", "synthetic", "--steps", "2", "--batch-size", "1", "--train-size", "2",
         "--val-size", "0", "--no-progress"]
EXPECTED = "not a fusionlens checkpoint (fusionlens-checkpoint-v1, written by fusionlens train)"
BAD_FILES = {
    "random": (os.urandom(512), "is not a PyTorch file (it starts with bytes"),
    "json": (b'{"checkpoint": "model.pt"}\n', "is a JSON file"),
    "empty": (b"", "is an empty file (0 bytes)"),
}


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A 2-step training checkpoint (optimizer, scheduler and RNG state included) of a tiny camera-radar model."""
    path = tmp_path_factory.mktemp("ckpt") / "cr.pt"
    torch.manual_seed(0)
    config = preset_config("tiny", "camera,radar", **SMALL)
    train(config, TrainConfig(steps=2, batch_size=1), SyntheticDataset(2, seed=0), checkpoint=path, progress=False)
    return path


def run_cli(argv: list[str], capsys) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("\n") == 1, err
    return err


@pytest.mark.parametrize("kind", sorted(BAD_FILES))
@pytest.mark.parametrize("command", ["evaluate", "explain", "prune", "train --resume", "train --init-from"])
def test_a_checkpoint_that_is_not_one_is_named_with_what_it_is(command, kind, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    data, what = BAD_FILES[kind]
    bad = tmp_path / "bad.pt"
    bad.write_bytes(data)
    argv = {
        "evaluate": ["evaluate", "--checkpoint", str(bad), "--data", "synthetic"],
        "explain": ["explain", "--checkpoint", str(bad), "--data", "synthetic", "--out", str(tmp_path / "e")],
        "prune": ["prune", "--checkpoint", str(bad), "--data", "synthetic", "--out", str(tmp_path / "p.pt")],
        "train --resume": [*TRAIN, "--out", str(bad), "--resume"],
        "train --init-from": [*TRAIN, "--out", str(tmp_path / "t.pt"), "--init-from", f"radar={bad}"],
    }[command]
    err = run_cli(argv, capsys)
    assert f"error: checkpoint {bad} {what}" in err and err.rstrip().endswith(EXPECTED)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.pt"] and bad.read_bytes() == data


@pytest.mark.parametrize("kind", sorted(BAD_FILES))
def test_a_kitti_detector_checkpoint_that_is_not_one(kind, tmp_path, capsys):
    data, what = BAD_FILES[kind]
    bad = tmp_path / "bad.pt"
    bad.write_bytes(data)
    err = run_cli(["evaluate", "--data", "kitti", "--dataroot", str(tmp_path), "--checkpoint", str(bad)], capsys)
    assert f"error: checkpoint {bad} {what}" in err
    assert err.rstrip().endswith("not an AVOD checkpoint (fusionlens train --model avod)")


def test_truncated_and_damaged_checkpoints(trained, tmp_path):
    data = trained.read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"cut.pt is a truncated or damaged PyTorch file, not a fusionlens"):
        load_torch_file(tmp_path / "cut.pt", what="checkpoint", expected="a fusionlens checkpoint")
    # zip directory intact, a record's bytes overwritten: torch reports a CRC/record error, we name the file
    start = data.index(b"data.pkl") + 40
    (tmp_path / "flipped.pt").write_bytes(data[:start] + bytes(64) + data[start + 64:])
    with pytest.raises(ValueError, match=r"flipped.pt is (an unreadable PyTorch file|a truncated or damaged)"):
        load_torch_file(tmp_path / "flipped.pt", what="checkpoint", expected="a fusionlens checkpoint")
    assert describe_torch_file(data) == "a fusionlens-checkpoint-v1 file"


def test_a_training_checkpoint_given_as_camera_weights(trained, tmp_path, capsys):
    err = run_cli([*TRAIN, "--out", str(tmp_path / "t.pt"), "--camera-weights", str(trained)], capsys)
    assert (f"error: camera_weights {trained} is a fusionlens-checkpoint-v1 file, not a torchvision resnet18 state "
            "dict (e.g. written by fusionlens pretrain camera)") in err
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ValueError, match="camera_weights .* is a fusionlens-checkpoint-v1 file, not a torchvision"):
        build_model(preset_config("tiny", "camera", camera_weights=str(trained), **SMALL))
    wrong = tmp_path / "r34.pt"  # a state dict of another depth, found before any data is built
    torch.save(torchvision.models.resnet34(weights=None).state_dict(), wrong)
    err = run_cli([*TRAIN, "--out", str(tmp_path / "t.pt"), "--camera-weights", str(wrong)], capsys)
    assert f"camera_weights {wrong} is not a resnet18 state dict: missing [" in err


def test_a_pruned_checkpoint_given_to_resume(trained, tmp_path, capsys):
    pruned = tmp_path / "pruned.pt"
    assert main(["prune", "--checkpoint", str(trained), "--method", "random", "--sparsity", "0.5", "--finetune-steps",
                 "0", "--data", "synthetic", "--train-size", "2", "--val-size", "0", "--out", str(pruned),
                 "--no-progress"]) == 0
    pruned.with_suffix(".json").unlink()
    capsys.readouterr()
    before = pruned.read_bytes()
    err = run_cli([*TRAIN, "--out", str(pruned), "--resume"], capsys)
    assert (f"error: --resume: {pruned} is a pruned checkpoint (written by fusionlens prune) without the training "
            "state a resume needs (optimizer, scheduler)") in err
    assert pruned.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["pruned.pt"]
    with pytest.raises(ValueError, match="is a pruned checkpoint"):  # the library refuses it too
        train(preset_config("tiny", "camera,radar", **SMALL), TrainConfig(steps=2, batch_size=1),
              SyntheticDataset(2, seed=0), checkpoint=pruned, resume=True, progress=False)
    assert pruned.read_bytes() == before


@pytest.mark.parametrize("flag", ["--grad-clip", "--lr", "--weight-decay"])
@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_non_finite_train_options_are_refused(flag, value, tmp_path, capsys):
    with pytest.raises(SystemExit, match="^2$") as exit_:  # argparse's usage error
        main([*TRAIN, "--out", str(tmp_path / "t.pt"), f"{flag}={value}"])  # = : "-inf" is no option
    assert exit_.value.code == 2
    assert f"argument {flag}: must be a finite number, got '{value}'" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("argv", [["prune", "--checkpoint", "x.pt", "--finetune-lr", "nan"],
                                  ["prune", "--checkpoint", "x.pt", "--method", "altermoma", "--alpha", "inf"],
                                  ["pretrain", "camera", "--lr", "nan"]])
def test_non_finite_options_of_other_commands(argv, capsys):
    with pytest.raises(SystemExit, match="^2$"):  # argparse's usage error
        main(argv)
    assert "must be a finite number" in capsys.readouterr().err


def test_train_config_refuses_nan_in_the_library():
    with pytest.raises(ValueError, match=r"TrainConfig.grad_clip must be a finite number, got nan"):
        TrainConfig(grad_clip=float("nan"))
    with pytest.raises(ValueError, match=r"TrainConfig.lr must be a finite number, got inf"):
        TrainConfig(lr=float("inf"))


def test_explain_refuses_a_huge_sample_index_before_generating(trained, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("fusionlens.cli.explain.dataset_for", lambda *a, **k: pytest.fail("generation started"))
    err = run_cli(["explain", "--checkpoint", str(trained), "--samples", "100000000", "--out", str(tmp_path / "e")],
                  capsys)
    assert ("error: --samples 100000000 is beyond the 200 samples of the default val split; pass --size to "
            "generate a larger split") in err
    err = run_cli(["explain", "--checkpoint", str(trained), "--samples", "-1", "--out", str(tmp_path / "e")], capsys)
    assert "--samples must be >= 0, got [-1]" in err
    assert list(tmp_path.iterdir()) == []


def test_nuscenes_table_that_is_broken_json_or_of_the_wrong_structure(tmp_path, capsys):
    from fusionlens.data.nuscenes import load_nuscenes
    from nuscenes_fixture import write_test_dataset

    root = tmp_path / "nusc"
    write_test_dataset(root)
    tables = root / "v1.0-mini"
    base = [*TRAIN, "--out", str(tmp_path / "t.pt"), "--data", "nuscenes", "--dataroot", str(root),
            "--version", "v1.0-mini"]
    good = (tables / "sample.json").read_text()
    (tables / "sample.json").write_text(good[: len(good) // 2])
    load_nuscenes.cache_clear()
    err = run_cli(base, capsys)
    assert f"error: nuScenes table {tables / 'sample.json'} is not valid JSON (" in err
    (tables / "sample.json").write_text(good)
    (tables / "scene.json").write_text(json.dumps({"name": "scene-0001"}))
    load_nuscenes.cache_clear()
    err = run_cli(base, capsys)
    assert (f"error: nuScenes table {tables / 'scene.json'} has the wrong structure: expected a list of records, "
            "got a JSON dict") in err
    (tables / "scene.json").write_text(json.dumps([{"token": "a"}, ["not", "a", "record"]]))
    load_nuscenes.cache_clear()
    err = run_cli(base, capsys)
    assert "scene.json has the wrong structure: record 1 is not an object with a 'token' string" in err
    assert not (tmp_path / "t.pt").exists()


def test_reproduce_lmd_with_a_model_of_another_pair_under_the_pair_s_name(tmp_path, capsys):
    torch.manual_seed(0)
    config = preset_config("tiny", "camera,lidar", **{k: v for k, v in SMALL.items() if k != "image_size"})
    wrong = tmp_path / "ckpts" / "tiny_camera-radar.pt"
    save_checkpoint(wrong, model=build_model(config), model_config=config)
    out = tmp_path / "lmd"
    err = run_cli(["reproduce", "lmd", "--out", str(out), "--checkpoints", str(wrong.parent), "--pairs",
                   "camera-radar", "--data", "synthetic", "--seeds", "0", "--val-size", "13", "--anchors", "1",
                   "--count", "1", "--methods", "naive", "--attribution-methods", "", "--no-progress"], capsys)
    assert (f"error: checkpoint {wrong} holds a camera-lidar model, not camera-radar (--pairs camera-radar); "
            "retrain it: fusionlens train --preset tiny --modalities camera,radar") in err
    assert not list(out.glob("cells/**/*.json"))  # refused before the first cell


@pytest.mark.parametrize("text", ["{not json", "[1, 2]", '{"other": 1}'])
def test_a_damaged_settings_record_is_named(text, tmp_path):
    from fusionlens.io import claim_settings

    path = tmp_path / "protocol.json"
    path.write_text(text)
    with pytest.raises(ValueError, match=rf"^{path} is not a settings record of this kind \(.*\); it was edited or "
                                         r"damaged -- pass another --out$"):
        claim_settings(path, {"steps": 1}, under="protocol" if "other" in text else None, what="cells",
                       remedy="pass another --out")
    assert path.read_text() == text


def test_a_damaged_pretraining_state_is_named(tmp_path, capsys):
    out = tmp_path / "trunk.pt"
    state = tmp_path / "trunk.pt.state.pt"
    state.write_bytes(b"")
    err = run_cli(["pretrain", "camera", "--out", str(out), "--frames", "2", "--val-frames", "1", "--steps", "1",
                   "--batch-size", "1", "--image-size", "16", "28", "--no-progress"], capsys)
    assert (f"error: pre-training state {state} is an empty file (0 bytes), not a partial run of fusionlens pretrain "
            "camera (pass --restart to ignore it)") in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["trunk.pt.state.pt"]
