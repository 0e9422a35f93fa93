"""Time to generate one built-in world sample on one core, at the default and at the papers' resolution.

Usage: ``OMP_NUM_THREADS=1 python benchmarks/world.py [--samples N] [--paper-samples M]``. Prints a Markdown table
(mean and median milliseconds per sample, with the per-stage split) for benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

from fusionlens.data.labels import boxes_to_bev
from fusionlens.world import WorldConfig, generate_sample
from fusionlens.world.camera import render_cameras
from fusionlens.world.conditions import sample_conditions
from fusionlens.world.generate import _streams, rig_for
from fusionlens.world.lidar import simulate_lidar
from fusionlens.world.radar import simulate_radar
from fusionlens.world.scene import make_scene


def stage_times(cfg: WorldConfig, index: int) -> dict[str, float]:
    """Milliseconds spent in each stage of one sample (same calls as ``render_frame``)."""
    g_scene, g_cond, g_cam, g_lidar, g_radar = _streams(0, "train", index)
    rig = rig_for(cfg)
    out, t = {}, time.perf_counter()
    scene = make_scene(cfg, g_scene)
    cond = sample_conditions(cfg, g_cond, rig.camera_yaw)
    out["scene"], t = (time.perf_counter() - t) * 1e3, time.perf_counter()
    render_cameras(scene, cond, rig, g_cam)
    out["cameras"], t = (time.perf_counter() - t) * 1e3, time.perf_counter()
    simulate_lidar(scene, cond, rig, cfg.lidar_azimuth_steps, cfg.lidar_range, g_lidar)
    out["lidar"], t = (time.perf_counter() - t) * 1e3, time.perf_counter()
    simulate_radar(scene, cond, rig, cfg.radar_sweeps, cfg.radar_range, cfg.radar_azimuth_step_deg,
                   cfg.radar_azimuth_noise_deg, g_radar)
    out["radar"], t = (time.perf_counter() - t) * 1e3, time.perf_counter()
    n = int((scene.label >= 0).sum())
    boxes = torch.zeros(n, 9)
    boxes[:, 3:6] = 2.0
    boxes[:, 0] = torch.linspace(-40, 40, n)
    boxes_to_bev(boxes, torch.zeros(n, dtype=torch.long), cfg.grid)
    out["labels"] = (time.perf_counter() - t) * 1e3
    return out


def bench(name: str, cfg: WorldConfig, samples: int) -> str:
    generate_sample(cfg, 0, "train", 10_000)  # warm caches (ray directions, rig)
    per = []
    for i in range(samples):
        t = time.perf_counter()
        generate_sample(cfg, 0, "train", i)
        per.append((time.perf_counter() - t) * 1e3)
    stages = [stage_times(cfg, i) for i in range(min(samples, 10))]
    split = ", ".join(f"{k} {np.mean([s[k] for s in stages]):.0f}" for k in stages[0])
    h, w = cfg.image_size
    return (f"| {name} | {h}x{w} | {'x'.join(map(str, cfg.grid.shape))} | {cfg.lidar_azimuth_steps} | {samples} "
            f"| {statistics.mean(per):.0f} | {statistics.median(per):.0f} | {split} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--samples", type=int, default=40)
    parser.add_argument("--paper-samples", type=int, default=10)
    args = parser.parse_args()
    torch.set_num_threads(1)
    print("| config | images | grid | LiDAR az. steps | samples | mean ms | median ms | stages (mean ms) |")
    print("|---|---|---|---|---|---|---|---|")
    print(bench("default", WorldConfig(), args.samples))
    print(bench("paper", WorldConfig.paper(), args.paper_samples))


if __name__ == "__main__":
    main()
