"""``fusionlens world generate|show``: build the built-in dataset cache, or draw samples as PNGs."""

from __future__ import annotations

import argparse
import warnings

from fusionlens.data.sample import BEVGrid
from fusionlens.io import check_output_dir
from fusionlens.world.config import WorldConfig
from fusionlens.world.generate import SPLITS


def _pairs(items: list[str], flag: str) -> dict[str, float]:
    out = {}
    for item in items:
        name, sep, value = item.partition("=")
        try:
            out[name] = float(value)
        except ValueError:
            sep = ""
        if not sep:
            raise ValueError(f"{flag} expects NAME=PROBABILITY, got {item!r}")
    return out


def config_from_args(args: argparse.Namespace) -> WorldConfig:
    """A validated WorldConfig from the shared world options."""
    cfg = WorldConfig.paper() if args.paper else WorldConfig()
    changes: dict = {}
    if args.image_size:
        changes["image_size"] = tuple(args.image_size)
    if args.grid_shape:
        changes["grid"] = BEVGrid(bounds=cfg.grid.bounds, shape=tuple(args.grid_shape))
    if args.condition:
        changes["condition_probs"] = {**cfg.condition_probs, **_pairs(args.condition, "--condition")}
    if args.time:
        changes["time_probs"] = _pairs(args.time, "--time")
    return cfg.with_(**changes) if changes else cfg


def _add_world_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--split", choices=SPLITS, default="train")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--paper", action="store_true", help="the papers' resolution (224x400 images, 200x200x8)")
    p.add_argument("--image-size", type=int, nargs=2, metavar=("H", "W"))
    p.add_argument("--grid-shape", type=int, nargs=3, metavar=("X", "Y", "Z"))
    p.add_argument("--condition", action="append", default=[], metavar="NAME=P",
                   help="probability of a condition, e.g. fog=1 (repeatable)")
    p.add_argument("--time", action="append", default=[], metavar="NAME=P",
                   help="weight of a time of day, e.g. night=1 (repeatable)")


def _generate(args: argparse.Namespace) -> int:
    from fusionlens.data.builtin import BuiltinWorld

    cfg = config_from_args(args)
    with warnings.catch_warnings():  # the damaged shards' warning: printed below, one line each
        warnings.simplefilter("ignore")
        ds = BuiltinWorld(args.split, size=args.size, config=cfg, seed=args.seed, cache_dir=args.cache_dir,
                          shard_size=args.shard_size, workers=args.workers, progress=not args.quiet)
    for path, why in ds.repaired:
        print(f"repaired {path}: {why}")
    print(f"{args.split}: {len(ds)} samples cached in {ds.split_dir}"
          + (f" ({len(ds.repaired)} damaged shard(s) regenerated)" if ds.repaired else ""))
    return 0


def _show(args: argparse.Namespace) -> int:
    from fusionlens.viz.world import plot_sample
    from fusionlens.world.generate import generate_sample

    cfg = config_from_args(args)
    if any(i < 0 for i in args.index):
        raise ValueError(f"--index values must be >= 0, got {args.index}")
    out = check_output_dir("--out", args.out)
    for i in args.index:
        path = plot_sample(generate_sample(cfg, args.seed, args.split, i), out / f"world-{args.split}-{i:05d}.png")
        print(path)
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    world = subparsers.add_parser("world", help="the built-in simulated driving world")
    sub = world.add_subparsers(dest="world_command", required=True)
    gen = sub.add_parser("generate", help="generate and cache a split of the built-in dataset")
    _add_world_options(gen)
    gen.add_argument("--size", type=int, default=None, help="samples (default: 1000 train, 200 val/test)")
    gen.add_argument("--cache-dir", default=None, help="default: $FUSIONLENS_CACHE or ~/.cache/fusionlens")
    gen.add_argument("--shard-size", type=int, default=64)
    gen.add_argument("--workers", type=int, default=None, help="generation processes (default: up to 4)")
    gen.add_argument("--quiet", action="store_true")
    gen.set_defaults(func=_generate)
    show = sub.add_parser("show", help="write a PNG per sample: camera mosaic and BEV with points and boxes")
    _add_world_options(show)
    show.add_argument("--index", type=int, nargs="+", default=[0, 1, 2, 3])
    show.add_argument("--out", default="out/world")
    show.set_defaults(func=_show)
