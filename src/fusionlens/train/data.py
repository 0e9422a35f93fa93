"""Datasets by name for the command line: ``builtin`` (the simulated world), ``synthetic`` (tests and smoke runs)
and ``nuscenes`` (real data through nuscenes-devkit)."""

from __future__ import annotations

import importlib
from typing import Any

from torch.utils.data import Dataset

DATA_KINDS: tuple[str, ...] = ("builtin", "synthetic", "nuscenes")
SPLITS: tuple[str, ...] = ("train", "val", "test")


def open_dataset(
    kind: str,
    split: str,
    *,
    size: int | None = None,
    seed: int = 0,
    root: str | None = None,
    progress: bool = True,
    **options: Any,
) -> Dataset:
    """The ``split`` of dataset ``kind`` (``size`` samples where the source is generated)."""
    if kind not in DATA_KINDS:
        raise ValueError(f"--data must be one of {list(DATA_KINDS)}, got {kind!r}")
    if split not in SPLITS:
        raise ValueError(f"--split must be one of {list(SPLITS)}, got {split!r}")
    if size is not None and size <= 0:
        raise ValueError(f"dataset size must be positive, got {size}")
    if kind == "synthetic":
        from fusionlens.train.synthetic import SyntheticDataset

        offset = {"train": 0, "val": 1, "test": 2}[split]
        return SyntheticDataset(size or 64, seed=seed * 3 + offset)
    if kind == "nuscenes":
        nus = importlib.import_module("fusionlens.data.nuscenes")
        if root is None:
            raise ValueError("--data nuscenes needs --dataroot (the nuScenes folder)")
        return nus.NuScenesDataset(root, split=split, **options)
    from fusionlens.data.builtin import BuiltinWorld

    return BuiltinWorld(split, size=size, seed=seed, progress=progress, **options)
