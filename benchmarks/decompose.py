"""Cost of a per-pixel modality decomposition of the reference camera-radar model, as ratios to one plain forward.

    python benchmarks/decompose.py --preset tiny
    python benchmarks/decompose.py --preset paper --repeats 1 --pixels 2
    python benchmarks/decompose.py --preset tiny --components out/lmd_tiny.pt   # first run: saves them
    python benchmarks/decompose.py --preset tiny --components out/lmd_tiny.pt   # later: bit-for-bit comparison

``--components`` makes "faster without changing a number" checkable across engine versions: the LMD components of
every output of the benchmark batch are saved on the first run and compared bit for bit on the next (run the
old engine with ``PYTHONPATH=<old checkout>/src``).

Rows: LMD (``decompose``), exact modality Shapley (2^M forwards), Captum ``ShapleyValues`` with one feature per
modality (one call per output pixel: timed on ``--pixels`` pixels and extrapolated to the whole BEV map), and
gradient x input per modality (one backward per output pixel, likewise extrapolated). Peak memory is the peak
resident-set growth of a fresh subprocess running the method once (for the per-pixel methods: one pixel), over
that of a plain forward.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import itertools
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable

import torch

from fusionlens import decompose
from fusionlens.data.collate import collate_samples
from fusionlens.models import batch_to_inputs, build_model, preset_config
from fusionlens.train.synthetic import SyntheticDataset

METHODS = ("forward", "lmd", "shapley-exact", "captum-shapley", "grad-x-input")


def setup(preset: str, batch: int) -> tuple[torch.nn.Module, dict, dict]:
    torch.manual_seed(0)
    config = preset_config(preset).with_(modalities=("camera", "radar"))
    model = build_model(config).eval()
    data = SyntheticDataset(batch, config.grid, n_cameras=6, image_size=config.image_size)
    inputs, kwargs = batch_to_inputs(model, collate_samples([data[i] for i in range(batch)]))
    return model, inputs, kwargs


def seg(model: torch.nn.Module, inputs: dict, kwargs: dict) -> torch.Tensor:
    return model(**inputs, **kwargs)["seg"]


def run_forward(model, inputs, kwargs) -> None:
    with torch.no_grad():
        seg(model, inputs, kwargs)


def run_lmd(model, inputs, kwargs) -> None:
    decompose(model, inputs, forward_kwargs=kwargs)


def run_shapley_exact(model, inputs, kwargs) -> None:
    """All 2^M coalitions of modalities (absent = zero input), one forward each."""
    names = list(inputs)
    with torch.no_grad():
        for present in itertools.product((False, True), repeat=len(names)):
            seg(model, {n: x if p else torch.zeros_like(x) for n, x, p in zip(names, inputs.values(), present)}, kwargs)


def _captum_call(model, inputs, kwargs, pixel: int) -> None:
    from captum.attr import ShapleyValues

    names = list(inputs)

    def forward(*tensors: torch.Tensor) -> torch.Tensor:
        return seg(model, dict(zip(names, tensors)), kwargs).flatten(1)

    masks = tuple(torch.full_like(x, i, dtype=torch.long)[:1] for i, x in enumerate(inputs.values()))
    with torch.no_grad():
        ShapleyValues(forward).attribute(tuple(inputs.values()), target=pixel, feature_mask=masks)


def _gradient_call(model, inputs, kwargs, pixel: int) -> None:
    leaves = {n: x.clone().requires_grad_(True) for n, x in inputs.items()}
    out = seg(model, leaves, kwargs).flatten(1)[:, pixel].sum()
    grads = torch.autograd.grad(out, list(leaves.values()))
    [(g * x).sum() for g, x in zip(grads, leaves.values())]


def timed(fn: Callable[[], None], repeats: int) -> float:
    fn()  # warm-up (allocator, lazy init)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _rss() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def measure_memory(preset: str, batch: int, method: str) -> int:
    """Run in a fresh interpreter: peak RSS growth (bytes) during one call of ``method``, sampled every
    millisecond by a thread (torch kernels release the GIL), after returning freed heap memory to the OS."""
    model, inputs, kwargs = setup(preset, batch)
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    before = peak = _rss()
    done = threading.Event()

    def poll() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, _rss())
            time.sleep(0.001)

    watcher = threading.Thread(target=poll)
    watcher.start()
    try:
        {"forward": run_forward, "lmd": run_lmd, "shapley-exact": run_shapley_exact,
         "grad-x-input": lambda *a: _gradient_call(*a, 0), "captum-shapley": lambda *a: _captum_call(*a, 0),
         }[method](model, inputs, kwargs)
    finally:
        done.set()
        watcher.join()
    return max(peak, _rss()) - before


def memory_in_subprocess(preset: str, batch: int, method: str) -> int:
    out = subprocess.run([sys.executable, __file__, "--preset", preset, "--batch", str(batch), "--memory-of", method],
                         check=True, capture_output=True, text=True)
    return int(json.loads(out.stdout.strip().splitlines()[-1])["peak_rss_growth"])


def compare_components(model, inputs, kwargs, path: str) -> None:
    """Save the components of every output (first run) or report whether they equal the saved ones bit for bit."""
    d = decompose(model, inputs, forward_kwargs=kwargs)
    found = {key: {name: d.components[name][key] for name in d.names} for key in d.output}
    if not os.path.exists(path):
        from fusionlens.io import atomic_torch_save

        atomic_torch_save(path, found)
        print(f"components saved to {path}")
        return
    from fusionlens.io import load_torch_file  # (imported here: an older checkout may save without it)

    saved = load_torch_file(path, what="--components", expected="LMD components saved by this benchmark",
                            weights_only=True)
    differ = [f"{key}/{name}" for key in saved for name in saved[key]
              if not torch.equal(saved[key][name], found[key][name])]
    print(f"components vs {path}: " + ("bit-identical" if not differ else f"differ in {differ}"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny", choices=("tiny", "small", "paper"))
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--pixels", type=int, default=4, help="output pixels timed for the per-pixel methods")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS),
                        help="rows to measure (the forward always: it is the unit)")
    parser.add_argument("--components", help="file of the LMD components: saved if absent, else compared bit for bit")
    parser.add_argument("--memory-of", choices=METHODS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.memory_of:
        print(json.dumps({"peak_rss_growth": measure_memory(args.preset, args.batch, args.memory_of)}))
        return
    model, inputs, kwargs = setup(args.preset, args.batch)
    if args.components:
        compare_components(model, inputs, kwargs, args.components)
    n_pixels = model.config.grid.shape[0] * model.config.grid.shape[1]
    t_forward = timed(lambda: run_forward(model, inputs, kwargs), args.repeats)
    timers = {
        "lmd": lambda: timed(lambda: run_lmd(model, inputs, kwargs), args.repeats),
        "shapley-exact": lambda: timed(lambda: run_shapley_exact(model, inputs, kwargs), args.repeats),
        "captum-shapley": lambda: timed(lambda: [_captum_call(model, inputs, kwargs, p) for p in range(args.pixels)],
                                        1) / args.pixels * n_pixels,
        "grad-x-input": lambda: timed(lambda: [_gradient_call(model, inputs, kwargs, p) for p in range(args.pixels)],
                                      1) / args.pixels * n_pixels,
    }
    rows = {"forward": t_forward, **{m: timers[m]() for m in args.methods if m != "forward"}}
    memory = {m: memory_in_subprocess(args.preset, args.batch, m)
              for m in ("forward", "lmd", "shapley-exact", "grad-x-input") if m in rows}
    print(f"preset={args.preset} batch={args.batch} threads={args.threads} output pixels={n_pixels} "
          f"torch={torch.__version__}")
    print("| method | wall time (s) | time / forward | peak memory growth (MiB) | memory / forward |")
    print("|---|---|---|---|---|")
    for method, seconds in rows.items():
        extrapolated = " (extrapolated)" if method in ("captum-shapley", "grad-x-input") else ""
        mem = memory.get(method)
        mem_cells = (f"{mem / 2**20:.1f} | {mem / max(memory['forward'], 1):.2f}x" if mem is not None else "— | —")
        print(f"| {method} | {seconds:.3f}{extrapolated} | {seconds / t_forward:.2f}x | {mem_cells} |")


if __name__ == "__main__":
    main()
