"""``fusionlens reproduce lmd``: the LMD paper's tables on the built-in world, resumable.

Every measurement is one *cell* -- (model pair, seed, method, mode) for the perturbation metrics of appendix D.2,
(pair, seed, method) for ground-truth attribution -- a JSON file under ``<out>/cells``
(:class:`~fusionlens.experiments.cells.CellStore`); a rerun skips the cells that exist, so an interrupted run
resumes. Pairs are spelled ``camera-radar`` (:func:`fusionlens.modalities.combination_name`).
:func:`fusionlens.experiments.lmd_report.summarise` turns the cells into the paper's tables.

The models come from the reference-model cache (:mod:`fusionlens.experiments.reference_models`, filled by
``benchmarks/train_reference.py``). Seeds: with per-seed checkpoints ``tiny_<pair>_seed<s>.pt`` each seed is a
separately trained model; otherwise all seeds share ``tiny_<pair>.pt`` and a seed draws another set of anchor
samples (the tables say which).
"""

from __future__ import annotations

import contextlib
import hashlib
import random
import time
from collections import Counter
from collections.abc import Collection
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from fusionlens.evaluate.attribution import attribute_objects, summarise_attribution
from fusionlens.evaluate.baselines import feature_means, make_method
from fusionlens.evaluate.separation import (
    SampleCache,
    pairing_offsets,
    perturbation_metrics,
)
from fusionlens.experiments.cells import CellStore
from fusionlens.experiments.reference_models import checkpoint_name
from fusionlens.modalities import combination_name, parse_modalities
from fusionlens.train.distributed import DistInfo, all_gather_objects, barrier

ABLATION = {"lmd:none": "Baseline (no linearization)", "naive": "Naive zero-out",
            "lmd:activations-only": "Activation only",
            "lmd:norms-only": "Normalization only", "lmd:paper": "LMD (ratio)"}
BN_NORM = {"bn-uniform+norm-identity": "Uniform-Identity", "bn-identity+norm-identity": "Identity-Identity",
           "bn-identity+norm-uniform": "Identity-Uniform", "bn-identity+norm-ratio": "Identity-Ratio"}
SPLITTING = {"lmd:sum-splitting": "Sum-Splitting", "lmd:ratio-splitting": "Ratio-Splitting"}
SHAP = {"shapley": "SHAP (exact, zero)", "shapley-mean": "SHAP (exact, mean)", "lmd+shap": "LMD + SHAP (zero)",
        "captum-sampling": "Captum ShapleyValueSampling", "captum-ablation": "Captum FeatureAblation"}
ATTRIBUTION = ("lmd:paper", "naive", "shapley", "lmd+shap", "captum-ablation", "captum-sampling")
# no frozen mode: nothing linearized (lmd:none has no coefficients to freeze; its two modes measured identical)
RANDOM_METHODS = ("shapley", "shapley-mean", "captum-sampling", "captum-ablation", "naive", "lmd:none")
# frozen only: recomputed LMD+SHAP is the recomputed LMD row (Shapley of an affine system = its components; tested)
FROZEN_ONLY = ("lmd+shap", "lmd+shap-mean")


@dataclass
class LMDReproduceConfig:
    out_dir: str = "out/reproduce/lmd"
    checkpoints: str = "out/checkpoints"
    pairs: tuple[str, ...] = ("camera-radar", "camera-lidar", "camera-radar-lidar")  # any parse_modalities spelling
    seeds: tuple[int, ...] = (0, 1, 2)
    methods: tuple[str, ...] = (*ABLATION, *(f"lmd:{k}" for k in BN_NORM if k != "bn-identity+norm-ratio"),
                                *SPLITTING, "shapley", "lmd+shap")
    modes: tuple[str, ...] = ("frozen", "recomputed")
    attribution_methods: tuple[str, ...] = ATTRIBUTION[:5]  # captum-sampling: 25 permutations x (M+1) forwards
    val_size: int = 128  # N; partners are k + s*j mod N (128: the reference models' validation cache)
    anchors: int = 6  # anchor samples per seed
    count: int = 12
    stride: int | None = None  # default N // 13
    attribution_samples: int = 16  # samples per seed for ground-truth attribution
    data: str = "builtin"  # or "synthetic" (smoke runs and tests; it has no visibility truth for attribution)
    data_seed: int = 0
    only_pairs_methods: dict[str, tuple[str, ...]] = field(default_factory=dict)  # pair -> methods subset

    def __post_init__(self) -> None:
        self.pairs = tuple(_pair(p) for p in self.pairs)
        self.only_pairs_methods = {_pair(p): tuple(m) for p, m in self.only_pairs_methods.items()}

    def check(self) -> None:
        self.__post_init__()  # fields set after construction (the CLI's --pair-methods) get the one spelling too
        if not self.seeds:
            raise ValueError("seeds: give at least one seed")
        if self.anchors < 1 or self.anchors > self.val_size:
            raise ValueError(f"anchors must be in [1, val_size={self.val_size}], got {self.anchors}")
        pairing_offsets(self.val_size, self.count, self.stride)  # too few samples -> a clear error now
        extra = [s for methods in self.only_pairs_methods.values() for s in methods]
        for spec in (*self.methods, *extra, *self.attribution_methods):
            make_method(spec, means={} if spec.endswith("-mean") else None)  # unknown names fail before work
        if self.data not in ("builtin", "synthetic"):
            raise ValueError(f"data must be 'builtin' or 'synthetic', got {self.data!r}")
        bad = [m for m in self.modes if m not in ("frozen", "recomputed")]
        if bad:
            raise ValueError(f"modes: unknown {bad}")


def _pair(text: str) -> str:
    """The one spelling of a pair of modalities; ``ValueError`` naming the setting otherwise."""
    try:
        pair = combination_name(text)
    except ValueError as exc:
        raise ValueError(f"pairs: {exc}") from None
    if "-" not in pair:
        raise ValueError(f"pairs: {text!r} names one modality; the LMD tables compare two or more")
    return pair


def _spec_id(spec: str) -> str:
    return spec.replace(":", "-").replace("+", "plus")


class LMDRunner:
    """Computes the missing cells; under torchrun every rank takes part in each cell (anchors / samples sharded)
    and rank 0 writes it, so the cells equal a single-process run."""

    def __init__(self, config: LMDReproduceConfig, progress: bool = True, info: DistInfo | None = None) -> None:
        config.check()
        self.cfg, self.progress, self.info = config, progress, info or DistInfo()
        self.root = Path(config.out_dir)
        self.store = CellStore(self.root / "cells")
        self._reads = _CheckpointReads()

    def checkpoint(self, pair: str, seed: int) -> tuple[Path, bool]:
        """The checkpoint for ``pair`` at ``seed`` and whether it is a per-seed model."""
        base = Path(self.cfg.checkpoints)
        per_seed = base / checkpoint_name(pair, seed=seed)
        if per_seed.is_file():
            return self._of_pair(pair, per_seed), True
        shared = base / checkpoint_name(pair)
        if not shared.is_file():
            mods = ",".join(parse_modalities(pair))
            raise FileNotFoundError(f"no checkpoint {shared} (train it: fusionlens train --preset tiny --modalities "
                                    f"{mods} --out {shared}, or benchmarks/train_reference.py)")
        # the reference checkpoint is itself the model trained with its own seed (0 for make reference-models)
        trained_with = (self._reads.get(shared, weights=False).train_config or {}).get("seed")
        return self._of_pair(pair, shared), trained_with == seed

    def _of_pair(self, pair: str, path: Path) -> Path:
        """``path``, once it is known to hold a model of exactly ``pair``'s modalities (another pair's model under
        this name would only fail deep inside the metrics, on a missing modality's column)."""
        has, want = self._reads.get(path, weights=False).modalities, parse_modalities(pair)
        if set(has) != set(want):
            raise ValueError(f"checkpoint {path} holds a {combination_name(has)} model, not {combination_name(want)} "
                             f"(--pairs {pair}); retrain it: fusionlens train --preset tiny --modalities "
                             f"{','.join(want)} --out {path}")
        return path

    def fingerprint(self, path: str | Path) -> str:
        """SHA-1 of a checkpoint file (the cells' ``checkpoint_sha1``); no second read of one this runner read."""
        return self._reads.sha1(Path(path))

    def cells(self) -> list[tuple[str, int, str, str]]:
        """Seed-major order, so that an interrupted run already holds whole seeds of every pair."""
        out = []
        for seed in self.cfg.seeds:
            for pair in self.cfg.pairs:
                for spec in self.cfg.only_pairs_methods.get(pair, self.cfg.methods):
                    modes = ("recomputed",) if spec in RANDOM_METHODS else self.cfg.modes
                    modes = tuple(m for m in modes if m == "frozen") if spec in FROZEN_ONLY else modes
                    out += [(pair, seed, spec, mode) for mode in modes]
                out += [(pair, seed, f"attribution:{spec}", "-") for spec in self.cfg.attribution_methods]
        return out

    def done(self, cell: tuple[str, int, str, str], fingerprints: dict[tuple[str, int], str]) -> bool:
        """A cell counts as done when its file exists and was measured on the checkpoint that is there now
        (a retrained model makes its cells stale)."""
        stored = self.store.get(self._rel(*cell))
        if stored is None:
            return False
        key = (cell[0], cell[1])
        if key not in fingerprints:
            try:
                fingerprints[key] = self._reads.get(self.checkpoint(*key)[0], weights=False).sha1
            except FileNotFoundError:
                fingerprints[key] = ""
        return stored.get("checkpoint_sha1") == fingerprints[key]

    @staticmethod
    def _rel(pair: str, seed: int, spec: str, mode: str) -> str:
        return f"{pair}/seed{seed}/{_spec_id(spec)}__{mode}.json"

    def run(self) -> None:
        from fusionlens.train.checkpoint import load_model
        from fusionlens.train.data import open_dataset

        # every rank must see the same list: decide on rank 0's view of the disk
        prints: dict[tuple[str, int], str] = {}
        todo = all_gather_objects(self.info, [c for c in self.cells() if not self.done(c, prints)])[0]
        # each checkpoint is read once: the weights read for the seed check or the fingerprint are kept (only) until
        # the last (pair, seed) that loads them
        files: dict[tuple[str, int], tuple[Path, bool]] = {}
        for key in dict.fromkeys(cell[:2] for cell in todo):
            with contextlib.suppress(FileNotFoundError):  # fails when its turn comes; a wrong file fails now
                files[key] = self.checkpoint(*key)
        uses = Counter(str(path) for path, _ in files.values())
        self._reads.drop_weights(keep=uses)
        if not todo:
            return
        data = open_dataset(self.cfg.data, "val", size=self.cfg.val_size, seed=self.cfg.data_seed,
                            progress=self.progress and self.info.is_main)
        if len(data) != self.cfg.val_size:
            raise ValueError(f"the {self.cfg.data} val split has {len(data)} samples, not val_size={self.cfg.val_size}")
        show = self.progress and self.info.is_main
        loaded: dict[tuple[str, int], Any] = {}
        for pair, seed, spec, mode in tqdm(todo, desc="reproduce lmd", disable=not show):
            if (pair, seed) not in loaded:
                loaded.clear()
                path, per_seed = files.get((pair, seed)) or self.checkpoint(pair, seed)
                read = self._reads.get(path)
                model, _ = load_model(path, payload=read.payload)
                uses[str(path)] -= 1
                self._reads.drop_weights(keep={p for p, n in uses.items() if n})
                anchors_n = self.cfg.anchors * (1 + self.cfg.count)
                loaded[(pair, seed)] = (model, str(path), per_seed,
                                        {"samples": SampleCache(model.describe().subject(), data, capacity=anchors_n),
                                         "sha1": read.sha1})
            model, ckpt, per_seed, cache = loaded[(pair, seed)]
            rng = random.Random(seed)
            start = time.perf_counter()
            record: dict[str, Any] = {"pair": pair, "seed": seed, "method": spec, "mode": mode, "checkpoint": ckpt,
                                      "per_seed_model": per_seed, "val_size": self.cfg.val_size,
                                      "checkpoint_sha1": cache["sha1"]}
            if spec.startswith("attribution:"):
                method_spec = spec.split(":", 1)[1]
                indices = sorted(rng.sample(range(self.cfg.val_size), self.cfg.attribution_samples))
                rows = attribute_objects(model, data, make_method(method_spec, means=self._means(model, data, cache)),
                                         indices=indices, info=self.info, progress=False)
                record["samples"] = indices
                record["objects"] = [asdict(r) | {"correct": r.correct} for r in rows]
                record["summary"] = summarise_attribution(rows, model.modalities)
            else:
                anchors = sorted(rng.sample(range(self.cfg.val_size), self.cfg.anchors))
                method = make_method(spec, mode=mode, means=self._means(model, data, cache))
                res = perturbation_metrics(model, data, method, count=self.cfg.count, stride=self.cfg.stride,
                                           anchors=anchors, info=self.info, progress=False,
                                           cache=cache["samples"])
                record["result"] = res.to_dict()
            record["seconds"] = time.perf_counter() - start  # includes preparing samples not yet cached
            if self.info.is_main:
                self.store.put(self._rel(pair, seed, spec, mode), record)
        barrier(self.info)

    def _means(self, model: Any, data: Any, cache: dict[str, Any]) -> dict[str, torch.Tensor] | None:
        if any(s.endswith("-mean") for s in (*self.cfg.methods, *self.cfg.attribution_methods)):
            if "means" not in cache:
                subject = model.describe().subject()
                cache["means"] = feature_means(subject, data, list(range(min(32, self.cfg.val_size))))
            return cache["means"]
        return None


@dataclass
class _Read:
    stamp: tuple[int, int]  # size and mtime of the file when read
    sha1: str
    train_config: dict[str, Any] | None
    modalities: tuple[str, ...]
    payload: dict[str, Any] | None  # what load_model needs; None once no cell left in the run loads it


class _CheckpointReads:
    """One read of each checkpoint file per run: its SHA-1, training config and weights come from the same bytes.
    Entries are checked against the file's size and mtime, so a checkpoint replaced meanwhile is read again."""

    def __init__(self) -> None:
        self._files: dict[str, _Read] = {}

    def get(self, path: Path, weights: bool = True) -> _Read:
        from fusionlens.train.checkpoint import read_checkpoint

        stat = path.stat()
        stamp = (stat.st_size, stat.st_mtime_ns)
        entry = self._files.get(str(path))
        if entry is None or entry.stamp != stamp or (weights and entry.payload is None):
            payload, sha1 = read_checkpoint(path)
            slim = {k: payload.get(k) for k in ("format", "model_config", "train_config", "model")}  # no optimizer
            modalities = tuple((payload.get("model_config") or {}).get("modalities", ()))
            entry = self._files[str(path)] = _Read(stamp, sha1, payload.get("train_config"), modalities, slim)
        return entry

    def sha1(self, path: Path) -> str:
        entry = self._files.get(str(path))
        if entry is not None:
            stat = path.stat()
            if entry.stamp == (stat.st_size, stat.st_mtime_ns):
                return entry.sha1
        return file_sha1(path)

    def drop_weights(self, keep: Collection[str] = ()) -> None:
        for name, entry in self._files.items():
            if name not in keep:
                entry.payload = None


def file_sha1(path: Path) -> str:
    """SHA-1 of a file, read in 1 MiB blocks (the cells' ``checkpoint_sha1``)."""
    digest = hashlib.sha1()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
