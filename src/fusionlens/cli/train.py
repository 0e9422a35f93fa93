"""``fusionlens train``: train a reference fusion model (single process, or one process per device under
``torchrun --nproc_per_node N -m fusionlens.cli train ...``)."""

from __future__ import annotations

import argparse
import json
import math
from typing import Any

from fusionlens.io import check_output_path
from fusionlens.models import PRESETS, ModelConfig, preset_config
from fusionlens.train.data import DATA_KINDS, open_dataset
from fusionlens.train.loop import TrainConfig, read_resumable, train


def finite_float(text: str) -> float:
    """argparse type of a float option: ``nan`` and ``inf`` are refused at parsing (NaN compares False with every
    bound, so a later ``>= 0`` check would let it through and e.g. silently switch gradient clipping off)."""
    value = float(text)
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return value


def add_data_arguments(parser: argparse.ArgumentParser) -> None:
    """Dataset options shared by ``train`` and ``evaluate``."""
    parser.add_argument("--data", choices=(*DATA_KINDS, "kitti"), default="builtin",
                        help="dataset (default: the built-in world; kitti: a KITTI-layout folder at --dataroot)")
    parser.add_argument("--data-seed", type=int, default=0, help="seed of the built-in world / synthetic data")
    try:
        from fusionlens.data.nuscenes import add_cli_arguments
    except ImportError:  # the nuScenes extra is optional
        parser.add_argument("--dataroot", type=str, default=None, help="dataset folder (--data kitti)")
        return
    add_cli_arguments(parser)


def dataset_for(args: argparse.Namespace, split: str, size: int | None, config: ModelConfig) -> Any:
    """The dataset the options name, on the model's grid."""
    if args.data == "kitti":
        raise ValueError("--data kitti is read by 'fusionlens train --model avod' and 'fusionlens evaluate' only")
    if args.data == "nuscenes":
        from fusionlens.data.nuscenes import dataset_from_args

        return dataset_from_args(
            args, split, grid=config.grid, image_size=config.image_size, modalities=config.modalities
        )
    if args.data == "synthetic":  # the synthetic world has its own small grid
        return open_dataset("synthetic", split, size=size, seed=args.data_seed)
    return open_dataset("builtin", split, size=size, seed=args.data_seed)


def parse_key_values(values: list[str], flag: str, form: str = "MODALITY=PATH (or MODALITY=NAME)") -> dict[str, str]:
    """Repeated ``KEY=VALUE`` options as a dict; an error naming ``flag`` and the expected ``form`` otherwise."""
    out: dict[str, str] = {}
    for item in values:
        key, sep, value = item.partition("=")
        if not sep or not key or not value:
            raise ValueError(f"{flag} expects {form}, got {item!r}")
        if key in out:
            raise ValueError(f"{flag} names {key!r} twice")
        out[key] = value
    return out


def model_config_from_args(args: argparse.Namespace, data_grid: Any = None) -> ModelConfig:
    overrides: dict[str, Any] = {}
    if args.camera_depth is not None:
        overrides["camera_depth"] = args.camera_depth
    if args.camera_weights is not None:
        overrides["camera_weights"] = args.camera_weights
    if data_grid is not None:
        overrides["grid"] = data_grid
    encoders = parse_key_values(getattr(args, "point_encoder", None) or [], "--point-encoder")
    if encoders:
        overrides["point_encoders"] = encoders
    if getattr(args, "task", "segmentation") != "segmentation":
        overrides["extra_heads"] = {"centerpoint": {}}
    return preset_config(args.preset, args.modalities or "camera,radar", **overrides)


def _check_input_files(config: ModelConfig, init_from: dict[str, str], resume: bool) -> None:
    """Read every file the run will load (camera weights, --init-from checkpoints) before any data are built."""
    from fusionlens.train.checkpoint import load_checkpoint

    if config.camera_weights is not None and "camera" in config.modalities and not resume:
        from fusionlens.models.camera import read_camera_weights

        read_camera_weights(config.camera_weights, config.camera_depth)
    for path in init_from.values():
        load_checkpoint(path)


def run(args: argparse.Namespace) -> int:
    init_from = parse_key_values(args.init_from or [], "--init-from")
    inputs = {"--camera-weights": args.camera_weights, **{f"--init-from {m}": p for m, p in init_from.items()}}
    out = check_output_path("--out", args.out, inputs=inputs, sidecar_suffixes=(".metrics.json",))
    if args.model == "avod" or args.data == "kitti":
        from fusionlens.cli.kitti import run_train

        return run_train(args)
    tcfg = TrainConfig(
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        weight_decay=args.weight_decay,
        grad_clip=args.grad_clip,
        seed=args.seed,
        save_every=args.save_every,
        eval_every=args.eval_every,
        amp=not args.no_amp,
        num_workers=args.num_workers,
        device=args.device,
        task=args.task,
    )
    if out.exists() and not (args.resume or args.overwrite):
        raise ValueError(f"--out {args.out} exists: pass --resume to continue that run or --overwrite to replace it")
    if args.resume:
        read_resumable(out)  # a file that cannot be resumed is refused before the data are built
    config = model_config_from_args(args)
    _check_input_files(config, init_from, resume=args.resume)
    train_set = dataset_for(args, "train", args.train_size, config)
    grid = train_set[0].grid
    if grid != config.grid:  # train on the data's grid (the preset only sizes the network)
        config = model_config_from_args(args, grid)
    val_set = dataset_for(args, "val", args.val_size, config) if args.val_size != 0 else None
    prepare, hooks = None, (None, None)
    if init_from:
        from fusionlens.train.pretrained import backbone_initialiser, freeze_hooks

        prepare = backbone_initialiser(init_from)
        if args.freeze_steps:
            hooks = freeze_hooks(list(init_from), args.freeze_steps)
    elif args.freeze_steps:
        raise ValueError("--freeze-steps needs --init-from (which backbones to freeze)")
    result = train(
        config,
        tcfg,
        train_set,
        val_set=val_set,
        checkpoint=args.out,
        resume=args.resume,
        prepare_model=prepare,
        step_hook=hooks[0],
        after_backward=hooks[1],
        progress=not args.no_progress,
    )
    summary = {
        "checkpoint": str(result.checkpoint),
        "seconds": round(result.seconds, 1),
        "steps": result.steps,
        "final_loss": result.losses[-1] if result.losses else None,
        "val_iou": result.metrics,
    }
    print(json.dumps(summary, indent=2, default=str))
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("train", help="train a reference fusion model (SimpleBEV-style)", description=__doc__)
    p.add_argument("--modalities", default=None,
                   help="comma-separated subset of camera,radar,lidar (default camera,radar; avod: camera,lidar)")
    p.add_argument("--preset", choices=PRESETS, default="tiny", help="model size (tiny: minutes on a CPU)")
    p.add_argument(
        "--camera-depth",
        type=int,
        choices=(18, 34, 50, 101),
        default=None,
        help="ResNet depth of the camera encoder (default: the preset's)",
    )
    p.add_argument("--camera-weights", default=None, help="local torchvision ResNet state dict to start from")
    p.add_argument("--out", default="out/checkpoints/model.pt", help="checkpoint path (written atomically)")
    p.add_argument("--resume", action="store_true", help="continue the run saved in --out exactly")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out checkpoint")
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--batch-size", type=int, default=4, help="per process")
    p.add_argument("--lr", type=finite_float, default=3e-3, help="peak learning rate of the one-cycle schedule")
    p.add_argument("--weight-decay", type=finite_float, default=1e-4)
    p.add_argument("--grad-clip", type=finite_float, default=5.0, help="max gradient norm (0: no clipping)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--train-size", type=int, default=None, help="number of training samples (generated data)")
    p.add_argument("--val-size", type=int, default=None, help="number of validation samples (0: no validation)")
    p.add_argument("--save-every", type=int, default=100)
    p.add_argument("--eval-every", type=int, default=0)
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--no-amp", action="store_true", help="disable mixed precision on GPU")
    p.add_argument("--num-workers", type=int, default=0)
    p.add_argument("--no-progress", action="store_true")
    p.add_argument(
        "--init-from",
        action="append",
        metavar="MODALITY=CKPT",
        help="initialise a modality's backbone from a single-modality checkpoint (repeatable)",
    )
    p.add_argument("--freeze-steps", type=int, default=0, help="keep --init-from backbones frozen this many steps")
    p.add_argument("--task", choices=("segmentation", "detection", "both"), default="segmentation",
                   help="BEV vehicle segmentation, CenterPoint 3-D detection, or both heads trained together")
    p.add_argument("--point-encoder", action="append", metavar="MODALITY=NAME",
                   help="point backbone per modality, e.g. lidar=pillars (default: raster)")
    add_data_arguments(p)
    from fusionlens.cli.kitti import add_train_arguments

    add_train_arguments(p)
    p.set_defaults(func=run)
