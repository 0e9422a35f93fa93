"""Road layouts in the ego frame: straight roads and constant-radius curves, combined into intersections.

A road has a centreline, ``lanes`` lanes of ``lane_width`` per direction and sidewalks of ``sidewalk`` metres;
traffic keeps right (nuScenes' Boston), so lanes with ``d < 0`` (right of the centreline) run along the road's
direction. Ground points are classified into surfaces (terrain, asphalt, paint, sidewalk) whose materials the
camera and LiDAR read.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

TERRAIN, ASPHALT, PAINT, SIDEWALK = 0, 1, 2, 3
#: Per surface: camera albedo (RGB) and LiDAR reflectivity.
SURFACE_ALBEDO = np.array([[0.30, 0.36, 0.20], [0.23, 0.23, 0.24], [0.85, 0.85, 0.80], [0.55, 0.53, 0.50]])
SURFACE_REFLECTIVITY = np.array([0.15, 0.08, 0.70, 0.25])


@dataclass(frozen=True)
class Road:
    """A straight road (``radius`` = inf) or an arc turning left (``kappa`` = 1) or right (-1).

    The centreline passes through ``p0`` with heading ``heading`` at arclength ``s = 0``; ``s`` is valid over
    ``s_range``. The lateral coordinate ``d`` is positive to the left of the road's direction.
    """

    p0: tuple[float, float]
    heading: float
    lanes: int
    lane_width: float = 3.5
    sidewalk: float = 3.0
    radius: float = math.inf
    kappa: int = 1
    s_range: tuple[float, float] = (-200.0, 200.0)

    @property
    def half_width(self) -> float:
        return self.lanes * self.lane_width

    @property
    def straight(self) -> bool:
        return math.isinf(self.radius)

    def _centre(self) -> np.ndarray:
        n = np.array([-math.sin(self.heading), math.cos(self.heading)])
        return np.asarray(self.p0) + self.kappa * self.radius * n

    def to_frame(self, xy: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Arclength ``s`` and lateral offset ``d`` of points ``xy`` (N, 2)."""
        if self.straight:
            rel = xy - np.asarray(self.p0)
            c, s = math.cos(self.heading), math.sin(self.heading)
            return rel[:, 0] * c + rel[:, 1] * s, -rel[:, 0] * s + rel[:, 1] * c
        rel = xy - self._centre()
        start = math.atan2(-self.kappa * math.cos(self.heading), self.kappa * math.sin(self.heading))
        phi = self.kappa * (np.arctan2(rel[:, 1], rel[:, 0]) - start)
        phi = (phi + np.pi) % (2 * np.pi) - np.pi
        r = np.hypot(rel[:, 0], rel[:, 1])
        return phi * self.radius, self.kappa * (self.radius - r)

    def from_frame(self, s: np.ndarray, d: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Points ``(N, 2)`` and the road's heading there, from arclength ``s`` and lateral offset ``d``."""
        s, d = np.atleast_1d(np.asarray(s, dtype=float)), np.atleast_1d(np.asarray(d, dtype=float))
        if self.straight:
            t = np.array([math.cos(self.heading), math.sin(self.heading)])
            n = np.array([-t[1], t[0]])
            xy = np.asarray(self.p0) + s[:, None] * t + d[:, None] * n
            return xy, np.full(s.shape, self.heading)
        phi = s / self.radius
        start = math.atan2(-self.kappa * math.cos(self.heading), self.kappa * math.sin(self.heading))
        ang = start + self.kappa * phi
        r = self.radius - self.kappa * d
        xy = self._centre() + r[:, None] * np.stack([np.cos(ang), np.sin(ang)], axis=1)
        return xy, self.heading + self.kappa * phi

    def in_span(self, s: np.ndarray) -> np.ndarray:
        lo, hi = self.s_range
        if not self.straight:  # an arc is drawn over at most a half turn, so its far side stays empty
            lim = 0.5 * math.pi * self.radius
            lo, hi = max(lo, -lim), min(hi, lim)
        return (s >= lo) & (s <= hi)


def classify_ground(roads: list[Road], xy: np.ndarray) -> np.ndarray:
    """Surface code (``TERRAIN``, ``ASPHALT``, ``PAINT``, ``SIDEWALK``) of ground points ``xy`` (N, 2)."""
    n = xy.shape[0]
    surface = np.full(n, TERRAIN, dtype=np.int64)
    on_road = np.zeros((len(roads), n), dtype=bool)
    frames = []
    for i, road in enumerate(roads):
        s, d = road.to_frame(xy)
        frames.append((s, d))
        span = road.in_span(s)
        ad = np.abs(d)
        on_road[i] = span & (ad <= road.half_width)
        walk = span & (ad > road.half_width) & (ad <= road.half_width + road.sidewalk)
        surface[walk & (surface == TERRAIN)] = SIDEWALK
    any_road = on_road.any(axis=0)
    surface[any_road] = ASPHALT
    shared = on_road.sum(axis=0) > 1  # the crossing box of an intersection: no lane paint
    for i, road in enumerate(roads):
        s, d = frames[i]
        ad = np.abs(d)
        lw = road.lane_width
        paint = ad < 0.12  # centreline
        paint |= np.abs(ad - (road.half_width - 0.3)) < 0.1  # edge lines
        for j in range(1, road.lanes):  # dashed lane dividers: 3 m paint, 6 m gap
            paint |= (np.abs(ad - j * lw) < 0.08) & (np.mod(s, 9.0) < 3.0)
        for k, other in enumerate(roads):  # zebra crossings just outside the shared box
            if k == i:
                continue
            so, do = other.to_frame(xy)
            band = np.abs(np.abs(do) - (other.half_width + 2.0)) < 1.5
            paint |= band & on_road[i] & (np.mod(d, 1.2) < 0.6)
        surface[on_road[i] & paint & ~shared] = PAINT
    return surface


def make_roads(layout: str, rng: np.random.Generator) -> tuple[list[Road], float]:
    """Roads for ``layout`` around an ego driving along +x in a right-hand lane; returns (roads, ego's d)."""
    lanes = int(rng.integers(1, 3))
    lane_width = float(rng.uniform(3.2, 3.8))
    sidewalk = float(rng.uniform(2.0, 4.0))
    ego_lane = int(rng.integers(0, lanes))
    ego_d = -(ego_lane + 0.5) * lane_width  # ego's lateral offset from the centreline
    p0 = (0.0, -ego_d)
    if layout == "straight":
        return [Road(p0, 0.0, lanes, lane_width, sidewalk)], ego_d
    if layout == "curve":
        radius = float(rng.uniform(45.0, 140.0))
        kappa = int(rng.choice([-1, 1]))
        return [Road(p0, 0.0, lanes, lane_width, sidewalk, radius=radius, kappa=kappa)], ego_d
    if layout == "intersection":
        cross_lanes = int(rng.integers(1, 3))
        x_cross = float(rng.uniform(-25.0, 35.0))
        main = Road(p0, 0.0, lanes, lane_width, sidewalk)
        cross = Road((x_cross, 0.0), math.pi / 2, cross_lanes, lane_width, sidewalk)
        return [main, cross], ego_d
    raise ValueError(f"unknown road layout {layout!r}")
