"""The readings of the AlterMOMA paper the library offers, each against a computation that does not use it:

* D as ``n`` batches (``reference_batches``): DeCI, g_0 and the first reactivation step use the mean gradient of
  the ``n`` batches, g_B the mean over ``n`` fresh batches (or the same ones with ``same_batch_reri``) -- checked
  against the hand-derived gradients of a linear two-branch network (``test_prune_scores``) averaged over the
  batches, and against autograd on one batch holding all of them;
* Adam reactivation (``reactivation_optimizer="adam"``): Adam's update written out by hand;
* B (``reactivation_steps``), the batches each stage consumes, and the harness options that file a reading's
  cells under ``readings/`` next to the baselines.
"""

from __future__ import annotations

import argparse

import pytest
import torch

from fusionlens.cli.reproduce import altermoma_config, register
from fusionlens.experiments.altermoma import ReproduceConfig, Runner
from fusionlens.prune.altermoma import REACTIVATION_LRS, AlterMOMA
from fusionlens.prune.api import prune
from test_experiments_altermoma import PAIR, synthetic, tiny  # noqa: F401 (fixture)
from test_prune_scores import GROUPS, NAMES, LinearFusion, hand_grads, loss_fn, make, weights


def batches_of(n: int, seed: int = 10) -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [
        {k: torch.randn(*shape, generator=gen, dtype=torch.float64)
         for k, shape in (("camera", (3, 2)), ("lidar", (3, 2)), ("target", (3,)))}
        for _ in range(n)
    ]


def mean_grads(A: torch.Tensor, Bm: torch.Tensor, w: torch.Tensor, batches: list[dict]) -> dict[str, torch.Tensor]:
    grads = [hand_grads(A, Bm, w, b) for b in batches]
    return {n: sum(g[n] for g in grads) / len(grads) for n in NAMES}


def adam(steps: int, lr: float):
    """torch.optim.Adam's documented update (beta1 0.9, beta2 0.999, eps 1e-8, bias-corrected), by hand."""
    state: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def update(name: str, p: torch.Tensor, g: torch.Tensor, t: int) -> torch.Tensor:
        m, v = state.get(name, (torch.zeros_like(g), torch.zeros_like(g)))
        m, v = 0.9 * m + 0.1 * g, 0.999 * v + 0.001 * g * g
        state[name] = (m, v)
        return p - lr * (m / (1 - 0.9**t)) / ((v / (1 - 0.999**t)).sqrt() + 1e-8)

    return update


def sgd(lr: float):
    return lambda name, p, g, t: p - lr * g


def hand_stage(model: LinearFusion, masked: str, reference: list[dict], steps: list[dict], last: list[dict],
               update) -> dict[str, torch.Tensor]:
    """One ReRI stage by hand: mu_masked = 0; first step on the mean gradient over ``reference`` (D), then one step
    per batch of ``steps``; ReRI = |theta_0 (g_0(D) - g_B(last))| (eq. 10 / 26 / 34-35)."""
    A, Bm, w = weights(model)
    theta0 = {"camera.weight": A.clone(), "lidar.weight": Bm.clone(), "fuse.weight": w.clone()}
    A = torch.zeros_like(A) if masked == "camera" else A
    Bm = torch.zeros_like(Bm) if masked == "lidar" else Bm
    g0 = mean_grads(A, Bm, w, reference)
    for t, batches in enumerate([reference] + [[b] for b in steps], start=1):
        g = mean_grads(A, Bm, w, batches)
        w = update("fuse.weight", w, g["fuse.weight"], t)
        if masked == "camera":
            Bm = update("lidar.weight", Bm, g["lidar.weight"], t)
        else:
            A = update("camera.weight", A, g["camera.weight"], t)
    gB = mean_grads(A, Bm, w, last)
    return {n: (theta0[n] * (g0[n] - gB[n])).abs() for n in NAMES if not n.startswith(masked)}


def test_d_as_n_batches_is_the_mean_of_single_batch_gradients() -> None:
    model, _ = make(seed=3)
    data = batches_of(3)
    method = AlterMOMA(loss_fn, data, groups=GROUPS, reference_batches=3, reactivation_steps=1, same_batch_reri=True)
    method(model, NAMES, 0.5)
    ind = method.last_indicators
    A, Bm, w = weights(model)
    g = mean_grads(A, Bm, w, data)
    theta = {"camera.weight": A, "lidar.weight": Bm, "fuse.weight": w}
    for n in NAMES:  # eq. 6 / 23 / 29 with dL(; D)/dtheta the mean over D's batches
        torch.testing.assert_close(ind.deci[n], (theta[n] * g[n]).abs())
    # the same through autograd on one batch holding all three (equal sizes: the union's mean loss)
    union = {k: torch.cat([b[k] for b in data]) for k in data[0]}
    whole = AlterMOMA(loss_fn, [union], groups=GROUPS, reactivation_steps=1, same_batch_reri=True)
    whole(model, NAMES, 0.5)
    for n in NAMES:
        torch.testing.assert_close(ind.deci[n], whole.last_indicators.deci[n])
        for m in ("camera", "lidar"):
            if n in ind.reri[m]:
                torch.testing.assert_close(ind.reri[m][n], whole.last_indicators.reri[m][n])
    for masked in ("camera", "lidar"):  # B = 1: the one step is taken on D, g_B on D again
        expected = hand_stage(model, masked, data, [], data, sgd(REACTIVATION_LRS["sgd"]))
        for n, r in expected.items():
            torch.testing.assert_close(ind.reri[masked][n], r)
    assert method.backward_passes == 3 + 2 * (3 + 0 + 3)  # n for DeCI, 2n + B - 1 per stage (g_B at theta_B)


def test_fresh_batches_for_g_b_and_b_steps_consume_the_stream_in_order() -> None:
    model, _ = make(seed=4)
    data = batches_of(8, seed=11)
    method = AlterMOMA(loss_fn, data, groups=GROUPS, reference_batches=2, reactivation_steps=2, reactivation_lr=0.05)
    method(model, NAMES, 0.5)
    ind = method.last_indicators
    # D = batches 0-1; masking camera (the first group): step on batch 2, g_B on 3-4; masking lidar: 5, then 6-7
    plan = {"camera": ([data[2]], data[3:5]), "lidar": ([data[5]], data[6:8])}
    for masked, (steps, last) in plan.items():
        expected = hand_stage(model, masked, data[:2], steps, last, sgd(0.05))
        for n, r in expected.items():
            torch.testing.assert_close(ind.reri[masked][n], r)
    assert method.backward_passes == 2 + 2 * (2 * 2 + 2 - 1)  # n + M (2n + B - 1)


def test_adam_reactivation_matches_adams_update_by_hand() -> None:
    model, _ = make(seed=5)
    data = batches_of(2, seed=12)
    method = AlterMOMA(loss_fn, data, groups=GROUPS, reactivation_steps=3, reactivation_optimizer="adam",
                       same_batch_reri=True)
    assert method.lr == REACTIVATION_LRS["adam"] == 1e-4  # the paper's training lr is Adam's default here
    method(model, NAMES, 0.5)
    ind = method.last_indicators
    stream = data * 2  # the list is re-iterated: D = batch 0, then steps on 1, 0
    for masked in ("lidar", "camera"):
        expected = hand_stage(model, masked, data[:1], stream[1:3], data[:1], adam(3, 1e-4))
        for n, r in expected.items():
            torch.testing.assert_close(ind.reri[masked][n], r)
        # SGD at the same lr would give another ReRI (Adam's step is ~lr * sign(g), not lr * g)
        other = hand_stage(model, masked, data[:1], stream[1:3], data[:1], sgd(1e-4))
        assert any(not torch.allclose(ind.reri[masked][n], other[n]) for n in other)


def test_reading_options_reach_prune_and_bad_values_are_named() -> None:
    model, _ = make(seed=6)
    data = batches_of(4, seed=13)
    result = prune(model, "altermoma", 0.5, loss_fn=loss_fn, batches=data, groups=GROUPS, reference_batches=2,
                   reactivation_optimizer="adam", reactivation_steps=1, same_batch_reri=True)
    assert result.report["scoring_backward_passes"] == 2 + 2 * (2 * 2 + 0)
    with pytest.raises(ValueError, match="reference_batches"):
        AlterMOMA(loss_fn, data, reference_batches=0)
    with pytest.raises(ValueError, match="reference_batches"):
        AlterMOMA(loss_fn, data, reference_batches=2.0)
    with pytest.raises(ValueError, match="reactivation_optimizer must be one of"):
        AlterMOMA(loss_fn, data, reactivation_optimizer="rmsprop")
    with pytest.raises(ValueError, match="reactivation_lr"):
        AlterMOMA(loss_fn, data, reactivation_optimizer="adam", reactivation_lr=-1.0)


def test_harness_files_a_reading_under_readings_beside_the_baselines(tmp_path, synthetic) -> None:  # noqa: F811
    reading = {"reference_batches": 2, "same_batch_reri": True, "reactivation_steps": 1}
    cfg = tiny(tmp_path, methods=("snip", "altermoma"), ablation_betas=(0.0, 1.0), altermoma_options=reading,
               reference_recipe="scratch")
    runner = Runner(cfg, progress=False)
    jobs = list(runner.jobs())
    assert ("unstructured", (PAIR.replace(",", "-"), "snip", 0.8, 0)) in jobs
    assert ("unstructured", ("camera-lidar", "altermoma", 0.8, 0, None, reading, "readings")) in jobs
    assert ("unstructured", ("camera-lidar", "altermoma", 0.8, 0, None, {**reading, "beta": 0.0}, "readings")) in jobs
    assert not any(kind == "ablation" for kind, _ in jobs)
    cell = runner.unstructured(*next(args for _, args in jobs if args[5:6] == ({**reading, "beta": 0.0},)))
    assert cell["extra_options"] == {**reading, "beta": 0.0}
    assert cell["scoring_backward_passes"] == 2 + 2 * (2 * 2 + 1 - 1)  # n + M (2n + B - 1)
    files = sorted(p.relative_to(runner.out).as_posix() for p in runner.out.rglob("seed0.json"))
    assert files == ["readings/camera-lidar/altermoma_beta0_reactivation_steps1_reference_batches2_same_batch_reriTrue/"
                     "s0.8/seed0.json"]


def test_harness_refuses_a_bad_reading_or_device_before_any_work(tmp_path) -> None:
    with pytest.raises(ValueError, match="reference_batches"):
        Runner(tiny(tmp_path, altermoma_options={"reference_batches": 0}), progress=False)
    with pytest.raises(ValueError, match="takes options"):
        Runner(tiny(tmp_path, altermoma_options={"batches": 2}), progress=False)
    with pytest.raises(ValueError, match="device must be"):
        Runner(tiny(tmp_path, device="gpu0"), progress=False)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no GPU"):
            Runner(tiny(tmp_path, device="cuda"), progress=False)
    assert not any(tmp_path.iterdir())  # nothing written


def test_cli_flags_describe_the_reading() -> None:
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    args = parser.parse_args(["reproduce", "altermoma", "--altermoma-batches", "8", "--altermoma-same-batches",
                              "--altermoma-optimizer", "adam", "--altermoma-steps", "4"])
    cfg = altermoma_config(args)
    assert cfg.altermoma_options == {"reference_batches": 8, "same_batch_reri": True,
                                     "reactivation_optimizer": "adam", "reactivation_steps": 4}
    literal = altermoma_config(parser.parse_args(["reproduce", "altermoma"]))
    assert literal.altermoma_options == {} and literal.device == "cpu"
    assert ReproduceConfig().altermoma_options == {}


def test_prune_command_takes_the_reading_options() -> None:
    from fusionlens.cli import build_parser
    from fusionlens.cli.prune import method_options

    base = ["prune", "--checkpoint", "m.pt", "--sparsity", "0.5", "--out", "p.pt"]
    args = build_parser().parse_args([*base, "--method", "altermoma", "--reference-batches", "4",
                                      "--reactivation-optimizer", "adam"])
    assert method_options(args) == {"reference_batches": 4, "reactivation_optimizer": "adam"}
    with pytest.raises(ValueError, match="--reference-batches is an option of --method altermoma"):
        method_options(build_parser().parse_args([*base, "--method", "snip", "--reference-batches", "4"]))
