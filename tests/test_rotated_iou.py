"""Rotated BEV IoU and NMS: hand-worked overlaps, invariances, agreement with the axis-aligned IoU, decoding."""

from __future__ import annotations

import math

import pytest
import torch
from torchvision.ops import batched_nms, box_iou

from fusionlens.data.sample import BEVGrid
from fusionlens.models.centerpoint import REG_OUTPUTS, decode_detections
from fusionlens.models.rotated_iou import box_corners_bev, rotated_iou_bev, rotated_nms

GRID = BEVGrid(((-16.0, 16.0), (-16.0, 16.0), (-3.0, 3.0)), (32, 32, 2))  # 1 m cells


def _box(x: float, y: float, w: float, l: float, yaw: float = 0.0) -> list[float]:
    return [x, y, 0.0, w, l, 1.5, yaw, 0.0, 0.0]


def _iou(a: list[float], b: list[float]) -> float:
    return rotated_iou_bev(torch.tensor([a], dtype=torch.float64), torch.tensor([b], dtype=torch.float64)).item()


def _aabb(boxes: torch.Tensor) -> torch.Tensor:
    corners = box_corners_bev(boxes)
    return torch.cat([corners.amin(dim=1), corners.amax(dim=1)], dim=1)


def test_corners_follow_box_convention() -> None:
    # l along the heading, w across; counter-clockwise from the front-left corner
    corners = box_corners_bev(torch.tensor([_box(1.0, 2.0, 2.0, 4.0), _box(0.0, 0.0, 2.0, 4.0, math.pi / 2)]))
    assert corners[0].tolist() == [[3.0, 3.0], [-1.0, 3.0], [-1.0, 1.0], [3.0, 1.0]]
    assert corners[1] == pytest.approx(torch.tensor([[-1.0, 2.0], [-1.0, -2.0], [1.0, -2.0], [1.0, 2.0]]))
    with pytest.raises(ValueError, match="BOX_FIELDS"):
        box_corners_bev(torch.zeros(3, 5))


def test_hand_worked_ious() -> None:
    square = _box(0.3, -0.2, 2.0, 2.0)
    assert _iou(square, square) == pytest.approx(1.0)
    octagon = 8 * (math.sqrt(2) - 1)  # a 2x2 square and its 45-degree turn meet in a regular octagon
    assert _iou(square, _box(0.3, -0.2, 2.0, 2.0, math.pi / 4)) == pytest.approx(octagon / (8 - octagon))
    assert _iou(_box(0, 0, 1.0, 2.0), _box(0, 0, 1.0, 2.0, math.pi / 2)) == pytest.approx(1 / 3)
    assert _iou(_box(0, 0, 1.0, 2.0), _box(0, 0, 2.0, 1.0, math.pi / 2)) == pytest.approx(1.0)  # w, l swap
    assert _iou(_box(0, 0, 1.0, 1.0), _box(0.5, 0, 1.0, 1.0)) == pytest.approx(1 / 3)
    assert _iou(_box(0, 0, 1.0, 1.0), _box(3.0, 0, 1.0, 1.0, 0.3)) == 0.0
    assert _iou(_box(0, 0, 1.0, 1.0), _box(1.0, 0, 1.0, 1.0)) == pytest.approx(0.0, abs=1e-12)  # touching
    contained = _iou(_box(0, 0, 4.0, 4.0), _box(0.5, 0.5, 1.0, 1.0, 0.7))
    assert contained == pytest.approx(1 / 16)


def test_degenerate_boxes_and_shapes() -> None:
    flat, point, box = _box(0, 0, 0.0, 2.0, 0.4), _box(0, 0, 0.0, 0.0), _box(0, 0, 1.0, 1.0)
    for a, b in ((flat, box), (box, flat), (point, box), (box, point), (flat, flat), (point, point)):
        assert _iou(a, b) == 0.0
    empty = rotated_iou_bev(torch.zeros(0, 9), torch.zeros(3, 9))
    assert empty.shape == (0, 3) and empty.dtype == torch.float32
    with pytest.raises(ValueError, match="negative"):
        rotated_iou_bev(torch.tensor([_box(0, 0, -1.0, 1.0)]), torch.tensor([box]))


def _random_boxes(n: int, generator: torch.Generator, yaw: bool = True) -> torch.Tensor:
    boxes = torch.zeros(n, 9, dtype=torch.float64)
    boxes[:, :2] = torch.rand(n, 2, generator=generator, dtype=torch.float64) * 6 - 3
    boxes[:, 3:5] = torch.rand(n, 2, generator=generator, dtype=torch.float64) * 4 + 0.2
    if yaw:
        boxes[:, 6] = (torch.rand(n, generator=generator, dtype=torch.float64) * 2 - 1) * math.pi
    return boxes


def test_symmetry_and_rigid_invariance() -> None:
    g = torch.Generator().manual_seed(0)
    a, b = _random_boxes(40, g), _random_boxes(30, g)
    iou = rotated_iou_bev(a, b)
    assert ((iou >= 0) & (iou <= 1 + 1e-12)).all() and (iou > 0.05).sum() > 20
    assert torch.allclose(iou, rotated_iou_bev(b, a).T, atol=1e-12)
    assert torch.allclose(rotated_iou_bev(a, a).diagonal(), torch.ones(40, dtype=torch.float64))
    theta, shift = 0.83, torch.tensor([105.0, -47.0], dtype=torch.float64)
    rot = torch.tensor([[math.cos(theta), -math.sin(theta)], [math.sin(theta), math.cos(theta)]], dtype=torch.float64)

    def moved(boxes: torch.Tensor) -> torch.Tensor:
        out = boxes.clone()
        out[:, :2] = boxes[:, :2] @ rot.T + shift
        out[:, 6] = boxes[:, 6] + theta
        return out

    assert torch.allclose(rotated_iou_bev(moved(a), moved(b)), iou, atol=1e-9)


def test_matches_axis_aligned_iou_at_yaw_zero() -> None:
    g = torch.Generator().manual_seed(1)
    a, b = _random_boxes(50, g, yaw=False), _random_boxes(40, g, yaw=False)
    expected = box_iou(_aabb(a), _aabb(b))
    assert (expected > 0).sum() > 100
    assert torch.allclose(rotated_iou_bev(a, b), expected, atol=1e-12)
    f32 = rotated_iou_bev(a.float(), b.float())
    assert f32.dtype == torch.float32 and torch.allclose(f32, expected.float(), atol=1e-5)


def _diagonal_pair() -> torch.Tensor:
    """Two 6 x 1 m boxes at 45 degrees, side by side 1.41 m apart: disjoint, but their enclosing squares
    (4.95 m wide, offset 1 m in x and y) have IoU 0.47."""
    d = math.pi / 4
    return torch.tensor([_box(0.0, 0.0, 1.0, 6.0, d), _box(-1.0, 1.0, 1.0, 6.0, d)])


def test_rotated_nms() -> None:
    boxes = torch.tensor([_box(0, 0, 2.0, 4.5, 0.5), _box(0.1, 0.05, 2.0, 4.5, 0.55), _box(8, 0, 2.0, 4.5)])
    scores = torch.tensor([0.6, 0.9, 0.3])
    labels = torch.zeros(3, dtype=torch.long)
    assert rotated_nms(boxes, scores, labels, 0.5).tolist() == [1, 2]  # the near-duplicate goes, by score
    assert rotated_nms(boxes, scores, torch.tensor([0, 1, 0]), 0.5).tolist() == [1, 0, 2]  # class-wise
    same = torch.tensor([_box(0, 0, 2.0, 4.5, 1.0)] * 2)
    assert rotated_nms(same, torch.tensor([0.4, 0.7]), torch.tensor([3, 5]), 0.1).tolist() == [1, 0]
    diagonal, scores2, labels2 = _diagonal_pair(), torch.tensor([0.9, 0.8]), torch.zeros(2, dtype=torch.long)
    assert rotated_nms(diagonal, scores2, labels2, 0.2).tolist() == [0, 1]
    assert batched_nms(_aabb(diagonal), scores2, labels2, 0.2).tolist() == [0]  # aabb over-suppresses
    empty = rotated_nms(torch.zeros(0, 9), torch.zeros(0), torch.zeros(0, dtype=torch.long), 0.5)
    assert empty.dtype == torch.long and empty.shape == (0,)


def test_decode_with_rotated_nms() -> None:
    out = {name: torch.zeros(1, ch, 32, 32) for name, ch in REG_OUTPUTS.items()}
    heat = torch.full((1, 2, 32, 32), -10.0)
    # a duplicate pair of 4 m squares 2 m apart (IoU 1/3), and two 8 x 1 m boxes at 45 degrees, 2.83 m apart
    # side by side (disjoint; their enclosing squares, 6.36 m wide and offset 2 m in x and y, have IoU 0.31)
    heat[0, 0, 10, 10], heat[0, 0, 10, 12], heat[0, 0, 22, 20], heat[0, 0, 20, 22] = 3.0, 2.0, 2.5, 1.5
    heat[0, 1, 3, 3] = 1.0
    out["det_heatmap"] = heat
    out["det_size"] = torch.full((1, 3, 32, 32), math.log(4.0))
    for ix, iy in ((22, 20), (20, 22)):
        out["det_size"][0, :2, ix, iy] = torch.tensor([0.0, math.log(8.0)])  # w = 1, l = 8
        out["det_rot"][0, :, ix, iy] = math.sqrt(0.5)  # sin = cos: yaw 45 degrees
    cells = {(10, 10), (10, 12), (22, 20), (20, 22), (3, 3)}
    rotated = decode_detections(out, GRID, score_threshold=0.5, nms="rotated", nms_iou=0.2)[0]
    aabb = decode_detections(out, GRID, score_threshold=0.5, nms="aabb", nms_iou=0.2)[0]

    def kept(result: dict[str, torch.Tensor]) -> set[tuple[int, int]]:
        found = {(int(x) + 16, int(y) + 16) for x, y in result["boxes"][:, :2].floor().tolist()}
        assert found <= cells and result["scores"].tolist() == sorted(result["scores"].tolist(), reverse=True)
        return found

    assert kept(rotated) == cells - {(10, 12)}
    assert kept(aabb) == cells - {(10, 12), (20, 22)}
    with pytest.raises(ValueError, match=r"None, 'aabb', 'rotated'"):
        decode_detections(out, GRID, nms="obb")
