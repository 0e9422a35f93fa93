"""Boxes -> BEV label maps on a :class:`~fusionlens.data.sample.BEVGrid`, as SimpleBEV builds them.

Every data source (the built-in world, nuScenes) turns its 3-D boxes into training targets here, so that the
maps mean the same thing everywhere:

* ``seg``    (X, Y) {0, 1}: cells whose centre lies inside the footprint of a *vehicle* box
  (``VEHICLE_CLASSES``; pedestrians are not segmented, as in SimpleBEV). A box too thin to contain any cell
  centre still marks the cell that contains its centre, so no vehicle vanishes at a coarse resolution.
* ``valid``  (X, Y) {0, 1}: 1 except under vehicles flagged invalid (SimpleBEV drops annotations whose
  visibility token is 1, i.e. barely visible; the world flags objects no sensor saw). Invalid vehicles are not
  in ``seg``.
* ``center`` (X, Y) in [0, 1]: max over vehicles of ``exp(-|c - p|^2 / (2 sigma^2))``, ``p`` the cell centre.
* ``offset`` (2, X, Y): metres from each ``seg`` cell to the centre of the vehicle that owns it (x then y), 0
  elsewhere. Where footprints overlap, the vehicle whose centre is nearest owns the cell.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from fusionlens.data.sample import BOX_FIELDS, CLASSES, VEHICLE_CLASSES, BEVGrid

#: Default spread of the centre heatmap in metres (SimpleBEV draws a Gaussian a few cells wide).
DEFAULT_CENTER_SIGMA_M: float = 1.5


def box_footprint_mask(boxes: torch.Tensor, points_xy: torch.Tensor) -> torch.Tensor:
    """``(Nb, P)`` bool: which of ``points_xy`` ``(P, 2)`` lie inside each box's oriented footprint.

    ``boxes`` is ``(Nb, >=7)`` in :data:`BOX_FIELDS` order; only x, y, w, l and yaw are used.
    """
    if boxes.ndim != 2 or boxes.shape[1] < 7:
        raise ValueError(f"boxes must be (N, >=7) with {BOX_FIELDS[:7]}, got shape {tuple(boxes.shape)}")
    rel = points_xy[None, :, :] - boxes[:, None, :2]  # (Nb, P, 2)
    cos, sin = torch.cos(boxes[:, 6])[:, None], torch.sin(boxes[:, 6])[:, None]
    along = rel[..., 0] * cos + rel[..., 1] * sin  # box frame: along heading (length l)
    across = -rel[..., 0] * sin + rel[..., 1] * cos  # across heading (width w)
    return (along.abs() <= boxes[:, 4:5] / 2) & (across.abs() <= boxes[:, 3:4] / 2)


def vehicle_mask(labels: torch.Tensor, classes: Sequence[str] = CLASSES,
                 vehicle_classes: Sequence[str] = VEHICLE_CLASSES) -> torch.Tensor:
    """Bool ``(Nb,)``: which labels (indices into ``classes``) are vehicle classes."""
    unknown = sorted(set(vehicle_classes) - set(classes))
    if unknown:
        raise ValueError(f"vehicle_classes {unknown} are not in classes {tuple(classes)}")
    ids = torch.tensor([classes.index(c) for c in vehicle_classes], dtype=torch.long)
    return torch.isin(labels.long(), ids)


def boxes_to_bev(
    boxes: torch.Tensor,
    labels: torch.Tensor,
    grid: BEVGrid,
    *,
    invalid: torch.Tensor | None = None,
    center_sigma: float = DEFAULT_CENTER_SIGMA_M,
    classes: Sequence[str] = CLASSES,
    vehicle_classes: Sequence[str] = VEHICLE_CLASSES,
) -> dict[str, torch.Tensor]:
    """Rasterise ``boxes`` ``(Nb, 9)`` with ``labels`` ``(Nb,)`` into ``seg``/``valid``/``center``/``offset``.

    ``invalid`` ``(Nb,)`` bool marks boxes to exclude from ``seg``/``center`` and to mask out of ``valid``.
    Returns float32 maps of shape ``(X, Y)`` (``offset``: ``(2, X, Y)``), indexed ``[ix, iy]`` as the grid.
    """
    if boxes.ndim != 2 or boxes.shape[1] != len(BOX_FIELDS):
        raise ValueError(f"boxes must be (N, {len(BOX_FIELDS)}) with {BOX_FIELDS}, got {tuple(boxes.shape)}")
    if labels.shape != (boxes.shape[0],):
        raise ValueError(f"labels must be ({boxes.shape[0]},) to match boxes, got {tuple(labels.shape)}")
    if not center_sigma > 0:
        raise ValueError(f"center_sigma must be > 0 metres, got {center_sigma}")
    if invalid is None:
        invalid = torch.zeros(boxes.shape[0], dtype=torch.bool)
    elif invalid.shape != (boxes.shape[0],):
        raise ValueError(f"invalid must be ({boxes.shape[0]},) to match boxes, got {tuple(invalid.shape)}")

    nx, ny, _ = grid.shape
    xs, ys = grid.cell_centres(0), grid.cell_centres(1)
    cells = torch.stack(torch.meshgrid(xs, ys, indexing="ij"), dim=-1).reshape(-1, 2)  # (X*Y, 2)
    boxes = boxes.to(torch.float32)
    is_vehicle = vehicle_mask(labels, classes, vehicle_classes)
    inside = box_footprint_mask(boxes, cells)  # (Nb, X*Y)

    # The cell holding each box centre always counts, so a vehicle never falls between cell centres.
    idx, in_grid = grid.to_index(torch.cat([boxes[:, :2], torch.zeros_like(boxes[:, :1])], dim=1))
    rows = torch.nonzero(in_grid).squeeze(1)
    inside[rows, idx[rows, 0] * ny + idx[rows, 1]] = True

    keep = is_vehicle & ~invalid.bool()
    drop = is_vehicle & invalid.bool()
    seg = inside[keep].any(dim=0)
    valid = ~(inside[drop].any(dim=0) & ~seg)  # a cell that a valid vehicle covers keeps counting

    centres = boxes[keep, :2]
    offset = torch.zeros(2, nx * ny)
    center = torch.zeros(nx * ny)
    if centres.shape[0] > 0:
        d2 = ((cells[None, :, :] - centres[:, None, :]) ** 2).sum(-1)  # (Nk, X*Y)
        center = torch.exp(-d2 / (2 * center_sigma**2)).amax(dim=0)
        owner_d2 = torch.where(inside[keep], d2, torch.full_like(d2, float("inf")))
        owner = owner_d2.argmin(dim=0)  # nearest-centre vehicle among those covering the cell
        offset = (centres[owner] - cells).T * seg[None, :]
        # Each in-grid vehicle centre peaks at exactly 1 on its own cell, as a heatmap target should.
        cidx, cin = grid.to_index(torch.cat([centres, torch.zeros_like(centres[:, :1])], dim=1))
        center[cidx[cin, 0] * ny + cidx[cin, 1]] = 1.0
    return {
        "seg": seg.float().reshape(nx, ny),
        "valid": valid.float().reshape(nx, ny),
        "center": center.float().reshape(nx, ny),
        "offset": offset.float().reshape(2, nx, ny),
    }
