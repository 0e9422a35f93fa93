"""``fusionlens reproduce <paper>``: regenerate a paper's tables on the built-in world. A small dispatcher:
each paper registers one subcommand here (``altermoma``; others may be added)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from fusionlens.io import atomic_write_text, check_output_dir


def _floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(v) for v in _floats(text))


def _names(text: str) -> tuple[str, ...]:
    """Comma-separated names; an empty text gives no names."""
    return tuple(v for v in text.split(",") if v)


def _strs(text: str) -> tuple[str, ...]:
    return tuple(v.strip() for v in text.split(";") if v.strip())


ALTERMOMA_DESCRIPTION = """AlterMOMA's pruning tables on the built-in world, resumably
(fusionlens.experiments.altermoma).

The reference models are, by default, fusion models initialised from separately pre-trained single-modality
backbones (--recipe pretrained, issue 8: a world-pretrained camera trunk, single-modality models, then the fusion
model); --recipe scratch trains them jointly from scratch. Each variant (recipe, task, LiDAR encoder, camera
depth) has its own cell tree: OUT/<tag>, e.g. OUT/pretrained-detection-pillars; the scratch / segmentation /
raster / ResNet-18 cells stay in OUT itself. results.md and ablation.png are written into that tree.

  Table 1 (detection, mAP / NDS):
    fusionlens reproduce altermoma --pairs camera,lidar --task detection
  Table 3 (BEV segmentation, IoU):
    fusionlens reproduce altermoma
  Table 4 (various backbones: PointPillars LiDAR, a deeper ResNet camera):
    fusionlens reproduce altermoma --pairs camera,lidar --task detection --lidar-encoder pillars \\
        --structured-ratios "" [--camera-depth 34]
  (structured pruning, Table 5, does not support the pillars encoder yet; Table 4 is unstructured anyway)
"""


def altermoma_config(args: argparse.Namespace) -> Any:
    """The :class:`~fusionlens.experiments.altermoma.ReproduceConfig` the command-line options describe."""
    from fusionlens.experiments.altermoma import ReproduceConfig

    cfg = ReproduceConfig(
        out_dir=args.out,
        pairs=args.pairs,
        sparsities=args.sparsities,
        seeds=args.seeds,
        structured_ratios=args.structured_ratios,
        ablation_betas=args.betas,
        train_size=args.train_size,
        val_size=args.val_size,
        reference_steps=args.reference_steps,
        ablation_pair=args.ablation_pair,
        ablation_sparsities=args.ablation_sparsities or None,
        reference_recipe=args.recipe,
        reference_freeze_steps=args.freeze_steps,
        trunk_frames=args.trunk_frames,
        trunk_steps=args.trunk_steps,
        task=args.task,
        lidar_encoder=args.lidar_encoder,
        camera_depth=args.camera_depth,
    )
    # the fine-tuning protocol's defaults live in ReproduceConfig only (imported lazily: it pulls in torch)
    if args.finetune_steps is not None:
        cfg.finetune_steps = args.finetune_steps
    if args.finetune_lr is not None:
        cfg.finetune_lr = args.finetune_lr
    if args.methods:
        cfg.methods = args.methods
    if args.structured_methods:
        cfg.structured_methods = args.structured_methods
    reading = {"reference_batches": args.altermoma_batches, "reactivation_optimizer": args.altermoma_optimizer,
               "reactivation_steps": args.altermoma_steps, "reactivation_lr": args.altermoma_lr,
               "same_batch_reri": args.altermoma_same_batches or None}
    cfg.altermoma_options = {k: v for k, v in reading.items() if v is not None}
    cfg.device = args.device
    return cfg


def run_altermoma(args: argparse.Namespace) -> int:
    if args.task == "kitti":
        from fusionlens.cli.kitti import run_reproduce

        return run_reproduce(args)
    from fusionlens.experiments.altermoma import Runner
    from fusionlens.experiments.altermoma_report import plot_ablation, summarise

    check_output_dir("--out", args.out)
    cfg = altermoma_config(args)
    runner = Runner(cfg, progress=not args.no_progress)
    runner.run()
    table = summarise(runner.out)
    atomic_write_text(runner.out / "results.md", table + "\n")
    plot_ablation(runner.out, runner.out / "ablation.png")
    print(table)
    print(f"cells, results.md and ablation.png: {runner.out}")
    return 0


def run_lmd(args: argparse.Namespace) -> int:
    import torch

    from fusionlens.experiments.lmd import LMDReproduceConfig, LMDRunner
    from fusionlens.experiments.lmd_report import summarise
    from fusionlens.train.distributed import init_distributed

    check_output_dir("--out", args.out)
    cfg = LMDReproduceConfig(
        out_dir=args.out,
        checkpoints=args.checkpoints,
        pairs=args.pairs,
        seeds=args.seeds,
        val_size=args.val_size,
        anchors=args.anchors,
        count=args.count,
        stride=args.stride,
        attribution_samples=args.attribution_samples,
        data=args.data,
    )
    if args.methods:
        cfg.methods = args.methods
    if args.attribution_methods is not None:
        cfg.attribution_methods = args.attribution_methods
    if args.modes:
        cfg.modes = args.modes
    for item in args.pair_methods:
        pair, sep, methods = item.partition("=")
        if not sep or not methods:
            raise ValueError(f"--pair-methods expects PAIR=METHOD,METHOD,..., got {item!r}")
        cfg.only_pairs_methods[pair] = tuple(methods.split(","))
    info = init_distributed(torch.device("cpu"))  # under torchrun: anchors and samples sharded over the ranks
    runner = LMDRunner(cfg, progress=not args.no_progress, info=info)
    runner.run()
    if not info.is_main:
        return 0
    table = summarise(args.out, fingerprint=runner.fingerprint)
    atomic_write_text(Path(args.out) / "results.md", table + "\n")
    print(table)
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("reproduce", help="regenerate a paper's tables on the built-in world")
    sub = p.add_subparsers(dest="paper", required=True)
    a = sub.add_parser(
        "altermoma",
        help="AlterMOMA Tables 1/3/4/5 and the appendix F ablation (resumable)",
        description=ALTERMOMA_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    a.add_argument("--out", default="out/reproduce/altermoma", help="root of the cell trees (one per variant)")
    a.add_argument(
        "--recipe",
        choices=("pretrained", "scratch"),
        default="pretrained",
        help="reference models: fusion from separately pre-trained single-modality backbones (default) or scratch",
    )
    a.add_argument(
        "--task",
        choices=("segmentation", "detection", "both", "kitti"),
        default="segmentation",
        help="segmentation: IoU (Table 3); detection: CenterPoint head, mAP / NDS (Table 1); both; kitti: the "
        "two-stage camera-LiDAR detector on a KITTI-layout --dataroot, AP-3D / AP-BEV (Tables 2 and 6)",
    )
    a.add_argument("--dataroot", default=None, help="--task kitti: the KITTI-layout folder ('fusionlens kitti export')")
    a.add_argument("--lidar-encoder", default="raster", help="raster (SimpleBEV) or pillars (PointPillars, Table 4)")
    a.add_argument("--camera-depth", type=int, default=18, help="camera ResNet depth: 18, 34, 50 or 101 (Table 4)")
    a.add_argument("--freeze-steps", type=int, default=50, help="pretrained: steps the loaded backbones stay frozen")
    a.add_argument("--trunk-frames", type=int, default=512, help="pretrained: world frames of the camera trunk")
    a.add_argument("--trunk-steps", type=int, default=600, help="pretrained: camera trunk pre-training steps")
    a.add_argument(
        "--pairs",
        type=_strs,
        default=("camera,lidar", "camera,radar"),
        help="reference models, ';'-separated (default 'camera,lidar;camera,radar')",
    )
    a.add_argument("--methods", type=lambda t: tuple(t.split(",")), default=None)
    a.add_argument("--sparsities", type=_floats, default=(0.8, 0.85, 0.9))
    a.add_argument("--seeds", type=_ints, default=(0, 1, 2))
    a.add_argument("--structured-ratios", type=_floats, default=(0.3, 0.5))
    a.add_argument("--betas", type=_floats, default=(0.0, 0.5, 1.0, 2.0, 4.0), help="beta/alpha ablation")
    a.add_argument(
        "--structured-methods",
        type=lambda t: tuple(t.split(",")),
        default=None,
        help="default magnitude,snip,prospr,altermoma",
    )
    a.add_argument("--ablation-pair", default=None, help="default: the first of --pairs")
    a.add_argument("--ablation-sparsities", type=_floats, default=None, help="default: --sparsities")
    a.add_argument("--train-size", type=int, default=192)
    a.add_argument("--val-size", type=int, default=64)
    a.add_argument("--finetune-steps", type=int, default=None, help="Adam steps after pruning (default 200)")
    a.add_argument("--finetune-lr", type=float, default=None,
                   help="Adam lr after pruning (default: the paper's 1e-4; a cell tree refuses another)")
    a.add_argument("--reference-steps", type=int, default=200)
    r = a.add_argument_group("AlterMOMA reading (cells filed under readings/; docs/altermoma.md)")
    r.add_argument("--altermoma-batches", type=int, default=None, help="n: D is n batches (DeCI, g_0, g_B)")
    r.add_argument("--altermoma-same-batches", action="store_true", help="g_B on the same batches as g_0")
    r.add_argument("--altermoma-optimizer", choices=("sgd", "adam"), default=None, help="reactivation optimiser")
    r.add_argument("--altermoma-steps", type=int, default=None, help="B, reactivation steps per modality")
    r.add_argument("--altermoma-lr", type=float, default=None, help="reactivation lr (SGD 1e-3, Adam 1e-4)")
    a.add_argument("--device", default="cpu", help="cpu or cuda: where cells and reference models compute")
    a.add_argument("--no-progress", action="store_true")
    a.set_defaults(func=run_altermoma)
    lmd = sub.add_parser(
        "lmd",
        help="LMD Tables 1-4 and ground-truth attribution (resumable)",
        description="LMD paper tables on the built-in world; see fusionlens.experiments.lmd",
    )
    lmd.add_argument("--out", default="out/reproduce/lmd", help="cells and results.md")
    lmd.add_argument("--checkpoints", default="out/checkpoints", help="folder of tiny_<pair>[_seed<s>].pt")
    lmd.add_argument(
        "--pairs", type=lambda t: tuple(t.split(",")), default=("camera-radar", "camera-lidar", "camera-radar-lidar")
    )
    lmd.add_argument(
        "--methods",
        type=lambda t: tuple(t.split(",")),
        default=None,
        help="comma-separated: naive, lmd:<rules>, shapley[-mean], lmd+shap, captum-sampling, ...",
    )
    lmd.add_argument(
        "--pair-methods",
        action="append",
        default=[],
        metavar="PAIR=M1,M2",
        help="methods for one pair instead of --methods (repeatable)",
    )
    lmd.add_argument("--attribution-methods", type=_names, default=None)
    lmd.add_argument("--seeds", type=_ints, default=(0, 1, 2))
    lmd.add_argument("--modes", type=_names, default=None,
                     help="frozen,recomputed (default both)")
    lmd.add_argument("--val-size", type=int, default=128, help="N of the pairing k + s*j mod N")
    lmd.add_argument("--data", choices=("builtin", "synthetic"), default="builtin")
    lmd.add_argument("--anchors", type=int, default=6, help="anchor samples per seed")
    lmd.add_argument("--count", type=int, default=12, help="partners per anchor (appendix: 12)")
    lmd.add_argument("--stride", type=int, default=None, help="pairing stride s (default N // 13)")
    lmd.add_argument("--attribution-samples", type=int, default=16)
    lmd.add_argument("--no-progress", action="store_true")
    lmd.set_defaults(func=run_lmd)
