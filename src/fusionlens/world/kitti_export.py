"""Export the built-in world as a KITTI 3-D object split (front camera + roof LiDAR), readable by
:class:`fusionlens.data.kitti.KittiDataset`.

Calibration: the Velodyne frame is the ego frame's axes moved to the LiDAR's mounting point (KITTI's scans are
sensor-centred: the ground lies ~1.8 m below the origin); camera 2 is the world's front camera, already
rectified (``R0_rect`` = identity) with ``P0..P3 = [K | 0]`` (a monocular rig: no stereo baseline), and
``Tr_velo_to_cam`` maps Velodyne to camera coordinates from the rig's extrinsics. ``Tr_imu_to_velo`` is the
identity (the world has no IMU).

Labels come from the simulator's truth: classes map car -> Car, truck -> Truck, pedestrian -> Pedestrian and
the other vehicles (bus, trailer, construction vehicle) -> Misc; the 2-D box is the projected 3-D box clipped
to the image; **truncation** is the share of the projected box's area outside the image (1.0 when part of the
box is behind the camera); **occlusion** comes from the front camera's visibility truth, the share of the
object's pixels seen were it alone that are visible: >= 0.8 -> 0 (fully visible), >= 0.4 -> 1 (partly
occluded), > 0 -> 2 (largely occluded), 0 -> 3 (unknown: in view yet unseen, e.g. a blacked-out camera).
Objects farther than ``dontcare_beyond`` metres ahead are written as DontCare regions (KITTI's annotators
skipped far objects the same way). Objects the camera would not cover at all are left out.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from fusionlens.data.kitti import KittiCalib, KittiObject, lidar_boxes_to_camera, observation_angle, project_boxes
from fusionlens.io import atomic_write_bytes, atomic_write_text, claim_settings
from fusionlens.world.config import WorldConfig
from fusionlens.world.generate import WorldFrame, render_frame
from fusionlens.world.rig import LIDAR_POSITION, Rig

KITTI_TYPE_OF: dict[str, str] = {
    "car": "Car", "truck": "Truck", "pedestrian": "Pedestrian", "bus": "Misc", "trailer": "Misc",
    "construction_vehicle": "Misc",
}
FRONT = 0  # CAM_FRONT in CAMERA_NAMES
#: A KITTI-like default: the world's 16:9 front camera at 128 x 224 px (KITTI's images are 375 x 1242).
EXPORT_CONFIG = WorldConfig(image_size=(128, 224))


def world_calib(rig: Rig) -> KittiCalib:
    """The KITTI calibration of the world's front camera and LiDAR."""
    velo_to_ego = np.eye(4)
    velo_to_ego[:3, 3] = LIDAR_POSITION
    velo_to_cam = np.linalg.inv(rig.cam_to_ego[FRONT]) @ velo_to_ego
    p = np.concatenate([rig.intrinsics[FRONT], np.zeros((3, 1))], 1)
    return KittiCalib(P=(p, p, p, p), R0_rect=np.eye(3), Tr_velo_to_cam=velo_to_cam[:3], Tr_imu_to_velo=np.eye(4)[:3])


def occlusion_level(visible_share: float) -> int:
    if visible_share >= 0.8:
        return 0
    if visible_share >= 0.4:
        return 1
    return 2 if visible_share > 0 else 3


def frame_objects(frame: WorldFrame, calib: KittiCalib, dontcare_beyond: float = 50.0) -> list[KittiObject]:
    """KITTI label lines of one rendered frame (see the module docstring for the rules)."""
    from fusionlens.data.sample import CLASSES

    h, w = frame.rig.image_size
    boxes = frame.sample.boxes[:, :7].double().numpy().copy()
    boxes[:, :3] -= np.asarray(LIDAR_POSITION)
    if not len(boxes):
        return []
    unclipped, front = project_boxes(boxes, calib)
    clipped, _ = project_boxes(boxes, calib, (h, w))
    loc, dims, ry = lidar_boxes_to_camera(boxes, calib)
    alpha = observation_angle(boxes, calib)
    cam_pixels = frame.camera.pixels[frame.labelled, FRONT]
    cam_alone = frame.camera.unoccluded[frame.labelled, FRONT]
    area_full, area_in = (np.clip(b[:, 2] - b[:, 0], 0, None) * np.clip(b[:, 3] - b[:, 1], 0, None)
                          for b in (unclipped, clipped))
    out = []
    for i in range(len(boxes)):
        if cam_alone[i] == 0 or loc[i, 2] <= 0:
            continue  # not in the front camera's view
        share_in = area_in[i] / max(area_full[i], 1e-9)
        truncated = 1.0 if not front[i] else float(np.clip(1.0 - share_in, 0.0, 1.0))
        bbox = tuple(float(v) for v in clipped[i])
        if loc[i, 2] > dontcare_beyond:
            out.append(KittiObject("DontCare", -1.0, -1, -10.0, bbox, (-1.0, -1.0, -1.0), (-1000.0, -1000.0, -1000.0),
                                   -10.0))
            continue
        name = KITTI_TYPE_OF[CLASSES[int(frame.sample.box_labels[i])]]
        out.append(KittiObject(
            name, round(truncated, 2), occlusion_level(float(cam_pixels[i]) / float(cam_alone[i])), float(alpha[i]),
            bbox, tuple(float(v) for v in dims[i]), tuple(float(v) for v in loc[i]), float(ry[i])))
    return out


def _png(image: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray((np.clip(image.transpose(1, 2, 0), 0, 1) * 255 + 0.5).astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def export_kitti(root: str | Path, sizes: dict[str, int], cfg: WorldConfig = EXPORT_CONFIG, seed: int = 0,
                 dontcare_beyond: float = 50.0, progress: bool = False) -> Path:
    """Write ``sizes`` frames per world split (``{"train": 40, "val": 10}``) as a KITTI folder at ``root``
    (``training/`` + ``ImageSets/<split>.txt``; frames numbered across splits in the order given).

    The settings are recorded in ``root/fusionlens_export.json``; a later call with the same settings reuses the
    frames already written (each file is written atomically), and one with other settings is refused, so an
    existing folder is never overwritten with different data."""
    root = Path(root).expanduser()
    bad = {k: v for k, v in sizes.items() if k not in ("train", "val", "test") or int(v) <= 0}
    if bad or not sizes:
        raise ValueError(f"export_kitti: sizes must map train/val/test to positive counts, got {sizes}")
    if root.exists() and not root.is_dir():
        raise ValueError(f"export_kitti: {str(root)!r} exists and is not a folder")
    if root.is_dir() and any(root.iterdir()) and not (root / "fusionlens_export.json").is_file():
        raise ValueError(f"export_kitti: {str(root)!r} is a non-empty folder not written by export_kitti; "
                         "choose an empty or new folder")
    root.mkdir(parents=True, exist_ok=True)
    settings = {"world": cfg.to_dict(), "seed": int(seed), "sizes": {k: int(v) for k, v in sizes.items()},
                "dontcare_beyond": float(dontcare_beyond), "format": 1}
    claim_settings(root / "fusionlens_export.json", settings, what="a KITTI export with other settings:",
                   remedy="export to another folder")
    folder = root / "training"
    frame_id = 0
    from tqdm import tqdm

    for split, count in sizes.items():
        ids = []
        for index in tqdm(range(int(count)), desc=f"kitti export {split}", disable=not progress):
            name = f"{frame_id:06d}"
            frame_id += 1
            ids.append(name)
            if (folder / "label_2" / f"{name}.txt").is_file():
                continue  # written by an earlier run with the same settings (labels are written last)
            frame = render_frame(cfg, seed, split, index)
            calib = world_calib(frame.rig)
            points = frame.sample.lidar.numpy().astype(np.float64)
            scan = np.concatenate([points[:, :3] - np.asarray(LIDAR_POSITION), points[:, 3:4] / 255.0], 1)
            atomic_write_bytes(folder / "velodyne" / f"{name}.bin", scan.astype(np.float32).tobytes())
            atomic_write_bytes(folder / "image_2" / f"{name}.png", _png(frame.sample.images[FRONT].numpy()))
            atomic_write_text(folder / "calib" / f"{name}.txt", calib.to_text())
            lines = [o.to_line() for o in frame_objects(frame, calib, dontcare_beyond)]
            atomic_write_text(folder / "label_2" / f"{name}.txt", "".join(line + "\n" for line in lines))
        atomic_write_text(root / "ImageSets" / f"{split}.txt", "".join(i + "\n" for i in ids))
    return root
