"""No silent all-bias answers: modalities that reach the output through no value-carrying op are reported, complex
intermediate results (FFTs) are decomposed, ops without a rule raise naming the model's source line; ``names=``."""

from __future__ import annotations

import inspect
import warnings

import pytest
import torch
from torch import nn

from fusionlens import decompose
from fusionlens.decompose import ModalityNotReachedWarning, UnsupportedOperationError


class VoxelizingFusion(nn.Module):
    """Raw LiDAR points voxelized inside the model, as people write it: points out of range dropped by a norm
    threshold, integer cell indices from the coordinates, an occupancy count per cell; fused with a camera map."""

    def __init__(self, grid: int = 4) -> None:
        super().__init__()
        self.grid = grid
        self.cam = nn.Conv2d(3, 4, 1)
        self.fuse = nn.Conv2d(5, 2, 3, padding=1)

    def occupancy(self, lidar: torch.Tensor) -> torch.Tensor:
        keep = (lidar[..., :3].norm(dim=-1) < 3.0).float()
        cell = (lidar[..., :2].clamp(0, 0.999) * self.grid).floor().long()
        flat = cell[..., 0] * self.grid + cell[..., 1]
        counts = torch.zeros(lidar.shape[0], self.grid * self.grid).scatter_add(1, flat, keep)
        return counts.view(-1, 1, self.grid, self.grid)

    def forward(self, camera: torch.Tensor, lidar: torch.Tensor) -> torch.Tensor:
        return self.fuse(torch.cat([self.cam(camera), self.occupancy(lidar)], 1))


class GivenOccupancy(VoxelizingFusion):
    def forward(self, camera: torch.Tensor, lidar: torch.Tensor) -> torch.Tensor:
        return self.fuse(torch.cat([self.cam(camera), lidar], 1))


@pytest.mark.parametrize("bias", ["local", "global"])
def test_points_voxelized_inside_the_model_are_reported_with_the_fix(bias):
    g = torch.Generator().manual_seed(0)
    model = VoxelizingFusion().eval()
    inputs = {"camera": torch.randn(2, 3, 4, 4, generator=g), "lidar": torch.rand(2, 20, 4, generator=g)}
    with pytest.warns(ModalityNotReachedWarning, match=r"modality 'lidar' reaches the output only through ops that "
                      r"carry none of its values \(first: op '\w+' in the model's own forward.*"
                      r"pass the voxelized tensor"):
        d = decompose(model, inputs, bias=bias)
    assert torch.equal(d.components["lidar"], torch.zeros_like(d.output)) and d.components["camera"].abs().max() > 0
    assert d.conservation_error().relative <= 1e-6
    # the fix the message names: the voxelized tensor as the modality input -- no warning, a LiDAR component
    fixed = GivenOccupancy().eval()
    fixed.load_state_dict(model.state_dict())
    given = {"camera": inputs["camera"], "lidar": model.occupancy(inputs["lidar"])}
    with warnings.catch_warnings():
        warnings.simplefilter("error", ModalityNotReachedWarning)
        d = decompose(fixed, given, bias=bias)
    assert d.components["lidar"].abs().max() > 1e-3
    torch.testing.assert_close(d.output, model(**inputs))


def test_unused_input_is_reported_and_a_dead_activation_is_not():
    class IgnoresRadar(nn.Module):
        def forward(self, camera, radar):
            return camera * 2

    with pytest.warns(ModalityNotReachedWarning, match="'radar' does not reach the output: the model does not use"):
        decompose(IgnoresRadar().eval(), {"camera": torch.ones(2), "radar": torch.ones(2)})

    class Dead(nn.Module):  # the radar's values do reach the ReLU; it is off at this input
        def forward(self, camera, radar):
            return torch.relu(radar) + camera

    with warnings.catch_warnings():
        warnings.simplefilter("error", ModalityNotReachedWarning)
        d = decompose(Dead().eval(), {"camera": torch.ones(2), "radar": -torch.ones(2)})
    assert torch.equal(d.components["radar"], torch.zeros(2))


class Spectral(nn.Module):
    """Frequency-domain fusion: FFT, complex products with a constant filter, view_as_real / view_as_complex,
    the magnitude spectrum, and back."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("filter", torch.randn(8, dtype=torch.complex128, generator=torch.Generator()
                                                   .manual_seed(3)))

    def forward(self, camera, radar):
        spectrum = torch.fft.fft(camera + 2 * radar) * self.filter
        pairs = torch.view_as_real(spectrum) * 0.5
        back = torch.fft.ifft(torch.view_as_complex(pairs.contiguous()))
        return back.real + back.imag + torch.fft.rfft(camera - radar).abs().sum(-1, keepdim=True)


def test_fft_and_complex_views_are_decomposed_not_dropped():
    """Linear spectral ops: with every constant in the bias, component m is the directional derivative (JVP) of the
    model along h_m -- exact for the linear part, Euler's identity for the magnitude; nothing lands in the bias."""
    g = torch.Generator().manual_seed(0)
    cam, rad = (torch.randn(3, 8, generator=g, dtype=torch.float64) for _ in range(2))
    model = Spectral().eval()
    d = decompose(model, {"camera": cam, "radar": rad}, bias="global")
    _, j_cam = torch.func.jvp(lambda c: model(c, rad), (cam,), (cam,))
    _, j_rad = torch.func.jvp(lambda r: model(cam, r), (rad,), (rad,))
    torch.testing.assert_close(d.components["camera"], j_cam, rtol=0, atol=1e-12)
    torch.testing.assert_close(d.components["radar"], j_rad, rtol=0, atol=1e-12)
    assert d.components["bias"].abs().max() < 1e-12  # a homogeneous model: no constant at all


def test_op_without_a_rule_names_the_source_line_and_complex_results_are_never_constants():
    line = {}

    class Phase(nn.Module):
        def forward(self, camera, radar):
            line["phase"] = inspect.currentframe().f_lineno + 1
            return torch.angle(torch.fft.fft(camera + radar))  # complex in, no rule: an error, not a constant

    with pytest.raises(UnsupportedOperationError, match=r"no LMD rule for op 'angle' in the model's own forward "
                       r"\(outside any submodule\) at .*test_decompose_silent.py:\d+") as caught:
        decompose(Phase().eval(), {"camera": torch.randn(4), "radar": torch.randn(4)})
    assert str(caught.value).split("; ")[0].endswith(f"test_decompose_silent.py:{line['phase']}")

    class Wrapped(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = Phase()

        def forward(self, camera, radar):
            return self.inner(camera, radar)

    with pytest.raises(UnsupportedOperationError, match=r"in module 'inner' at .*test_decompose_silent.py:\d+"):
        decompose(Wrapped().eval(), {"camera": torch.randn(4), "radar": torch.randn(4)})


def test_integer_results_are_constants_and_values_still_flow():
    """Comparisons and indices are piecewise constant (truly constants at the operating point); the values they
    select still carry their components."""
    class Gather(nn.Module):
        def forward(self, camera, radar):
            x = camera + radar
            return x.gather(-1, x.argmax(-1, keepdim=True)) * (x > 0).any(-1, keepdim=True)

    g = torch.Generator().manual_seed(0)
    cam, rad = torch.randn(3, 5, generator=g), torch.randn(3, 5, generator=g)
    d = decompose(Gather().eval(), {"camera": cam, "radar": rad})
    idx = (cam + rad).argmax(-1, keepdim=True)
    torch.testing.assert_close(d.components["camera"], cam.gather(-1, idx))
    torch.testing.assert_close(d.components["radar"], rad.gather(-1, idx))


def test_names_with_dict_inputs():
    class Two(nn.Module):
        def forward(self, cam_bev, pts_bev):
            return cam_bev * 2 + pts_bev

    inputs = {"cam_bev": torch.ones(2), "pts_bev": torch.full((2,), 3.0)}
    d = decompose(Two().eval(), inputs, names=["camera", "lidar"])
    assert d.names == ["camera", "lidar", "bias"] and torch.equal(d.components["lidar"], inputs["pts_bev"])
    assert torch.equal(d.components["camera"], 2 * inputs["cam_bev"])
    for bad in (["camera"], "camera", ["camera", "lidar", "radar"]):
        with pytest.raises(ValueError, match="one modality name per input of the dict"):
            decompose(Two().eval(), inputs, names=bad)


def test_log_softmax_head_is_linearized_not_a_constant():
    """A classifier ending in log_softmax: component m = h_m - <softmax(A), h_m> (its Jacobian at A), by hand --
    before, log_softmax was a constant and the whole output went to the bias."""
    class Classifier(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.logits = nn.Linear(6, 4)

        def forward(self, camera, radar):
            return torch.log_softmax(self.logits(torch.cat([camera, radar], -1)), dim=-1)

    g = torch.Generator().manual_seed(0)
    model = Classifier().double().eval()
    cam, rad = torch.randn(3, 4, generator=g, dtype=torch.float64), torch.randn(3, 2, generator=g, dtype=torch.float64)
    d = decompose(model, {"camera": cam, "radar": rad})
    w = model.logits.weight
    p = torch.softmax(model.logits(torch.cat([cam, rad], -1)), -1)
    for name, h in (("camera", cam @ w[:, :4].T), ("radar", rad @ w[:, 4:].T)):
        torch.testing.assert_close(d.components[name], h - (p * h).sum(-1, keepdim=True), rtol=0, atol=1e-12)
    assert d.conservation_error().relative <= 1e-13
