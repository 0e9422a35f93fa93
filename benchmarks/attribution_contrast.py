"""Ground-truth attribution (issue 5) with plain component sums and with scene contrast, side by side.

Plain: each modality's component summed over a single-sensor vehicle's BEV cells (the issue's definition, what
``fusionlens reproduce lmd`` reports). Contrast: the same sum minus that component's mean map over ``--reference``
other val scenes (``fusionlens.evaluate.attribution.mean_component_maps``), i.e. the evidence the scene added --
motivated by ``benchmarks/lmd_constancy.py``: the camera component is largely one fixed map.

Each checkpoint is paired with a seed that draws its attribution scenes exactly as ``reproduce lmd`` does
(``--attribution-samples`` of the ``--val-size`` val scenes); reference scenes are taken from the rest.

    OMP_NUM_THREADS=1 python benchmarks/attribution_contrast.py \\
        --checkpoints out/checkpoints/tiny_camera_radar.pt out/checkpoints/tiny_camera_radar_seed1.pt \\
                      out/checkpoints/tiny_camera_radar_seed2.pt --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import random

from fusionlens.evaluate.attribution import attribute_objects, mean_component_maps, summarise_attribution
from fusionlens.evaluate.baselines import make_method
from fusionlens.train.checkpoint import load_model
from fusionlens.train.data import open_dataset


def _fmt(summary: dict, group: str) -> str:
    part = summary["all"].get(group)
    if not part or not part["objects"]:
        return "-"
    return f"{part['correct']:.2f} ({part['objects']})"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoints", nargs="+", required=True)
    p.add_argument("--seeds", nargs="+", type=int, required=True, help="one per checkpoint")
    p.add_argument("--methods", default="lmd:paper,naive,shapley")
    p.add_argument("--val-size", type=int, default=128)
    p.add_argument("--attribution-samples", type=int, default=12)
    p.add_argument("--reference", type=int, default=32, help="scenes averaged into the reference maps")
    args = p.parse_args()
    if len(args.seeds) != len(args.checkpoints):
        p.error("give one --seeds value per checkpoint")
    data = open_dataset("builtin", "val", size=args.val_size, seed=0, progress=False)
    print("| checkpoint | method | right sensor, plain (objects) | contrast | per sensor plain -> contrast |")
    print("|---|---|---|---|---|")
    for ckpt, seed in zip(args.checkpoints, args.seeds, strict=True):
        model, _ = load_model(ckpt)
        scenes = sorted(random.Random(seed).sample(range(args.val_size), args.attribution_samples))
        others = [i for i in range(args.val_size) if i not in scenes][: args.reference]
        for spec in args.methods.split(","):
            method = make_method(spec, mode="recomputed")
            reference = mean_component_maps(model, data, method, indices=others)
            plain = summarise_attribution(attribute_objects(model, data, method, indices=scenes, progress=False),
                                          model.modalities)
            contrast = summarise_attribution(
                attribute_objects(model, data, method, indices=scenes, reference=reference, progress=False),
                model.modalities)
            per = " · ".join(f"{m} {_fmt(plain, m)} -> {_fmt(contrast, m)}" for m in model.modalities)
            print(f"| {ckpt.split('/')[-1]} | {spec} | {_fmt(plain, 'overall')} | {_fmt(contrast, 'overall')} "
                  f"| {per} |", flush=True)


if __name__ == "__main__":
    main()
