"""LMD on a trained AVOD-style detector: conservation, time and the camera / LiDAR shares of its detections.

    python benchmarks/avod_lmd.py --checkpoint out/kitti_tables/reference_seed0.pt --dataroot data/kitti_world

Per val frame (float64): one decomposition of the second stage on the RPN's proposals (the operating point), its
relative conservation error (target <= 1e-9), the seconds it took, and over the proposals the detector calls
objects (class probability > --threshold) the mean signed camera and LiDAR shares of the class logit.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from fusionlens.data.kitti import KittiDataset
from fusionlens.models.avod_lmd import detection_shares
from fusionlens.train.avod import collate_kitti, load_avod


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--dataroot", required=True)
    parser.add_argument("--frames", type=int, default=5)
    parser.add_argument("--threshold", type=float, default=0.5)
    args = parser.parse_args()
    model, _ = load_avod(args.checkpoint)
    model = model.double()
    ds = KittiDataset(args.dataroot, "val", classes=model.cfg.classes)
    rows, errors, seconds = [], [], []
    for i in range(min(args.frames, len(ds))):
        batch = collate_kitti([ds[i]], model.cfg)
        batch = {k: v.double() if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        spec = model.describe()
        t0 = time.perf_counter()
        d = spec.decompose(batch)
        seconds.append(time.perf_counter() - t0)
        total = sum(d.components.values())
        errors.append(float((total - d.output).abs().max() / d.output.abs().max()))
        rows += [r for r in detection_shares(model, batch) if r["class"] >= 0 and r["probability"] > args.threshold]
    cam = [r["shares"]["camera"] for r in rows]
    print(json.dumps({
        "frames": len(errors), "max_relative_conservation_error": max(errors),
        "seconds_per_frame": round(float(np.mean(seconds)), 2), "detections": len(rows),
        "camera_share_mean": round(float(np.mean(cam)), 3) if cam else None,
        "lidar_share_mean": round(float(np.mean([r["shares"]["lidar"] for r in rows])), 3) if rows else None,
        "per_class": {model.cfg.classes[c]: len([r for r in rows if r["class"] == c])
                      for c in range(len(model.cfg.classes))},
    }, indent=2))


if __name__ == "__main__":
    main()
