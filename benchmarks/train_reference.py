"""Reference models on the built-in world: train the tiny camera-only, radar-only, LiDAR-only, camera-radar,
camera-LiDAR and three-modality models with one schedule, then (``--pretrained``) the camera-radar and camera-LiDAR
models initialised from the single-modality backbones, and measure cross-modality redundancy.

    nice -n 10 python benchmarks/train_reference.py --steps 300 --train-size 512 --val-size 128
    nice -n 10 python benchmarks/train_reference.py ... --pretrained        # (trains what is missing)

The models are the reference-model cache of ``fusionlens.experiments.reference_models`` (the one ``fusionlens
reproduce lmd`` reads): ``--out-dir`` (default ``out/checkpoints``) holds ``tiny_<modalities>[_pre][_seed<s>].pt``
(e.g. ``tiny_camera-radar_pre.pt``) with ``.metrics.json``; ``reference.json`` / ``pretrained.json`` there collect
the numbers, and a Markdown table is printed. A model whose checkpoint already holds the same config and schedule
is not retrained, one cut off mid-schedule continues from its last save (an interrupted run loses at most
``save_every`` steps), and one made with other settings is refused with the differences (``--force`` retrains).
Each checkpoint is also reproducible by one command, printed next to it, e.g.
``fusionlens train --preset tiny --modalities camera,radar --steps 300 --train-size 512 --val-size 128
--out out/checkpoints/tiny_camera-radar.pt``.
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from fusionlens.experiments.reference_models import camera_trunk, checkpoint_name, train_cached
from fusionlens.io import atomic_write_json
from fusionlens.modalities import combination_name, parse_modalities
from fusionlens.models import preset_config
from fusionlens.train.checkpoint import load_model
from fusionlens.train.data import open_dataset
from fusionlens.train.loop import TrainConfig
from fusionlens.train.redundancy import redundancy_report

#: the reference models by the one spelling of their modalities (fusionlens.modalities.combination_name)
MODELS: tuple[str, ...] = ("camera", "radar", "lidar", "camera-radar", "camera-lidar", "camera-radar-lidar")
#: the fusion models also made from the single-modality models' backbones (``--pretrained``)
PRETRAINED: tuple[str, ...] = ("camera-radar", "camera-lidar")
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


def _path(name: str, args: argparse.Namespace, pretrained: bool = False, seed: int = 0) -> Path:
    return Path(args.out_dir) / checkpoint_name(name, pretrained=pretrained, seed=seed or None)


def _command(name: str, args: argparse.Namespace, path: Path, extra: str = "", seed: int = 0) -> str:
    extra = (f" --seed {seed}" if seed else "") + extra
    weights = f" --camera-weights {args.camera_trunk}" if "camera" in name and args.camera_trunk else ""
    return (
        f"fusionlens train --preset tiny --modalities {','.join(parse_modalities(name))} --steps {args.steps} "
        f"--batch-size {args.batch_size} --lr {args.lr} --train-size {args.train_size} --val-size {args.val_size} "
        f"--out {path}{weights}{extra}"
    )


def _camera_trunk(args: argparse.Namespace) -> None:
    """The world-pretrained camera trunk every camera model starts from (``fusionlens pretrain camera``)."""
    if not args.camera_trunk:
        return
    if not Path(args.camera_trunk).is_file():
        print(f"== camera trunk: fusionlens pretrain camera --frames {args.trunk_frames} --steps {args.trunk_steps} "
              f"--data-seed {args.data_seed} --out {args.camera_trunk}", flush=True)
    report = camera_trunk(args.camera_trunk, depth=18, frames=args.trunk_frames, steps=args.trunk_steps,
                          world_seed=args.data_seed, progress=not args.no_progress)  # reused if already made
    print("camera trunk val pixel IoU", json.dumps(report["val_pixel_iou"]), flush=True)


def _train_one(
    name: str,
    tcfg: TrainConfig,
    data: tuple[Any, Any],
    args: argparse.Namespace,
    pretrained: bool = False,
) -> dict[str, Any]:
    """One model of the cache (fusionlens.experiments.reference_models.train_cached): reused when made with these
    settings, continued when cut off, trained otherwise; a file made with other settings is refused (--force
    retrains it)."""
    mods = parse_modalities(name)
    path = _path(name, args, pretrained, tcfg.seed)
    weights = {"camera_weights": args.camera_trunk} if "camera" in mods and args.camera_trunk else {}
    config = preset_config("tiny", mods, grid=data[0][0].grid, **weights)
    init_from, extra = None, ""
    if pretrained:
        init_from = {m: str(_path(m, args)) for m in mods}
        extra = "".join(f" --init-from {m}={p}" for m, p in init_from.items()) + f" --freeze-steps {args.freeze_steps}"
    label = f"{combination_name(mods)}{' (pre-trained backbones)' if pretrained else ''}"
    command = _command(name, args, path, extra, tcfg.seed)
    print(f"== {label}: {command}", flush=True)
    train_cached(path, config, tcfg, data[0], val_set=data[1], init_from=init_from, freeze_steps=args.freeze_steps,
                 force=args.force, progress=not args.no_progress)
    report = json.loads(path.with_suffix(".metrics.json").read_text())
    print(f"{label}: val IoU {report['metrics']['all']:.4f} in {report['seconds']:.0f} s", flush=True)
    return {"name": path.stem.removeprefix("tiny_"), "modalities": ",".join(mods), "metrics": report["metrics"],
            "seconds": report["seconds"], "checkpoint": str(path), "command": command}


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
    ap.add_argument("--seed-models", default="radar,lidar,camera-radar,camera-lidar")
    ap.add_argument("--force", action="store_true", help="retrain models cached with other settings")
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
    names = _models("--only", args.only) if args.only else list(MODELS)
    seed_names = _models("--seed-models", args.seed_models)
    _camera_trunk(args)
    if not args.pretrained:
        rows = [_train_one(n, tcfg, data, args) for n in names]
        atomic_write_json(out / "reference.json", {"args": vars(args), "rows": rows})
        print(table(rows))
        _seed_models(seed_names, tcfg, data, args)
        return
    # the recipe in one command: single-modality backbones and scratch fusion models (reused when present),
    # then the fusion models initialised from the backbones
    base = [_train_one(n, tcfg, data, args) for n in MODELS]
    rows = [_train_one(name, tcfg, data, args, pretrained=True) for name in PRETRAINED]
    report: dict[str, Any] = {}
    red_val = torch.utils.data.Subset(data[1], range(min(args.redundancy_size, len(data[1]))))
    for pair, pretrained in ((p, pre) for p in PRETRAINED for pre in (False, True)):
        path = _path(pair, args, pretrained)
        name = path.stem.removeprefix("tiny_")
        model, _ = load_model(path)
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


def _models(flag: str, text: str) -> list[str]:
    """Model names from a comma list of modality combinations (``camera-radar,lidar``; ``camera_radar`` reads too)."""
    try:
        names = [combination_name(n) for n in text.split(",") if n.strip()]
    except ValueError as exc:
        raise SystemExit(f"{flag}: {exc}") from None
    unknown = sorted(set(names) - set(MODELS))
    if unknown:
        raise SystemExit(f"{flag}: unknown models {unknown}; known {list(MODELS)}")
    return names


def _seed_models(names: list[str], tcfg: TrainConfig, data: tuple[Any, Any], args: argparse.Namespace) -> None:
    """``--extra-seeds``: the same models trained with other seeds (``tiny_<name>_seed<s>.pt``)."""
    seeds = [int(v) for v in args.extra_seeds.split(",") if v.strip()]
    rows = [_train_one(n, replace(tcfg, seed=s), data, args) for s in seeds for n in names]
    if rows:
        atomic_write_json(Path(args.out_dir) / "seeds.json", {"args": vars(args), "rows": rows})
        print(table(rows))


if __name__ == "__main__":
    main()
