"""CPU latency of structured pruning, measured A/B-interleaved so that load from other processes on a shared
machine hits the dense and the pruned model alike (the per-cell latencies of ``fusionlens reproduce altermoma``
are back-to-back and noisy on a shared CPU).

    nice -n 10 python benchmarks/prune_latency.py --checkpoint out/reproduce/altermoma/checkpoints/camera_lidar.pt

Channels are chosen by magnitude (no data needed; the speed depends on the widths, not on which channels go).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch.utils.data import DataLoader

from fusionlens.data.collate import collate_samples
from fusionlens.experiments.reference import example_inputs, load_reference
from fusionlens.prune.baselines import MagnitudeImportance
from fusionlens.prune.cost import count_flops, count_parameters
from fusionlens.prune.params import call_model, prunable_parameters
from fusionlens.prune.structured import structured_prune
from fusionlens.train.data import open_dataset


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--ratios", default="0.3,0.5")
    p.add_argument("--rounds", type=int, default=15, help="interleaved timing rounds")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    model, _ = load_reference(args.checkpoint)
    val = open_dataset("builtin", "val", size=8, seed=0, progress=False)
    ex = example_inputs(model, next(iter(DataLoader(val, batch_size=1, collate_fn=collate_samples))))
    scores = MagnitudeImportance()(model, prunable_parameters(model))
    models = {"dense": model.eval()}
    for r in (float(v) for v in args.ratios.split(",")):
        models[f"{100 * r:g}%"] = structured_prune(model, scores, r, ex).eval()
    times: dict[str, list[float]] = {k: [] for k in models}
    with torch.no_grad():
        for m in models.values():  # warm-up
            call_model(m, ex)
        for _ in range(args.rounds):
            for name, m in models.items():
                start = time.perf_counter()
                call_model(m, ex)
                times[name].append(time.perf_counter() - start)
    dense_ms = 1e3 * statistics.median(times["dense"])
    print(f"threads={args.threads}, rounds={args.rounds}, batch 1 (6 cameras)\n")
    print("| model | params | GFLOPs | median latency ms | speed-up |\n|---|---|---|---|---|")
    for name, m in models.items():
        ms = 1e3 * statistics.median(times[name])
        print(
            f"| {name} | {count_parameters(m) / 1e6:.2f}M | {count_flops(m, ex) / 1e9:.2f} | {ms:.0f} | "
            f"{dense_ms / ms:.2f}x |"
        )


if __name__ == "__main__":
    main()
