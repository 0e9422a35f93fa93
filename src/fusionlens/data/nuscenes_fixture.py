"""Write a tiny dataset in the nuScenes on-disk format, for tests and benchmarks that have no real nuScenes.

The dataset is complete enough for the real devkit (``NuScenes(version, dataroot)``) to load it: all 13 JSON
tables with linked tokens, a map record with its mask PNG, JPEG images for the six cameras, radar sweeps as
binary PCD files with the 18 nuScenes radar fields, LiDAR sweeps as ``.pcd.bin`` float32 ``(x, y, z,
intensity, ring)``. Scenes take names from the devkit's mini split (``scene-0061`` is in ``mini_train``,
``scene-0103`` in ``mini_val``), so the split machinery works unchanged.

Everything is analytic so that tests have exact oracles: the ego drives at constant velocity and yaw rate,
every point cloud contains the same static *landmarks* (fixed in the global frame) written in the sensor frame
of its own timestamp, every radar return carries a known global velocity, and annotated objects move at
constant velocity. :class:`FixtureManifest` returns the poses and rig so that a test can compute where
anything must land."""

from __future__ import annotations

import hashlib
import math
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fusionlens.io import atomic_open, atomic_write_bytes, atomic_write_json

RADAR_PCD_FIELDS = ("x y z dyn_prop id rcs vx vy vx_comp vy_comp is_quality_valid ambig_state x_rms y_rms "
                    "invalid_state pdh0 vx_rms vy_rms").split()
_RADAR_SIZES = (4, 4, 4, 1, 2, 4, 4, 4, 4, 4, 1, 1, 1, 1, 1, 1, 1, 1)
_RADAR_TYPES = "FFFIIFFFFFIIIIIIII"
_RADAR_STRUCT = struct.Struct("<fffbhfffffbbbbbbbb")
FIXTURE_TABLES = ("attribute", "calibrated_sensor", "category", "ego_pose", "instance", "log", "map",
                  "sample", "sample_annotation", "sample_data", "scene", "sensor", "visibility")
_VISIBILITY_LEVELS = {"1": "v0-40", "2": "v40-60", "3": "v60-80", "4": "v80-100"}


@dataclass(frozen=True)
class SensorSpec:
    """A rig sensor: mounting in the ego frame, time offset from the LiDAR keyframe, sweeps per 0.5 s."""

    channel: str
    modality: str  # "camera" | "radar" | "lidar"
    translation: tuple[float, float, float]
    yaw: float  # radians about ego z; cameras are also turned to OpenCV axes (x right, y down, z forward)
    time_offset: float  # seconds relative to the LiDAR keyframe
    sweeps_between: int = 2  # non-keyframe sweeps between two keyframes


def default_rig() -> tuple[SensorSpec, ...]:
    """A rig laid out like nuScenes' (six cameras, five radars, LIDAR_TOP turned -90 degrees as there)."""
    cams = (("CAM_FRONT", 0.0), ("CAM_FRONT_RIGHT", -55.0), ("CAM_BACK_RIGHT", -110.0), ("CAM_BACK", 180.0),
            ("CAM_BACK_LEFT", 110.0), ("CAM_FRONT_LEFT", 55.0))
    radars = (("RADAR_FRONT", (3.41, 0.0, 0.50), 0.0), ("RADAR_FRONT_LEFT", (2.42, 0.80, 0.78), 90.0),
              ("RADAR_FRONT_RIGHT", (2.42, -0.80, 0.77), -90.0),
              ("RADAR_BACK_LEFT", (-0.56, 0.63, 0.53), 170.0),
              ("RADAR_BACK_RIGHT", (-0.56, -0.62, 0.53), -170.0))
    rig = [SensorSpec("LIDAR_TOP", "lidar", (0.94, 0.0, 1.84), math.radians(-90.0), 0.0)]
    for i, (name, yaw) in enumerate(cams):
        a = math.radians(yaw)
        mount = (1.5 * math.cos(a), 0.5 * math.sin(a), 1.5)
        rig.append(SensorSpec(name, "camera", mount, a, 0.008 * (i - 2.5)))
    for j, (name, xyz, yaw) in enumerate(radars):
        rig.append(SensorSpec(name, "radar", xyz, math.radians(yaw), -0.02 * (j + 1)))
    return tuple(rig)


@dataclass(frozen=True)
class FixtureObject:
    """An annotated object: global pose at the scene's first keyframe, constant global velocity."""

    category: str  # nuScenes category, e.g. "vehicle.car"
    translation: tuple[float, float, float]
    size: tuple[float, float, float]  # w, l, h as nuScenes
    yaw: float
    velocity: tuple[float, float] = (0.0, 0.0)
    visibility: str = "4"  # nuScenes visibility token "1".."4"
    num_lidar_pts: int = 10
    num_radar_pts: int = 2


@dataclass(frozen=True)
class FixtureScene:
    """A scene: its name (take one from the devkit's splits), ego motion, description, objects, landmarks."""

    name: str
    description: str = "Parked truck, intersection"
    n_samples: int = 3
    ego_start: tuple[float, float, float] = (600.0, 1600.0, 0.5)  # x, y (m), yaw (rad) at the first keyframe
    ego_velocity: tuple[float, float] = (5.0, 2.0)  # m/s, global
    ego_yaw_rate: float = 0.1  # rad/s
    objects: tuple[FixtureObject, ...] = ()
    # Static points seen by every radar and LiDAR file, given in the ego frame of the first keyframe.
    landmarks: tuple[tuple[float, float, float], ...] = ()
    landmark_velocity: tuple[float, float] = (3.0, -1.0)  # global velocity written into every radar return
    # Extra random (radar, LiDAR) returns per file, within 60 m of the sensor: realistic sizes for benchmarks
    # (nuScenes: up to ~125 per radar file, ~34,700 per LiDAR sweep).
    clutter: tuple[int, int] = (0, 0)
    start_time_us: int = 1_532_402_927_647_951


@dataclass
class FixtureManifest:
    """What was written: enough to compute every oracle without the devkit."""

    root: Path
    version: str
    rig: tuple[SensorSpec, ...]
    scenes: tuple[FixtureScene, ...]
    intrinsic: np.ndarray  # (3, 3), same for every camera
    image_hw: tuple[int, int]
    camera_colours: dict[str, tuple[int, int, int]]
    textured_images: bool = False
    sample_tokens: dict[str, list[str]] = field(default_factory=dict)  # scene name -> keyframe tokens
    files: dict[str, list[str]] = field(default_factory=dict)  # sample token -> relative paths it references

    def ego_pose(self, scene: FixtureScene, t: float) -> np.ndarray:
        """4x4 global-from-ego at ``t`` seconds after the first keyframe."""
        return scene_ego_pose(scene, t)

    def landmarks_global(self, scene: FixtureScene) -> np.ndarray:
        """``(K, 3)`` global positions of the scene's landmarks."""
        lm = np.asarray(scene.landmarks, dtype=np.float64).reshape(-1, 3)
        pose = self.ego_pose(scene, 0.0)
        return (pose[:3, :3] @ lm.T).T + pose[:3, 3]

    def sensor_to_ego(self, channel: str) -> np.ndarray:
        spec = next(s for s in self.rig if s.channel == channel)
        return sensor_matrix(spec)


def scene_ego_pose(scene: FixtureScene, t: float) -> np.ndarray:
    """4x4 global-from-ego of ``scene`` at ``t`` seconds after its first keyframe."""
    x0, y0, yaw0 = scene.ego_start
    return pose_matrix((x0 + scene.ego_velocity[0] * t, y0 + scene.ego_velocity[1] * t, 0.0),
                       yaw0 + scene.ego_yaw_rate * t)


def _token(*parts: object) -> str:
    return hashlib.md5("/".join(map(str, parts)).encode()).hexdigest()


def pose_matrix(translation: tuple[float, float, float], yaw: float) -> np.ndarray:
    m = np.eye(4)
    c, s = math.cos(yaw), math.sin(yaw)
    m[:2, :2] = [[c, -s], [s, c]]
    m[:3, 3] = translation
    return m


# Camera axes (x right, y down, z forward) expressed in a forward-looking ego frame (x forward, y left, z up).
_CAM_AXES = np.array([[0.0, 0.0, 1.0], [-1.0, 0.0, 0.0], [0.0, -1.0, 0.0]])


def sensor_matrix(spec: SensorSpec) -> np.ndarray:
    """4x4 ego-from-sensor of a rig sensor."""
    m = pose_matrix(spec.translation, spec.yaw)
    if spec.modality == "camera":
        m[:3, :3] = m[:3, :3] @ _CAM_AXES
    return m


def _quaternion(rot: np.ndarray) -> list[float]:
    from pyquaternion import Quaternion  # a devkit dependency, as the devkit reads the quaternions back

    q = Quaternion(matrix=rot, atol=1e-9)
    return [float(q.w), float(q.x), float(q.y), float(q.z)]


def write_radar_pcd(path: Path, points: np.ndarray) -> None:
    """Write ``(N, 18)`` radar returns as a binary PCD v0.7 file with nuScenes' header and field layout.

    An empty cloud is written as one NaN return, the devkit's convention. One byte follows the data because
    the devkit's reader bounds-checks each field with a strict ``<`` against the payload length.
    """
    if points.ndim != 2 or points.shape[1] != len(RADAR_PCD_FIELDS):
        raise ValueError(f"radar points must be (N, {len(RADAR_PCD_FIELDS)}), got {points.shape}")
    rows = points if len(points) else np.full((1, 18), np.nan)
    header = "\n".join([
        "# .PCD v0.7 - Point Cloud Data file format", "VERSION 0.7", "FIELDS " + " ".join(RADAR_PCD_FIELDS),
        "SIZE " + " ".join(map(str, _RADAR_SIZES)), "TYPE " + " ".join(_RADAR_TYPES),
        "COUNT " + " ".join("1" * 18),
        f"WIDTH {len(rows)}", "HEIGHT 1", "VIEWPOINT 0 0 0 1 0 0 0", f"POINTS {len(rows)}", "DATA binary", "",
    ]).encode()
    body = b"".join(
        _RADAR_STRUCT.pack(*(float(v) if t == "F" else (0 if np.isnan(v) else int(v)) for v, t in
                             zip(row, _RADAR_TYPES)))
        for row in rows
    )
    atomic_write_bytes(path, header + body + b"\n")


def write_lidar_bin(path: Path, points: np.ndarray) -> None:
    """Write ``(N, 5)`` LiDAR points ``(x, y, z, intensity, ring)`` as nuScenes' flat float32 ``.pcd.bin``."""
    if points.ndim != 2 or points.shape[1] != 5:
        raise ValueError(f"lidar points must be (N, 5), got {points.shape}")
    atomic_write_bytes(path, points.astype(np.float32).tobytes())


def _write_jpeg(path: Path, hw: tuple[int, int], colour: tuple[int, int, int], textured: bool, seed: int) -> None:
    from PIL import Image

    pixels = np.broadcast_to(np.asarray(colour, dtype=np.int16), (hw[0], hw[1], 3))
    if textured:  # noise makes JPEG decoding cost what a real photo costs
        noise = np.random.default_rng(seed).integers(-40, 41, size=pixels.shape)
        pixels = pixels + noise
    img = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")
    with atomic_open(path, "wb") as handle:
        img.save(handle, format="JPEG", quality=95)


def _sensor_points(manifest: FixtureManifest, scene: FixtureScene, spec: SensorSpec, t: float) -> np.ndarray:
    """Landmarks (and, for radar, their velocity) in the sensor frame at time ``t``."""
    sensor_from_global = np.linalg.inv(manifest.ego_pose(scene, t) @ sensor_matrix(spec))
    lm = manifest.landmarks_global(scene)
    xyz = (sensor_from_global[:3, :3] @ lm.T).T + sensor_from_global[:3, 3]
    k = np.arange(len(lm))
    rng = np.random.default_rng(int(_token(scene.name, spec.channel, round(t * 1e6)), 16) % 2**32)
    if spec.modality == "lidar":
        n = scene.clutter[1]
        extra = np.column_stack([rng.uniform(-60, 60, (n, 2)), rng.uniform(-2, 2, n), rng.uniform(0, 100, n),
                                 rng.integers(0, 32, n)])
        return np.vstack([np.column_stack([xyz, 10.0 + k, k % 32]), extra])
    rot = sensor_from_global[:2, :2]
    v_comp = np.tile(rot @ np.asarray(scene.landmark_velocity), (len(lm), 1))
    v_rel = np.asarray(scene.landmark_velocity) - np.asarray(scene.ego_velocity)
    v_raw = np.tile(rot @ v_rel, (len(lm), 1))
    cols = [xyz, np.ones_like(k), k, 5.0 + k, v_raw, v_comp, np.ones_like(k), np.full_like(k, 3),
            np.full_like(k, 2), np.full_like(k, 3), np.zeros_like(k), np.ones_like(k), np.full_like(k, 4),
            np.full_like(k, 5)]
    valid = np.column_stack(cols).astype(np.float64)
    # One return that the devkit's default filters reject (invalid_state 1): filter settings are testable.
    rejected = np.array([[20.0, 0.5, 0.0, 1, 99, 1.0, 0, 0, 0, 0, 1, 3, 0, 0, 1, 1, 0, 0]])
    n = scene.clutter[0]
    extra = np.zeros((n, 18))
    extra[:, :2] = rng.uniform(1.5, 60.0, (n, 2))
    extra[:, 3:6] = np.column_stack([rng.integers(0, 8, n), 1000 + np.arange(n), rng.uniform(-5, 20, n)])
    extra[:, 6:10] = rng.normal(0.0, 3.0, (n, 4))
    extra[:, 11] = 3
    return np.vstack([valid, rejected, extra])


def write_nuscenes_fixture(
    root: str | Path,
    scenes: tuple[FixtureScene, ...] | None = None,
    *,
    version: str = "v1.0-mini",
    image_hw: tuple[int, int] = (36, 64),
    rig: tuple[SensorSpec, ...] | None = None,
    textured_images: bool = False,
) -> FixtureManifest:
    """Write a nuScenes-format dataset under ``root`` and return its :class:`FixtureManifest`.

    Images are flat per-camera colours (``camera_colours``), or that colour plus noise with ``textured_images``.
    """
    root = Path(root)
    rig = default_rig() if rig is None else rig
    if scenes is None:
        scenes = (FixtureScene("scene-0061", landmarks=((15.0, 3.0, 0.5), (-8.0, -12.0, 1.0))),
                  FixtureScene("scene-0103", description="Night, rain, parked cars",
                               ego_start=(100.0, 50.0, -1.0), landmarks=((5.0, 20.0, 0.0),)))
    if len({s.name for s in scenes}) != len(scenes):
        raise ValueError(f"scene names must be unique, got {[s.name for s in scenes]}")
    h, w = image_hw
    # nuScenes' CAM_FRONT intrinsics (1600x900) scaled to the fixture's image size.
    intrinsic = np.array([[1266.4 * w / 1600, 0.0, 816.3 * w / 1600],
                          [0.0, 1266.4 * h / 900, 491.5 * h / 900], [0.0, 0.0, 1.0]])
    colours = {s.channel: ((40 * i) % 256, 255 - 30 * i, 60 + 25 * i)
               for i, s in enumerate(r for r in rig if r.modality == "camera")}
    man = FixtureManifest(root, version, rig, scenes, intrinsic, image_hw, colours, textured_images)
    t: dict[str, list[dict]] = {name: [] for name in FIXTURE_TABLES}
    t["visibility"] = [{"token": k, "level": v, "description": f"visibility of whole object is {v[1:]}%"}
                       for k, v in _VISIBILITY_LEVELS.items()]
    t["attribute"] = [{"token": _token("attr", "parked"), "name": "vehicle.parked", "description": "parked"}]
    categories = sorted({o.category for s in scenes for o in s.objects} | {"vehicle.car"})
    t["category"] = [{"token": _token("cat", c), "name": c, "description": c} for c in categories]
    for spec in rig:
        t["sensor"].append({"token": _token("sensor", spec.channel), "channel": spec.channel,
                            "modality": spec.modality})
    map_token = _token("map")
    for si, scene in enumerate(scenes):
        log_token, scene_token = _token("log", scene.name), _token("scene", scene.name)
        logfile = f"n015-2018-07-24-11-22-{si:02d}+0800"
        t["log"].append({"token": log_token, "logfile": logfile, "vehicle": "n015",
                         "date_captured": "2018-07-24", "location": "singapore-onenorth"})
        cal = {}
        for spec in rig:
            m = sensor_matrix(spec)
            cal[spec.channel] = _token("cs", scene.name, spec.channel)
            t["calibrated_sensor"].append({
                "token": cal[spec.channel], "sensor_token": _token("sensor", spec.channel),
                "translation": m[:3, 3].tolist(), "rotation": _quaternion(m[:3, :3]),
                "camera_intrinsic": intrinsic.tolist() if spec.modality == "camera" else []})
        n = scene.n_samples
        keys = [_token("sample", scene.name, k) for k in range(n)]
        man.sample_tokens[scene.name] = keys
        us = [scene.start_time_us + 500_000 * k for k in range(n)]
        for k in range(n):
            t["sample"].append({"token": keys[k], "timestamp": us[k], "scene_token": scene_token,
                                "prev": keys[k - 1] if k else "", "next": keys[k + 1] if k < n - 1 else ""})
            man.files[keys[k]] = []
        t["scene"].append({"token": scene_token, "log_token": log_token, "nbr_samples": n, "name": scene.name,
                           "first_sample_token": keys[0], "last_sample_token": keys[-1],
                           "description": scene.description})
        for spec in rig:
            _write_channel(man, t, scene, spec, keys, cal[spec.channel], logfile)
        _write_annotations(t, scene, keys, us)
    t["map"] = [{"token": map_token, "category": "semantic_prior", "filename": f"maps/{map_token}.png",
                 "log_tokens": [r["token"] for r in t["log"]]}]
    _write_map(root / "maps" / f"{map_token}.png")
    for name in FIXTURE_TABLES:
        atomic_write_json(root / version / f"{name}.json", t[name])
    return man


def _write_channel(man: FixtureManifest, t: dict[str, list[dict]], scene: FixtureScene, spec: SensorSpec,
                   keys: list[str], cs_token: str, logfile: str) -> None:
    """All sample_data (keyframes and the sweeps between) of one channel, with their ego poses and files."""
    frames = []  # (time since scene start, keyframe index or None)
    for k in range(len(keys)):
        frames.append((0.5 * k + spec.time_offset, k))
        if k < len(keys) - 1:
            frames += [(0.5 * k + spec.time_offset + 0.5 * (j + 1) / (spec.sweeps_between + 1), None)
                       for j in range(spec.sweeps_between)]
    tokens = [_token("sd", scene.name, spec.channel, i) for i in range(len(frames))]
    ext = {"camera": "jpg", "radar": "pcd", "lidar": "pcd.bin"}[spec.modality]
    for i, (tt, k) in enumerate(frames):
        us = scene.start_time_us + round(tt * 1e6)
        folder = "samples" if k is not None else "sweeps"
        # nuScenes names files <logfile>__<channel>__<timestamp>; the log keeps scenes' files apart.
        rel = f"{folder}/{spec.channel}/{logfile}__{spec.channel}__{us}.{ext}"
        pose = man.ego_pose(scene, (us - scene.start_time_us) * 1e-6)
        t["ego_pose"].append({"token": tokens[i], "timestamp": us, "translation": pose[:3, 3].tolist(),
                              "rotation": _quaternion(pose[:3, :3])})
        # Non-keyframe sweeps belong to the next keyframe's sample, as in nuScenes.
        owner = keys[k] if k is not None else keys[min(int(tt // 0.5) + 1, len(keys) - 1)]
        t["sample_data"].append({
            "token": tokens[i], "sample_token": owner, "ego_pose_token": tokens[i],
            "calibrated_sensor_token": cs_token, "timestamp": us, "fileformat": ext.split(".")[0],
            "is_key_frame": k is not None, "height": man.image_hw[0] if spec.modality == "camera" else 0,
            "width": man.image_hw[1] if spec.modality == "camera" else 0, "filename": rel,
            "prev": tokens[i - 1] if i else "", "next": tokens[i + 1] if i < len(frames) - 1 else ""})
        if k is not None:
            man.files[keys[k]].append(rel)
        t_exact = (us - scene.start_time_us) * 1e-6
        if spec.modality == "camera":
            _write_jpeg(man.root / rel, man.image_hw, man.camera_colours[spec.channel], man.textured_images, us)
        elif spec.modality == "radar":
            write_radar_pcd(man.root / rel, _sensor_points(man, scene, spec, t_exact))
        else:
            write_lidar_bin(man.root / rel, _sensor_points(man, scene, spec, t_exact))


def _write_annotations(t: dict[str, list[dict]], scene: FixtureScene, keys: list[str], us: list[int]) -> None:
    for oi, obj in enumerate(scene.objects):
        inst = _token("instance", scene.name, oi)
        anns = [_token("ann", scene.name, oi, k) for k in range(len(keys))]
        t["instance"].append({"token": inst, "category_token": _token("cat", obj.category),
                              "nbr_annotations": len(keys), "first_annotation_token": anns[0],
                              "last_annotation_token": anns[-1]})
        for k, key in enumerate(keys):
            dt = (us[k] - us[0]) * 1e-6
            xyz = (obj.translation[0] + obj.velocity[0] * dt, obj.translation[1] + obj.velocity[1] * dt,
                   obj.translation[2])
            t["sample_annotation"].append({
                "token": anns[k], "sample_token": key, "instance_token": inst,
                "visibility_token": obj.visibility,
                "attribute_tokens": [], "translation": list(xyz), "size": list(obj.size),
                "rotation": _quaternion(pose_matrix((0, 0, 0), obj.yaw)[:3, :3]),
                "prev": anns[k - 1] if k else "", "next": anns[k + 1] if k < len(keys) - 1 else "",
                "num_lidar_pts": obj.num_lidar_pts, "num_radar_pts": obj.num_radar_pts})


def _write_map(path: Path) -> None:
    from PIL import Image

    mask = np.zeros((20, 20), dtype=np.uint8)
    mask[5:15, :] = 255  # a drivable band
    with atomic_open(path, "wb") as handle:
        Image.fromarray(mask).save(handle, format="PNG")
