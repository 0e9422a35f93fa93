"""``fusionlens reproduce altermoma`` reference recipes, tasks and backbones: the pretrained
recipe builds trunk, single-modality models and the fusion model from their backbones, reuses every file; cells
of a detection model carry mAP / NDS and the tables show them; pillars put LiDAR parameters in the lidar group;
recipes never share cells; bad settings fail before any work. Synthetic data and 1-2 step schedules."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from fusionlens.cli import main
from fusionlens.experiments.altermoma import ReproduceConfig, Runner
from fusionlens.experiments.altermoma_report import summarise
from fusionlens.experiments.reference import reference_loss
from fusionlens.experiments.reference_models import LEGACY_VARIANT, claim_root
from fusionlens.train.checkpoint import load_checkpoint
from fusionlens.train.synthetic import SyntheticDataset

SMALL = {"latent_dim": 4, "fusion_dim": 8, "decoder_width": 8, "head_dim": 8, "point_bev_channels": 8}
PAIR = "camera,lidar"


@pytest.fixture
def synthetic(monkeypatch: pytest.MonkeyPatch) -> None:
    """The runner's data: tiny synthetic splits on the 32 x 32 test grid instead of the built-in world."""
    data = (SyntheticDataset(4), SyntheticDataset(2, seed=1))
    monkeypatch.setattr(Runner, "data", lambda self: data)


def tiny(out: Path, **changes: object) -> ReproduceConfig:
    base: dict = dict(
        out_dir=str(out), pairs=(PAIR,), methods=("snip",), sparsities=(0.8,), seeds=(0,), structured_ratios=(),
        ablation_betas=(), model_overrides=SMALL, reference_steps=2, reference_batch=2, batch_size=2,
        finetune_steps=1, trunk_frames=2, trunk_steps=1, reference_freeze_steps=2,
    )
    return ReproduceConfig(**{**base, **changes})


def _backbone(state: dict[str, torch.Tensor], modality: str) -> dict[str, torch.Tensor]:
    return {k: v for k, v in state.items() if k.startswith(f"encoders.{modality}.")}


def test_pretrained_recipe_builds_from_single_models_and_reuses_every_file(tmp_path, synthetic, monkeypatch):
    runner = Runner(tiny(tmp_path), progress=False)
    assert runner.out == tmp_path / "pretrained"
    dense = runner.dense(PAIR)
    ckpts = runner.out / "checkpoints"
    names = ("camera_trunk.pt", "tiny_camera.pt", "tiny_lidar.pt", "tiny_camera-lidar_pre.pt")
    assert all((ckpts / n).is_file() for n in names)
    assert "separately pre-trained single-modality backbones" in dense["reference"]
    assert dense["recipe"] == "pretrained" and set(dense["initialised_from"]) == {"camera", "lidar"}
    # frozen for >= all reference steps (BatchNorm statistics included): the backbones are the single models'
    fused = load_checkpoint(ckpts / "tiny_camera-lidar_pre.pt")
    for modality in ("camera", "lidar"):
        single = load_checkpoint(ckpts / f"tiny_{modality}.pt")
        theirs, ours = _backbone(single["model"], modality), _backbone(fused["model"], modality)
        assert theirs and theirs.keys() == ours.keys() and all(torch.equal(theirs[k], ours[k]) for k in theirs)
    assert single["model_config"]["camera_weights"] is None  # the trunk initialises camera models only
    assert load_checkpoint(ckpts / "tiny_camera.pt")["model_config"]["camera_weights"].endswith("camera_trunk.pt")
    assert "separately pre-trained" in summarise(runner.out).splitlines()[0]

    # a second run trains nothing: every model is a cached file
    def no_training(*args: object, **kwargs: object) -> None:
        raise AssertionError("retrained a cached model")

    monkeypatch.setattr("fusionlens.train.loop.train", no_training)
    monkeypatch.setattr("fusionlens.train.camera_pretrain.pretrain_camera", no_training)
    (runner.out / "dense/camera-lidar.json").unlink()
    assert Runner(tiny(tmp_path), progress=False).dense(PAIR)["initialised_from"] == dense["initialised_from"]
    # ... and a model cached with another schedule is refused, never silently reused
    with pytest.raises(ValueError, match="another protocol reference_steps"):
        Runner(tiny(tmp_path, reference_steps=3), progress=False)
    # the cached models check their own schedule too (a tree from before protocol.json existed)
    (runner.out / "protocol.json").unlink()
    with pytest.raises(ValueError, match=r"tiny_camera.pt was made with other settings -- steps: wanted 3"):
        Runner(tiny(tmp_path, reference_steps=3), progress=False).reference(PAIR)


def _check_summary(cell: dict) -> None:
    """nuScenes' summary from the cell's own parts: mAP the mean of the class APs; NDS = (5 mAP + the sum over the
    five TP errors of max(0, 1 - error), an undefined error scoring 0) / 10."""
    det = cell["detection"]
    assert cell["mAP"] == pytest.approx(sum(det["class_aps"].values()) / len(det["class_aps"]))
    errors = [det[name] for name in ("mATE", "mASE", "mAOE", "mAVE", "mAAE")]
    scores = [0.0 if math.isnan(e) else max(0.0, 1.0 - e) for e in errors]
    assert cell["NDS"] == pytest.approx((5 * cell["mAP"] + sum(scores)) / 10)


def test_detection_cells_carry_map_nds_and_pillars_own_lidar_parameters(tmp_path, synthetic):
    runner = Runner(tiny(tmp_path, reference_recipe="scratch", task="detection", lidar_encoder="pillars"),
                    progress=False)
    assert runner.out == tmp_path / "scratch-detection-pillars"
    assert runner.model_config(PAIR).point_encoders == {"lidar": "pillars"}
    assert runner.model_config("camera").point_encoders == {}
    model = runner.reference(PAIR)
    assert type(model.encoders["lidar"]).__name__ == "PillarEncoder"
    lidar = model.modality_groups()["lidar"]
    assert lidar and sum(model.get_parameter(n).numel() for n in lidar) > 0
    cell = runner.unstructured(PAIR, "snip", 0.8, 0)
    assert cell["task"] == "detection" and {"mAP", "NDS", "iou"} <= set(cell)
    _check_summary(cell)
    # structured pruning of the pillars model (its block1 feeds the fusion conv directly and via block2 / up2)
    small = runner.structured(PAIR, "magnitude", 0.3, 0)
    assert small["after"]["gflops"] < small["before"]["gflops"]
    _check_summary(small)
    table = summarise(runner.out)
    assert "| method | 80% mAP | 80% NDS | backward passes |" in table and "Table 1 layout" in table
    assert "Table 3 layout" not in table  # the untrained segmentation head's IoU is not a result
    assert "trained jointly from scratch" in table.splitlines()[0]


def test_recipes_never_share_cells(tmp_path, synthetic):
    # cells made before recipe.json existed (the scratch recipe) stay where they are ...
    legacy = tmp_path / "dense/camera-lidar.json"
    legacy.parent.mkdir(parents=True)
    legacy.write_text(json.dumps({"pair": PAIR, "iou": 0.5}))
    pre = Runner(tiny(tmp_path), progress=False)
    assert pre.out == tmp_path / "pretrained" and not (pre.out / "dense").exists()  # ... not reused here
    scratch = Runner(tiny(tmp_path, reference_recipe="scratch"), progress=False)
    assert scratch.out == tmp_path and scratch.dense(PAIR) == {"pair": PAIR, "iou": 0.5}
    assert json.loads((tmp_path / "recipe.json").read_text())["variant"] == LEGACY_VARIANT
    # a tree of one variant refuses every other
    with pytest.raises(ValueError, match="must not mix"):
        Runner(tiny(tmp_path / "pretrained", reference_recipe="scratch"), progress=False)
    with pytest.raises(ValueError, match="must not mix"):
        claim_root(tmp_path, dict(LEGACY_VARIANT, recipe="pretrained"))
    # cells are keyed by pair / method / sparsity / seed: a tree refuses a run measuring them another way
    with pytest.raises(ValueError, match="finetune_lr"):
        Runner(tiny(tmp_path, reference_recipe="scratch", finetune_lr=1e-5), progress=False)
    Runner(tiny(tmp_path, reference_recipe="scratch", seeds=(7,)), progress=False)  # grid selection is fine


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"reference_recipe": "imagenet"}, "reference_recipe must be one of"),
        ({"task": "tracking"}, "task must be one of"),
        ({"lidar_encoder": "voxelnet"}, "point encoder 'voxelnet' is not registered"),
        ({"camera_depth": 19}, "camera_depth must be one of"),
        ({"model_overrides": {"point_encoders": {"lidar": "pillars"}}}, "model_overrides may not set"),
        ({"trunk_steps": 0}, "trunk_steps must be positive"),
    ],
)
def test_bad_settings_fail_before_any_work(tmp_path, changes, message):
    with pytest.raises(ValueError, match=message):
        Runner(tiny(tmp_path / "out", **changes), progress=False)
    assert not (tmp_path / "out").exists()


def test_cli_rejects_unknown_encoder_and_flags_reach_the_config(tmp_path, capsys):
    from fusionlens.cli import build_parser
    from fusionlens.cli.reproduce import altermoma_config

    out = tmp_path / "out"
    assert main(["reproduce", "altermoma", "--lidar-encoder", "voxelnet", "--out", str(out), "--no-progress"]) == 2
    assert "point encoder 'voxelnet' is not registered" in capsys.readouterr().err and not out.exists()
    args = build_parser().parse_args(
        ["reproduce", "altermoma", "--recipe", "scratch", "--task", "both", "--lidar-encoder", "pillars",
         "--camera-depth", "34", "--freeze-steps", "3", "--trunk-frames", "8", "--trunk-steps", "5",
         "--finetune-lr", "3e-4"]
    )
    cfg = altermoma_config(args)
    assert cfg.finetune_lr == 3e-4
    assert (cfg.reference_recipe, cfg.task, cfg.lidar_encoder, cfg.camera_depth) == ("scratch", "both", "pillars", 34)
    assert (cfg.reference_freeze_steps, cfg.trunk_frames, cfg.trunk_steps) == (3, 8, 5)


def test_reference_loss_adds_the_detection_loss_as_training_does():
    from fusionlens.data.collate import collate_samples
    from fusionlens.models import batch_to_inputs, build_model, preset_config
    from fusionlens.train.loop import TASKS
    from fusionlens.train.losses import LossConfig, simplebev_loss
    from fusionlens.train.synthetic import TEST_GRID

    torch.manual_seed(0)
    model = build_model(preset_config("tiny", "lidar", grid=TEST_GRID, extra_heads={"centerpoint": {}}, **SMALL))
    batch = collate_samples([SyntheticDataset(2)[i] for i in range(2)])
    seg, det, both = (float(reference_loss(task=t)(model, batch).detach()) for t in TASKS)
    inputs, kwargs = batch_to_inputs(model, batch)
    simplebev = float(simplebev_loss(model(**inputs, **kwargs), batch, LossConfig())["total"].detach())
    # as in train(): a model's extra heads always train; "detection" drops only the segmentation terms
    assert det > 0 and both == pytest.approx(det + simplebev, rel=1e-5) and seg == pytest.approx(both, rel=1e-6)
    with pytest.raises(ValueError, match="task must be one of"):
        reference_loss(task="tracking")


def test_cli_detection_run_writes_table_1_into_its_tree(tmp_path, synthetic, capsys):
    args = ["reproduce", "altermoma", "--out", str(tmp_path), "--recipe", "scratch", "--task", "detection",
            "--pairs", PAIR, "--methods", "magnitude", "--sparsities", "0.8", "--seeds", "0", "--structured-ratios",
            "", "--betas", "", "--finetune-steps", "1", "--reference-steps", "1", "--no-progress"]
    assert main(args) == 0
    results = (tmp_path / "scratch-detection/results.md").read_text()
    assert "| magnitude |" in results and "80% mAP | 80% NDS" in results
    assert not (tmp_path / "results.md").exists()  # the legacy tree's table is left alone


def test_reference_cache_reuses_continues_refuses_and_forces(tmp_path, monkeypatch):
    """train_cached, the one cache of reference models: a finished file is reused, a cut-off one continued, one made
    with other settings refused naming the difference, and retrained only when forced."""
    from fusionlens.experiments.reference_models import checkpoint_name, train_cached
    from fusionlens.models import build_model, preset_config
    from fusionlens.train.checkpoint import save_checkpoint
    from fusionlens.train.loop import TrainConfig
    from fusionlens.train.synthetic import TEST_GRID

    assert checkpoint_name("camera,radar") == "tiny_camera-radar.pt"
    assert checkpoint_name(["lidar", "camera"], pretrained=True, seed=2) == "tiny_camera-lidar_pre_seed2.pt"
    config = preset_config("tiny", "camera,lidar", grid=TEST_GRID, **SMALL)
    schedule = TrainConfig(steps=4, batch_size=2, lr=1e-3, seed=0)
    calls: list[dict] = []
    monkeypatch.setattr("fusionlens.train.loop.train", lambda *a, **k: calls.append(k))
    path = tmp_path / checkpoint_name("camera-lidar")

    def saved(step: int, **changes: object) -> None:
        save_checkpoint(path, model=build_model(config), model_config=config,
                        train_config={**schedule.to_dict(), **changes}, step=step)

    train_cached(path, config, schedule, SyntheticDataset(2), progress=False)  # no file: trained
    assert len(calls) == 1 and calls[0]["resume"] is False
    saved(4)
    assert train_cached(path, config, schedule, SyntheticDataset(2), progress=False) == path and len(calls) == 1
    saved(2)  # cut off at step 2 of 4: continued
    train_cached(path, config, schedule, SyntheticDataset(2), progress=False)
    assert len(calls) == 2 and calls[1]["resume"] is True
    saved(4, lr=3e-3)
    with pytest.raises(ValueError, match=r"tiny_camera-lidar.pt was made with other settings -- lr: wanted 0.001"):
        train_cached(path, config, schedule, SyntheticDataset(2), progress=False)
    assert len(calls) == 2
    train_cached(path, config, schedule, SyntheticDataset(2), force=True, progress=False)
    assert len(calls) == 3 and calls[2]["resume"] is False
