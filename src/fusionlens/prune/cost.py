"""Model cost: parameters, FLOPs (``torch.utils.flop_counter``) and CPU latency, for the before/after tables
of structured pruning (AlterMOMA Table 5)."""

from __future__ import annotations

import statistics
import time
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from fusionlens.prune.params import call_model


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def count_flops(model: nn.Module, example_inputs: Any) -> int:
    """Forward FLOPs (``torch.utils.flop_counter``; a multiply-add counts 2)."""
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        call_model(model, example_inputs)
    return int(counter.get_total_flops())


def cpu_latency(model: nn.Module, example_inputs: Any, repeats: int = 10, warmup: int = 2) -> float:
    """Median wall-clock seconds of one forward pass (no grad, eval mode) on the current thread setting."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    was_training = model.training
    model.eval()
    times = []
    with torch.no_grad():
        for i in range(warmup + repeats):
            start = time.perf_counter()
            call_model(model, example_inputs)
            if i >= warmup:
                times.append(time.perf_counter() - start)
    model.train(was_training)
    return statistics.median(times)


def cost_report(model: nn.Module, example_inputs: Any, repeats: int = 10) -> dict[str, float]:
    """Parameters, GFLOPs and median CPU latency (ms) of ``model`` on ``example_inputs``."""
    return {
        "params": count_parameters(model),
        "gflops": count_flops(model, example_inputs) / 1e9,
        "latency_ms": 1e3 * cpu_latency(model, example_inputs, repeats),
        "threads": torch.get_num_threads(),
    }
