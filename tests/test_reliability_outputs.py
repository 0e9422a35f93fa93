"""Output paths are checked before any work, with an error naming the option; nothing given as input is ever
overwritten; atomically written files get the mode a plain ``open`` would give them."""

from __future__ import annotations

import importlib
import json
import os
import stat
from pathlib import Path

import pytest
import torch

import fusionlens.cli.train as cli_train
from fusionlens.cli import main
from fusionlens.io import (
    atomic_open,
    atomic_save_with,
    atomic_torch_save,
    atomic_write_text,
    check_output_dir,
    check_output_path,
    check_same_source,
)
from fusionlens.models import build_model, preset_config
from fusionlens.train.checkpoint import save_checkpoint
from fusionlens.train.synthetic import TEST_GRID

SMALL = dict(grid=TEST_GRID, latent_dim=4, fusion_dim=8, decoder_width=8, head_dim=8, point_bev_channels=8,
             image_size=(32, 48))
TRAIN = ["train", "--data", "synthetic", "--steps", "1", "--batch-size", "1", "--train-size", "2",
         "--val-size", "0", "--no-progress"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    config = preset_config("tiny", "camera,radar", **SMALL)
    path = tmp_path_factory.mktemp("ckpt") / "cr.pt"
    save_checkpoint(path, model=build_model(config), model_config=config)
    return path


@pytest.fixture
def no_work(monkeypatch):
    """Any dataset being built (the first piece of real work of every command) fails the test."""
    def refuse(*args, **kwargs):
        raise AssertionError("work started before the output path was checked")

    modules = [importlib.import_module(f"fusionlens.cli.{name}") for name in ("train", "evaluate", "explain", "prune")]
    for module in modules:  # all imported first: one imported after train was patched would keep the patch
        monkeypatch.setattr(module, "dataset_for", refuse)
    monkeypatch.setattr("fusionlens.train.camera_pretrain.pretrain_camera", refuse)
    monkeypatch.setattr("fusionlens.viz.world.plot_sample", refuse)


def tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def run_cli(argv: list[str], capsys) -> str:
    """Run the CLI in-process; it must fail with one ``error:`` line and no traceback. Returns that line."""
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("\n") == 1, err
    return err


def commands(checkpoint: Path, out: str) -> dict[str, list[str]]:
    """Every command with an output file, writing to ``out``."""
    ck = str(checkpoint)
    return {
        "train": [*TRAIN, "--out", out, "--overwrite"],
        "prune": ["prune", "--checkpoint", ck, "--data", "synthetic", "--out", out, "--no-progress"],
        "evaluate": ["evaluate", "--checkpoint", ck, "--data", "synthetic", "--out", out, "--no-progress"],
        "pretrain": ["pretrain", "camera", "--out", out, "--overwrite", "--no-progress"],
    }


@pytest.mark.parametrize("command", ["train", "prune", "evaluate", "pretrain"])
def test_out_that_is_a_directory_is_refused_before_work(command, checkpoint, tmp_path, capsys, no_work):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "keep.txt").write_text("mine")
    before = tree(tmp_path)
    err = run_cli(commands(checkpoint, str(tmp_path / "d"))[command], capsys)
    assert f"error: --out {tmp_path / 'd'} is a directory; give a file name" in err
    assert tree(tmp_path) == before


@pytest.mark.parametrize("command", ["train", "prune", "evaluate", "pretrain", "explain", "world show",
                                     "reproduce lmd", "reproduce altermoma", "train avod", "evaluate kitti"])
def test_out_under_a_regular_file_is_refused_before_work(command, checkpoint, tmp_path, capsys, no_work):
    (tmp_path / "file.txt").write_text("not a folder")
    out = tmp_path / "file.txt" / "x.pt"
    argv = {**commands(checkpoint, str(out)),
            "explain": ["explain", "--checkpoint", str(checkpoint), "--data", "synthetic", "--out", str(out)],
            "world show": ["world", "show", "--out", str(out)],
            "reproduce lmd": ["reproduce", "lmd", "--out", str(out), "--no-progress"],
            "reproduce altermoma": ["reproduce", "altermoma", "--out", str(out), "--no-progress"],
            "train avod": ["train", "--model", "avod", "--data", "kitti", "--dataroot", str(tmp_path),
                           "--out", str(out)],
            "evaluate kitti": ["evaluate", "--data", "kitti", "--dataroot", str(tmp_path), "--checkpoint",
                               str(checkpoint), "--out", str(out)]}[command]
    err = run_cli(argv, capsys)
    assert f"--out {out}: {tmp_path / 'file.txt'} is a file, not a folder" in err
    assert tree(tmp_path) == {"file.txt": b"not a folder"}


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="needs /proc (Linux)")
@pytest.mark.parametrize("command", ["train", "prune", "evaluate"])
def test_out_where_nothing_can_be_created_names_the_option(command, checkpoint, capsys, no_work):
    err = run_cli(commands(checkpoint, "/proc/x/a.pt")[command], capsys)
    assert "error: --out /proc/x/a.pt: cannot create files in /proc" in err


def test_read_only_folder_is_refused(tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        if os.access(folder, os.W_OK) and os.geteuid() == 0:  # root ignores permissions: nothing to check
            pytest.skip("running as root")
        with pytest.raises(ValueError, match=r"--out .*ro/sub/a.pt: cannot create files in .*ro \("):
            check_output_path("--out", folder / "sub" / "a.pt")
    finally:
        folder.chmod(0o700)
    assert list(folder.iterdir()) == []


@pytest.mark.parametrize("command", ["prune", "evaluate", "train"])
def test_out_equal_to_an_input_is_refused_and_the_input_kept(command, checkpoint, tmp_path, capsys, no_work):
    source = tmp_path / "source.pt"
    source.write_bytes(checkpoint.read_bytes())
    argv = commands(source, str(tmp_path / "." / "source.pt"))[command]
    if command == "train":  # train's inputs: --init-from checkpoints and --camera-weights
        argv = [*argv, "--init-from", f"camera={source}"]
    err = run_cli(argv, capsys)
    option = {"train": "--init-from camera"}.get(command, "--checkpoint")
    assert f"would overwrite the input {option} {source}; choose another --out" in err
    assert source.read_bytes() == checkpoint.read_bytes()


def test_prune_report_that_would_replace_the_checkpoint_or_its_input(checkpoint, tmp_path, capsys, no_work):
    source = tmp_path / "p.json"  # a checkpoint named .json: the report of --out p.pt would be p.json
    source.write_bytes(checkpoint.read_bytes())
    err = run_cli(commands(source, str(tmp_path / "p.pt"))["prune"], capsys)
    assert f"--out {tmp_path / 'p.pt'} would overwrite the input --checkpoint {source} (with its report" in err
    err = run_cli(commands(checkpoint, str(tmp_path / "out.json"))["prune"], capsys)
    assert "the report written beside it would be the same file" in err and "use another suffix (e.g. .pt)" in err
    assert tree(tmp_path) == {"p.json": checkpoint.read_bytes()}


def test_default_prune_output_of_another_checkpoint_is_not_replaced(checkpoint, tmp_path, capsys, monkeypatch,
                                                                      no_work):
    monkeypatch.chdir(tmp_path)
    old = tmp_path / "out" / "pruned" / "altermoma_0.85.pt"
    old.parent.mkdir(parents=True)
    old.write_bytes(b"pruned from other.pt")
    old.with_suffix(".json").write_text(json.dumps({"checkpoint": str(tmp_path / "other.pt")}))
    before = tree(tmp_path)
    err = run_cli(["prune", "--checkpoint", str(checkpoint), "--data", "synthetic"], capsys)
    assert (f"the default --out out/pruned/altermoma_0.85.pt exists, made from {tmp_path / 'other.pt'}, not from "
            f"{checkpoint}; pass --out to choose a file") in err
    old.with_suffix(".json").unlink()
    err = run_cli(["prune", "--checkpoint", str(checkpoint), "--data", "synthetic"], capsys)
    assert "exists, of unknown origin (no readable altermoma_0.85.json)" in err
    assert old.read_bytes() == before["out/pruned/altermoma_0.85.pt"]
    # the same source may be pruned again into its default output
    old.with_suffix(".json").write_text(json.dumps({"checkpoint": str(checkpoint)}))
    check_same_source("--out", old, old.with_suffix(".json"), checkpoint)


def test_existing_train_out_without_resume_or_overwrite(checkpoint, tmp_path, capsys, no_work):
    out = tmp_path / "ck.pt"
    out.write_bytes(checkpoint.read_bytes())
    err = run_cli([*TRAIN, "--out", str(out)], capsys)
    assert f"--out {out} exists: pass --resume to continue that run or --overwrite" in err
    assert out.read_bytes() == checkpoint.read_bytes()


def test_output_folder_checks(tmp_path):
    assert check_output_dir("--out", tmp_path / "a" / "b") == tmp_path / "a" / "b"
    assert not (tmp_path / "a").exists()  # checking creates nothing
    (tmp_path / "f").write_text("x")
    with pytest.raises(ValueError, match=r"^--out .*/f is a file, not a folder$"):
        check_output_dir("--out", tmp_path / "f")
    with pytest.raises(ValueError, match=r"--cache \. is a directory"):
        check_output_path("--cache", ".", sidecar_suffixes=(".json",))
    assert list(tmp_path.iterdir()) == [tmp_path / "f"]


def test_library_writes_refuse_a_directory_target_and_leave_nothing(tmp_path):
    (tmp_path / "d").mkdir()
    with pytest.raises(IsADirectoryError, match="is a directory; cannot replace it with a file"):
        atomic_torch_save(tmp_path / "d", {"x": 1})
    assert tree(tmp_path) == {}


@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077])
def test_atomic_writes_honour_the_umask_like_a_plain_open(umask, tmp_path):
    old = os.umask(umask)
    try:
        with open(tmp_path / "plain.txt", "w") as handle:
            handle.write("x")
        atomic_write_text(tmp_path / "atomic.txt", "x")
        with atomic_open(tmp_path / "opened.bin") as handle:
            handle.write(b"x")
        atomic_save_with(tmp_path / "saved.png", lambda p: p.write_bytes(b"x"))
    finally:
        os.umask(old)
    want = stat.S_IMODE((tmp_path / "plain.txt").stat().st_mode)
    assert want == 0o666 & ~umask
    for name in ("atomic.txt", "opened.bin", "saved.png"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == want, name


def test_replacing_a_file_keeps_its_mode(tmp_path):
    path = tmp_path / "shared.json"
    path.write_text("{}")
    path.chmod(0o664)
    atomic_write_text(path, "[]")
    assert stat.S_IMODE(path.stat().st_mode) == 0o664 and path.read_text() == "[]"


def test_train_checks_out_before_any_data(monkeypatch, tmp_path, capsys):
    """The order, not only the message: the model config and the datasets are never built."""
    monkeypatch.setattr(cli_train, "model_config_from_args", lambda *a: pytest.fail("work started"))
    (tmp_path / "d").mkdir()
    run_cli([*TRAIN, "--out", str(tmp_path / "d")], capsys)


def test_a_file_system_error_is_one_line_naming_the_file(monkeypatch, tmp_path, capsys):
    """A refusal of the file system (disk full, permission) is reported like bad input, not as a traceback."""
    def disk_full(args):
        raise OSError(28, "No space left on device", str(tmp_path / "model.pt"))

    monkeypatch.setattr(cli_train, "register", lambda sub: sub.add_parser("train").set_defaults(func=disk_full))
    err = run_cli(["train"], capsys)
    assert err == f"fusionlens train: error: [Errno 28] No space left on device: '{tmp_path / 'model.pt'}'\n"
