"""AlterMOMA settings sweeps on the built-in world, on the reference models and resumable cells of
``fusionlens reproduce altermoma`` (same out dir; cells under ``<group>/<pair>/altermoma_<options>/``).

B (reactivation batches) and the reactivation learning rate are not given in the paper; their defaults were
chosen with

    nice -n 10 python benchmarks/prune_sweep.py --grid "reactivation_steps=2,8;reactivation_lr=1e-3,1e-2"

and the size-neutral AlterEva normalisation (an option of ours) was compared with

    nice -n 10 python benchmarks/prune_sweep.py --group variant --grid "normalise=mean" \\
        --pairs "camera,lidar;camera,radar" --sparsities 0.8,0.85,0.9

Prints a Markdown table of val IoU after pruning + fine-tuning and the scoring backward passes.
"""

from __future__ import annotations

import argparse
import itertools
from typing import Any

from fusionlens.experiments.altermoma import ReproduceConfig, Runner


def parse_grid(text: str) -> list[dict[str, Any]]:
    """``"a=1,2;b=x"`` -> ``[{"a": 1, "b": "x"}, {"a": 2, "b": "x"}]`` (booleans and numbers parsed)."""
    axes: list[tuple[str, list[Any]]] = []
    for part in filter(None, (p.strip() for p in text.split(";"))):
        key, sep, values = part.partition("=")
        if not sep or not values:
            raise ValueError(f"--grid expects key=v1,v2;key2=..., got {part!r}")
        parsed: list[Any] = []
        for v in values.split(","):
            if v.lower() in ("true", "false"):
                parsed.append(v.lower() == "true")
                continue
            try:
                parsed.append(int(v))
            except ValueError:
                try:
                    parsed.append(float(v))
                except ValueError:
                    parsed.append(v)
        axes.append((key.strip(), parsed))
    return [dict(zip([k for k, _ in axes], combo)) for combo in itertools.product(*[v for _, v in axes])]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="out/reproduce/altermoma")
    p.add_argument("--pairs", default="camera,lidar", help="';'-separated")
    p.add_argument("--grid", default="reactivation_steps=2,8;reactivation_lr=1e-3,1e-2")
    p.add_argument("--group", default="sweep")
    p.add_argument("--sparsities", default="0.85")
    p.add_argument("--seeds", default="0")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args()
    pairs = tuple(v for v in args.pairs.split(";") if v)
    sparsities = [float(v) for v in args.sparsities.split(",")]
    seeds = [int(v) for v in args.seeds.split(",")]
    runner = Runner(ReproduceConfig(out_dir=args.out, pairs=pairs), progress=not args.no_progress)
    rows = []
    for pair, options, rho, seed in itertools.product(runner.cfg.pairs, parse_grid(args.grid), sparsities, seeds):
        cell = runner.unstructured(pair, "altermoma", rho, seed, options=options, group=args.group)
        rows.append((pair, options, rho, seed, cell))
        print(f"{pair} {options} {rho:g} seed {seed}: IoU {100 * cell['iou']:.2f}", flush=True)
    print("\n| pair | options | sparsity | seed | IoU | backward passes | scoring s |\n|---|---|---|---|---|---|---|")
    for pair, options, rho, seed, cell in rows:
        opts = ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in options.items())
        print(
            f"| {pair} | {opts} | {100 * rho:g}% | {seed} | {100 * cell['iou']:.2f} | "
            f"{cell['scoring_backward_passes']} | {cell['scoring_seconds']:.0f} |"
        )


if __name__ == "__main__":
    main()
