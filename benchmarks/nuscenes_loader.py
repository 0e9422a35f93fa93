"""Benchmark: cost of one nuScenes sample through :class:`fusionlens.data.nuscenes.NuScenesDataset` at the papers'
settings (six 1600x900 JPEGs resized to 224x400, 5 radars x 5 sweeps, 5 LiDAR sweeps, 200x200x8 grid), on a
nuScenes-format fixture with real-sized files (no nuScenes download needed):

    OMP_NUM_THREADS=1 nice -n 10 .venv/bin/python benchmarks/nuscenes_loader.py --flops \
        --out out/bench/nuscenes_loader.json

Per-sample times are medians over the fixture's keyframes, loading one modality at a time and all together (the
BEV labels are built in every case). Radar files hold ``--radar-points`` returns and LiDAR sweeps
``--lidar-points`` points (nuScenes: up to ~125 and ~34,700); images are noisy so that JPEG decoding costs what a
photo costs (they are larger than nuScenes' ~200 KB files, so decoding is if anything slower here).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from tqdm import tqdm

from fusionlens.data.nuscenes import PAPER_GRID, PAPER_IMAGE_SIZE, NuScenesDataset
from fusionlens.data.nuscenes_fixture import FixtureScene, default_rig, write_nuscenes_fixture
from fusionlens.io import atomic_write_json


def write_dataset(root: Path, n_samples: int, radar_points: int, lidar_points: int) -> dict[str, float]:
    # The loader reads only keyframe images, so the fixture skips camera sweeps to save disk.
    rig = tuple(replace(s, sweeps_between=0) if s.modality == "camera" else s for s in default_rig())
    scene = FixtureScene("scene-0061", n_samples=n_samples, clutter=(radar_points, lidar_points),
                         landmarks=((15.0, 3.0, 0.5),))
    write_nuscenes_fixture(root, (scene,), image_hw=(900, 1600), rig=rig, textured_images=True)
    sizes = {kind: [p.stat().st_size for p in root.glob(f"samples/*/*{ext}")]
             for kind, ext in (("jpg", ".jpg"), ("radar_pcd", ".pcd"), ("lidar_bin", ".pcd.bin"))}
    return {f"mean_{k}_kb": round(statistics.mean(v) / 1024, 1) for k, v in sizes.items()}


def time_loading(root: Path, modalities: tuple[str, ...], warmup: int = 1) -> dict[str, float]:
    ds = NuScenesDataset(root, "v1.0-mini", "train", PAPER_GRID, PAPER_IMAGE_SIZE, modalities=modalities)
    for i in range(min(warmup, len(ds))):
        ds[i]
    times = []
    for i in tqdm(range(len(ds)), desc="+".join(modalities), unit="sample", leave=False):
        t0 = time.perf_counter()
        ds[i]
        times.append(time.perf_counter() - t0)
    return {"median_s": round(statistics.median(times), 4), "max_s": round(max(times), 4), "samples": len(ds)}


def paper_model_flops(root: Path, modalities: tuple[str, ...]) -> dict[str, float]:
    """Forward GFLOPs of the ``paper`` preset on one fixture sample (``torch.utils.flop_counter``, batch 1)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from fusionlens.data.collate import collate_samples
    from fusionlens.models import batch_to_inputs, build_model, preset_config

    ds = NuScenesDataset(root, "v1.0-mini", "train", PAPER_GRID, PAPER_IMAGE_SIZE, modalities=modalities)
    model = build_model(preset_config("paper", modalities)).eval()
    inputs, kwargs = batch_to_inputs(model, collate_samples([ds[1]]))
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(**inputs, **kwargs)
    return {"forward_gflops": round(counter.get_total_flops() / 1e9, 1),
            "params_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="out/bench/nuscenes_loader.json")
    parser.add_argument("--samples", type=int, default=6, help="keyframes in the fixture scene")
    parser.add_argument("--radar-points", type=int, default=100, help="returns per radar file")
    parser.add_argument("--lidar-points", type=int, default=34_720, help="points per LiDAR sweep")
    parser.add_argument("--flops", action="store_true", help="also count the paper preset's forward FLOPs")
    args = parser.parse_args()
    if args.samples < 2:
        raise ValueError(f"--samples must be >= 2, got {args.samples}")
    with tempfile.TemporaryDirectory(prefix="fusionlens-nusc-bench-") as tmp:
        root = Path(tmp)
        t0 = time.perf_counter()
        sizes = write_dataset(root, args.samples, args.radar_points, args.lidar_points)
        result: dict[str, object] = {"fixture_write_s": round(time.perf_counter() - t0, 1), "file_sizes": sizes,
                                     "settings": {"image_size": PAPER_IMAGE_SIZE, "grid": PAPER_GRID.shape,
                                                  "radar_sweeps": 5, "lidar_sweeps": 5, **vars(args)}}
        for mods in (("camera",), ("radar",), ("lidar",), ("camera", "radar"), ("camera", "radar", "lidar")):
            result["+".join(mods)] = time_loading(root, mods)
        if args.flops:
            for mods in (("camera", "radar"), ("camera", "lidar")):
                result[f"paper_model/{'+'.join(mods)}"] = paper_model_flops(root, mods)
    atomic_write_json(args.out, result)
    print(json.dumps(result, indent=2, default=str))


if __name__ == "__main__":
    main()
