"""KITTI layout: calibration and label parsing, frame conversions worked out by hand, and the world's export
read back through the reader."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fusionlens.data.kitti import (
    KittiDataset,
    KittiObject,
    lidar_boxes_to_camera,
    objects_to_lidar_boxes,
    parse_calib,
    parse_label_line,
    parse_labels,
    project_boxes,
)
from fusionlens.world import WorldConfig, render_frame
from fusionlens.world.kitti_export import FRONT, export_kitti, frame_objects, world_calib
from fusionlens.world.rig import LIDAR_POSITION

# KITTI's usual axes with no offsets: velo x -> cam z, velo y -> -cam x, velo z -> -cam y.
CANONICAL = (
    "P0: 700 0 600 0 0 700 180 0 0 0 1 0\n"
    "P1: 700 0 600 -380 0 700 180 0 0 0 1 0\n"
    "P2: 700 0 600 45 0 700 180 0.5 0 0 1 0.005\n"
    "P3: 700 0 600 -340 0 700 180 0 0 0 1 0\n"
    "R0_rect: 1 0 0 0 1 0 0 0 1\n"
    "Tr_velo_to_cam: 0 -1 0 0 0 0 -1 0 1 0 0 0\n"
    "Tr_imu_to_velo: 1 0 0 0 0 1 0 0 0 0 1 0\n"
)
TINY = WorldConfig(image_size=(64, 112))


def test_parse_calib_values_and_missing_keys():
    calib = parse_calib(CANONICAL)
    assert calib.P[2][0, 3] == 45 and calib.P[1][0, 3] == -380
    np.testing.assert_allclose(calib.lidar_to_rect(np.array([[10.0, 2.0, 1.0]])), [[-2.0, -1.0, 10.0]])
    uv, depth = calib.project_rect(np.array([[0.0, 0.0, 10.0]]))
    np.testing.assert_allclose(uv, [[(6000 + 45) / 10.005, (1800 + 0.5) / 10.005]])
    assert parse_calib(calib.to_text()).P[2].tolist() == calib.P[2].tolist()
    with pytest.raises(ValueError, match=r"calib.txt: calibration lacks \['P2'\]"):
        parse_calib(CANONICAL.replace("P2:", "Px:"), "calib.txt")
    with pytest.raises(ValueError, match=r"a.txt:6: Tr_velo_to_cam needs 12 numbers, got 11"):
        parse_calib(CANONICAL.replace("1 0 0 0\nTr_imu", "1 0 0\nTr_imu"), "a.txt")
    with pytest.raises(ValueError, match="R0_rect has a non-numeric value"):
        parse_calib(CANONICAL.replace("R0_rect: 1", "R0_rect: one"))


def test_parse_label_line_fields_and_errors():
    obj = parse_label_line("Car 0.12 1 -1.57 100.5 120.0 300.25 220.0 1.5 1.6 3.9 2.0 1.7 15.0 0.1 0.87")
    assert obj.type == "Car" and obj.truncated == pytest.approx(0.12) and obj.occluded == 1
    assert obj.bbox == (100.5, 120.0, 300.25, 220.0) and obj.dimensions == (1.5, 1.6, 3.9)
    assert obj.location == (2.0, 1.7, 15.0) and obj.rotation_y == pytest.approx(0.1) and obj.score == 0.87
    back = parse_label_line(obj.to_line())
    assert back.type == obj.type and back.bbox == obj.bbox and back.score == pytest.approx(0.87)
    dontcare = parse_labels("DontCare -1 -1 -10 1 2 3 4 -1 -1 -1 -1000 -1000 -1000 -10\n\n")
    assert len(dontcare) == 1 and dontcare[0].type == "DontCare"
    with pytest.raises(ValueError, match="f.txt:3: a KITTI label line has 15 fields"):
        parse_labels("\n\nCar 0 0 0 1 2 3", "f.txt")
    with pytest.raises(ValueError, match="unknown object type 'Bus'"):
        parse_label_line("Bus 0 0 0 1 2 3 4 1 1 1 0 0 5 0")


def test_label_to_lidar_box_by_hand():
    """Bottom centre (1, 1.5, 10), h = 2, ry = 0 (heading along camera x = velo -y): centre (10, -1, -0.5),
    yaw -pi / 2."""
    calib = parse_calib(CANONICAL)
    obj = KittiObject("Car", 0.0, 0, 0.0, (0, 0, 1, 1), (2.0, 1.8, 4.0), (1.0, 1.5, 10.0), 0.0)
    box = objects_to_lidar_boxes([obj], calib)
    torch.testing.assert_close(box, torch.tensor([[10.0, -1.0, -0.5, 1.8, 4.0, 2.0, -math.pi / 2]]))
    for ry in (0.3, -2.0, 3.0):  # the familiar yaw = -ry - pi / 2 of KITTI's usual calibration, and back
        obj.rotation_y = ry
        yaw = float(objects_to_lidar_boxes([obj], calib)[0, 6])
        assert math.remainder(yaw - (-ry - math.pi / 2), 2 * math.pi) == pytest.approx(0, abs=1e-6)
        loc, dims, ry_back = lidar_boxes_to_camera(objects_to_lidar_boxes([obj], calib).double().numpy(), calib)
        np.testing.assert_allclose(loc[0], obj.location, atol=1e-5)
        np.testing.assert_allclose(dims[0], obj.dimensions, atol=1e-6)
        assert math.remainder(ry_back[0] - ry, 2 * math.pi) == pytest.approx(0, abs=1e-6)


def test_world_calibration_puts_a_box_on_known_pixels():
    """Front camera at ego (1.70, 0.02, 1.51), LiDAR at ego (0.94, 0, 1.84), fx = 1266.4 * 224 / 1600,
    fy = 1266.4 * 128 / 900, principal point (112, 64). A 4 x 2 x 2 m box centred 20 m ahead of the camera on its
    axis spans depths 18..22 m, so its 2-D box is 112 -+ fx / 18 by 64 -+ fy / 18."""
    calib = world_calib(render_frame(WorldConfig(image_size=(128, 224)), 0, "train", 0).rig)
    fx, fy = 1266.4 * 224 / 1600, 1266.4 * 128 / 900
    centre = np.array([1.70 + 20 - LIDAR_POSITION[0], 0.02, 1.51 - LIDAR_POSITION[2]])
    box = np.array([[*centre, 2.0, 4.0, 2.0, 0.0]])
    np.testing.assert_allclose(calib.lidar_to_rect(centre[None]), [[0.0, 0.0, 20.0]], atol=1e-12)
    bbox, front = project_boxes(box, calib, (128, 224))
    np.testing.assert_allclose(bbox[0], [112 - fx / 18, 64 - fy / 18, 112 + fx / 18, 64 + fy / 18], atol=1e-9)
    assert front.all()


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("kitti")
    export_kitti(root, {"train": 2, "val": 1}, cfg=TINY, seed=3)
    return root


def test_export_reads_back_as_the_world(exported):
    ds = KittiDataset(exported, "train", classes=("Car", "Pedestrian", "Truck", "Misc"))
    assert ds.ids == ["000000", "000001"] and KittiDataset(exported, "val").ids == ["000002"]
    for index in range(len(ds)):
        item, frame = ds[index], render_frame(TINY, 3, "train", index)
        torch.testing.assert_close(item["image"], frame.sample.images[FRONT], atol=0.5 / 255 + 1e-6, rtol=0)
        pts = frame.sample.lidar
        torch.testing.assert_close(item["points"][:, :3] + torch.tensor(LIDAR_POSITION).float(), pts[:, :3],
                                   atol=1e-4, rtol=0)
        torch.testing.assert_close(item["points"][:, 3], pts[:, 3] / 255)
        labelled = [o for o in item["objects"] if o.type != "DontCare"]
        assert len(labelled) == len(item["boxes"]) > 0
        world = frame.sample.boxes[:, :7].clone()
        world[:, :3] -= torch.tensor(LIDAR_POSITION)
        for box in item["boxes"]:  # every exported box is a world box (to the 4 decimals of the label file)
            diff = (world[:, :6] - box[:6]).abs().amax(1)
            match = int(diff.argmin())
            assert diff[match] < 2e-3
            assert math.remainder(float(world[match, 6] - box[6]), 2 * math.pi) == pytest.approx(0, abs=2e-3)


def test_export_occlusion_and_boxes_follow_the_visibility_truth(exported):
    frame = render_frame(TINY, 3, "train", 0)
    calib = world_calib(frame.rig)
    objects = frame_objects(frame, calib)
    ids = frame.camera.object_ids[FRONT]
    shown = 0
    for obj in objects:
        if obj.type == "DontCare":
            continue
        loc = np.array(obj.location)
        # find the object's scene id through its location
        lidar_box = objects_to_lidar_boxes([obj], calib).numpy()[0]
        world_xy = lidar_box[:2] + np.array(LIDAR_POSITION[:2])
        k = int(np.argmin(np.linalg.norm(frame.sample.boxes[:, :2].numpy() - world_xy, axis=1)))
        scene_id = int(frame.labelled[k])
        share = frame.camera.pixels[scene_id, FRONT] / frame.camera.unoccluded[scene_id, FRONT]
        expected = 0 if share >= 0.8 else 1 if share >= 0.4 else 2 if share > 0 else 3
        assert obj.occluded == expected, (loc, share)
        v, u = np.nonzero(ids == scene_id)
        if len(u):  # the object's visible pixel centres lie inside its projected 2-D box
            shown += 1
            left, top, right, bottom = obj.bbox
            assert left - 1 <= (u + 0.5).min() and (u + 0.5).max() <= right + 1
            assert top - 1 <= (v + 0.5).min() and (v + 0.5).max() <= bottom + 1
            if obj.truncated == 0:
                assert left > 0 or (u == 0).any()
    assert shown > 0


def test_reader_and_exporter_errors_name_the_file(exported, tmp_path):
    with pytest.raises(FileNotFoundError, match="split list for 'nope'"):
        KittiDataset(exported, "nope")
    with pytest.raises(FileNotFoundError, match="dataroot .* does not exist"):
        KittiDataset(tmp_path / "absent")
    with pytest.raises(ValueError, match=r"KITTI classes \['Bus'\] unknown"):
        KittiDataset(exported, classes=("Bus",))
    broken = tmp_path / "broken"
    export_kitti(broken, {"train": 1}, cfg=TINY, seed=3)
    scan = broken / "training" / "velodyne" / "000000.bin"
    scan.write_bytes(scan.read_bytes()[:-4])
    with pytest.raises(ValueError, match=r"000000.bin' holds \d+ float32 values, not a multiple of 4"):
        KittiDataset(broken)[0]
    (broken / "training" / "calib" / "000000.txt").unlink()
    with pytest.raises(FileNotFoundError, match=r"names frame 000000 but .*calib/000000.txt' is missing"):
        KittiDataset(broken)
    with pytest.raises(ValueError, match="KITTI export with other settings: seed: 3 there vs 4 now"):
        export_kitti(broken, {"train": 1}, cfg=TINY, seed=4)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "mine.txt").write_text("keep")
    with pytest.raises(ValueError, match="non-empty folder not written by export_kitti"):
        export_kitti(foreign, {"train": 1}, cfg=TINY)
    assert (foreign / "mine.txt").read_text() == "keep"
