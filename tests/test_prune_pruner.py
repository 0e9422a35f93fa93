"""The global pruner, masks, export, fine-tuning with fixed masks and bad-input errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fusionlens.prune.baselines import MagnitudeImportance, RandomImportance
from fusionlens.prune.params import prunable_parameters, resolve_groups
from fusionlens.prune.pruner import (
    dense_state_dict,
    finetune,
    get_masks,
    global_masks,
    prune_with_scores,
    sparsity_report,
)
from prune_tiny import TinyFusion, make_batches, tiny_loss


@pytest.mark.parametrize("rho", [0.0, 0.3, 0.8, 0.85, 0.9, 0.999])
def test_global_threshold_hits_sparsity_exactly(rho: float) -> None:
    gen = torch.Generator().manual_seed(0)
    scores = {"a": torch.rand(7, 3, generator=gen), "b": torch.rand(11, generator=gen)}
    masks = global_masks(scores, rho)
    n = 7 * 3 + 11
    assert sum(int((~m).sum()) for m in masks.values()) == round(rho * n)
    # everything kept scores at least as high as everything pruned (Algorithm 1, line 9)
    kept = torch.cat([scores[k][masks[k]] for k in scores])
    pruned = torch.cat([scores[k][~masks[k]] for k in scores])
    if len(pruned) and len(kept):
        assert kept.min() >= pruned.max()


def test_ties_are_broken_by_position() -> None:
    scores = {"a": torch.zeros(4), "b": torch.zeros(4)}
    masks = global_masks(scores, 0.5)
    assert masks["a"].tolist() == [False] * 4 and masks["b"].tolist() == [True] * 4


def test_pruned_model_is_plain_pytorch_and_exports() -> None:
    torch.manual_seed(0)
    model = TinyFusion(norm=True)
    names = prunable_parameters(model)
    assert names == [
        "camera.0.weight",
        "camera.3.weight",
        "lidar.0.weight",
        "lidar.3.weight",
        "fuse.weight",
        "head.weight",
    ]
    scores = MagnitudeImportance()(model, names)
    pruned = prune_with_scores(model, scores, 0.8)
    assert not get_masks(model)  # the input model is untouched
    masks = get_masks(pruned)
    assert set(masks) == set(names)
    report = sparsity_report(pruned, names)
    total = sum(model.get_parameter(n).numel() for n in names)
    assert report["n_zero"] == round(0.8 * total)
    dense = dense_state_dict(pruned)
    assert set(dense) == set(model.state_dict())  # the original architecture's keys
    fresh = TinyFusion(norm=True)
    fresh.load_state_dict(dense)
    batch = make_batches(1)[0]
    fresh.eval()
    pruned.eval()
    torch.testing.assert_close(
        fresh(batch["camera"], batch["lidar"])["seg"], pruned(batch["camera"], batch["lidar"])["seg"]
    )
    for n in names:
        assert torch.equal(dense[n] == 0, ~masks[n] | (model.get_parameter(n) == 0))
        # masks are applied to the initial parameters (Algorithm 1, line 10)
        torch.testing.assert_close(dense[n], model.get_parameter(n).detach() * masks[n])


def test_masks_stay_fixed_through_finetuning() -> None:
    torch.manual_seed(1)
    model = TinyFusion()
    names = prunable_parameters(model)
    pruned = prune_with_scores(model, RandomImportance(3)(model, names), 0.85)
    before = get_masks(pruned)
    weights_before = {n: pruned.get_parameter(n + "_orig").detach().clone() for n in names}
    losses = finetune(pruned, tiny_loss, make_batches(4), steps=10, lr=1e-2)
    assert len(losses) == 10
    after = get_masks(pruned)
    for n in names:
        assert torch.equal(before[n], after[n])
        mod, _, attr = n.rpartition(".")
        effective = getattr(pruned.get_submodule(mod), attr)
        assert torch.all(effective[~after[n]] == 0)
    # training did happen on the kept weights
    assert any(
        not torch.equal(weights_before[n][before[n]], pruned.get_parameter(n + "_orig")[before[n]]) for n in names
    )
    assert sparsity_report(pruned, names)["sparsity"] >= 0.85 - 1e-3


@pytest.mark.parametrize("rho", [1.0, -0.1, float("nan"), "x"])
def test_bad_sparsity_is_rejected_before_work(rho: object) -> None:
    with pytest.raises(ValueError, match="sparsity"):
        global_masks({"a": torch.rand(3)}, rho)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="sparsity"):
        prune_with_scores(TinyFusion(), {}, rho)  # type: ignore[arg-type]


def test_groups_from_model_and_prefixes() -> None:
    model = TinyFusion()
    groups = resolve_groups(model)
    assert set(groups.modalities) == {"camera", "lidar"}
    assert groups.fusion == ("fuse.weight", "fuse.bias", "head.weight", "head.bias")
    by_prefix = resolve_groups(model, {"camera": ["camera"], "lidar": "lidar"})
    assert by_prefix == groups  # fusion defaults to every parameter not in a modality


def test_group_errors() -> None:
    model = TinyFusion()
    with pytest.raises(ValueError, match="'radar'.*matches no parameter"):
        resolve_groups(model, {"camera": ["camera"], "radar": ["radar_encoder"]})
    with pytest.raises(ValueError, match="at least two modality groups"):
        resolve_groups(model, {"camera": ["camera"]})
    with pytest.raises(ValueError, match="in groups 'a' and 'b'"):
        resolve_groups(model, {"a": ["camera"], "b": ["camera.0"]})
    plain = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 1))
    with pytest.raises(ValueError, match="no modality_groups"):
        resolve_groups(plain)


def test_scores_must_match_parameters() -> None:
    model = TinyFusion()
    with pytest.raises(ValueError, match="unknown parameter"):
        prune_with_scores(model, {"nope.weight": torch.rand(3)}, 0.5)
    with pytest.raises(ValueError, match="shape"):
        prune_with_scores(model, {"fuse.weight": torch.rand(3)}, 0.5)
    with pytest.raises(ValueError, match="not finite"):
        prune_with_scores(model, {"fuse.weight": torch.full_like(model.fuse.weight, float("nan"))}, 0.5)


def test_report_splits_the_kept_budget_by_group() -> None:
    from fusionlens.prune.api import prune

    torch.manual_seed(0)
    model = TinyFusion(norm=True)
    result = prune(model, "magnitude", 0.8)
    masks = get_masks(result.model)
    groups = resolve_groups(model).restrict(masks)
    expected = {
        group: sum(int(masks[n].sum()) for n in members) / sum(masks[n].numel() for n in members)
        for group, members in {**groups.modalities, "fusion": groups.fusion}.items()
    }
    assert result.report["kept_per_group"] == pytest.approx(expected)
    total = sum(m.numel() for m in masks.values())
    kept = sum(expected[g] * sum(masks[n].numel() for n in members)
               for g, members in {**groups.modalities, "fusion": groups.fusion}.items())
    assert kept / total == pytest.approx(0.2, abs=1 / total)
