"""``make demo``: the tour of fusionlens, one step after another (``python -m fusionlens.demo --out DIR``).

Steps: (1) generate a small built-in dataset, (2) draw sample figures, then the main job
(:mod:`fusionlens.demo_pipeline`): (3) pre-train the camera trunk on the world's pixel labels, (4) train a tiny
camera-radar model, (5) evaluate it, (6) explain it with LMD, (7) prune it with AlterMOMA, magnitude and SNIP,
(8) audit which sensor it relies on, against a radar-only partner: the report, ``audit/index.html``.
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fusionlens import demo_pipeline
from fusionlens.data.builtin import BuiltinWorld
from fusionlens.viz.world import plot_sample
from fusionlens.world.config import WorldConfig


def step_dataset(ctx: dict[str, Any]) -> None:
    """Generate (or reuse) a small validation split of the built-in world."""
    ctx["dataset"] = BuiltinWorld("val", size=ctx["samples"], config=ctx["config"], seed=ctx["seed"],
                                  cache_dir=ctx["cache_dir"], shard_size=16)
    print(f"  dataset: {len(ctx['dataset'])} samples in {ctx['dataset'].split_dir}")


def step_world_figures(ctx: dict[str, Any]) -> None:
    """One PNG per sample: six cameras and the BEV with LiDAR, radar, boxes and the vehicle mask."""
    out = ctx["out"] / "world"
    for i in range(min(ctx["figures"], len(ctx["dataset"]))):
        sample = ctx["dataset"][i]
        path = plot_sample(sample, out / f"sample-{i:03d}.png")
        print(f"  {path}  ({', '.join(sample.meta['tags'])})")


STEPS: list[tuple[str, Callable[[dict[str, Any]], None]]] = [
    ("built-in dataset", step_dataset),
    ("world figures", step_world_figures),
    ("pre-train the camera trunk on the world's pixel labels", demo_pipeline.step_pretrain_camera),
    ("train a tiny camera-radar model", demo_pipeline.step_train),
    ("train its radar-only partner", demo_pipeline.step_train_partner),
    ("evaluate: vehicle IoU", demo_pipeline.step_evaluate),
    ("explain: LMD panels", demo_pipeline.step_explain),
    ("prune: AlterMOMA vs magnitude and SNIP at 85%", demo_pipeline.step_prune),
    ("report: sensor-reliance audit", demo_pipeline.step_audit),
]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fusionlens.demo", description=__doc__)
    parser.add_argument("--out", default="out/demo", help="where figures and reports go")
    parser.add_argument("--cache-dir", default=None, help="dataset cache (default: $FUSIONLENS_CACHE)")
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--figures", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=150, help="training steps of the demo model")
    parser.add_argument("--train-size", type=int, default=64, help="training samples")
    parser.add_argument("--trunk-steps", type=int, default=300, help="camera trunk pre-training steps")
    parser.add_argument("--trunk-frames", type=int, default=128, help="frames for camera trunk pre-training")
    parser.add_argument("--finetune-steps", type=int, default=30, help="fine-tuning steps after pruning")
    args = parser.parse_args(argv)
    positive = (args.samples, args.steps, args.train_size, args.trunk_steps, args.trunk_frames)
    if min(positive) <= 0 or args.figures < 0 or args.finetune_steps < 0:
        parser.error("--samples, --steps, --train-size, --trunk-steps and --trunk-frames must be > 0; "
                     "--figures and --finetune-steps >= 0")
    if args.cache_dir:  # the CLI steps find the same cache through the environment
        os.environ["FUSIONLENS_CACHE"] = args.cache_dir
    ctx: dict[str, Any] = {"out": Path(args.out), "cache_dir": args.cache_dir, "samples": args.samples,
                           "figures": args.figures, "seed": args.seed, "config": WorldConfig(), "steps": args.steps,
                           "train_size": args.train_size, "finetune_steps": args.finetune_steps,
                           "trunk_steps": args.trunk_steps, "trunk_frames": args.trunk_frames}
    for k, (name, step) in enumerate(STEPS, 1):
        start = time.perf_counter()
        print(f"[{k}/{len(STEPS)}] {name}")
        step(ctx)
        print(f"  done in {time.perf_counter() - start:.1f} s")
    print(f"demo outputs are in {ctx['out'].resolve()}")
    print(f"report: {ctx['report'].resolve()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
