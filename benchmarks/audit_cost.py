"""Cost of the sensor-reliance audit (``fusionlens.audit``): seconds per sample on one core.

Trains a tiny camera-radar model and its radar-only partner on the built-in world (default world config, a few
steps: the cost does not depend on how well they are trained), then audits ``--samples`` val samples with both
faults (camera / radar blacked out) and the partner, the monitor fitted on ``--reference`` train samples, and
writes the report. Per stage: the audited samples (one decomposition + one per fault + the partner's forward),
the reference samples (one decomposition), the report (figures, sample pages, JSON / CSV); then a second run that
resumes entirely from the cache. Wall-clock and process CPU seconds (the CPU time is what one core costs when the
shared machine is loaded; the 1-minute load average is recorded beside them).

    OMP_NUM_THREADS=1 nice -n 10 .venv/bin/python benchmarks/audit_cost.py --samples 128
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch

import fusionlens.audit.api as audit_api
from fusionlens.audit import audit
from fusionlens.data.builtin import BuiltinWorld
from fusionlens.models import preset_config
from fusionlens.train.checkpoint import load_model
from fusionlens.train.loop import TrainConfig, train


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=128)
    parser.add_argument("--reference", type=int, default=64)
    parser.add_argument("--steps", type=int, default=60, help="training steps of each tiny model")
    parser.add_argument("--out", default="out/bench-audit")
    args = parser.parse_args()
    torch.set_num_threads(1)
    out = Path(args.out)
    train_set = BuiltinWorld("train", size=max(args.reference, 64), workers=0)
    val_set = BuiltinWorld("val", size=args.samples, workers=0)
    models = {}
    for mods in ("camera,radar", "radar"):
        path = out / "checkpoints" / f"{mods.replace(',', '_')}.pt"
        if not path.is_file():
            train(preset_config("tiny", mods), TrainConfig(steps=args.steps, batch_size=4), train_set,
                  checkpoint=path, progress=False)
        models[mods] = load_model(path)[0]

    timed = {"audited": 0.0, "reference": 0.0}
    cpu = {"audited": 0.0, "reference": 0.0}
    calls = {"audited": 0, "reference": 0}
    real = audit_api.audit_sample

    def clocked(*a, **k):
        stage = "audited" if k["faults"] else "reference"
        start, start_cpu = time.perf_counter(), time.process_time()
        try:
            return real(*a, **k)
        finally:
            timed[stage] += time.perf_counter() - start
            cpu[stage] += time.process_time() - start_cpu
            calls[stage] += 1

    audit_api.audit_sample = clocked
    report = out / "report"
    for cache in (report / "cache").glob("*/*.json"):  # a cold run: no cached samples
        cache.unlink()
    start, start_cpu = time.perf_counter(), time.process_time()
    result = audit(models["camera,radar"], val_set, out=report, partners={"radar-only": models["radar"]},
                   reference=train_set, reference_indices=range(args.reference), progress=False)
    total, total_cpu = time.perf_counter() - start, time.process_time() - start_cpu
    start = time.perf_counter()
    audit(models["camera,radar"], val_set, out=report, partners={"radar-only": models["radar"]},
          reference=train_set, reference_indices=range(args.reference), progress=False)
    resumed = time.perf_counter() - start
    rows = {
        "machine": f"{platform.processor() or platform.machine()}, torch threads {torch.get_num_threads()}",
        "samples": calls["audited"], "reference_samples": calls["reference"],
        "load_average_1min": os.getloadavg()[0],
        "s_per_audited_sample": timed["audited"] / max(1, calls["audited"]),
        "cpu_s_per_audited_sample": cpu["audited"] / max(1, calls["audited"]),
        "s_per_reference_sample": timed["reference"] / max(1, calls["reference"]),
        "cpu_s_per_reference_sample": cpu["reference"] / max(1, calls["reference"]),
        "report_s": total - timed["audited"] - timed["reference"],
        "report_cpu_s": total_cpu - cpu["audited"] - cpu["reference"], "pages": len(result.pages),
        "total_s": total, "total_cpu_s": total_cpu, "total_s_per_audited_sample": total / args.samples,
        "total_cpu_s_per_audited_sample": total_cpu / args.samples, "resumed_total_s": resumed,
        "flagged": len((result.monitor.get("samples") or {}).get("flagged_samples", [])),
    }
    print(json.dumps(rows, indent=2))
    print(f"report: {result.index.resolve()}")


if __name__ == "__main__":
    main()
