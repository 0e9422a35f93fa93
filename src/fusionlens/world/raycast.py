"""Vectorised ray casting against the ground plane ``z = 0`` and oriented boxes (every sensor uses this).

Each ray bundle shares one origin. Objects are first culled to those whose bounding circle overlaps the bundle's
azimuth wedge, then every (ray, box) pair is intersected with the slab method in the box's own frame; the
nearest hit wins (depth ordering). Returned object ids index the scene's object list; ``GROUND`` and ``MISS``
are negative sentinels.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

GROUND: int = -1
MISS: int = -2
_EPS = 1e-9


@dataclass
class Boxes:
    """Oriented boxes: ``centre`` (M, 3), ``half`` (M, 3) half sizes along (heading, across, up), ``yaw`` (M,)."""

    centre: np.ndarray
    half: np.ndarray
    yaw: np.ndarray

    def __len__(self) -> int:
        return int(self.centre.shape[0])

    def subset(self, idx: np.ndarray) -> Boxes:
        return Boxes(self.centre[idx], self.half[idx], self.yaw[idx])

    def shifted(self, delta: np.ndarray) -> Boxes:
        """Boxes moved by ``delta`` (M, 3) (e.g. back in time by velocity * lag)."""
        return Boxes(self.centre + delta, self.half, self.yaw)

    def to_local(self, idx: np.ndarray, points: np.ndarray) -> np.ndarray:
        """``points`` (N, 3) in the frame of boxes ``idx`` (N,): x along heading, y across, z up from centre."""
        rel = points - self.centre[idx]
        c, s = np.cos(self.yaw[idx]), np.sin(self.yaw[idx])
        return np.stack([rel[:, 0] * c + rel[:, 1] * s, -rel[:, 0] * s + rel[:, 1] * c, rel[:, 2]], axis=1)


@dataclass
class Hits:
    """Nearest hit per ray: ``t`` (R,) range (inf on a miss), ``obj`` (R,) id, ``point``/``normal`` (R, 3),
    ``local`` (R, 3) hit point in the hit box's frame (zeros elsewhere), ``unoccluded`` (M,) rays per object
    counted as if it were alone in the world (the object's full projected footprint)."""

    t: np.ndarray
    obj: np.ndarray
    point: np.ndarray
    normal: np.ndarray
    local: np.ndarray
    unoccluded: np.ndarray


def wedge_candidates(origin: np.ndarray, boxes: Boxes, yaw: float, half_angle: float,
                     max_range: float) -> np.ndarray:
    """Indices of boxes whose bounding circle overlaps the azimuth wedge ``yaw +- half_angle`` from ``origin``."""
    if len(boxes) == 0:
        return np.zeros(0, dtype=np.int64)
    rel = boxes.centre[:, :2] - origin[:2]
    dist = np.hypot(rel[:, 0], rel[:, 1])
    radius = np.hypot(boxes.half[:, 0], boxes.half[:, 1])
    az = np.arctan2(rel[:, 1], rel[:, 0])
    off = np.abs((az - yaw + np.pi) % (2 * np.pi) - np.pi)
    spread = np.arcsin(np.clip(radius / np.maximum(dist, _EPS), 0.0, 1.0))
    ok = ((off <= half_angle + spread) | (dist <= radius)) & (dist - radius <= max_range)
    return np.nonzero(ok)[0]


def cast(origin: np.ndarray, dirs: np.ndarray, boxes: Boxes, candidates: np.ndarray | None = None,
         ground: bool = True, max_range: float = np.inf) -> Hits:
    """Intersect rays ``origin + t * dirs`` (``dirs`` (R, 3), unit) with the ground and ``boxes``."""
    r = dirs.shape[0]
    m = len(boxes)
    t_best = np.full(r, np.inf)
    obj = np.full(r, MISS, dtype=np.int64)
    unoccluded = np.zeros(m, dtype=np.int64)
    if ground:
        with np.errstate(divide="ignore", invalid="ignore"):
            tg = np.where(dirs[:, 2] < -_EPS, -origin[2] / dirs[:, 2], np.inf)
        t_best = tg
        obj[np.isfinite(tg)] = GROUND
    cand = np.arange(m) if candidates is None else np.asarray(candidates, dtype=np.int64)
    if cand.size and r:
        # float32 halves the memory traffic of the (rays x boxes) slab arrays, the hot spot of every sensor.
        f32 = np.float32
        c, s = np.cos(boxes.yaw[cand]).astype(f32), np.sin(boxes.yaw[cand]).astype(f32)
        rel = (origin[None, :] - boxes.centre[cand]).astype(f32)
        half = boxes.half[cand].astype(f32)
        dx, dy = dirs[:, 0:1].astype(f32), dirs[:, 1:2].astype(f32)
        d_loc = (dx * c + dy * s, dy * c - dx * s, dirs[:, 2:3].astype(f32))
        o_loc = (rel[:, 0] * c + rel[:, 1] * s, rel[:, 1] * c - rel[:, 0] * s, rel[:, 2])
        t_near = t_far = None
        for axis in range(3):
            inv = d_loc[axis].copy()
            inv[np.abs(inv) < _EPS] = _EPS
            np.reciprocal(inv, out=inv)
            t1 = (-half[:, axis] - o_loc[axis]) * inv
            t2 = (half[:, axis] - o_loc[axis]) * inv
            lo, hi = np.minimum(t1, t2), np.maximum(t1, t2)
            if t_near is None:
                t_near, t_far = lo, hi
            else:
                np.maximum(t_near, lo, out=t_near)
                np.minimum(t_far, hi, out=t_far)
        hit = (t_far >= t_near) & (t_near > 1e-6)
        unoccluded[cand] = hit.sum(axis=0)
        t_near[~hit] = np.inf
        k = np.argmin(t_near, axis=1)
        tk = t_near[np.arange(r), k].astype(np.float64)
        closer = tk < t_best
        t_best = np.where(closer, tk, t_best)
        obj[closer] = cand[k[closer]]
    too_far = t_best > max_range
    t_best[too_far] = np.inf
    obj[too_far] = MISS
    point = origin[None, :] + dirs * np.where(np.isfinite(t_best), t_best, 0.0)[:, None]
    normal = np.zeros((r, 3))
    normal[obj == GROUND, 2] = 1.0
    local = np.zeros((r, 3))
    on_box = np.nonzero(obj >= 0)[0]
    if on_box.size:
        ids = obj[on_box]
        loc = boxes.to_local(ids, point[on_box])
        ratio = np.abs(loc) / boxes.half[ids]
        axis = np.argmax(ratio, axis=1)
        n_local = np.zeros_like(loc)
        n_local[np.arange(on_box.size), axis] = np.sign(loc[np.arange(on_box.size), axis])
        c, s = np.cos(boxes.yaw[ids]), np.sin(boxes.yaw[ids])
        normal[on_box] = np.stack([n_local[:, 0] * c - n_local[:, 1] * s,
                                   n_local[:, 0] * s + n_local[:, 1] * c, n_local[:, 2]], axis=1)
        local[on_box] = loc
    return Hits(t=t_best, obj=obj, point=point, normal=normal, local=local, unoccluded=unoccluded)


def cast_sectors(origin: np.ndarray, dirs: np.ndarray, azimuth: np.ndarray, boxes: Boxes, sectors: int,
                 max_range: float = np.inf) -> Hits:
    """:func:`cast` for an all-round bundle, split into ``sectors`` azimuth wedges to cull boxes per wedge."""
    r = dirs.shape[0]
    out = Hits(np.full(r, np.inf), np.full(r, MISS, dtype=np.int64), np.zeros((r, 3)), np.zeros((r, 3)),
               np.zeros((r, 3)), np.zeros(len(boxes), dtype=np.int64))
    width = 2 * np.pi / sectors
    sector = np.floor((azimuth % (2 * np.pi)) / width).astype(np.int64) % sectors
    order = np.argsort(sector, kind="stable")
    keys, starts = np.unique(sector[order], return_index=True)
    bounds = np.append(starts, order.size)
    for j, k in enumerate(keys):
        rows = order[bounds[j]:bounds[j + 1]]
        cand = wedge_candidates(origin, boxes, (k + 0.5) * width, width / 2, max_range)
        h = cast(origin, dirs[rows], boxes, cand, max_range=max_range)
        out.t[rows], out.obj[rows], out.point[rows] = h.t, h.obj, h.point
        out.normal[rows], out.local[rows] = h.normal, h.local
        out.unoccluded += h.unoccluded
    return out
