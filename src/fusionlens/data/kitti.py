"""The KITTI 3-D object benchmark's file layout: calibration, labels, LiDAR scans and images, read into samples.

Layout (``root`` is the folder holding ``training/`` and ``ImageSets/``, as KITTI's own download unpacks)::

    root/ImageSets/{train,val,test,...}.txt       frame ids, one per line (e.g. 000123)
    root/training/image_2/000123.png              left colour camera
    root/training/velodyne/000123.bin             float32 x, y, z, reflectance per point (Velodyne frame)
    root/training/calib/000123.txt                P0..P3 (3x4), R0_rect (3x3), Tr_velo_to_cam, Tr_imu_to_velo (3x4)
    root/training/label_2/000123.txt              one object per line (absent for the test split)

Frames: the Velodyne frame is x forward, y left, z up (metres); the rectified camera frame is x right, y down,
z forward. A label gives the bottom centre of its box in the rectified camera frame, dimensions ``h w l`` and
``rotation_y`` about the camera's y axis (0: the object's heading points along camera x). Inside fusionlens boxes
live in the Velodyne frame as ``(x, y, z, w, l, h, yaw)`` with the centre at half height, the order of
:data:`fusionlens.data.sample.BOX_FIELDS` (without velocity), so :mod:`fusionlens.models.rotated_iou` applies.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

KITTI_TYPES: tuple[str, ...] = (
    "Car", "Van", "Truck", "Pedestrian", "Person_sitting", "Cyclist", "Tram", "Misc", "DontCare",
)
DEFAULT_CLASSES: tuple[str, ...] = ("Car", "Pedestrian", "Cyclist")
_CALIB_SHAPES: dict[str, tuple[int, int]] = {
    "P0": (3, 4), "P1": (3, 4), "P2": (3, 4), "P3": (3, 4), "R0_rect": (3, 3), "Tr_velo_to_cam": (3, 4),
    "Tr_imu_to_velo": (3, 4),
}
_REQUIRED_CALIB = ("P2", "R0_rect", "Tr_velo_to_cam")


@dataclass(frozen=True)
class KittiCalib:
    """One frame's calibration (float64 arrays). ``P[k]`` is camera k's 3x4 projection of rectified points."""

    P: tuple[np.ndarray, ...]  # (4,) of (3, 4)
    R0_rect: np.ndarray  # (3, 3)
    Tr_velo_to_cam: np.ndarray  # (3, 4)
    Tr_imu_to_velo: np.ndarray  # (3, 4)

    @property
    def velo_to_rect(self) -> np.ndarray:
        """4x4 map from Velodyne coordinates to the rectified camera frame (``R0_rect @ Tr_velo_to_cam``)."""
        r0, tr = np.eye(4), np.eye(4)
        r0[:3, :3], tr[:3, :] = self.R0_rect, self.Tr_velo_to_cam
        return r0 @ tr

    def lidar_to_rect(self, points: np.ndarray) -> np.ndarray:
        m = self.velo_to_rect
        return points[:, :3] @ m[:3, :3].T + m[:3, 3]

    def rect_to_lidar(self, points: np.ndarray) -> np.ndarray:
        m = np.linalg.inv(self.velo_to_rect)
        return points[:, :3] @ m[:3, :3].T + m[:3, 3]

    def project_rect(self, points: np.ndarray, camera: int = 2) -> tuple[np.ndarray, np.ndarray]:
        """Pixels ``(N, 2)`` (u, v) of rectified-frame points ``(N, 3)`` in camera ``camera``, and their depth."""
        uvw = points[:, :3] @ self.P[camera][:, :3].T + self.P[camera][:, 3]
        depth = uvw[:, 2]
        with np.errstate(divide="ignore", invalid="ignore"):
            return uvw[:, :2] / depth[:, None], depth

    def to_text(self) -> str:
        rows = [(f"P{k}", self.P[k]) for k in range(4)] + [
            ("R0_rect", self.R0_rect), ("Tr_velo_to_cam", self.Tr_velo_to_cam), ("Tr_imu_to_velo", self.Tr_imu_to_velo)]
        return "".join(f"{name}: " + " ".join(f"{v:.12e}" for v in m.ravel()) + "\n" for name, m in rows)


def parse_calib(text: str, source: str = "<calib>") -> KittiCalib:
    """A :class:`KittiCalib` from a KITTI calib file's text; ``source`` names the file in errors. P0, P1, P3 and
    Tr_imu_to_velo may be absent (they default to P2 and identity); P2, R0_rect and Tr_velo_to_cam are required."""
    values: dict[str, np.ndarray] = {}
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        key, sep, rest = line.partition(":")
        key = key.strip()
        if not sep:
            raise ValueError(f"{source}:{number}: expected 'NAME: values', got {line.strip()!r}")
        if key == "R_rect":  # the raw-data recordings spell R0_rect this way
            key = "R0_rect"
        if key == "Tr_velo_cam":
            key = "Tr_velo_to_cam"
        if key not in _CALIB_SHAPES:
            continue  # other keys (e.g. Tr_cam_to_road) are not needed
        try:
            numbers = np.array([float(v) for v in rest.split()], dtype=np.float64)
        except ValueError:
            raise ValueError(f"{source}:{number}: {key} has a non-numeric value: {rest.strip()!r}") from None
        shape = _CALIB_SHAPES[key]
        if numbers.size != shape[0] * shape[1]:
            raise ValueError(f"{source}:{number}: {key} needs {shape[0] * shape[1]} numbers, got {numbers.size}")
        values[key] = numbers.reshape(shape)
    missing = [k for k in _REQUIRED_CALIB if k not in values]
    if missing:
        raise ValueError(f"{source}: calibration lacks {missing}")
    p = tuple(values.get(f"P{k}", values["P2"]) for k in range(4))
    return KittiCalib(P=p, R0_rect=values["R0_rect"], Tr_velo_to_cam=values["Tr_velo_to_cam"],
                      Tr_imu_to_velo=values.get("Tr_imu_to_velo", np.eye(4)[:3]))


@dataclass
class KittiObject:
    """One line of a KITTI label (or result) file. ``bbox`` = (left, top, right, bottom) pixels in image 2;
    ``dimensions`` = (h, w, l) metres; ``location`` = bottom centre (x, y, z) in the rectified camera frame."""

    type: str
    truncated: float
    occluded: int
    alpha: float
    bbox: tuple[float, float, float, float]
    dimensions: tuple[float, float, float]
    location: tuple[float, float, float]
    rotation_y: float
    score: float | None = field(default=None)

    def to_line(self) -> str:
        nums = [self.truncated, self.occluded, self.alpha, *self.bbox, *self.dimensions, *self.location,
                self.rotation_y]
        text = f"{self.type} {nums[0]:.2f} {int(nums[1])} " + " ".join(f"{v:.4f}" for v in nums[2:])
        return text + (f" {self.score:.6f}" if self.score is not None else "")


def parse_label_line(line: str, source: str = "<label>") -> KittiObject:
    """One label line (15 fields, or 16 with a detection score); ``source`` names the file and line in errors."""
    parts = line.split()
    if len(parts) not in (15, 16):
        raise ValueError(f"{source}: a KITTI label line has 15 fields (16 with a score), got {len(parts)}: "
                         f"{line.strip()!r}")
    if parts[0] not in KITTI_TYPES:
        raise ValueError(f"{source}: unknown object type {parts[0]!r}; known: {list(KITTI_TYPES)}")
    try:
        nums = [float(v) for v in parts[1:]]
    except ValueError:
        raise ValueError(f"{source}: non-numeric field in {line.strip()!r}") from None
    if any(d < 0 for d in nums[7:10]) and parts[0] != "DontCare":
        raise ValueError(f"{source}: negative dimensions h, w, l = {nums[7:10]}")
    return KittiObject(
        type=parts[0], truncated=nums[0], occluded=int(nums[1]), alpha=nums[2], bbox=tuple(nums[3:7]),
        dimensions=tuple(nums[7:10]), location=tuple(nums[10:13]), rotation_y=nums[13],
        score=nums[14] if len(nums) == 15 else None)  # type: ignore[arg-type]


def parse_labels(text: str, source: str = "<label>") -> list[KittiObject]:
    return [parse_label_line(line, f"{source}:{n}") for n, line in enumerate(text.splitlines(), 1) if line.strip()]


def objects_to_lidar_boxes(objects: list[KittiObject], calib: KittiCalib) -> torch.Tensor:
    """``(N, 7)`` float32 boxes ``(x, y, z, w, l, h, yaw)`` in the Velodyne frame, centre at half height.
    The heading ``(cos ry, 0, -sin ry)`` of the rectified frame is rotated into the Velodyne frame (for KITTI's
    usual calibration this is the familiar ``yaw = -ry - pi / 2``)."""
    if not objects:
        return torch.zeros(0, 7)
    loc = np.array([o.location for o in objects], dtype=np.float64)
    h, w, length = (np.array([o.dimensions[k] for o in objects]) for k in range(3))
    ry = np.array([o.rotation_y for o in objects])
    centre_rect = loc - np.stack([np.zeros_like(h), h / 2, np.zeros_like(h)], 1)  # y points down
    centre = calib.rect_to_lidar(centre_rect)
    rot = np.linalg.inv(calib.velo_to_rect)[:3, :3]
    heading = np.stack([np.cos(ry), np.zeros_like(ry), -np.sin(ry)], 1) @ rot.T
    yaw = np.arctan2(heading[:, 1], heading[:, 0])
    return torch.from_numpy(np.concatenate([centre, np.stack([w, length, h, yaw], 1)], 1)).float()


def lidar_boxes_to_camera(boxes: np.ndarray, calib: KittiCalib) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Inverse of :func:`objects_to_lidar_boxes`: bottom-centre locations ``(N, 3)``, dimensions ``(N, 3)`` (h, w, l)
    and ``rotation_y`` ``(N,)`` in the rectified camera frame."""
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 7)
    centre = calib.lidar_to_rect(boxes[:, :3])
    loc = centre + np.stack([np.zeros(len(boxes)), boxes[:, 5] / 2, np.zeros(len(boxes))], 1)
    heading = np.stack([np.cos(boxes[:, 6]), np.sin(boxes[:, 6]), np.zeros(len(boxes))], 1)
    heading = heading @ calib.velo_to_rect[:3, :3].T
    ry = np.arctan2(-heading[:, 2], heading[:, 0])
    return loc, boxes[:, [5, 3, 4]], ry


def box_corners_lidar(boxes: np.ndarray) -> np.ndarray:
    """The 8 corners ``(N, 8, 3)`` of Velodyne-frame boxes ``(N, 7)`` (bottom four, then top four)."""
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 7)
    sx = np.array([1, -1, -1, 1, 1, -1, -1, 1]) / 2
    sy = np.array([1, 1, -1, -1, 1, 1, -1, -1]) / 2
    sz = np.array([-1, -1, -1, -1, 1, 1, 1, 1]) / 2
    along, across, up = boxes[:, 4:5] * sx, boxes[:, 3:4] * sy, boxes[:, 5:6] * sz
    c, s = np.cos(boxes[:, 6:7]), np.sin(boxes[:, 6:7])
    return np.stack([boxes[:, 0:1] + c * along - s * across, boxes[:, 1:2] + s * along + c * across,
                     boxes[:, 2:3] + up], -1)


def project_boxes(boxes: np.ndarray, calib: KittiCalib, image_size: tuple[int, int] | None = None,
                  camera: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """2-D boxes ``(N, 4)`` (left, top, right, bottom) enclosing the projected corners of Velodyne boxes, clipped to
    ``image_size`` = (H, W) when given, and a mask of boxes whose every corner lies in front of the camera."""
    corners = box_corners_lidar(boxes)
    n = corners.shape[0]
    if n == 0:
        return np.zeros((0, 4)), np.zeros(0, dtype=bool)
    uv, depth = calib.project_rect(calib.lidar_to_rect(corners.reshape(-1, 3)), camera)
    uv, depth = uv.reshape(n, 8, 2), depth.reshape(n, 8)
    front = (depth > 0.1).all(1)
    ahead = depth[..., None] > 0.1  # corners behind the camera have no pixel; the front ones bound the box
    out = np.concatenate([np.where(ahead, uv, np.inf).min(1), np.where(ahead, uv, -np.inf).max(1)], 1)
    out[~ahead.any(1)[:, 0]] = 0.0
    if image_size is not None:
        h, w = image_size
        out = np.stack([np.clip(out[:, 0], 0, w - 1), np.clip(out[:, 1], 0, h - 1),
                        np.clip(out[:, 2], 0, w - 1), np.clip(out[:, 3], 0, h - 1)], 1)
    return out, front


def observation_angle(boxes: np.ndarray, calib: KittiCalib) -> np.ndarray:
    """KITTI's ``alpha`` (rotation_y minus the ray angle to the object's centre) of Velodyne boxes."""
    loc, _, ry = lidar_boxes_to_camera(boxes, calib)
    alpha = ry - np.arctan2(loc[:, 0], loc[:, 2])
    return (alpha + math.pi) % (2 * math.pi) - math.pi


def read_velodyne(path: Path) -> np.ndarray:
    if not path.is_file():
        raise FileNotFoundError(f"KITTI LiDAR scan {str(path)!r} is missing")
    raw = np.fromfile(path, dtype=np.float32)
    if raw.size % 4:
        raise ValueError(f"KITTI LiDAR scan {str(path)!r} holds {raw.size} float32 values, not a multiple of 4 "
                         "(x, y, z, reflectance)")
    return raw.reshape(-1, 4)


def _read_text(path: Path, what: str) -> str:
    if not path.is_file():
        raise FileNotFoundError(f"KITTI {what} {str(path)!r} is missing")
    return path.read_text()


def read_image(path: Path) -> torch.Tensor:
    """``(3, H, W)`` float32 in [0, 1]."""
    from PIL import Image, UnidentifiedImageError

    if not path.is_file():
        raise FileNotFoundError(f"KITTI image {str(path)!r} is missing")
    try:
        with Image.open(path) as img:
            arr = np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0
    except UnidentifiedImageError:
        raise ValueError(f"KITTI image {str(path)!r} is not a readable image") from None
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


class KittiDataset(Dataset):
    """Frames of one split of a KITTI-layout folder (real KITTI or :func:`fusionlens.world.kitti_export.export_kitti`).

    An item is a dict: ``id`` (str), ``image`` (3, H, W) in [0, 1], ``points`` (N, 4) Velodyne x, y, z,
    reflectance, ``calib`` (:class:`KittiCalib`), ``objects`` (every label line, DontCare included), ``boxes``
    (M, 7) Velodyne-frame boxes and ``labels`` (M,) indices into ``classes`` of the objects of those classes.
    Everything the split names is checked to exist when the dataset is opened."""

    def __init__(self, root: str | Path, split: str = "train", classes: tuple[str, ...] = DEFAULT_CLASSES,
                 with_labels: bool = True) -> None:
        self.root = Path(root).expanduser()
        if not self.root.is_dir():
            raise FileNotFoundError(f"KITTI dataroot {str(self.root)!r} does not exist or is not a directory")
        unknown = [c for c in classes if c not in KITTI_TYPES or c == "DontCare"]
        if unknown or not classes:
            raise ValueError(f"KITTI classes {unknown or list(classes)} unknown; choose from {list(KITTI_TYPES[:-1])}")
        self.classes, self.split, self.with_labels = tuple(classes), split, with_labels
        listing = self.root / "ImageSets" / f"{split}.txt"
        ids = _read_text(listing, f"split list for {split!r}").split()
        if not ids:
            raise ValueError(f"KITTI split list {str(listing)!r} names no frames")
        self.ids = ids
        self.folder = self.root / ("testing" if split == "test" and (self.root / "testing").is_dir() else "training")
        folders = ["image_2", "velodyne", "calib"] + (["label_2"] if with_labels else [])
        for sub in folders:
            for frame in ids:
                ext = {"image_2": ".png", "velodyne": ".bin"}.get(sub, ".txt")
                path = self.folder / sub / f"{frame}{ext}"
                if not path.is_file():
                    raise FileNotFoundError(f"KITTI split {split!r} names frame {frame} but {str(path)!r} is missing")

    def __len__(self) -> int:
        return len(self.ids)

    def calib(self, index: int) -> KittiCalib:
        path = self.folder / "calib" / f"{self.ids[index]}.txt"
        return parse_calib(_read_text(path, "calibration"), str(path))

    def objects(self, index: int) -> list[KittiObject]:
        path = self.folder / "label_2" / f"{self.ids[index]}.txt"
        return parse_labels(_read_text(path, "label file"), str(path)) if self.with_labels else []

    def __getitem__(self, index: int) -> dict:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} KITTI frames")
        index %= len(self)
        frame = self.ids[index]
        calib = self.calib(index)
        objects = self.objects(index)
        mine = [o for o in objects if o.type in self.classes]
        return {
            "id": frame,
            "image": read_image(self.folder / "image_2" / f"{frame}.png"),
            "points": torch.from_numpy(read_velodyne(self.folder / "velodyne" / f"{frame}.bin").copy()),
            "calib": calib,
            "objects": objects,
            "boxes": objects_to_lidar_boxes(mine, calib),
            "labels": torch.tensor([self.classes.index(o.type) for o in mine], dtype=torch.long),
        }
