"""Per-modality Seg-Grad-CAM (eqs. 16-19): a hand-computed oracle on a toy fusion net, hooks removed, training
flags restored, the reference model's layer components, and bad layers."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fusionlens.data.collate import collate_samples
from fusionlens.evaluate.gradcam import seg_grad_cam
from fusionlens.models import build_model, preset_config
from fusionlens.spec import ModelSpec, SpecError
from fusionlens.train.synthetic import TEST_GRID, SyntheticDataset

torch.set_num_threads(1)
SMALL = dict(grid=TEST_GRID, latent_dim=4, fusion_dim=8, decoder_width=8, head_dim=8, point_bev_channels=8)


class ToyFusion(nn.Module):
    """A = mix(cat[camera, radar]) (1x1 conv, no bias); seg = head(A) (1x1 conv, weights w)."""

    def __init__(self) -> None:
        super().__init__()
        self.mix = nn.Conv2d(4, 3, 1, bias=False)
        self.head = nn.Conv2d(3, 1, 1, bias=False)

    def forward(self, camera: torch.Tensor, radar: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"seg": self.head(self.mix(torch.cat([camera, radar], 1)))}


def toy_spec(model: nn.Module, output: str = "seg") -> ModelSpec:
    return ModelSpec(model, inputs=lambda batch: (batch, {}), output=output)


def test_hand_computed_modality_cams():
    torch.manual_seed(0)
    model = ToyFusion().eval()
    cam, rad = torch.randn(1, 2, 5, 6), torch.randn(1, 2, 5, 6)
    roi = torch.zeros(1, 1, 5, 6, dtype=torch.bool)
    roi[..., 1:3, 2:5] = True  # |R| = 6 of 30 pixels
    cams = seg_grad_cam(toy_spec(model), {"camera": cam, "radar": rad}, "mix", roi)
    w = model.head.weight[:, :, 0, 0].reshape(3, 1, 1).detach()
    alpha = w * 6 / 30  # d(sum_R y)/dA^k_ij = w_k on R, 0 elsewhere; mean over the 30 pixels
    mix = model.mix.weight[:, :, 0, 0].detach()
    a_cam = torch.einsum("kc,cxy->kxy", mix[:, :2], cam[0])  # the linear layer's camera component
    a_rad = torch.einsum("kc,cxy->kxy", mix[:, 2:], rad[0])
    torch.testing.assert_close(cams["camera"][0], torch.relu((alpha * a_cam).sum(0)), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(cams["radar"][0], torch.relu((alpha * a_rad).sum(0)), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(cams["total"][0], torch.relu((alpha * (a_cam + a_rad)).sum(0)), atol=1e-6, rtol=1e-5)
    assert cams["bias"].abs().max() <= 1e-6  # no constant in this net: only rounding (bias = A - components)


def test_reference_model_hooks_removed_and_flags_restored():
    torch.manual_seed(0)
    model = build_model(preset_config("tiny", "camera,radar", **SMALL)).train()
    batch = collate_samples([SyntheticDataset(1)[0]])
    before = {name: (len(m._forward_hooks), len(m._forward_pre_hooks)) for name, m in model.named_modules()}
    with pytest.warns(UserWarning, match="training mode"):  # decompose evaluates in eval mode and says so
        cams = seg_grad_cam(model, batch, "fusion")
    assert {name: (len(m._forward_hooks), len(m._forward_pre_hooks)) for name, m in model.named_modules()} == before
    assert all(m.training for m in model.modules())
    assert set(cams) == {"camera", "radar", "bias", "total"}
    assert cams["camera"].shape == (1, *TEST_GRID.shape[:2]) and bool((cams["camera"] >= 0).all())
    # relu is subadditive: the total CAM never exceeds the sum of the component CAMs (components sum to A)
    assert bool((cams["total"] <= cams["camera"] + cams["radar"] + cams["bias"] + 1e-5).all())


def test_bad_layers():
    model = ToyFusion()
    batch = {"camera": torch.randn(1, 2, 4, 4), "radar": torch.randn(1, 2, 4, 4)}
    with pytest.raises(ValueError, match="layer 'decoder.nope' not found in ToyFusion"):
        seg_grad_cam(toy_spec(model), batch, "decoder.nope")
    with pytest.raises(SpecError, match="output 'center' is not a key of the model's output"):
        seg_grad_cam(toy_spec(model, "center"), batch, "mix")
    assert all(not m._forward_hooks for m in model.modules())  # removed even after an error
