"""Camera trunk pre-training on the world's pixel semantics: targets, weights format, resume, errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torchvision

from fusionlens.data.sample import CAMERA_NAMES, CLASSES
from fusionlens.models import preset_config
from fusionlens.models.camera import CameraEncoder, trunk_state_dict
from fusionlens.models.fusion import build_model
from fusionlens.train import camera_pretrain as cp
from fusionlens.train.camera_pretrain import (
    IGNORE,
    PIXEL_CLASSES,
    CameraPretrainConfig,
    class_weights,
    pixel_iou,
    pixel_targets,
    pretrain_camera,
)
from fusionlens.world.config import WorldConfig
from fusionlens.world.generate import render_frame

SMALL = (32, 56)


def _frame(**probs: float):
    cfg = WorldConfig().with_(image_size=SMALL, condition_probs={**WorldConfig().condition_probs, **probs})
    return render_frame(cfg, 0, "train", 3)


def test_pixel_targets_follow_the_object_id_buffer() -> None:
    frame = _frame(camera_blackout=0.0, lens_occlusion=0.0)
    target = pixel_targets(frame).numpy()
    ids = frame.camera.object_ids
    assert target.shape == ids.shape
    assert (target[ids == -2] == PIXEL_CLASSES.index("sky")).all()
    assert (target[ids == -1] == PIXEL_CLASSES.index("ground")).all()
    hit = ids >= 0
    label = frame.scene.label[ids[hit]]
    expected = np.where(label == CLASSES.index("pedestrian"), PIXEL_CLASSES.index("pedestrian"),
                        np.where((label >= 0) & (label < CLASSES.index("pedestrian")),
                                 PIXEL_CLASSES.index("vehicle"), PIXEL_CLASSES.index("other")))
    assert (target[hit] == expected).all()
    assert (target == PIXEL_CLASSES.index("vehicle")).any()
    assert (target != IGNORE).all()


def test_blacked_out_camera_pixels_are_ignored() -> None:
    frame = _frame(camera_blackout=1.0)
    target = pixel_targets(frame)
    dark = [CAMERA_NAMES.index(n) for n in frame.conditions.blackout_cameras]
    assert dark
    for ci in range(len(CAMERA_NAMES)):
        assert bool((target[ci] == IGNORE).all()) == (ci in dark)


def test_class_weights_are_inverse_sqrt_frequency() -> None:
    targets = torch.tensor([0] * 16 + [2] * 4 + [1] * 1 + [3] * 1 + [4] * 1 + [IGNORE] * 5)
    w = class_weights(targets)
    raw = torch.tensor([1 / 4, 1.0, 1 / 2, 1.0, 1.0]) * (23**0.5)
    assert torch.allclose(w, (raw / raw.mean()).float())
    assert w.mean().item() == pytest.approx(1.0)


def test_pixel_iou_by_hand() -> None:
    class OneHot(torch.nn.Module):
        def __init__(self, labels: torch.Tensor) -> None:
            super().__init__()
            self.labels = labels

        def forward(self, images: torch.Tensor) -> torch.Tensor:
            return torch.nn.functional.one_hot(self.labels, len(PIXEL_CLASSES)).permute(0, 3, 1, 2).float()

    truth = torch.zeros(1, 2, 2, dtype=torch.long)
    truth[0, 0, 0] = 2  # one vehicle pixel
    pred = truth.clone()
    pred[0, 1, 1] = 2  # one sky pixel predicted as vehicle
    iou = pixel_iou(OneHot(pred), torch.zeros(1, 3, 2, 2, dtype=torch.uint8), truth)  # type: ignore[arg-type]
    assert iou["vehicle"] == pytest.approx(0.5)
    assert iou["sky"] == pytest.approx(2 / 3)
    assert np.isnan(iou["ground"])


def test_trunk_weights_round_trip_into_the_model(tmp_path) -> None:
    torch.manual_seed(1)
    source = CameraEncoder(18, 5)
    path = tmp_path / "trunk.pt"
    torch.save(trunk_state_dict(source), path)
    model = build_model(preset_config("tiny", "camera", camera_weights=str(path)))
    loaded = model.encoders["camera"]
    for name in ("stem", "layer2", "layer3"):
        for (k, a), b in zip(getattr(source, name).state_dict().items(),
                             getattr(loaded, name).state_dict().values(), strict=True):
            assert torch.equal(a, b), f"{name}.{k}"
    # a full torchvision state dict (with layer4 and fc) loads too; a foreign one is refused
    full = tmp_path / "full.pt"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), full)
    CameraEncoder(18, 4, full)
    wrong = tmp_path / "wrong.pt"
    torch.save(torchvision.models.resnet50(weights=None).state_dict(), wrong)
    with pytest.raises(ValueError, match=r"is not a resnet18 state dict: missing \[\], unexpected \['layer1.0.bn3"):
        CameraEncoder(18, 4, wrong)


def test_checkpoint_does_not_need_the_weights_file_any_more(tmp_path) -> None:
    from fusionlens.train.checkpoint import load_model, save_checkpoint

    path = tmp_path / "trunk.pt"
    torch.save(trunk_state_dict(CameraEncoder(18, 5)), path)
    config = preset_config("tiny", "camera", camera_weights=str(path))
    model = build_model(config)
    ckpt = save_checkpoint(tmp_path / "m.pt", model=model, model_config=config)
    path.unlink()
    again, _ = load_model(ckpt)
    assert torch.equal(again.state_dict()["encoders.camera.layer2.0.conv1.weight"],
                       model.state_dict()["encoders.camera.layer2.0.conv1.weight"])


def _config(**kw) -> CameraPretrainConfig:
    base = dict(image_size=SMALL, frames=3, val_frames=1, steps=4, batch_size=2, save_every=2, lr=1e-3)
    return CameraPretrainConfig(**{**base, **kw})


def test_pretrain_writes_trunk_and_report_and_resumes_exactly(tmp_path, monkeypatch) -> None:
    straight = pretrain_camera(_config(), tmp_path / "a.pt", progress=False)
    report = json.loads((tmp_path / "a.json").read_text())
    assert len(report["losses"]) == 4 and all(np.isfinite(report["losses"]))
    assert set(report["val_pixel_iou"]) == set(PIXEL_CLASSES)
    assert straight["losses"] == report["losses"]
    assert not (tmp_path / "a.pt.state.pt").exists()

    calls = {"n": 0}
    real = cp.F.cross_entropy

    def interrupted(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt("simulated interruption")
        return real(*args, **kwargs)

    monkeypatch.setattr(cp.F, "cross_entropy", interrupted)
    with pytest.raises(KeyboardInterrupt, match="simulated interruption"):
        pretrain_camera(_config(), tmp_path / "b.pt", progress=False)
    monkeypatch.setattr(cp.F, "cross_entropy", real)
    assert (tmp_path / "b.pt.state.pt").exists() and not (tmp_path / "b.pt").exists()
    resumed = pretrain_camera(_config(), tmp_path / "b.pt", progress=False)
    assert resumed["losses"] == straight["losses"]
    a, b = torch.load(tmp_path / "a.pt"), torch.load(tmp_path / "b.pt")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    # a different config refuses the leftover state instead of mixing runs
    monkeypatch.setattr(cp.F, "cross_entropy", interrupted)
    calls["n"] = 0
    with pytest.raises(KeyboardInterrupt, match="simulated interruption"):
        pretrain_camera(_config(), tmp_path / "c.pt", progress=False)
    monkeypatch.setattr(cp.F, "cross_entropy", real)
    with pytest.raises(ValueError, match="another pre-training config"):
        pretrain_camera(_config(lr=2e-3), tmp_path / "c.pt", progress=False)


@pytest.mark.parametrize("bad, message", [
    (dict(depth=19), "depth must be one of"), (dict(steps=0), r"CameraPretrainConfig.steps must be positive, got 0"),
    (dict(batch_size=5, frames=3), "batch_size 5 exceeds the number of frames 3"), (dict(lr=0.0), r"lr must be > 0"),
])
def test_bad_pretrain_config(bad, message) -> None:
    with pytest.raises(ValueError, match=message):
        _config(**bad)


def test_finished_trunk_is_reused_and_another_config_refused(tmp_path, monkeypatch) -> None:
    first = pretrain_camera(_config(), tmp_path / "t.pt", progress=False)
    stamp = (tmp_path / "t.pt").stat().st_mtime_ns

    def no_training(*args, **kwargs):
        raise AssertionError("a finished trunk of the same settings must be reused")

    monkeypatch.setattr(cp, "render_pixel_set", no_training)
    # the number of val frames scored does not change the weights: still the same trunk
    again = pretrain_camera(_config(val_frames=2), tmp_path / "t.pt", progress=False)
    assert again["losses"] == first["losses"] and (tmp_path / "t.pt").stat().st_mtime_ns == stamp
    assert again["reused"] and "reused" not in first
    with pytest.raises(ValueError, match="pre-trained with"):
        pretrain_camera(_config(steps=3), tmp_path / "t.pt", progress=False)
    monkeypatch.undo()
    replaced = pretrain_camera(_config(steps=3), tmp_path / "t.pt", overwrite=True, progress=False)
    assert len(replaced["losses"]) == 3
