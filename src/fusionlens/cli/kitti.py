"""``fusionlens kitti export``: write the built-in world as a KITTI 3-D object split; ``fusionlens kitti tables``:
AlterMOMA's KITTI Tables 2 / 6 on such a split (:mod:`fusionlens.experiments.kitti`); and the KITTI paths of
``fusionlens train --data kitti --model avod`` / ``fusionlens evaluate --data kitti`` (the two-stage AVOD-style
detector on a KITTI-layout folder, evaluated by the benchmark's rules)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TYPE_CHECKING

from fusionlens.io import atomic_write_json, atomic_write_text

if TYPE_CHECKING:
    from fusionlens.experiments.kitti import KittiProtocol

KITTI_MODALITIES = ("camera", "lidar")


def _modalities(text: str | None) -> tuple[str, ...]:
    names = tuple(m.strip() for m in (text or "camera,lidar").split(",") if m.strip())
    bad = [m for m in names if m not in KITTI_MODALITIES]
    if bad or not names:
        raise ValueError(f"--modalities for the KITTI detector: {bad or 'none'}; choose from camera,lidar")
    return names


def _classes(text: str) -> tuple[str, ...]:
    return tuple(c.strip() for c in text.split(",") if c.strip())


def _dataroot(args: argparse.Namespace) -> str:
    if not getattr(args, "dataroot", None):
        raise ValueError("KITTI data need --dataroot (the folder with training/ and ImageSets/; "
                         "'fusionlens kitti export' writes one from the built-in world)")
    return args.dataroot


def run_train(args: argparse.Namespace) -> int:
    """``fusionlens train --data kitti --model avod``."""
    from fusionlens.data.kitti import KittiDataset
    from fusionlens.models.avod import avod_preset
    from fusionlens.train.avod import evaluate_avod, train_avod

    if getattr(args, "data", "kitti") != "kitti":
        raise ValueError("--model avod trains on KITTI-layout data: pass --data kitti --dataroot PATH")
    classes = _classes(args.classes)
    cfg = avod_preset(args.preset, modalities=_modalities(args.modalities), classes=classes,
                      anchor_sizes=tuple((1.6, 3.9, 1.56) if c == "Car" else (0.6, 0.8, 1.73) for c in classes),
                      anchor_z=tuple(-0.9 for _ in classes))
    root = _dataroot(args)
    if Path(args.out).exists() and not args.overwrite:
        raise ValueError(f"--out {args.out} exists: pass --overwrite to replace it")
    train_set = KittiDataset(root, "train", classes=classes)
    val_set = KittiDataset(root, "val", classes=classes) if (Path(root) / "ImageSets" / "val.txt").is_file() \
        and args.val_size != 0 else None
    from fusionlens.cli.train import parse_key_values

    init_from = parse_key_values(args.init_from or [], "--init-from")
    model, info = train_avod(cfg, train_set, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                             weight_decay=args.weight_decay, seed=args.seed, checkpoint=args.out,
                             init_from=init_from, progress=not args.no_progress)
    summary = {"checkpoint": str(args.out), **info}
    if val_set is not None:
        summary["val"] = evaluate_avod(model, val_set).to_dict()
    print(json.dumps(summary, indent=2, default=str))
    return 0


def run_evaluate(args: argparse.Namespace) -> int:
    """``fusionlens evaluate --data kitti --dataroot PATH --checkpoint CKPT``."""
    from fusionlens.data.kitti import KittiDataset
    from fusionlens.train.avod import evaluate_avod, load_avod

    model, payload = load_avod(args.checkpoint)
    dataset = KittiDataset(_dataroot(args), args.split, classes=model.cfg.classes)
    result = evaluate_avod(model, dataset, batch_size=args.batch_size,
                           recall_points=getattr(args, "recall_points", 40))
    report = {"checkpoint": str(args.checkpoint), "split": args.split, "samples": len(dataset),
              "step": payload.get("step"), "modalities": list(model.cfg.modalities), "kitti": result.to_dict()}
    if args.out:
        atomic_write_json(args.out, report)
    print(result.table())
    print(json.dumps(report, default=str))
    return 0


def run_export(args: argparse.Namespace) -> int:
    from fusionlens.world.kitti_export import EXPORT_CONFIG, export_kitti

    cfg = EXPORT_CONFIG if args.image_size is None else EXPORT_CONFIG.with_(image_size=tuple(args.image_size))
    sizes = {k: v for k, v in (("train", args.train), ("val", args.val), ("test", args.test)) if v}
    root = export_kitti(args.out, sizes, cfg=cfg, seed=args.seed, dontcare_beyond=args.dontcare_beyond,
                        progress=not args.no_progress)
    print(json.dumps({"root": str(root), "frames": sizes, "image_size": list(cfg.image_size)}))
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("kitti", help="KITTI-layout data from the built-in world", description=__doc__)
    sub = p.add_subparsers(dest="kitti_command", required=True)
    e = sub.add_parser("export", help="write the world's front camera + LiDAR as a KITTI 3-D object split")
    e.add_argument("--out", required=True, help="new or empty folder (a folder written with the same settings is "
                                                "completed, one with other settings refused)")
    e.add_argument("--train", type=int, default=200, help="frames of the world's train split")
    e.add_argument("--val", type=int, default=50, help="frames of the world's val split")
    e.add_argument("--test", type=int, default=0, help="frames of the world's test split")
    e.add_argument("--seed", type=int, default=0, help="world seed")
    e.add_argument("--image-size", type=int, nargs=2, metavar=("H", "W"), default=None,
                   help="front camera size (default 128 224)")
    e.add_argument("--dontcare-beyond", type=float, default=50.0, help="objects farther ahead become DontCare")
    e.add_argument("--no-progress", action="store_true")
    e.set_defaults(func=run_export)
    t = sub.add_parser("tables", help="AlterMOMA Tables 2 / 6: the AVOD-style detector pruned by every method")
    t.add_argument("--dataroot", required=True, help="KITTI-layout folder (train and val splits)")
    t.add_argument("--out", required=True, help="folder of reference checkpoints, cells and tables.md")
    t.add_argument("--methods", default="imp,synflow,snip,prospr,altermoma")
    t.add_argument("--sparsities", default="0.8,0.9")
    t.add_argument("--seeds", default="0,1,2")
    t.add_argument("--classes", default="Car,Pedestrian")
    t.add_argument("--preset", choices=("tiny", "paper"), default="tiny")
    t.add_argument("--reference-steps", type=int, default=1200)
    t.add_argument("--finetune-steps", type=int, default=100)
    t.add_argument("--finetune-lr", type=float, default=1e-4, help="the paper's Adam learning rate")
    t.add_argument("--scoring-batches", type=int, default=4)
    t.add_argument("--no-progress", action="store_true")
    t.set_defaults(func=run_tables)


def _tables(dataroot: str, out: str | Path, protocol: KittiProtocol, methods: tuple[str, ...],
            sparsities: list[float], seeds: list[int], progress: bool) -> int:
    from fusionlens.experiments.kitti import KittiTables

    text = KittiTables(dataroot, out, protocol, progress=progress).run(methods, sparsities, seeds)
    atomic_write_text(Path(out) / "tables.md", text + "\n")
    print(text)
    return 0


def run_tables(args: argparse.Namespace) -> int:
    from fusionlens.experiments.kitti import KittiProtocol

    protocol = KittiProtocol(preset=args.preset, classes=_classes(args.classes), reference_steps=args.reference_steps,
                             finetune_steps=args.finetune_steps, finetune_lr=args.finetune_lr,
                             scoring_batches=args.scoring_batches)
    return _tables(args.dataroot, args.out, protocol, _classes(args.methods),
                   [float(v) for v in args.sparsities.split(",")], [int(v) for v in args.seeds.split(",")],
                   not args.no_progress)


def run_reproduce(args: argparse.Namespace) -> int:
    """``fusionlens reproduce altermoma --task kitti --dataroot PATH``: the same tables from that command's options
    (written under ``--out``/kitti; fine-tuning defaults: 100 steps at the paper's lr 1e-4)."""
    from fusionlens.experiments.kitti import PAPER_METHODS, KittiProtocol

    protocol = KittiProtocol(reference_steps=args.reference_steps,
                             finetune_steps=100 if args.finetune_steps is None else args.finetune_steps,
                             finetune_lr=1e-4 if args.finetune_lr is None else args.finetune_lr)
    return _tables(_dataroot(args), Path(args.out) / "kitti", protocol, tuple(args.methods or PAPER_METHODS),
                   list(args.sparsities), list(args.seeds), not args.no_progress)


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    """The options ``fusionlens train`` adds for the KITTI detector."""
    parser.add_argument("--model", choices=("bev", "avod"), default="bev",
                        help="bev: the BEV fusion model (default); avod: the two-stage camera-LiDAR detector "
                             "(with --data kitti)")
    parser.add_argument("--classes", default="Car,Pedestrian", help="KITTI classes the AVOD detector learns")
