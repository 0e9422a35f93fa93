"""Split-half reliability of AlterMOMA's indicators: is ReRI measuring redundancy or batch noise?

On a trained reference model, the training batches are shuffled and cut into two disjoint halves; AlterMOMA's
indicators (DeCI, eq. 6 / 23 / 29; ReRI, eq. 10 / 26 / 34-35) are computed once from each half with D made of
``n`` batches (``AlterMOMA(reference_batches=n)``). Per parameter group the table gives

* the split-half Spearman rank correlation of DeCI, of each ReRI and of the AlterEva score S (eq. 11-13): how far
  two independent draws of the data agree on the ranking that decides what is pruned (1: the indicator is a
  property of the model and the data set; 0: the batches decide it);
* ReRI's Spearman with DeCI on the same half (the coupling that, with per-group sum normalisation and
  alpha = beta, turns noisy ReRI into the ranking inside each group);

averaged over ``--splits`` shuffles (± the standard deviation over them). Needs ``3n + 2B - 2`` batches per half
(D, then B - 1 reactivation batches and n batches for g_B per masked modality). On the reference models of
``fusionlens reproduce altermoma`` (checkpoints under ``<tree>/checkpoints``):

    nice -n 10 python benchmarks/altermoma_reliability.py \\
        --checkpoint out/reproduce/altermoma/pretrained/checkpoints/tiny_camera-lidar_pre.pt --ns 1,2,4,8

Prints a Markdown table; ``--json`` also writes every split's numbers.
"""

from __future__ import annotations

import argparse
import statistics
from typing import Any

import torch

from fusionlens.data.collate import batch_loader
from fusionlens.experiments.reference import load_reference, reference_loss
from fusionlens.io import atomic_write_json
from fusionlens.prune.altermoma import AlterMOMA, Indicators, altereva
from fusionlens.prune.params import FUSION, ParamGroups, prunable_parameters, resolve_groups
from fusionlens.train.data import open_dataset
from fusionlens.train.loop import move_batch


def _flat(scores: dict[str, torch.Tensor], names: list[str]) -> torch.Tensor:
    return torch.cat([scores[n].detach().double().flatten() for n in names])


def _ranks(x: torch.Tensor) -> torch.Tensor:
    """Ranks with ties averaged (exactly-zero gradients tie), on x's device: millions of entries in milliseconds."""
    values, inverse, counts = torch.unique(x, return_inverse=True, return_counts=True)
    last = counts.cumsum(0).double()
    return (last - (counts.double() - 1) / 2)[inverse]


def _spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    ra, rb = _ranks(a), _ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()))


def _rows(groups: ParamGroups) -> list[tuple[str, list[str]]]:
    return [*((k, list(v)) for k, v in groups.modalities.items()), (FUSION, list(groups.fusion))]


def compare(first: Indicators, second: Indicators, groups: ParamGroups, alpha: float = 1.0,
            beta: float = 1.0) -> dict[str, float]:
    """``{"<group>/<indicator>": Spearman}`` between two halves and, ``"<group>/reri_<m>~deci"``, within the first."""
    s1, s2 = altereva(first, groups, alpha, beta), altereva(second, groups, alpha, beta)
    out: dict[str, float] = {}
    for key, names in _rows(groups):
        if not names:
            continue
        out[f"{key}/deci"] = _spearman(_flat(first.deci, names), _flat(second.deci, names))
        out[f"{key}/S"] = _spearman(_flat(s1, names), _flat(s2, names))
        for masked in first.reri:
            if names[0] not in first.reri[masked]:
                continue  # a backbone has no ReRI from masking itself
            r1 = _flat(first.reri[masked], names)
            out[f"{key}/reri_{masked}"] = _spearman(r1, _flat(second.reri[masked], names))
            out[f"{key}/reri_{masked}~deci"] = _spearman(r1, _flat(first.deci, names))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="a trained reference fusion model")
    p.add_argument("--ns", default="1,2,4,8", help="batches making up D")
    p.add_argument("--readings", default="sgd", help="reactivation optimisers to measure, e.g. sgd,adam")
    p.add_argument("--steps", type=int, default=8, help="B")
    p.add_argument("--splits", type=int, default=3, help="shuffles, each cut into two disjoint halves")
    p.add_argument("--train-size", type=int, default=192)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", default=None, help="also write every split's numbers here")
    args = p.parse_args()
    ns = [int(v) for v in args.ns.split(",")]
    readings = [v for v in args.readings.split(",") if v]
    device = torch.device(args.device)
    model, _ = load_reference(args.checkpoint)
    model.to(device)
    train = open_dataset("builtin", "train", size=args.train_size, seed=0, progress=False)
    available = len(train) // args.batch_size // 2
    need = 3 * max(ns) + 2 * args.steps - 2
    if need > available:
        raise SystemExit(f"--ns {max(ns)} with B = {args.steps} needs {need} batches per half; "
                         f"--train-size {args.train_size} gives {available}")
    loss = reference_loss()

    def loss_fn(m: torch.nn.Module, batch: dict[str, Any]) -> torch.Tensor:
        return loss(m, move_batch(batch, device))

    names = prunable_parameters(model)
    groups = resolve_groups(model).restrict(names)
    results: dict[str, dict[str, list[float]]] = {}
    for reading in readings:
        for n in ns:
            key = f"{reading} n={n}"
            results[key] = {}
            for split in range(args.splits):
                batches = list(batch_loader(train, args.batch_size, shuffle=True, seed=1000 + split, drop_last=True))
                half = len(batches) // 2
                ind = []
                for part in (batches[:half], batches[half:]):
                    torch.manual_seed(split)
                    method = AlterMOMA(loss_fn, part, groups=groups, reactivation_steps=args.steps,
                                       reference_batches=n, reactivation_optimizer=reading)
                    ind.append(method.indicators(model, names))
                for k, v in compare(ind[0], ind[1], groups).items():
                    results[key].setdefault(k, []).append(v)
            print(f"{key}: " + ", ".join(f"{k} {statistics.mean(v):.2f}" for k, v in results[key].items()),
                  flush=True)
    columns = list(next(iter(results.values())))
    print(f"\n| reading | {' | '.join(columns)} |\n|---" + "|---" * len(columns) + "|")
    for key, cols in results.items():
        cells = [f"{statistics.mean(v):.2f}" + (f" ± {statistics.stdev(v):.2f}" if len(v) > 1 else "")
                 for v in (cols[c] for c in columns)]
        print(f"| {key} | {' | '.join(cells)} |")
    if args.json:
        atomic_write_json(args.json, {"args": vars(args), "results": results})


if __name__ == "__main__":
    main()
