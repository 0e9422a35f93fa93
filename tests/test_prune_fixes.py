"""The library call's contracts: IMP scores the trained weights, AlterMOMA groups given on the instance are honoured
(by ``prune`` and in ``kept_per_group``), ProsPr's first momentum term is detached as in the public code, the loss
function is checked on the first batch, scoring shows progress, and unstructured models save and load."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from fusionlens.prune import IMP, AlterMOMA, ProsPr, get_masks, load_pruned, prune, save_pruned
from fusionlens.prune.params import prunable_parameters
from prune_tiny import TinyFusion, make_batches, tiny_loss
from test_prune_scores import (
    NAMES,
    LinearFusion,
    assert_scores_are_mask_derivatives,
    hand_grads,
    hand_loss_after_inner_step,
    loss_fn,
    make,
    weights,
)


def test_imp_one_round_one_step_scores_the_trained_weights() -> None:
    """1 round x 1 step: the scores are |theta after one Adam step|, not the untrained |theta_init| that the
    attribute torch.nn.utils.prune refreshes only on a forward pass still holds."""
    model, batch = make(7)
    lr = 0.05
    scores = IMP(loss_fn, [batch], rounds=1, steps_per_round=1, lr=lr)(model, NAMES, 0.5)
    oracle = LinearFusion().double()
    oracle.load_state_dict(model.state_dict())
    opt = torch.optim.Adam(oracle.parameters(), lr=lr)
    loss_fn(oracle, batch).backward()
    opt.step()
    for n in NAMES:
        trained = oracle.get_parameter(n).detach().abs()
        torch.testing.assert_close(scores[n], trained)
        assert not torch.allclose(scores[n], model.get_parameter(n).detach().abs())


def test_altermoma_groups_on_the_instance_are_honoured() -> None:
    """A model without modality_groups(): the instance's prefix groups are used, and kept_per_group reports
    exactly the kept fraction of those groups' weights (counted from the masks)."""
    model, batch = make(3)
    assert not hasattr(model, "modality_groups")
    groups = {"camera": ["camera"], "lidar": ["lidar"]}
    result = prune(model, AlterMOMA(loss_fn, [batch], groups=groups, reactivation_steps=1), 0.5)
    masks = get_masks(result.model)
    kept = result.report["kept_per_group"]
    assert set(kept) == {"camera", "lidar", "fusion"}
    for group, names in (("camera", ["camera.weight"]), ("lidar", ["lidar.weight"]), ("fusion", ["fuse.weight"])):
        assert kept[group] == pytest.approx(sum(float(masks[n].sum()) for n in names) / sum(masks[n].numel()
                                                                                             for n in names))
    # groups on the instance win over the model's own modality_groups(): here the fusion conv joins "b"
    tiny = TinyFusion()
    b = make_batches(2)
    result = prune(tiny, AlterMOMA(tiny_loss, b, groups={"a": ["camera"], "b": ["lidar", "fuse"]},
                                   reactivation_steps=1), 0.5)
    assert set(result.report["kept_per_group"]) == {"a", "b", "fusion"}
    with pytest.raises(ValueError, match="either to the AlterMOMA instance or to prune"):
        prune(tiny, AlterMOMA(tiny_loss, b, groups={"a": ["camera"], "b": ["lidar"]}), 0.5, groups={"x": ["camera"]})


@pytest.mark.parametrize("detach", [True, False])
def test_prospr_first_momentum_detached_by_default(detach: bool) -> None:
    model, batch = make(4)
    lr, eps = 0.1, 1e-6
    scores = ProsPr(loss_fn, [batch], inner_steps=1, inner_lr=lr, momentum=0.9, detach_first_momentum=detach)(
        model, NAMES
    )
    frozen = hand_grads(*weights(model), batch) if detach else None
    assert_scores_are_mask_derivatives(
        scores, model, lambda c: hand_loss_after_inner_step(model, batch, c, lr, frozen), eps)
    assert ProsPr(loss_fn, [batch]).detach_first_momentum  # the default follows the public code


def test_loss_fn_is_checked_on_the_first_batch() -> None:
    torch.manual_seed(0)
    model = TinyFusion(norm=True).train()
    batches = make_batches(2)
    running = model.camera[1].running_mean.clone()

    def criterion(outputs, batch):  # noqa: ANN001, ANN202 -- the mistake: a criterion of the outputs
        return (outputs["seg"] - batch["target"]).pow(2).mean()

    with pytest.raises(TypeError, match=r"loss_fn\(model, batch\).*named 'outputs'"):
        prune(model, "snip", 0.5, loss_fn=criterion, batches=batches)
    with pytest.raises(TypeError, match=r"loss_fn\(model, batch\).*not subscriptable"):
        prune(model, "snip", 0.5, loss_fn=lambda a, b: a["seg"].mean(), batches=batches)
    with pytest.raises(TypeError, match="returned dict"):
        prune(model, "snip", 0.5, loss_fn=lambda m, b: {"seg": tiny_loss(m, b)}, batches=batches)
    with pytest.raises(TypeError, match="does not depend on the model's parameters"):
        prune(model, "snip", 0.5, loss_fn=lambda m, b: tiny_loss(m, b).detach(), batches=batches)
    with pytest.raises(TypeError, match="fine-tuning|loss_fn"):  # the fine-tuning loss is checked too
        prune(model, "magnitude", 0.5, loss_fn=criterion, batches=batches, finetune_steps=1)
    assert torch.equal(model.camera[1].running_mean, running) and model.training  # the check left no trace


def test_scoring_shows_progress(capsys: pytest.CaptureFixture) -> None:
    model = TinyFusion()
    prune(model, "snip", 0.5, loss_fn=tiny_loss, batches=make_batches(2), n_batches=2, progress=True)
    assert "score (snip)" in capsys.readouterr().err


def test_unstructured_save_load_round_trip(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = TinyFusion(norm=True)
    batches = make_batches(3)
    pruned = prune(model, "snip", 0.7, loss_fn=tiny_loss, batches=batches, finetune_steps=2).model.eval()
    path = save_pruned(pruned, tmp_path / "p.pt", metadata={"method": "snip"})
    plain = load_pruned(path, TinyFusion(norm=True)).eval()
    assert not get_masks(plain)  # masks folded into plain weights
    masked = load_pruned(path, TinyFusion(norm=True), masks=True).eval()
    assert {k: v.tolist() for k, v in get_masks(masked).items()} == {k: v.tolist() for k, v in
                                                                   get_masks(pruned).items()}
    b = batches[0]
    want = pruned(b["camera"], b["lidar"])["seg"]
    assert torch.equal(plain(b["camera"], b["lidar"])["seg"], want)
    assert torch.equal(masked(b["camera"], b["lidar"])["seg"], want)
    for n in prunable_parameters(model):
        assert torch.equal(plain.get_parameter(n) == 0, ~get_masks(pruned)[n] | (plain.get_parameter(n) == 0))
    with pytest.raises(ValueError, match="freshly built model"):
        load_pruned(path, pruned)
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_pruned(tmp_path / "missing.pt", TinyFusion(norm=True))


def test_sequential_model_without_groups_reports_no_split() -> None:
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    result = prune(model, "magnitude", 0.5)
    assert "kept_per_group" not in result.report and result.report["sparsity"] == pytest.approx(0.5, abs=0.02)
