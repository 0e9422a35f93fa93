"""Choose AlterMOMA's reactivation batches B and learning rate (not given in the paper) by a small sweep on the
built-in world, using the reference models and cells of ``fusionlens reproduce altermoma`` (same out dir, same
resumable cell files under ``sweep/``).

    nice -n 10 python benchmarks/prune_sweep.py --steps 2,4,8 --lrs 1e-3,1e-2 --sparsity 0.85

Prints a Markdown table of val IoU after pruning + fine-tuning (higher is better) and the backward passes.
"""

from __future__ import annotations

import argparse
import itertools

from fusionlens.prune.reproduce import ReproduceConfig, Runner


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="out/reproduce/altermoma")
    p.add_argument("--pair", default="camera,lidar")
    p.add_argument("--steps", default="2,4,8", help="reactivation batches B")
    p.add_argument("--lrs", default="1e-3,1e-2", help="reactivation SGD learning rates")
    p.add_argument("--sparsity", type=float, default=0.85)
    p.add_argument("--seeds", default="0")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args()
    steps = [int(v) for v in args.steps.split(",")]
    lrs = [float(v) for v in args.lrs.split(",")]
    seeds = [int(v) for v in args.seeds.split(",")]
    runner = Runner(ReproduceConfig(out_dir=args.out, pairs=(args.pair,), ablation_pair=args.pair),
                    progress=not args.no_progress)
    rows = []
    for b, lr, seed in itertools.product(steps, lrs, seeds):
        cell = runner.unstructured(args.pair, "altermoma", args.sparsity, seed,
                                   options={"reactivation_steps": b, "reactivation_lr": lr}, group="sweep")
        rows.append((b, lr, seed, cell["iou"], cell["scoring_backward_passes"], cell["scoring_seconds"]))
        print(f"B={b} lr={lr:g} seed={seed}: IoU {100 * cell['iou']:.2f}", flush=True)
    print(f"\nAlterMOMA sweep, {args.pair}, sparsity {args.sparsity:g} (val IoU %, after fine-tuning)\n")
    print("| B | lr | seed | IoU | backward passes | scoring s |\n|---|---|---|---|---|---|")
    for b, lr, seed, iou, passes, secs in rows:
        print(f"| {b} | {lr:g} | {seed} | {100 * iou:.2f} | {passes} | {secs:.0f} |")


if __name__ == "__main__":
    main()
