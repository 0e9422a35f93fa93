"""LMD on torchvision's classifiers and segmenters as their authors wrote them (random weights, float64): the image
split into two modalities (left / right half) with ``modality_mask``. The whole list runs as a benchmark
(``benchmarks/decompose_torchvision.py``); here one model of each family, the transformers at reduced widths
(same code paths: attention, window shifts, cosine attention, relative position bias)."""

from __future__ import annotations

import time
from functools import partial

import pytest
import torch
import torchvision
from torchvision.models import maxvit, swin_transformer, vision_transformer

from fusionlens import decompose

NAMES = ["left", "right"]


def _swin(v2: bool) -> torch.nn.Module:
    extra = ({"block": swin_transformer.SwinTransformerBlockV2, "downsample_layer": swin_transformer.PatchMergingV2}
             if v2 else {})
    return swin_transformer.SwinTransformer(patch_size=[4, 4], embed_dim=16, depths=[2, 2], num_heads=[2, 4],
                                            window_size=[4, 4], num_classes=5, **extra)


def _vit() -> torch.nn.Module:
    model = vision_transformer.VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=16,
                                                 mlp_dim=32, num_classes=5)
    torch.nn.init.normal_(model.heads.head.weight, std=0.1)  # torchvision starts it at zero: an all-bias output
    return model


MODELS = {
    "resnet18": (partial(torchvision.models.resnet18, num_classes=5), 32),
    "mobilenet_v3_small": (partial(torchvision.models.mobilenet_v3_small, num_classes=5), 32),  # hardswish, SE
    "efficientnet_b0": (partial(torchvision.models.efficientnet_b0, num_classes=5), 32),  # SiLU, sigmoid gates
    "densenet121": (partial(torchvision.models.densenet121, num_classes=5), 32),
    "googlenet": (partial(torchvision.models.googlenet, num_classes=5, aux_logits=False, init_weights=True), 64),
    "shufflenet_v2_x0_5": (partial(torchvision.models.shufflenet_v2_x0_5, num_classes=5), 32),
    "squeezenet1_1": (partial(torchvision.models.squeezenet1_1, num_classes=5), 48),
    "regnet_y_400mf": (partial(torchvision.models.regnet_y_400mf, num_classes=5), 32),
    "convnext": (partial(torchvision.models.convnext.ConvNeXt, [torchvision.models.convnext.CNBlockConfig(16, 32, 2),
                                                                torchvision.models.convnext.CNBlockConfig(32, None, 2)],
                         num_classes=5), 32),
    "vit": (_vit, 32),
    "swin": (partial(_swin, v2=False), 32),
    "swin_v2": (partial(_swin, v2=True), 32),
    "maxvit": (partial(maxvit.MaxVit, input_size=(32, 32), stem_channels=8, partition_size=2, block_channels=[16],
                       block_layers=[1], head_dim=8, stochastic_depth_prob=0.0, num_classes=5), 32),
    "lraspp_mobilenet_v3_large": (partial(torchvision.models.segmentation.lraspp_mobilenet_v3_large, num_classes=3,
                                          weights_backbone=None), 32),
    "deeplabv3_mobilenet_v3_large": (partial(torchvision.models.segmentation.deeplabv3_mobilenet_v3_large,
                                             num_classes=3, weights_backbone=None), 32),
}


def _out(x):
    return x["out"] if isinstance(x, dict) else x


@pytest.mark.parametrize("name", sorted(MODELS))
def test_torchvision_model_split_in_two(name):
    """Conserves to 1e-9 relative (float64) with the model's own output, no component beyond 1e3 x the output (a
    linearization blowing up), and the separation of appendix D.2: under the coefficients frozen at the clean
    image, changing the right half leaves the left half's component exactly as it was."""
    build, size = MODELS[name]
    torch.manual_seed(0)
    model = build().double().eval()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 3, size, size, generator=g, dtype=torch.float64)
    mask = (torch.arange(size) >= size // 2).long().view(1, 1, 1, size)
    start = time.perf_counter()
    d = decompose(model, x, modality_mask=mask, names=NAMES, record_coefficients=True)
    assert time.perf_counter() - start < 20
    with torch.no_grad():  # to rounding: nn.MultiheadAttention skips its fused kernel for a decomposed input
        torch.testing.assert_close(_out(d.output), _out(model(x)), rtol=1e-12, atol=1e-12)
    assert d.conservation_error().relative <= 1e-9
    scale = _out(d.output).abs().max()
    assert all(_out(d.components[n]).abs().max() <= 1e3 * scale for n in NAMES)
    assert _out(d.components["left"]).abs().max() > 0 and _out(d.components["right"]).abs().max() > 0
    other = torch.where(mask.bool(), torch.randn(x.shape, generator=g, dtype=torch.float64), x)
    moved = decompose(model, other, modality_mask=mask, names=NAMES, coefficients=d.coefficients)
    torch.testing.assert_close(_out(moved.components["left"]), _out(d.components["left"]), rtol=0, atol=0)
