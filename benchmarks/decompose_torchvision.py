"""LMD on every torchvision classifier and segmenter: random weights, float64, the image split into two modalities
(left and right halves, ``modality_mask``); one fresh subprocess per model (memory, a hang or a crash stay there).

    python benchmarks/decompose_torchvision.py                      # every model
    python benchmarks/decompose_torchvision.py --models vit_b_16 swin_v2_t --timeout 300

Per model: whether ``decompose`` ran, its relative conservation error (target <= 1e-9), the largest modality
component over the largest output (a sanity check: components far beyond the output would mean a linearization
blowing up), the time of one forward and of one decomposition (seconds, one thread), and the error if any. The
summary line counts the passes.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

import torch
import torchvision

TOLERANCE = 1e-9


def image_size(name: str) -> int:
    """The smallest convenient input each family accepts (patch grids, window partitions, inception's stem)."""
    if name.startswith("maxvit"):
        return 224  # its block partitions need 224 / 32 = 7 windows
    if name.startswith(("inception", "googlenet")):
        return 96
    return 64


def build(name: str) -> torch.nn.Module:
    kwargs: dict = {"weights": None}
    if name in torchvision.models.list_models(module=torchvision.models.segmentation):
        kwargs.update(num_classes=3, weights_backbone=None, aux_loss=False)
    else:
        kwargs["num_classes"] = 10
    if name.startswith("vit_"):
        kwargs["image_size"] = image_size(name) // 16 * 16 if "_14" not in name else 56
    if name in ("googlenet", "inception_v3"):
        kwargs.update(aux_logits=False, init_weights=True)
    model = torchvision.models.get_model(name, **kwargs)
    if name.startswith("vit_"):  # torchvision starts the head at zero: the output would be all bias
        torch.nn.init.normal_(model.heads.head.weight, std=0.02)
    return model


def run_one(name: str) -> dict:
    from fusionlens import decompose

    torch.manual_seed(0)
    torch.set_num_threads(1)
    model = build(name).double().eval()
    size = 56 if name.startswith("vit_h") else image_size(name)
    x = torch.randn(1, 3, size, size, dtype=torch.float64)
    mask = (torch.arange(size) >= size // 2).long().view(1, 1, 1, size)  # left half / right half
    with torch.no_grad():
        start = time.perf_counter()
        model(x)
        forward = time.perf_counter() - start
    start = time.perf_counter()
    d = decompose(model, x, modality_mask=mask, names=["left", "right"])
    seconds = time.perf_counter() - start
    output = d.output["out"] if isinstance(d.output, dict) else d.output
    largest = max(float((d.components[n]["out"] if isinstance(d.output, dict) else d.components[n]).abs().max())
                  for n in ("left", "right"))
    return {"model": name, "ok": True, "relative_error": d.conservation_error().relative, "forward_s": forward,
            "decompose_s": seconds, "input": size, "component_scale": largest / float(output.abs().max())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="*", help="default: every classifier and segmenter of torchvision")
    parser.add_argument("--timeout", type=int, default=900, help="seconds per model")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        try:
            row = run_one(args.one)
        except Exception as exc:  # reported, not raised: the parent collects every model's outcome
            row = {"model": args.one, "ok": False, "error": f"{type(exc).__name__}: {exc}"[:300]}
        print(json.dumps(row))
        return
    names = args.models or (torchvision.models.list_models(module=torchvision.models)
                            + torchvision.models.list_models(module=torchvision.models.segmentation))
    print(f"torch={torch.__version__} torchvision={torchvision.__version__} float64, one thread, "
          f"input split left/right by modality_mask, tolerance {TOLERANCE:g} relative")
    print("| model | input | conserves | relative error | max component / max output | forward (s) | decompose (s) "
          "| ratio | error |")
    print("|---|---|---|---|---|---|---|---|---|")
    passed = 0
    for name in names:
        try:
            out = subprocess.run([sys.executable, __file__, "--one", name], capture_output=True, text=True,
                                 timeout=args.timeout)
            lines = out.stdout.strip().splitlines()
            row = json.loads(lines[-1]) if lines else {"ok": False, "error": out.stderr.strip()[-300:]}
        except subprocess.TimeoutExpired:
            row = {"ok": False, "error": f"timed out after {args.timeout} s"}
        ok = row.get("ok") and row["relative_error"] <= TOLERANCE
        passed += bool(ok)
        if row.get("ok"):
            print(f"| {name} | {row['input']} | {'yes' if ok else 'NO'} | {row['relative_error']:.1e} | "
                  f"{row['component_scale']:.2f} | {row['forward_s']:.2f} | {row['decompose_s']:.2f} | "
                  f"{row['decompose_s'] / row['forward_s']:.2f}x | |", flush=True)
        else:
            print(f"| {name} | | NO | | | | | | {row.get('error', '').replace('|', '/')} |", flush=True)
    print(f"\n{passed} of {len(names)} decompose and conserve to <= {TOLERANCE:g}")


if __name__ == "__main__":
    main()
