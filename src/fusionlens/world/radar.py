"""Five automotive radars: sparse detections with coarse angles, RCS and Doppler, several sweeps accumulated.

Each radar samples the scene with horizontal rays at its mounting height. An object hit by some rays is detected
with a probability that follows the radar equation (SNR in dB = RCS - 40 log10(range / 10 m), logistic around a
threshold), and yields a few detections at hit ranges with range noise and a coarse azimuth error (the radar's
weakness: lateral position). Doppler gives only the radial velocity: ``vx, vy`` is the radial velocity relative to
the moving sensor, ``vx_comp, vy_comp`` the ego-motion-compensated one, both as vectors along the line of sight.
Clutter (ground and multipath) adds static false returns; ghosts repeat a real return at a longer range. Sweeps
``k = 0..S-1`` are taken ``k * 77 ms`` earlier (13 Hz): objects and the ego are moved back by their velocities,
and points are given in the current ego frame with the sweep's ``time_lag`` (as nuScenes accumulates sweeps).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from fusionlens.data.sample import RADAR_FIELDS, RADAR_NAMES
from fusionlens.world.conditions import Conditions
from fusionlens.world.raycast import cast, wedge_candidates
from fusionlens.world.rig import Rig
from fusionlens.world.scene import Scene

SWEEP_PERIOD_S: float = 0.077
CLUTTER, GHOST = -3, -4  # point-object ids of false returns
_RANGE_SIGMA = 0.15  # m
_VEL_SIGMA = 0.12  # m/s
_SNR_THRESHOLD_DB = -20.0
_F = {name: i for i, name in enumerate(RADAR_FIELDS)}


@dataclass
class RadarOutput:
    points: np.ndarray  # (N, 19) RADAR_FIELDS
    object_ids: np.ndarray  # (N,) scene object id, CLUTTER or GHOST
    sensor_origin: np.ndarray  # (N, 3) where the radar was (current ego frame) when it measured the point
    per_object: np.ndarray  # (M,) real returns per scene object over all sweeps


def _rows(origin: np.ndarray, rng_m: np.ndarray, az: np.ndarray, v_obj: np.ndarray, ego_v: np.ndarray,
          rcs: np.ndarray, lag: float, sigma_az: float, real: np.ndarray, ids: np.ndarray,
          rng: np.random.Generator, noise: float) -> np.ndarray:
    """Radar points from true ranges/azimuths (sensor at ``origin``) and true object velocities."""
    n = rng_m.size
    r = rng_m + noise * _RANGE_SIGMA * rng.standard_normal(n)
    a = az + sigma_az * rng.standard_normal(n)
    u = np.stack([np.cos(a), np.sin(a)], axis=1)
    out = np.zeros((n, len(RADAR_FIELDS)))
    out[:, 0:2] = origin[:2] + r[:, None] * u
    out[:, _F["z"]] = origin[2]
    vr_comp = (v_obj * u).sum(1) + noise * _VEL_SIGMA * rng.standard_normal(n)
    vr_raw = vr_comp - (ego_v * u).sum(1)
    out[:, _F["vx"]], out[:, _F["vy"]] = vr_raw * u[:, 0], vr_raw * u[:, 1]
    out[:, _F["vx_comp"]], out[:, _F["vy_comp"]] = vr_comp * u[:, 0], vr_comp * u[:, 1]
    # nuScenes dynProp: 0 moving (away), 1 stationary, 2 oncoming, 3 stationary candidate, 4 unknown
    moving = np.abs(vr_comp) > 0.5
    out[:, _F["dyn_prop"]] = np.where(real, np.where(moving, np.where(vr_comp < 0, 2, 0), 1),
                                      np.where(moving, 4, 3))
    out[:, _F["id"]] = ids
    out[:, _F["rcs"]] = rcs + 2.0 * noise * rng.standard_normal(n)
    flaky = rng.random(n)
    out[:, _F["is_quality_valid"]] = np.where(real | (flaky < 0.6), 1, 0)
    out[:, _F["ambig_state"]] = np.where(real, 3, np.where(flaky < 0.5, 1, 3))  # 3 = unambiguous
    # Position and velocity standard deviations propagated from range and azimuth errors.
    s_r, s_a = max(noise * _RANGE_SIGMA, 1e-3), max(sigma_az, 1e-4)
    out[:, _F["x_rms"]] = np.hypot(np.cos(a) * s_r, r * np.sin(a) * s_a)
    out[:, _F["y_rms"]] = np.hypot(np.sin(a) * s_r, r * np.cos(a) * s_a)
    s_v = max(noise * _VEL_SIGMA, 1e-3)
    out[:, _F["vx_rms"]] = np.hypot(np.cos(a) * s_v, np.abs(vr_comp) * np.sin(a) * s_a)
    out[:, _F["vy_rms"]] = np.hypot(np.sin(a) * s_v, np.abs(vr_comp) * np.cos(a) * s_a)
    out[:, _F["invalid_state"]] = np.where(real | (flaky < 0.7), 0, rng.integers(1, 18, n))
    out[:, _F["pdh0"]] = np.where(real, 1, rng.integers(2, 5, n))  # false-alarm probability class
    out[:, _F["time_lag"]] = lag
    return out


def simulate_radar(scene: Scene, cond: Conditions, rig: Rig, sweeps: int, max_range: float, step_deg: float,
                   azimuth_noise_deg: float, rng: np.random.Generator, noise: float = 1.0) -> RadarOutput:
    """All radars over ``sweeps`` sweeps; points in the current ego frame."""
    m = len(scene.boxes)
    ego_v = np.array([scene.ego_speed, 0.0])
    sigma_az = math.radians(azimuth_noise_deg) * noise
    rows, ids_out, origins = [], [], []
    per_object = np.zeros(m, dtype=np.int64)
    next_id = 200
    for k in range(sweeps):
        lag = k * SWEEP_PERIOD_S
        boxes = scene.boxes.shifted(np.concatenate([-scene.velocity * lag, np.zeros((m, 1))], axis=1))
        for ri, name in enumerate(RADAR_NAMES):
            if name in cond.dropped_radars:
                continue
            origin = rig.radar_position[ri] - np.array([scene.ego_speed * lag, 0.0, 0.0])
            yaw, half = float(rig.radar_yaw[ri]), float(rig.radar_half_fov[ri])
            n_rays = int(2 * math.degrees(half) / step_deg) + 1
            az = yaw + np.linspace(-half, half, n_rays)
            dirs = np.stack([np.cos(az), np.sin(az), np.zeros_like(az)], axis=1)
            cand = wedge_candidates(origin, boxes, yaw, half, max_range)
            hits = cast(origin, dirs, boxes, cand, ground=False, max_range=max_range)
            hit_ids = hits.obj[hits.obj >= 0]
            sel_t, sel_az, sel_obj = [], [], []
            for o in np.unique(hit_ids):
                rays = np.nonzero(hits.obj == o)[0]
                snr = scene.rcs[o] - 40.0 * math.log10(max(float(hits.t[rays].min()), 1.0) / 10.0)
                p_det = 1.0 / (1.0 + math.exp(-(snr - _SNR_THRESHOLD_DB) / 3.0))
                n_ret = min(rays.size, 1 + int(rng.poisson(0.3 + rays.size / 12.0)))
                if rng.random() >= p_det:
                    continue
                pick = rng.choice(rays, size=n_ret, replace=False)
                sel_t.append(hits.t[pick])
                sel_az.append(az[pick])
                sel_obj.append(np.full(n_ret, o))
            t = np.concatenate(sel_t) if sel_t else np.zeros(0)
            a = np.concatenate(sel_az) if sel_az else np.zeros(0)
            obj = np.concatenate(sel_obj) if sel_obj else np.zeros(0, dtype=np.int64)
            real = np.ones(t.size, dtype=bool)
            v = scene.velocity[obj] if obj.size else np.zeros((0, 2))
            rcs = scene.rcs[obj] if obj.size else np.zeros(0)
            ids = obj.astype(float)
            # Ghosts: multipath repeats of real returns further out, same Doppler, weaker.
            g = np.nonzero(rng.random(t.size) < 0.08)[0]
            n_cl = int(rng.poisson(1.5))
            cl_t = rng.uniform(5.0, max_range, n_cl)
            cl_a = yaw + rng.uniform(-half, half, n_cl)
            t = np.concatenate([t, t[g] * rng.uniform(1.5, 2.1, g.size), cl_t])
            a = np.concatenate([a, a[g], cl_a])
            v = np.concatenate([v, v[g], np.zeros((n_cl, 2))])
            rcs = np.concatenate([rcs, rcs[g] - 8.0, rng.uniform(-10.0, 0.0, n_cl)])
            n_false = g.size + n_cl
            ids = np.concatenate([ids, next_id + np.arange(n_false)])
            next_id += n_false
            kind = np.concatenate([obj, np.full(g.size, GHOST), np.full(n_cl, CLUTTER)])
            real = np.concatenate([real, np.zeros(n_false, dtype=bool)])
            inside = t <= max_range
            if t.size:
                pts = _rows(origin, t, a, v, ego_v, rcs, lag, sigma_az, real, ids, rng, noise)
                rows.append(pts[inside])
                ids_out.append(kind[inside])
                origins.append(np.repeat(origin[None], int(inside.sum()), axis=0))
            per_object += np.bincount(obj, minlength=m)
    if not rows:
        return RadarOutput(np.zeros((0, len(RADAR_FIELDS)), np.float32), np.zeros(0, np.int64),
                           np.zeros((0, 3)), per_object)
    return RadarOutput(points=np.concatenate(rows).astype(np.float32), object_ids=np.concatenate(ids_out),
                       sensor_origin=np.concatenate(origins), per_object=per_object)
