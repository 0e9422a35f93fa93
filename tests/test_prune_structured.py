"""Structured pruning: channel removal keeps output shapes, and across the modality concatenation it is
exactly equivalent to zeroing the removed channels' columns of the fusion conv."""

from __future__ import annotations

import torch
from torch import nn

from fusionlens.prune.baselines import MagnitudeImportance
from fusionlens.prune.cost import cost_report
from fusionlens.prune.params import prunable_parameters
from fusionlens.prune.structured import concat_mapping, structured_prune
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
    assert report["left_whole"] == []


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
