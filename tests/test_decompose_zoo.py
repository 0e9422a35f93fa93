"""LMD on a zoo of models: conservation (sum of components = output), JVP oracle, separation."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._pytree import tree_flatten

from decompose_zoo import (
    EarlyFusionNet,
    InstanceNormUNet,
    PiecewiseLinearFusion,
    PillarScatterFusion,
    SelectionFusion,
    TokenFusionTransformer,
    mobilenet_camera,
    randomise_norm_stats,
    resnet_camera,
)
from fusionlens import decompose
from fusionlens.decompose import PRESETS, UnsupportedOperationError

FLOAT32_REL, FLOAT64_ABS = 1e-5, 1e-12


def nan_guard(d, tol: float = FLOAT32_REL) -> None:
    """The components sum to the output. A NaN guard only: the bias is the output minus the modalities, so this
    holds by construction and fails on NaN or inf alone; the components' values are checked against oracles
    (test_decompose_oracles.py, the JVP test below, test_decompose_rules.py)."""
    assert d.conservation_error().relative <= tol


def _camera_radar(batch: int = 2, size: int = 32, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return {"camera": torch.randn(batch, 3, size, size, generator=g, dtype=dtype),
            "radar": torch.randn(batch, 5, generator=g, dtype=dtype)}


@pytest.mark.parametrize("bias", ["local", "global"])
@pytest.mark.parametrize("make", [lambda: resnet_camera(18), lambda: resnet_camera(50), mobilenet_camera],
                         ids=["resnet18", "resnet50", "mobilenet_v3_small"])
def test_torchvision_camera_branch_conserves(make, bias):
    model = make()
    inputs = _camera_radar(size=64 if bias == "global" else 32)
    d = decompose(model, inputs, bias=bias)
    assert torch.equal(d.output, model(**inputs))  # the total *is* the model's output
    nan_guard(d)
    assert set(d.components) == {"camera", "radar", "bias"}


def test_float64_resnet18_nan_guard():
    """NaN guard in float64 (see :func:`nan_guard`); the values: test_piecewise_linear_components_equal_jvp."""
    model = resnet_camera(18).double()
    d = decompose(model, _camera_radar(dtype=torch.float64), bias="global")
    assert d.conservation_error().absolute <= FLOAT64_ABS


@pytest.mark.parametrize("make", [PiecewiseLinearFusion, lambda: resnet_camera(18)], ids=["cnn", "resnet18"])
def test_piecewise_linear_components_equal_jvp(make):
    """For a locally linear network with every constant in the bias, component m = J_m x_m (torch.func.jvp)."""
    model = randomise_norm_stats(make()).double().eval()
    g = torch.Generator().manual_seed(3)
    cam = torch.randn(2, 3, 16, 16, generator=g, dtype=torch.float64)
    rad = (torch.randn(2, 2, 16, 16, generator=g, dtype=torch.float64) if isinstance(model, PiecewiseLinearFusion)
           else torch.randn(2, 5, generator=g, dtype=torch.float64))
    d = decompose(model, {"camera": cam, "radar": rad}, bias="global")

    def f(c, r):
        return model(camera=c, radar=r)

    _, j_cam = torch.func.jvp(f, (cam, rad), (cam, torch.zeros_like(rad)))
    _, j_rad = torch.func.jvp(f, (cam, rad), (torch.zeros_like(cam), rad))
    torch.testing.assert_close(d.components["camera"], j_cam, rtol=0, atol=1e-10)
    torch.testing.assert_close(d.components["radar"], j_rad, rtol=0, atol=1e-10)
    torch.testing.assert_close(d.components["bias"], d.output - j_cam - j_rad, rtol=0, atol=1e-10)


@pytest.mark.parametrize("explicit", [False, True], ids=["sdpa", "softmax"])
def test_transformer_block(explicit):
    model = TokenFusionTransformer().eval()
    g = torch.Generator().manual_seed(0)
    inputs = {"camera": torch.randn(2, 5, 6, generator=g), "radar": torch.randn(2, 3, 4, generator=g)}
    d = decompose(model, inputs, forward_kwargs={"explicit": explicit})
    assert torch.equal(d.output, model(**inputs, explicit=explicit))
    nan_guard(d)


@pytest.mark.parametrize("rules", sorted(p for p in PRESETS if p not in ("activations-only", "norms-only")))
def test_unet_dict_output_every_conserving_preset_runs(rules):  # output structure, NaN guard
    model = InstanceNormUNet().eval()
    g = torch.Generator().manual_seed(0)
    inputs = {"camera": torch.randn(1, 3, 16, 16, generator=g), "radar": torch.randn(1, 2, 16, 16, generator=g)}
    d = decompose(model, inputs, rules=rules)
    assert set(d.output) == {"seg", "offset"} and set(d.components["radar"]) == {"seg", "offset"}
    nan_guard(d)


def test_ablation_rows_differ_from_full_linearization():
    """The ablation rows push each component through the original nonlinear layer; the mismatch that leaves is
    re-absorbed by the bias at the next linearized activation (activations-only) or is simply lost (naive)."""
    model = InstanceNormUNet().eval()
    inputs = {"camera": torch.randn(1, 3, 16, 16), "radar": torch.randn(1, 2, 16, 16)}
    full = decompose(model, inputs)
    for rules in ("activations-only", "norms-only", "naive"):
        d = decompose(model, inputs, rules=rules)
        torch.testing.assert_close(d.output["seg"], model(**inputs)["seg"])
        assert (d.components["camera"]["seg"] - full.components["camera"]["seg"]).abs().max() > 1e-3
    assert decompose(model, inputs, rules="naive").conservation_error().relative > 1e-4


def test_early_fusion_with_modality_mask():
    model = EarlyFusionNet().eval()
    x = torch.randn(2, 5, 8, 8)
    mask = torch.tensor([0, 0, 0, 1, 1]).view(1, 5, 1, 1)
    d = decompose(model, x, modality_mask=mask, names=["camera", "radar"])
    assert d.names == ["camera", "radar", "bias"]
    nan_guard(d)
    # the camera channels alone make the camera component: changing radar channels under frozen coefficients
    frozen = decompose(model, x, modality_mask=mask, names=["camera", "radar"], record_coefficients=True)
    x2 = x.clone()
    x2[:, 3:] = torch.randn(2, 2, 8, 8)
    moved = decompose(model, x2, modality_mask=mask, names=["camera", "radar"], coefficients=frozen.coefficients)
    torch.testing.assert_close(moved.components["camera"], frozen.components["camera"], rtol=0, atol=0)


@pytest.mark.parametrize("with_radar", [False, True], ids=["camera-lidar", "three-modalities"])
def test_pillar_scatter_and_three_modalities(with_radar):
    model = PillarScatterFusion(with_radar=with_radar).eval()
    g = torch.Generator().manual_seed(0)
    inputs = {"camera": torch.randn(2, 3, 8, 8, generator=g), "lidar": torch.rand(2, 30, 4, generator=g)}
    if with_radar:
        inputs["radar"] = torch.randn(2, 2, 8, 8, generator=g)
    for bias in ("local", "global"):
        d = decompose(model, inputs, bias=bias)
        assert torch.equal(d.output, model(**inputs))
        nan_guard(d)
        assert len(d.names) == len(inputs) + 1


@pytest.mark.parametrize("rules", ["paper", "sum-splitting", "ratio-splitting", "bn-uniform+norm-identity"])
def test_separation_under_frozen_fusion_coefficients(rules):
    """Appendix D.2's property: with the coefficients fixed at the clean input, replacing the radar input leaves
    the camera component unchanged, and the radar component moves — for every rule variant, bias splitting
    included (its shares are frozen with the slopes)."""
    model = InstanceNormUNet().eval()
    g = torch.Generator().manual_seed(0)
    cam, rad, other = (torch.randn(1, c, 16, 16, generator=g) for c in (3, 2, 2))
    clean = decompose(model, {"camera": cam, "radar": rad}, rules=rules, record_coefficients=True)
    swapped = decompose(model, {"camera": cam, "radar": other}, rules=rules, coefficients=clean.coefficients)
    torch.testing.assert_close(swapped.components["camera"]["seg"], clean.components["camera"]["seg"], rtol=0, atol=0)
    assert (swapped.components["radar"]["seg"] - clean.components["radar"]["seg"]).abs().max() > 1e-3
    nan_guard(swapped)  # the bias takes the rest of the new output
    recomputed = decompose(model, {"camera": cam, "radar": other}, rules=rules)
    nan_guard(recomputed)


def test_layer_capture_matches_output_of_module():
    model = InstanceNormUNet().eval()
    inputs = {"camera": torch.randn(1, 3, 16, 16), "radar": torch.randn(1, 2, 16, 16)}
    d = decompose(model, inputs, layers=["down1", "up.0"])
    captured = d.layer("down1")
    total = sum(captured[n] for n in d.names)
    torch.testing.assert_close(total, captured["total"], rtol=1e-5, atol=1e-5)
    expected = model.down1(torch.cat([inputs["camera"], inputs["radar"]], 1))
    torch.testing.assert_close(captured["total"], expected)
    with pytest.raises(KeyError, match="not captured"):
        d.layer("down2")


def _batch_cases():
    g = torch.Generator().manual_seed(5)

    def two(c_cam: int, c_rad: int, size: int = 8):
        return lambda b: {"camera": torch.randn(b, c_cam, size, size, generator=g),
                          "radar": torch.randn(b, c_rad, size, size, generator=g)}

    def tokens(b):
        return {"camera": torch.randn(b, 5, 6, generator=g), "radar": torch.randn(b, 3, 4, generator=g)}

    mask = torch.tensor([0, 0, 0, 1, 1]).view(1, 5, 1, 1)
    unet = InstanceNormUNet().eval()
    return {
        **{f"unet-{r}": (unet, two(3, 2, 16), {"rules": r})
           for r in ("paper", "sum-splitting", "ratio-splitting", "bn-uniform+norm-uniform")},
        "piecewise-linear-global": (randomise_norm_stats(PiecewiseLinearFusion()).eval(), two(3, 2, 16),
                                    {"bias": "global"}),
        "selections": (SelectionFusion().eval(), two(3, 2), {}),
        "transformer-sdpa": (TokenFusionTransformer().eval(), tokens, {}),
        "transformer-softmax": (TokenFusionTransformer().eval(), tokens, {"forward_kwargs": {"explicit": True}}),
        "early-fusion-mask": (EarlyFusionNet().eval(), lambda b: torch.randn(b, 5, 8, 8, generator=g),
                              {"modality_mask": mask, "names": ["camera", "radar"]}),
    }


def _sample(inputs, i):
    return inputs[i:i + 1] if isinstance(inputs, torch.Tensor) else {k: v[i:i + 1] for k, v in inputs.items()}


def _assert_rows(together, alone, i):
    for name in together.names:
        for a, b in zip(tree_flatten(together.components[name])[0], tree_flatten(alone.components[name])[0]):
            torch.testing.assert_close(a[i:i + 1], b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", sorted(_batch_cases()))
def test_batch_replays_through_one_samples_coefficients(case):
    """Coefficients recorded on one sample replay on a batch: each row equals that sample replayed alone (slopes,
    norm statistics and bias shares broadcast; pooling/top-k indices, selection masks, softmax weights and product
    operands are expanded), the output is the model's own, and the components still sum to it."""
    model, make, kwargs = _batch_cases()[case]
    clean = decompose(model, make(1), record_coefficients=True, **kwargs)
    assert clean.coefficients.batch == 1
    batch = make(3)
    together = decompose(model, batch, coefficients=clean.coefficients, **kwargs)
    nan_guard(together)
    for i in range(3):
        _assert_rows(together, decompose(model, _sample(batch, i), coefficients=clean.coefficients, **kwargs), i)
    moved = 0.0
    for a, b in zip(tree_flatten(together.components["radar"])[0], tree_flatten(clean.components["radar"])[0]):
        moved = max(moved, (a[1:2] - b).abs().max().item())
    assert moved > 1e-4  # the rows really are other inputs, not the recorded one


@pytest.mark.parametrize("case", sorted(_batch_cases()))
def test_batch_decomposes_every_sample_as_alone(case):
    """Every rule acts per sample (norm statistics per sample, per-neuron slopes and bias splits), so decomposing a
    batch equals decomposing its samples one by one -- what batched perturbation metrics rely on."""
    model, make, kwargs = _batch_cases()[case]
    batch = make(3)
    together = decompose(model, batch, **kwargs)
    for i in range(3):
        _assert_rows(together, decompose(model, _sample(batch, i), **kwargs), i)


def test_coefficients_replay_errors_and_copies():
    model = SelectionFusion().eval()
    g = torch.Generator().manual_seed(0)
    two = {"camera": torch.randn(2, 3, 8, 8, generator=g), "radar": torch.randn(2, 2, 8, 8, generator=g)}
    tape = decompose(model, two, record_coefficients=True).coefficients
    assert tape.batch == 2 and isinstance(tape, list)
    assert copy.deepcopy(tape).batch == 2 and pickle.loads(pickle.dumps(tape)).batch == 2
    decompose(model, two, coefficients=tape)  # the same batch size: as before
    with pytest.raises(ValueError, match="recorded on a batch of 2"):
        decompose(model, {k: torch.cat([v, v[:1]]) for k, v in two.items()}, coefficients=tape)

    class MixesSamples(nn.Module):  # pools across the batch: one sample's indices cannot serve a batch
        def forward(self, camera, radar):
            return F.max_pool1d((camera[:, :2] + radar).reshape(1, 1, -1), 2)

    one = {k: v[:1] for k, v in two.items()}
    tape = decompose(MixesSamples().eval(), one, record_coefficients=True).coefficients
    with pytest.raises(RuntimeError, match="does not broadcast"):
        decompose(MixesSamples().eval(), two, coefficients=tape)


@pytest.mark.parametrize("case", sorted(_batch_cases()))
def test_replay_without_the_output_gives_the_same_components(case):
    """``with_output=False`` follows only the shapes of the operating point (meta tensors): the modality
    components of the frozen system are those of a replay with the output, bit for bit, on one sample and on a
    batch; there is no output and no bias."""
    model, make, kwargs = _batch_cases()[case]
    clean = decompose(model, make(1), record_coefficients=True, **kwargs)
    for inputs in (make(1), make(3)):
        full = decompose(model, inputs, coefficients=clean.coefficients, **kwargs)
        lite = decompose(model, inputs, coefficients=clean.coefficients, with_output=False, **kwargs)
        assert lite.output is None and lite.names == full.names[:-1] and set(lite.components) == set(lite.names)
        for name in lite.names:
            for a, b in zip(tree_flatten(lite.components[name])[0], tree_flatten(full.components[name])[0]):
                assert torch.equal(a, b)


class ValueDependentFusion(nn.Module):
    """Fused-part code that needs more than shapes: a boolean-mask index (a constant mask: the op runs for real on
    zeros for its shape), tensors made on the input's device, and optionally a value read into Python."""

    def __init__(self, read: bool = False) -> None:
        super().__init__()
        self.read = read
        self.fuse = nn.Linear(5, 6)

    def forward(self, camera, radar):
        x = torch.relu(self.fuse(torch.cat([camera, radar], -1)))
        if self.read and x.sum().item() > 0:
            x = 2 * x
        ramp = torch.arange(x.shape[-1], device=x.device, dtype=x.dtype)
        return (x * ramp)[x > 0.05].sum() + x.mean()


def test_replay_without_the_output_handles_value_dependent_shapes_and_refuses_value_reads():
    g = torch.Generator().manual_seed(2)
    clean_inputs = {"camera": torch.randn(1, 3, generator=g), "radar": torch.randn(1, 2, generator=g)}
    other = {"camera": torch.randn(1, 3, generator=g), "radar": torch.randn(1, 2, generator=g)}
    model = ValueDependentFusion().eval()
    clean = decompose(model, clean_inputs, record_coefficients=True, layers=["fuse"])
    full = decompose(model, other, coefficients=clean.coefficients, layers=["fuse"])
    lite = decompose(model, other, coefficients=clean.coefficients, with_output=False, layers=["fuse"])
    for name in lite.names:
        torch.testing.assert_close(lite.components[name], full.components[name], rtol=0, atol=0)
        torch.testing.assert_close(lite.layer("fuse")[name], full.layer("fuse")[name], rtol=0, atol=0)
    assert "total" not in lite.layer("fuse")
    with pytest.raises(ValueError, match="no output"):
        lite.conservation_error()
    reads = ValueDependentFusion(read=True).eval()
    clean = decompose(reads, clean_inputs, record_coefficients=True)
    with pytest.raises(UnsupportedOperationError, match="reads the values"):
        decompose(reads, other, coefficients=clean.coefficients, with_output=False)
    decompose(reads, other, coefficients=clean.coefficients)  # with the output it runs
    for bad in ({}, {"coefficients": clean.coefficients, "record_coefficients": True},
                {"coefficients": clean.coefficients, "rules": "naive"}):
        with pytest.raises(ValueError, match="with_output=False"):
            decompose(model, other, with_output=False, **bad)
