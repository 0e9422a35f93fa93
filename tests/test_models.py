"""Reference fusion models: shapes, parameter groups, rasterisation and lifting oracles, plug-ins, errors."""

from __future__ import annotations

import itertools

import pytest
import torch
import torchvision
from torch import nn

from fusionlens.data.sample import BEVGrid
from fusionlens.models import (
    ModelConfig,
    batch_to_inputs,
    build_model,
    preset_config,
    register_head,
    register_point_encoder,
)
from fusionlens.models.camera import lift_to_bev
from fusionlens.models.points import RADAR_META_SCALE, RasterEncoder
from fusionlens.train.synthetic import TEST_GRID, SyntheticDataset

torch.set_num_threads(1)
SMALL = dict(grid=TEST_GRID, latent_dim=4, fusion_dim=8, decoder_width=8, head_dim=8, point_bev_channels=8)
SUBSETS = [c for r in (1, 2, 3) for c in itertools.combinations(("camera", "radar", "lidar"), r)]


def _batch(n: int = 2) -> dict:
    from fusionlens.data.collate import collate_samples

    ds = SyntheticDataset(n)
    return collate_samples([ds[i] for i in range(n)])


@pytest.mark.parametrize("mods", SUBSETS, ids=lambda m: "+".join(m))
def test_every_modality_subset_runs_and_trains_its_backbones(mods: tuple[str, ...]) -> None:
    torch.manual_seed(0)
    model = build_model(preset_config("tiny", mods, **SMALL))
    inputs, kwargs = batch_to_inputs(model, _batch())
    assert set(inputs) == set(mods)
    out = model(**inputs, **kwargs)
    X, Y, _ = TEST_GRID.shape
    assert out["seg"].shape == (2, 1, X, Y) and out["center"].shape == (2, 1, X, Y)
    assert out["offset"].shape == (2, 2, X, Y)
    (out["seg"].mean() + out["center"].mean() + out["offset"].mean()).backward()
    groups = model.modality_groups()
    assert list(groups) == [*mods, "fusion"]
    params = dict(model.named_parameters())
    for mod in mods:  # every backbone gets a gradient through the fusion layer
        assert groups[mod], mod
        assert any(params[n].grad is not None and params[n].grad.abs().sum() > 0 for n in groups[mod]), mod


def test_modality_groups_partition_the_parameters() -> None:
    model = build_model(preset_config("tiny", "camera,radar,lidar", **SMALL))
    groups = model.modality_groups()
    names = [n for g in groups.values() for n in g]
    assert sorted(names) == sorted(n for n, _ in model.named_parameters())
    assert len(names) == len(set(names))
    assert all(n.startswith("encoders.camera.") for n in groups["camera"])
    assert any(n.startswith("fusion.conv") for n in groups["fusion"])
    assert any(n.startswith("heads.seg") for n in groups["fusion"])
    # the paper preset's point branch is SimpleBEV's parameter-free rasteriser
    cfg = preset_config("paper", "radar", grid=TEST_GRID)
    assert build_model(cfg).modality_groups()["radar"] == []


def test_config_round_trip_and_canonical_order() -> None:
    cfg = preset_config("tiny", "lidar,camera", **SMALL)
    assert cfg.modalities == ("camera", "lidar")
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    assert preset_config("paper", "camera").camera_depth == 101
    assert preset_config("paper", "camera").grid.shape == (200, 200, 8)


@pytest.mark.parametrize(
    "bad, match",
    [
        (dict(modalities=()), "at least one"),
        (dict(modalities=("sonar",)), "unknown"),
        (dict(modalities=("radar", "radar")), "duplicates"),
        (dict(camera_depth=20), "camera_depth"),
        (dict(fusion_dim=0), "fusion_dim"),
        (dict(preset="huge"), "preset"),
        (dict(point_encoders={"camera": "raster"}), "not a point modality"),
    ],
)
def test_bad_config_is_rejected(bad: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        ModelConfig(**bad)
    with pytest.raises(ValueError, match="unknown fields"):
        ModelConfig.from_dict({"modalities": ["radar"], "colour": 1})


def test_rasterisation_hand_computed_and_padding_ignored() -> None:
    grid = BEVGrid(((0.0, 4.0), (0.0, 4.0), (0.0, 2.0)), (4, 4, 2))
    enc = RasterEncoder("radar", grid, use_metadata=True, layers=0)
    pts = torch.zeros(1, 4, 19)
    pts[0, 0, :3] = torch.tensor([1.5, 2.5, 0.5])  # voxel ix=1, iy=2, iz=0
    pts[0, 1, :3] = torch.tensor([1.2, 2.9, 0.1])  # same voxel
    pts[0, 2, :3] = torch.tensor([3.5, 0.5, 1.5])  # ix=3, iy=0, iz=1
    pts[0, 3, :3] = torch.tensor([9.0, 9.0, 0.5])  # outside the grid
    pts[0, :, 5] = torch.tensor([10.0, 20.0, 30.0, 99.0])  # rcs, field index 2 of the metadata
    valid = torch.tensor([[True, True, True, True]])
    out = enc(pts, valid).reshape(1, 16, 2, 4, 4)  # (V, Z, X, Y)
    rcs = out[0, 2] * RADAR_META_SCALE[2]
    assert rcs[0, 1, 2] == pytest.approx(15.0)  # mean of the two points sharing a voxel
    assert rcs[1, 3, 0] == pytest.approx(30.0)
    assert (rcs != 0).sum() == 2  # the out-of-grid point is dropped
    # padded rows with garbage coordinates and values change nothing
    padded = torch.cat([pts, torch.full((1, 3, 19), 1.5)], dim=1)
    pvalid = torch.cat([valid, torch.zeros(1, 3, dtype=torch.bool)], dim=1)
    assert torch.equal(enc(padded, pvalid), enc(pts, valid))

    lid = RasterEncoder("lidar", grid, layers=0, intensity_scale=100.0)
    lp = torch.zeros(1, 2, 5)
    lp[0, :, :3] = torch.tensor([[0.5, 0.5, 0.5], [0.6, 0.4, 0.7]])
    lp[0, :, 3] = torch.tensor([20.0, 40.0])
    lo = lid(lp, torch.ones(1, 2, dtype=torch.bool)).reshape(1, 2, 2, 4, 4)
    assert lo[0, 0, 0, 0, 0] == 1.0 and lo[0, 0].sum() == 1.0  # occupancy, not a count
    assert lo[0, 1, 0, 0, 0] == pytest.approx(0.3)  # mean intensity / scale


def test_padded_points_do_not_change_model_output() -> None:
    torch.manual_seed(0)
    model = build_model(preset_config("tiny", "radar,lidar", **SMALL)).eval()
    inputs, kwargs = batch_to_inputs(model, _batch(1))
    ref = model(**inputs, **kwargs)["seg"]
    junk_r = torch.randn(1, 5, 19) * 5
    junk_l = torch.randn(1, 7, 5) * 5
    inputs2 = {
        "radar": torch.cat([inputs["radar"], junk_r], 1),
        "lidar": torch.cat([inputs["lidar"], junk_l], 1),
    }
    kwargs2 = {
        "radar_valid": torch.cat([kwargs["radar_valid"], torch.zeros(1, 5, dtype=torch.bool)], 1),
        "lidar_valid": torch.cat([kwargs["lidar_valid"], torch.zeros(1, 7, dtype=torch.bool)], 1),
    }
    assert torch.equal(model(**inputs2, **kwargs2)["seg"], ref)


def test_lifting_samples_the_projected_pixel_and_averages_cameras() -> None:
    grid = BEVGrid(((0.0, 8.0), (-4.0, 4.0), (-1.0, 1.0)), (8, 8, 2))
    H, W, f = 40, 60, 30.0
    K = torch.tensor([[f, 0, (W - 1) / 2], [0, f, (H - 1) / 2], [0, 0, 1.0]])
    pose = torch.eye(4)  # camera at the origin looking along +x (ego): columns = right, down, forward
    pose[:3, :3] = torch.tensor([[0.0, 0, 1], [-1, 0, 0], [0, -1, 0]])
    u = torch.arange(W, dtype=torch.float32).expand(H, W)
    feats = torch.stack([u, torch.ones(H, W)]).reshape(1, 1, 2, H, W)  # channel 0 = pixel column
    out = lift_to_bev(feats, K.reshape(1, 1, 3, 3), pose.reshape(1, 1, 4, 4), (H, W), grid).reshape(
        2, 2, 8, 8
    )
    # voxel ix=5, iy=2, iz=1: centre (5.5, -1.5, 0.5) -> camera (1.5, -0.5, 5.5) -> u = f*1.5/5.5 + 29.5
    assert out[0, 1, 5, 2] == pytest.approx(f * 1.5 / 5.5 + (W - 1) / 2, abs=1e-4)
    assert out[1, 1, 5, 2] == pytest.approx(1.0)
    # a second camera facing backwards sees nothing in front: the average over seeing cameras is unchanged
    back = pose.clone()
    back[:3, :3] = torch.tensor([[0.0, 0, -1], [1, 0, 0], [0, -1, 0]])
    two = lift_to_bev(
        torch.cat([feats, feats * 0 + 7], 1),
        K.expand(1, 2, 3, 3),
        torch.stack([pose, back]).unsqueeze(0),
        (H, W),
        grid,
    ).reshape(2, 2, 8, 8)
    assert torch.allclose(two, out)
    # two identical cameras with features a and b average to (a + b) / 2
    same = lift_to_bev(
        torch.cat([feats, feats * 3], 1),
        K.expand(1, 2, 3, 3),
        torch.stack([pose, pose]).unsqueeze(0),
        (H, W),
        grid,
    )
    assert torch.allclose(
        same, 2 * lift_to_bev(feats, K.reshape(1, 1, 3, 3), pose.reshape(1, 1, 4, 4), (H, W), grid)
    )


def test_bad_inputs_give_clear_errors() -> None:
    model = build_model(preset_config("tiny", "camera,radar", **SMALL))
    inputs, kwargs = batch_to_inputs(model, _batch())
    with pytest.raises(ValueError, match=r"needs modality inputs \['radar'\]"):
        model(camera=inputs["camera"], **kwargs)
    with pytest.raises(ValueError, match="also given"):
        model(**inputs, lidar=torch.zeros(2, 3, 5), **kwargs)
    with pytest.raises(ValueError, match="radar_valid"):
        model(**inputs, intrinsics=kwargs["intrinsics"], cam_to_ego=kwargs["cam_to_ego"])
    with pytest.raises(ValueError, match="intrinsics: expected shape"):
        model(**inputs, **{**kwargs, "intrinsics": kwargs["intrinsics"][:, :1]})
    with pytest.raises(ValueError, match=r"expected points \(B, P, 19\)"):
        model(**{**inputs, "radar": inputs["radar"][..., :5]}, **kwargs)
    with pytest.raises(ValueError, match="batch size"):
        model(
            **{**inputs, "radar": inputs["radar"][:1]}, **{**kwargs, "radar_valid": kwargs["radar_valid"][:1]}
        )
    with pytest.raises(ValueError, match="'images'"):
        batch_to_inputs(model, {**_batch(), "images": None})


def test_plugins_extend_the_model_via_the_config() -> None:
    class Occupancy(nn.Module):
        def __init__(self, modality: str, grid: BEVGrid, scale: float = 1.0) -> None:
            super().__init__()
            self.inner = RasterEncoder(modality, grid, layers=0)
            self.out_channels = self.inner.out_channels
            self.scale = nn.Parameter(torch.tensor(scale))

        def forward(self, points: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
            return self.inner(points, valid) * self.scale

    class Density(nn.Module):
        def __init__(self, in_channels: int, grid: BEVGrid) -> None:
            super().__init__()
            self.conv = nn.Conv2d(in_channels, 1, 1)

        def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
            return {"density": self.conv(x)}

    register_point_encoder("test_occupancy", Occupancy)
    register_head("test_density", Density)
    cfg = preset_config(
        "tiny",
        "lidar",
        point_encoders={"lidar": "test_occupancy"},
        point_encoder_kwargs={"lidar": {"scale": 2.0}},
        extra_heads={"test_density": {}},
        **SMALL,
    )
    model = build_model(cfg)
    assert model.modality_groups()["lidar"] == ["encoders.lidar.scale"]
    out = model(**dict(zip(["lidar"], [_batch()["lidar"]])), lidar_valid=_batch()["lidar_valid"])
    assert out["density"].shape == out["seg"].shape
    with pytest.raises(ValueError, match="not registered"):
        build_model(preset_config("tiny", "lidar", point_encoders={"lidar": "nope"}, **SMALL))
    with pytest.raises(ValueError, match="reserved"):
        register_head("seg", Density)


def test_camera_weights_from_a_local_file(tmp_path) -> None:
    torch.manual_seed(1)
    resnet = torchvision.models.resnet18(weights=None)
    path = tmp_path / "r18.pt"
    torch.save(resnet.state_dict(), path)
    model = build_model(preset_config("tiny", "camera", camera_weights=str(path), **SMALL))
    assert torch.equal(model.encoders["camera"].layer3[0].conv1.weight, resnet.layer3[0].conv1.weight)
    torch.save(torchvision.models.resnet34(weights=None).state_dict(), path)
    with pytest.raises(ValueError, match="not a resnet18"):
        build_model(preset_config("tiny", "camera", camera_weights=str(path), **SMALL))
    with pytest.raises(FileNotFoundError, match="camera_weights"):
        build_model(preset_config("tiny", "camera", camera_weights=str(tmp_path / "none.pt"), **SMALL))
