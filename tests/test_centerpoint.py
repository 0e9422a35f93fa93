"""CenterPoint head: target oracles, decode(encode) round trip, focal loss, training, model plug-in."""

from __future__ import annotations

import math

import pytest
import torch

from fusionlens.data.sample import BEVGrid
from fusionlens.models.centerpoint import (
    REG_OUTPUTS,
    CenterPointHead,
    decode_detections,
    detection_loss,
    encode_targets,
    focal_loss,
    gaussian_radius,
)
from fusionlens.models.registry import get_head

GRID = BEVGrid(((-16.0, 16.0), (-16.0, 16.0), (-3.0, 3.0)), (32, 32, 2))  # 1 m cells


def _boxes() -> tuple[torch.Tensor, torch.Tensor]:
    boxes = torch.tensor([
        [3.3, -4.7, 0.5, 1.9, 4.5, 1.6, 2.5, 1.0, -0.5],
        [-8.1, 9.2, 0.9, 0.6, 0.7, 1.8, -1.0, 0.0, 0.0],
        [10.6, 10.1, -0.2, 2.5, 10.0, 3.2, -3.0, 4.0, 2.0],
        [40.0, 0.0, 0.0, 2.0, 4.0, 1.5, 0.0, 0.0, 0.0],  # outside the grid: skipped
    ])
    return boxes, torch.tensor([0, 5, 2, 0])


def _targets_as_outputs(t) -> dict[str, torch.Tensor]:
    out = {"det_heatmap": torch.logit(t.heatmap.clamp(1e-6, 1 - 1e-6))}
    start = 0
    for name, ch in REG_OUTPUTS.items():
        out[name] = t.reg[:, start:start + ch]
        start += ch
    return out


def test_decode_encode_round_trip() -> None:
    boxes, labels = _boxes()
    other = boxes[:2].clone()
    other[:, 0] += 5.0
    t = encode_targets([boxes, other], [labels, labels[:2]], GRID, 6)
    assert t.heatmap.shape == (2, 6, 32, 32) and t.reg.shape == (2, 10, 32, 32)
    assert t.num_objects == 5
    decoded = decode_detections(_targets_as_outputs(t), GRID, score_threshold=0.5)
    for got, (want, want_lab) in zip(decoded, [(boxes[:3], labels[:3]), (other, labels[:2])]):
        order = got["boxes"][:, 0].argsort()
        ref = want[:, 0].argsort()
        assert torch.equal(got["labels"][order], want_lab[ref])
        assert torch.allclose(got["boxes"][order], want[ref], atol=1e-5)
        assert torch.all(got["scores"] > 0.99)


def test_heatmap_is_the_cornernet_gaussian() -> None:
    boxes = torch.tensor([[0.5, 0.5, 0.0, 10.0, 10.0, 2.0, 0.0, 0.0, 0.0]])  # cell (16, 16), 10x10 cells
    t = encode_targets([boxes], [torch.tensor([1])], GRID, 3)
    heat = t.heatmap[0, 1]
    # hand-computed CornerNet radius for a 10 x 10 box at overlap 0.1: the third root,
    # (-0.4 a + sqrt(0.16 + 1.44) a) / 2 = 0.43246 a -> floor 4
    r = 4
    sigma = (2 * r + 1) / 6
    assert heat[16, 16] == 1.0 and t.heatmap[0, [0, 2]].abs().sum() == 0
    assert heat[16 + 3, 16 - 2].item() == pytest.approx(math.exp(-(9 + 4) / (2 * sigma ** 2)), rel=1e-5)
    assert heat[16 + r, 16].item() > 0 and heat[16 + r + 1, 16] == 0 and heat[16, 16 - r - 1] == 0
    assert t.mask[0, 0].nonzero().tolist() == [[16, 16]]


def test_gaussian_radius_hand_value_and_minimum() -> None:
    a = torch.tensor([10.0, 3.0])
    assert gaussian_radius(a, a, 0.1).tolist() == pytest.approx((0.5 * (-0.4 + math.sqrt(1.6)) * a).tolist())
    small = torch.tensor([[0.0, 0.0, 0.0, 0.5, 0.5, 1.0, 0.0, 0.0, 0.0]])
    heat = encode_targets([small], [torch.tensor([0])], GRID, 1, min_radius=2).heatmap[0, 0]
    assert (heat > 0).sum() == 25  # the radius is clamped up to min_radius = 2: a 5 x 5 window


def test_shared_centre_cell_first_box_owns_regression() -> None:
    boxes = torch.tensor([[1.2, 1.2, 0.0, 2.0, 4.0, 1.5, 0.3, 0.0, 0.0],
                          [1.7, 1.4, 0.0, 2.0, 4.0, 1.5, 1.3, 0.0, 0.0]])
    t = encode_targets([boxes], [torch.tensor([0, 1])], GRID, 2)
    assert t.num_objects == 1
    assert t.reg[0, 6, 17, 17].item() == pytest.approx(math.sin(0.3))
    assert t.heatmap[0, :, 17, 17].tolist() == [1.0, 1.0]


def test_focal_loss_hand_values() -> None:
    logits = torch.zeros(1, 1, 1, 3)
    target = torch.tensor([[[[1.0, 0.5, 0.0]]]])
    # p = 0.5 everywhere: positive 0.25*log 2; negatives (1-y)^4 * 0.25 * log 2 for y = 0.5 and 0; N = 1
    expected = math.log(2) * (0.25 + 0.0625 * 0.25 + 0.25)
    assert focal_loss(logits, target).item() == pytest.approx(expected)
    confident = torch.full((1, 1, 1, 3), -30.0)
    confident[..., 0] = 30.0
    assert focal_loss(confident, target).item() < 1e-10


def test_box_loss_zero_for_exact_regression() -> None:
    boxes, labels = _boxes()
    t = encode_targets([boxes], [labels], GRID, 6)
    losses = detection_loss(_targets_as_outputs(t), t)
    assert losses["det_box"].item() == pytest.approx(0.0, abs=1e-6)
    assert losses["det_total"].item() == pytest.approx(losses["det_heatmap"].item() + 0.0, abs=1e-6)
    with pytest.raises(ValueError, match="lack"):
        detection_loss({"det_heatmap": t.heatmap}, t)


def test_nms_and_decode_settings() -> None:
    out = {name: torch.zeros(1, ch, 32, 32) for name, ch in REG_OUTPUTS.items()}
    heat = torch.full((1, 2, 32, 32), -10.0)
    heat[0, 0, 10, 10], heat[0, 0, 10, 12], heat[0, 1, 20, 20] = 3.0, 2.0, 1.0
    out["det_heatmap"] = heat
    out["det_size"] = torch.full((1, 3, 32, 32), math.log(4.0))  # 4 m boxes: the peaks 2 m apart overlap
    plain = decode_detections(out, GRID, score_threshold=0.5)[0]
    assert len(plain["boxes"]) == 3
    assert plain["scores"].tolist() == sorted(plain["scores"].tolist(), reverse=True)
    nmsed = decode_detections(out, GRID, score_threshold=0.5, nms="aabb", nms_iou=0.2)[0]
    assert sorted(nmsed["labels"].tolist()) == [0, 1]
    assert decode_detections(out, GRID, k=1)[0]["labels"].tolist() == [0]
    for bad in ({"k": 0}, {"score_threshold": 1.0}, {"nms": "obb"}, {"nms_iou": 0.0}):
        with pytest.raises(ValueError, match="decode"):
            decode_detections(out, GRID, **bad)


def test_encode_bad_input() -> None:
    boxes, labels = _boxes()
    with pytest.raises(ValueError, match="labels must lie"):
        encode_targets([boxes], [labels + 5], GRID, 6)
    with pytest.raises(ValueError, match="positive sizes"):
        encode_targets([boxes * torch.tensor([1, 1, 1, 0, 1, 1, 1, 1, 1.0])], [labels], GRID, 6)
    with pytest.raises(ValueError, match="labels"):
        encode_targets([boxes], [labels[:2]], GRID, 6)
    with pytest.raises(ValueError, match="classes"):
        CenterPointHead(8, GRID, classes=())


def test_tiny_head_training_reduces_loss() -> None:
    torch.manual_seed(0)
    grid = BEVGrid(((-8.0, 8.0), (-8.0, 8.0), (-3.0, 3.0)), (16, 16, 1))
    head = get_head("centerpoint")(14, grid, classes=("car", "pedestrian"), hidden=16)
    assert isinstance(head, CenterPointHead)
    g = torch.Generator().manual_seed(0)
    batch = {"boxes": [], "box_labels": []}
    for _ in range(4):
        n = 3
        bx = torch.zeros(n, 9)
        bx[:, :2] = torch.rand(n, 2, generator=g) * 12 - 6
        bx[:, 3:6] = torch.tensor([1.8, 4.2, 1.5])
        bx[:, 6] = torch.rand(n, generator=g) * 6 - 3
        batch["boxes"].append(bx)
        batch["box_labels"].append(torch.tensor([0, 5])[torch.randint(0, 2, (n,), generator=g)])
    # features: the objects rendered as a BEV backbone might (blobs and box codes) plus two noise channels
    t = head.targets(batch)
    feats = torch.cat([t.heatmap, t.reg * t.mask, torch.randn(4, 2, 16, 16, generator=g)], 1)
    opt = torch.optim.Adam(head.parameters(), lr=1e-2)
    losses = []
    for _ in range(40):
        loss = head.loss(head(feats), batch)["det_total"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_pillars_centerpoint_fusion_model_plugs_in() -> None:
    from fusionlens.models.config import preset_config
    from fusionlens.models.fusion import build_model

    grid = BEVGrid(((-8.0, 8.0), (-8.0, 8.0), (-3.0, 3.0)), (16, 16, 2))
    cfg = preset_config("tiny", "lidar", grid=grid, point_encoders={"lidar": "pillars"},
                        point_encoder_kwargs={"lidar": {"pointnet_channels": [8], "channels": 4}},
                        fusion_dim=8, decoder_width=8, head_dim=8,
                        extra_heads={"centerpoint": {"classes": ["car"], "hidden": 8}})
    torch.manual_seed(0)
    model = build_model(cfg)
    groups = model.modality_groups()
    assert any(n.startswith("encoders.lidar.pointnet") for n in groups["lidar"])
    assert any(n.startswith("extra_heads.centerpoint") for n in groups["fusion"])
    pts = torch.rand(2, 40, 5) * torch.tensor([14.0, 14.0, 2.0, 100.0, 1.0]) - torch.tensor([7, 7, 1, 0, 0.0])
    out = model(lidar=pts, lidar_valid=torch.ones(2, 40, dtype=torch.bool))
    assert out["det_heatmap"].shape == (2, 1, 16, 16) and out["det_vel"].shape == (2, 2, 16, 16)
    batch = {"boxes": [torch.tensor([[1.0, 2.0, 0.0, 2.0, 4.0, 1.5, 0.0, 0.0, 0.0]])] * 2,
             "box_labels": [torch.tensor([0])] * 2}
    loss = model.extra_heads["centerpoint"].loss(out, batch)["det_total"]
    loss.backward()
    assert all(p.grad is not None for p in model.encoders["lidar"].parameters())


def test_detection_training_on_tiny_split_reduces_loss_and_raises_map() -> None:
    pytest.importorskip("nuscenes")
    from fusionlens.data.collate import collate_samples
    from fusionlens.evaluate.detection import evaluate_detector
    from fusionlens.models import batch_to_inputs, build_model, preset_config
    from fusionlens.train.synthetic import TEST_GRID, SyntheticDataset

    torch.manual_seed(0)
    cfg = preset_config("tiny", "lidar", grid=TEST_GRID, point_encoders={"lidar": "pillars"},
                        point_encoder_kwargs={"lidar": {"pointnet_channels": [16], "channels": 8}},
                        fusion_dim=16, decoder_width=8, head_dim=8,
                        extra_heads={"centerpoint": {"classes": ["car"], "hidden": 16}})
    model = build_model(cfg)
    head = model.extra_heads["centerpoint"]
    train, val = SyntheticDataset(8, seed=0), SyntheticDataset(6, seed=1)
    before = evaluate_detector(model, val, progress=False)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for step in range(40):
        batch = collate_samples([train[(step * 4 + i) % len(train)] for i in range(4)])
        inputs, kwargs = batch_to_inputs(model, batch)
        loss = head.loss(model(**inputs, **kwargs), batch)["det_total"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    after = evaluate_detector(model, val, progress=False)
    assert sum(losses[-5:]) < 0.25 * sum(losses[:5])
    assert model.training  # evaluate_detector restores the mode
    assert after.mean_ap > before.mean_ap + 0.3 and after.nds > before.nds
