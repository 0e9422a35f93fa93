"""``fusionlens explain``: PNG + JSON per sample, numbers consistent with the decomposition, and clear errors."""

from __future__ import annotations

import json

import matplotlib.image
import pytest
import torch

from fusionlens.cli import main
from fusionlens.models import build_model, preset_config
from fusionlens.train.checkpoint import save_checkpoint
from fusionlens.train.synthetic import TEST_GRID, SyntheticDataset
from fusionlens.viz.explain import box_corners, camera_grid

torch.set_num_threads(1)
SMALL = dict(grid=TEST_GRID, latent_dim=4, fusion_dim=8, decoder_width=8, head_dim=8, point_bev_channels=8,
             image_size=(32, 48))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    config = preset_config("tiny", "camera,radar", **SMALL)
    path = tmp_path_factory.mktemp("ckpt") / "cr.pt"
    save_checkpoint(path, model=build_model(config), model_config=config)
    return path


def test_explain_writes_panels_and_numbers(checkpoint, tmp_path):
    out = tmp_path / "explain"
    code = main(["explain", "--checkpoint", str(checkpoint), "--data", "synthetic", "--samples", "0", "2",
                 "--size", "3", "--out", str(out)])
    assert code == 0
    data = SyntheticDataset(3, seed=1)  # the CLI's synthetic val split
    for i in (0, 2):
        image = matplotlib.image.imread(out / f"val-{i:05d}.png")
        assert image.ndim == 3 and image.shape[0] > 500 and image.shape[1] > 500
        report = json.loads((out / f"val-{i:05d}.json").read_text())
        assert report["conservation_error"] <= 1e-5
        assert len(report["regions"]) == data[i].boxes.shape[0]  # every synthetic box lies inside the grid
        assert report["single_sensor"] == {}
        for obj in report["regions"]:
            assert set(obj["scores"]) == {"camera", "radar"}
            assert obj["seen_by"] == [] and obj["correct"] is None  # synthetic data has no visibility truth


def test_explain_rejects_bad_input(checkpoint, tmp_path, capsys):
    base = ["explain", "--checkpoint", str(checkpoint), "--data", "synthetic", "--out", str(tmp_path)]
    assert main([*base, "--layer", "decoder.missing"]) == 2
    assert "--layer" in capsys.readouterr().err
    assert main([*base, "--samples", "5", "--size", "3"]) == 2
    assert "outside" in capsys.readouterr().err
    assert main(["explain", "--checkpoint", str(tmp_path / "none.pt"), "--out", str(tmp_path)]) == 2


def test_mosaic_and_box_geometry():
    images = torch.stack([torch.full((3, 2, 3), float(i) / 10) for i in range(6)])
    mosaic, rows, cols = camera_grid(images)
    assert mosaic.shape == (4, 9, 3) and (rows, cols) == (2, 3)
    for cam in range(6):  # stored order, row by row
        r, c = divmod(cam, 3)
        assert mosaic[r * 2, c * 3, 0] == pytest.approx(cam / 10)
    two, rows, cols = camera_grid(images[:2])  # two cameras: one row of two, nothing black
    assert two.shape == (2, 6, 3) and (rows, cols) == (1, 2)
    corners = box_corners(torch.tensor([1.0, 2.0, 0.0, 2.0, 4.0, 1.0, torch.pi / 2, 0.0, 0.0]))
    assert box_corners(torch.tensor([1.0, 2.0, 2.0, 4.0, torch.pi / 2])) == pytest.approx(corners)
    with pytest.raises(ValueError, match="a box must have 5"):
        box_corners(torch.zeros(6))
    assert corners.shape == (5, 2)
    # heading along +y: the 4 m length spans y, the 2 m width spans x
    assert corners[:, 0].max() - corners[:, 0].min() == pytest.approx(2.0)
    assert corners[:, 1].max() - corners[:, 1].min() == pytest.approx(4.0)
