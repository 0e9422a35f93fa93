"""Mutation check: does the test suite fail when a rule or a truth the project's claims rest on is wrong?

Each mutant is a named in-memory change (a monkeypatch; no file is edited): a decomposition rule family scaling
its modality components by 1/2, attention weights made uniform, the product rule's 1/n share, the norms' mean
rule, the pruning threshold off by one, the camera visibility flags zeroed, DDP summing gradients instead of
averaging them. For every mutant the relevant tests run in a fresh pytest process with the mutant applied; the
mutant is *killed* when a test fails. Subprocesses the tests start (torchrun ranks) get the mutant too: it is
applied from a ``sitecustomize`` module on ``PYTHONPATH`` that reads ``FUSIONLENS_MUTANT``.

    .venv/bin/python tools/mutants.py                # every mutant; a table of the killing tests
    .venv/bin/python tools/mutants.py --only layer_norm attention_uniform
    .venv/bin/python tools/mutants.py --list

Exit status 1 if a mutant survives. Run it when a rule or a truth changes; the last record is in docs/testing.md.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ENV_VAR = "FUSIONLENS_MUTANT"


def _scaled(parts, factor: float):
    """A rule's result with every modality component times ``factor`` (tensor, list with ``None``s, blocked)."""
    import torch

    if parts is None:
        return None
    if hasattr(parts, "blocks"):  # BlockedParts (a named tuple): the stacked tensor plus its channel spans
        return parts._replace(parts=parts.parts * factor)
    if isinstance(parts, list | tuple):
        return type(parts)(_scaled(p, factor) for p in parts)
    if isinstance(parts, torch.Tensor):
        return parts * factor
    raise TypeError(f"cannot scale a rule result of type {type(parts).__name__}")


def _halve_rules(*ops: str) -> Callable[[], None]:
    """Every op in ``ops`` gets its built-in rule with the modality components halved."""
    def apply() -> None:
        from fusionlens.decompose import ruleset

        for op in ops:
            rule = ruleset._DEFAULT_TABLE[op]

            def halved(engine, func, args, kwargs, total, _rule=rule):
                return _scaled(_rule(engine, func, args, kwargs, total), 0.5)

            ruleset._DEFAULT_TABLE[op] = halved
    return apply


def _uniform_attention() -> None:
    """SDPA and nn.MultiheadAttention: every key gets the same weight (the weights' shape kept)."""
    import torch

    from fusionlens.decompose import rules, rules_composite

    for module, name in ((rules, "_attention_weights"), (rules_composite, "_mha_weights")):
        original = getattr(module, name)

        def uniform(*args, _original=original):
            weights = _original(*args)
            return torch.full_like(weights, 1.0 / weights.shape[-1])

        setattr(module, name, uniform)


def _product_full_share() -> None:
    """Products: each modality takes a mixed term whole instead of its 1/n share (the path integral evaluated at
    t = 1 only)."""
    from fusionlens.decompose import rules

    rules._gauss_legendre = lambda count: ([1.0], [1.0])


def _norm_mean_identity() -> None:
    """InstanceNorm / LayerNorm / GroupNorm: the ``ratio`` mean rule silently behaves as ``identity``."""
    from fusionlens.decompose import rules_nonlinear

    core = rules_nonlinear._norm_core
    rules_nonlinear._norm_core = lambda engine, parts, value, groups, eps, rule: core(
        engine, parts, value, groups, eps, "identity" if rule == "ratio" else rule)


def _prune_threshold() -> None:
    """Eq. 2's threshold off by one: one parameter more than ``round(rho N)`` is pruned."""
    import torch

    from fusionlens.prune import pruner

    original = pruner.global_masks

    def one_more(scores, sparsity):
        masks = original(scores, sparsity)
        for mask in masks.values():
            flat = mask.view(-1)
            kept = torch.nonzero(flat).flatten()
            if kept.numel() > 1:
                flat[kept[0]] = False
                break
        return masks

    for module in _modules_holding(original):
        module.global_masks = one_more


def _visibility_zero(module: str, function: str, *fields: str) -> Callable[[], None]:
    """A sensor's visibility truth in the world: ``function`` of ``fusionlens.world.<module>`` reports no object
    seen (its per-object ``fields`` zeroed)."""
    def apply() -> None:
        import importlib

        original = getattr(importlib.import_module(f"fusionlens.world.{module}"), function)

        def blind(*args, **kwargs):
            out = original(*args, **kwargs)
            for field in fields:
                getattr(out, field)[:] = 0
            return out

        for holder in _modules_holding(original):
            setattr(holder, function, blind)
    return apply


def _ddp_hook(kind: str) -> Callable[[], None]:
    """DistributedDataParallel with a communication hook that sums the ranks' gradients (``sum``) or keeps each
    rank's own (``local``: no all-reduce, the replicas drift apart) instead of averaging them."""
    def apply() -> None:
        import torch
        import torch.distributed as dist

        def hook(state, bucket):
            if kind == "local":
                future = torch.futures.Future()
                future.set_result(bucket.buffer())
                return future
            return dist.all_reduce(bucket.buffer(), async_op=True).get_future().then(lambda f: f.value()[0])

        base = torch.nn.parallel.DistributedDataParallel

        class Mutated(base):  # type: ignore[misc, valid-type]
            def __init__(self, *args, **kwargs) -> None:
                super().__init__(*args, **kwargs)
                self.register_comm_hook(None, hook)

        torch.nn.parallel.DistributedDataParallel = Mutated
    return apply


def _modules_holding(obj: object) -> list:
    """Every loaded fusionlens module that holds ``obj`` as a global (``from x import f`` copies included)."""
    import importlib
    import pkgutil

    import fusionlens

    for info in pkgutil.walk_packages(fusionlens.__path__, prefix="fusionlens."):
        if not info.name.startswith("fusionlens.cli") and "._" not in info.name:
            try:
                importlib.import_module(info.name)
            except Exception:  # noqa: BLE001 -- a module another change broke is not this mutant's business
                continue
    return [m for name, m in list(sys.modules.items())
            if name.startswith("fusionlens") and any(v is obj for v in vars(m).values())]


@dataclass(frozen=True)
class Mutant:
    name: str
    what: str
    apply: Callable[[], None]
    tests: tuple[str, ...]


DECOMPOSE_TESTS = ("tests/test_decompose_oracles.py",)
DDP_TESTS = ("tests/test_train_ddp.py::test_two_gloo_processes_train_the_single_process_weights",
             "tests/test_train_ddp.py::test_two_gloo_processes_pretrain_the_single_process_camera_trunk")
MUTANTS = [
    Mutant("activation", "F(0)=0 activations' components x 1/2", _halve_rules("relu", "gelu", "silu", "tanh"),
           DECOMPOSE_TESTS),
    Mutant("batch_norm", "BatchNorm components x 1/2", _halve_rules("batch_norm"), DECOMPOSE_TESTS),
    Mutant("instance_norm", "InstanceNorm components x 1/2", _halve_rules("instance_norm"), DECOMPOSE_TESTS),
    Mutant("layer_norm", "LayerNorm components x 1/2", _halve_rules("layer_norm"), DECOMPOSE_TESTS),
    Mutant("group_norm", "GroupNorm components x 1/2", _halve_rules("group_norm"), DECOMPOSE_TESTS),
    Mutant("rms_norm", "RMSNorm components x 1/2", _halve_rules("rms_norm"), DECOMPOSE_TESTS),
    Mutant("norm_mean_rule", "IN/LN/GN 'ratio' mean rule behaves as 'identity'", _norm_mean_identity,
           DECOMPOSE_TESTS),
    Mutant("sdpa", "scaled_dot_product_attention components x 1/2", _halve_rules("scaled_dot_product_attention"),
           DECOMPOSE_TESTS),
    Mutant("attention_uniform", "SDPA / MultiheadAttention weights uniform", _uniform_attention,
           DECOMPOSE_TESTS + ("tests/test_decompose_attention.py",)),
    Mutant("max_pool", "max-pool components x 1/2", _halve_rules("max_pool2d", "max_pool2d_with_indices"),
           DECOMPOSE_TESTS),
    Mutant("select", "max/amax/amin/topk/maximum components x 1/2",
           _halve_rules("max", "amax", "amin", "topk", "maximum"), DECOMPOSE_TESTS),
    Mutant("scatter_reduce", "scatter_reduce components x 1/2", _halve_rules("scatter_reduce"), DECOMPOSE_TESTS),
    Mutant("grid_sample", "grid_sample components x 1/2", _halve_rules("grid_sample"), DECOMPOSE_TESTS),
    Mutant("product", "products of decomposed tensors x 1/2", _halve_rules("mul", "__mul__", "matmul",
           "__matmul__", "einsum"), DECOMPOSE_TESTS),
    Mutant("product_share", "products: mixed terms taken whole instead of the 1/n share", _product_full_share,
           DECOMPOSE_TESTS),
    Mutant("conv_linear", "convolution and F.linear components x 1/2", _halve_rules("conv2d", "linear"),
           DECOMPOSE_TESTS),
    Mutant("multi_head_attention", "nn.MultiheadAttention components x 1/2",
           _halve_rules("multi_head_attention_forward"), ("tests/test_decompose_attention.py",)),
    Mutant("normalize_norm", "F.normalize and vector-norm components x 1/2",
           _halve_rules("normalize", "norm", "linalg_vector_norm"), ("tests/test_decompose_attention.py",)),
    Mutant("log_softmax", "log_softmax components x 1/2", _halve_rules("log_softmax"),
           ("tests/test_decompose_silent.py",)),
    Mutant("prune_threshold", "global threshold prunes round(rho N) + 1", _prune_threshold,
           ("tests/test_prune_cli.py", "tests/test_prune_pruner.py")),
    Mutant("camera_visibility", "camera visibility flags all zero",
           _visibility_zero("camera", "render_cameras", "pixels", "signal"), ("tests/test_world_visibility.py",)),
    Mutant("lidar_visibility", "LiDAR points per object all zero",
           _visibility_zero("lidar", "simulate_lidar", "per_object"), ("tests/test_world_visibility.py",)),
    Mutant("radar_visibility", "radar points per object all zero",
           _visibility_zero("radar", "simulate_radar", "per_object"), ("tests/test_world_visibility.py",)),
    Mutant("ddp_gradient_sum", "DDP sums gradients instead of averaging", _ddp_hook("sum"), DDP_TESTS),
    Mutant("ddp_no_allreduce", "DDP ranks step on their own gradients", _ddp_hook("local"), DDP_TESTS),
]
BY_NAME = {m.name: m for m in MUTANTS}

_SITECUSTOMIZE = f"""
import os, sys
name = os.environ.get({ENV_VAR!r})
if name:
    sys.path.insert(0, {str(ROOT / 'tools')!r})
    import mutants
    mutants.BY_NAME[name].apply()
"""


def run(mutant: Mutant, site: Path) -> tuple[bool, str, float]:
    """Run the mutant's tests; returns (killed, the first failing test or the reason, seconds)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", **{ENV_VAR: mutant.name})
    env["PYTHONPATH"] = os.pathsep.join([str(site), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "pytest", *mutant.tests, "-x", "-q", "-p", "no:randomly", "-rf",
                           "-p", "no:cacheprovider"], cwd=ROOT, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    failed = re.findall(r"^FAILED (\S+)", proc.stdout, re.M)
    if proc.returncode == 1 and failed:
        return True, failed[0], seconds
    if proc.returncode == 0:
        return False, "all tests passed", seconds
    return False, f"pytest exit {proc.returncode} (an error, not a failing test): {proc.stdout[-400:]}", seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="+", choices=sorted(BY_NAME), help="run these mutants only")
    parser.add_argument("--list", action="store_true", help="list the mutants and exit")
    args = parser.parse_args(argv)
    if args.list:
        for m in MUTANTS:
            print(f"{m.name:20s} {m.what}")
        return 0
    chosen = [BY_NAME[n] for n in args.only] if args.only else MUTANTS
    survivors = 0
    with tempfile.TemporaryDirectory() as tmp:
        site = Path(tmp)
        (site / "sitecustomize.py").write_text(_SITECUSTOMIZE)
        print("| mutant | change | killed by | s |\n|---|---|---|---|", flush=True)
        for mutant in chosen:
            killed, by, seconds = run(mutant, site)
            survivors += not killed
            print(f"| {mutant.name} | {mutant.what} | {by if killed else 'SURVIVED: ' + by} | {seconds:.0f} |",
                  flush=True)
    return 1 if survivors else 0


if __name__ == "__main__":
    raise SystemExit(main())
