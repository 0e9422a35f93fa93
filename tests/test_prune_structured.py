"""Structured pruning: channel removal keeps output shapes, and across the modality concatenation it is
exactly equivalent to zeroing the removed channels' columns of the fusion conv (and, in a multi-path encoder
such as PointPillars', the inputs of the encoder layers behind the removed channels)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fusionlens.prune.baselines import MagnitudeImportance
from fusionlens.prune.cost import cost_report
from fusionlens.prune.params import clone_model, prunable_parameters
from fusionlens.prune.structured import concat_mapping, plan_channels, structured_prune
from prune_tiny import TinyFusion


def inputs(size: int = 8) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {
        "camera": torch.randn(2, 2, size, size, generator=gen),
        "lidar": torch.randn(2, 2, size, size, generator=gen),
    }


class LiftedFusion(nn.Module):
    """Like the reference models: one branch is reshaped (C, Z) -> C*Z before the concatenation, which is
    where Torch-Pruning's concat offsets break."""

    def __init__(self) -> None:
        super().__init__()
        self.camera = nn.Sequential(nn.Conv2d(2, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 3, 1))
        self.lidar = nn.Sequential(nn.Conv2d(2, 5, 3, padding=1), nn.BatchNorm2d(5), nn.ReLU())
        self.fuse = nn.Conv2d(3 * 2 + 5, 4, 1)
        self.head = nn.Conv2d(4, 1, 1)

    def forward(self, camera: torch.Tensor, lidar: torch.Tensor) -> dict[str, torch.Tensor]:
        c = self.camera(camera)  # (B, 3, H, W) -> lift: each channel duplicated over Z=2 "height bins"
        lifted = torch.stack([c, 0.5 * c], dim=2).reshape(c.shape[0], -1, *c.shape[-2:])
        return {"seg": self.head(torch.relu(self.fuse(torch.cat([lifted, self.lidar(lidar)], 1))))}


def _oracle(model: nn.Module, removed_columns: list[int]) -> nn.Module:
    """The unpruned model with the fusion conv's removed input columns zeroed."""
    ref = type(model)() if not isinstance(model, TinyFusion) else TinyFusion(width=model.fuse.out_channels, norm=True)
    ref.load_state_dict(model.state_dict())
    with torch.no_grad():
        ref.fuse.weight[:, removed_columns] = 0
    return ref.eval()


def test_concat_case_matches_zeroed_columns_exactly() -> None:
    torch.manual_seed(0)
    model = TinyFusion(width=6, norm=True).eval()
    scores = MagnitudeImportance()(model, prunable_parameters(model))
    ignored = [model.camera[0], model.lidar[0], model.fuse]  # only the producers feeding the concat
    report: dict = {}
    pruned = structured_prune(model, scores, 0.5, inputs(), ignored_layers=ignored, report=report)
    assert pruned.camera[3].out_channels == 3 and pruned.lidar[3].out_channels == 3
    assert pruned.fuse.in_channels == 6
    # which columns went: the lowest-scored output channels of each producer (+ the fuse columns they feed)
    kept_cols = []
    for offset, layer in ((0, model.camera[3]), (6, model.lidar[3])):
        w = layer.weight.detach().abs().sum((1, 2, 3)) + model.fuse.weight.detach().abs()[:, offset : offset + 6].sum(
            (0, 2, 3)
        )
        kept_cols += [offset + int(i) for i in sorted(torch.sort(w, stable=True).indices[3:].tolist())]
    removed = sorted(set(range(12)) - set(kept_cols))
    x = inputs()
    torch.testing.assert_close(pruned(**x)["seg"], _oracle(model, removed)(**x)["seg"])
    assert report["left_whole"] == {}


def test_lifted_concat_is_handled_and_exact() -> None:
    torch.manual_seed(1)
    model = LiftedFusion().eval()
    x = inputs()
    mapping = concat_mapping(model, "camera.2", "fuse", x)
    assert mapping == [[0, 1], [2, 3], [4, 5]]
    assert concat_mapping(model, "lidar.0", "fuse", x) == [[6 + i] for i in range(5)]
    scores = MagnitudeImportance()(model, prunable_parameters(model))
    pruned = structured_prune(model, scores, 0.4, x, ignored_layers=[model.camera[0], model.fuse])
    assert pruned.camera[2].out_channels == 2 and pruned.lidar[0].out_channels == 3
    assert pruned.lidar[1].num_features == 3 and pruned.fuse.in_channels == 2 * 2 + 3
    removed_cam = [c for c in range(3) if c not in _kept_out(model.camera[2], pruned.camera[2])]
    removed_lid = [c for c in range(5) if c not in _kept_out(model.lidar[0], pruned.lidar[0])]
    columns = [2 * c + z for c in removed_cam for z in range(2)] + [6 + c for c in removed_lid]
    ref = LiftedFusion()
    ref.load_state_dict(model.state_dict())
    with torch.no_grad():
        ref.fuse.weight[:, columns] = 0
    torch.testing.assert_close(pruned(**x)["seg"], ref.eval()(**x)["seg"])


def _kept_out(orig: nn.Conv2d, pruned: nn.Conv2d) -> list[int]:
    """Indices of ``orig``'s output channels that survive, matched by their (unique) weights."""
    return [
        i
        for i in range(orig.out_channels)
        if any(torch.equal(orig.weight[i], pruned.weight[j]) for j in range(pruned.out_channels))
    ]


def test_full_structured_pruning_keeps_shapes_and_cuts_cost() -> None:
    torch.manual_seed(2)
    model = TinyFusion(width=8, norm=True).eval()
    x = inputs(16)
    scores = MagnitudeImportance()(model, prunable_parameters(model))
    pruned = structured_prune(model, scores, 0.5, x)
    out = pruned(**x)["seg"]
    assert out.shape == model(**x)["seg"].shape and torch.isfinite(out).all()
    assert pruned.head.out_channels == 1  # output layer untouched
    before, after = cost_report(model, x, repeats=1), cost_report(pruned, x, repeats=1)
    assert after["params"] < before["params"] and after["gflops"] < before["gflops"]
    assert model.camera[0].out_channels == 8  # the input model is untouched


class SkipBranch(nn.Module):
    """A LiDAR branch whose internal paths all meet the fusion concat: a skip (``x``), a residual add
    (``r = x + c(b(x))``, so Torch-Pruning couples ``a`` and ``c``) and an FPN-style upsample-and-concat
    (``u``); the branch *ends* in its own concatenation, as the pillars encoder does."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Sequential(nn.Conv2d(2, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU())
        self.b = nn.Conv2d(6, 6, 3, padding=1)
        self.c = nn.Conv2d(6, 6, 1)
        self.down = nn.Conv2d(6, 8, 3, stride=2, padding=1)
        self.up = nn.Conv2d(8, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.a(x)
        r = x + self.c(torch.relu(self.b(x)))
        u = nn.functional.interpolate(torch.relu(self.down(r)), size=x.shape[-2:], mode="bilinear")
        return torch.cat([x, r, self.up(u)], dim=1)


class SkipFusion(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.camera = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.ReLU())
        self.lidar = SkipBranch()
        self.fuse = nn.Conv2d(4 + 6 + 6 + 4, 4, 1)
        self.head = nn.Conv2d(4, 1, 1)

    def forward(self, camera: torch.Tensor, lidar: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"seg": self.head(torch.relu(self.fuse(torch.cat([self.camera(camera), self.lidar(lidar)], 1))))}


def test_multi_path_branch_is_mapped_per_path_and_exact() -> None:
    """Each fusion-conv column belongs to the one layer that feeds it without another Conv in between: ``a``
    owns ``x``'s columns and (with ``c``, coupled by the add) ``r``'s, never ``u``'s, which are ``up``'s."""
    torch.manual_seed(3)
    model = SkipFusion().eval()
    x = inputs()
    direct = concat_mapping(model, "lidar.a.0", "fuse", x)
    assert direct == [[4 + j, 10 + j] for j in range(6)]  # x and, through the add, r; not u (behind down/up)
    assert concat_mapping(model, "lidar.c", "fuse", x) == [[10 + j] for j in range(6)]
    assert concat_mapping(model, "lidar.c", "fuse", x, coupled={"lidar.a.0": [[j] for j in range(6)]}) == direct
    assert concat_mapping(model, "lidar.up", "fuse", x) == [[16 + k] for k in range(4)]
    scores = MagnitudeImportance()(model, prunable_parameters(model))
    lid = model.lidar
    pruned = structured_prune(model, scores, 0.5, x, ignored_layers=[lid.b, lid.down, model.fuse])
    p = pruned.lidar
    assert p.a[0].out_channels == p.c.out_channels == p.a[1].num_features == p.b.in_channels == p.down.in_channels == 3
    assert p.up.out_channels == 2 and pruned.camera[0].out_channels == 2 and pruned.fuse.in_channels == 2 + 3 + 3 + 2
    gone_a = [j for j in range(6) if j not in _kept_out(lid.a[0], p.a[0])]
    assert gone_a == [j for j in range(6) if j not in _kept_out(lid.c, p.c)]  # coupled: the same channels
    gone_up = [k for k in range(4) if k not in _kept_out(lid.up, p.up)]
    gone_cam = [k for k in range(4) if k not in _kept_out(model.camera[0], pruned.camera[0])]
    ref = SkipFusion()
    ref.load_state_dict(model.state_dict())
    with torch.no_grad():  # the oracle: every consumer's input slice of a removed channel zeroed
        columns = gone_cam + [4 + j for j in gone_a] + [10 + j for j in gone_a] + [16 + k for k in gone_up]
        ref.fuse.weight[:, columns] = 0
        ref.lidar.b.weight[:, gone_a] = 0
        ref.lidar.down.weight[:, gone_a] = 0
    torch.testing.assert_close(pruned(**x)["seg"], ref.eval()(**x)["seg"])
    full = structured_prune(model, scores, 0.5, x).lidar  # every group (output shapes are checked inside)
    assert (full.a[0].out_channels, full.b.out_channels, full.down.out_channels, full.up.out_channels) == (3, 3, 4, 2)


def _pillars_model() -> tuple[nn.Module, dict]:
    """A tiny camera + PointPillars-LiDAR reference model with non-trivial BatchNorms, and example inputs."""
    from decompose_zoo import randomise_norm_stats
    from fusionlens.data.collate import collate_samples
    from fusionlens.data.sample import BEVGrid
    from fusionlens.experiments.reference import example_inputs
    from fusionlens.models import build_model, preset_config
    from fusionlens.train.synthetic import SyntheticDataset

    grid = BEVGrid(((-16.0, 16.0), (-16.0, 16.0), (-3.0, 3.0)), (16, 16, 2))
    torch.manual_seed(0)
    cfg = preset_config(
        "tiny",
        "camera,lidar",
        grid=grid,
        point_encoders={"lidar": "pillars"},
        point_encoder_kwargs={"lidar": {"pointnet_channels": [8], "channels": 8}},
        latent_dim=4,
        fusion_dim=16,
        decoder_width=8,
        head_dim=8,
    )
    model = randomise_norm_stats(build_model(cfg)).eval()
    data = SyntheticDataset(2, grid, image_size=(16, 24))
    return model, example_inputs(model, collate_samples([data[0], data[1]]), n=2)


@pytest.mark.parametrize("ratio", [0.3, 0.5])
def test_pillars_lidar_model_prunes_consistently_and_exactly(ratio: float) -> None:
    """The pillars' block1 reaches the fusion conv directly and through block2/up2: its fusion-conv columns
    are its direct ones only, so no column is removed twice (was: ``ValueError: 48 is not in list``)."""
    model, x = _pillars_model()
    enc, z = model.encoders["lidar"], 2
    assert concat_mapping(model, "encoders.lidar.block1.0", "fusion.conv", x) == [[4 * z + j] for j in range(8)]
    scores = MagnitudeImportance()(model, prunable_parameters(model))
    keep = {c: c - int(ratio * c) for c in (4, 8)}

    pruned = structured_prune(model, scores, ratio, x)  # every group
    p = pruned.encoders["lidar"]
    assert p.block1[0].out_channels == p.up2[0].out_channels == keep[8] and p.block2[0].in_channels == keep[8]
    assert p.block2[0].out_channels == p.up2[0].in_channels == p.block2[1].num_features == 16 - int(ratio * 16)
    assert p.block1[0].in_channels == p.pointnet[0].out_features == p.pointnet[1].num_features == keep[8]
    assert pruned.encoders["camera"].project.out_channels == keep[4]
    bev = pruned.bev_features(**x)
    assert bev["lidar"].shape[1] == 2 * keep[8] and bev["camera"].shape[1] == keep[4] * z
    assert pruned.fusion.conv.in_channels == keep[4] * z + 2 * keep[8]
    out, dense = pruned(**x), model(**x)
    assert all(out[k].shape == dense[k].shape and torch.isfinite(out[k]).all() for k in dense)
    before, after = cost_report(model, x, repeats=1), cost_report(pruned, x, repeats=1)
    assert after["params"] < before["params"] and after["gflops"] < before["gflops"]

    # only the layers feeding the fusion concat: exactly the dense model with the removed channels' inputs zeroed
    feeding = {"encoders.camera.project", "encoders.lidar.block1.0", "encoders.lidar.up2.0"}
    ignored = [m for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear)) and n not in feeding]
    plan, _ = plan_channels(clone_model(model), scores, ratio, x)
    across = {e.module: e.columns for e in plan if e.consumer == "fusion.conv"}
    assert across.keys() == feeding  # block1 and up2 planned apart: not fused by the branch-final concat
    assert set(across["encoders.lidar.block1.0"]) <= set(range(4 * z, 4 * z + 8))
    assert set(across["encoders.lidar.up2.0"]) <= set(range(4 * z + 8, 4 * z + 16))
    pruned = structured_prune(model, scores, ratio, x, ignored_layers=ignored)
    p, cam = pruned.encoders["lidar"], model.encoders["camera"].project
    gone_cam = [j for j in range(4) if j not in _kept_out(cam, pruned.encoders["camera"].project)]
    gone_b1 = [j for j in range(8) if j not in _kept_out(enc.block1[0], p.block1[0])]
    gone_up = [j for j in range(8) if j not in _kept_out(enc.up2[0], p.up2[0])]
    assert (len(gone_cam), len(gone_b1), len(gone_up)) == (4 - keep[4], 8 - keep[8], 8 - keep[8])
    columns = [j * z + h for j in gone_cam for h in range(z)] + [4 * z + j for j in gone_b1]
    columns += [4 * z + 8 + j for j in gone_up]
    ref = clone_model(model)
    with torch.no_grad():
        ref.fusion.conv.weight[:, columns] = 0
        ref.encoders["lidar"].block2[0].weight[:, gone_b1] = 0
    want = ref.eval()(**x)
    got = pruned(**x)
    for key in want:
        torch.testing.assert_close(got[key], want[key])
