"""``fusionlens reproduce lmd``: cells, resuming, tables, config errors, and two gloo processes under torchrun giving
exactly the single-process cells."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from fusionlens.cli import main
from fusionlens.experiments.lmd import LMDReproduceConfig, LMDRunner
from fusionlens.experiments.lmd_report import summarise
from fusionlens.models import build_model, preset_config
from fusionlens.train.checkpoint import save_checkpoint
from fusionlens.train.synthetic import TEST_GRID
from torchrun_helper import torchrun_cli

torch.set_num_threads(1)
SMALL = dict(grid=TEST_GRID, latent_dim=4, fusion_dim=8, decoder_width=8, head_dim=8, point_bev_channels=8)
ARGS = ["--pairs", "camera_radar", "--data", "synthetic", "--seeds", "0,1", "--val-size", "13", "--anchors", "3",
        "--count", "2", "--methods", "naive,lmd:paper", "--attribution-methods", "", "--no-progress"]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    torch.manual_seed(0)
    config = preset_config("tiny", "camera,radar", **SMALL)
    folder = tmp_path_factory.mktemp("ckpts")
    save_checkpoint(folder / "tiny_camera-radar.pt", model=build_model(config), model_config=config)
    return folder


def _cells(root):
    return {p.relative_to(root).as_posix(): json.loads(p.read_text()) for p in sorted(root.glob("cells/**/*.json"))}


def test_cells_resume_and_tables(checkpoints, tmp_path):
    out = tmp_path / "lmd"
    assert main(["reproduce", "lmd", "--out", str(out), "--checkpoints", str(checkpoints), *ARGS]) == 0
    cells = _cells(out)
    # 2 seeds x (naive recomputed + paper frozen + paper recomputed)
    assert len(cells) == 6
    frozen = cells["cells/camera-radar/seed0/lmd-paper__frozen.json"]["result"]["summary"]["pcc"]
    assert frozen["Rp/C"][0] == pytest.approx(1.0) and frozen["Cp/R"][0] == pytest.approx(1.0)
    stamps = {p: p.stat().st_mtime_ns for p in out.glob("cells/**/*.json")}
    assert main(["reproduce", "lmd", "--out", str(out), "--checkpoints", str(checkpoints), *ARGS]) == 0
    assert {p: p.stat().st_mtime_ns for p in out.glob("cells/**/*.json")} == stamps  # nothing recomputed
    # a retrained checkpoint makes the cells stale: they are measured again
    config = preset_config("tiny", "camera,radar", **SMALL)
    torch.manual_seed(1)
    save_checkpoint(checkpoints / "tiny_camera-radar.pt", model=build_model(config), model_config=config)
    assert main(["reproduce", "lmd", "--out", str(out), "--checkpoints", str(checkpoints), *ARGS]) == 0
    assert all(p.stat().st_mtime_ns != t for p, t in stamps.items())
    table = (out / "results.md").read_text()
    assert "Table 1: linearization ablation" in table and "| LMD (ratio) | frozen | 2 |" in table
    assert "Rp/R 0.05" in table  # the paper's number alongside
    assert "trained models: camera-radar 1 for 2 seeds" in table  # both seeds drew anchors on the one checkpoint
    assert table == summarise(out) + "\n"


def test_per_seed_models(tmp_path):
    config = preset_config("tiny", "camera,radar", **SMALL)
    model = build_model(config)
    save_checkpoint(tmp_path / "tiny_camera-radar.pt", model=model, model_config=config, train_config={"seed": 0})
    save_checkpoint(tmp_path / "tiny_camera-radar_seed1.pt", model=model, model_config=config)
    runner = LMDRunner(LMDReproduceConfig(checkpoints=str(tmp_path)))
    # the reference checkpoint trained with seed 0 is seed 0's own model; seed 2 has none and shares it
    assert runner.checkpoint("camera-radar", 0) == (tmp_path / "tiny_camera-radar.pt", True)
    assert runner.checkpoint("camera-radar", 1) == (tmp_path / "tiny_camera-radar_seed1.pt", True)
    assert runner.checkpoint("camera-radar", 2) == (tmp_path / "tiny_camera-radar.pt", False)


def test_config_errors(checkpoints, tmp_path):
    with pytest.raises(ValueError, match="pairs"):
        LMDReproduceConfig(pairs=("camera_sonar",)).check()
    with pytest.raises(ValueError, match="at least 13"):
        LMDReproduceConfig(val_size=12, anchors=2).check()
    with pytest.raises(ValueError, match="unknown method"):
        LMDReproduceConfig(methods=("lrp",)).check()
    runner = LMDRunner(LMDReproduceConfig(checkpoints=str(tmp_path)))
    with pytest.raises(FileNotFoundError, match="fusionlens train"):
        runner.checkpoint("camera-lidar", 0)
    with pytest.raises(FileNotFoundError, match="no result cells"):
        summarise(tmp_path)


@pytest.mark.slow
def test_two_gloo_processes_give_the_single_process_cells(checkpoints, tmp_path):
    single, dist = tmp_path / "single", tmp_path / "dist"
    assert main(["reproduce", "lmd", "--out", str(single), "--checkpoints", str(checkpoints), *ARGS]) == 0
    torchrun_cli(tmp_path, ("reproduce",), "reproduce", "lmd", "--out", str(dist), "--checkpoints", str(checkpoints),
                 *ARGS)
    a, b = _cells(single), _cells(dist)
    assert a.keys() == b.keys()
    for key in a:  # 3 anchors over 2 ranks: uneven shards, gathered back in anchor order
        assert a[key]["result"] == b[key]["result"], key


def test_each_checkpoint_is_read_once_per_run(tmp_path, monkeypatch):
    """Seed check, fingerprint, model and the tables' staleness check all come from one read of each file."""
    import builtins
    import io

    config = preset_config("tiny", "camera,radar", **SMALL)
    ckpts = tmp_path / "ckpts"
    torch.manual_seed(0)
    save_checkpoint(ckpts / "tiny_camera-radar.pt", model=build_model(config), model_config=config,
                    train_config={"seed": 0})
    save_checkpoint(ckpts / "tiny_camera-radar_seed1.pt", model=build_model(config), model_config=config)
    opened: list[str] = []
    real_open = builtins.open

    def counting_open(file, *args, **kwargs):
        if isinstance(file, (str, Path)) and Path(file).parent == ckpts:
            opened.append(Path(file).name)
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", counting_open)
    monkeypatch.setattr(io, "open", counting_open)  # pathlib opens through io.open
    out = tmp_path / "lmd"
    args = ["reproduce", "lmd", "--out", str(out), "--checkpoints", str(ckpts), *ARGS]
    once = ["tiny_camera-radar.pt", "tiny_camera-radar_seed1.pt"]
    assert main(args) == 0  # fresh: seed check and load
    assert sorted(opened) == once
    cells = _cells(out)
    assert cells["cells/camera-radar/seed0/naive__recomputed.json"]["per_seed_model"] is True
    assert cells["cells/camera-radar/seed1/naive__recomputed.json"]["checkpoint"].endswith("_seed1.pt")
    opened.clear()
    assert main(args) == 0  # all done: fingerprints only
    assert sorted(opened) == once
    opened.clear()
    for name in ("seed0/lmd-paper__frozen.json", "seed1/naive__recomputed.json"):
        (out / "cells/camera-radar" / name).unlink()
    assert main(args) == 0  # resumed: seed check, fingerprints of the cells there, and loading the models
    assert sorted(opened) == once
    again = _cells(out)
    assert again.keys() == cells.keys()
    for key in cells:  # the measured cells come out as before
        assert {k: v for k, v in again[key].items() if k != "seconds"} == \
            {k: v for k, v in cells[key].items() if k != "seconds"}, key


def test_modes_flag_selects_the_cells(checkpoints, tmp_path):
    out = tmp_path / "lmd"
    args = [a if a != "naive,lmd:paper" else "lmd:paper" for a in ARGS]
    assert main(["reproduce", "lmd", "--out", str(out), "--checkpoints", str(checkpoints), "--modes", "frozen",
                 *args]) == 0
    assert sorted(_cells(out)) == [f"cells/camera-radar/seed{s}/lmd-paper__frozen.json" for s in (0, 1)]
    assert main(["reproduce", "lmd", "--out", str(out), "--checkpoints", str(checkpoints), "--modes", "sideways",
                 *args]) == 2
