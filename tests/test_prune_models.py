"""Structured pruning through ``prune(..., structured=True)`` on models written the way others write them (a U-Net
with skip concatenations, a BEV model lifting one feature to three heights and scattering pillars into a canvas
of constant width, a cross-attention fuser, torchvision's densenet121) and on the reference models -- without
``ignored_layers`` -- and the save -> load round trip into a freshly built instance."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from fusionlens.prune import AlterMOMA, load_pruned, prune, save_pruned
from fusionlens.prune.params import call_model, output_tensors
from prune_zoo import AttentionFusion, MyBEVFusion, UNet, attention_inputs, bev_inputs


def _reference(point_encoder: str) -> tuple[Callable[[], nn.Module], dict]:
    """A tiny camera + LiDAR reference model (raster or PointPillars LiDAR, CenterPoint head with pillars)."""
    from fusionlens.data.collate import collate_samples
    from fusionlens.data.sample import BEVGrid
    from fusionlens.experiments.reference import example_inputs
    from fusionlens.models import build_model, preset_config
    from fusionlens.train.synthetic import SyntheticDataset

    grid = BEVGrid(((-16.0, 16.0), (-16.0, 16.0), (-3.0, 3.0)), (16, 16, 2))
    extra: dict[str, Any] = {}
    if point_encoder == "pillars":
        extra = {"point_encoder_kwargs": {"lidar": {"pointnet_channels": [8], "channels": 8}},
                 "extra_heads": {"centerpoint": {}}}
    cfg = preset_config("tiny", "camera,lidar", grid=grid, point_encoders={"lidar": point_encoder}, latent_dim=4,
                        fusion_dim=16, decoder_width=8, head_dim=8, **extra)

    def build() -> nn.Module:
        return build_model(cfg, load_camera_weights=False)

    data = SyntheticDataset(2, grid, image_size=(16, 24))
    torch.manual_seed(0)
    return build, example_inputs(build(), collate_samples([data[0], data[1]]), n=2)


def _zoo(name: str) -> tuple[Callable[[], nn.Module], Any, dict[str, list[str]]]:
    """(constructor, example inputs, AlterMOMA groups as prefixes)."""
    if name == "unet":
        return UNet, torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0)), {
            "shallow": ["enc1", "dec1"], "deep": ["enc2", "dec2"]}
    if name == "bev":
        return MyBEVFusion, bev_inputs(), {"camera": ["img_backbone", "neck"], "lidar": ["point_mlp", "lidar_conv"]}
    if name == "attention":
        return AttentionFusion, attention_inputs(), {"camera": ["cam_stem"], "lidar": ["lidar_stem"]}
    if name == "densenet121":
        from torchvision.models import densenet121

        return densenet121, torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0)), {}
    build, x = _reference(name.removeprefix("reference-"))
    return build, x, {"camera": ["encoders.camera"], "lidar": ["encoders.lidar"]}


def _loss(x: Any) -> Callable[[nn.Module, Any], torch.Tensor]:
    def loss_fn(model: nn.Module, batch: Any) -> torch.Tensor:  # a smooth loss of every output (scores only)
        return sum(t.pow(2).mean() for t in output_tensors(call_model(model, batch)))  # type: ignore[return-value]

    return loss_fn


#: Layers each model must leave whole, with the words of their error: the pillar canvas's constant width.
LEFT_WHOLE = {"bev": {"point_mlp.2": "index"}}

# The reference models are the slow ones (Torch-Pruning's tracing): 50 % of them is covered by SNIP / AlterMOMA.
CASES = [(m, r, "magnitude") for m in ("unet", "bev", "attention") for r in (0.3, 0.5, 0.7)]
CASES += [(m, r, "magnitude") for m in ("reference-raster", "reference-pillars") for r in (0.3, 0.7)]
CASES += [(m, 0.5, meth) for m in ("unet", "bev", "attention", "reference-pillars") for meth in ("snip", "altermoma")]
CASES += [("reference-raster", 0.5, "altermoma")]
CASES += [("densenet121", 0.5, "magnitude")]


@pytest.mark.parametrize(("name", "sparsity", "method"), CASES)
def test_structured_pruning_without_ignored_layers(name: str, sparsity: float, method: str, tmp_path: Path) -> None:
    build, x, groups = _zoo(name)
    torch.manual_seed(0)
    model = build().eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    loss = _loss(x)
    how: Any = method
    if method == "altermoma":
        how = AlterMOMA(loss, [x], groups=groups, reactivation_steps=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = prune(model, how, sparsity, structured=True, example_inputs=x,
                       loss_fn=loss if method == "snip" else None, batches=[x] if method == "snip" else None)
    pruned = result.model.eval()
    report = result.report
    # which layers stayed whole, and why
    expected = LEFT_WHOLE.get(name, {})
    assert set(report["left_whole"]) == set(expected)
    for layer, words in expected.items():
        assert words in report["left_whole"][layer]
    # channels went, outputs kept their shapes, the model given is unchanged
    assert report["n_params_after"] < (1 - 0.5 * sparsity) * report["n_params_before"]
    with warnings.catch_warnings():  # e.g. a parameter-free InstanceNorm whose num_features kept the old width
        warnings.simplefilter("error")
        dense, out = output_tensors(call_model(model, x)), output_tensors(call_model(pruned, x))
    assert [t.shape for t in out] == [t.shape for t in dense] and all(torch.isfinite(t).all() for t in out)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    if method == "altermoma":
        assert set(report["kept_per_group"]) == {*groups, "fusion"}
    # a fresh instance reshaped from the file computes exactly the pruned model's outputs
    save_pruned(pruned, tmp_path / "p.pt", metadata={"sparsity": sparsity})
    torch.manual_seed(1)
    fresh = load_pruned(tmp_path / "p.pt", build()).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again = output_tensors(call_model(fresh, x))
    assert all(torch.equal(a, b) for a, b in zip(again, out))


def test_unet_channel_counts_follow_the_sparsity() -> None:
    """Every conv of the U-Net loses floor(sparsity * C) output channels (the skip concats included), except the
    output layer, and the decoder convs read exactly the concatenated widths."""
    x = torch.randn(1, 3, 16, 16)
    model = UNet(width=8).eval()
    pruned = prune(model, "magnitude", 0.5, structured=True, example_inputs=x).model
    assert [pruned.enc1[0].out_channels, pruned.enc2[0].out_channels, pruned.bottleneck[0].out_channels] == [4, 8, 16]
    assert pruned.up2.out_channels == 8 and pruned.dec2[0].in_channels == 8 + 8
    assert pruned.up1.out_channels == 4 and pruned.dec1[0].in_channels == 4 + 4
    assert pruned.out.out_channels == 2


def test_attention_fuser_keeps_whole_heads() -> None:
    """70 % of 16 channels would leave 5, which 4 heads cannot split: the kept width rounds up to 8."""
    model = AttentionFusion(dim=16, heads=4).eval()
    pruned = prune(model, "magnitude", 0.7, structured=True, example_inputs=attention_inputs()).model
    assert pruned.attn.embed_dim == 8 and pruned.attn.head_dim == 2 and pruned.attn.num_heads == 4


def test_group_norm_keeps_whole_groups() -> None:
    """Half of 12 channels would leave 6, which 4 groups cannot split: the kept width rounds up to 8."""
    model = nn.Sequential(nn.Conv2d(3, 12, 3), nn.GroupNorm(4, 12), nn.ReLU(), nn.Conv2d(12, 5, 1)).eval()
    result = prune(model, "magnitude", 0.5, structured=True, example_inputs=torch.randn(1, 3, 8, 8))
    assert result.model[0].out_channels == result.model[1].num_channels == 8 and result.model[1].num_groups == 4
    assert result.report["left_whole"] == {}


def test_structured_needs_example_inputs_and_load_refuses_other_models(tmp_path: Path) -> None:
    model = UNet().eval()
    with pytest.raises(ValueError, match="example_inputs"):
        prune(model, "magnitude", 0.5, structured=True)
    scored: list[int] = []  # bad inputs and foreign layers fail before any scoring
    loss = lambda m, b: scored.append(1) or m(b).mean()  # noqa: E731
    with pytest.raises(ValueError, match=r"example_inputs do not run through UNet.*RuntimeError"):
        prune(model, "snip", 0.5, structured=True, example_inputs=torch.randn(1, 5, 16, 16), loss_fn=loss,
              batches=[torch.randn(1, 3, 16, 16)])
    with pytest.raises(ValueError, match=r"foreign \['Conv2d'\]"):
        prune(model, "snip", 0.5, structured=True, example_inputs=torch.randn(1, 3, 16, 16),
              ignored_layers=[nn.Conv2d(1, 1, 1)], loss_fn=loss, batches=[torch.randn(1, 3, 16, 16)])
    assert scored == [] and model.training is False
    pruned = prune(model, "magnitude", 0.5, structured=True, example_inputs=torch.randn(1, 3, 16, 16)).model
    save_pruned(pruned, tmp_path / "u.pt")
    with pytest.raises(ValueError, match="saved from .*UNet, not .*AttentionFusion"):
        load_pruned(tmp_path / "u.pt", AttentionFusion())
    other = UNet()
    other.extra = nn.Linear(2, 2)
    with pytest.raises(ValueError, match=r"not the architecture that was pruned.*'extra.weight'"):
        load_pruned(tmp_path / "u.pt", other)
    torch.save({"weights": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a fusionlens-pruned-v1 file"):
        load_pruned(tmp_path / "other.pt", UNet())


def _removed(orig: nn.Module, pruned: nn.Module) -> list[int]:
    """Output channels of ``orig`` that are gone from ``pruned``, matched by their (unique) weights."""
    return [i for i in range(orig.out_channels)
            if not any(torch.equal(orig.weight[i], pruned.weight[j]) for j in range(pruned.out_channels))]


def _only(model: nn.Module, keep: str) -> list[nn.Module]:
    return [m for n, m in model.named_modules() if isinstance(m, (nn.modules.conv._ConvNd, nn.Linear)) and n != keep]


def test_repeated_concatenation_is_exact() -> None:
    """One feature concatenated at three heights: removing its channel j removes neck columns j, C + j and 2C + j
    -- exactly the dense model with those columns zeroed (a mapping of one copy only would differ)."""
    torch.manual_seed(0)
    model, x = MyBEVFusion().eval(), bev_inputs()
    pruned = prune(model, "magnitude", 0.5, structured=True, example_inputs=x,
                   ignored_layers=_only(model, "img_backbone.3")).model.eval()
    gone = _removed(model.img_backbone[3], pruned.img_backbone[3])
    assert len(gone) == 6 and pruned.neck.in_channels == 3 * 6
    ref = MyBEVFusion().eval()
    ref.load_state_dict(model.state_dict())
    with torch.no_grad():
        ref.neck.weight[:, [z * 12 + j for z in range(3) for j in gone]] = 0
    torch.testing.assert_close(pruned(**x)["seg"], ref(**x)["seg"])


def test_unet_skip_concatenation_is_exact() -> None:
    """The first encoder stage feeds the pooled path and, through the skip, the last decoder's concat: removing its
    channel j zeroes exactly enc2's input j and dec1's input column 8 + j (after up1's 8 channels)."""
    torch.manual_seed(0)
    model, x = UNet(width=8).eval(), torch.randn(2, 3, 16, 16)
    pruned = prune(model, "magnitude", 0.5, structured=True, example_inputs=x,
                   ignored_layers=_only(model, "enc1.3")).model.eval()
    gone = _removed(model.enc1[3], pruned.enc1[3])
    assert len(gone) == 4 and pruned.dec1[0].in_channels == 8 + 4 and pruned.enc2[0].in_channels == 4
    ref = UNet(width=8).eval()
    ref.load_state_dict(model.state_dict())
    with torch.no_grad():
        ref.enc2[0].weight[:, gone] = 0
        ref.dec1[0].weight[:, [8 + j for j in gone]] = 0
    torch.testing.assert_close(pruned(x), ref(x))


def test_layers_left_whole_are_named_with_the_fix() -> None:
    """The pillar MLP's output feeds a canvas of constant width: its group is left whole, the user is told which
    layer, why and how to skip the attempt; passing it in ignored_layers gives the same model without the warning."""
    model, x = MyBEVFusion().eval(), bev_inputs()
    with pytest.warns(UserWarning, match=r"point_mlp\.2: removing its channels broke the forward .*ignored_layers"):
        first = prune(model, "magnitude", 0.5, structured=True, example_inputs=x).model
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        second = prune(model, "magnitude", 0.5, structured=True, example_inputs=x,
                       ignored_layers=[model.point_mlp[2]]).model
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), second.state_dict().values()))
