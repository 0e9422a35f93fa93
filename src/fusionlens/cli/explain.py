"""``fusionlens explain``: LMD explanation panels (PNG + JSON) for chosen samples of a checkpoint's data."""

from __future__ import annotations

import argparse
from pathlib import Path

from fusionlens.cli.train import add_data_arguments, dataset_for
from fusionlens.io import check_output_dir
from fusionlens.train.checkpoint import load_model


def split_size(args: argparse.Namespace) -> int | None:
    """The split size to open: ``--size``, else (generated data) just enough for the largest ``--samples``, which
    may not exceed the split's default size -- a typo such as ``--samples 100000000`` would otherwise start
    generating 10^8 samples."""
    if any(i < 0 for i in args.samples):
        raise ValueError(f"--samples must be >= 0, got {args.samples}")
    if args.size is not None or args.data == "nuscenes":
        return args.size
    from fusionlens.data.builtin import DEFAULT_SPLIT_SIZES

    limit = DEFAULT_SPLIT_SIZES[args.split]
    if max(args.samples) >= limit:
        raise ValueError(f"--samples {max(args.samples)} is beyond the {limit} samples of the default {args.split} "
                         f"split; pass --size to generate a larger split (every sample up to the index is made)")
    return max(args.samples) + 1


def run(args: argparse.Namespace) -> int:
    from fusionlens.evaluate.attribution import Visibility
    from fusionlens.evaluate.explain import explain_world_sample
    from fusionlens.io import atomic_write_json
    from fusionlens.viz import explanation_figure

    check_output_dir("--out", args.out)
    size = split_size(args)
    model, _ = load_model(args.checkpoint)
    if args.layer not in dict(model.named_modules()):
        raise ValueError(f"--layer {args.layer!r} is not a module of the model (e.g. fusion, decoder, heads.seg)")
    dataset = dataset_for(args, args.split, size, model.config)
    bad = [i for i in args.samples if not 0 <= i < len(dataset)]
    if bad:
        raise ValueError(f"--samples {bad} outside the {args.split} split of {len(dataset)} samples")
    vis = Visibility(args.min_camera_pixels, args.min_points)
    for i in args.samples:
        name = f"{args.split}-{i:05d}"
        e = explain_world_sample(model, dataset[i], rules=args.rules, cam_layer=args.layer, visibility=vis, name=name)
        explanation_figure(Path(args.out) / f"{name}.png", e)
        atomic_write_json(Path(args.out) / f"{name}.json", e.to_dict())
        print(f"{Path(args.out) / name}.png: {e.extra['boxes_in_grid']} objects in the grid, "
              f"{len(e.extra['single_sensor'])} seen by one sensor; conservation error {e.conservation_error:.2e}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("explain", help="LMD panels: which sensor found which object (PNG + JSON)",
                              description=__doc__)
    p.add_argument("--checkpoint", required=True, help="a checkpoint written by 'fusionlens train'")
    p.add_argument("--samples", type=int, nargs="+", default=[0], help="sample indices of the split")
    p.add_argument("--split", default="val", choices=("train", "val", "test"))
    p.add_argument("--size", type=int, default=None, help="split size for generated data (default: enough)")
    p.add_argument("--out", default="out/explain", help="folder for <split>-<index>.png / .json")
    p.add_argument("--rules", default="paper", help="LMD rules preset (default: paper)")
    p.add_argument("--layer", default="fusion", help="module for the Grad-CAM row (default: fusion)")
    p.add_argument("--min-camera-pixels", type=int, default=1, help="camera 'saw' an object from this many pixels")
    p.add_argument("--min-points", type=int, default=1, help="radar/LiDAR 'saw' an object from this many points")
    add_data_arguments(p)
    p.set_defaults(func=run)
