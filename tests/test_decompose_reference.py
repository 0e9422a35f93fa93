"""LMD on fusionlens's own reference models (SimpleBEV-style camera lifting, radar/LiDAR rasterisation or
PointPillars, InstanceNorm + GELU fusion, BatchNorm decoder): conservation, separation, layer capture."""

from __future__ import annotations

import pytest
import torch

from decompose_zoo import randomise_norm_stats
from fusionlens import decompose
from fusionlens.data.collate import collate_samples
from fusionlens.models import batch_to_inputs, build_model, preset_config
from fusionlens.train.synthetic import TEST_GRID, SyntheticDataset

SMALL = dict(grid=TEST_GRID, latent_dim=4, fusion_dim=8, decoder_width=8, head_dim=8, point_bev_channels=8)


def _model_and_batch(mods: str, seed: int = 0, **overrides):
    torch.manual_seed(0)
    model = randomise_norm_stats(build_model(preset_config("tiny", mods, **{**SMALL, **overrides}))).eval()
    data = SyntheticDataset(4, seed=seed)
    inputs, kwargs = batch_to_inputs(model, collate_samples([data[i] for i in range(2)]))
    return model, inputs, kwargs


@pytest.mark.parametrize("mods, overrides", [
    ("camera,radar", {}),
    ("camera,lidar", {}),
    ("camera,radar,lidar", {}),
    ("camera,lidar", {"point_encoders": {"lidar": "pillars"}}),
], ids=["camera-radar", "camera-lidar", "three-modalities", "camera-lidar-pillars"])
def test_reference_models_conserve(mods, overrides):
    model, inputs, kwargs = _model_and_batch(mods, **overrides)
    d = decompose(model, inputs, forward_kwargs=kwargs, layers=["fusion"])
    reference = model(**inputs, **kwargs)
    for key in ("seg", "center", "offset"):
        assert torch.equal(d.output[key], reference[key])
    assert d.conservation_error().relative <= 1e-5  # NaN guard (conservation holds by construction)
    assert d.names == [*mods.split(","), "bias"]
    fused = d.layer("fusion")
    assert (sum(fused[n] for n in d.names) - fused["total"]).abs().max() <= 1e-5 * fused["total"].abs().max()


@pytest.mark.parametrize("overrides", [{}, {"point_encoders": {"lidar": "pillars"}}], ids=["raster", "pillars"])
def test_reference_model_global_bias_nan_guard(overrides):
    """The reference models decompose with bias="global" without NaN or inf (the bias is the output minus the
    modalities, so conservation holds by construction; the rules' values: test_decompose_oracles.py)."""
    model, inputs, kwargs = _model_and_batch("camera,lidar", **overrides)
    d = decompose(model, inputs, forward_kwargs=kwargs, bias="global")
    assert d.conservation_error().relative <= 1e-5


def test_swapping_radar_keeps_camera_component_under_frozen_coefficients():
    model, inputs, kwargs = _model_and_batch("camera,radar")
    _, other, other_kwargs = _model_and_batch("camera,radar", seed=7)
    clean = decompose(model, inputs, forward_kwargs=kwargs, record_coefficients=True)
    swapped_inputs = {"camera": inputs["camera"], "radar": other["radar"]}
    swapped_kwargs = {**kwargs, "radar_valid": other_kwargs["radar_valid"]}
    frozen = decompose(model, swapped_inputs, forward_kwargs=swapped_kwargs, coefficients=clean.coefficients)
    torch.testing.assert_close(frozen.components["camera"]["seg"], clean.components["camera"]["seg"], rtol=0, atol=0)
    assert not torch.allclose(frozen.components["radar"]["seg"], clean.components["radar"]["seg"])
