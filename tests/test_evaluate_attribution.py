"""Ground-truth attribution: visibility truth -> single-sensor objects, object cells, shares, an end-to-end run
whose scores equal the decomposition summed over the object's cells, and a separation oracle."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from fusionlens import decompose
from fusionlens.data.collate import collate_samples
from fusionlens.data.sample import CLASSES, BEVGrid
from fusionlens.evaluate.attribution import (
    ObjectAttribution,
    Visibility,
    attribute_objects,
    mean_component_maps,
    object_cells,
    single_sensor_objects,
    summarise_attribution,
)
from fusionlens.evaluate.baselines import LMD
from fusionlens.models import build_model, preset_config
from fusionlens.train.synthetic import TEST_GRID, SyntheticDataset

torch.set_num_threads(1)
SMALL = dict(grid=TEST_GRID, latent_dim=4, fusion_dim=8, decoder_width=8, head_dim=8, point_bev_channels=8)


def _with_visibility(sample, camera_pixels, radar_points, lidar_points, labels=None):
    nb = len(radar_points)
    vis = {"camera_pixels": torch.tensor(camera_pixels).reshape(nb, -1), "radar_points": torch.tensor(radar_points),
           "lidar_points": torch.tensor(lidar_points), "visible": torch.ones(nb, dtype=torch.bool)}
    boxes = sample.boxes[:1].repeat(nb, 1) if sample.boxes.shape[0] < nb else sample.boxes[:nb]
    box_labels = torch.tensor(labels) if labels is not None else torch.full((nb,), CLASSES.index("car"))
    return dataclasses.replace(sample, visibility=vis, boxes=boxes, box_labels=box_labels)


class RadarOnlyWorld(SyntheticDataset):
    """Synthetic samples whose every vehicle was seen by radar alone."""

    def __getitem__(self, index):
        s = super().__getitem__(index)
        nb = s.boxes.shape[0]
        return _with_visibility(s, [[0, 0]] * nb, [3] * nb, [0] * nb)


def test_single_sensor_objects_from_visibility_truth():
    base = SyntheticDataset(1)[0]
    s = _with_visibility(base, [[5, 0], [0, 0], [0, 0], [2, 1], [0, 0]], [0, 4, 0, 2, 0], [0, 0, 9, 0, 0],
                         labels=[0, 0, 0, 0, CLASSES.index("pedestrian")])
    assert single_sensor_objects(s, ["camera", "radar"]) == [(0, "camera"), (1, "radar")]  # 3: both; 2, 4: none
    assert single_sensor_objects(s, ["camera", "radar", "lidar"]) == [(0, "camera"), (1, "radar"), (2, "lidar")]
    # object 3 has 3 camera pixels: below 6 it counts as unseen by the camera, so radar alone saw it
    strict = Visibility(min_camera_pixels=6)
    assert single_sensor_objects(s, ["camera", "radar"], strict) == [(1, "radar"), (3, "radar")]
    with pytest.raises(ValueError, match="visibility truth"):
        single_sensor_objects(base, ["camera", "radar"])


def test_object_cells_of_an_axis_aligned_box():
    grid = BEVGrid(((-4.0, 4.0), (-4.0, 4.0), (-1.0, 1.0)), (8, 8, 1))  # 1 m cells
    sample = dataclasses.replace(SyntheticDataset(1)[0], grid=grid,
                                 boxes=torch.tensor([[0.0, 0.0, 0.0, 2.0, 4.0, 1.5, 0.0, 0.0, 0.0]]))
    cells = object_cells(sample)[0]
    assert int(cells.sum()) == 8  # 4 m along x (l, yaw 0) by 2 m along y
    assert cells[2:6, 3:5].all()


def test_shares_and_correctness():
    r = ObjectAttribution(0, 0, "radar", True, {"camera": -1.0, "radar": 3.0})
    assert r.shares == {"camera": -0.25, "radar": 0.75} and r.correct
    wrong = ObjectAttribution(0, 1, "camera", False, {"camera": 1.0, "radar": 3.0})
    s = summarise_attribution([r, wrong], ["camera", "radar"])
    assert s["all"]["overall"] == {"objects": 2, "correct": 0.5, "share": pytest.approx((0.75 + 0.25) / 2)}
    assert s["detected"]["overall"]["objects"] == 1 and s["detected"]["camera"]["objects"] == 0
    assert math.isnan(s["detected"]["camera"]["correct"])


def test_scores_are_the_decomposition_over_object_cells():
    torch.manual_seed(0)
    model = build_model(preset_config("tiny", "camera,radar", **SMALL)).eval()
    data = RadarOnlyWorld(3, seed=5)
    rows = attribute_objects(model, data, LMD("paper", "recomputed"), progress=False)
    assert rows and all(r.sensor == "radar" for r in rows)
    r = rows[0]
    subject = model.describe().subject()
    x = subject.prepare(collate_samples([data[r.sample]]))
    d = decompose(subject.module, x.inputs)
    mask = object_cells(data[r.sample])[r.box]
    for m in ("camera", "radar"):
        assert r.scores[m] == pytest.approx(float(d.components[m][0, 0][mask].sum()), rel=1e-5)


def test_a_blind_modality_gets_no_credit():
    torch.manual_seed(0)
    model = build_model(preset_config("tiny", "camera,radar", **SMALL)).eval()
    with torch.no_grad():  # cut the camera's input channels of the fusion conv: LMD must give it exactly zero
        conv = next(m for m in model.fusion.modules() if isinstance(m, torch.nn.Conv2d))
        conv.weight[:, : model.bev_channels["camera"]] = 0
    rows = attribute_objects(model, RadarOnlyWorld(2, seed=1), LMD("paper", "recomputed"), progress=False)
    assert rows and all(r.scores["camera"] == 0.0 for r in rows)


def test_contrast_scores_subtract_the_reference_map_over_the_object_cells():
    torch.manual_seed(0)
    model = build_model(preset_config("tiny", "camera,radar", **SMALL)).eval()
    data = RadarOnlyWorld(3, seed=5)
    method = LMD("paper", "recomputed")
    plain = attribute_objects(model, data, method, progress=False)
    ref = mean_component_maps(model, data, method, indices=[0, 1])
    # the mean over two scenes, worked out from the two decompositions themselves
    subject = model.describe().subject()
    maps = [method.clean(subject, subject.prepare(collate_samples([data[i]])))[0] for i in (0, 1)]
    assert torch.allclose(ref["radar"], (maps[0]["radar"] + maps[1]["radar"]) / 2, atol=1e-6)
    contrast = attribute_objects(model, data, method, reference=ref, progress=False)
    assert [(r.sample, r.box) for r in contrast] == [(r.sample, r.box) for r in plain]
    for p, c in zip(plain, contrast, strict=True):
        mask = object_cells(data[p.sample])[p.box]
        for m in ("camera", "radar"):
            assert c.scores[m] == pytest.approx(p.scores[m] - float(ref[m][0, 0][mask].sum()), rel=1e-4, abs=1e-4)
    with pytest.raises(ValueError, match="lack modalities"):
        attribute_objects(model, data, method, reference={"camera": ref["camera"]}, progress=False)
