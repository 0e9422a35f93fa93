"""``fusionlens prune``: prune a trained reference checkpoint with AlterMOMA or a baseline (weights, or whole
channels with ``--structured``) through :func:`fusionlens.prune.prune`, fine-tune it, and write the pruned model as
a fusionlens checkpoint (masks folded into plain weights, the masks and, for ``--structured``, the pruned shapes
under ``extra["pruning"]``: ``fusionlens evaluate`` / ``explain`` rebuild it from its config) and a JSON report.

    fusionlens prune --method altermoma --sparsity 0.85 --checkpoint out/checkpoints/model.pt
    fusionlens prune --method prospr --sparsity 0.3 --structured --checkpoint ... --out out/pruned/s.pt
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from fusionlens.cli.train import add_data_arguments, dataset_for, finite_float
from fusionlens.experiments.reference import CALIBRATION_INPUTS, example_inputs, load_reference, reference_loss
from fusionlens.io import atomic_write_json, check_output_path, check_same_source
from fusionlens.prune.altermoma import DEFAULT_REACTIVATION_LR, DEFAULT_REACTIVATION_STEPS
from fusionlens.prune.api import METHOD_OPTIONS, METHODS, prune
from fusionlens.prune.cost import cost_report
from fusionlens.prune.params import check_sparsity, resolve_groups
from fusionlens.prune.serialize import pruning_record
from fusionlens.train.checkpoint import save_checkpoint

# CLI flag -> (method, option name)
_OPTION_FLAGS: dict[str, tuple[str, str]] = {
    "alpha": ("altermoma", "alpha"),
    "beta": ("altermoma", "beta"),
    "reactivation_steps": ("altermoma", "reactivation_steps"),
    "reactivation_lr": ("altermoma", "reactivation_lr"),
    "reference_batches": ("altermoma", "reference_batches"),
    "reactivation_optimizer": ("altermoma", "reactivation_optimizer"),
    "imp_rounds": ("imp", "rounds"),
    "imp_steps": ("imp", "steps_per_round"),
    "synflow_iterations": ("synflow", "iterations"),
    "snip_batches": ("snip", "n_batches"),
    "prospr_steps": ("prospr", "inner_steps"),
    "prospr_lr": ("prospr", "inner_lr"),
}


def method_options(args: argparse.Namespace) -> dict[str, Any]:
    """The options given on the command line for ``args.method`` (flags of other methods are an error)."""
    opts: dict[str, Any] = {}
    for flag, (method, name) in _OPTION_FLAGS.items():
        value = getattr(args, flag)
        if value is None:
            continue
        if method != args.method:
            raise ValueError(f"--{flag.replace('_', '-')} is an option of --method {method}, not {args.method}")
        opts[name] = value
    if args.method == "random":
        opts["seed"] = args.seed
    if args.method == "synflow":
        opts["keep_inputs"] = CALIBRATION_INPUTS
    assert set(opts) <= set(METHOD_OPTIONS[args.method])
    return opts


def run(args: argparse.Namespace) -> int:
    sparsity = check_sparsity(args.sparsity, "--sparsity")
    if args.finetune_steps < 0 or args.batch_size < 1:
        raise ValueError("--finetune-steps must be >= 0 and --batch-size >= 1")
    opts = method_options(args)
    out = Path(args.out or f"out/pruned/{args.method}_{sparsity:g}{'_structured' if args.structured else ''}.pt")
    check_output_path("--out", out, inputs={"--checkpoint": args.checkpoint}, sidecar_suffixes=(".json",))
    if args.out is None:
        check_same_source("--out", out, out.with_suffix(".json"), args.checkpoint)
    model, payload = load_reference(args.checkpoint)  # missing file / another architecture: clear error
    if args.method == "altermoma":
        resolve_groups(model)
    train_set = dataset_for(args, "train", args.train_size, model.config)
    val_set = dataset_for(args, "val", args.val_size, model.config) if args.val_size != 0 else None
    from fusionlens.data.collate import collate_samples
    from fusionlens.train.loop import check_dataset, evaluate

    check_dataset(train_set, model.config, "train")
    torch.manual_seed(args.seed)
    batches = DataLoader(
        train_set,
        batch_size=args.batch_size,
        shuffle=True,
        collate_fn=collate_samples,
        generator=torch.Generator().manual_seed(args.seed),
        drop_last=True,
    )
    ex = example_inputs(model, next(iter(DataLoader(train_set, batch_size=1, collate_fn=collate_samples))))
    loss_fn = reference_loss()
    report: dict[str, Any] = {
        "checkpoint": str(args.checkpoint),
        "method": args.method,
        "options": opts,
        "structured": args.structured,
        "seed": args.seed,
    }
    if val_set is not None:
        report["iou_before"] = float(evaluate(model, val_set, batch_size=4, progress=False)["all"])
    result = prune(
        model,
        args.method,
        sparsity,
        structured=args.structured,
        example_inputs=ex,
        loss_fn=loss_fn,
        batches=batches,
        finetune_steps=args.finetune_steps,
        finetune_lr=args.finetune_lr,
        progress=not args.no_progress,
        **opts,
    )
    pruned = result.model
    report.update({k: v for k, v in result.report.items() if k != "prunable"})
    if args.structured:
        report.update(cost_before=cost_report(model, ex), cost_after=cost_report(pruned, ex))
    if val_set is not None:
        report["iou_after"] = float(evaluate(pruned, val_set, batch_size=4, progress=False)["all"])
    report["output"] = str(out)
    dense, record = pruning_record(pruned)  # masks folded into plain weights; shapes for a structured model
    save_checkpoint(
        out,
        model=dense,
        model_config=model.config,
        train_config=payload.get("train_config"),
        step=int(payload.get("step", 0)),
        extra={"pruning": {"report": report, **record}},
    )
    atomic_write_json(out.with_suffix(".json"), report)
    print(json.dumps(report, indent=2, default=str))
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "prune",
        help="AlterMOMA / baseline pruning of a checkpoint",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--checkpoint", required=True, help="a checkpoint written by 'fusionlens train'")
    p.add_argument("--method", choices=METHODS, default="altermoma")
    p.add_argument(
        "--sparsity",
        type=finite_float,
        default=0.85,
        help="fraction of prunable weights removed, in [0, 1) (channel ratio with --structured)",
    )
    p.add_argument("--structured", action="store_true", help="remove whole channels (Torch-Pruning)")
    p.add_argument(
        "--out",
        default=None,
        help="pruned checkpoint (default out/pruned/<method>_<sparsity>.pt); the JSON report goes next to it",
    )
    p.add_argument("--finetune-steps", type=int, default=200)
    p.add_argument("--finetune-lr", type=finite_float, default=1e-4, help="Adam learning rate (the paper's 1e-4)")
    p.add_argument("--batch-size", type=int, default=2, help="the paper's batch size")
    p.add_argument("--train-size", type=int, default=None, help="training samples (generated data)")
    p.add_argument("--val-size", type=int, default=None, help="validation samples for IoU (0: skip)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true")
    g = p.add_argument_group("method options (default: each method's documented default)")
    g.add_argument("--alpha", type=finite_float, default=None, help="AlterEva weight of DeCI (1)")
    g.add_argument("--beta", type=finite_float, default=None, help="AlterEva weight of ReRI (1)")
    g.add_argument(
        "--reactivation-steps",
        type=int,
        default=None,
        help=f"AlterMOMA B, reactivation batches per modality ({DEFAULT_REACTIVATION_STEPS})",
    )
    g.add_argument(
        "--reactivation-lr",
        type=finite_float,
        default=None,
        help=f"AlterMOMA reactivation learning rate (SGD {DEFAULT_REACTIVATION_LR:g}, Adam 1e-4)",
    )
    g.add_argument("--reference-batches", type=int, default=None,
                   help="AlterMOMA: batches making up D (1; docs/altermoma.md)")
    g.add_argument("--reactivation-optimizer", choices=("sgd", "adam"), default=None,
                   help="AlterMOMA reactivation optimiser (sgd)")
    g.add_argument("--imp-rounds", type=int, default=None)
    g.add_argument("--imp-steps", type=int, default=None, help="IMP training steps per round")
    g.add_argument("--synflow-iterations", type=int, default=None)
    g.add_argument("--snip-batches", type=int, default=None)
    g.add_argument("--prospr-steps", type=int, default=None, help="ProsPr inner steps (3)")
    g.add_argument("--prospr-lr", type=finite_float, default=None, help="ProsPr inner SGD learning rate (0.5)")
    add_data_arguments(p)
    p.set_defaults(func=run)
