"""Reference models on the built-in world (issues 3 and 8): train the tiny camera-only, radar-only, LiDAR-only,
camera-radar, camera-LiDAR and three-modality models with one schedule, then (``--pretrained``) the camera-radar
and camera-LiDAR models initialised from the single-modality backbones, and measure cross-modality redundancy.

    nice -n 10 python benchmarks/train_reference.py --steps 300 --train-size 512 --val-size 128
    nice -n 10 python benchmarks/train_reference.py ... --pretrained        # issue 8 (trains what is missing)

Checkpoints land in ``--out-dir`` (default ``out/checkpoints``) as ``tiny_<name>.pt`` with ``.metrics.json``;
``reference.json`` / ``pretrained.json`` there collect the numbers, and a Markdown table is printed. A model whose
checkpoint already holds the same config and schedule is not retrained (``--force`` retrains) and one cut off
mid-schedule continues from its last save, so an interrupted run loses at most ``save_every`` steps.
Each checkpoint is also reproducible by one command, printed next to it, e.g.
``fusionlens train --preset tiny --modalities camera,radar --steps 300 --train-size 512 --val-size 128
--out out/checkpoints/tiny_camera_radar.pt``.
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from fusionlens.io import atomic_write_json
from fusionlens.models import preset_config
from fusionlens.train.camera_pretrain import CameraPretrainConfig, pretrain_camera
from fusionlens.train.checkpoint import load_checkpoint, load_model
from fusionlens.train.data import open_dataset
from fusionlens.train.loop import TrainConfig, train
from fusionlens.train.pretrained import backbone_initialiser, freeze_hooks
from fusionlens.train.redundancy import redundancy_report

MODELS: dict[str, str] = {
    "camera": "camera",
    "radar": "radar",
    "lidar": "lidar",
    "camera_radar": "camera,radar",
    "camera_lidar": "camera,lidar",
    "camera_radar_lidar": "camera,radar,lidar",
}
PRETRAINED: dict[str, dict[str, str]] = {
    "camera_radar_pre": {"camera": "camera", "radar": "radar"},
    "camera_lidar_pre": {"camera": "camera", "lidar": "lidar"},
}
COND_COLUMNS = (
    "day",
    "dusk",
    "night",
    "rain",
    "fog",
    "glare",
    "camera_blackout",
    "lens_occlusion",
    "radar_dropout",
    "lidar_beam_loss",
)


def _command(name: str, mods: str, args: argparse.Namespace, extra: str = "", seed: int = 0) -> str:
    extra = (f" --seed {seed}" if seed else "") + extra
    weights = f" --camera-weights {args.camera_trunk}" if "camera" in mods and args.camera_trunk else ""
    return (
        f"fusionlens train --preset tiny --modalities {mods} --steps {args.steps} --batch-size "
        f"{args.batch_size} --lr {args.lr} --train-size {args.train_size} --val-size {args.val_size} "
        f"--out {args.out_dir}/tiny_{name}.pt{weights}{extra}"
    )


def _camera_trunk(args: argparse.Namespace) -> None:
    """The world-pretrained camera trunk every camera model starts from (``fusionlens pretrain camera``)."""
    if not args.camera_trunk:
        return
    config = CameraPretrainConfig(world_seed=args.data_seed, frames=args.trunk_frames, steps=args.trunk_steps)
    if not Path(args.camera_trunk).is_file():
        print(f"== camera trunk: fusionlens pretrain camera --frames {args.trunk_frames} --steps {args.trunk_steps} "
              f"--data-seed {args.data_seed} --out {args.camera_trunk}", flush=True)
    report = pretrain_camera(config, args.camera_trunk, progress=not args.no_progress)  # reused if already made
    print("camera trunk val pixel IoU", json.dumps(report["val_pixel_iou"]), flush=True)


def _train_one(
    name: str,
    mods: str,
    tcfg: TrainConfig,
    data: tuple[Any, Any],
    args: argparse.Namespace,
    init_from: dict[str, str] | None = None,
) -> dict[str, Any]:
    path = Path(args.out_dir) / f"tiny_{name}.pt"
    grid = data[0][0].grid
    weights = {"camera_weights": args.camera_trunk} if "camera" in mods and args.camera_trunk else {}
    config = preset_config("tiny", mods, grid=grid, **weights)
    resume = False
    if path.is_file() and not args.force:
        payload = load_checkpoint(path)
        same = payload["model_config"] == config.to_dict() and payload["train_config"] and {
            k: payload["train_config"].get(k) for k in ("steps", "batch_size", "lr", "seed")
        } == {"steps": tcfg.steps, "batch_size": tcfg.batch_size, "lr": tcfg.lr, "seed": tcfg.seed}
        if same and payload["step"] == tcfg.steps and payload["metrics"]:
            seconds = json.loads(path.with_suffix(".metrics.json").read_text())["seconds"]
            print(f"{name}: reusing {path}", flush=True)
            return {
                "name": name,
                "modalities": mods,
                "metrics": payload["metrics"],
                "seconds": seconds,
                "checkpoint": str(path),
            }
        resume = bool(same) and payload["step"] < tcfg.steps  # an interrupted run continues exactly
    prepare, hooks = None, (None, None)
    extra = ""
    if init_from:
        prepare = backbone_initialiser(init_from)
        hooks = freeze_hooks(list(init_from), args.freeze_steps)
        extra = "".join(f" --init-from {m}={p}" for m, p in init_from.items())
        extra += f" --freeze-steps {args.freeze_steps}"
    print(f"== {name} ({mods}): {_command(name, mods, args, extra, tcfg.seed)}", flush=True)
    res = train(
        config,
        tcfg,
        data[0],
        val_set=data[1],
        checkpoint=path,
        resume=resume,
        prepare_model=prepare,
        step_hook=hooks[0],
        after_backward=hooks[1],
        progress=not args.no_progress,
    )
    print(f"{name}: val IoU {res.metrics['all']:.4f} in {res.seconds:.0f} s", flush=True)
    return {
        "name": name,
        "modalities": mods,
        "metrics": res.metrics,
        "seconds": res.seconds,
        "checkpoint": str(path),
        "command": _command(name, mods, args, extra, tcfg.seed),
    }


def table(rows: list[dict[str, Any]]) -> str:
    conds = [c for c in COND_COLUMNS if any(f"cond/{c}" in r["metrics"] for r in rows)]
    dists = sorted(
        {k for r in rows for k in r["metrics"] if k.startswith("dist/")},
        key=lambda k: float(k.split("/")[1].split("-")[0]),
    )
    head = ["model", "IoU"] + conds + [d[5:] for d in dists] + ["train s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        m = r["metrics"]
        vals = [m["all"]] + [m.get(f"cond/{c}", math.nan) for c in conds] + [m.get(d, math.nan) for d in dists]
        cells = [r["name"]] + [f"{100 * v:.1f}" if math.isfinite(v) else "-" for v in vals]
        lines.append("| " + " | ".join(cells + [f"{r['seconds']:.0f}"]) + " |")
    return "\n".join(lines)


def redundancy_table(report: dict[str, dict[str, dict[str, float]]]) -> str:
    lines = [
        "| model | masked backbone | full IoU | masked IoU | after reactivation | recovered |",
        "|---|---|---|---|---|---|",
    ]
    for name, per_mod in report.items():
        for mod, r in per_mod.items():
            lines.append(
                f"| {name} | {mod} | {100 * r['full_iou']:.1f} | {100 * r['masked_iou']:.1f} | "
                f"{100 * r['reactivated_iou']:.1f} | {r['recovered']:.2f} |"
            )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--train-size", type=int, default=512)
    ap.add_argument("--val-size", type=int, default=128)
    ap.add_argument("--data-seed", type=int, default=0)
    ap.add_argument("--out-dir", default="out/checkpoints")
    ap.add_argument("--only", default=None, help="comma-separated model names (default: all six)")
    ap.add_argument("--pretrained", action="store_true", help="issue 8: fusion from pre-trained backbones")
    ap.add_argument("--freeze-steps", type=int, default=50)
    ap.add_argument("--redundancy-steps", type=int, default=20)
    ap.add_argument("--redundancy-size", type=int, default=64, help="validation samples for redundancy IoUs")
    ap.add_argument("--camera-trunk", default="out/checkpoints/camera_trunk_r18.pt",
                    help="world-pretrained camera trunk (made first if missing); '' trains cameras from scratch")
    ap.add_argument("--trunk-steps", type=int, default=600)
    ap.add_argument("--trunk-frames", type=int, default=512)
    ap.add_argument("--extra-seeds", default="", help="also train these seeds (e.g. 1,2) of --seed-models, as "
                    "tiny_<name>_seed<s>.pt: the per-seed models of the LMD reproduction and the seed spread")
    ap.add_argument("--seed-models", default="radar,lidar,camera_radar,camera_lidar")
    ap.add_argument("--force", action="store_true")
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    tcfg = TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr, save_every=50)
    data = (
        open_dataset("builtin", "train", size=args.train_size, seed=args.data_seed),
        open_dataset("builtin", "val", size=args.val_size, seed=args.data_seed),
    )
    out = Path(args.out_dir)
    names = args.only.split(",") if args.only else list(MODELS)
    unknown = sorted(set(names) - set(MODELS))
    if unknown:
        raise SystemExit(f"--only: unknown models {unknown}; known {list(MODELS)}")
    _camera_trunk(args)
    seed_names = [n for n in args.seed_models.split(",") if n]
    if sorted(set(seed_names) - set(MODELS)):
        raise SystemExit(f"--seed-models: unknown models {sorted(set(seed_names) - set(MODELS))}")
    if not args.pretrained:
        rows = [_train_one(n, MODELS[n], tcfg, data, args) for n in names]
        atomic_write_json(out / "reference.json", {"args": vars(args), "rows": rows})
        print(table(rows))
        _seed_models(seed_names, tcfg, data, args)
        return
    # the recipe in one command: single-modality backbones and scratch fusion models (reused when present),
    # then the fusion models initialised from the backbones
    base = [_train_one(n, MODELS[n], tcfg, data, args) for n in MODELS]
    rows = []
    for name, sources in PRETRAINED.items():
        init = {m: str(out / f"tiny_{src}.pt") for m, src in sources.items()}
        rows.append(_train_one(name, ",".join(sources), tcfg, data, args, init_from=init))
    report: dict[str, Any] = {}
    red_val = torch.utils.data.Subset(data[1], range(min(args.redundancy_size, len(data[1]))))
    for name in ("camera_radar", "camera_radar_pre", "camera_lidar", "camera_lidar_pre"):
        model, _ = load_model(out / f"tiny_{name}.pt")
        report[name] = redundancy_report(
            model,
            data[0],
            red_val,
            steps=args.redundancy_steps,
            batch_size=args.batch_size,
            progress=not args.no_progress,
        )
        print(name, json.dumps(report[name]), flush=True)
    atomic_write_json(out / "pretrained.json", {"args": vars(args), "rows": base + rows, "redundancy": report})
    print(table(base + rows))
    print(redundancy_table(report))
    _seed_models(seed_names, tcfg, data, args)


def _seed_models(names: list[str], tcfg: TrainConfig, data: tuple[Any, Any], args: argparse.Namespace) -> None:
    """``--extra-seeds``: the same models trained with other seeds (``tiny_<name>_seed<s>.pt``)."""
    seeds = [int(v) for v in args.extra_seeds.split(",") if v.strip()]
    rows = [_train_one(f"{n}_seed{s}", MODELS[n], replace(tcfg, seed=s), data, args) for s in seeds for n in names]
    if rows:
        atomic_write_json(Path(args.out_dir) / "seeds.json", {"args": vars(args), "rows": rows})
        print(table(rows))


if __name__ == "__main__":
    main()
