"""``list[Sample]`` -> the batch dict of ``docs/DESIGN.md`` (what models and losses consume).

Point clouds differ in size between samples, so they are zero-padded to the largest in the batch (at
least ``min_points`` rows, so that a batch with no returns still has a well-formed tensor) and come with a
bool mask of the real rows. A modality that every sample lacks is ``None`` in the batch; one that only some
samples lack is an error (the batch could not say which samples had it).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from fusionlens.data.sample import LIDAR_FIELDS, RADAR_FIELDS, Sample


def pad_points(
    clouds: Sequence[torch.Tensor], width: int, min_points: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack ``(Ni, width)`` clouds into ``(B, P, width)`` zero-padded, plus a ``(B, P)`` real-row mask."""
    for i, cloud in enumerate(clouds):
        if cloud.ndim != 2 or cloud.shape[1] != width:
            raise ValueError(f"point cloud {i} must be (N, {width}), got shape {tuple(cloud.shape)}")
    if min_points < 1:
        raise ValueError(f"min_points must be >= 1, got {min_points}")
    p = max([min_points] + [c.shape[0] for c in clouds])
    out = torch.zeros(len(clouds), p, width, dtype=torch.float32)
    valid = torch.zeros(len(clouds), p, dtype=torch.bool)
    for i, cloud in enumerate(clouds):
        out[i, : cloud.shape[0]] = cloud
        valid[i, : cloud.shape[0]] = True
    return out, valid


def _all_or_none(samples: Sequence[Sample], name: str) -> bool:
    present = [getattr(s, name) is not None for s in samples]
    if any(present) and not all(present):
        missing = [i for i, p in enumerate(present) if not p]
        raise ValueError(f"samples {missing} lack {name!r} while others in the batch have it")
    return all(present)


def collate_samples(samples: Sequence[Sample], min_points: int = 1) -> dict[str, Any]:
    """Batch ``samples`` (all on the same grid and camera set) into the design's batch dict.

    Keys: ``images`` (B, Ncam, 3, H, W) or None, ``intrinsics``, ``cam_to_ego``, ``radar`` (B, Pr, 19) with
    ``radar_valid``, ``lidar`` (B, Pl, 5) with ``lidar_valid`` (both None when absent), ``bev_seg``,
    ``bev_valid``, ``bev_center`` (B, 1, X, Y), ``bev_offset`` (B, 2, X, Y), per-sample lists ``boxes``,
    ``box_labels``, ``visibility``, ``meta``, and ``grid`` (the shared :class:`BEVGrid`).
    """
    if len(samples) == 0:
        raise ValueError("cannot collate an empty list of samples")
    grid = samples[0].grid
    for i, s in enumerate(samples):
        if s.grid != grid:
            raise ValueError(f"sample {i} has grid {s.grid} but sample 0 has {grid}; batch one grid at once")
    batch: dict[str, Any] = {"grid": grid}
    if _all_or_none(samples, "images"):
        shapes = {tuple(s.images.shape) for s in samples}  # type: ignore[union-attr]
        if len(shapes) != 1:
            raise ValueError(f"images differ in shape within the batch: {sorted(shapes)}")
        batch["images"] = torch.stack([s.images for s in samples]).float()  # type: ignore[misc]
    else:
        batch["images"] = None
    batch["intrinsics"] = torch.stack([s.intrinsics for s in samples]).float()
    batch["cam_to_ego"] = torch.stack([s.cam_to_ego for s in samples]).float()
    for name, width in (("radar", len(RADAR_FIELDS)), ("lidar", len(LIDAR_FIELDS))):
        if _all_or_none(samples, name):
            clouds = [getattr(s, name) for s in samples]
            batch[name], batch[f"{name}_valid"] = pad_points(clouds, width, min_points)
        else:
            batch[name], batch[f"{name}_valid"] = None, None
    batch["bev_seg"] = torch.stack([s.bev_seg for s in samples])[:, None].float()
    batch["bev_valid"] = torch.stack([s.bev_valid for s in samples])[:, None].float()
    batch["bev_center"] = torch.stack([s.bev_center for s in samples])[:, None].float()
    batch["bev_offset"] = torch.stack([s.bev_offset for s in samples]).float()
    batch["boxes"] = [s.boxes for s in samples]
    batch["box_labels"] = [s.box_labels for s in samples]
    batch["visibility"] = [s.visibility for s in samples]
    batch["meta"] = [s.meta for s in samples]
    return batch


def batch_loader(dataset: Dataset, batch_size: int = 4, shuffle: bool = False, seed: int = 0,
                 drop_last: bool = False, num_workers: int = 0) -> DataLoader:
    """A DataLoader over a dataset of :class:`Sample` yielding the DESIGN.md batch dict (:func:`collate_samples`).

    The shuffle order comes from a generator seeded with ``seed`` alone (not the global RNG): the same seed gives
    the same batches, and each pass over the loader draws the next permutation of that generator.
    """
    gen = torch.Generator().manual_seed(int(seed))
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, num_workers=num_workers,
                      collate_fn=collate_samples, generator=gen, drop_last=drop_last,
                      persistent_workers=num_workers > 0)
