"""``fusionlens evaluate``: vehicle IoU of a checkpoint over a whole split, overall, per condition and per
distance band (runs under ``torchrun`` too; the result equals a single-process run)."""

from __future__ import annotations

import argparse
import json

import torch

from fusionlens.cli.train import add_data_arguments, dataset_for
from fusionlens.io import atomic_write_json, check_output_path
from fusionlens.train.checkpoint import load_model
from fusionlens.train.distributed import init_distributed
from fusionlens.train.loop import check_dataset, evaluate


def run(args: argparse.Namespace) -> int:
    if args.out:
        check_output_path("--out", args.out, inputs={"--checkpoint": args.checkpoint})
    if args.data == "kitti":
        from fusionlens.cli.kitti import run_evaluate

        return run_evaluate(args)
    device = torch.device(args.device)
    info = init_distributed(device)
    if device.type == "cuda":
        device = torch.device("cuda", info.local_rank)
    model, payload = load_model(args.checkpoint, device)
    dataset = dataset_for(args, args.split, args.size, model.config)
    check_dataset(dataset, model.config, args.split)
    metrics = evaluate(
        model, dataset, batch_size=args.batch_size, device=device, info=info, progress=not args.no_progress
    )
    if info.is_main:
        report = {
            "checkpoint": str(args.checkpoint),
            "split": args.split,
            "samples": len(dataset),
            "step": payload["step"],
            "modalities": list(model.config.modalities),
            "iou": metrics,
        }
        if model.config.extra_heads.get("centerpoint") is not None:
            from fusionlens.evaluate.detection import evaluate_detector

            # single process: the devkit's matching needs every sample's boxes in one place
            detection = evaluate_detector(model, dataset, batch_size=args.batch_size, device=device,
                                          progress=not args.no_progress)
            report["detection"] = detection.to_dict()
        if args.out:
            atomic_write_json(args.out, report)
        print(json.dumps(report, indent=2, default=str))
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("evaluate", help="IoU of a trained checkpoint on a split", description=__doc__)
    p.add_argument("--checkpoint", required=True, help="a checkpoint written by 'fusionlens train'")
    p.add_argument("--split", default="val", choices=("train", "val", "test"))
    p.add_argument("--size", type=int, default=None, help="number of samples (generated data)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default=None, help="write the metrics as JSON here (atomically)")
    p.add_argument("--no-progress", action="store_true")
    add_data_arguments(p)
    p.set_defaults(func=run)
