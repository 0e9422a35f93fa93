"""Vehicle IoU as SimpleBEV computes it, accumulated over a whole set: overall, per condition, per distance.

IoU = sum(pred * gt * valid) / sum(max(pred, gt) * valid) with ``pred = round(sigmoid(logit))``, the sums
taken over every cell of every sample of the set (not a mean of per-sample IoUs), ``valid`` = ``bev_valid``.

Breakdowns use the same formula on subsets: ``cond/<tag>`` over the samples whose ``meta`` carries the tag
(:func:`condition_tags`), ``dist/<lo>-<hi>m`` over the cells whose centre lies at that range from the ego.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import torch

from fusionlens.data.sample import BEVGrid

DEFAULT_DISTANCE_BANDS: tuple[float, ...] = (0.0, 20.0, 35.0, 50.0, math.inf)


def condition_tags(meta: dict[str, Any]) -> list[str]:
    """Tags naming a sample's conditions and sensor faults, e.g. ``["night", "rain", "radar_dropout"]``.

    ``meta["tags"]`` (the built-in world's list of active conditions, time of day first) is used as is.
    Otherwise ``meta["conditions"]`` may be a mapping (name -> value) or a string, and ``meta["faults"]`` a
    sequence of fault names, a mapping (name -> truthy when active) or absent (no tag).
    """
    if isinstance(meta.get("tags"), list | tuple):  # the built-in world lists its active conditions by name
        return [str(t) for t in meta["tags"]]
    tags: list[str] = []
    cond = meta.get("conditions")
    if isinstance(cond, dict):
        tags += [f"{k}={v}" for k, v in sorted(cond.items()) if isinstance(v, str | int | bool)]
    elif isinstance(cond, str):
        tags.append(cond)
    if "faults" in meta:
        faults = meta["faults"]
        if isinstance(faults, dict):
            active = sorted(str(k) for k, v in faults.items() if v)
        elif isinstance(faults, str):
            active = [faults] if faults else []
        else:
            active = sorted(str(f) for f in (faults or []))
        tags += [f"fault={f}" for f in active] or ["fault=none"]
    return tags


class IoUAccumulator:
    """Accumulates intersections and unions (float64) for the overall, per-condition and per-distance IoU."""

    def __init__(self, grid: BEVGrid, distance_bands: Sequence[float] = DEFAULT_DISTANCE_BANDS) -> None:
        bands = [float(b) for b in distance_bands]
        if len(bands) < 2 or any(b1 <= b0 for b0, b1 in zip(bands, bands[1:])):
            raise ValueError(f"distance_bands must be increasing with >= 2 edges, got {distance_bands}")
        self.grid = grid
        xs, ys = grid.cell_centres(0), grid.cell_centres(1)
        dist = torch.sqrt(xs[:, None] ** 2 + ys[None, :] ** 2)
        self.band_names = [f"dist/{_fmt(b0)}-{_fmt(b1)}m" for b0, b1 in zip(bands, bands[1:])]
        self.band_masks = torch.stack(
            [(dist >= b0) & (dist < b1) for b0, b1 in zip(bands, bands[1:])]
        ).double()
        self.totals: dict[str, list[float]] = {}

    def _add(self, key: str, inter: float, union: float) -> None:
        acc = self.totals.setdefault(key, [0.0, 0.0])
        acc[0] += inter
        acc[1] += union

    @torch.no_grad()
    def update(
        self,
        seg_logits: torch.Tensor,
        bev_seg: torch.Tensor,
        bev_valid: torch.Tensor,
        metas: Iterable[dict[str, Any]] | None = None,
    ) -> None:
        """Add a batch: logits, targets and valid masks ``(B, 1, X, Y)``; ``metas`` one dict per sample."""
        if seg_logits.shape != bev_seg.shape or bev_valid.shape != bev_seg.shape:
            raise ValueError(
                f"IoU: shapes differ: logits {tuple(seg_logits.shape)}, bev_seg "
                f"{tuple(bev_seg.shape)}, bev_valid {tuple(bev_valid.shape)}"
            )
        pred = (seg_logits.detach().double() > 0).double().cpu()
        gt = bev_seg.detach().double().cpu()
        valid = bev_valid.detach().double().cpu()
        inter = (pred * gt * valid)[:, 0]  # (B, X, Y)
        union = ((pred + gt).clamp(max=1.0) * valid)[:, 0]
        inter_s, union_s = inter.sum((1, 2)), union.sum((1, 2))
        band_i = torch.einsum("bxy,kxy->bk", inter, self.band_masks)
        band_u = torch.einsum("bxy,kxy->bk", union, self.band_masks)
        metas = list(metas) if metas is not None else [{}] * pred.shape[0]
        for i in range(pred.shape[0]):
            self._add("all", float(inter_s[i]), float(union_s[i]))
            for name, bi, bu in zip(self.band_names, band_i[i], band_u[i]):
                self._add(name, float(bi), float(bu))
            for tag in condition_tags(metas[i]):
                self._add(f"cond/{tag}", float(inter_s[i]), float(union_s[i]))

    def merge(self, other_totals: dict[str, list[float]]) -> None:
        for key, (inter, union) in other_totals.items():
            self._add(key, inter, union)

    def compute(self) -> dict[str, float]:
        """IoU per key (``nan`` where the union is empty), ``"all"`` first."""
        keys = ["all"] + sorted(k for k in self.totals if k != "all")
        return {
            k: (self.totals[k][0] / self.totals[k][1] if self.totals.get(k, [0, 0])[1] > 0 else math.nan)
            for k in keys
            if k in self.totals or k == "all"
        }


def _fmt(value: float) -> str:
    return "inf" if math.isinf(value) else f"{value:g}"
