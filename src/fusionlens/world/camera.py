"""Six surround pinhole cameras, rendered by ray casting one ray per pixel centre.

Shading is Lambertian under a sun (direction from the conditions) plus a sky ambient term; at dusk and night
the scene is lit by the ego's headlights and street lights, and vehicles show head and tail lamps, so a camera
still sees *that* a vehicle is there at night but little of its shape. Fog blends towards the fog colour with
Koschmieder's law (contrast exp(-3 t / V) at range t for visibility V); rain lowers contrast, adds streaks and
blurs; glare washes out one camera; a lens occlusion blob hides part of one camera; a blacked-out camera is
black. The object-id buffer of each camera is returned for geometry tests and visibility truth.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from fusionlens.data.sample import CAMERA_NAMES
from fusionlens.world.conditions import Conditions
from fusionlens.world.raycast import MISS, cast_sectors
from fusionlens.world.rig import Rig
from fusionlens.world.road import SURFACE_ALBEDO, classify_ground
from fusionlens.world.scene import BARRIER, BUILDING, PEDESTRIAN, POLE, VEHICLE, Scene

_SKY = {"day": ((0.78, 0.84, 0.92), (0.36, 0.55, 0.85)), "dusk": ((0.95, 0.62, 0.38), (0.28, 0.28, 0.48)),
        "night": ((0.03, 0.03, 0.06), (0.01, 0.01, 0.03))}
_SUN = {"day": (0.75, (1.0, 1.0, 0.97), 0.42), "dusk": (0.5, (1.0, 0.68, 0.42), 0.2),
        "night": (0.0, (0.0, 0.0, 0.0), 0.025)}  # strength, colour, sky ambient
_FOG_LIGHT = {"day": 1.0, "dusk": 0.5, "night": 0.07}


@dataclass
class CameraOutput:
    images: np.ndarray  # (Ncam, 3, H, W) float32 in [0, 1]
    object_ids: np.ndarray  # (Ncam, H, W) scene object id, -1 ground, -2 sky
    pixels: np.ndarray  # (M, Ncam) visible pixels per object (0 through a blacked-out or occluded lens)
    unoccluded: np.ndarray  # (M, Ncam) pixels the object would cover were it alone
    signal: np.ndarray  # (M, Ncam) visible pixels weighted by their light and fog transmittance
    seen: np.ndarray  # (Ncam, H, W) bool: pixel shows the scene (False under a lens blob or a blacked-out camera)


def _hash(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Deterministic pseudo-random value in [0, 1) per integer lattice cell (texture grain, lit windows)."""
    return np.mod(np.sin(a * 12.9898 + b * 78.233) * 43758.5453, 1.0)


def _albedo(scene: Scene, obj: np.ndarray, local: np.ndarray, normal_local_z: np.ndarray,
            night: bool) -> tuple[np.ndarray, np.ndarray]:
    """Albedo (N, 3) and emitted light (N, 3) on object hits ``obj`` with box-frame points ``local``."""
    alb = scene.colour[obj].copy()
    emit = np.zeros_like(alb)
    half = scene.boxes.half[obj]
    rz = local[:, 2] / half[:, 2]  # -1 at the bottom, 1 at the top
    tex = scene.texture[obj]
    side = np.abs(normal_local_z) < 0.5
    veh = (tex == VEHICLE) & side
    glass = veh & (rz > 0.15) & (rz < 0.85) & (scene.label[obj] != 3)  # trailers are windowless boxes
    alb[glass] = (0.08, 0.1, 0.13)
    alb[veh & (rz < -0.7)] = (0.04, 0.04, 0.04)  # tyres and bumpers
    rx = local[:, 0] / half[:, 0]
    lamps = veh & (rz > -0.5) & (rz < -0.2) & (np.abs(local[:, 1]) > 0.6 * half[:, 1])
    emit[lamps & (rx > 0.97)] = (1.6, 1.5, 1.2) if night else (0.3, 0.3, 0.25)
    emit[lamps & (rx < -0.97)] = (1.2, 0.08, 0.05) if night else (0.25, 0.02, 0.02)
    bld = (tex == BUILDING) & side
    along = np.where(np.abs(local[:, 0] / half[:, 0]) > 0.999, local[:, 1], local[:, 0])
    floor_z = local[:, 2] + half[:, 2]
    wu, wv = np.mod(along / 3.0, 1.0), np.mod(floor_z / 3.2, 1.0)
    window = bld & (wu > 0.25) & (wu < 0.75) & (wv > 0.3) & (wv < 0.8)
    alb[window] = (0.12, 0.15, 0.2)
    if night:
        lit = window & (_hash(np.floor(along / 3.0) + obj, np.floor(floor_z / 3.2)) < 0.3)
        emit[lit] = (0.9, 0.7, 0.35)
    ped = tex == PEDESTRIAN
    alb[ped & (rz > 0.72)] = (0.78, 0.6, 0.48)
    alb[ped & (rz < -0.1)] = (0.14, 0.14, 0.2)
    stripe = (tex == BARRIER) & (np.mod(local[:, 0] / 0.5, 1.0) < 0.5)
    alb[stripe] = (0.95, 0.95, 0.95)
    return alb, emit


def _night_light(scene: Scene, point: np.ndarray, normal: np.ndarray) -> np.ndarray:
    """Light (N,) from the ego's low beams (a cone along +x) and from street lights on the poles."""
    p = point.astype(np.float32)
    ahead = p[:, 0] - 1.8
    dist2 = (p[:, 0] - 2.0) ** 2 + p[:, 1] ** 2 + (p[:, 2] - 0.7) ** 2
    ang = np.arctan2(np.abs(p[:, 1]), np.maximum(ahead, 1e-3))
    light = np.where(ahead > 0, 1.6 * np.exp(-((ang / 0.45) ** 2)) / (1.0 + dist2 / 14.0**2), 0.0)
    for px, py in scene.boxes.centre[scene.texture == POLE, :2].astype(np.float32):
        d2 = (p[:, 0] - px) ** 2 + (p[:, 1] - py) ** 2
        near = d2 < 20.0**2  # a lamp pool is ~6 m wide; beyond 20 m it adds nothing visible
        light[near] += 0.7 * np.exp(-d2[near] / (2 * 6.0**2))
    return light * (0.4 + 0.6 * np.clip(normal[:, 2], 0.0, 1.0))


def _shade(scene: Scene, cond: Conditions, origin: np.ndarray, dirs: np.ndarray, hits,
           rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Linear RGB (R, 3) and per-ray information quality (R,) in [0, 1] before image-level effects."""
    tod = cond.time_of_day
    night = tod != "day"
    r = dirs.shape[0]
    alb = np.zeros((r, 3))
    emit = np.zeros((r, 3))
    ground = hits.obj == -1
    if ground.any():
        surf = classify_ground(scene.roads, hits.point[ground, :2])
        grain = _hash(np.floor(hits.point[ground, 0] * 4), np.floor(hits.point[ground, 1] * 4))
        alb[ground] = SURFACE_ALBEDO[surf] * (0.9 + 0.2 * grain)[:, None]
    on_obj = hits.obj >= 0
    if on_obj.any():
        ids = hits.obj[on_obj]
        nz = hits.normal[on_obj, 2]  # boxes only yaw, so a face's normal z is the same in both frames
        alb[on_obj], emit[on_obj] = _albedo(scene, ids, hits.local[on_obj], nz, tod == "night")
    strength, sun_col, amb = _SUN[tod]
    el, az = cond.sun_elevation, cond.sun_azimuth
    sun = np.array([math.cos(el) * math.cos(az), math.cos(el) * math.sin(az), math.sin(el)])
    light = amb * (0.6 + 0.4 * hits.normal[:, 2:3]) + strength * np.clip(hits.normal @ sun, 0, None)[:, None] \
        * np.array(sun_col)
    if night:
        lit = hits.obj != MISS
        extra = np.zeros(r)
        extra[lit] = _night_light(scene, hits.point[lit], hits.normal[lit]) * (1.0 if tod == "night" else 0.4)
        light = light + extra[:, None]
    rgb = alb * light + emit
    quality = np.clip(light.mean(1) / 0.8, 0.0, 1.0)
    sky = hits.obj == MISS
    horizon, zenith = (np.array(c) for c in _SKY[tod])
    up = np.clip(dirs[sky, 2:3] * 3.0, 0.0, 1.0)
    rgb[sky] = horizon * (1 - up) + zenith * up
    quality[sky] = 0.0
    if math.isfinite(cond.fog_visibility):
        t = np.where(np.isfinite(hits.t), hits.t, 1e4)
        trans = np.exp(-3.0 * t / cond.fog_visibility)
        fog = np.array([0.74, 0.75, 0.77]) * _FOG_LIGHT[tod]
        rgb = rgb * trans[:, None] + fog * (1 - trans[:, None])
        quality *= trans
    return rgb, quality


def _image_effects(img: np.ndarray, cam: str, cond: Conditions, noise: float, rng: np.random.Generator,
                   rig: Rig, cam_index: int) -> np.ndarray:
    """Rain, glare and sensor noise on an (H, W, 3) image."""
    h, w, _ = img.shape
    if cond.rain > 0:
        img = 0.72 * img + 0.1 * cond.light
        padded = np.pad(img, ((1, 1), (1, 1), (0, 0)), mode="edge")  # water on the lens: a 3x3 blur
        img = sum(padded[i:i + h, j:j + w] for i in range(3) for j in range(3)) / 9.0
        n = int(cond.rain * 0.004 * h * w)
        us, vs = rng.integers(0, w, n), rng.integers(0, h, n)
        length = max(2, h // 12)
        for k in range(length):  # slanted streaks
            img[np.clip(vs + k, 0, h - 1), np.clip(us + k // 3, 0, w - 1)] += 0.18 * (0.3 + cond.light)
    if cond.glare_camera == cam:
        yaw = float(rig.camera_yaw[cam_index])
        rel = (cond.sun_azimuth - yaw + math.pi) % (2 * math.pi) - math.pi
        uc = w / 2 - math.tan(np.clip(rel, -1.2, 1.2)) * rig.intrinsics[cam_index, 0, 0]
        vc = h * 0.35
        vv, uu = np.mgrid[0:h, 0:w]
        veil = 1.4 * np.exp(-((uu - uc) ** 2 + (vv - vc) ** 2) / (2 * (0.3 * w) ** 2)) + 0.45
        img = img * 0.55 + veil[..., None] * np.array([1.0, 0.95, 0.82])
    sigma = noise * (0.008 + 0.04 * (1.0 - cond.light))
    if sigma > 0:
        img = img + rng.normal(0.0, sigma, img.shape)
    return np.clip(img, 0.0, 1.0)


def render_cameras(scene: Scene, cond: Conditions, rig: Rig, rng: np.random.Generator,
                   noise: float = 1.0) -> CameraOutput:
    """Render every camera of ``rig`` and its visibility truth for every scene object."""
    h, w = rig.image_size
    n_cam, m = len(CAMERA_NAMES), len(scene.boxes)
    images = np.zeros((n_cam, 3, h, w), dtype=np.float32)
    ids = np.zeros((n_cam, h, w), dtype=np.int64)
    pixels = np.zeros((m, n_cam), dtype=np.int64)
    unocc = np.zeros((m, n_cam), dtype=np.int64)
    signal = np.zeros((m, n_cam))
    seen_all = np.zeros((n_cam, h, w), dtype=bool)
    for ci, name in enumerate(CAMERA_NAMES):
        origin, dirs, azimuth = _camera_rays(rig, ci)
        # Level cameras: a pixel column has one azimuth, so narrow azimuth wedges cull boxes per column strip.
        hits = cast_sectors(origin, dirs, azimuth, scene.boxes, _SECTORS)
        rgb, quality = _shade(scene, cond, origin, dirs, hits, rng)
        img = _image_effects(rgb.reshape(h, w, 3), name, cond, noise, rng, rig, ci)
        seen = np.ones(h * w, dtype=bool)
        if name == cond.occluded_camera:
            u0, v0, rx, ry = cond.occlusion_blob
            vv, uu = np.mgrid[0:h, 0:w]
            e = ((uu + 0.5) / w - u0) ** 2 / rx**2 + ((vv + 0.5) / h - v0) ** 2 / ry**2
            alpha = np.clip((1.2 - e) / 0.4, 0.0, 1.0)[..., None]
            img = img * (1 - alpha) + alpha * np.array([0.07, 0.05, 0.03])
            seen = (alpha[..., 0] < 0.5).ravel()
        if name in cond.blackout_cameras:
            img = np.zeros_like(img)
            seen[:] = False
        if name == cond.glare_camera:
            quality = quality * 0.3
        if cond.rain > 0:
            quality = quality * 0.75
        images[ci] = img.transpose(2, 0, 1)
        ids[ci] = hits.obj.reshape(h, w)
        seen_all[ci] = seen.reshape(h, w)
        obj = hits.obj
        keep = (obj >= 0) & seen
        pixels[:, ci] = np.bincount(obj[keep], minlength=m)
        signal[:, ci] = np.bincount(obj[keep], weights=quality[keep], minlength=m)
        unocc[:, ci] = hits.unoccluded
    return CameraOutput(images=images, object_ids=ids, pixels=pixels, unoccluded=unocc, signal=signal,
                        seen=seen_all)


_SECTORS = 45  # 8-degree azimuth wedges
_RAY_CACHE: dict[tuple, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}


def _camera_rays(rig: Rig, cam: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    key = (rig.image_size, cam, rig.intrinsics[cam].tobytes(), rig.cam_to_ego[cam].tobytes())
    if key not in _RAY_CACHE:
        if len(_RAY_CACHE) > 64:
            _RAY_CACHE.clear()
        origin, dirs = rig.camera_rays(cam)
        _RAY_CACHE[key] = (origin, dirs, np.arctan2(dirs[:, 1], dirs[:, 0]))
    return _RAY_CACHE[key]
