"""How AlterMOMA's two indicators relate on a reference model: per group, ReRI's size next to DeCI, their rank
correlation, the share of negative AlterEva scores and the share of weights kept at a sparsity.

    nice -n 10 python benchmarks/prune_indicators.py --checkpoint out/reproduce/altermoma/checkpoints/camera_lidar.pt
"""

from __future__ import annotations

import argparse

import torch
from torch.utils.data import DataLoader

from fusionlens.data.collate import collate_samples
from fusionlens.experiments.reference import load_reference, reference_loss
from fusionlens.prune.altermoma import AlterMOMA
from fusionlens.prune.params import prunable_parameters, resolve_groups
from fusionlens.prune.pruner import global_masks
from fusionlens.train.data import open_dataset


def _ranks(x: torch.Tensor) -> torch.Tensor:
    return x.argsort().argsort().double()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--sparsity", type=float, default=0.85)
    p.add_argument("--train-size", type=int, default=192)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    torch.manual_seed(args.seed)
    model, _ = load_reference(args.checkpoint)
    train = open_dataset("builtin", "train", size=args.train_size, seed=0, progress=False)
    batches = DataLoader(
        train,
        batch_size=2,
        shuffle=True,
        generator=torch.Generator().manual_seed(args.seed),
        collate_fn=collate_samples,
        drop_last=True,
    )
    names = prunable_parameters(model)
    method = AlterMOMA(reference_loss(), batches)
    scores = method(model, names, args.sparsity)
    ind = method.last_indicators
    assert ind is not None
    masks = global_masks(scores, args.sparsity)
    groups = resolve_groups(model).restrict(names)
    print("| group | masked | ReRI sum / DeCI sum | Spearman(DeCI, ReRI) | negative S | kept |")
    print("|---|---|---|---|---|---|")
    for key, members in [*groups.modalities.items(), ("fusion", groups.fusion)]:
        deci = torch.cat([ind.deci[n].flatten() for n in members])
        s = torch.cat([scores[n].flatten() for n in members])
        kept = sum(int(masks[n].sum()) for n in members) / sum(masks[n].numel() for n in members)
        for masked, reri in ind.reri.items():
            if members[0] not in reri:
                continue
            r = torch.cat([reri[n].flatten() for n in members])
            rho = float(torch.corrcoef(torch.stack([_ranks(deci), _ranks(r)]))[0, 1])
            print(
                f"| {key} | {masked} | {float(r.sum() / deci.sum()):.2f} | {rho:.2f} | "
                f"{float((s < 0).double().mean()):.0%} | {kept:.1%} |"
            )


if __name__ == "__main__":
    main()
