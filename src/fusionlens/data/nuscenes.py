"""Real nuScenes, read through nuscenes-devkit, into the same :class:`~fusionlens.data.sample.Sample` schema
as the built-in world, so that training, decomposition, evaluation and pruning run on it unchanged.

The setting of the papers (LMD appendix A.2, after SimpleBEV): six cameras resized to 224x400, five radars
with five sweeps and their metadata, the LiDAR (five sweeps), vehicle masks (bus, car, construction_vehicle,
trailer, truck) on a 200x8x200 grid over +-50 m, annotations with visibility token 1 masked out of the valid
map.

Frames and conventions:

* Reference frame: the ego frame at the sample's LIDAR_TOP keyframe (the sample's timestamp). Radar and LiDAR
  sweeps are ego-motion compensated into it; boxes and box velocities are expressed in it.
* Radar points: the 18 devkit fields with positions *and* both velocity pairs rotated into the reference ego
  frame, then ``time_lag`` = t_ref - t_sweep in seconds. LiDAR: ``(x, y, z, intensity, ring)`` (the ring is
  the 5th column of the ``.pcd.bin`` files, which the devkit's reader drops).
* Cameras: the keyframe image of each channel resized to ``image_size`` (with ``jpeg_draft``, decoded first at
  the smallest 1/2^k DCT scale still at least that size, which averages pixel blocks; then bilinear). The
  intrinsics follow the resize with pixel centres at integer coordinates: ``f' = s f``,
  ``c' = s (c + 1/2) - 1/2`` (both steps are edge-aligned scalings, so this holds either way). ``cam_to_ego`` is the
  ``calibrated_sensor`` pose; with ``camera_ego_motion=True`` it also carries the ego motion between the
  camera's exposure and the reference time (up to ~40 ms in nuScenes).
* Boxes: annotations whose devkit detection name is in ``CLASSES`` (``category_to_detection_name``), kept when
  their centre lies in the grid's x-y extent; every vehicle annotation is drawn into the BEV maps."""

from __future__ import annotations

import argparse
import functools
import json
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from fusionlens.data import _nuscenes_points as pts
from fusionlens.data.labels import DEFAULT_CENTER_SIGMA_M, boxes_to_bev, vehicle_mask
from fusionlens.data.sample import CAMERA_NAMES, CLASSES, RADAR_NAMES, BEVGrid, Sample
from fusionlens.modalities import NAMES as MODALITIES

VERSIONS: tuple[str, ...] = ("v1.0-trainval", "v1.0-test", "v1.0-mini")
TABLES: tuple[str, ...] = ("attribute", "calibrated_sensor", "category", "ego_pose", "instance", "log", "map",
                           "sample", "sample_annotation", "sample_data", "scene", "sensor", "visibility")
#: The papers' grid (SimpleBEV: 200x8x200 over +-50 m horizontally, +-5 m vertically) and image size.
PAPER_GRID = BEVGrid(((-50.0, 50.0), (-50.0, 50.0), (-5.0, 5.0)), (200, 200, 8))
PAPER_IMAGE_SIZE: tuple[int, int] = (224, 400)
#: Our split names -> the devkit's, per version; any other devkit split name (or a custom one from the
#: devkit's splits.json) is passed through.
_SPLIT_ALIASES = {"v1.0-mini": {"train": "mini_train", "val": "mini_val"}}
_REFERENCE_CHANNEL = "LIDAR_TOP"
_INSTALL_HINT = "nuScenes support needs nuscenes-devkit: pip install 'fusionlens[nuscenes]'"


def require_devkit() -> Any:
    """Import nuscenes-devkit lazily (an optional extra) with an install hint if it is missing."""
    try:
        import nuscenes.nuscenes as module
    except ImportError as err:
        raise ImportError(f"{_INSTALL_HINT} ({err})") from err
    return module


def check_dataroot(dataroot: str | os.PathLike[str], version: str) -> Path:
    """Validate ``dataroot``/``version`` and the 13 tables before loading; returns the resolved dataroot."""
    if version not in VERSIONS:
        raise ValueError(f"nuScenes version {version!r} does not exist; choose one of {VERSIONS}")
    root = Path(dataroot).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"nuScenes dataroot {str(root)!r} does not exist or is not a directory")
    if not (root / version).is_dir():
        raise FileNotFoundError(f"nuScenes dataroot {str(root)!r} has no {version!r} folder with the tables")
    missing = [t for t in TABLES if not (root / version / f"{t}.json").is_file()]
    if missing:
        raise FileNotFoundError(f"nuScenes {version} at {str(root)!r} lacks table(s) "
                                f"{', '.join(f'{t}.json' for t in missing)}")
    return root.resolve()


def broken_table(folder: Path) -> str | None:
    """What is wrong with the first of the tables in ``folder`` that is not valid JSON or not a list of records with
    a ``token`` (``None``: all are). Called only once the devkit has failed, so a good dataset is parsed once."""
    for table in TABLES:
        path = folder / f"{table}.json"
        try:
            records = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            return f"nuScenes table {path} is not valid JSON ({exc})"
        if not isinstance(records, list):
            return (f"nuScenes table {path} has the wrong structure: expected a list of records, "
                    f"got a JSON {type(records).__name__}")
        bad = next((i for i, r in enumerate(records) if not (isinstance(r, dict) and isinstance(r.get("token"), str))),
                   None)
        if bad is not None:
            return (f"nuScenes table {path} has the wrong structure: record {bad} is not an object with a "
                    f"'token' string ({json.dumps(records[bad])[:80]})")
    return None


@functools.lru_cache(maxsize=2)
def load_nuscenes(dataroot: str, version: str) -> Any:
    """A devkit ``NuScenes`` for ``dataroot``/``version``, shared between splits (trainval loads slowly). A table
    the devkit cannot load is named in the ``ValueError``, with what is wrong with it."""
    root = check_dataroot(dataroot, version)
    try:
        return require_devkit().NuScenes(version=version, dataroot=str(root), verbose=False)
    except (ValueError, TypeError, KeyError, AttributeError, IndexError) as exc:  # json.JSONDecodeError: ValueError
        problem = broken_table(root / version)
        if problem is None:
            problem = (f"nuScenes {version} at {str(root)!r}: the devkit could not load the tables "
                       f"({type(exc).__name__}: {exc}); is the download complete and unmodified?")
        raise ValueError(problem) from None


def split_scenes(nusc: Any, version: str, split: str) -> list[str]:
    """Names of the scenes of ``split`` (``train``/``val``/``test`` or a devkit split) present in ``nusc``."""
    from nuscenes.utils.splits import create_splits_scenes

    name = _SPLIT_ALIASES.get(version, {}).get(split, split)
    known = create_splits_scenes()
    if name in known:
        wanted = known[name]
    else:
        from nuscenes.utils.splits import get_scenes_of_split

        try:
            wanted = get_scenes_of_split(name, nusc)
        except (FileNotFoundError, AssertionError, ValueError) as err:
            raise ValueError(f"nuScenes split {split!r} is unknown for {version}: not one of {sorted(known)} "
                             f"and not in a custom splits.json ({err})") from err
    present = {s["name"] for s in nusc.scene}
    return [s for s in wanted if s in present]


#: Midpoints of nuScenes' visibility bins (fraction of the object visible over the six cameras) by token.
VISIBILITY_FRACTION: dict[int, float] = {1: 0.2, 2: 0.5, 3: 0.7, 4: 0.9}


def scene_conditions(description: str) -> dict[str, Any]:
    """Conditions from a scene description, where nuScenes notes night and rain, in the built-in world's
    ``meta["conditions"]`` types: ``time_of_day`` ("day"/"night"), ``rain`` (intensity; 1.0 when noted, as the
    description gives none). Word starts only, so that "train" or "drain" is not rain."""
    text = description.lower()
    return {"time_of_day": "night" if re.search(r"\bnight", text) else "day",
            "rain": 1.0 if re.search(r"\brain", text) else 0.0}


def condition_tags(conditions: dict[str, Any]) -> list[str]:
    """Active condition names, time of day first (the world's ``meta["tags"]``)."""
    return [conditions["time_of_day"]] + ["rain"] * (conditions["rain"] > 0)


class NuScenesDataset(Dataset):
    """Keyframe samples of one nuScenes split as :class:`Sample` objects (see the module docstring)."""

    def __init__(
        self,
        dataroot: str | os.PathLike[str],
        version: str = "v1.0-trainval",
        split: str = "train",
        grid: BEVGrid = PAPER_GRID,
        image_size: tuple[int, int] = PAPER_IMAGE_SIZE,
        n_radar_sweeps: int = 5,
        n_lidar_sweeps: int = 5,
        *,
        modalities: Sequence[str] = MODALITIES,
        cameras: Sequence[str] = CAMERA_NAMES,
        radars: Sequence[str] = RADAR_NAMES,
        radar_filters: str = "none",
        min_distance: float = 1.0,
        camera_ego_motion: bool = False,
        jpeg_draft: bool = True,
        center_sigma: float = DEFAULT_CENTER_SIGMA_M,
        verify_files: bool = False,
    ) -> None:
        if not isinstance(grid, BEVGrid):
            raise ValueError(f"grid must be a BEVGrid, got {type(grid).__name__}")
        if len(image_size) != 2 or min(int(v) for v in image_size) < 1:
            raise ValueError(f"image_size must be (H, W) with positive sizes, got {image_size!r}")
        for name, n in (("n_radar_sweeps", n_radar_sweeps), ("n_lidar_sweeps", n_lidar_sweeps)):
            if int(n) < 1:
                raise ValueError(f"{name} must be >= 1, got {n}")
        unknown = sorted(set(modalities) - set(MODALITIES))
        if unknown or not modalities:
            raise ValueError(f"modalities must be a non-empty subset of {MODALITIES}, "
                             f"got {tuple(modalities)}")
        for name, chosen, known in (("cameras", cameras, CAMERA_NAMES), ("radars", radars, RADAR_NAMES)):
            bad = [c for c in chosen if c not in known]
            if bad or not chosen:
                raise ValueError(f"{name} must be a non-empty subset of {known}, got {tuple(chosen)}")
        if radar_filters not in pts.RADAR_FILTERS:
            raise ValueError(f"radar_filters must be one of {pts.RADAR_FILTERS}, got {radar_filters!r}")
        if min_distance < 0:
            raise ValueError(f"min_distance must be >= 0 metres, got {min_distance}")
        if not center_sigma > 0:
            raise ValueError(f"center_sigma must be > 0 metres, got {center_sigma}")
        self.version, self.split, self.grid = version, split, grid
        self.image_size = (int(image_size[0]), int(image_size[1]))
        self.n_radar_sweeps, self.n_lidar_sweeps = int(n_radar_sweeps), int(n_lidar_sweeps)
        self.modalities, self.cameras, self.radars = tuple(modalities), tuple(cameras), tuple(radars)
        self.radar_filters, self.min_distance = radar_filters, float(min_distance)
        self.camera_ego_motion, self.center_sigma = bool(camera_ego_motion), float(center_sigma)
        self.jpeg_draft = bool(jpeg_draft)

        self.nusc = load_nuscenes(str(check_dataroot(dataroot, version)), version)
        scenes = split_scenes(self.nusc, version, split)
        if not scenes:
            raise ValueError(f"nuScenes split {split!r} has no scenes in {version} at {dataroot}")
        by_name = {s["name"]: s for s in self.nusc.scene}
        self.sample_tokens: list[str] = []
        for name in scenes:
            token = by_name[name]["first_sample_token"]
            while token:
                self.sample_tokens.append(token)
                token = self.nusc.get("sample", token)["next"]
        # A broken download shows up here, not hours into training: every file of the split, or the first
        # sample's.
        tokens = self.sample_tokens if verify_files else self.sample_tokens[:1]
        iterator = tokens
        if verify_files:
            from tqdm import tqdm

            iterator = tqdm(tokens, desc=f"checking nuScenes {split} files", unit="sample")
        for token in iterator:
            for what, records in self._records(self.nusc.get("sample", token)).items():
                pts.require_files(self.nusc, records, what)

    def __len__(self) -> int:
        return len(self.sample_tokens)

    def _channel(self, sample: dict, channel: str) -> str:
        if channel not in sample["data"]:
            raise ValueError(f"nuScenes sample {sample['token']} has no {channel} data "
                             f"(channels: {sorted(sample['data'])})")
        return sample["data"][channel]

    def _records(self, sample: dict) -> dict[str, list[dict]]:
        """The sample_data records each enabled modality reads, keyed by a description for error messages."""
        out: dict[str, list[dict]] = {}
        get = functools.partial(self.nusc.get, "sample_data")
        self._channel(sample, _REFERENCE_CHANNEL)  # its pose is the reference; its file is read only for LiDAR
        if "camera" in self.modalities:
            out[f"cameras of sample {sample['token']}"] = [get(self._channel(sample, c))
                                                           for c in self.cameras]
        if "radar" in self.modalities:
            for ch in self.radars:
                out[f"{ch} sweeps of sample {sample['token']}"] = pts.sweep_records(
                    self.nusc, self._channel(sample, ch), self.n_radar_sweeps)
        if "lidar" in self.modalities:
            out[f"LIDAR_TOP sweeps of sample {sample['token']}"] = pts.sweep_records(
                self.nusc, self._channel(sample, "LIDAR_TOP"), self.n_lidar_sweeps)
        return out

    def __getitem__(self, index: int) -> Sample:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} nuScenes {self.split} samples")
        index = range(len(self))[index]
        sample = self.nusc.get("sample", self.sample_tokens[index])
        records = self._records(sample)
        for what, recs in records.items():
            pts.require_files(self.nusc, recs, what)
        ref = self.nusc.get("sample_data", self._channel(sample, _REFERENCE_CHANNEL))
        ref_from_global = pts.pose_matrix(self.nusc.get("ego_pose", ref["ego_pose_token"]), inverse=True)

        images, intrinsics, cam_to_ego = self._cameras(sample, ref_from_global)
        radar = lidar = None
        if "radar" in self.modalities:
            clouds = [pts.load_sweeps(self.nusc, records[f"{ch} sweeps of sample {sample['token']}"], "radar",
                                      ref_from_global, ref["timestamp"], radar_filters=self.radar_filters,
                                      min_distance=self.min_distance) for ch in self.radars]
            radar = torch.from_numpy(np.concatenate(clouds, axis=0))
        if "lidar" in self.modalities:
            lidar = torch.from_numpy(pts.load_sweeps(
                self.nusc, records[f"LIDAR_TOP sweeps of sample {sample['token']}"], "lidar", ref_from_global,
                ref["timestamp"], min_distance=self.min_distance))

        boxes, labels, visibility, ann_tokens = self._boxes(sample, ref)
        invalid = ~visibility["visible"] & vehicle_mask(labels)
        maps = boxes_to_bev(boxes, labels, self.grid, invalid=invalid, center_sigma=self.center_sigma)
        (x0, x1), (y0, y1), _ = self.grid.bounds
        keep = (boxes[:, 0] >= x0) & (boxes[:, 0] < x1) & (boxes[:, 1] >= y0) & (boxes[:, 1] < y1)
        visibility = {k: v[keep] for k, v in visibility.items()}
        scene = self.nusc.get("scene", sample["scene_token"])
        log = self.nusc.get("log", scene["log_token"])
        conditions = scene_conditions(scene["description"])
        meta = {
            "source": "nuscenes", "version": self.version, "split": self.split, "index": index,
            "sample_token": sample["token"], "scene_token": scene["token"], "scene_name": scene["name"],
            "description": scene["description"], "location": log["location"],
            "timestamp": sample["timestamp"],
            "sample_data_tokens": dict(sample["data"]), "conditions": conditions,
            "tags": condition_tags(conditions), "camera_names": list(self.cameras),
            "annotation_tokens": [t for t, k in zip(ann_tokens, keep.tolist()) if k],
            # Global-from-ego of the reference frame, to turn predictions into nuScenes (global) boxes.
            "ego_to_global": torch.from_numpy(np.linalg.inv(ref_from_global)),
        }
        return Sample(images=images, intrinsics=intrinsics, cam_to_ego=cam_to_ego, radar=radar, lidar=lidar,
                      bev_seg=maps["seg"], bev_valid=maps["valid"], bev_center=maps["center"],
                      bev_offset=maps["offset"], boxes=boxes[keep], box_labels=labels[keep],
                      visibility=visibility, grid=self.grid, meta=meta)

    def _cameras(self, sample: dict, ref_from_global: np.ndarray) -> tuple[torch.Tensor | None, torch.Tensor,
                                                                           torch.Tensor]:
        """Resized images (or None when the camera modality is off), adjusted intrinsics, camera-to-ego poses.
        Calibration is returned even without images: models project into the cameras' frusta regardless."""
        from PIL import Image

        h, w = self.image_size
        images, ks, poses = [], [], []
        for ch in self.cameras:
            rec = self.nusc.get("sample_data", self._channel(sample, ch))
            cs = self.nusc.get("calibrated_sensor", rec["calibrated_sensor_token"])
            if len(cs.get("camera_intrinsic") or []) != 3:
                raise ValueError(f"nuScenes {ch} calibrated_sensor {cs['token']} has no 3x3 camera_intrinsic")
            pose = pts.pose_matrix(cs)
            if self.camera_ego_motion:
                global_from_ego = pts.pose_matrix(self.nusc.get("ego_pose", rec["ego_pose_token"]))
                pose = ref_from_global @ global_from_ego @ pose
            # Without the camera modality the calibration still needs the original size: the table has it, so
            # a download without camera images works.
            src_w, src_h = int(rec.get("width") or 0), int(rec.get("height") or 0)
            if "camera" in self.modalities or not (src_w and src_h):
                with Image.open(os.path.join(self.nusc.dataroot, rec["filename"])) as img:
                    src_w, src_h = img.size  # the file is the truth if the table disagrees
                    if "camera" in self.modalities:
                        if self.jpeg_draft:  # decode at the smallest 1/2^k scale >= (w, h): much less work
                            img.draft("RGB", (w, h))
                        arr = np.asarray(img.convert("RGB").resize((w, h), Image.Resampling.BILINEAR))
                        images.append(torch.from_numpy(arr.copy()).permute(2, 0, 1).float() / 255.0)
            k = np.asarray(cs["camera_intrinsic"], dtype=np.float64)
            scale = np.array([w / src_w, h / src_h])
            k[:2, :2] *= scale[:, None]
            k[:2, 2] = scale * (k[:2, 2] + 0.5) - 0.5
            ks.append(torch.from_numpy(k).float())
            poses.append(torch.from_numpy(pose).float())
        stacked = torch.stack(images) if images else None
        return stacked, torch.stack(ks), torch.stack(poses)

    def _boxes(self, sample: dict, ref_record: dict) -> tuple[torch.Tensor, torch.Tensor,
                                                                         dict[str, torch.Tensor], list[str]]:
        """Annotations of ``CLASSES`` in the reference ego frame as ``BOX_FIELDS`` rows, with visibility."""
        from nuscenes.eval.detection.utils import category_to_detection_name
        from pyquaternion import Quaternion

        ref_pose = self.nusc.get("ego_pose", ref_record["ego_pose_token"])
        to_ego = Quaternion(ref_pose["rotation"]).inverse
        rows, labels, vis, lidar_n, radar_n, vel_ok, tokens = [], [], [], [], [], [], []
        for token in sample["anns"]:
            ann = self.nusc.get("sample_annotation", token)
            name = category_to_detection_name(ann["category_name"])
            if name not in CLASSES:
                continue
            box = self.nusc.get_box(token)  # global frame -> reference ego frame, the devkit's way
            box.translate(-np.asarray(ref_pose["translation"]))
            box.rotate(to_ego)
            velocity = to_ego.rotate(self.nusc.box_velocity(token))
            known = bool(np.isfinite(velocity[:2]).all())
            rows.append([*box.center, *box.wlh, box.orientation.yaw_pitch_roll[0],
                         *(velocity[:2] if known else (0.0, 0.0))])
            labels.append(CLASSES.index(name))
            vis.append(int(ann["visibility_token"] or 0))
            lidar_n.append(ann["num_lidar_pts"])
            radar_n.append(ann["num_radar_pts"])
            vel_ok.append(known)
            tokens.append(token)
        visibility = {
            "visibility_token": torch.tensor(vis, dtype=torch.long),  # nuScenes: 1 = 0-40 % ... 4 = 80-100 %
            "num_lidar_pts": torch.tensor(lidar_n, dtype=torch.long),
            "num_radar_pts": torch.tensor(radar_n, dtype=torch.long),
            "velocity_known": torch.tensor(vel_ok, dtype=torch.bool),
            # The built-in world's keys: an approximate visible fraction, and whether the label counts (SimpleBEV
            # drops token 1).
            "camera_frac": torch.tensor([VISIBILITY_FRACTION.get(v, 0.0) for v in vis], dtype=torch.float32),
            "visible": torch.tensor([v != 1 for v in vis], dtype=torch.bool),
        }
        boxes = torch.tensor(rows, dtype=torch.float32).reshape(-1, 9)
        return boxes, torch.tensor(labels, dtype=torch.long), visibility, tokens


def add_cli_arguments(parser: argparse.ArgumentParser) -> None:
    """The nuScenes options of every command that takes ``--data nuscenes``."""
    group = parser.add_argument_group("nuScenes (with --data nuscenes)")
    group.add_argument("--dataroot", type=str, default=None,
                       help="folder holding samples/, sweeps/, maps/ and the version folder with the tables")
    group.add_argument("--version", type=str, default="v1.0-trainval", choices=VERSIONS,
                       help="nuScenes release")
    group.add_argument("--radar-sweeps", type=int, default=5, help="radar sweeps per sample (papers: 5)")
    group.add_argument("--lidar-sweeps", type=int, default=5, help="LiDAR sweeps per sample (papers: 5)")
    group.add_argument("--radar-filters", default="none", choices=pts.RADAR_FILTERS,
                       help="'none' keeps every radar return, 'default' applies the devkit's state filters")
    group.add_argument("--verify-files", action="store_true",
                       help="check that every file of the split exists before starting")


def dataset_from_args(args: argparse.Namespace, split: str, *, grid: BEVGrid | None = None,
                      image_size: tuple[int, int] | None = None,
                      modalities: Sequence[str] = MODALITIES) -> NuScenesDataset:
    """A :class:`NuScenesDataset` from :func:`add_cli_arguments`' options; ``grid``/``image_size`` usually
    come from the model config (default: the papers')."""
    if not getattr(args, "dataroot", None):
        raise ValueError("--dataroot is required with --data nuscenes (the folder with v1.0-*/ and samples/)")
    return NuScenesDataset(args.dataroot, args.version, split, grid or PAPER_GRID,
                           image_size or PAPER_IMAGE_SIZE, args.radar_sweeps, args.lidar_sweeps,
                           modalities=modalities,
                           radar_filters=args.radar_filters, verify_files=args.verify_files)
