"""The AVOD-style detector: BEV input and crop boxes worked out by hand, anchors, the single-view partners,
training on the world's KITTI export, and LMD on region crops (roi_align) against crops written out by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn
from torchvision.ops import roi_align

from fusionlens.data.kitti import KittiDataset, parse_calib, project_boxes
from fusionlens.decompose import decompose
from fusionlens.models.avod import AvodDetector, avod_preset, bev_input
from fusionlens.models.avod_lmd import avod_inputs  # noqa: F401  (registers the roi_align rule)
from fusionlens.models.avod_ops import bev_boxes, image_boxes, roi_align_torch
from fusionlens.train.avod import collate_kitti, evaluate_avod, train_avod
from fusionlens.world import WorldConfig
from fusionlens.world.kitti_export import export_kitti

TINY = avod_preset("tiny", channels=(4, 8, 8, 8), feature_channels=8, bottleneck=4, rpn_hidden=16, hidden=32,
                   rpn_post_nms=16)
CANONICAL = ("P2: 700 0 600 0 0 700 180 0 0 0 1 0\nR0_rect: 1 0 0 0 1 0 0 0 1\n"
             "Tr_velo_to_cam: 0 -1 0 0 0 0 -1 0 1 0 0 0\n")


@pytest.fixture(scope="module")
def split(tmp_path_factory):
    root = tmp_path_factory.mktemp("kitti_avod")
    export_kitti(root, {"train": 3, "val": 1}, cfg=WorldConfig(image_size=(64, 112)), seed=5)
    return root


def test_bev_input_by_hand():
    """Cells of 0.5 m from x = 0, y = -24; five 0.6 m slices from z = -2.3. (10.2, -3.9, -1.0) is cell
    (20, 40), slice 2, 0.1 m above its bottom; a second point in the cell makes the density log 3 / log 16."""
    pts = torch.tensor([[10.2, -3.9, -1.0, 0.5], [10.3, -3.8, -2.2, 0.1], [60.0, 0.0, -1.0, 0.0],
                        [1.0, 1.0, 5.0, 0.0]])
    bev = bev_input(pts, TINY)
    assert bev.shape == (6, 96, 96)
    assert bev[2, 20, 40] == pytest.approx(0.1 / 0.6, abs=1e-5)
    assert bev[0, 20, 40] == pytest.approx(0.1 / 0.6, abs=1e-5)
    assert bev[5, 20, 40] == pytest.approx(math.log(3) / math.log(16))
    assert int((bev[:5] > 0).sum()) == 2 and int((bev[5] > 0).sum()) == 1  # the others lie outside


def test_roi_align_in_torch_equals_torchvision_and_differentiates_twice():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 9, 11, dtype=torch.double, requires_grad=True)
    rois = torch.tensor([[0, 0.5, 1.0, 5.5, 6.0], [1, -1.5, 2.0, 12.9, 4.5], [0, 3, 3, 3.2, 3.1],
                         [1, -3, -3, -0.5, 20]], dtype=torch.double)  # inside, over the edges, tiny, mostly outside
    for aligned in (True, False):
        torch.testing.assert_close(roi_align_torch(x, rois, 3, 1.0, 2, aligned), roi_align(x, rois, 3, 1.0, 2, aligned),
                                   atol=1e-12, rtol=0)
    bad = torch.tensor([[0, float("nan"), 1.0, 5.0, 6.0], [1, 0.0, float("-inf"), 4.0, float("inf")]],
                       dtype=torch.double)  # boxes of a diverged regression: zeros, not an indexing error
    assert torch.isfinite(roi_align_torch(x, bad, 2)[:, :, 0, 0]).all()
    (g,) = torch.autograd.grad(roi_align_torch(x, rois, 2).pow(2).sum(), x, create_graph=True)
    (gg,) = torch.autograd.grad(g.pow(2).sum(), x)  # the second derivative torchvision's kernel refuses
    assert torch.isfinite(gg).all() and gg.abs().sum() > 0


def test_crop_boxes_by_hand():
    """A 4 x 2 m box at (20.25, 0.25) covers BEV x 18.25..22.25 -> rows 36.5..44.5 and y -0.75..1.25 -> columns
    46.5..50.5; its image box matches the reader's projection of the same 3-D box."""
    box = torch.tensor([[20.25, 0.25, -1.0, 4.0, 2.0, 1.5]])
    torch.testing.assert_close(bev_boxes(box, TINY), torch.tensor([[46.5, 36.5, 50.5, 44.5]]))
    calib = parse_calib(CANONICAL)
    l2i = torch.from_numpy(calib.P[2] @ calib.velo_to_rect).float()
    ours = image_boxes(box, l2i, (375, 1242))
    theirs, _ = project_boxes(np.array([[20.25, 0.25, -1.0, 2.0, 4.0, 1.5, 0.0]]), calib, (375, 1242))
    torch.testing.assert_close(ours, torch.from_numpy(theirs).float(), atol=1e-3, rtol=0)


def test_forward_partners_and_anchor_filter(split):
    ds = KittiDataset(split, "train", classes=("Car", "Pedestrian"))
    batch = collate_kitti([ds[0], ds[1]], TINY)
    torch.manual_seed(0)
    for modalities in (("camera", "lidar"), ("camera",), ("lidar",)):
        model = AvodDetector(TINY.__class__(**{**TINY.to_dict(), "modalities": modalities})).eval()
        with torch.no_grad():
            out = model(batch["image"], batch["bev"], batch["lidar_to_image"])
            again = model(batch["image"], batch["bev"], batch["lidar_to_image"])
        assert out["second"].shape == (len(out["proposals"]), 3 + 12 + 4)
        assert torch.equal(out["second"], again["second"])
        assert all(int((out["proposal_batch"] == b).sum()) <= TINY.rpn_post_nms for b in range(2))
        if modalities == ("camera",):
            camera_only = len(out["anchors"])
        if modalities == ("lidar",):  # empty anchors are dropped only where there is a LiDAR
            assert len(out["anchors"]) < camera_only
            anchors, b = out["anchors"], out["anchor_batch"]
            cells = bev_boxes(anchors[b == 0], TINY)
            occupied = batch["bev"][0, -1] > 0
            for r in cells[:20]:
                iy1, ix1, iy2, ix2 = int(r[0]), int(r[1]), math.ceil(r[2]), math.ceil(r[3])
                assert occupied[max(ix1, 0):ix2 + 1, max(iy1, 0):iy2 + 1].any()


def test_trains_and_evaluates(split):
    ds = KittiDataset(split, "train", classes=("Car", "Pedestrian"))
    model, info = train_avod(TINY, ds, steps=15, batch_size=2, lr=3e-3, progress=False)
    assert math.isfinite(info["final_loss"])
    result = evaluate_avod(model, KittiDataset(split, "val", classes=("Car", "Pedestrian")))
    assert set(result.ap) == {"bbox", "bev", "3d"} and result.num_gt["Car"]["hard"] > 0
    assert all(0.0 <= v <= 100.0 for m in result.ap.values() for v in m["Car"].values())


def test_lmd_parts_at_the_crops_equal_the_crops_written_out(split):
    """Local bias: each branch up to its crop is one modality's, so at the fusion (the mean of the crops) the
    camera part is roi_align(image features) / 2 and the LiDAR part roi_align(BEV features) / 2, exactly."""
    ds = KittiDataset(split, "val", classes=("Car", "Pedestrian"))
    torch.manual_seed(1)
    model = AvodDetector(TINY).eval().double()
    batch = collate_kitti([ds[0]], TINY)
    batch = {k: v.double() if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    spec = model.describe()
    given, kwargs = spec.inputs(batch)
    d = decompose(model, {"image": given["camera"], "bev": given["lidar"]}, names=["camera", "lidar"],
                  forward_kwargs=kwargs, layers=["fusion"])
    second = d.output["second"]
    total = sum(d.components[n]["second"] for n in ("camera", "lidar", "bias"))
    torch.testing.assert_close(total, second, atol=1e-10, rtol=0)
    with torch.no_grad():
        feats = model.features(given["camera"], given["lidar"])
        cam, lid = model.crops(feats, kwargs["proposals"], kwargs["proposal_batch"], kwargs["lidar_to_image"],
                               TINY.crop)
    at = d.layer("fusion")
    torch.testing.assert_close(at["camera"], cam / 2, atol=1e-10, rtol=0)
    torch.testing.assert_close(at["lidar"], lid / 2, atol=1e-10, rtol=0)
    assert at["bias"].abs().max() < 1e-10
    glob = spec.decompose(batch, bias="global")  # the roi_align rule carries mixed components through the crops
    torch.testing.assert_close(sum(glob.components.values()), glob.output, atol=1e-10, rtol=0)
    assert torch.isfinite(glob.components["camera"]).all()


class CropNet(nn.Module):
    """A user's model that fuses the views before cropping, so roi_align meets mixed components."""

    def __init__(self) -> None:
        super().__init__()
        self.cam = nn.Conv2d(3, 4, 3, padding=1)
        self.lidar_proj = nn.Conv2d(2, 4, 1)
        self.classifier = nn.Linear(16, 3)

    def forward(self, image, lidar, rois):
        fused = self.cam(image) + self.lidar_proj(lidar)
        return self.classifier(roi_align(fused, rois, 2, aligned=True).flatten(1))


def test_roi_align_rule_is_superposition_on_mixed_features():
    torch.manual_seed(0)
    net = CropNet().double().eval()
    image, lidar = torch.randn(1, 3, 8, 8, dtype=torch.double), torch.randn(1, 2, 8, 8, dtype=torch.double)
    rois = torch.tensor([[0, 0.5, 1.0, 5.5, 6.0], [0, 2.0, 2.0, 7.9, 4.5]], dtype=torch.double)
    w = net.classifier.weight
    with torch.no_grad():
        for bias, with_bias in (("local", True), ("global", False)):
            # local bias: each branch's own biases are its modality's; global: every bias is the bias component's
            d = decompose(net, {"image": image, "lidar": lidar}, forward_kwargs={"rois": rois}, bias=bias)
            cam = nn.functional.conv2d(image, net.cam.weight, net.cam.bias if with_bias else None, padding=1)
            lid = nn.functional.conv2d(lidar, net.lidar_proj.weight, net.lidar_proj.bias if with_bias else None)
            for name, feat in (("image", cam), ("lidar", lid)):
                expected = roi_align(feat, rois, 2, aligned=True).flatten(1) @ w.T
                torch.testing.assert_close(d.components[name], expected, atol=1e-12, rtol=0)

    class BoxesFromFeatures(CropNet):
        def forward(self, image, lidar, rois):
            return super().forward(image, lidar, rois * lidar.mean().abs())

    with pytest.raises(NotImplementedError, match="not linear in them"):
        decompose(BoxesFromFeatures().double().eval(), {"image": image, "lidar": lidar}, forward_kwargs={"rois": rois})


def test_detection_shares_sum_to_one_and_follow_the_components(split):
    from fusionlens.models.avod_lmd import detection_shares

    ds = KittiDataset(split, "val", classes=("Car", "Pedestrian"))
    torch.manual_seed(2)
    model = AvodDetector(TINY).eval().double()
    batch = collate_kitti([ds[0]], TINY)
    batch = {k: v.double() if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    rows = detection_shares(model, batch)
    d = model.describe().decompose(batch)
    assert len(rows) == len(batch["proposals"]) > 0
    for k, row in enumerate(rows[:5]):
        c = row["class"] + 1
        cam, lid = float(d.components["camera"][k, c]), float(d.components["lidar"][k, c])
        assert row["shares"]["camera"] == pytest.approx(cam / (cam + lid))
        assert row["shares"]["camera"] + row["shares"]["lidar"] == pytest.approx(1.0)


def test_backbones_from_single_view_partners(split, tmp_path):
    from dataclasses import replace

    from fusionlens.train.avod import load_backbones

    ds = KittiDataset(split, "train", classes=("Car", "Pedestrian"))
    lidar_cfg, camera_cfg = replace(TINY, modalities=("lidar",)), replace(TINY, modalities=("camera",))
    partner, _ = train_avod(lidar_cfg, ds, steps=1, batch_size=1, checkpoint=tmp_path / "lidar.pt", progress=False)
    train_avod(camera_cfg, ds, steps=1, batch_size=1, checkpoint=tmp_path / "camera.pt", progress=False)
    torch.manual_seed(3)
    fused = AvodDetector(TINY)
    camera_before = {k: v.clone() for k, v in fused.image_fpn.state_dict().items()}
    load_backbones(fused, {"lidar": tmp_path / "lidar.pt"})
    for k, v in partner.bev_fpn.state_dict().items():
        assert torch.equal(fused.bev_fpn.state_dict()[k], v)
    assert all(torch.equal(fused.image_fpn.state_dict()[k], v) for k, v in camera_before.items())
    with pytest.raises(ValueError, match=r"camera.pt has no lidar backbone \(its views: \['camera'\]\)"):
        load_backbones(fused, {"lidar": tmp_path / "camera.pt"})
    with pytest.raises(ValueError, match="the detector's views are"):
        load_backbones(AvodDetector(camera_cfg), {"lidar": tmp_path / "lidar.pt"})
