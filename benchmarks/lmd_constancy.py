"""How much of each LMD component is the same in every scene (issue 5's Cp/C miss).

The perturbation metric Cp/C (appendix D.2) correlates the camera component of a sample with the camera component
after the camera input is swapped for another scene's. If a component is largely the same map in every scene, that
correlation stays high whatever the swap does: the cross-scene PCC of a component is a floor under its "Xp/X".
For each modality component, the bias component, the fused output, the ground-truth vehicle map and each
modality's BEV feature map where it enters the fusion layer (the decomposition's input), over the first
``--samples`` val scenes:

* ``cross-scene PCC``: mean Pearson correlation between the maps of scene k and scene (k + s·j) mod N, the
  perturbation metric's own pairing;
* ``constant share``: ``||mean map||^2 / mean ||map||^2`` -- the share of the component's energy that is one
  fixed map (1: identical in every scene; ~1/N: nothing shared).

    OMP_NUM_THREADS=1 python benchmarks/lmd_constancy.py --checkpoint out/checkpoints/tiny_camera_radar.pt
"""

from __future__ import annotations

import argparse

import torch

from fusionlens.data.collate import collate_samples
from fusionlens.evaluate.baselines import LMD
from fusionlens.evaluate.separation import pairing_offsets, pcc
from fusionlens.train.checkpoint import load_model
from fusionlens.train.data import open_dataset


def maps_per_scene(checkpoint: str, samples: int, rules: str, val_size: int) -> dict[str, list[torch.Tensor]]:
    """Per scene: every LMD component's seg-logit map, the fused output and the ground-truth vehicle map."""
    model, _ = load_model(checkpoint)
    data = open_dataset("builtin", "val", size=val_size, seed=0, progress=False)
    subject, method = model.describe().subject(), LMD(rules, mode="recomputed")
    out: dict[str, list[torch.Tensor]] = {}
    for k in range(samples):
        batch = collate_samples([data[k]])
        prepared = subject.prepare(batch)
        comps, _ = method.clean(subject, prepared)
        comps["output"] = sum(comps.values())
        comps["ground truth"] = batch["bev_seg"].float()
        for modality, feature in prepared.inputs.items():  # what the fusion layer receives
            comps[f"{modality} BEV feature (input)"] = feature
        for name, m in comps.items():
            out.setdefault(name, []).append(m.detach().double().flatten())
    return out


def constancy(maps: list[torch.Tensor], count: int) -> tuple[float, float]:
    """(mean cross-scene PCC over the perturbation pairing, constant share of the energy)."""
    n = len(maps)
    offsets = pairing_offsets(n, count)
    pccs = [pcc(maps[k], maps[(k + o) % n]) for k in range(n) for o in offsets]
    pccs = [v for v in pccs if v == v]
    stack = torch.stack(maps)
    share = float(stack.mean(0).pow(2).sum() / stack.pow(2).sum(1).mean())
    return (sum(pccs) / len(pccs) if pccs else float("nan")), share


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", nargs="+", required=True)
    p.add_argument("--samples", type=int, default=39, help="val scenes (the pairing needs >= 13 * count / 12)")
    p.add_argument("--val-size", type=int, default=128)
    p.add_argument("--count", type=int, default=4)
    p.add_argument("--rules", default="paper")
    args = p.parse_args()
    print("| checkpoint | map | cross-scene PCC | constant share |")
    print("|---|---|---|---|")
    for ckpt in args.checkpoint:
        for name, maps in maps_per_scene(ckpt, args.samples, args.rules, args.val_size).items():
            cross, share = constancy(maps, args.count)
            print(f"| {ckpt.split('/')[-1]} | {name} | {cross:.2f} | {share:.2f} |")


if __name__ == "__main__":
    main()
