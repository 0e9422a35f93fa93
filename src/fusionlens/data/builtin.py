"""The built-in world as a ``torch.utils.data.Dataset``, generated once and cached on disk in shards.

Interface::

    from fusionlens.data.builtin import BuiltinWorld, default_cache_dir
    ds = BuiltinWorld("train", size=1000, config=WorldConfig(), seed=0, cache_dir=None, shard_size=64,
                      workers=None, progress=True)        # generates missing shards on construction
    sample = ds[0]                                       # a fusionlens.data.sample.Sample
    loader = ds.loader(batch_size=4, shuffle=True, num_workers=2)   # batches = the DESIGN.md batch dict
    BuiltinWorld.collate                                 # = fusionlens.data.collate.collate_samples

Sample ``i`` of a split is ``fusionlens.world.generate_sample(config, seed, split, i)`` whatever ``size`` is, so
splits of different sizes share their shards. Layout: ``<cache>/world/<config-hash>-seed<seed>/manifest.json``
and ``<split>/shard-<start>-<stop>.pt`` (images stored as uint8), each with the SHA-256 of its bytes recorded at
write time in ``shard-<start>-<stop>.sha256`` (``sha256sum -c`` format). Shards are written atomically, so an
interrupted generation leaves only whole shards and the next run generates just the missing ones. Generation
verifies every existing shard against its checksum and regenerates a truncated or corrupted one (or one without a
checksum), listing it in ``repaired`` and in a warning; reading a shard whose bytes no longer match raises an error
naming its file and the fix. Generation workers end with the process that started them, even when it is killed.
The cache root is ``$FUSIONLENS_CACHE`` or ``~/.cache/fusionlens``. Shards are memory-mapped on load, so DataLoader
workers share pages instead of copies.
"""

from __future__ import annotations

import ctypes
import hashlib
import io
import json
import os
import signal
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from fusionlens.data.collate import batch_loader, collate_samples
from fusionlens.data.sample import Sample
from fusionlens.io import atomic_write_bytes, atomic_write_json, atomic_write_text, sha256_bytes, sha256_file
from fusionlens.world.config import WorldConfig
from fusionlens.world.generate import SPLITS, generate_sample

FORMAT_VERSION = 1
DEFAULT_SPLIT_SIZES: dict[str, int] = {"train": 1000, "val": 200, "test": 200}
_TENSOR_FIELDS = ("intrinsics", "cam_to_ego", "radar", "lidar", "bev_seg", "bev_valid", "bev_center",
                  "bev_offset", "boxes", "box_labels")


def default_cache_dir() -> Path:
    """``$FUSIONLENS_CACHE`` if set, else ``~/.cache/fusionlens``."""
    env = os.environ.get("FUSIONLENS_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "fusionlens"


def config_key(config: WorldConfig, seed: int) -> str:
    """Directory name identifying a world: a hash of the config and the seed."""
    blob = json.dumps({"format": FORMAT_VERSION, "config": config.to_dict()}, sort_keys=True, default=str)
    return f"{hashlib.sha1(blob.encode()).hexdigest()[:12]}-seed{int(seed)}"


def _pack(sample: Sample) -> dict[str, Any]:
    out: dict[str, Any] = {k: getattr(sample, k) for k in _TENSOR_FIELDS}
    imgs = sample.images
    out["images"] = None if imgs is None else imgs.clamp(0, 1).mul(255).round().to(torch.uint8)
    out["visibility"] = dict(sample.visibility)
    out["meta"] = sample.meta
    return out


def _unpack(row: dict[str, Any], config: WorldConfig) -> Sample:
    imgs = row["images"]
    return Sample(images=None if imgs is None else imgs.float().div(255.0), visibility=dict(row["visibility"]),
                  grid=config.grid, meta=dict(row["meta"]), **{k: row[k] for k in _TENSOR_FIELDS})


def checksum_path(shard: Path) -> Path:
    """Where the SHA-256 of ``shard`` is recorded."""
    return shard.with_suffix(".sha256")


def _write_shard(args: tuple[dict[str, Any], int, str, int, int, str]) -> int:
    """Generate samples [start, stop) of a split and write them atomically, then their checksum (runs in worker
    processes). The checksum is written second: a shard without one is taken as unfinished and made again."""
    cfg_dict, seed, split, start, stop, path = args
    cfg = WorldConfig.from_dict(cfg_dict)
    torch.set_num_threads(1)
    rows = [_pack(generate_sample(cfg, seed, split, i)) for i in range(start, stop)]
    buffer = io.BytesIO()
    torch.save({"format": FORMAT_VERSION, "split": split, "seed": seed, "start": start, "stop": stop,
                "samples": rows}, buffer)
    data = buffer.getvalue()
    atomic_write_bytes(path, data)
    atomic_write_text(checksum_path(Path(path)), f"{sha256_bytes(data)}  {Path(path).name}\n")
    return stop - start


def _recorded_sha256(shard: Path) -> str | None:
    try:
        return checksum_path(shard).read_text().split()[0]
    except (OSError, IndexError):
        return None


def shard_problem(shard: Path) -> str | None:
    """Why the shard file ``shard`` cannot be trusted (``None``: it matches the checksum recorded at write time)."""
    recorded = _recorded_sha256(shard)
    if recorded is None:
        return "no checksum recorded (an interrupted or older generation)"
    if sha256_file(shard) != recorded:
        return (f"truncated or corrupted ({shard.stat().st_size} bytes; its SHA-256 differs from the one in "
                f"{checksum_path(shard).name})")
    return None


_PR_SET_PDEATHSIG = 1


def _watch_parent(parent: int, parent_ppid: int) -> None:
    """Poll for the death of ``parent``: gone, or no longer ours (PermissionError: its pid was reused)."""
    while True:
        time.sleep(0.5)
        try:
            os.kill(parent, 0)
        except OSError:
            os._exit(1)
        if os.getppid() != parent_ppid:  # re-parented: the parent died (it may linger as a zombie)
            os._exit(1)


def _die_with_parent(parent: int) -> None:
    """Pool initializer: end this worker when ``parent`` (the process that runs the pool) dies -- even by SIGKILL,
    which leaves it no chance to shut the pool down and would leave workers blocked forever on their queue. On
    Linux the kernel signals the worker (``prctl(PR_SET_PDEATHSIG)``); a polling thread covers other systems."""
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
        except (OSError, AttributeError):
            pass
    ppid = os.getppid()
    if ppid == parent:  # started directly by the parent (fork/spawn); with a forkserver it is not
        try:
            os.kill(parent, 0)
        except ProcessLookupError:  # died before the signal was armed
            os._exit(1)
    threading.Thread(target=_watch_parent, args=(parent, ppid), daemon=True, name="watch-parent").start()


def _check_writable(directory: Path) -> None:
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".probe-"):
            pass
    except OSError as exc:
        raise ValueError(f"cache_dir {directory} is not writable ({exc.strerror or exc}); "
                         "pass another cache_dir or set FUSIONLENS_CACHE") from exc


class BuiltinWorld(Dataset):
    """Split ``split`` (``train``/``val``/``test``) of the built-in world, ``size`` samples long."""

    collate: Callable[..., dict[str, Any]] = staticmethod(collate_samples)

    def __init__(self, split: str = "train", size: int | None = None, *, config: WorldConfig | None = None,
                 seed: int = 0, cache_dir: str | os.PathLike[str] | None = None, shard_size: int = 64,
                 generate: bool = True, workers: int | None = None, progress: bool = True) -> None:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        size = DEFAULT_SPLIT_SIZES[split] if size is None else size
        if int(size) <= 0:
            raise ValueError(f"size must be a positive number of samples, got {size}")
        if int(shard_size) <= 0:
            raise ValueError(f"shard_size must be positive, got {shard_size}")
        if int(seed) < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        if workers is not None and int(workers) < 0:
            raise ValueError(f"workers must be >= 0, got {workers}")
        self.split, self.size, self.seed, self.shard_size = split, int(size), int(seed), int(shard_size)
        self.config = config if config is not None else WorldConfig()
        base = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
        self.root = base / "world" / config_key(self.config, self.seed)
        self.split_dir = self.root / split
        self._open: dict[int, list[dict[str, Any]]] = {}
        self._verified: set[int] = set()  # starts of shards checked against their checksum in this process
        self.repaired: list[tuple[Path, str]] = []
        if generate:
            self.generate(workers=workers, progress=progress)

    # -- shards ---------------------------------------------------------------------------------------------
    def shard_ranges(self) -> list[tuple[int, int]]:
        return [(s, min(s + self.shard_size, self.size)) for s in range(0, self.size, self.shard_size)]

    def shard_path(self, start: int, stop: int) -> Path:
        return self.split_dir / f"shard-{start:06d}-{stop:06d}.pt"

    def missing_shards(self) -> list[tuple[int, int]]:
        return [r for r in self.shard_ranges() if not self.shard_path(*r).is_file()]

    def damaged_shards(self) -> dict[tuple[int, int], str]:
        """Existing shards whose bytes do not match their recorded checksum: range -> what is wrong."""
        found = {}
        for r in self.shard_ranges():
            path = self.shard_path(*r)
            if path.is_file():
                problem = shard_problem(path)
                if problem is None:
                    self._verified.add(r[0])
                else:
                    found[r] = problem
        return found

    def generate(self, workers: int | None = None, progress: bool = True) -> int:
        """Generate every missing shard and regenerate every damaged one (in ``workers`` processes; 0 = in this
        process); the damaged ones are listed in ``self.repaired`` and a warning. Returns samples made."""
        damaged = self.damaged_shards()
        self.repaired = [(self.shard_path(*r), why) for r, why in damaged.items()]
        if damaged:
            warnings.warn("regenerating damaged cache shard(s): "
                          + "; ".join(f"{p}: {why}" for p, why in self.repaired), stacklevel=2)
        missing = sorted([*self.missing_shards(), *damaged])
        if not missing:
            return 0
        _check_writable(self.split_dir)
        self._write_manifest()
        cfg = self.config.to_dict()
        jobs = [(cfg, self.seed, self.split, a, b, str(self.shard_path(a, b))) for a, b in missing]
        total = sum(b - a for a, b in missing)
        n_workers = min(len(jobs), os.cpu_count() or 1, 4) if workers is None else min(int(workers), len(jobs))
        bar = tqdm(total=total, desc=f"world {self.split}", unit="sample", disable=not progress)
        try:
            if n_workers <= 1:
                for job in jobs:
                    bar.update(_write_shard(job))
            else:
                with ProcessPoolExecutor(max_workers=n_workers, initializer=_die_with_parent,
                                         initargs=(os.getpid(),)) as pool:
                    for done in pool.map(_write_shard, jobs):
                        bar.update(done)
        finally:
            bar.close()
        self._verified.update(a for a, _ in missing)
        return total

    def _write_manifest(self) -> None:
        path = self.root / "manifest.json"
        want = {"format": FORMAT_VERSION, "seed": self.seed, "config": self.config.to_dict()}
        if path.is_file():
            try:
                have = json.loads(path.read_text())
            except (OSError, json.JSONDecodeError) as exc:
                raise ValueError(f"corrupt cache manifest {path}: {exc}; delete {self.root} to regenerate") from exc
            if json.loads(json.dumps(want, default=str)) != have:
                raise ValueError(f"cache manifest {path} describes another world; delete {self.root}")
            return
        atomic_write_json(path, want)

    def _load_shard(self, k: int) -> list[dict[str, Any]]:
        if k not in self._open:
            start, stop = self.shard_ranges()[k]
            path = self.shard_path(start, stop)
            if not path.is_file():
                raise FileNotFoundError(f"cache shard {path} is missing; construct the dataset with generate=True")
            if start not in self._verified:
                problem = shard_problem(path)
                if problem is not None:
                    raise ValueError(f"corrupt cache shard {path}: {problem}; repair it with fusionlens world "
                                     f"generate --split {self.split} --seed {self.seed} (same world options) or "
                                     "by constructing the dataset with generate=True")
                self._verified.add(start)
            try:
                data = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except Exception as exc:  # any unpickling/zip error means the file is damaged
                raise ValueError(f"corrupt cache shard {path}: {exc}; delete it to regenerate") from exc
            if (not isinstance(data, dict) or data.get("format") != FORMAT_VERSION
                    or (data.get("start"), data.get("stop")) != (start, stop)
                    or len(data.get("samples", ())) != stop - start):
                raise ValueError(f"corrupt cache shard {path}: unexpected contents; delete it to regenerate")
            self._open[k] = data["samples"]
        return self._open[k]

    # -- Dataset --------------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> Sample:
        if not -self.size <= index < self.size:
            raise IndexError(f"index {index} out of range for {self.split} of size {self.size}")
        index %= self.size
        k = index // self.shard_size
        return _unpack(self._load_shard(k)[index - k * self.shard_size], self.config)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_open"] = {}  # each DataLoader worker opens (memory-maps) shards itself
        return state

    def loader(self, batch_size: int = 4, shuffle: bool = False, num_workers: int = 0, seed: int = 0,
               drop_last: bool = False) -> DataLoader:
        """A DataLoader yielding the DESIGN.md batch dict (deterministic order for a given ``seed``; see
        :func:`~fusionlens.data.collate.batch_loader`)."""
        return batch_loader(self, batch_size=batch_size, shuffle=shuffle, seed=seed, drop_last=drop_last,
                            num_workers=num_workers)
