"""``fusionlens pretrain camera``: pre-train the camera ResNet trunk on the built-in world's pixel semantics
(the stand-in for ImageNet weights, which cannot be downloaded here); pass the result to ``fusionlens train
--camera-weights``."""

from __future__ import annotations

import argparse
import json

from fusionlens.cli.train import finite_float


def _camera(args: argparse.Namespace) -> int:
    from fusionlens.io import check_output_path
    from fusionlens.train.camera_pretrain import CameraPretrainConfig, pretrain_camera

    check_output_path("--out", args.out, sidecar_suffixes=(".json",), sidecars=(f"{args.out}.state.pt",))
    config = CameraPretrainConfig(
        depth=args.depth, image_size=tuple(args.image_size), world_seed=args.data_seed, frames=args.frames,
        val_frames=args.val_frames, steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
    )
    report = pretrain_camera(config, args.out, resume=not args.restart, overwrite=args.overwrite,
                             progress=not args.no_progress)
    iou = report.get("val_pixel_iou", {})
    done = "reused (pre-trained earlier with these settings)" if report.get("reused") else "written"
    print(f"camera trunk {done}: {args.out} ({report['seconds']:.0f} s); val pixel IoU "
          + json.dumps({k: round(v, 3) for k, v in iou.items()}))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("pretrain", help="pre-train a backbone on the built-in world")
    kinds = parser.add_subparsers(dest="kind", required=True)
    p = kinds.add_parser("camera", help="ResNet trunk on per-pixel semantics (sky/ground/vehicle/pedestrian/other)")
    p.add_argument("--out", default="out/checkpoints/camera_trunk_r18.pt", help="torchvision state dict to write")
    p.add_argument("--depth", type=int, default=18, help="ResNet depth (18, 34, 50, 101)")
    p.add_argument("--image-size", type=int, nargs=2, default=(64, 112), metavar=("H", "W"))
    p.add_argument("--data-seed", type=int, default=0, help="seed of the built-in world")
    p.add_argument("--frames", type=int, default=256, help="train-split frames (6 images each)")
    p.add_argument("--val-frames", type=int, default=32)
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--batch-size", type=int, default=4, help="frames per step")
    p.add_argument("--lr", type=finite_float, default=2e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--restart", action="store_true", help="ignore a partial run's state file")
    p.add_argument("--overwrite", action="store_true", help="replace a finished trunk made with other settings")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_camera)
