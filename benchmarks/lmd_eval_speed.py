"""Cost of the perturbation metrics (LMD appendix D.2) per anchor: the path before the speed-up against the current
one, timed in one run (interleaved, so both see the same machine load; compare the ratios).

Per anchor the metrics decompose the clean input and ``count`` partners x M perturbed modalities (1 + count x M
decompositions on the old path), and prepare the samples they need (the fusion-level BEV maps):

* **old**: the engine as of ``--base`` (loaded from git into a private package, ``fusionlens.decompose`` is not
  touched) and the loop as it was: one ``decompose`` per perturbed input, each through the whole fused network;
  anchors visited in their order, so a cache of ``count + 2`` samples prepares ``count + 1`` samples per anchor.
* **new**: :func:`fusionlens.evaluate.separation.perturbation_metrics`'s own per-anchor code with ``LMD(...)``
  (default batch size: 4 frozen, 1 recomputed; ``--batch-sizes`` adds others): the fusion convolution on each
  modality's own channels; frozen mode with one replay per partner for all perturbed modalities (the other
  modalities' maps are the clean ones), batched, without the model's output; anchors visited as k, k+s, k+2s, ...
  so about one sample is prepared per anchor.

The decomposition work is timed with every sample already prepared; preparation is timed separately (seconds per
sample) and charged per anchor with the number of samples each path prepares per anchor over the whole default run
(all anchors, counted by replaying the cache's bookkeeping). The per-anchor PCC/MSE of both paths are compared.

Command (reference model and the default val split, one CPU thread)::

    OMP_NUM_THREADS=1 python benchmarks/lmd_eval_speed.py --checkpoint out/checkpoints/tiny_camera_radar.pt \\
        --anchors 4 --rounds 2

``--full`` also times the whole default run (all anchors) on the new path, per mode.
"""

from __future__ import annotations

import argparse
import importlib
import math
import subprocess
import sys
import tempfile
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch

from fusionlens.evaluate.baselines import LMD, pick
from fusionlens.evaluate.separation import (
    DEFAULT_COUNT,
    SampleCache,
    Subject,
    _anchor_metrics,
    _nan_stats,
    metric_key,
    mse,
    pairing_offsets,
    pcc,
    perturbation_metrics,
    visiting_order,
)
from fusionlens.train.checkpoint import load_model
from fusionlens.train.data import open_dataset

REPO = Path(__file__).resolve().parents[1]
BASE = "d0ab7fc"  # the last commit before the speed-up


def old_engine(rev: str) -> Any:
    """``decompose`` as of git revision ``rev``: the package's files written to a temporary directory and imported
    under a private name (the package imports only torch and itself)."""
    folder = "src/fusionlens/decompose"
    names = subprocess.run(["git", "-C", str(REPO), "ls-tree", "--name-only", f"{rev}:{folder}"], check=True,
                           capture_output=True, text=True).stdout.split()
    root = Path(tempfile.mkdtemp(prefix="lmd_eval_speed_"))
    package = f"fl_decompose_{rev}"
    (root / package).mkdir()
    for name in names:
        if name.endswith(".py"):
            text = subprocess.run(["git", "-C", str(REPO), "show", f"{rev}:{folder}/{name}"], check=True,
                                  capture_output=True, text=True).stdout
            (root / package / name).write_text(text)
    sys.path.insert(0, str(root))
    return importlib.import_module(package).decompose


def old_anchor(decompose: Any, subject: Subject, samples: dict[int, Any], k: int, offsets: list[int], n: int,
               mode: str, output: str = "seg") -> tuple[dict[str, float], dict[str, float]]:
    """The per-anchor loop and LMD method as they were before the speed-up."""
    def maps(d: Any) -> dict[str, torch.Tensor]:
        return {name: pick(d.components[name], output) for name in d.names}

    clean_x = samples[k]
    d = decompose(subject.module, clean_x.inputs, forward_kwargs=clean_x.kwargs, rules="paper",
                  record_coefficients=mode == "frozen")
    clean, state = maps(d), d.coefficients
    pccs: dict[str, list[float]] = {}
    mses: dict[str, list[float]] = {}
    for off in offsets:
        partner = samples[(k + off) % n]
        for p in subject.modalities:
            x = subject.swap(clean_x, partner, p)
            got = maps(decompose(subject.module, x.inputs, forward_kwargs=x.kwargs, rules="paper",
                                 coefficients=state if mode == "frozen" else None))
            for m in subject.modalities:
                pccs.setdefault(metric_key(p, m), []).append(pcc(clean[m], got[m]))
                mses.setdefault(metric_key(p, m), []).append(mse(clean[m], got[m]))
    return ({key: _nan_stats(v)[0] for key, v in pccs.items()}, {key: _nan_stats(v)[0] for key, v in mses.items()})


def prepared_per_anchor(order: list[int], offsets: list[int], n: int, capacity: int) -> float:
    """Samples a least-recently-used cache of ``capacity`` prepares per anchor when anchors come in ``order``."""
    cache: OrderedDict[int, None] = OrderedDict()
    misses = 0
    for k in order:
        for i in [k, *((k + off) % n for off in offsets)]:
            if i in cache:
                cache.move_to_end(i)
                continue
            misses += 1
            cache[i] = None
            while len(cache) > capacity:
                cache.popitem(last=False)
    return misses / len(order)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", default="out/checkpoints/tiny_camera_radar.pt")
    parser.add_argument("--val-size", type=int, default=128)
    parser.add_argument("--anchors", type=int, default=4, help="anchors timed per round and mode")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--batch-sizes", default="default",
                        help="new path: LMD batch_size values to time, comma list ('default': LMD's own)")
    parser.add_argument("--modes", default="frozen,recomputed")
    parser.add_argument("--base", default=BASE, help="git revision of the old engine")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--full", action="store_true", help="also time the whole default run on the new path")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    modes = args.modes.split(",")
    sizes = [None if b == "default" else int(b) for b in args.batch_sizes.split(",")]
    labels = {b: "new" if b is None else f"new b={b}" for b in sizes}

    old_decompose = old_engine(args.base)
    model, _ = load_model(args.checkpoint)
    data = open_dataset("builtin", "val", size=args.val_size, seed=0, progress=False)
    n = len(data)
    subject = model.describe().subject("fusion")
    offsets = pairing_offsets(n, DEFAULT_COUNT)
    stride = n // (DEFAULT_COUNT + 1)
    anchors = list(range(args.anchors))
    needed = sorted({(k + off) % n for k in anchors for off in [0, *offsets]})
    cache = SampleCache(subject, data, capacity=len(needed))
    start = time.perf_counter()
    for i in needed:
        cache[i]
    prepare_s = (time.perf_counter() - start) / len(needed)  # dataset item, collate, BEV features
    samples = {i: cache[i] for i in needed}

    # step 1: one fusion-level decomposition against a plain forward of the same module
    x, y = samples[0], samples[offsets[0]]
    swapped = subject.swap(x, y, subject.modalities[-1])
    single: dict[str, list[float]] = {}
    for _ in range(3):
        for label, run in (("forward", lambda: subject.forward(swapped)),
                           ("decompose (old engine)", lambda: old_decompose(subject.module, swapped.inputs)),
                           ("decompose (new engine)", lambda: LMD("paper", "recomputed").perturbed(subject, swapped,
                                                                                                 None))):
            t0 = time.perf_counter()
            run()
            single.setdefault(label, []).append(time.perf_counter() - t0)

    times: dict[tuple[str, str], list[float]] = {}
    rows: dict[tuple[str, str], dict[int, tuple[dict[str, float], dict[str, float]]]] = {}
    for r in range(args.rounds):
        for k in anchors:
            for mode in modes:
                paths = [("old", 0), *((labels[b], b) for b in sizes)]
                for label, b in (paths if r % 2 == 0 else paths[::-1]):
                    t0 = time.perf_counter()
                    if label == "old":
                        row = old_anchor(old_decompose, subject, samples, k, offsets, n, mode)
                    else:
                        row = _anchor_metrics(subject, LMD("paper", mode, batch_size=b), cache, k, offsets, n,
                                              subject.modalities)
                    times.setdefault((mode, label), []).append(time.perf_counter() - t0)
                    rows.setdefault((mode, label), {})[k] = row

    default_order = list(range(n))
    prep_old = prepared_per_anchor(default_order, offsets, n, len(offsets) + 2)
    prep_new = prepared_per_anchor(visiting_order(default_order, n, stride), offsets, n, len(offsets) + 2)
    print(f"reference model {args.checkpoint}, builtin val n={n}, count={len(offsets)}, M={len(subject.modalities)}, "
          f"{args.threads} thread(s), {args.anchors} anchors x {args.rounds} rounds")
    fwd = min(single["forward"])
    for label, ts in single.items():
        print(f"  {label:24s} {min(ts) * 1e3:7.1f} ms  ({min(ts) / fwd:.2f} x forward)")
    print(f"  preparing one sample     {prepare_s * 1e3:7.1f} ms; samples prepared per anchor over the default run: "
          f"old {prep_old:.2f}, new {prep_new:.2f}")
    print()
    print("| mode | path | decompositions s/anchor | + preparation s/anchor | total s/anchor | ratio old/new |"
          " max abs dPCC | max rel dMSE |")
    print("|---|---|---|---|---|---|---|---|")
    for mode in modes:
        old_total = None
        for label in ["old", *labels.values()]:
            work = sum(times[(mode, label)]) / len(times[(mode, label)])
            prep = prepare_s * (prep_old if label == "old" else prep_new)
            total = work + prep
            old_total = old_total or total
            ref, got = rows[(mode, "old")], rows[(mode, label)]
            d_pcc = max(abs(got[k][0][key] - ref[k][0][key]) for k in anchors for key in ref[k][0]
                        if not math.isnan(ref[k][0][key]))
            d_mse = max(abs(got[k][1][key] - ref[k][1][key]) / max(abs(ref[k][1][key]), 1e-30) for k in anchors
                        for key in ref[k][1])
            print(f"| {mode} | {label} | {work:.2f} | {prep:.2f} | {total:.2f} | {old_total / total:.2f} | "
                  f"{d_pcc:.1e} | {d_mse:.1e} |")
    if args.full:
        print()
        for mode in modes:
            t0 = time.perf_counter()
            perturbation_metrics(model, data, LMD("paper", mode, batch_size=sizes[0]), progress=False)
            total = time.perf_counter() - t0
            print(f"full default run, {mode}, {labels[sizes[0]]}: {total:.0f} s ({total / n:.2f} s/anchor, "
                  f"{n} anchors, samples prepared on the way)")


if __name__ == "__main__":
    main()
