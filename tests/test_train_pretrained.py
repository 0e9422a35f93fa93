"""Fusion models from separately pre-trained backbones (issue 8): loading, mismatch errors, freezing,
modality masking and redundancy reactivation."""

from __future__ import annotations

import pytest
import torch

from fusionlens.models import batch_to_inputs, build_model, preset_config
from fusionlens.train.checkpoint import load_checkpoint, save_checkpoint
from fusionlens.train.loop import TrainConfig, train
from fusionlens.train.pretrained import backbone_initialiser, freeze_hooks, load_backbone
from fusionlens.train.redundancy import ModalityMasked, reactivate, redundancy_report
from fusionlens.train.synthetic import TEST_GRID, SyntheticDataset

torch.set_num_threads(1)
SMALL = dict(grid=TEST_GRID, latent_dim=4, fusion_dim=8, decoder_width=8, head_dim=8, point_bev_channels=8)


@pytest.fixture(scope="module")
def radar_ckpt(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("pre") / "radar.pt"
    train(
        preset_config("tiny", "radar", **SMALL),
        TrainConfig(steps=6, batch_size=2, lr=1e-2),
        SyntheticDataset(8),
        checkpoint=path,
        progress=False,
    )
    return str(path)


def test_backbone_is_copied_exactly(radar_ckpt: str) -> None:
    model = build_model(preset_config("tiny", "radar,lidar", **SMALL))
    before_lidar = {k: v.clone() for k, v in model.state_dict().items() if k.startswith("encoders.lidar.")}
    backbone_initialiser({"radar": radar_ckpt})(model)
    saved = load_checkpoint(radar_ckpt)["model"]
    state = model.state_dict()
    radar_keys = [k for k in saved if k.startswith("encoders.radar.")]
    assert radar_keys and all(torch.equal(state[k], saved[k]) for k in radar_keys)
    assert all(torch.equal(state[k], v) for k, v in before_lidar.items())  # other backbones untouched


def test_mismatches_are_listed(radar_ckpt: str, tmp_path) -> None:
    fusion = build_model(preset_config("tiny", "radar,lidar", **SMALL))
    with pytest.raises(ValueError, match=r"has no lidar backbone \(its modalities: \['radar'\]\)"):
        load_backbone(fusion, "lidar", radar_ckpt)
    with pytest.raises(ValueError, match="model has no camera backbone"):
        load_backbone(fusion, "camera", radar_ckpt)
    wider = build_model(preset_config("tiny", "radar,lidar", **{**SMALL, "point_bev_channels": 16}))
    with pytest.raises(ValueError, match="point_bev_channels: model 16 vs checkpoint 8"):
        load_backbone(wider, "radar", radar_ckpt)
    payload = load_checkpoint(radar_ckpt)
    key = next(k for k in payload["model"] if k.startswith("encoders.radar.") and k.endswith("weight"))
    del payload["model"][key]
    payload["model"]["encoders.radar.extra"] = torch.zeros(1)
    broken = tmp_path / "broken.pt"
    torch.save(payload, broken)
    with pytest.raises(ValueError, match=rf"missing \['{key}'\], unexpected \['encoders.radar.extra'\]"):
        load_backbone(fusion, "radar", broken)
    with pytest.raises(FileNotFoundError, match="--init-from radar"):
        backbone_initialiser({"radar": tmp_path / "none.pt"})


def test_freeze_keeps_backbone_fixed_then_releases_it(radar_ckpt: str) -> None:
    cfg = preset_config("tiny", "radar,lidar", **SMALL)
    before, after = freeze_hooks(["radar"], 3)
    seen: dict[int, dict[str, torch.Tensor]] = {}

    def record(model, step):
        before(model, step)
        seen[step] = {k: v.clone() for k, v in model.state_dict().items() if k.startswith("encoders.")}

    res = train(
        cfg,
        TrainConfig(steps=5, batch_size=2, lr=1e-2),
        SyntheticDataset(8),
        step_hook=record,
        after_backward=after,
        prepare_model=backbone_initialiser({"radar": radar_ckpt}),
        progress=False,
    )
    assert len(res.losses) == 5
    saved = load_checkpoint(radar_ckpt)["model"]
    radar = [k for k in seen[0] if k.startswith("encoders.radar.")]
    for k in radar:  # weights and BatchNorm statistics stay those of the pre-trained checkpoint while frozen
        assert torch.equal(seen[3][k], saved[k]), k
    assert any(not torch.equal(seen[4][k], seen[3][k]) for k in radar)  # released at step 3
    lidar = [k for k in seen[0] if k.startswith("encoders.lidar.") and k.endswith("weight")]
    assert any(not torch.equal(seen[1][k], seen[0][k]) for k in lidar)  # the other backbone trains


def test_masking_removes_a_modality_and_reactivation_trains_the_rest() -> None:
    torch.manual_seed(0)
    model = build_model(preset_config("tiny", "radar,lidar", **SMALL)).eval()
    from fusionlens.data.collate import collate_samples

    batch = collate_samples([SyntheticDataset(2)[i] for i in range(2)])
    inputs, kwargs = batch_to_inputs(model, batch)
    masked = ModalityMasked(model, ("radar",))
    ref = masked(**inputs, **kwargs)["seg"]
    moved = masked(**{**inputs, "radar": inputs["radar"] + 3.0}, **kwargs)["seg"]
    assert torch.equal(ref, moved)  # the masked modality's input no longer matters
    bev = model.bev_features(**inputs, **kwargs)
    assert torch.equal(ref, model.decode({**bev, "radar": torch.zeros_like(bev["radar"])})["seg"])
    with pytest.raises(ValueError, match="cannot mask"):
        ModalityMasked(model, ("camera",))
    same = reactivate(model, "radar", SyntheticDataset(4), steps=0, lr=1e-3)
    assert all(torch.equal(a, b) for a, b in zip(same.state_dict().values(), model.state_dict().values()))
    moved_model = reactivate(model, "radar", SyntheticDataset(4), steps=2, lr=1e-2, batch_size=2)
    new, old = moved_model.state_dict(), model.state_dict()
    assert all(torch.equal(new[k], old[k]) for k in old if k.startswith("encoders.radar."))
    assert any(not torch.equal(new[k], old[k]) for k in old if k.startswith("decoder."))
    report = redundancy_report(model, SyntheticDataset(4), SyntheticDataset(4, seed=1), steps=1, batch_size=2)
    assert set(report) == {"radar", "lidar"}
    assert set(report["radar"]) == {"full_iou", "masked_iou", "reactivated_iou", "recovered"}


def test_save_checkpoint_records_step_and_config(tmp_path) -> None:
    cfg = preset_config("tiny", "lidar", **SMALL)
    model = build_model(cfg)
    save_checkpoint(tmp_path / "c.pt", model=model, model_config=cfg, step=7)
    payload = load_checkpoint(tmp_path / "c.pt")
    assert payload["step"] == 7 and payload["model_config"] == cfg.to_dict()
