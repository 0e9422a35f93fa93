"""The nuScenes loader on a nuScenes-format fixture read by the real devkit: labels, boxes, cameras, meta,
splits, errors, CLI hooks and batching."""

from __future__ import annotations

import argparse
import math
import pickle
import re
import shutil
import sys

import numpy as np
import pytest
import torch

from fusionlens.data import nuscenes as nu
from fusionlens.data.collate import collate_samples
from fusionlens.data.nuscenes import NuScenesDataset
from fusionlens.data.nuscenes_fixture import sensor_matrix
from fusionlens.data.sample import CAMERA_NAMES, CLASSES, Sample
from nuscenes_fixture import GRID, IMAGE_SIZE, KEYFRAME, write_test_dataset

pytest.importorskip("nuscenes")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("nusc")
    man = write_test_dataset(root)
    return man, NuScenesDataset(root, "v1.0-mini", "train", GRID, IMAGE_SIZE)


def _cells(x0, x1, y0, y1):
    """Cells of the 1 m test grid whose centres lie in [x0, x1] x [y0, y1] (hand-computed oracle)."""
    xs = [i for i in range(40) if x0 <= -19.5 + i <= x1]
    ys = [j for j in range(40) if y0 <= -19.5 + j <= y1]
    return {(i, j) for i in xs for j in ys}


def test_box_at_known_pose_appears_in_bev_mask_where_it_should(data):
    _, ds = data
    s = ds[KEYFRAME]
    assert isinstance(s, Sample) and s.grid == GRID
    car = _cells(8.0, 12.0, 4.0, 6.0)  # 4 m along x, 2 m along y around (10, 5)
    assert len(car) == 8
    got = {tuple(ix) for ix in torch.nonzero(s.bev_seg).tolist()}
    assert got == car
    # The truck with visibility token 1 is masked out of valid and absent from seg (SimpleBEV).
    truck = _cells(-13.25, -10.75, -12.0, -4.0)  # heading +y: 8 m along y, 2.5 m along x around (-12, -8)
    invalid = {tuple(ix) for ix in torch.nonzero(s.bev_valid == 0).tolist()}
    assert invalid == truck and len(truck) == 16
    # The centre heatmap peaks at the car's own cell; offsets point from each car cell to its centre.
    assert s.bev_center[30, 25] == 1.0
    i, j = 28, 24
    np.testing.assert_allclose(s.bev_offset[:, i, j].numpy(), [10.0 - (-19.5 + i), 5.0 - (-19.5 + j)], atol=1e-4)


def test_boxes_in_ego_frame_with_classes_velocity_and_visibility(data):
    man, ds = data
    s = ds[KEYFRAME]
    # bicycle: not a fusionlens class; the car at 35 m: outside the grid. Kept: car, truck, pedestrian.
    assert s.box_labels.tolist() == [CLASSES.index("car"), CLASSES.index("truck"), CLASSES.index("pedestrian")]
    scene = man.scenes[0]
    ref_yaw = scene.ego_start[2] + scene.ego_yaw_rate * 0.5 * KEYFRAME
    c, sn = math.cos(ref_yaw), math.sin(ref_yaw)
    v_ego = (c * 3.0 + sn * 0.0, -sn * 3.0 + c * 0.0)  # global (3, 0) m/s rotated by -ref_yaw
    np.testing.assert_allclose(s.boxes[0].numpy(), [10.0, 5.0, 0.8, 2.0, 4.0, 1.5, 0.0, *v_ego], atol=1e-4)
    np.testing.assert_allclose(s.boxes[1].numpy(), [-12.0, -8.0, 0.8, 2.5, 8.0, 3.0, math.pi / 2, 0, 0], atol=1e-4)
    np.testing.assert_allclose(s.boxes[2, [0, 1, 6]].numpy(), [4.0, -3.0, 0.3], atol=1e-4)
    assert s.visibility["visibility_token"].tolist() == [4, 1, 3]
    assert s.visibility["num_lidar_pts"].tolist() == [7, 7, 7]
    assert s.visibility["num_radar_pts"].tolist() == [3, 3, 3]
    assert s.visibility["velocity_known"].all()
    assert s.visibility["visible"].tolist() == [True, False, True]
    assert s.visibility["camera_frac"].tolist() == pytest.approx([0.9, 0.2, 0.7])
    assert len(s.meta["annotation_tokens"]) == 3
    np.testing.assert_allclose(s.meta["ego_to_global"].numpy(), man.ego_pose(scene, 0.5 * KEYFRAME), atol=1e-6)


def test_cameras_resized_with_intrinsics_and_extrinsics(data):
    man, ds = data
    s = ds[KEYFRAME]
    h, w = IMAGE_SIZE
    assert s.images.shape == (len(CAMERA_NAMES), 3, h, w)
    assert 0.0 <= s.images.min() and s.images.max() <= 1.0
    for c, name in enumerate(CAMERA_NAMES):  # order of CAMERA_NAMES; JPEG keeps a flat colour within a few levels
        np.testing.assert_allclose(s.images[c].mean((1, 2)).numpy(), np.array(man.camera_colours[name]) / 255,
                                   atol=0.03)
        np.testing.assert_allclose(s.cam_to_ego[c].numpy(), sensor_matrix(next(r for r in man.rig
                                                                                 if r.channel == name)), atol=1e-5)
    k0, sx, sy = man.intrinsic, w / man.image_hw[1], h / man.image_hw[0]
    want = np.array([[k0[0, 0] * sx, 0, (k0[0, 2] + 0.5) * sx - 0.5], [0, k0[1, 1] * sy, (k0[1, 2] + 0.5) * sy - 0.5],
                     [0, 0, 1]])
    np.testing.assert_allclose(s.intrinsics[0].numpy(), want, rtol=1e-6)
    # Round trip: a point on CAM_FRONT's optical axis projects onto the adjusted principal point.
    ego_pt = torch.tensor([12.0, 0.0, 1.5, 1.0])
    cam = torch.linalg.inv(s.cam_to_ego[0].double()) @ ego_pt.double()
    uv = (s.intrinsics[0].double() @ cam[:3]) / cam[2]
    np.testing.assert_allclose(uv[:2].numpy(), want[:2, 2], atol=1e-5)


def test_camera_ego_motion_option_chains_poses(data):
    man, _ = data
    ds = NuScenesDataset(man.root, "v1.0-mini", "train", GRID, IMAGE_SIZE, modalities=("camera",),
                         camera_ego_motion=True)
    s = ds[KEYFRAME]
    scene = man.scenes[0]
    spec = next(r for r in man.rig if r.channel == "CAM_BACK")
    t_ref, t_cam = 0.5 * KEYFRAME, 0.5 * KEYFRAME + spec.time_offset
    want = np.linalg.inv(man.ego_pose(scene, t_ref)) @ man.ego_pose(scene, t_cam) @ sensor_matrix(spec)
    np.testing.assert_allclose(s.cam_to_ego[CAMERA_NAMES.index("CAM_BACK")].numpy(), want, atol=1e-4)
    assert s.radar is None and s.lidar is None


def test_meta_conditions_and_splits(data):
    man, ds = data
    assert len(ds) == 3 and ds.sample_tokens == man.sample_tokens["scene-0061"]
    s = ds[0]
    assert s.meta["scene_name"] == "scene-0061" and s.meta["sample_token"] == ds.sample_tokens[0]
    assert s.meta["conditions"] == {"time_of_day": "day", "rain": 0.0} and s.meta["tags"] == ["day"]
    assert set(s.meta["sample_data_tokens"]) >= set(CAMERA_NAMES) | {"LIDAR_TOP"}
    keyframe_files = man.files[s.meta["sample_token"]]  # what the fixture wrote for this keyframe
    assert len(keyframe_files) == len(s.meta["sample_data_tokens"]) == 12
    for channel, token in s.meta["sample_data_tokens"].items():
        assert f"/{channel}/" in ds.nusc.get("sample_data", token)["filename"]
        assert ds.nusc.get("sample_data", token)["filename"] in keyframe_files
    val = NuScenesDataset(man.root, "v1.0-mini", "val", GRID, IMAGE_SIZE)
    assert val.sample_tokens == man.sample_tokens["scene-0103"]
    assert val[0].meta["conditions"] == {"time_of_day": "night", "rain": 1.0}
    assert val[0].meta["tags"] == ["night", "rain"]
    assert NuScenesDataset(man.root, "v1.0-mini", "mini_val", GRID, IMAGE_SIZE).sample_tokens == val.sample_tokens
    assert nu.scene_conditions("Train station, drain works, nighttime") == {"time_of_day": "night", "rain": 0.0}


def test_batches_like_the_builtin_world_and_is_deterministic(data):
    _, ds = data
    batch = collate_samples([ds[0], ds[2]])
    assert batch["images"].shape == (2, 6, 3, *IMAGE_SIZE)
    assert batch["radar"].shape[0] == 2 and batch["radar"].shape[2] == 19
    assert batch["radar_valid"].sum(1).tolist() == [ds[0].radar.shape[0], ds[2].radar.shape[0]]
    assert batch["lidar"].shape[2] == 5 and batch["bev_seg"].shape == (2, 1, 40, 40)
    assert ds[-1].meta["index"] == len(ds) - 1
    with pytest.raises(IndexError, match="out of range"):
        ds[len(ds)]
    a, b = ds[1], pickle.loads(pickle.dumps(ds))[1]  # picklable for DataLoader workers
    for name in ("images", "radar", "lidar", "bev_seg", "bev_valid", "boxes"):
        assert torch.equal(getattr(a, name), getattr(b, name))


def test_cli_hooks(data):
    man, _ = data
    parser = argparse.ArgumentParser()
    nu.add_cli_arguments(parser)
    args = parser.parse_args(["--dataroot", str(man.root), "--version", "v1.0-mini", "--radar-sweeps", "3"])
    ds = nu.dataset_from_args(args, "val", grid=GRID, image_size=IMAGE_SIZE, modalities=("radar",))
    assert len(ds) == 3 and ds.n_radar_sweeps == 3 and ds.split == "val"
    with pytest.raises(ValueError, match="--dataroot"):
        nu.dataset_from_args(parser.parse_args([]), "train")


@pytest.mark.parametrize("kwargs, match", [
    ({"version": "v2.0-mini"}, "version 'v2.0-mini' does not exist"),
    ({"split": "banana"}, "split 'banana'"),
    ({"n_radar_sweeps": 0}, "n_radar_sweeps"),
    ({"image_size": (0, 32)}, "image_size"),
    ({"radar_filters": "strict"}, "radar_filters"),
    ({"modalities": ("sonar",)}, "modalities"),
    ({"cameras": ("CAM_TOP",)}, "cameras"),
    ({"grid": (200, 200, 8)}, "grid must be a BEVGrid"),
])
def test_bad_settings_raise_naming_them(data, kwargs, match):
    man, _ = data
    args = {"dataroot": man.root, "version": "v1.0-mini", "split": "train", "grid": GRID, "image_size": IMAGE_SIZE}
    with pytest.raises(ValueError, match=match):
        NuScenesDataset(**{**args, **kwargs})


def test_missing_dataroot_version_and_table(tmp_path, data):
    man, _ = data
    with pytest.raises(FileNotFoundError, match="dataroot .*nowhere"):
        NuScenesDataset(tmp_path / "nowhere", "v1.0-mini")
    with pytest.raises(FileNotFoundError, match="v1.0-trainval"):
        NuScenesDataset(man.root, "v1.0-trainval")
    broken = tmp_path / "broken"
    shutil.copytree(man.root / "v1.0-mini", broken / "v1.0-mini")
    (broken / "v1.0-mini" / "sample_annotation.json").unlink()
    with pytest.raises(FileNotFoundError, match="sample_annotation.json"):
        NuScenesDataset(broken, "v1.0-mini")


def test_missing_sweep_file_is_named(tmp_path):
    man = write_test_dataset(tmp_path)
    scene = man.scenes[0]
    sweep = sorted((tmp_path / "sweeps" / "RADAR_FRONT_LEFT").glob("n015-2018-07-24-11-22-00*"))[0]
    sweep.unlink()
    with pytest.raises(FileNotFoundError, match=re.escape(sweep.name)):
        NuScenesDataset(tmp_path, "v1.0-mini", "train", GRID, IMAGE_SIZE, verify_files=True)
    ds = NuScenesDataset(tmp_path, "v1.0-mini", "train", GRID, IMAGE_SIZE)  # the first sample needs no sweep
    assert ds[0].radar is not None and scene.name == ds[0].meta["scene_name"]
    with pytest.raises(FileNotFoundError, match="RADAR_FRONT_LEFT sweeps of sample"):
        ds[1]


def test_missing_devkit_gives_install_hint(monkeypatch):
    monkeypatch.setitem(sys.modules, "nuscenes.nuscenes", None)
    with pytest.raises(ImportError, match=r"pip install 'fusionlens\[nuscenes\]'"):
        nu.require_devkit()


def test_jpeg_draft_decoding_agrees_with_full_decoding(tmp_path):
    from fusionlens.data.nuscenes_fixture import write_nuscenes_fixture
    from nuscenes_fixture import scenes

    write_nuscenes_fixture(tmp_path, scenes()[:1], image_hw=(72, 128), textured_images=True)
    fast, full = (NuScenesDataset(tmp_path, "v1.0-mini", "train", GRID, IMAGE_SIZE, modalities=("camera",),
                                  jpeg_draft=draft)[0] for draft in (True, False))
    assert torch.equal(fast.intrinsics, full.intrinsics)
    assert fast.images.shape == full.images.shape == (6, 3, *IMAGE_SIZE)
    # Both average the +-40-level noise away to the camera's colour; they differ only in the filter.
    np.testing.assert_allclose(fast.images.mean((2, 3)), full.images.mean((2, 3)), atol=0.01)
    assert (fast.images - full.images).abs().mean() < 0.03


def test_radar_only_download_needs_no_images_or_lidar_files(tmp_path):
    man = write_test_dataset(tmp_path)
    for folder in ("samples", "sweeps"):
        for channel in (*CAMERA_NAMES, "LIDAR_TOP"):
            shutil.rmtree(tmp_path / folder / channel)
    s = NuScenesDataset(tmp_path, "v1.0-mini", "train", GRID, IMAGE_SIZE, modalities=("radar",), verify_files=True)[1]
    assert s.images is None and s.lidar is None and s.radar.shape[0] > 0
    # The calibration comes from the tables (sample_data width/height), the same as with the images present.
    k0, sx = man.intrinsic, IMAGE_SIZE[1] / man.image_hw[1]
    assert s.intrinsics[0, 0, 0].item() == pytest.approx(k0[0, 0] * sx)
    with pytest.raises(FileNotFoundError, match="cameras of sample .* CAM_FRONT file"):
        NuScenesDataset(tmp_path, "v1.0-mini", "train", GRID, IMAGE_SIZE, modalities=("camera",))


def test_trainval_version_uses_the_standard_splits(tmp_path):
    from fusionlens.data.nuscenes_fixture import FixtureScene, write_nuscenes_fixture

    # scene-0001 is in the devkit's train split, scene-0003 in val; the test split has none of them.
    write_nuscenes_fixture(tmp_path, (FixtureScene("scene-0001", n_samples=2), FixtureScene("scene-0003")),
                           version="v1.0-trainval")
    train = NuScenesDataset(tmp_path, "v1.0-trainval", "train", GRID, IMAGE_SIZE, modalities=("radar",))
    val = NuScenesDataset(tmp_path, "v1.0-trainval", "val", GRID, IMAGE_SIZE, modalities=("radar",))
    assert (len(train), len(val)) == (2, 3)
    assert {train[0].meta["scene_name"], val[0].meta["scene_name"]} == {"scene-0001", "scene-0003"}
    with pytest.raises(ValueError, match="split 'test' has no scenes"):
        NuScenesDataset(tmp_path, "v1.0-trainval", "test", GRID, IMAGE_SIZE)
