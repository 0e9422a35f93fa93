"""One sample of the world as a pure function of ``(config, seed, split, index)``.

The random stream is split per stage (scene, conditions, camera, LiDAR, radar) from ``SeedSequence([seed, split,
index])``, so a sensor setting (say the image size) never changes the scene or the other sensors' noise.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch

from fusionlens.data.labels import boxes_to_bev
from fusionlens.data.sample import CAMERA_NAMES, Sample
from fusionlens.world.camera import CameraOutput, render_cameras
from fusionlens.world.conditions import Conditions, sample_conditions
from fusionlens.world.config import WorldConfig
from fusionlens.world.lidar import LidarOutput, simulate_lidar
from fusionlens.world.radar import RadarOutput, simulate_radar
from fusionlens.world.rig import Rig, build_rig
from fusionlens.world.scene import Scene, box_array, make_scene

SPLITS: tuple[str, ...] = ("train", "val", "test")


@dataclass
class WorldFrame:
    """A sample together with the simulator's ground truth (id buffers, per-point object ids)."""

    sample: Sample
    scene: Scene
    conditions: Conditions
    rig: Rig
    camera: CameraOutput
    lidar: LidarOutput
    radar: RadarOutput
    labelled: np.ndarray  # scene object index of each box row in ``sample.boxes``


@lru_cache(maxsize=8)
def _rig(image_size: tuple[int, int], beams: int) -> Rig:
    return build_rig(image_size, beams)


def rig_for(cfg: WorldConfig) -> Rig:
    """The sensor rig (calibration) that ``cfg`` renders with."""
    return _rig(tuple(int(s) for s in cfg.image_size), int(cfg.lidar_beams))  # type: ignore[arg-type]


def _streams(seed: int, split: str, index: int) -> list[np.random.Generator]:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if int(seed) < 0 or int(index) < 0:
        raise ValueError(f"seed and index must be >= 0, got seed={seed}, index={index}")
    ss = np.random.SeedSequence([int(seed), SPLITS.index(split), int(index)])
    return [np.random.default_rng(s) for s in ss.spawn(5)]


def render_frame(cfg: WorldConfig, seed: int, split: str, index: int) -> WorldFrame:
    """Simulate scene, conditions and every sensor for sample ``index`` of ``split``; build its labels."""
    g_scene, g_cond, g_cam, g_lidar, g_radar = _streams(seed, split, index)
    rig = rig_for(cfg)
    scene = make_scene(cfg, g_scene)
    cond = sample_conditions(cfg, g_cond, rig.camera_yaw)
    noise = float(cfg.sensor_noise)
    cam = render_cameras(scene, cond, rig, g_cam, noise)
    lidar = simulate_lidar(scene, cond, rig, cfg.lidar_azimuth_steps, cfg.lidar_range, g_lidar, noise)
    radar = simulate_radar(scene, cond, rig, cfg.radar_sweeps, cfg.radar_range, cfg.radar_azimuth_step_deg,
                           cfg.radar_azimuth_noise_deg, g_radar, noise)

    idx = scene.labelled
    boxes = torch.from_numpy(box_array(scene, idx)).float()
    labels = torch.from_numpy(scene.label[idx]).long()
    unocc = cam.unoccluded[idx]
    frac = np.where(unocc > 0, cam.pixels[idx] / np.maximum(unocc, 1), 0.0)
    signal = np.where(unocc > 0, cam.signal[idx] / np.maximum(unocc, 1), 0.0)
    visible = (cam.pixels[idx].sum(1) > 0) | (lidar.per_object[idx] > 0) | (radar.per_object[idx] > 0)
    visibility = {
        "camera_pixels": torch.from_numpy(cam.pixels[idx]).long(),
        "camera_frac": torch.from_numpy(frac).float(),
        "camera_signal": torch.from_numpy(signal).float(),
        "lidar_points": torch.from_numpy(lidar.per_object[idx]).long(),
        "radar_points": torch.from_numpy(radar.per_object[idx]).long(),
        "visible": torch.from_numpy(visible),
    }
    maps = boxes_to_bev(boxes, labels, cfg.grid, invalid=~visibility["visible"])
    meta = {
        "source": "builtin", "seed": int(seed), "split": split, "index": int(index), "layout": scene.layout,
        "ego_speed": float(scene.ego_speed), "conditions": cond.to_meta(), "tags": cond.tags,
        "camera_names": list(CAMERA_NAMES),
    }
    sample = Sample(
        images=torch.from_numpy(cam.images),
        intrinsics=torch.from_numpy(rig.intrinsics).float(),
        cam_to_ego=torch.from_numpy(rig.cam_to_ego).float(),
        radar=torch.from_numpy(radar.points),
        lidar=torch.from_numpy(lidar.points),
        bev_seg=maps["seg"], bev_valid=maps["valid"], bev_center=maps["center"], bev_offset=maps["offset"],
        boxes=boxes, box_labels=labels, visibility=visibility, grid=cfg.grid, meta=meta,
    )
    return WorldFrame(sample=sample, scene=scene, conditions=cond, rig=rig, camera=cam, lidar=lidar,
                      radar=radar, labelled=idx)


def generate_sample(cfg: WorldConfig, seed: int, split: str, index: int) -> Sample:
    """Sample ``index`` of ``split`` of the world ``(cfg, seed)`` — identical on every call and machine."""
    return render_frame(cfg, seed, split, index).sample
