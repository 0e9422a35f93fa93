"""Oracles for boxes -> BEV label maps (hand-computed cell counts, offsets, heatmap values)."""

from __future__ import annotations

import math

import pytest
import torch

from fusionlens.data.labels import box_footprint_mask, boxes_to_bev
from fusionlens.data.sample import CLASSES, BEVGrid

# 1 m cells, centres at -3.5 ... 3.5 on both axes.
GRID = BEVGrid(bounds=((-4.0, 4.0), (-4.0, 4.0), (-1.0, 1.0)), shape=(8, 8, 1))
CAR, PED = CLASSES.index("car"), CLASSES.index("pedestrian")


def box(x: float, y: float, w: float, l: float, yaw: float = 0.0, vx: float = 0.0) -> list[float]:
    return [x, y, 0.8, w, l, 1.6, yaw, vx, 0.0]


def test_axis_aligned_box_covers_hand_counted_cells() -> None:
    out = boxes_to_bev(torch.tensor([box(0, 0, 2, 4)]), torch.tensor([CAR]), GRID)
    seg = out["seg"]
    # |x| <= 2 holds for centres -1.5..1.5 (ix 2..5); |y| <= 1 for -0.5, 0.5 (iy 3, 4).
    expected = torch.zeros(8, 8)
    expected[2:6, 3:5] = 1
    assert torch.equal(seg, expected)
    assert torch.equal(out["valid"], torch.ones(8, 8))


def test_rotation_by_quarter_turn_swaps_axes() -> None:
    out = boxes_to_bev(torch.tensor([box(0, 0, 2, 4, yaw=math.pi / 2)]), torch.tensor([CAR]), GRID)
    expected = torch.zeros(8, 8)
    expected[3:5, 2:6] = 1
    assert torch.equal(out["seg"], expected)


def test_offsets_point_to_the_centre_and_heatmap_is_gaussian() -> None:
    sigma = 1.5
    out = boxes_to_bev(torch.tensor([box(0.5, 0.5, 2, 2)]), torch.tensor([CAR]), GRID, center_sigma=sigma)
    seg, off, cen = out["seg"], out["offset"], out["center"]
    xs = GRID.cell_centres(0)
    for ix in range(8):
        for iy in range(8):
            if seg[ix, iy]:
                assert off[0, ix, iy].item() == pytest.approx(0.5 - xs[ix].item())
                assert off[1, ix, iy].item() == pytest.approx(0.5 - xs[iy].item())
            else:
                assert off[:, ix, iy].abs().sum() == 0
    assert cen[4, 4].item() == 1.0  # the centre's own cell peaks at 1
    d2 = (xs[6].item() - 0.5) ** 2 + (xs[4].item() - 0.5) ** 2
    assert cen[6, 4].item() == pytest.approx(math.exp(-d2 / (2 * sigma**2)), rel=1e-5)


def test_pedestrians_are_not_segmented_and_invalid_vehicles_are_masked() -> None:
    boxes = torch.tensor([box(-2, -2, 0.7, 0.7), box(2, 2, 2, 2)])
    out = boxes_to_bev(boxes, torch.tensor([PED, CAR]), GRID, invalid=torch.tensor([False, True]))
    assert out["seg"].sum() == 0
    assert out["center"].sum() == 0
    expected_valid = torch.ones(8, 8)
    expected_valid[5:7, 5:7] = 0  # centres 1.5, 2.5 lie within 2 +- 1
    assert torch.equal(out["valid"], expected_valid)


def test_thin_box_still_marks_its_centre_cell() -> None:
    out = boxes_to_bev(torch.tensor([box(0.1, 0.1, 0.2, 0.2)]), torch.tensor([CAR]), GRID)
    assert out["seg"].sum() == 1 and out["seg"][4, 4] == 1


def test_overlapping_boxes_assign_cells_to_the_nearest_centre() -> None:
    boxes = torch.tensor([box(-0.5, 0.0, 2, 4), box(1.0, 0.0, 2, 4)])
    out = boxes_to_bev(boxes, torch.tensor([CAR, CAR]), GRID)
    # Cell centre x = 0.5 is covered by both; |0.5 - 1.0| < |0.5 + 0.5| so the second box owns it.
    assert out["offset"][0, 4, 3].item() == pytest.approx(0.5)


def test_footprint_mask_matches_point_tests() -> None:
    boxes = torch.tensor([box(1, 1, 2, 4, yaw=0.3)])
    pts = torch.tensor([[1.0, 1.0], [1 + 1.9 * math.cos(0.3), 1 + 1.9 * math.sin(0.3)], [1.0, 2.5]])
    assert box_footprint_mask(boxes, pts)[0].tolist() == [True, True, False]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"boxes": torch.zeros(2, 7)}, "boxes must be"),
        ({"labels": torch.zeros(3, dtype=torch.long)}, "labels must be"),
        ({"center_sigma": 0.0}, "center_sigma"),
        ({"invalid": torch.zeros(5, dtype=torch.bool)}, "invalid must be"),
        ({"vehicle_classes": ("car", "spaceship")}, "spaceship"),
    ],
)
def test_bad_input_names_the_setting(kwargs: dict, match: str) -> None:
    args = {"boxes": torch.tensor([box(0, 0, 2, 4), box(2, 2, 2, 4)]), "labels": torch.tensor([CAR, CAR])}
    args.update(kwargs)
    boxes, labels = args.pop("boxes"), args.pop("labels")
    with pytest.raises(ValueError, match=match):
        boxes_to_bev(boxes, labels, GRID, **args)
