"""Does the pruning reproduction's fine-tuning protocol hurt a model by itself? Fine-tune a *dense* reference
model exactly as a pruned one is (Adam, fixed lr, the runner's batches) and print its val IoU along the way.

    OMP_NUM_THREADS=2 python benchmarks/finetune_drift.py \
        --checkpoint out/reproduce/altermoma/pretrained/checkpoints/camera_lidar_pre.pt --lr 1e-3 1e-4
"""

from __future__ import annotations

import argparse

import torch

from fusionlens.data import batch_loader
from fusionlens.experiments.reference import load_reference, reference_loss
from fusionlens.prune.pruner import finetune
from fusionlens.train.data import open_dataset
from fusionlens.train.loop import evaluate


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--lr", type=float, nargs="+", default=[1e-3, 1e-4])
    p.add_argument("--steps", type=int, nargs="+", default=[25, 100, 200], help="report after these many steps")
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--train-size", type=int, default=192)
    p.add_argument("--val-size", type=int, default=64)
    args = p.parse_args()
    train_set = open_dataset("builtin", "train", size=args.train_size, seed=0, progress=False)
    val_set = open_dataset("builtin", "val", size=args.val_size, seed=0, progress=False)
    print("| lr | steps | last-10 train loss | val IoU % |\n|---|---|---|---|")
    for lr in args.lr:
        torch.manual_seed(0)
        model, _ = load_reference(args.checkpoint)
        print(f"| {lr:g} | 0 | - | {100 * evaluate(model, val_set, progress=False)['all']:.1f} |", flush=True)
        batches, done = batch_loader(train_set, args.batch_size, shuffle=True, seed=0, drop_last=True), 0
        for target in sorted(args.steps):
            losses = finetune(model, reference_loss(), batches, target - done, lr=lr)
            done = target
            iou = evaluate(model, val_set, progress=False)["all"]
            print(f"| {lr:g} | {done} | {sum(losses[-10:]) / len(losses[-10:]):.3f} | {100 * iou:.1f} |", flush=True)


if __name__ == "__main__":
    main()
