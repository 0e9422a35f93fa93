"""PointPillars encoder: pillar placement, padding, permutation invariance, decoration oracles."""

from __future__ import annotations

import pytest
import torch

from fusionlens.data.sample import LIDAR_FIELDS, RADAR_FIELDS, BEVGrid
from fusionlens.models.pillars import PillarEncoder, PointBatchNorm, pillar_index
from fusionlens.models.registry import get_point_encoder

GRID = BEVGrid(((-8.0, 8.0), (-8.0, 8.0), (-3.0, 3.0)), (16, 16, 2))  # 1 m pillars


def _cloud(b: int, p: int, seed: int = 0, fields: int = len(LIDAR_FIELDS)):
    g = torch.Generator().manual_seed(seed)
    pts = torch.rand(b, p, fields, generator=g)
    pts[..., :2] = pts[..., :2] * 15.0 - 7.5
    pts[..., 2] = pts[..., 2] * 4.0 - 2.0
    valid = torch.rand(b, p, generator=g) > 0.2
    return pts * valid.unsqueeze(-1), valid


def _encoder(**kw) -> PillarEncoder:
    torch.manual_seed(0)
    return PillarEncoder("lidar", GRID, pointnet_channels=(8,), channels=4, **kw).eval()


def test_point_feature_lands_in_its_cell() -> None:
    enc = _encoder()
    pts = torch.zeros(2, 3, len(LIDAR_FIELDS))
    pts[1, 0] = torch.tensor([2.3, -4.6, 0.5, 40.0, 3.0])  # -> ix = floor(10.3) = 10, iy = floor(3.4) = 3
    valid = torch.tensor([[False, False, False], [True, False, False]])
    canvas = enc.pillars(pts, valid)
    assert canvas.shape == (2, 8, 16, 16)
    nonzero = canvas.abs().sum(1).nonzero().tolist()
    assert nonzero == [[1, 10, 3]]
    # decoration oracle: raw fields, zero offset to the pillar mean, offset to the pillar centre (10.5, 3.5)-8
    feats, pid = enc.decorate(pts, valid)
    assert pid.tolist() == [(1 * 16 + 10) * 16 + 3]
    expected = torch.tensor([[2.3, -4.6, 0.5, 40.0, 0.0, 0.0, 0.0, 2.3 - 2.5, -4.6 - (-4.5)]])
    assert torch.allclose(feats, expected, atol=1e-5)
    assert torch.allclose(canvas[1, :, 10, 3], enc.pointnet(feats)[0])


def test_max_pool_over_points_of_a_pillar() -> None:
    enc = _encoder()
    pts = torch.zeros(1, 4, len(LIDAR_FIELDS))
    pts[0, 0, :4] = torch.tensor([0.2, 0.3, 1.0, 10.0])
    pts[0, 1, :4] = torch.tensor([0.8, 0.6, -1.0, 200.0])  # same pillar (8, 8)
    pts[0, 2, :4] = torch.tensor([-0.5, 0.5, 0.0, 50.0])  # pillar (7, 8)
    valid = torch.tensor([[True, True, True, False]])
    feats, pid = enc.decorate(pts, valid)
    # offsets to the pillar mean: the two points of pillar (8, 8) have mean (0.5, 0.45, 0)
    assert torch.allclose(feats[:2, 4:7], torch.tensor([[-0.3, -0.15, 1.0], [0.3, 0.15, -1.0]]), atol=1e-6)
    pointwise = enc.pointnet(feats)
    canvas = enc.pillars(pts, valid)
    assert torch.allclose(canvas[0, :, 8, 8], torch.maximum(pointwise[0], pointwise[1]))
    assert torch.allclose(canvas[0, :, 7, 8], pointwise[2])
    assert int((canvas.abs().sum(1) > 0).sum()) <= 2


def test_padded_and_out_of_grid_points_are_ignored() -> None:
    enc = _encoder()
    pts, valid = _cloud(2, 50)
    ref = enc(pts, valid)
    junk = torch.full((2, 7, len(LIDAR_FIELDS)), 3.0)
    outside = torch.tensor([[20.0, 0.0, 0.0, 5.0, 0.0], [0.0, 0.0, 9.0, 5.0, 0.0]])  # beyond x; beyond z
    outside = outside.unsqueeze(1).expand(2, 2, 5)
    pts2 = torch.cat([pts, junk, outside], dim=1)
    pad, real = torch.zeros(2, 7, dtype=torch.bool), torch.ones(2, 2, dtype=torch.bool)
    valid2 = torch.cat([valid, pad, real], dim=1)
    assert torch.allclose(enc(pts2, valid2), ref, atol=1e-6)


@pytest.mark.parametrize("train", [False, True])
def test_permutation_invariance(train: bool) -> None:
    enc = _encoder().train(train)
    pts, valid = _cloud(2, 60, seed=3)
    perm = torch.randperm(60, generator=torch.Generator().manual_seed(1))
    out = enc(pts, valid)
    out_perm = enc(pts[:, perm], valid[:, perm])
    assert torch.allclose(out, out_perm, atol=1e-5)


def test_samples_do_not_mix_and_shapes() -> None:
    enc = _encoder()
    pts, valid = _cloud(3, 40, seed=5)
    both = enc(pts, valid)
    assert both.shape == (3, enc.out_channels, 16, 16) and enc.out_channels == 8
    for b in range(3):
        assert torch.allclose(enc(pts[b:b + 1], valid[b:b + 1]), both[b:b + 1], atol=1e-5)


def test_radar_fields_and_gradients_reach_every_parameter() -> None:
    torch.manual_seed(0)
    enc = PillarEncoder("radar", GRID, pointnet_channels=(8, 8), channels=4, layers=2)
    assert enc.fields[:3] == ("x", "y", "z") and "rcs" in enc.fields
    pts, valid = _cloud(2, 30, seed=2, fields=len(RADAR_FIELDS))
    pts = pts.requires_grad_(True)
    enc(pts, valid).square().mean().backward()
    for name, p in enc.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert pts.grad[~valid].abs().sum() == 0  # padded rows get no gradient


def test_nearly_empty_batches_in_training() -> None:
    enc = _encoder().train()
    pts = torch.zeros(2, 4, len(LIDAR_FIELDS))
    out_empty = enc(pts, torch.zeros(2, 4, dtype=torch.bool))
    assert out_empty.shape == (2, 8, 16, 16) and torch.isfinite(out_empty).all()
    one = torch.zeros(2, 4, dtype=torch.bool)
    one[0, 0] = True
    assert torch.isfinite(enc(pts, one)).all()
    assert isinstance(enc.pointnet[1], PointBatchNorm)


def test_pillar_index_matches_grid() -> None:
    pts, valid = _cloud(2, 20, seed=7)
    pid, keep = pillar_index(pts, valid, GRID)
    idx, inside = GRID.to_index(pts[..., :3])
    assert torch.equal(keep, inside & valid)
    b = torch.arange(2).unsqueeze(1).expand(2, 20)[keep]
    assert torch.equal(pid, (b * 16 + idx[keep][:, 0]) * 16 + idx[keep][:, 1])


def test_registered_and_bad_input() -> None:
    assert get_point_encoder("pillars") is PillarEncoder
    with pytest.raises(ValueError, match="modality"):
        PillarEncoder("camera", GRID)
    with pytest.raises(ValueError, match="fields"):
        PillarEncoder("lidar", GRID, fields=("x", "y", "rcs"))
    with pytest.raises(ValueError, match="pointnet_channels"):
        PillarEncoder("lidar", GRID, pointnet_channels=())
    with pytest.raises(ValueError, match="layers"):
        PillarEncoder("lidar", GRID, layers=0)
    enc = _encoder()
    with pytest.raises(ValueError, match=r"expected points \(B, P, 5\)"):
        enc(torch.zeros(1, 3, 4), torch.ones(1, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="lidar_valid"):
        enc(torch.zeros(1, 3, 5), torch.ones(1, 4, dtype=torch.bool))


def test_lmd_decomposes_a_pillars_fusion_model_conservatively() -> None:
    """The LMD engine follows every op of the encoder (index, index_add, scatter_reduce amax, BatchNorm1d)."""
    from fusionlens.decompose.api import decompose
    from fusionlens.models import build_model, preset_config

    torch.manual_seed(0)
    small = {"pointnet_channels": [8], "channels": 4}
    cfg = preset_config("tiny", "radar,lidar", grid=GRID, point_encoders={"lidar": "pillars", "radar": "pillars"},
                        point_encoder_kwargs={"lidar": small, "radar": small}, fusion_dim=8, decoder_width=8,
                        head_dim=8, extra_heads={"centerpoint": {"classes": ["car"], "hidden": 8}})
    model = build_model(cfg).eval()
    lidar, lidar_valid = _cloud(2, 40, seed=1)
    radar, radar_valid = _cloud(2, 12, seed=2, fields=len(RADAR_FIELDS))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    d = decompose(model, {"radar": radar, "lidar": lidar},
                  forward_kwargs={"radar_valid": radar_valid, "lidar_valid": lidar_valid})
    assert d.names == ["radar", "lidar", "bias"]
    assert d.conservation_error().relative < 1e-5
    heat = d.components["lidar"]["det_heatmap"]
    assert heat.shape == (2, 1, 16, 16) and heat.abs().sum() > 0
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
