"""CPU speed-up and parameter count of structured pruning (``prune(..., structured=True)``) per channel sparsity,
for a reference fusion model and for a U-Net with skip concatenations, measured A/B-interleaved so that load from
other processes on a shared machine hits the dense and the pruned models alike.

    nice -n 10 python benchmarks/prune_latency.py                       # tiny camera+LiDAR (pillars) model, U-Net
    nice -n 10 python benchmarks/prune_latency.py --checkpoint out/reproduce/altermoma/checkpoints/camera_lidar.pt

Without ``--checkpoint`` the reference model is built untrained from ``--preset`` (camera + PointPillars LiDAR with
the CenterPoint head). Channels are chosen by magnitude (no data needed: the speed depends on the widths, not on
which channels go). No ``ignored_layers``: the layers structured pruning had to leave whole are printed.
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from fusionlens.prune import prune
from fusionlens.prune.cost import count_flops, count_parameters
from fusionlens.prune.params import call_model


class UNet(nn.Module):
    """A plain U-Net (Ronneberger et al.): ``levels`` down/up stages, each decoder stage concatenating the skip."""

    def __init__(self, in_ch: int = 3, width: int = 32, levels: int = 3, n_classes: int = 2) -> None:
        super().__init__()

        def block(c_in: int, c_out: int) -> nn.Sequential:
            return nn.Sequential(
                nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True),
                nn.Conv2d(c_out, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True),
            )

        widths = [width * 2**i for i in range(levels + 1)]
        self.down = nn.ModuleList([block(in_ch, widths[0])] + [block(a, b) for a, b in zip(widths, widths[1:])])
        self.up = nn.ModuleList([nn.ConvTranspose2d(b, a, 2, stride=2) for a, b in zip(widths, widths[1:])])
        self.dec = nn.ModuleList([block(2 * a, a) for a in widths[:-1]])
        self.out = nn.Conv2d(width, n_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for i, stage in enumerate(self.down):
            x = stage(x if i == 0 else F.max_pool2d(x, 2))
            skips.append(x)
        for i in reversed(range(len(self.up))):
            x = self.dec[i](torch.cat([self.up[i](x), skips[i]], dim=1))
        return self.out(x)


def reference(args: argparse.Namespace) -> tuple[nn.Module, dict[str, Any], str]:
    from fusionlens.data.collate import collate_samples
    from fusionlens.experiments.reference import example_inputs, load_reference
    from fusionlens.models import build_model, preset_config
    from fusionlens.train.synthetic import SyntheticDataset

    if args.checkpoint:
        model, _ = load_reference(args.checkpoint)
        name = f"reference {args.checkpoint}"
    else:
        cfg = preset_config(args.preset, "camera,lidar", point_encoders={"lidar": "pillars"},
                            extra_heads={"centerpoint": {}})
        torch.manual_seed(0)
        model = build_model(cfg, load_camera_weights=False)
        name = f"reference {args.preset} camera+LiDAR (pillars, CenterPoint head), untrained"
    cfg = model.config
    sample = SyntheticDataset(1, cfg.grid, image_size=cfg.image_size)[0]
    return model.eval(), example_inputs(model, collate_samples([sample])), name


def measure(name: str, model: nn.Module, x: Any, ratios: list[float], rounds: int) -> None:
    models: dict[str, nn.Module] = {"dense": model}
    left: dict[str, dict[str, str]] = {}
    for r in ratios:
        start = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            result = prune(model, "magnitude", r, structured=True, example_inputs=x)
        key = f"{100 * r:g}%"
        models[key], left[key] = result.model.eval(), result.report["left_whole"]
        print(f"  pruned {key} in {time.perf_counter() - start:.1f} s")
    times: dict[str, list[float]] = {k: [] for k in models}
    with torch.no_grad():
        for m in models.values():  # warm-up
            call_model(m, x)
        for _ in range(rounds):
            for key, m in models.items():
                start = time.perf_counter()
                call_model(m, x)
                times[key].append(time.perf_counter() - start)
    dense_ms = 1e3 * statistics.median(times["dense"])
    print(f"\n{name}\n\n| channels removed | params | GFLOPs | median latency ms | speed-up | left whole |")
    print("|---|---|---|---|---|---|")
    for key, m in models.items():
        ms = 1e3 * statistics.median(times[key])
        whole = ", ".join(left.get(key, {})) or "-"
        print(f"| {key} | {count_parameters(m) / 1e6:.3f}M | {count_flops(m, x) / 1e9:.3f} | {ms:.1f} | "
              f"{dense_ms / ms:.2f}x | {whole} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default=None, help="a trained reference checkpoint (default: build --preset)")
    p.add_argument("--preset", default="tiny", choices=("tiny", "small"))
    p.add_argument("--ratios", default="0.3,0.5,0.7")
    p.add_argument("--rounds", type=int, default=15, help="interleaved timing rounds")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--unet-size", type=int, default=128, help="U-Net input height = width")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    ratios = [float(v) for v in args.ratios.split(",")]
    print(f"threads={args.threads}, rounds={args.rounds}, batch 1")
    model, x, name = reference(args)
    measure(name, model, x, ratios, args.rounds)
    torch.manual_seed(0)
    unet = UNet().eval()
    measure(f"U-Net (width 32, 3 levels), 1x3x{args.unet_size}x{args.unet_size}", unet,
            torch.randn(1, 3, args.unet_size, args.unet_size), ratios, args.rounds)


if __name__ == "__main__":
    main()
