"""``fusionlens prune`` bad input (clear errors before any work), the method factory, the reference-model
glue, and resumability of the reproduction runner."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from fusionlens.cli import main
from fusionlens.experiments.altermoma import ReproduceConfig, Runner
from fusionlens.prune.api import METHODS, build_importance, prune
from fusionlens.prune.pruner import get_masks
from prune_tiny import TinyFusion, make_batches, tiny_loss


def test_cli_rejects_bad_sparsity_before_loading(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    code = main(["prune", "--checkpoint", str(tmp_path / "missing.pt"), "--sparsity", "1.0"])
    assert code == 2
    assert "--sparsity must lie in [0, 1)" in capsys.readouterr().err


def test_cli_missing_checkpoint_and_foreign_option(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["prune", "--checkpoint", str(tmp_path / "missing.pt")]) == 2
    assert "no such file" in capsys.readouterr().err
    assert main(["prune", "--checkpoint", "x.pt", "--method", "snip", "--beta", "2"]) == 2
    assert "--beta is an option of --method altermoma" in capsys.readouterr().err


def test_cli_checkpoint_of_another_architecture(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from fusionlens.models import build_model, preset_config
    from fusionlens.train.checkpoint import save_checkpoint
    from fusionlens.train.synthetic import TEST_GRID

    small = preset_config("tiny", "camera,lidar", grid=TEST_GRID, point_bev_channels=8)
    other = small.with_(point_bev_channels=16)
    path = save_checkpoint(tmp_path / "ref.pt", model=build_model(small), model_config=other)
    assert main(["prune", "--checkpoint", str(path), "--data", "synthetic", "--no-progress"]) == 2
    assert "does not fit the architecture" in capsys.readouterr().err


def test_method_factory_validates() -> None:
    with pytest.raises(ValueError, match="method must be one of"):
        build_importance("obd")
    with pytest.raises(ValueError, match="needs loss_fn and batches"):
        build_importance("snip")
    with pytest.raises(ValueError, match="needs input_factory"):
        build_importance("synflow")
    with pytest.raises(ValueError, match="takes options"):
        build_importance("magnitude", beta=1.0)


@pytest.mark.parametrize("method", METHODS)
def test_every_method_prunes_exactly_through_the_api(method: str) -> None:
    torch.manual_seed(0)
    model = TinyFusion()
    batches = make_batches(6)
    opts = {
        "imp": {"steps_per_round": 2},
        "synflow": {"iterations": 3},
        "prospr": {"inner_lr": 0.05},
        "altermoma": {"reactivation_steps": 2},
    }.get(method, {})
    result = prune(
        model,
        method,
        0.8,
        loss_fn=tiny_loss,
        batches=batches,
        finetune_steps=2,
        input_factory=lambda: {"camera": batches[0]["camera"][:1], "lidar": batches[0]["lidar"][:1]},
        **opts,
    )
    n = result.report["n_prunable"]
    masked = sum(int((~mask).sum()) for mask in get_masks(result.model).values())
    assert masked == round(0.8 * n)  # exactly round(rho * N) entries masked (eq. 2), fine-tuning included
    assert result.report["n_zero"] >= masked  # masked entries plus any weight that is exactly zero
    assert result.report["finetune_steps"] == 2
    if method == "altermoma":
        assert result.report["scoring_backward_passes"] == 2 * 2 + 3


def test_altermoma_needs_groups_before_work() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 1))
    with pytest.raises(ValueError, match="no modality_groups"):
        prune(model, "altermoma", 0.5, loss_fn=tiny_loss, batches=[{}])


def test_runner_cells_are_atomic_and_resume(tmp_path: Path) -> None:
    runner = Runner(ReproduceConfig(out_dir=str(tmp_path), seeds=(0,)), progress=False)
    calls = []

    def crash() -> dict:
        calls.append("crash")
        raise KeyboardInterrupt("simulated interruption")  # an interrupted cell leaves nothing behind

    with pytest.raises(KeyboardInterrupt, match="simulated interruption"):
        runner.store.compute("unstructured/a/m/s0.8/seed0.json", crash)
    assert runner.out == tmp_path / "pretrained"  # the default recipe's cell tree
    assert not (runner.out / "unstructured/a/m/s0.8/seed0.json").exists()
    assert runner.store.compute("unstructured/a/m/s0.8/seed0.json", lambda: {"iou": 0.5}) == {"iou": 0.5}
    # a finished cell is read back, never recomputed
    assert runner.store.compute("unstructured/a/m/s0.8/seed0.json", crash) == {"iou": 0.5}
    assert calls == ["crash"]
    assert json.loads((runner.out / "config.json").read_text())["seeds"] == [0]
    jobs = list(runner.jobs())
    assert len({a for k, a in jobs if k == "unstructured"}) == 2 * 3 * len(METHODS)
    # the ablation reuses the main grid's alpha = beta = 1 cells and adds the other betas
    assert sum(k == "ablation" for k, _ in jobs) == 3 * 4
    assert sum(k == "structured" for k, _ in jobs) == 2 * 2 * 4


def test_summary_tables_and_plot(tmp_path: Path) -> None:
    from fusionlens.experiments.altermoma_report import plot_ablation, summarise
    from fusionlens.io import atomic_write_json

    for seed, iou in ((0, 0.2), (1, 0.3)):
        atomic_write_json(
            tmp_path / f"unstructured/a_b/snip/s0.8/seed{seed}.json",
            {"pair": "a,b", "method": "snip", "sparsity": 0.8, "iou": iou, "scoring_backward_passes": 1},
        )
    atomic_write_json(
        tmp_path / "unstructured/a_b/altermoma/s0.8/seed0.json",
        {"pair": "a,b", "method": "altermoma", "sparsity": 0.8, "iou": 0.1, "seed": 0, "scoring_backward_passes": 19},
    )
    atomic_write_json(
        tmp_path / "ablation/a_b/b0/s0.8/seed0.json",
        {"pair": "a,b", "method": "altermoma", "sparsity": 0.8, "iou": 0.15, "beta": 0.0, "seed": 0},
    )
    table = summarise(tmp_path)
    assert "| snip | 25.0 ± 7.1 (n=2) | 1 |" in table  # mean and sample std of 20 % and 30 %
    assert "| a,b | 80% | 0 | 0 | 15.0 |" in table and "| a,b | 80% | 1 | 0 | 10.0 |" in table
    assert plot_ablation(tmp_path, tmp_path / "ablation.png").is_file()


def test_reproduce_flags_reach_the_config() -> None:
    from fusionlens.cli import build_parser
    from fusionlens.cli.reproduce import altermoma_config

    args = build_parser().parse_args(
        [
            "reproduce",
            "altermoma",
            "--pairs",
            "camera,radar",
            "--seeds",
            "0",
            "--methods",
            "snip,altermoma",
            "--structured-ratios",
            "",
            "--structured-methods",
            "magnitude",
            "--betas",
            "0,2",
            "--ablation-sparsities",
            "0.85",
            "--finetune-steps",
            "7",
        ]
    )
    cfg = altermoma_config(args)
    assert cfg.pairs == ("camera-radar",) and cfg.seeds == (0,) and cfg.methods == ("snip", "altermoma")
    assert cfg.structured_ratios == () and cfg.structured_methods == ("magnitude",)
    assert cfg.ablation_betas == (0.0, 2.0) and cfg.ablation_sparsities == (0.85,) and cfg.finetune_steps == 7


def test_runner_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="sparsities"):
        Runner(ReproduceConfig(out_dir=str(tmp_path), sparsities=(1.0,)))
    with pytest.raises(ValueError, match="unknown methods"):
        Runner(ReproduceConfig(out_dir=str(tmp_path), methods=("obd",)))


def test_cli_structured_checkpoint_opens_in_evaluate_and_explain(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """The structured checkpoint is a fusionlens checkpoint of plain tensors with the pruned shapes recorded:
    load_model (what evaluate / explain / prune use) rebuilds the pruned architecture from the config, with the
    reported parameter count, and two loads compute the same outputs."""
    from fusionlens.models import build_model, preset_config
    from fusionlens.train.checkpoint import load_checkpoint, load_model, save_checkpoint
    from fusionlens.train.synthetic import TEST_GRID, SyntheticDataset

    cfg = preset_config("tiny", "camera,lidar", grid=TEST_GRID, point_bev_channels=8)
    torch.manual_seed(0)
    ref = save_checkpoint(tmp_path / "ref.pt", model=build_model(cfg, load_camera_weights=False), model_config=cfg)
    out = tmp_path / "s.pt"
    args = ["prune", "--checkpoint", str(ref), "--method", "magnitude", "--sparsity", "0.5", "--structured",
            "--finetune-steps", "1", "--data", "synthetic", "--train-size", "2", "--val-size", "0", "--out", str(out),
            "--no-progress"]
    assert main(args) == 0, capsys.readouterr().err
    report = json.loads(out.with_suffix(".json").read_text())
    assert report["structured"] and report["n_params_after"] < 0.6 * report["n_params_before"]
    assert report["cost_after"]["gflops"] < report["cost_before"]["gflops"]
    model, payload = load_model(out)
    assert sum(p.numel() for p in model.parameters()) == report["n_params_after"]
    assert model.fusion.conv.in_channels < build_model(cfg, load_camera_weights=False).fusion.conv.in_channels
    assert all(isinstance(v, torch.Tensor) for v in payload["model"].values())  # no pickled module
    from fusionlens.data.collate import collate_samples
    from fusionlens.experiments.reference import example_inputs

    x = example_inputs(model, collate_samples([SyntheticDataset(1, TEST_GRID)[0]]))
    again, _ = load_model(out, payload=load_checkpoint(out))
    assert all(torch.equal(model(**x)[k], again(**x)[k]) for k in model(**x))
