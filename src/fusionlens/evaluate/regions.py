"""Modality shares and region attribution on any described model.

* :func:`modality_shares` -- how much of the studied output each modality carries over a region (a bool mask, the
  predicted positives, or the whole map), **signed** (``S_m / sum_m' |S_m'|`` with ``S_m`` the sum of modality
  ``m``'s component over the region: support is positive, suppression negative) or **absolute**
  (``sum |c_m| / sum_m' sum |c_m'|`` cell by cell: how much of the output's variation each modality carries,
  whatever its sign).
* :func:`attribute_regions` -- per user region (a box in metres on the spec's grid, or a bool mask), each modality's
  score ``S_m``, its signed shares and, when the caller says which sensor(s) saw the region, whether the sensor with
  the largest score is one of them (the right-sensor criterion of the LMD paper's ground-truth evaluation). The
  built-in world's visibility truth is one client of this (:mod:`~.attribution`).

Components are those of the studied output (a :class:`~fusionlens.spec.ModelSpec`'s ``output``); a region mask
covers the output's last two dimensions and is summed over every leading (channel) dimension.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from fusionlens.data.labels import box_footprint_mask
from fusionlens.data.sample import BEVGrid
from fusionlens.spec import ModelSpec, as_spec

SHARE_KINDS = ("signed", "absolute")


def _component_maps(components: Any) -> dict[str, torch.Tensor]:
    maps = getattr(components, "components", components)  # a Decomposition or a name -> tensor mapping
    if not isinstance(maps, Mapping):
        raise ValueError("components must be a Decomposition or a mapping name -> tensor")
    bad = [n for n, t in maps.items() if not isinstance(t, torch.Tensor)]
    if bad:
        raise ValueError(f"components {bad} are not tensors (decompose the studied output: ModelSpec.decompose)")
    return dict(maps)


def signed_shares(scores: Mapping[str, float]) -> dict[str, float]:
    """``S_m / sum_m' |S_m'|`` (all zeros when every score is zero)."""
    den = sum(abs(v) for v in scores.values())
    return {m: (v / den if den > 0 else 0.0) for m, v in scores.items()}


def modality_shares(components: Any, where: torch.Tensor | None = None, *, kind: str = "signed",
                    include_bias: bool = False) -> dict[str, float]:
    """Each modality's share of the output over ``where`` (module docstring).

    Args:
        components: a :class:`~fusionlens.decompose.Decomposition` of one tensor or a mapping name -> component.
        where: bool mask broadcastable to the components (e.g. ``output > 0`` for the predicted positives of a logit
            map); ``None`` = everywhere.
        kind: ``"signed"`` or ``"absolute"``.
        include_bias: also give the bias component a share (it is then in the denominator too).

    Returns:
        name -> share; all zeros where the region is empty or every component is zero there.
    """
    if kind not in SHARE_KINDS:
        raise ValueError(f"kind must be one of {SHARE_KINDS}, got {kind!r}")
    maps = _component_maps(components)
    names = [n for n in maps if include_bias or n != "bias"]
    if not names:
        raise ValueError("no modality components to share out")
    if where is not None:
        where = where.to(torch.bool)
        try:
            torch.broadcast_shapes(where.shape, maps[names[0]].shape)
        except RuntimeError as exc:
            raise ValueError(f"where has shape {tuple(where.shape)}, not broadcastable to the components' "
                             f"{tuple(maps[names[0]].shape)}") from exc
    sums: dict[str, float] = {}
    for n in names:
        c = maps[n].detach().double()
        c = c.abs() if kind == "absolute" else c
        sums[n] = float(c[where.expand_as(c)].sum() if where is not None else c.sum())
    return signed_shares(sums)


def box_masks(boxes: torch.Tensor, grid: BEVGrid) -> torch.Tensor:
    """``(N, X, Y)`` bool: the grid cells whose centre lies in each box's footprint. ``boxes`` are ``(N, 5)``
    ``(x, y, w, l, yaw)`` or ``(N, >=7)`` in the built-in ``BOX_FIELDS`` order (x, y, z, w, l, h, yaw, ...)."""
    if boxes.ndim != 2 or (boxes.shape[1] != 5 and boxes.shape[1] < 7):
        raise ValueError(f"boxes must be (N, 5) = (x, y, w, l, yaw) or (N, >=7) = (x, y, z, w, l, h, yaw, ...), "
                         f"got shape {tuple(boxes.shape)}")
    boxes = boxes if boxes.is_floating_point() else boxes.float()
    if boxes.shape[1] == 5:
        zeros = torch.zeros_like(boxes[:, :1])
        boxes = torch.cat([boxes[:, :2], zeros, boxes[:, 2:4], zeros, boxes[:, 4:5]], dim=1)
    xs, ys = grid.cell_centres(0).to(boxes.dtype), grid.cell_centres(1).to(boxes.dtype)
    centres = torch.stack(torch.meshgrid(xs, ys, indexing="ij"), dim=-1).reshape(-1, 2)
    return box_footprint_mask(boxes, centres).reshape(-1, len(xs), len(ys))


@dataclass
class RegionAttribution:
    """One region of one sample: ``scores`` = each modality's component summed over the region (minus the
    reference where one was given), ``value`` = the studied output's mean there, ``seen_by`` the sensors the caller
    says saw it (``None``: unknown)."""

    sample: int
    region: int
    cells: int
    value: float
    scores: dict[str, float]
    seen_by: tuple[str, ...] | None = None

    @property
    def shares(self) -> dict[str, float]:
        return signed_shares(self.scores)

    @property
    def top(self) -> str:
        return max(self.scores, key=lambda m: self.scores[m])

    @property
    def correct(self) -> bool | None:
        """Whether the top-scoring modality saw the region (``None`` when ``seen_by`` is unknown or empty)."""
        return self.top in self.seen_by if self.seen_by else None


def _region_masks(regions: Any, grid: BEVGrid | None, shape: tuple[int, int]) -> torch.Tensor:
    if not isinstance(regions, torch.Tensor):
        raise ValueError(f"regions must be a tensor of boxes (N, 5 or >=7) or masks (N, H, W), got "
                         f"{type(regions).__name__}")
    if regions.dtype == torch.bool:
        if regions.ndim != 3 or tuple(regions.shape[1:]) != shape:
            raise ValueError(f"region masks must be (N, {shape[0]}, {shape[1]}) to match the output's last two "
                             f"dimensions, got {tuple(regions.shape)}")
        return regions
    if grid is None:
        raise ValueError("regions given as boxes need the output's grid: ModelSpec(grid=BEVGrid(...)); or pass bool "
                         "masks")
    if tuple(grid.shape[:2]) != shape:
        raise ValueError(f"the spec's grid has {grid.shape[:2]} cells but the output's last two dimensions are "
                         f"{shape}")
    return box_masks(regions, grid)


def attribute_regions(
    model: ModelSpec | Any,
    batch: Any,
    regions: torch.Tensor | Sequence[torch.Tensor],
    *,
    method: Any = None,
    level: str | None = None,
    seen_by: Sequence[Sequence[Sequence[str]] | None] | Sequence[Sequence[str]] | None = None,
    reference: Mapping[str, torch.Tensor] | None = None,
    activation: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> list[RegionAttribution]:
    """Per-modality attribution of each region of each sample of ``batch`` (module docstring).

    Args:
        model: a :class:`~fusionlens.spec.ModelSpec` (or a model that describes itself).
        regions: per sample of the batch, boxes ``(N, 5)`` / ``(N, >=7)`` in metres on ``spec.grid`` or bool masks
            ``(N, H, W)`` over the output's last two dimensions; a single tensor for a batch of one sample.
        method: an attribution method of :mod:`~.baselines` (default: LMD, paper rules, a full decomposition).
        seen_by: per sample, per region, the sensors that saw it (for :attr:`RegionAttribution.correct`); a flat
            list of sensor lists for a batch of one.
        reference: per-modality maps subtracted before summing (a scene-contrast attribution,
            :func:`~.attribution.mean_component_maps`).
        activation: applied to the studied output before :attr:`RegionAttribution.value` averages it over the
            region (e.g. ``torch.sigmoid`` for a logit map: the mean probability).
    """
    from fusionlens.evaluate.baselines import LMD

    spec = as_spec(model)
    subject = spec.subject(level)
    method = method if method is not None else LMD("paper", "recomputed")
    x = subject.prepare(batch)
    maps, _ = method.clean(subject, x)
    return score_regions({m: maps[m] for m in subject.modalities}, subject.forward(x), regions, grid=spec.grid,
                         seen_by=seen_by, reference=reference, activation=activation)


def score_regions(
    components: Mapping[str, torch.Tensor],
    output: torch.Tensor,
    regions: torch.Tensor | Sequence[torch.Tensor],
    *,
    grid: BEVGrid | None = None,
    seen_by: Sequence[Sequence[Sequence[str]] | None] | Sequence[Sequence[str]] | None = None,
    reference: Mapping[str, torch.Tensor] | None = None,
    activation: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> list[RegionAttribution]:
    """:func:`attribute_regions` from components already computed: ``components`` modality -> ``(B, ...)`` maps of
    the studied ``output`` ``(B, ...)``; the other arguments as there."""
    n_batch = output.shape[0]
    per_sample = [regions] if isinstance(regions, torch.Tensor) else list(regions)
    if len(per_sample) != n_batch:
        raise ValueError(f"regions are given for {len(per_sample)} samples but the batch has {n_batch}")
    if seen_by is not None and n_batch == 1 and (not seen_by or seen_by[0] is None or
                                                 (seen_by[0] and isinstance(seen_by[0][0], str))):
        seen_by = [seen_by]  # type: ignore[list-item]
    if reference is not None:
        missing = [m for m in components if m not in reference]
        if missing:
            raise ValueError(f"reference maps lack modalities {missing}")
    shape = tuple(output.shape[-2:])
    rows: list[RegionAttribution] = []
    for b, sample_regions in enumerate(per_sample):
        masks = _region_masks(sample_regions, grid, shape)  # type: ignore[arg-type]
        sensors = None if seen_by is None else seen_by[b]
        if sensors is not None and len(sensors) != masks.shape[0]:
            raise ValueError(f"seen_by gives {len(sensors)} entries for sample {b}, which has {masks.shape[0]} regions")
        value_map = (output[b] if activation is None else activation(output[b])).detach().double()
        for r, mask in enumerate(masks):
            if not mask.any():
                continue
            scores = {}
            for m, maps in components.items():
                comp = maps[b].detach().double()
                if reference is not None:
                    comp = comp - reference[m][0].double()
                scores[m] = float(comp[mask.expand_as(comp)].sum())
            rows.append(RegionAttribution(b, r, int(mask.sum()), float(value_map[mask.expand_as(value_map)].mean()),
                                          scores, None if sensors is None else tuple(sensors[r])))
    return rows
