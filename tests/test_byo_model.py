"""Bring your own model: a camera+LiDAR BEV network written the way other codebases write one (its own names,
``forward(img, points, img_metas)``, a plain ``Dataset`` of dicts batched by ``default_collate``) goes through every
analysis with nothing but a :class:`~fusionlens.spec.ModelSpec` -- no adapter class, no ``Sample``.

Oracles: the fusion conv's camera component written out by hand, region scores summed over cells found by an
explicit loop, shares worked out by hand, the fusion-level decomposition equal to the input-level one with
``bias="local"``, the module-path fusion level equal to the (encode, decode) one, frozen separation exact."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from fusionlens.data.sample import BEVGrid
from fusionlens.evaluate import (
    attribute_regions,
    make_method,
    modality_shares,
    perturbation_metrics,
    seg_grad_cam,
)
from fusionlens.spec import ModelSpec, SpecError
from fusionlens.viz import decomposition_figure

torch.set_num_threads(1)
GRID = BEVGrid(bounds=((-8.0, 8.0), (-8.0, 8.0), (-2.0, 2.0)), shape=(16, 16, 3))


class ConvFuser(nn.Module):
    """BEVFusion-style fuser: a list of BEV maps -> cat -> conv -> BN -> ReLU."""

    def __init__(self, channels: list[int], out: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(sum(channels), out, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(out)

    def forward(self, inputs: list[torch.Tensor]) -> torch.Tensor:
        return F.relu(self.bn(self.conv(torch.cat(inputs, dim=1))))


class MyBEVFusion(nn.Module):
    """2 cameras lifted by grid_sample at 3 heights, pillars scattered into the grid, a U-Net decoder."""

    def __init__(self, c: int = 6) -> None:
        super().__init__()
        self.img_backbone = nn.Sequential(nn.Conv2d(3, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU(),
                                          nn.Conv2d(c, c, 3, stride=2, padding=1), nn.ReLU())
        self.img_neck = nn.Conv2d(3 * c, c, 1)  # one lifted feature at 3 heights -> 1x1 neck
        self.pillar_mlp = nn.Sequential(nn.Linear(4, c), nn.ReLU(), nn.Linear(c, c))
        self.fuser = ConvFuser([c, c], 8)
        self.down = nn.Sequential(nn.Conv2d(8, 12, 3, stride=2, padding=1), nn.ReLU())
        self.up = nn.ConvTranspose2d(12, 8, 2, stride=2)
        self.dec = nn.Sequential(nn.Conv2d(16, 8, 3, padding=1), nn.GroupNorm(2, 8), nn.ReLU())
        self.seg_head = nn.Conv2d(8, 1, 1)

    def lift(self, feats: torch.Tensor, lidar2img: torch.Tensor) -> torch.Tensor:
        b, n, c, h, w = feats.shape
        (x0, x1), (y0, y1), _ = GRID.bounds
        nx, ny, _ = GRID.shape
        xs = torch.linspace(x0 + 0.5, x1 - 0.5, nx)
        ys = torch.linspace(y0 + 0.5, y1 - 0.5, ny)
        levels = []
        for z in (-1.0, 0.0, 1.0):
            gx, gy = torch.meshgrid(xs, ys, indexing="ij")
            pts = torch.stack([gx, gy, torch.full_like(gx, z), torch.ones_like(gx)], -1).reshape(-1, 4)
            uvw = torch.einsum("bnij,pj->bnpi", lidar2img, pts)
            depth = uvw[..., 2:3].clamp(min=1e-3)
            uv = uvw[..., :2] / depth
            norm = torch.stack([uv[..., 0] / (w * 2) * 2 - 1, uv[..., 1] / (h * 2) * 2 - 1], -1)
            valid = ((norm.abs() <= 1).all(-1) & (uvw[..., 2] > 0)).float()
            sampled = F.grid_sample(feats.flatten(0, 1), norm.flatten(0, 1)[:, None], align_corners=False)
            sampled = sampled.reshape(b, n, c, nx * ny) * valid[:, :, None]
            levels.append(sampled.sum(1).reshape(b, c, nx, ny))
        return self.img_neck(torch.cat(levels, dim=1))

    def pillars(self, points: torch.Tensor) -> torch.Tensor:
        b, p, _ = points.shape
        (x0, x1), (y0, y1), _ = GRID.bounds
        nx, ny, _ = GRID.shape
        ix = ((points[..., 0] - x0) / (x1 - x0) * nx).long().clamp(0, nx - 1)
        iy = ((points[..., 1] - y0) / (y1 - y0) * ny).long().clamp(0, ny - 1)
        feats = self.pillar_mlp(points)  # (B, P, C)
        canvas = torch.zeros(b, nx * ny, feats.shape[-1], dtype=feats.dtype)
        canvas = canvas.scatter_add(1, (ix * ny + iy)[..., None].expand_as(feats), feats)
        return canvas.transpose(1, 2).reshape(b, -1, nx, ny)

    def forward(self, img: torch.Tensor, points: torch.Tensor, img_metas: dict) -> dict[str, torch.Tensor]:
        b, n = img.shape[:2]
        feats = self.img_backbone(img.flatten(0, 1))
        cam_bev = self.lift(feats.reshape(b, n, *feats.shape[1:]), img_metas["lidar2img"])
        x = self.fuser([cam_bev, self.pillars(points)])
        skip = x
        x = self.up(self.down(x))
        x = self.dec(torch.cat([x, skip], dim=1))
        return {"seg": self.seg_head(x), "aux": x.mean()}


def lidar2img(n: int, rng: torch.Generator) -> torch.Tensor:
    """Cameras at the origin looking along +x / -x (8x8 images, focal 4)."""
    k = torch.tensor([[4.0, 0, 4.0, 0], [0, 4.0, 4.0, 0], [0, 0, 1.0, 0], [0, 0, 0, 1.0]])
    out = []
    for i in range(n):
        s = 1.0 if i % 2 == 0 else -1.0
        ego_to_cam = torch.tensor([[0, -s, 0, 0], [0, 0, -1.0, 0], [s, 0, 0, 0], [0, 0, 0, 1.0]])
        out.append(k @ ego_to_cam + 0.01 * torch.randn(4, 4, generator=rng))
    return torch.stack(out)


class MyDataset(Dataset):
    def __init__(self, n: int, seed: int = 0) -> None:
        self.items = []
        rng = torch.Generator().manual_seed(seed)
        for _ in range(n):
            pts = torch.rand(40, 4, generator=rng) * torch.tensor([16.0, 16.0, 4.0, 1.0]) - torch.tensor(
                [8.0, 8.0, 2.0, 0.0])
            self.items.append({"img": torch.rand(2, 3, 16, 16, generator=rng), "points": pts,
                               "img_metas": {"lidar2img": lidar2img(2, rng)}})

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        return self.items[i]


def split(batch: dict) -> tuple[dict, dict]:
    return {"camera": batch["img"], "lidar": batch["points"]}, {"img_metas": batch["img_metas"]}


def make_spec(model: nn.Module, fusion: object = "fuser", **kw: object) -> ModelSpec:
    args = dict(inputs=split, arguments={"camera": "img", "lidar": "points"}, output="seg",
                travels={"camera": ("img_metas",)}, fusion=fusion, grid=GRID)
    args.update(kw)
    return ModelSpec(model, **args)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    model = MyBEVFusion().eval()
    with torch.no_grad():  # non-trivial BN statistics
        model.fuser.bn.running_mean.uniform_(-0.2, 0.2)
        model.fuser.bn.running_var.uniform_(0.5, 2.0)
    return model, MyDataset(6)


def batch_of(data: Dataset, *idx: int) -> dict:
    from torch.utils.data import default_collate

    return default_collate([data[i] for i in idx])


def test_fusion_level_equals_input_level_and_both_fusion_descriptions(setup):
    model, data = setup
    spec = make_spec(model)
    batch = batch_of(data, 0, 1)
    full = spec.decompose(batch, level="input")
    fused = spec.decompose(batch, level="fusion")
    pair = make_spec(model, fusion=(
        lambda inputs, kw: dict(zip(("camera", "lidar"), fusion_inputs(model, inputs, kw))),
        lambda feats: model_tail(model, feats)))
    by_functions = pair.decompose(batch, level="fusion")
    for name in ("camera", "lidar", "bias"):
        torch.testing.assert_close(fused.components[name], full.components[name], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(by_functions.components[name], fused.components[name], rtol=1e-6, atol=1e-6)
    assert full.output.shape == (2, 1, 16, 16) and float(full.components["lidar"].abs().max()) > 1e-3


def fusion_inputs(model: MyBEVFusion, inputs: dict, kw: dict) -> tuple[torch.Tensor, torch.Tensor]:
    img = inputs["camera"]
    b, n = img.shape[:2]
    feats = model.img_backbone(img.flatten(0, 1))
    return model.lift(feats.reshape(b, n, *feats.shape[1:]), kw["img_metas"]["lidar2img"]), model.pillars(
        inputs["lidar"])


def model_tail(model: MyBEVFusion, feats: dict) -> dict:
    x = model.fuser([feats["camera"], feats["lidar"]])
    skip = x
    x = model.dec(torch.cat([model.up(model.down(x)), skip], dim=1))
    return {"seg": model.seg_head(x)}


def test_fusion_conv_components_equal_the_conv_written_out(setup):
    model, data = setup
    spec = make_spec(model)
    subject = spec.subject("fusion")
    x = subject.prepare(batch_of(data, 2))
    d = subject.decompose(x, layers=["model.fuser.conv"])
    w = model.fuser.conv.weight.detach()
    c = x.inputs["camera"].shape[1]
    by_hand = F.conv2d(x.inputs["camera"], w[:, :c], padding=1)
    torch.testing.assert_close(d.layer("model.fuser.conv")["camera"], by_hand, rtol=1e-5, atol=1e-6)
    by_hand_l = F.conv2d(x.inputs["lidar"], w[:, c:], padding=1)
    torch.testing.assert_close(d.layer("model.fuser.conv")["lidar"], by_hand_l, rtol=1e-5, atol=1e-6)


def test_swap_carries_the_travelling_kwargs(setup):
    model, data = setup
    subject = make_spec(model).subject("input")
    a, b = subject.prepare(batch_of(data, 0)), subject.prepare(batch_of(data, 3))
    cam = subject.swap(a, b, "camera")
    assert cam.inputs["camera"] is b.inputs["camera"] and cam.kwargs["img_metas"] is b.kwargs["img_metas"]
    lid = subject.swap(a, b, "lidar")
    assert lid.inputs["lidar"] is b.inputs["lidar"] and lid.kwargs["img_metas"] is a.kwargs["img_metas"]


@pytest.mark.parametrize("method, mode, level", [
    ("lmd:paper", "frozen", "fusion"), ("lmd:paper", "recomputed", "fusion"), ("lmd:paper", "recomputed", "input"),
    ("naive", "recomputed", "fusion"), ("shapley", "recomputed", "fusion"), ("lmd+shap", "frozen", "fusion"),
    ("captum-ablation", "recomputed", "fusion"),
])
def test_perturbation_metrics_with_every_method(setup, method, mode, level):
    model, data = setup
    res = perturbation_metrics(make_spec(model), data, make_method(method, mode=mode), count=2, stride=1,
                               anchors=[0, 3], level=level, progress=False)
    s = res.summary()["pcc"]
    assert set(s) == {"Cp/C", "Cp/L", "Lp/C", "Lp/L"} and res.modalities == ("camera", "lidar")
    if mode == "frozen":  # under the clean linearization the unperturbed modality cannot move
        assert s["Lp/C"][0] == pytest.approx(1.0) and s["Cp/L"][0] == pytest.approx(1.0)
    else:  # each sample's camera really changes when its camera is swapped
        assert s["Cp/C"][0] < 0.999


def test_modality_shares_by_hand():
    comps = {"camera": torch.tensor([[1.0, -2.0], [3.0, 0.0]]), "lidar": torch.tensor([[-1.0, 1.0], [1.0, 4.0]]),
             "bias": torch.full((2, 2), 10.0)}
    assert modality_shares(comps) == pytest.approx({"camera": 2 / 7, "lidar": 5 / 7})
    where = torch.tensor([[True, True], [False, False]])
    assert modality_shares(comps, where) == pytest.approx({"camera": -1 / 1, "lidar": 0.0})
    assert modality_shares(comps, kind="absolute") == pytest.approx({"camera": 6 / 13, "lidar": 7 / 13})
    assert modality_shares(comps, include_bias=True) == pytest.approx({"camera": 2 / 47, "lidar": 5 / 47,
                                                                        "bias": 40 / 47})
    with pytest.raises(ValueError, match="kind must be one of"):
        modality_shares(comps, kind="squared")
    with pytest.raises(ValueError, match="not broadcastable"):
        modality_shares(comps, torch.ones(3, 3, dtype=torch.bool))


def cells_in_box(x: float, y: float, w: float, length: float, yaw: float) -> torch.Tensor:
    """The box's cells by an explicit loop over cell centres (an independent footprint test)."""
    mask = torch.zeros(16, 16, dtype=torch.bool)
    for i in range(16):
        for j in range(16):
            cx, cy = -8.0 + i + 0.5, -8.0 + j + 0.5
            dx, dy = cx - x, cy - y
            along = dx * math.cos(yaw) + dy * math.sin(yaw)
            across = -dx * math.sin(yaw) + dy * math.cos(yaw)
            mask[i, j] = abs(along) <= length / 2 and abs(across) <= w / 2
    return mask


def test_region_attribution_boxes_and_masks(setup):
    model, data = setup
    spec = make_spec(model)
    batch = batch_of(data, 1)
    boxes = torch.tensor([[2.0, -3.0, 2.0, 5.0, 0.3], [-4.0, 4.0, 3.0, 3.0, 0.0]])
    rows = attribute_regions(spec, batch, boxes, seen_by=[["lidar"], ["camera", "lidar"]])
    d = spec.decompose(batch)
    assert [r.region for r in rows] == [0, 1]
    for r, box in zip(rows, boxes):
        mask = cells_in_box(*box.tolist())
        assert r.cells == int(mask.sum())
        for m in ("camera", "lidar"):
            assert r.scores[m] == pytest.approx(float(d.components[m][0, 0][mask].sum()), rel=1e-5, abs=1e-6)
        assert r.correct == (r.top in r.seen_by)
    masks = torch.stack([cells_in_box(*b.tolist()) for b in boxes])
    again = attribute_regions(spec, batch, masks)
    for a, r in zip(again, rows, strict=True):
        assert a.scores == pytest.approx(r.scores)
    assert all(a.correct is None for a in again)
    with pytest.raises(ValueError, match="boxes must be"):
        attribute_regions(spec, batch, torch.zeros(2, 6))
    with pytest.raises(ValueError, match="region masks must be"):
        attribute_regions(spec, batch, torch.zeros(1, 4, 4, dtype=torch.bool))


def test_grad_cam_and_figure(setup, tmp_path):
    import matplotlib.image

    model, data = setup
    spec = make_spec(model)
    batch = batch_of(data, 0)
    cams = seg_grad_cam(spec, batch, "fuser")
    assert set(cams) == {"camera", "lidar", "bias", "total"} and cams["camera"].shape == (1, 16, 16)
    d = spec.decompose(batch)
    path = decomposition_figure(tmp_path / "fig.png", {n: d.components[n][0, 0] for n in d.names},
                                output=d.output[0, 0], grid=GRID, images=batch["img"][0],
                                boxes=torch.tensor([[2.0, -3.0, 2.0, 5.0, 0.3]]), seen_by=[["lidar"]],
                                cams={k: v[0] for k, v in cams.items()})
    image = matplotlib.image.imread(path)
    assert image.shape[0] > 300 and image.shape[1] > 300
    decomposition_figure(tmp_path / "bare.png", {n: d.components[n][0, 0] for n in d.names}, cams={})
    assert (tmp_path / "bare.png").stat().st_size > 0


def test_bad_descriptions_fail_before_any_work(setup):
    model, data = setup
    batch = batch_of(data, 0)
    flags = {m: m.training for m in model.modules()}
    with pytest.raises(SpecError, match="modality 'camera' is passed as 'camera', which MyBEVFusion.forward does "
                                        "not take"):
        make_spec(model, arguments={"lidar": "points"}).check(batch)
    with pytest.raises(SpecError, match="output 'logits' is not a key of the model's output"):
        make_spec(model, output="logits").check(batch)
    with pytest.raises(SpecError, match=r"travels\['camera'\] lists \['lidar2img'\]"):
        make_spec(model, travels={"camera": ("lidar2img",)}).check(batch)
    with pytest.raises(SpecError, match="fusion module 'fusr' is not a module of MyBEVFusion"):
        make_spec(model, fusion="fusr")
    with pytest.raises(SpecError, match="must take one tensor per modality"):
        make_spec(model, fusion="dec").subject("fusion").prepare(batch)
    with pytest.raises(SpecError, match="level='fusion' needs ModelSpec"):
        perturbation_metrics(make_spec(model, fusion=None), data, make_method("lmd:paper"), count=2, stride=1,
                             level="fusion", progress=False)
    assert {m: m.training for m in model.modules()} == flags
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in model.modules())


class ThreeSensorNet(nn.Module):
    """No camera: three raster sensors with names of its own, fused by a module taking a dict."""

    class DictFuser(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.mix = nn.Conv2d(9, 4, 3, padding=1)

        def forward(self, maps: dict) -> torch.Tensor:
            return torch.tanh(self.mix(torch.cat([maps["thermal"], maps["sonar"], maps["lidar"]], 1)))

    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.ModuleDict({k: nn.Conv2d(2, 3, 1) for k in ("thermal", "sonar", "lidar")})
        self.fuser = self.DictFuser()
        self.head = nn.Conv2d(4, 2, 1)

    def forward(self, thermal: torch.Tensor, sonar: torch.Tensor, lidar: torch.Tensor) -> tuple:
        maps = {"thermal": self.enc["thermal"](thermal), "sonar": self.enc["sonar"](sonar),
                "lidar": self.enc["lidar"](lidar)}
        return (self.head(self.fuser(maps)), maps)


def test_three_modalities_without_cameras_tuple_output(tmp_path):
    torch.manual_seed(1)
    model = ThreeSensorNet().eval()
    data = [{k: torch.randn(2, 8, 8) for k in ("thermal", "sonar", "lidar")} for _ in range(5)]
    spec = ModelSpec(model, inputs=lambda b: (dict(b), {}), output=0, fusion="fuser")
    res = perturbation_metrics(spec, data, make_method("lmd:paper", mode="frozen"), count=2, stride=1,
                               anchors=[0, 1], progress=False)
    assert res.modalities == ("thermal", "sonar", "lidar") and len(res.keys) == 9
    assert res.summary()["pcc"]["thermalp/sonar"][0] == pytest.approx(1.0)  # frozen: unperturbed maps fixed
    batch = spec.batch(data, [2])
    d = spec.decompose(batch)
    assert set(d.names) == {"thermal", "sonar", "lidar", "bias"} and d.output.shape == (1, 2, 8, 8)
    shares = modality_shares(d)
    assert set(shares) == {"thermal", "sonar", "lidar"}
    masks = torch.zeros(1, 8, 8, dtype=torch.bool)
    masks[0, 2:4, 3:6] = True
    (row,) = attribute_regions(spec, batch, masks, seen_by=[["sonar"]])
    for m in ("thermal", "sonar", "lidar"):  # summed over both output channels and the six cells
        assert row.scores[m] == pytest.approx(float(d.components[m][0][:, masks[0]].sum()), rel=1e-5, abs=1e-6)
    decomposition_figure(tmp_path / "three.png", {n: d.components[n][0, 0] for n in d.names}, images=None)
    assert (tmp_path / "three.png").stat().st_size > 0
