"""Benchmark: a tiny camera-LiDAR 3-D detector (PointPillars LiDAR branch + CenterPoint head) on the built-in
world, scored with nuScenes mAP / NDS (nuscenes-devkit's algorithms), plus training time.

    OMP_NUM_THREADS=1 nice -n 10 .venv/bin/python benchmarks/detection.py --out out/bench/detection.json

``--data synthetic`` runs the same pipeline on :class:`fusionlens.train.synthetic.SyntheticDataset` (no world
needed). ``--task both`` also trains the segmentation heads (SimpleBEV loss) and reports vehicle IoU.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

import torch
from torch.utils.data import Dataset
from tqdm import tqdm

from fusionlens.data.collate import collate_samples
from fusionlens.data.sample import CLASSES
from fusionlens.evaluate.detection import evaluate_detector
from fusionlens.io import atomic_write_json
from fusionlens.models import batch_to_inputs, build_model, preset_config
from fusionlens.models.centerpoint import find_detection_head
from fusionlens.train.losses import simplebev_loss


def load_data(args: argparse.Namespace) -> tuple[list[Any], list[Any]]:
    """Both splits, held in memory (training revisits every sample). The world is generated into its shard
    cache (``$FUSIONLENS_CACHE``) in this process on first use."""
    if args.data == "synthetic":
        from fusionlens.train.synthetic import SyntheticDataset

        sets: list[Dataset] = [SyntheticDataset(args.train, seed=args.seed),
                               SyntheticDataset(args.val, seed=args.seed + 1)]
    else:
        from fusionlens.data.builtin import BuiltinWorld

        sets = [BuiltinWorld(split, size=size, seed=args.seed, workers=0, progress=args.progress)
                for split, size in (("train", args.train), ("val", args.val))]
    train, val = ([ds[i] for i in range(len(ds))] for ds in sets)  # type: ignore[arg-type]
    return train, val


def present_classes(dataset: Dataset, limit: int = 64) -> list[str]:
    """The classes with at least one box in the first ``limit`` samples (the head detects only these)."""
    seen: set[int] = set()
    for i in range(min(limit, len(dataset))):  # type: ignore[arg-type]
        seen.update(int(v) for v in dataset[i].box_labels.tolist())
    return [c for i, c in enumerate(CLASSES) if i in seen]


def train_detector(model: torch.nn.Module, dataset: Dataset, args: argparse.Namespace) -> list[float]:
    """AdamW + one-cycle training of ``model`` for ``args.steps`` steps; returns the loss of every step."""
    head = find_detection_head(model)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=1e-4)
    # a 10 % warm-up, but at least 3 steps of it (OneCycleLR divides by the warm-up length)
    warmup = min(0.5, max(0.1, 3.0 / args.steps))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=args.steps, pct_start=warmup)
    gen = torch.Generator().manual_seed(args.seed)
    order = torch.cat([torch.randperm(len(dataset), generator=gen)  # type: ignore[arg-type]
                       for _ in range(args.steps * args.batch_size // len(dataset) + 1)])  # type: ignore[arg-type]
    losses = []
    model.train()
    bar = tqdm(range(args.steps), desc="train", disable=not args.progress)
    for step in bar:
        idx = order[step * args.batch_size:(step + 1) * args.batch_size].tolist()
        batch = collate_samples([dataset[i] for i in idx])
        inputs, kwargs = batch_to_inputs(model, batch)
        out = model(**inputs, **kwargs)
        loss = head.loss(out, batch)["det_total"]
        if args.task == "both":
            loss = loss + simplebev_loss(out, batch)["total"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
    return losses


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", choices=("builtin", "synthetic"), default="builtin")
    p.add_argument("--modalities", default="camera,lidar")
    p.add_argument("--lidar-encoder", choices=("pillars", "raster"), default="pillars")
    p.add_argument("--task", choices=("detection", "both"), default="detection")
    p.add_argument("--train", type=int, default=64, help="training samples")
    p.add_argument("--val", type=int, default=32, help="validation samples")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="JSON file for the results")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    args = p.parse_args(argv)
    for name in ("train", "val", "batch_size"):
        if getattr(args, name) <= 0:
            p.error(f"--{name.replace('_', '-')} must be positive")
    if args.steps < 8:
        p.error("--steps must be at least 8 (one-cycle schedule)")

    torch.manual_seed(args.seed)
    train_set, val_set = load_data(args)
    grid = train_set[0].grid
    classes = present_classes(train_set)
    if not classes:
        p.error("the training set has no boxes")
    enc_kwargs = {"pointnet_channels": [16], "channels": 16} if args.lidar_encoder == "pillars" else {}
    cfg = preset_config("tiny", args.modalities, grid=grid,
                        point_encoders={"lidar": args.lidar_encoder} if "lidar" in args.modalities else {},
                        point_encoder_kwargs={"lidar": enc_kwargs} if "lidar" in args.modalities else {},
                        extra_heads={"centerpoint": {"classes": classes, "hidden": 32}})
    model = build_model(cfg)
    groups = model.modality_groups()
    t0 = time.perf_counter()
    losses = train_detector(model, train_set, args)
    train_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    report = evaluate_detector(model, val_set, batch_size=args.batch_size, progress=args.progress)
    eval_s = time.perf_counter() - t1
    result: dict[str, Any] = {
        "args": vars(args), "model_config": cfg.to_dict(), "classes": classes,
        "params": {g: sum(model.get_parameter(n).numel() for n in names) for g, names in groups.items()},
        "train_seconds": train_s, "eval_seconds": eval_s, "torch_threads": torch.get_num_threads(),
        "loss_first10": sum(losses[:10]) / min(10, len(losses)), "loss_last10": sum(losses[-10:]) / 10,
        "detection": report.to_dict(),
    }
    if args.task == "both":
        from fusionlens.train.loop import evaluate

        result["iou"] = evaluate(model, val_set, batch_size=args.batch_size, progress=False)
    print(report.format_table())
    print(json.dumps({k: v for k, v in result.items() if k not in ("detection", "model_config", "args")},
                     indent=1, default=str))
    if args.out:
        atomic_write_json(args.out, result)
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
