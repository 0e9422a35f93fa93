"""AlterMOMA's KITTI tables (Table 2: Car; appendix E Table 6: Car, Pedestrian, Cyclist) on the world's KITTI
export: the AVOD-style detector pruned by AlterMOMA and the baselines, AP-3D and AP-BEV at easy / moderate / hard.

Protocol: a reference detector is trained on the export's train split (cached as ``<out>/reference_seed<k>.pt``;
by default one, seed 0, that every pruning seed starts from, as the paper prunes one trained model); each
(method, sparsity, seed) cell prunes a copy with the backbones (the two feature pyramids) as the modality groups
and the RPN + second stage as fusion (unstructured, one global threshold), fine-tunes it with Adam at the paper's
learning rate (section 4.2) and evaluates it on the val split by the KITTI rules (:mod:`fusionlens.evaluate.kitti`).
Cells are JSON files under ``<out>/cells``; a cell already there is read, not recomputed, and the folder's
protocol is recorded and checked (:func:`fusionlens.io.claim_settings`).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torchvision.ops import roi_align

from fusionlens.data.kitti import KittiDataset
from fusionlens.io import atomic_write_json, claim_settings
from fusionlens.models.avod import avod_preset
from fusionlens.models.avod_ops import roi_align_torch
from fusionlens.train.avod import avod_loss, collate_kitti, evaluate_avod, load_avod, train_avod

PAPER_METHODS: dict[str, str] = {"imp": "IMP", "synflow": "SynFlow", "snip": "SNIP", "prospr": "ProsPr",
                                 "altermoma": "AlterMOMA"}
# Table 6 (Table 2 = its Car rows): class -> method -> sparsity -> (AP-3D e/m/h, AP-BEV e/m/h); "none" unpruned.
_T6 = {
    "Car": {"none": (82.4, 72.2, 66.5, 89.4, 83.9, 78.7),
            "imp": ((65.8, 57.7, 51.3, 69.2, 64.6, 59.7), (52.1, 45.7, 43.2, 59.6, 54.2, 51.7)),
            "synflow": ((74.2, 65.7, 60.2, 79.5, 75.3, 70.3), (64.5, 54.7, 48.1, 73.5, 67.6, 64.4)),
            "snip": ((73.5, 64.9, 59.8, 79.1, 75.8, 69.6), (62.7, 52.3, 45.8, 72.4, 66.9, 63.7)),
            "prospr": ((78.9, 69.6, 62.1, 85.2, 79.1, 75.7), (74.2, 63.4, 59.1, 81.2, 75.1, 71.9)),
            "altermoma": ((80.5, 70.2, 63.2, 87.2, 81.5, 77.9), (77.4, 68.2, 62.3, 85.3, 79.9, 75.8))},
    "Pedestrian": {"none": (50.5, 43.2, 40.1, 58.1, 50.7, 47.2),
                   "imp": ((34.3, 27.8, 23.5, 40.9, 32.5, 29.9), (28.7, 20.2, 16.4, 34.1, 29.2, 25.8)),
                   "synflow": ((43.7, 36.3, 32.3, 50.2, 45.1, 41.5), (33.9, 25.4, 20.6, 43.5, 38.9, 35.6)),
                   "snip": ((43.4, 35.5, 31.8, 49.5, 44.9, 38.6), (32.7, 23.7, 19.8, 41.9, 37.4, 34.1)),
                   "prospr": ((46.9, 38.1, 34.7, 54.9, 49.4, 44.2), (43.8, 36.9, 33.5, 51.2, 44.7, 39.9)),
                   "altermoma": ((49.4, 41.2, 37.3, 57.0, 49.7, 46.5), (47.8, 39.6, 36.1, 55.9, 46.2, 43.2))},
    "Cyclist": {"none": (63.8, 51.7, 45.2, 67.6, 57.2, 50.4),
                "imp": ((47.2, 36.8, 30.7, 51.2, 41.4, 35.7), (39.2, 31.5, 27.3, 45.5, 36.9, 31.2)),
                "synflow": ((56.2, 44.5, 36.5, 59.1, 48.6, 42.2), (47.5, 36.2, 31.1, 54.8, 44.3, 38.2)),
                "snip": ((55.5, 43.1, 36.2, 58.4, 47.5, 41.9), (47.2, 35.4, 29.2, 53.3, 42.3, 37.5)),
                "prospr": ((60.0, 47.5, 41.6, 62.7, 52.2, 46.1), (57.4, 45.2, 39.6, 60.3, 49.9, 43.7)),
                "altermoma": ((62.1, 49.8, 44.9, 65.2, 54.8, 48.3), (59.7, 47.9, 43.1, 62.5, 52.3, 46.0))},
}


def paper_row(cls: str, method: str, sparsity: float | None) -> tuple[float, ...] | None:
    """The paper's six numbers (AP-3D, AP-BEV x easy / moderate / hard) of a cell, or None where it has none."""
    row = _T6.get(cls, {}).get(method)
    if row is None:
        return None
    if method == "none":
        return row  # type: ignore[return-value]
    return {0.8: row[0], 0.9: row[1]}.get(round(float(sparsity or 0), 2))  # type: ignore[index]


@dataclass(frozen=True)
class KittiProtocol:
    """Everything that shapes a cell's numbers (recorded in ``<out>/protocol.json``)."""

    preset: str = "tiny"
    classes: tuple[str, ...] = ("Car", "Pedestrian")
    reference_steps: int = 1200
    reference_lr: float = 2e-3
    batch_size: int = 2
    finetune_steps: int = 100
    finetune_lr: float = 1e-4
    scoring_batches: int = 4
    reference_seed: int | None = 0  # one reference detector for every pruning seed; None: one per seed


class KittiTables:
    """Reference detectors, pruned cells and the tables for one KITTI folder (``root``) and output folder."""

    def __init__(self, root: str | Path, out: str | Path, protocol: KittiProtocol = KittiProtocol(),
                 progress: bool = False) -> None:
        self.protocol, self.progress = protocol, progress
        self.train_set = KittiDataset(root, "train", classes=protocol.classes)
        self.val_set = KittiDataset(root, "val", classes=protocol.classes)
        self.out = Path(out)
        self.out.mkdir(parents=True, exist_ok=True)
        claim_settings(self.out / "protocol.json", {**asdict(self.protocol), "root": str(Path(root).resolve())},
                       what="cells of another KITTI protocol:", remedy="use another --out folder")

    def reference(self, seed: int) -> Any:
        """The unpruned detector cell ``seed`` starts from (trained once, then read from its checkpoint)."""
        if self.protocol.reference_seed is not None:
            seed = self.protocol.reference_seed
        path = self.out / f"reference_seed{seed}.pt"
        if path.is_file():
            return load_avod(path)[0]
        p = self.protocol
        model, _ = train_avod(avod_preset(p.preset, classes=p.classes,
                                          anchor_sizes=((1.6, 3.9, 1.56), (0.6, 0.8, 1.73))[: len(p.classes)],
                                          anchor_z=(-0.9,) * len(p.classes)),
                              self.train_set, steps=p.reference_steps, batch_size=p.batch_size, lr=p.reference_lr,
                              seed=seed, checkpoint=path, progress=self.progress)
        return model

    def batches(self, seed: int, count: int, cfg: Any) -> list[dict[str, Any]]:
        """``count`` collated training batches in a seeded order (scoring and fine-tuning data)."""
        size = self.protocol.batch_size
        order: list[int] = []
        rng = np.random.default_rng(seed)
        while len(order) < count * size:
            order += rng.permutation(len(self.train_set)).tolist()
        return [collate_kitti([self.train_set[i] for i in order[k * size:(k + 1) * size]], cfg) for k in range(count)]

    def cell(self, method: str, sparsity: float | None, seed: int) -> dict[str, Any]:
        """One cell's KITTI evaluation (``method="none"``: the unpruned reference), computed once and stored."""
        path = self.out / "cells" / f"{method}_{0 if sparsity is None else round(sparsity * 100)}_seed{seed}.json"
        if path.is_file():
            return json.loads(path.read_text())
        from fusionlens.prune import prune

        model, t0 = self.reference(seed), time.time()
        info: dict[str, Any] = {}
        if method != "none":
            p = self.protocol
            torch.manual_seed(seed)
            score_batches = self.batches(seed, p.scoring_batches, model.cfg)
            tune = self.batches(seed + 1000, p.finetune_steps, model.cfg) if p.finetune_steps else None
            example = score_batches[0]
            options: dict[str, Any] = {"keep_inputs": ("lidar_to_image",)} if method == "synflow" else {}
            if method == "prospr":  # its meta-gradient differentiates twice; torchvision's kernel cannot
                model.roi_align = roi_align_torch
            if method == "altermoma":  # the backbones are the modality groups; the RPN and second stage fusion
                options["groups"] = {"camera": ["image_fpn"], "lidar": ["bev_fpn"]}
            result = prune(model, method, float(sparsity or 0), loss_fn=lambda m, b: avod_loss(m, b)["total"],
                           batches=score_batches, finetune_steps=p.finetune_steps, finetune_lr=p.finetune_lr,
                           finetune_batches=tune,
                           example_inputs={"image": example["image"], "bev": example["bev"],
                                           "lidar_to_image": example["lidar_to_image"]},
                           progress=self.progress, **options)
            model = result.model
            model.roi_align = roi_align
            info = {"achieved_sparsity": result.report.get("sparsity")}
        ev = evaluate_avod(model, self.val_set)
        record = {"method": method, "sparsity": sparsity, "seed": seed, "seconds": round(time.time() - t0, 1),
                  **info, **ev.to_dict()}
        atomic_write_json(path, record)
        return record

    def run(self, methods: Sequence[str], sparsities: Sequence[float], seeds: Sequence[int]) -> str:
        references = [self.protocol.reference_seed] if self.protocol.reference_seed is not None else seeds
        cells = [self.cell("none", None, s) for s in references]
        cells += [self.cell(m, sp, s) for sp in sparsities for m in methods for s in seeds]
        return tables(cells, self.protocol.classes, methods, sparsities)


def _mean_std(values: list[float]) -> str:
    vals = [v for v in values if not math.isnan(v)]
    if not vals:
        return "n/a"
    return f"{np.mean(vals):.1f} ± {np.std(vals):.1f}" if len(vals) > 1 else f"{vals[0]:.1f}"


def tables(cells: Sequence[dict[str, Any]], classes: Sequence[str], methods: Sequence[str],
           sparsities: Sequence[float]) -> str:
    """Markdown in the paper's layout: per class and sparsity, AP-3D and AP-BEV at easy / moderate / hard, mean ±
    std over seeds, with the paper's number after a slash."""
    difficulties = ("easy", "moderate", "hard")
    lines = []
    for sp in sparsities:
        lines += [f"#### {round(sp * 100)} % sparsity (ours / paper)", "",
                  "| class | method | seeds | " + " | ".join(f"3D {d}" for d in difficulties) + " | "
                  + " | ".join(f"BEV {d}" for d in difficulties) + " |", "|" + "---|" * 9]
        for cls in classes:
            for method in ("none", *methods):
                mine = [c for c in cells if c["method"] == method and (method == "none" or c["sparsity"] == sp)]
                if not mine:
                    continue
                paper = paper_row(cls, method, sp)
                row = []
                for k, (metric, d) in enumerate([(m, d) for m in ("3d", "bev") for d in difficulties]):
                    ours = _mean_std([c["ap"][metric][cls][d] for c in mine])
                    row.append(f"{ours} / {paper[k]:.1f}" if paper else ours)
                name = "no pruning" if method == "none" else PAPER_METHODS.get(method, method)
                lines.append(f"| {cls} | {name} | {len(mine)} | " + " | ".join(row) + " |")
        lines.append("")
    return "\n".join(lines)
