"""``fusionlens audit``: which sensor a checkpoint relies on, where, and when it fails -- a static HTML report
(``<out>/index.html``) with every number in ``audit.json`` and CSV files beside it (:func:`fusionlens.audit.audit`).
An interrupted audit resumes from its cached per-sample results in ``<out>/cache``."""

from __future__ import annotations

import argparse
from pathlib import Path

from fusionlens.cli.train import add_data_arguments, dataset_for, finite_float, parse_key_values
from fusionlens.io import check_output_dir
from fusionlens.train.checkpoint import load_model


def run(args: argparse.Namespace) -> int:
    from fusionlens.audit import audit
    from fusionlens.evaluate.attribution import Visibility

    check_output_dir("--out", args.out)
    partner_paths = parse_key_values(args.partner, "--partner", "NAME=CHECKPOINT (e.g. radar-only=radar.pt)")
    given = {"--checkpoint": args.checkpoint, **{f"--partner {k}": v for k, v in partner_paths.items()}}
    for name, path in given.items():  # every file checked before the first is read
        if not Path(path).is_file():
            raise FileNotFoundError(f"{name} {path} does not exist")
    model, _ = load_model(args.checkpoint)
    partners = {}
    for name, path in partner_paths.items():
        partner, _ = load_model(path)
        if partner.config.grid != model.config.grid:
            raise ValueError(f"--partner {name}: its grid {partner.config.grid} differs from the audited model's "
                             f"{model.config.grid}")
        partners[name] = partner
    dataset = dataset_for(args, args.split, args.size, model.config)
    reference = None
    if args.reference_split is not None:
        reference = dataset_for(args, args.reference_split, args.reference_size, model.config)
    faults = False if args.faults == "none" else True if args.faults == "all" else args.faults.split(",")
    result = audit(model, dataset, out=args.out, partners=partners, reference=reference, rules=args.rules,
                   threshold=args.threshold, faults=faults, monitor_quantile=args.quantile, error_iou=args.error_iou,
                   select=args.select, max_pages=args.max_pages,
                   visibility=Visibility(args.min_camera_pixels, args.min_points),
                   title=args.title or f"Sensor-reliance audit: {Path(args.checkpoint).name} on {args.data} "
                                       f"{args.split}", notes=args.note, progress=not args.no_progress)
    mon = result.monitor.get("samples") or {}
    print(f"audited {len(result.records)} samples; {len(mon.get('flagged_samples', []))} flagged; "
          f"{len(result.pages)} sample pages")
    print(f"report: {result.index.resolve()}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("audit", help="sensor-reliance audit of a checkpoint: a static HTML report",
                              description=__doc__)
    p.add_argument("--checkpoint", required=True, help="a checkpoint written by 'fusionlens train'")
    p.add_argument("--partner", action="append", default=[], metavar="NAME=CHECKPOINT",
                   help="a single-modality (or other) model on the same data, for lost/found-by-fusion (repeatable)")
    p.add_argument("--split", default="val", choices=("train", "val", "test"))
    p.add_argument("--size", type=int, default=None, help="split size for generated data")
    p.add_argument("--reference-split", default=None, choices=("train", "val", "test"),
                   help="split the monitor's threshold is chosen on (default: the audited samples)")
    p.add_argument("--reference-size", type=int, default=None, help="reference split size for generated data")
    p.add_argument("--out", default="out/audit", help="report folder (index.html, audit.json, *.csv, samples/)")
    p.add_argument("--rules", default="paper", help="LMD rules preset (default: paper)")
    p.add_argument("--threshold", type=finite_float, default=0.0,
                   help="a cell is a predicted positive above this logit (default 0)")
    p.add_argument("--faults", default="all",
                   help="sensors blacked out in turn: 'all', 'none' or a comma list of modalities")
    p.add_argument("--quantile", type=finite_float, default=0.95,
                   help="monitor threshold: this quantile of the reference scores")
    p.add_argument("--error-iou", type=finite_float, default=None,
                   help="a sample with IoU below this counts as a model error (monitor quality); default: the lower "
                        "quartile of the reference samples' IoUs")
    p.add_argument("--select", type=int, nargs="*", default=[], help="sample indices that always get a page")
    p.add_argument("--max-pages", type=int, default=12, help="pages for flagged samples (most unusual first)")
    p.add_argument("--title", default=None)
    p.add_argument("--note", action="append", default=[], help="a paragraph of text under the title (repeatable)")
    p.add_argument("--min-camera-pixels", type=int, default=1, help="camera 'saw' an object from this many pixels")
    p.add_argument("--min-points", type=int, default=1, help="radar/LiDAR 'saw' an object from this many points")
    p.add_argument("--no-progress", action="store_true")
    add_data_arguments(p)
    p.set_defaults(func=run)
