"""Per-sample conditions (light, weather) and sensor faults, drawn from ``WorldConfig`` probabilities.

They decide how informative each sensor is: night, fog, rain, glare and lens faults hurt the cameras; rain, fog
and beam loss hurt the LiDAR; radar dropout removes radars. Everything is recorded in the sample's ``meta`` so
that metrics can be split by condition (``tags`` lists the active ones by name).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from fusionlens.data.sample import CAMERA_NAMES, RADAR_NAMES
from fusionlens.world.config import TIMES_OF_DAY, WorldConfig


@dataclass
class Conditions:
    """What one sample's sensors face. Distances in metres, angles in radians."""

    time_of_day: str = "day"
    sun_azimuth: float = 0.0
    sun_elevation: float = 0.9  # <= 0 at night
    rain: float = 0.0  # intensity 0..1
    fog_visibility: float = math.inf  # metres of meteorological visibility (inf: clear)
    glare_camera: str | None = None
    blackout_cameras: list[str] = field(default_factory=list)
    occluded_camera: str | None = None
    occlusion_blob: tuple[float, float, float, float] = (0.0, 0.0, 0.0, 0.0)  # u, v (fractions), rx, ry
    dropped_radars: list[str] = field(default_factory=list)
    lost_rings: list[int] = field(default_factory=list)

    @property
    def tags(self) -> list[str]:
        """Names of the active conditions (time of day first), for per-condition metrics."""
        out = [self.time_of_day]
        out += ["rain"] * (self.rain > 0) + ["fog"] * math.isfinite(self.fog_visibility)
        out += ["glare"] * (self.glare_camera is not None) + ["camera_blackout"] * bool(self.blackout_cameras)
        out += ["lens_occlusion"] * (self.occluded_camera is not None)
        out += ["radar_dropout"] * bool(self.dropped_radars) + ["lidar_beam_loss"] * bool(self.lost_rings)
        return out

    def to_meta(self) -> dict[str, Any]:
        out = asdict(self)
        out["fog_visibility"] = None if math.isinf(self.fog_visibility) else self.fog_visibility
        out["occlusion_blob"] = list(self.occlusion_blob)
        out["tags"] = self.tags
        return out

    @property
    def light(self) -> float:
        """Overall scene brightness, 1 at noon."""
        return {"day": 1.0, "dusk": 0.45, "night": 0.06}[self.time_of_day]


def sample_conditions(cfg: WorldConfig, rng: np.random.Generator, camera_yaws: np.ndarray) -> Conditions:
    """Draw conditions for one sample (every draw happens, so the stream of random numbers is fixed)."""
    tp = cfg.time_of_day_probs
    tod = TIMES_OF_DAY[int(rng.choice(len(TIMES_OF_DAY), p=[tp[t] for t in TIMES_OF_DAY]))]
    p = {k: cfg.condition_probs.get(k, 0.0) for k in (
        "rain", "fog", "glare", "camera_blackout", "lens_occlusion", "radar_dropout", "lidar_beam_loss")}
    u = rng.random(7)
    c = Conditions(time_of_day=tod)
    c.sun_azimuth = float(rng.uniform(-math.pi, math.pi))
    c.sun_elevation = {"day": float(rng.uniform(0.5, 1.2)), "dusk": float(rng.uniform(0.03, 0.2)),
                       "night": -0.5}[tod]
    rain_level, fog_vis = float(rng.uniform(0.4, 1.0)), float(rng.uniform(12.0, 45.0))
    if u[0] < p["rain"]:
        c.rain = rain_level
    if u[1] < p["fog"]:
        c.fog_visibility = fog_vis
    # Glare needs a visible sun: it blinds the camera that looks most nearly into it.
    off = np.abs((camera_yaws - c.sun_azimuth + np.pi) % (2 * np.pi) - np.pi)
    if u[2] < p["glare"] and tod != "night":
        c.glare_camera = CAMERA_NAMES[int(np.argmin(off))]
    cam_pick = [CAMERA_NAMES[i] for i in rng.permutation(len(CAMERA_NAMES))]
    if u[3] < p["camera_blackout"]:
        c.blackout_cameras = sorted(cam_pick[: int(rng.integers(1, 3))], key=CAMERA_NAMES.index)
    blob = (float(rng.uniform(0.2, 0.8)), float(rng.uniform(0.3, 0.8)), float(rng.uniform(0.25, 0.5)),
            float(rng.uniform(0.3, 0.6)))
    if u[4] < p["lens_occlusion"]:
        c.occluded_camera = cam_pick[-1]
        c.occlusion_blob = blob
    radar_pick = [RADAR_NAMES[i] for i in rng.permutation(len(RADAR_NAMES))]
    n_drop = int(rng.integers(1, 4))
    if u[5] < p["radar_dropout"]:
        c.dropped_radars = sorted(radar_pick[:n_drop], key=RADAR_NAMES.index)
    beams = cfg.lidar_beams
    keep_frac = float(rng.uniform(0.15, 0.5))
    order = rng.permutation(beams)
    if u[6] < p["lidar_beam_loss"]:
        c.lost_rings = sorted(int(r) for r in order[: beams - max(1, int(round(keep_frac * beams)))])
    return c
