"""Radar and LiDAR sweeps from a nuScenes-format fixture: ego-motion compensation, voxels, time lags, fields."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fusionlens.data.nuscenes import NuScenesDataset
from fusionlens.data.sample import LIDAR_FIELDS, RADAR_FIELDS, RADAR_NAMES
from nuscenes_fixture import GRID, IMAGE_SIZE, write_test_dataset

pytest.importorskip("nuscenes")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("nusc")
    man = write_test_dataset(root)
    ds = NuScenesDataset(root, "v1.0-mini", "train", GRID, IMAGE_SIZE, modalities=("radar", "lidar"))
    return man, ds


def _expected_landmarks(man, scene, k):
    """Landmarks in the ego frame of keyframe ``k`` (LIDAR_TOP fires at the keyframe time)."""
    ref_from_global = np.linalg.inv(man.ego_pose(scene, 0.5 * k))
    lm = man.landmarks_global(scene)
    return (ref_from_global[:3, :3] @ lm.T).T + ref_from_global[:3, 3], ref_from_global


def _field(name):
    return RADAR_FIELDS.index(name)


def test_radar_points_land_in_their_voxel_in_every_sweep(data):
    man, ds = data
    scene, k = man.scenes[0], 2
    expected, _ = _expected_landmarks(man, scene, k)
    radar = ds[k].radar
    assert radar.shape[1] == len(RADAR_FIELDS) == 19
    for i, xyz in enumerate(expected):
        rows = radar[radar[:, _field("id")] == i]
        # 5 radars x 5 sweeps, each written in its own sensor frame at its own ego pose.
        assert rows.shape[0] == len(RADAR_NAMES) * 5
        np.testing.assert_allclose(rows[:, :3].numpy(), np.tile(xyz, (rows.shape[0], 1)), atol=2e-3)
        idx, inside = GRID.to_index(torch.tensor(xyz, dtype=torch.float32)[None])
        got_idx, got_inside = GRID.to_index(rows[:, :3])
        assert inside.item() and got_inside.all()
        assert (got_idx == idx).all()
        # Hand-computed: 1 m cells starting at -20 m.
        assert got_idx[0, 0].item() == int(np.floor(xyz[0] + 20.0))
        assert got_idx[0, 1].item() == int(np.floor(xyz[1] + 20.0))
        assert got_idx[0, 2].item() == int(np.floor((xyz[2] + 5.0) / 2.5))


def test_radar_time_lags_follow_sweep_timestamps(data):
    man, ds = data
    radar = ds[2].radar
    # Radar j fires 20 (j + 1) ms before LIDAR_TOP in the default rig; keyframe 2 and the 4 sweeps before it, one
    # every 0.5/3 s.
    want = sorted(0.02 * (j + 1) + m * 0.5 / 3 for j in range(len(RADAR_NAMES)) for m in range(5))
    lags = sorted(radar[radar[:, _field("id")] == 0, _field("time_lag")].tolist())
    np.testing.assert_allclose(lags, want, atol=2e-6)
    # At the scene's first keyframe there is nothing earlier: one sweep per radar.
    first = ds[0].radar
    assert first[first[:, _field("id")] == 0].shape[0] == len(RADAR_NAMES)


def test_radar_velocities_are_rotated_into_the_reference_ego_frame(data):
    man, ds = data
    scene, k = man.scenes[0], 1
    _, ref_from_global = _expected_landmarks(man, scene, k)
    rot = ref_from_global[:2, :2]
    comp = rot @ np.asarray(scene.landmark_velocity)
    raw = rot @ (np.asarray(scene.landmark_velocity) - np.asarray(scene.ego_velocity))
    rows = ds[k].radar
    rows = rows[rows[:, _field("id")] != 99]
    np.testing.assert_allclose(rows[:, [_field("vx_comp"), _field("vy_comp")]].numpy(), np.tile(comp, (len(rows), 1)),
                               atol=1e-4)
    np.testing.assert_allclose(rows[:, [_field("vx"), _field("vy")]].numpy(), np.tile(raw, (len(rows), 1)), atol=1e-4)
    # Metadata passes through untouched.
    assert (rows[:, _field("ambig_state")] == 3).all() and (rows[:, _field("pdh0")] == 1).all()
    assert (rows[:, _field("rcs")] == 5.0 + rows[:, _field("id")]).all()


def test_radar_positions_and_lags_match_devkit_from_file_multisweep(data):
    from nuscenes.utils.data_classes import RadarPointCloud

    from fusionlens.data import _nuscenes_points as pts

    man, ds = data
    sample = ds.nusc.get("sample", ds.sample_tokens[2])
    ref = ds.nusc.get("sample_data", sample["data"]["LIDAR_TOP"])
    ego_from_lidar = pts.pose_matrix(ds.nusc.get("calibrated_sensor", ref["calibrated_sensor_token"]))
    ref_from_global = pts.pose_matrix(ds.nusc.get("ego_pose", ref["ego_pose_token"]), inverse=True)
    for channel in ("RADAR_FRONT", "RADAR_BACK_LEFT"):
        records = pts.sweep_records(ds.nusc, sample["data"][channel], 5)
        ours = pts.load_sweeps(ds.nusc, records, "radar", ref_from_global, ref["timestamp"],
                               radar_filters="default")
        RadarPointCloud.default_filters()
        theirs, times = RadarPointCloud.from_file_multisweep(ds.nusc, sample, channel, "LIDAR_TOP", nsweeps=5)
        xyz = (ego_from_lidar[:3, :3] @ theirs.points[:3]).T + ego_from_lidar[:3, 3]
        np.testing.assert_allclose(ours[:, :3], xyz, atol=1e-4)
        np.testing.assert_allclose(ours[:, 18], times[0], atol=1e-6)
        np.testing.assert_array_equal(ours[:, 3:6], theirs.points[3:6].T)  # dyn_prop, id, rcs


def test_radar_filters(tmp_path, data):
    man, _ = data
    kept = NuScenesDataset(man.root, "v1.0-mini", "train", GRID, IMAGE_SIZE, modalities=("radar",))[2].radar
    filtered = NuScenesDataset(man.root, "v1.0-mini", "train", GRID, IMAGE_SIZE, modalities=("radar",),
                               radar_filters="default")[2].radar
    rejected = kept[:, _field("invalid_state")] == 1
    assert rejected.sum() == len(RADAR_NAMES) * 5  # one invalid return per file
    assert (filtered[:, _field("invalid_state")] == 0).all()
    assert filtered.shape[0] == kept.shape[0] - rejected.sum()


def test_lidar_sweeps_keep_intensity_and_ring(data):
    man, ds = data
    scene, k = man.scenes[0], 2
    expected, _ = _expected_landmarks(man, scene, k)
    lidar = ds[k].lidar
    assert lidar.shape == (len(expected) * 5, len(LIDAR_FIELDS))  # every landmark in 5 sweeps
    for i, xyz in enumerate(expected):
        rows = lidar[lidar[:, 3] == 10.0 + i]
        assert rows.shape[0] == 5
        np.testing.assert_allclose(rows[:, :3].numpy(), np.tile(xyz, (5, 1)), atol=2e-3)
        assert (rows[:, 4] == i % 32).all()


def test_sweep_counts_are_configurable(data):
    man, _ = data
    ds = NuScenesDataset(man.root, "v1.0-mini", "train", GRID, IMAGE_SIZE, n_radar_sweeps=2, n_lidar_sweeps=1,
                         modalities=("radar", "lidar"))
    s = ds[2]
    assert s.lidar.shape[0] == len(man.scenes[0].landmarks)
    assert s.radar.shape[0] == len(RADAR_NAMES) * 2 * (len(man.scenes[0].landmarks) + 1)
    assert s.images is None


def test_radar_pcd_writer_round_trips_all_18_fields_through_the_devkit(tmp_path):
    from nuscenes.utils.data_classes import RadarPointCloud

    from fusionlens.data._nuscenes_points import _reader
    from fusionlens.data.nuscenes_fixture import write_radar_pcd

    rng = np.random.default_rng(0)
    pts = np.column_stack([rng.uniform(-50, 50, (7, 3)), rng.integers(0, 8, 7), rng.integers(-300, 300, 7),
                           rng.uniform(-5, 30, (7, 5)), rng.integers(0, 2, 7), rng.integers(0, 5, 7),
                           rng.integers(0, 30, (7, 2)), rng.integers(0, 18, 7), rng.integers(0, 8, 7),
                           rng.integers(0, 30, (7, 2))])
    write_radar_pcd(tmp_path / "r.pcd", pts)
    assert (tmp_path / "r.pcd").read_bytes().startswith(b"# .PCD v0.7 - Point Cloud Data file format\nVERSION 0.7")
    got = _reader("radar:none").from_file(str(tmp_path / "r.pcd")).points.T
    np.testing.assert_allclose(got, pts.astype(np.float32), rtol=1e-6)
    # The devkit's default filters keep only invalid_state 0, dyn_prop 0-6, ambig_state 3.
    RadarPointCloud.default_filters()
    kept = RadarPointCloud.from_file(str(tmp_path / "r.pcd")).points.T
    want = (pts[:, 14] == 0) & (pts[:, 3] <= 6) & (pts[:, 11] == 3)
    np.testing.assert_allclose(kept, pts[want].astype(np.float32), rtol=1e-6)
    write_radar_pcd(tmp_path / "empty.pcd", np.zeros((0, 18)))  # the devkit's empty-cloud convention
    assert _reader("radar:none").from_file(str(tmp_path / "empty.pcd")).points.shape == (18, 0)


def test_fixture_clutter_and_textured_images_reach_the_loader(tmp_path):
    from dataclasses import replace

    from fusionlens.data.nuscenes_fixture import write_nuscenes_fixture
    from nuscenes_fixture import scenes

    train = replace(scenes()[0], clutter=(4, 50), n_samples=2)
    write_nuscenes_fixture(tmp_path, (train,), image_hw=(36, 64), textured_images=True)
    s = NuScenesDataset(tmp_path, "v1.0-mini", "train", GRID, IMAGE_SIZE, n_radar_sweeps=1, n_lidar_sweeps=1,
                        min_distance=0.0)[0]
    per_file = len(train.landmarks) + 1 + 4  # landmarks, the rejected return, clutter
    assert s.radar.shape == (len(RADAR_NAMES) * per_file, 19)
    assert s.lidar.shape == (len(train.landmarks) + 50, 5)
    assert s.images.std() > 0.02  # not flat any more
