"""The audit on fusionlens' own data: tiny camera-radar and camera-LiDAR models trained on the built-in world with
their single-modality partners (visibility truth: the right-sensor table agrees with the ground-truth attribution
of ``fusionlens.evaluate``), the nuScenes-format fixture read by the devkit, and ``fusionlens audit`` end to end."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from fusionlens.audit import audit
from fusionlens.cli import main
from fusionlens.data.builtin import BuiltinWorld
from fusionlens.data.sample import BEVGrid
from fusionlens.evaluate import LMD, attribute_objects, summarise_attribution
from fusionlens.models import build_model, preset_config
from fusionlens.train.checkpoint import load_model, save_checkpoint
from fusionlens.train.loop import TrainConfig, train
from fusionlens.train.synthetic import TEST_GRID
from fusionlens.world import WorldConfig

torch.set_num_threads(1)
GRID = BEVGrid(((-24.0, 24.0), (-24.0, 24.0), (-3.0, 3.0)), (24, 24, 4))
IMAGE = (16, 28)
TINY = dict(latent_dim=4, fusion_dim=8, decoder_width=8, head_dim=8, point_bev_channels=8)
FAULTY = {"camera_blackout": 0.4, "radar_dropout": 0.4, "lidar_beam_loss": 0.4, "fog": 0.3}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("world")
    base = WorldConfig()
    cfg = WorldConfig(image_size=IMAGE, lidar_azimuth_steps=90, grid=GRID,
                      condition_probs={**base.condition_probs, **FAULTY})
    kw = dict(config=cfg, cache_dir=root / "cache", shard_size=8, workers=0, progress=False)
    train_set, val_set = BuiltinWorld("train", size=8, **kw), BuiltinWorld("val", size=4, **kw)
    models = {}
    for mods in ("camera,radar", "radar", "camera,lidar", "lidar"):
        config = preset_config("tiny", mods, grid=GRID, image_size=IMAGE, **TINY)
        path = root / f"{mods.replace(',', '_')}.pt"
        train(config, TrainConfig(steps=4, batch_size=2), train_set, checkpoint=path, progress=False)
        models[mods] = load_model(path)[0]
    return train_set, val_set, models, root


@pytest.mark.parametrize("pair,partner", [("camera,radar", "radar"), ("camera,lidar", "lidar")])
def test_builtin_world_pairs_with_partners(world, pair, partner):
    train_set, val_set, models, root = world
    model = models[pair]
    result = audit(model, val_set, out=root / f"audit-{pair}", partners={f"{partner}-only": models[partner]},
                   reference=train_set, reference_indices=range(4), select=[0], max_pages=1,
                   progress=False)
    mods = pair.split(",")
    # the right-sensor table is the ground-truth attribution of fusionlens.evaluate on the same decomposition
    truth = summarise_attribution(attribute_objects(model, val_set, LMD("paper", "recomputed"), progress=False),
                                  mods)["all"]["overall"]
    right = {r["value"]: r for r in result.tables["right_sensor"]}
    if truth["objects"]:
        assert right["all"]["objects"] == truth["objects"]
        assert right["all"]["right sensor"] == pytest.approx(truth["correct"])
    else:
        assert not right
    groups = {(r["group"], r["value"]) for r in result.tables["reliance"]}
    tags = {t for r in result.records for t in r["tags"]}
    assert {("condition", t) for t in tags} <= groups and ("fault", f"no {mods[0]}") in groups
    assert any(g == "distance" for g, _ in groups) and any(g == "class" for g, _ in groups)
    n_vehicles = sum(len(r["objects"]) for r in result.records)
    assert n_vehicles and result.tables["partners"][0]["objects"] == n_vehicles
    assert {f["fault"] for f in result.tables["faults"]} == {f"no {m}" for m in mods}
    assert all(r["conservation_error"] < 1e-4 for r in result.records)
    assert len(result.pages) == 1 and next(iter(result.pages.values())).with_suffix(".png").is_file()
    # the default error bound: the lower quartile of the reference samples' IoUs (read back from the cache)
    cached = [json.loads(p.read_text())["iou"] for p in sorted((result.out / "cache" / "reference").glob("*.json"))]
    ious = [c["inter"] / c["union"] for c in cached if c["union"] > 0]
    assert len(cached) == 4 and result.monitor["samples"]["error_iou"] == pytest.approx(np.quantile(ious, 0.25))


def test_nuscenes_fixture(tmp_path):
    pytest.importorskip("nuscenes")
    from fusionlens.data.nuscenes import NuScenesDataset
    from nuscenes_fixture import GRID as NGRID
    from nuscenes_fixture import IMAGE_SIZE, write_test_dataset

    write_test_dataset(tmp_path / "nusc")
    val = NuScenesDataset(tmp_path / "nusc", "v1.0-mini", "val", NGRID, IMAGE_SIZE)
    ref = NuScenesDataset(tmp_path / "nusc", "v1.0-mini", "train", NGRID, IMAGE_SIZE)
    torch.manual_seed(0)
    model = build_model(preset_config("tiny", "camera,radar,lidar", grid=NGRID, image_size=IMAGE_SIZE, **TINY)).eval()
    result = audit(model, val, out=tmp_path / "audit", reference=ref, faults=["lidar"], max_pages=1, progress=False)
    tags = {r["value"] for r in result.tables["reliance"] if r["group"] == "condition"}
    assert {"night", "rain"} <= tags  # the val scene's description: "Night, rain, many peds right"
    assert not result.tables["right_sensor"]  # nuScenes has no per-sensor visibility truth
    assert {r["fault"] for r in result.tables["faults"]} == {"no lidar"}
    assert all(r["class"] in ("car", "truck", "bus", "trailer", "construction_vehicle")
               for r in result.tables["objects"])
    assert result.monitor["samples"]["reference_count"] == len(ref)


def test_cli_audit(tmp_path, capsys):
    torch.manual_seed(0)
    paths = {}
    for mods in ("camera,radar", "radar"):
        config = preset_config("tiny", mods, grid=TEST_GRID, image_size=(32, 48), **TINY)
        paths[mods] = save_checkpoint(tmp_path / f"{mods.replace(',', '_')}.pt", model=build_model(config),
                                      model_config=config)
    out = tmp_path / "report"
    base = ["audit", "--checkpoint", str(paths["camera,radar"]), "--data", "synthetic", "--size", "4",
            "--out", str(out), "--no-progress", "--max-pages", "0"]
    assert main([*base, "--partner", f"radar-only={paths['radar']}", "--reference-split", "train",
                 "--reference-size", "3", "--faults", "radar", "--select", "3", "--note", "made <by> a test"]) == 0
    printed = capsys.readouterr().out
    assert f"report: {(out / 'index.html').resolve()}" in printed
    saved = json.loads((out / "audit.json").read_text())
    assert saved["settings"]["partners"].keys() == {"radar-only"} and len(saved["samples"]) == 4
    assert (out / "samples" / "sample-00003.html").is_file()
    assert "made &lt;by&gt; a test" in (out / "index.html").read_text()  # user text is escaped, not markup
    assert main([*base, "--partner", "radar.pt"]) == 2
    assert "NAME=CHECKPOINT" in capsys.readouterr().err
    assert main([*base, "--partner", f"x={tmp_path / 'missing.pt'}"]) == 2
    assert "--partner x" in capsys.readouterr().err
    assert main([*base, "--faults", "sonar"]) == 2
    assert "faults names ['sonar']" in capsys.readouterr().err
