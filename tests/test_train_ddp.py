"""torchrun with two gloo processes on CPU: evaluation gives exactly the single-process metrics, and a
distributed training run keeps the replicas identical and matches the checkpoint it writes."""

from __future__ import annotations

import json

import pytest
import torch

from fusionlens.cli import evaluate as evaluate_cli
from fusionlens.cli import train as train_cli
from fusionlens.models import build_model, preset_config
from fusionlens.train.checkpoint import load_checkpoint, load_model
from fusionlens.train.loop import TrainConfig, evaluate, train
from fusionlens.train.synthetic import TEST_GRID, SyntheticDataset
from torchrun_helper import torchrun_cli

torch.set_num_threads(1)
SMALL = dict(grid=TEST_GRID, latent_dim=4, fusion_dim=8, decoder_width=8, head_dim=8, point_bev_channels=8)

@pytest.mark.slow
def test_two_gloo_processes_match_one(tmp_path) -> None:
    cfg = preset_config("tiny", "radar,lidar", **SMALL)
    ckpt = tmp_path / "m.pt"
    train(
        cfg, TrainConfig(steps=20, batch_size=4, lr=1e-2), SyntheticDataset(16, seed=0), checkpoint=ckpt, progress=False
    )
    model, _ = load_model(ckpt)
    val = SyntheticDataset(9, seed=1)  # odd size: the two shards differ in length
    single = evaluate(model, val, batch_size=2, progress=False)
    assert single["all"] > 0
    out = tmp_path / "ddp.json"
    torchrun_cli(
        tmp_path,
        ("train", "evaluate"),
        "evaluate",
        "--checkpoint",
        str(ckpt),
        "--data",
        "synthetic",
        "--data-seed",
        "0",
        "--split",
        "val",
        "--size",
        "9",
        "--batch-size",
        "2",
        "--out",
        str(out),
        "--no-progress",
    )
    assert open_data_seed_matches(val)
    assert json.loads(out.read_text())["iou"] == pytest.approx(single, nan_ok=True)

    # distributed training: 2 ranks x batch 2; rank 0 saves; every rank must hold the same weights
    dckpt = tmp_path / "ddp_train.pt"
    proc = torchrun_cli(
        tmp_path,
        ("train", "evaluate"),
        "train",
        "--modalities",
        "radar,lidar",
        "--data",
        "synthetic",
        "--train-size",
        "8",
        "--val-size",
        "4",
        "--steps",
        "3",
        "--batch-size",
        "2",
        "--out",
        str(dckpt),
        "--no-progress",
    )
    payload = load_checkpoint(dckpt)
    assert payload["step"] == 3 and payload["train_config"]["world_size"] == 2
    assert '"checkpoint"' in proc.stdout


def per_sample_norms(model: torch.nn.Module) -> None:
    """Every BatchNorm replaced by a per-sample normalisation (GroupNorm, one group): BatchNorm's batch statistics
    are per rank under DDP (SyncBatchNorm needs a GPU), so only a model whose layers treat the samples of a batch
    independently can equal the single process exactly. Everything else -- the data each rank takes, gradient
    averaging, the loss normalisation, clipping, the schedule -- is the training loop's and is what is compared."""
    for name, child in model.named_children():
        if isinstance(child, torch.nn.modules.batchnorm._BatchNorm):
            setattr(model, name, torch.nn.GroupNorm(1, child.num_features))
        else:
            per_sample_norms(child)


def _runs(rank: int, world: int, port: int, out: str) -> None:
    """One rank of the DDP runs (``world`` 2, half of each global batch) or the single process (``world`` 1): the
    training loop (4 steps of 4 samples) and the camera pre-training (3 steps of 4 frames), in one process group."""
    import os

    from fusionlens.train import camera_pretrain as cp

    torch.set_num_threads(1)
    if world > 1:
        os.environ.update(WORLD_SIZE=str(world), RANK=str(rank), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(port))
    cfg = preset_config("tiny", "radar,lidar", **SMALL)
    # grad_clip 1.5: the first step's gradient (norm ~1.7) is clipped, the next ones (~1.1) are not, so their
    # scale reaches AdamW's moments -- a run that sums the ranks' gradients instead of averaging them differs
    train(cfg, TrainConfig(steps=4, batch_size=4 // world, lr=1e-2, grad_clip=1.5), SyntheticDataset(16, seed=0),
          checkpoint=f"{out}/train.pt", prepare_model=per_sample_norms, progress=False)
    encoder_class = cp.CameraEncoder

    def per_sample_encoder(*args, **kwargs):
        encoder = encoder_class(*args, **kwargs)
        per_sample_norms(encoder)
        return encoder

    cp.CameraEncoder = per_sample_encoder
    config = cp.CameraPretrainConfig(image_size=(16, 28), frames=4, val_frames=0, steps=3, batch_size=4, lr=2e-3)
    cp.pretrain_camera(config, f"{out}/trunk.pt", progress=False)
    if world > 1:
        import torch.distributed as dist

        dist.destroy_process_group()


@pytest.fixture(scope="module")
def single_and_ddp(tmp_path_factory):
    """Output folders of the single process and of two gloo ranks (``torch.multiprocessing``, spawned)."""
    import torch.multiprocessing as mp

    from torchrun_helper import free_port

    single, ddp = tmp_path_factory.mktemp("single"), tmp_path_factory.mktemp("ddp")
    _runs(0, 1, 0, str(single))
    mp.spawn(_runs, args=(2, free_port(), str(ddp)), nprocs=2, join=True)
    return single, ddp


@pytest.mark.slow
def test_two_gloo_processes_train_the_single_process_weights(single_and_ddp) -> None:
    """2 ranks x batch 2 and 1 process x batch 4 see the same global batches (rank r takes positions 2r, 2r+1 of
    each step's 4): after 4 AdamW steps with clipping, the weights agree to float rounding."""
    single, ddp = single_and_ddp
    one, two = load_checkpoint(single / "train.pt")["model"], load_checkpoint(ddp / "train.pt")["model"]
    assert one.keys() == two.keys()
    for name, weight in one.items():
        torch.testing.assert_close(two[name], weight, rtol=1e-4, atol=1e-5, msg=lambda m, n=name: f"{n}: {m}")
    torch.manual_seed(0)  # the loop's initialisation: the weights did move, by far more than the tolerance
    start = build_model(preset_config("tiny", "radar,lidar", **SMALL))
    per_sample_norms(start)
    assert max((one[n] - p).abs().max().item() for n, p in start.state_dict().items() if p.is_floating_point()) > 1e-3


@pytest.mark.slow
def test_two_gloo_processes_pretrain_the_single_process_camera_trunk(single_and_ddp) -> None:
    """Camera pre-training, 2 ranks x 2 frames == 1 process x 4 frames per step (class-weighted cross-entropy over
    the global batch), with the same per-sample-norm precondition."""
    single, ddp = single_and_ddp
    one, two = torch.load(single / "trunk.pt"), torch.load(ddp / "trunk.pt")
    assert one.keys() == two.keys() and len(one) > 20
    # AdamW divides by sqrt(v): where a gradient entry is nearly zero, the rounding of another summation order moves
    # its update by a visible fraction of lr (2e-3), so the tolerance is 5 % of one step
    for name, weight in one.items():
        torch.testing.assert_close(two[name], weight, rtol=1e-4, atol=1e-4, msg=lambda m, n=name: f"{n}: {m}")


def open_data_seed_matches(val: SyntheticDataset) -> bool:
    """The CLI's synthetic val split (data seed 0) is the dataset evaluated in-process."""
    from fusionlens.train.data import open_dataset

    cli = open_dataset("synthetic", "val", size=9, seed=0)
    return all(torch.equal(cli[i].bev_seg, val[i].bev_seg) for i in range(len(val)))


def test_cli_parsers_register() -> None:
    import argparse

    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command")
    train_cli.register(sub)
    evaluate_cli.register(sub)
    args = parser.parse_args(["train", "--modalities", "camera,lidar", "--init-from", "camera=a.pt"])
    assert args.modalities == "camera,lidar" and args.init_from == ["camera=a.pt"]
    with pytest.raises(ValueError, match="MODALITY=PATH"):
        train_cli.parse_key_values(["camera"], "--init-from")


def test_cli_train_evaluate_round_trip(tmp_path, capsys) -> None:
    import argparse

    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command")
    train_cli.register(sub)
    evaluate_cli.register(sub)
    out = tmp_path / "r.pt"
    argv = [
        "train",
        "--modalities",
        "radar",
        "--data",
        "synthetic",
        "--train-size",
        "4",
        "--val-size",
        "2",
        "--steps",
        "2",
        "--batch-size",
        "2",
        "--out",
        str(out),
        "--no-progress",
    ]
    args = parser.parse_args(argv)
    assert args.func(args) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["steps"] == 2 and "all" in summary["val_iou"]
    with pytest.raises(ValueError, match="--resume to continue"):
        args.func(parser.parse_args(argv))
    args = parser.parse_args(argv + ["--resume"])  # already finished: nothing left to train, same weights
    assert args.func(args) == 0
    capsys.readouterr()
    ev = parser.parse_args(
        [
            "evaluate",
            "--checkpoint",
            str(out),
            "--data",
            "synthetic",
            "--size",
            "2",
            "--no-progress",
            "--out",
            str(tmp_path / "e.json"),
        ]
    )
    assert ev.func(ev) == 0
    report = json.loads((tmp_path / "e.json").read_text())
    assert report["step"] == 2 and report["iou"] == pytest.approx(summary["val_iou"], nan_ok=True)
    with pytest.raises(ValueError, match="--freeze-steps needs --init-from"):
        args = parser.parse_args(argv[:-1] + ["--overwrite", "--freeze-steps", "3"])
        args.func(args)
