"""A 32-beam spinning LiDAR by ray casting: x, y, z, intensity (0-255), ring.

A return is kept when its received power ``refl * |cos(incidence)| * (r0 / t)^2 * exp(-2 alpha t)`` clears a
detection threshold (a lidar-range equation with two-way atmospheric extinction ``alpha``): dark asphalt at grazing
angles fades with range, fog (``alpha = 0.6 * 3 / V`` — near-infrared fares somewhat better than visible light)
extinguishes returns beyond a few tens of metres, and rain adds extinction plus random dropouts and spurious
near-range returns from drops. Lost rings (a fault) are never fired.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fusionlens.world.conditions import Conditions
from fusionlens.world.raycast import GROUND, MISS, cast_sectors
from fusionlens.world.rig import Rig
from fusionlens.world.road import SURFACE_REFLECTIVITY, classify_ground
from fusionlens.world.scene import Scene

CLUTTER: int = -3  # point-object id of returns from rain drops or fog
_R0 = 50.0  # range at which a unit-reflectivity, head-on target returns unit power
_THRESHOLD = 0.02
_SECTORS = 12


@dataclass
class LidarOutput:
    points: np.ndarray  # (N, 5) x, y, z, intensity, ring
    object_ids: np.ndarray  # (N,) scene object id, GROUND, or CLUTTER
    per_object: np.ndarray  # (M,) returns per scene object


_DIR_CACHE: dict[tuple, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}


def _beam_dirs(rig: Rig, steps: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Unit directions (B*A, 3) ordered ring-major, their ring index and azimuth."""
    key = (rig.lidar_elevations.tobytes(), steps)
    if key not in _DIR_CACHE:
        el = rig.lidar_elevations
        az = np.arange(steps) * (2 * np.pi / steps)
        e, a = np.meshgrid(el, az, indexing="ij")
        dirs = np.stack([np.cos(e) * np.cos(a), np.cos(e) * np.sin(a), np.sin(e)], axis=-1).reshape(-1, 3)
        ring = np.repeat(np.arange(el.size), steps)
        _DIR_CACHE.clear()
        _DIR_CACHE[key] = (dirs, ring, a.ravel())
    return _DIR_CACHE[key]


def simulate_lidar(scene: Scene, cond: Conditions, rig: Rig, steps: int, max_range: float,
                   rng: np.random.Generator, noise: float = 1.0) -> LidarOutput:
    """One revolution of the roof LiDAR in the ego frame at the sample's time."""
    dirs, ring, azimuth = _beam_dirs(rig, steps)
    if cond.lost_rings:
        fired = ~np.isin(ring, cond.lost_rings)
        dirs, ring, azimuth = dirs[fired], ring[fired], azimuth[fired]
    origin = rig.lidar_position
    hits = cast_sectors(origin, dirs, azimuth, scene.boxes, _SECTORS, max_range)
    m = len(scene.boxes)
    draws = rng.random(dirs.shape[0])
    jitter = rng.standard_normal(dirs.shape[0])
    keep = hits.obj != MISS
    refl = np.zeros(dirs.shape[0])
    on_obj = hits.obj >= 0
    refl[on_obj] = scene.reflectivity[hits.obj[on_obj]]
    ground = hits.obj == GROUND
    if ground.any():
        refl[ground] = SURFACE_REFLECTIVITY[classify_ground(scene.roads, hits.point[ground, :2])]
    cos_inc = np.abs((dirs * hits.normal).sum(1))
    t = np.where(keep, hits.t, max_range)
    alpha = 0.0
    if np.isfinite(cond.fog_visibility):
        alpha += 0.6 * 3.0 / cond.fog_visibility
    alpha += 0.004 * cond.rain
    power = refl * cos_inc * (_R0 / np.maximum(t, 1.0)) ** 2 * np.exp(-2 * alpha * t)
    keep &= power * (1.0 + 0.1 * noise * jitter) > _THRESHOLD
    keep &= draws >= 0.02 * noise + 0.3 * cond.rain  # random dropouts; rain scatters many pulses
    rng_noise = 0.02 * noise * rng.standard_normal(dirs.shape[0])
    pts = origin + dirs * (t + rng_noise)[:, None]
    intensity = np.clip(255.0 * np.minimum(refl * cos_inc * np.exp(-2 * alpha * t), 1.0), 0.0, 255.0)
    cloud = np.concatenate([pts, intensity[:, None], ring[:, None].astype(float)], axis=1)[keep]
    object_ids = hits.obj[keep]
    extra = []
    n_rain = int(rng.poisson(250 * cond.rain))
    n_fog = int(rng.poisson(8000.0 / cond.fog_visibility)) if np.isfinite(cond.fog_visibility) else 0
    for n, lo, hi in ((n_rain, 1.5, 15.0), (n_fog, 1.0, 6.0)):
        if n == 0:
            continue
        pick = rng.integers(0, dirs.shape[0], n)
        rr = rng.uniform(lo, hi, n)
        clutter = origin + dirs[pick] * rr[:, None]
        inten = rng.uniform(0.0, 6.0, n)
        extra.append(np.concatenate([clutter, inten[:, None], ring[pick, None].astype(float)], axis=1))
    if extra:
        more = np.concatenate(extra)
        cloud = np.concatenate([cloud, more])
        object_ids = np.concatenate([object_ids, np.full(more.shape[0], CLUTTER)])
    per_object = np.bincount(object_ids[object_ids >= 0], minlength=m)
    return LidarOutput(points=cloud.astype(np.float32), object_ids=object_ids, per_object=per_object)
