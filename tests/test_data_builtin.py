"""The cached built-in dataset: round trip, resume after an interruption, corrupt shards, bad settings."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from fusionlens.data.builtin import BuiltinWorld, config_key, default_cache_dir
from fusionlens.world import WorldConfig, generate_sample

CFG = WorldConfig(image_size=(16, 28), lidar_azimuth_steps=90)


def test_round_trip_equals_direct_generation(tmp_path: Path) -> None:
    ds = BuiltinWorld("val", size=3, config=CFG, cache_dir=tmp_path, shard_size=2, workers=0, progress=False)
    assert len(ds) == 3 and len(list(ds.split_dir.glob("shard-*.pt"))) == 2
    direct = generate_sample(CFG, 0, "val", 2)
    cached = ds[2]
    assert torch.allclose(cached.images, direct.images, atol=1 / 255)  # images are stored as uint8
    for name in ("radar", "lidar", "bev_seg", "bev_center", "boxes", "box_labels"):
        assert torch.equal(getattr(cached, name), getattr(direct, name)), name
    assert cached.meta == direct.meta and cached.grid == CFG.grid
    batch = next(iter(ds.loader(batch_size=2, num_workers=0)))
    assert batch["images"].shape == (2, 6, 3, 16, 28) and batch["radar_valid"].dtype == torch.bool
    with pytest.raises(IndexError, match="index 3 out of range for val of size 3"):
        ds[3]


def test_interrupted_generation_resumes_only_missing_shards(tmp_path: Path) -> None:
    ds = BuiltinWorld("train", size=4, config=CFG, cache_dir=tmp_path, shard_size=2, workers=0, progress=False)
    first, second = ds.shard_path(0, 2), ds.shard_path(2, 4)
    second.unlink()  # as if the run had been killed before writing it
    (second.parent / f".{second.name}.xyz.tmp").write_bytes(b"partial")  # a leftover temporary
    stamp = first.stat().st_mtime_ns
    again = BuiltinWorld("train", size=4, config=CFG, cache_dir=tmp_path, shard_size=2, workers=0,
                         progress=False)
    assert second.is_file() and first.stat().st_mtime_ns == stamp
    assert torch.equal(again[3].lidar, generate_sample(CFG, 0, "train", 3).lidar)


def test_corrupt_shard_error_names_the_file(tmp_path: Path) -> None:
    ds = BuiltinWorld("test", size=2, config=CFG, cache_dir=tmp_path, shard_size=2, workers=0, progress=False)
    path = ds.shard_path(0, 2)
    path.write_bytes(path.read_bytes()[:100])
    fresh = BuiltinWorld("test", size=2, config=CFG, cache_dir=tmp_path, shard_size=2, generate=False)
    with pytest.raises(ValueError, match=str(path.name)):
        fresh[0]


def test_unwritable_cache_dir_is_a_clear_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(ValueError, match="cache_dir"):
        BuiltinWorld("val", size=1, config=CFG, cache_dir=blocker, workers=0, progress=False)


def test_bad_arguments_and_cache_location(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for kwargs, match in (({"split": "dev"}, "split"), ({"size": 0}, "size"), ({"shard_size": 0}, "shard_size")):
        with pytest.raises(ValueError, match=match):
            BuiltinWorld(cache_dir=tmp_path, config=CFG, **kwargs)
    monkeypatch.setenv("FUSIONLENS_CACHE", str(tmp_path / "c"))
    assert default_cache_dir() == tmp_path / "c"
    assert config_key(CFG, 0) != config_key(CFG.with_(image_size=(16, 32)), 0)
    assert config_key(CFG, 0) != config_key(CFG, 1)
    assert os.fspath(default_cache_dir())
