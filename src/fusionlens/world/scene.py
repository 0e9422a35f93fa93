"""Procedural scenes: vehicles, pedestrians and static clutter placed along the roads, with per-sensor materials.

Every object is an oriented box standing on the ground. Labelled objects (vehicles, pedestrians) get
nuScenes-like sizes (class means of the nuScenes training set with a few percent spread), headings along their
lane and speeds; static clutter (buildings, walls, poles, barriers) lines the roads behind the sidewalks. Each
object carries a camera albedo and texture, a LiDAR reflectivity and a radar cross-section (dBsm).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from fusionlens.data.sample import CLASSES
from fusionlens.world.config import ROAD_LAYOUTS, WorldConfig
from fusionlens.world.raycast import Boxes
from fusionlens.world.road import ASPHALT, PAINT, SIDEWALK, Road, classify_ground, make_roads

# Textures the camera renders (see world.camera).
PLAIN, VEHICLE, BUILDING, PEDESTRIAN, POLE, BARRIER = range(6)
# class: (w, l, h) means, relative spread, frequency among vehicles, RCS dBsm, texture
_CLASS_SPEC: dict[str, tuple[tuple[float, float, float], float, float, float, int]] = {
    "car": ((1.95, 4.62, 1.73), 0.07, 0.68, 10.0, VEHICLE),
    "truck": ((2.51, 6.93, 2.84), 0.10, 0.12, 18.0, VEHICLE),
    "bus": ((2.94, 11.19, 3.47), 0.05, 0.06, 20.0, VEHICLE),
    "trailer": ((2.90, 12.28, 3.87), 0.06, 0.05, 19.0, VEHICLE),
    "construction_vehicle": ((2.85, 6.37, 3.19), 0.10, 0.09, 17.0, VEHICLE),
    "pedestrian": ((0.67, 0.73, 1.77), 0.08, 0.0, -4.0, PEDESTRIAN),
}
_PALETTE: dict[str, list[tuple[float, float, float]]] = {
    "car": [(0.86, 0.86, 0.86), (0.08, 0.08, 0.09), (0.62, 0.63, 0.65), (0.38, 0.38, 0.40), (0.70, 0.08, 0.07),
            (0.10, 0.22, 0.60), (0.12, 0.30, 0.16), (0.72, 0.65, 0.50)],
    "truck": [(0.90, 0.90, 0.88), (0.75, 0.12, 0.10), (0.15, 0.30, 0.65), (0.30, 0.30, 0.32)],
    "bus": [(0.90, 0.75, 0.10), (0.80, 0.15, 0.12), (0.15, 0.35, 0.70), (0.88, 0.88, 0.88)],
    "trailer": [(0.88, 0.88, 0.86), (0.55, 0.56, 0.58)],
    "construction_vehicle": [(0.95, 0.70, 0.05), (0.95, 0.45, 0.05)],
    "pedestrian": [(0.15, 0.15, 0.18), (0.25, 0.30, 0.55), (0.60, 0.15, 0.15), (0.75, 0.72, 0.65),
                   (0.20, 0.45, 0.25)],
}
_BUILDING_COLOURS = [(0.70, 0.62, 0.50), (0.55, 0.28, 0.20), (0.60, 0.60, 0.62), (0.82, 0.80, 0.74),
                     (0.45, 0.47, 0.52)]


@dataclass
class Scene:
    """One scene: roads and objects (``boxes`` plus per-object attributes, all indexed alike)."""

    layout: str
    roads: list[Road]
    boxes: Boxes
    velocity: np.ndarray  # (M, 2) m/s, ego frame
    label: np.ndarray  # (M,) index into CLASSES, -1 for unlabelled clutter
    texture: np.ndarray  # (M,)
    colour: np.ndarray  # (M, 3) albedo
    reflectivity: np.ndarray  # (M,) LiDAR, 0..1
    rcs: np.ndarray  # (M,) radar cross-section, dBsm
    ego_speed: float  # m/s along +x

    @property
    def labelled(self) -> np.ndarray:
        return np.nonzero(self.label >= 0)[0]


class _Placer:
    """Collects boxes while rejecting overlaps (separating-axis test on the footprints, with a margin)."""

    def __init__(self, rng: np.random.Generator) -> None:
        self.rng = rng
        self.rows: list[tuple] = []
        # Footprints (x, y, half length, half width, yaw, bounding radius); first the ego (rear axle at 0).
        self._fp = np.zeros((256, 6))
        self._fp[0] = (1.4, 0.0, 3.5, 1.6, 0.0, math.hypot(3.5, 1.6))
        self._n = 1

    def free(self, x: float, y: float, hl: float, hw: float, yaw: float, margin: float) -> bool:
        fp = self._fp[: self._n]
        reach = math.hypot(hl, hw) + fp[:, 5] + 2 * margin
        near = fp[(fp[:, 0] - x) ** 2 + (fp[:, 1] - y) ** 2 < reach**2]  # bounding circles touch
        if near.shape[0] == 0:
            return True
        ca, sa = math.cos(yaw), math.sin(yaw)
        for ox, oy, ohl, ohw, oyaw, _ in near:
            cb, sb = math.cos(oyaw), math.sin(oyaw)
            dx, dy = ox - x, oy - y
            separated = False
            for ux, uy in ((ca, sa), (-sa, ca), (cb, sb), (-sb, cb)):
                ra = (hl + margin) * abs(ux * ca + uy * sa) + (hw + margin) * abs(-ux * sa + uy * ca)
                rb = ohl * abs(ux * cb + uy * sb) + ohw * abs(-ux * sb + uy * cb)
                if abs(dx * ux + dy * uy) > ra + rb:
                    separated = True
                    break
            if not separated:
                return False
        return True

    def add(self, x: float, y: float, size_wlh: tuple[float, float, float], yaw: float, vel: tuple[float, float],
            label: int, texture: int, colour: tuple[float, float, float], refl: float, rcs: float,
            margin: float = 0.4) -> bool:
        w, l, h = size_wlh
        if not self.free(x, y, l / 2, w / 2, yaw, margin):
            return False
        if self._n == self._fp.shape[0]:
            self._fp = np.concatenate([self._fp, np.zeros_like(self._fp)])
        self._fp[self._n] = (x, y, l / 2, w / 2, yaw, math.hypot(l / 2, w / 2))
        self._n += 1
        self.rows.append((x, y, h / 2, l / 2, w / 2, h / 2, yaw, vel[0], vel[1], label, texture, *colour, refl,
                          rcs))
        return True


def _class_size(name: str, rng: np.random.Generator) -> tuple[float, float, float]:
    mean, spread = _CLASS_SPEC[name][0], _CLASS_SPEC[name][1]
    return tuple(float(m * (1 + spread * np.clip(rng.standard_normal(), -2.5, 2.5))) for m in mean)  # type: ignore


def _add_labelled(p: _Placer, name: str, xy: np.ndarray, yaw: float, speed: float) -> bool:
    rng = p.rng
    size = _class_size(name, rng)
    palette = _PALETTE[name]
    colour = palette[int(rng.integers(len(palette)))]
    refl = float(np.clip(0.25 + 0.4 * np.mean(colour) + 0.05 * rng.standard_normal(), 0.05, 0.95))
    rcs = _CLASS_SPEC[name][3] + float(rng.normal(0.0, 2.0))
    vel = (speed * math.cos(yaw), speed * math.sin(yaw))
    return p.add(float(xy[0]), float(xy[1]), size, yaw, vel, CLASSES.index(name), _CLASS_SPEC[name][4], colour,
                 refl, rcs)


def _inside(cfg: WorldConfig, xy: np.ndarray, margin: float = 1.0) -> bool:
    (x0, x1), (y0, y1) = cfg.grid.bounds[0], cfg.grid.bounds[1]
    return bool(x0 + margin <= xy[0] <= x1 - margin and y0 + margin <= xy[1] <= y1 - margin)


def _span(cfg: WorldConfig, extra: float = 0.0) -> float:
    return max(abs(v) for b in cfg.grid.bounds[:2] for v in b) * math.sqrt(2) + extra


def _place_traffic(p: _Placer, cfg: WorldConfig, roads: list[Road]) -> None:
    rng = p.rng
    vehicle_names = [c for c in cfg.classes if _CLASS_SPEC[c][2] > 0]
    if vehicle_names:
        freq = np.array([_CLASS_SPEC[c][2] for c in vehicle_names])
        freq /= freq.sum()
        span = _span(cfg)
        for kerb, (lo, hi) in ((False, cfg.vehicles), (True, cfg.parked)):
            target = int(rng.integers(lo, hi + 1))
            placed = tries = 0
            while placed < target and tries < 30 * max(target, 1):
                tries += 1
                road = roads[0] if len(roads) == 1 or rng.random() < 0.6 else roads[int(rng.integers(len(roads)))]
                name = "car" if kerb and "car" in vehicle_names and rng.random() < 0.85 else \
                    vehicle_names[int(rng.choice(len(vehicle_names), p=freq))]
                s = float(rng.uniform(-span, span))
                forward = bool(rng.random() < 0.5)
                if kerb:
                    d = road.half_width - _CLASS_SPEC[name][0][0] / 2 - 0.15
                    speed = 0.0
                else:
                    d = (int(rng.integers(road.lanes)) + 0.5) * road.lane_width + float(rng.normal(0, 0.2))
                    speed = 0.0 if rng.random() < 0.2 else float(rng.uniform(3.0, 14.0))
                d = -d if forward else d  # keep right: forward traffic on the right of the centreline
                if not road.in_span(np.array([s]))[0]:
                    continue
                xy, heading = road.from_frame(np.array([s]), np.array([d]))
                if not _inside(cfg, xy[0]):
                    continue
                yaw = float(heading[0]) + (0.0 if forward else math.pi) + float(rng.normal(0, 0.03))
                placed += _add_labelled(p, name, xy[0], yaw, speed)
    if "pedestrian" in cfg.classes:
        target = int(rng.integers(cfg.pedestrians[0], cfg.pedestrians[1] + 1))
        placed = tries = 0
        while placed < target and tries < 30 * max(target, 1):
            tries += 1
            road = roads[int(rng.integers(len(roads)))]
            side = 1.0 if rng.random() < 0.5 else -1.0
            s = float(rng.uniform(-_span(cfg), _span(cfg)))
            d = side * (road.half_width + float(rng.uniform(0.5, road.sidewalk - 0.4)))
            xy, heading = road.from_frame(np.array([s]), np.array([d]))
            if not road.in_span(np.array([s]))[0] or not _inside(cfg, xy[0]):
                continue
            if classify_ground(roads, xy)[0] != SIDEWALK:
                continue
            yaw = float(heading[0]) + (0.0 if rng.random() < 0.5 else math.pi)
            speed = 0.0 if rng.random() < 0.3 else float(rng.uniform(0.6, 1.7))
            placed += _add_labelled(p, "pedestrian", xy[0], yaw, speed)


def _clear_of_roads(roads: list[Road], x: float, y: float, hl: float, hw: float, yaw: float) -> bool:
    c, s = math.cos(yaw), math.sin(yaw)
    ux, uy = np.linspace(-hl, hl, 5), np.linspace(-hw, hw, 3)
    gx, gy = np.meshgrid(ux, uy)
    pts = np.stack([x + gx.ravel() * c - gy.ravel() * s, y + gx.ravel() * s + gy.ravel() * c], axis=1)
    surf = classify_ground(roads, pts)
    return not np.isin(surf, (ASPHALT, PAINT, SIDEWALK)).any()


def _place_clutter(p: _Placer, cfg: WorldConfig, roads: list[Road]) -> None:
    rng = p.rng
    span = _span(cfg, 10.0)
    for road in roads:
        for side in (-1.0, 1.0):
            s = -span + float(rng.uniform(0, 10))
            while s < span:  # a row of buildings and walls behind the sidewalk, with gaps
                length = float(rng.uniform(8.0, 28.0))
                is_wall = rng.random() < 0.2
                depth = 0.35 if is_wall else float(rng.uniform(8.0, 16.0))
                height = float(rng.uniform(1.5, 3.0)) if is_wall else float(rng.uniform(4.0, 22.0))
                d = side * (road.half_width + road.sidewalk + float(rng.uniform(0.3, 3.0)) + depth / 2)
                xy, heading = road.from_frame(np.array([s + length / 2]), np.array([d]))
                x, y, yaw = float(xy[0, 0]), float(xy[0, 1]), float(heading[0])
                if road.in_span(np.array([s + length / 2]))[0] and _clear_of_roads(roads, x, y, length / 2,
                                                                                   depth / 2, yaw):
                    colour = (0.5, 0.5, 0.5) if is_wall else _BUILDING_COLOURS[int(rng.integers(5))]
                    rcs = 20.0 if is_wall else 28.0
                    p.add(x, y, (depth, length, height), yaw, (0.0, 0.0), -1, PLAIN if is_wall else BUILDING,
                          colour, float(rng.uniform(0.25, 0.5)), rcs, margin=0.1)
                s += length + float(rng.uniform(1.0, 12.0))
            s = -span + float(rng.uniform(0, 25))
            while s < span:  # street lights and sign posts at the kerb, bins and barriers on the sidewalk
                d = side * (road.half_width + 0.5)
                xy, heading = road.from_frame(np.array([s]), np.array([d]))
                if road.in_span(np.array([s]))[0] and classify_ground(roads, xy)[0] == SIDEWALK:
                    if rng.random() < 0.7:
                        p.add(float(xy[0, 0]), float(xy[0, 1]), (0.25, 0.25, float(rng.uniform(4.0, 8.0))),
                              float(heading[0]), (0.0, 0.0), -1, POLE, (0.25, 0.25, 0.27), 0.45, 6.0, margin=0.1)
                    else:
                        p.add(float(xy[0, 0]), float(xy[0, 1]), (0.5, 1.5, 1.0), float(heading[0]), (0.0, 0.0),
                              -1, BARRIER, (0.95, 0.45, 0.1), 0.85, 4.0, margin=0.1)
                s += float(rng.uniform(15.0, 35.0))


def make_scene(cfg: WorldConfig, rng: np.random.Generator) -> Scene:
    """Sample a scene: layout, roads, traffic (labelled) and clutter, in that order (so traffic wins space)."""
    names = list(ROAD_LAYOUTS)  # canonical order, so equal configs draw equal layouts whatever the dict order
    probs = np.array([cfg.layout_probs.get(n, 0.0) for n in names], dtype=float)
    layout = names[int(rng.choice(len(names), p=probs / probs.sum()))]
    roads, _ = make_roads(layout, rng)
    placer = _Placer(rng)
    _place_traffic(placer, cfg, roads)
    _place_clutter(placer, cfg, roads)
    ego_speed = 0.0 if rng.random() < 0.15 else float(rng.uniform(3.0, 14.0))
    rows = np.array(placer.rows, dtype=np.float64).reshape(-1, 16)
    return Scene(
        layout=layout, roads=roads,
        boxes=Boxes(centre=rows[:, 0:3].copy(), half=rows[:, 3:6].copy(), yaw=rows[:, 6].copy()),
        velocity=rows[:, 7:9].copy(), label=rows[:, 9].astype(np.int64), texture=rows[:, 10].astype(np.int64),
        colour=rows[:, 11:14].copy(), reflectivity=rows[:, 14].copy(), rcs=rows[:, 15].copy(),
        ego_speed=ego_speed,
    )


def box_array(scene: Scene, idx: np.ndarray) -> np.ndarray:
    """``(N, 9)`` boxes in ``BOX_FIELDS`` order (x, y, z, w, l, h, yaw, vx, vy) for objects ``idx``."""
    b = scene.boxes
    yaw = (b.yaw[idx] + np.pi) % (2 * np.pi) - np.pi
    return np.concatenate([b.centre[idx], 2 * b.half[idx][:, [1, 0, 2]], yaw[:, None], scene.velocity[idx]],
                          axis=1)
