"""Figures of a decomposition (LMD figures 3-6), for any model: :func:`decomposition_figure` draws any number of
camera images (or none), the target and the output, the dominant modality per cell, then each modality's and the
bias component's map -- sigmoid view (fig. 3: where a sensor pushes towards "positive", for logit outputs) and signed
diverging view (fig. 4: support in red, suppression in blue) -- and per-modality Seg-Grad-CAM (fig. 6) where given.
Boxes are outlined in every map panel, coloured by which sensors saw them, so that a reader sees at a glance which
sensor found which object. :func:`explanation_figure` draws an :class:`~fusionlens.evaluate.explain.Explanation`.
Nothing here computes an analysis."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402

from fusionlens.data.sample import BEVGrid  # noqa: E402
from fusionlens.io import atomic_save_with  # noqa: E402
from fusionlens.modalities import modality  # noqa: E402

if TYPE_CHECKING:
    from fusionlens.evaluate.explain import Explanation

SEVERAL, NONE = "#ffffff", "#808080"
FALLBACK_COLOURS = ("#ffb000", "#00e5ff", "#ff40ff", "#7CFC00", "#ff6347", "#9370db")


def modality_colour(name: str, index: int = 0) -> str:
    """The colour of a modality in every figure: its entry in :mod:`fusionlens.modalities`, else (a user's own
    modality name) a fixed fallback by position."""
    try:
        return modality(name).colour
    except ValueError:
        return FALLBACK_COLOURS[index % len(FALLBACK_COLOURS)]


def camera_grid(images: torch.Tensor, columns: int = 3) -> tuple[np.ndarray, int, int]:
    """``(Ncam, 3, H, W)`` in [0, 1] -> one ``(rows*H, cols*W, 3)`` image in stored order, and (rows, cols)."""
    n, _, h, w = images.shape
    cols = min(columns, n)
    rows = math.ceil(n / cols)
    out = np.zeros((rows * h, cols * w, 3), dtype=np.float32)
    for i in range(n):
        r, c = divmod(i, cols)
        out[r * h:(r + 1) * h, c * w:(c + 1) * w] = images[i].permute(1, 2, 0).clamp(0, 1).numpy()
    return out, rows, cols


def box_corners(box: torch.Tensor) -> np.ndarray:
    """Footprint corners ``(5, 2)`` (closed) of a box ``(x, y, w, l, yaw)`` or ``(x, y, z, w, l, h, yaw, ...)``."""
    if box.shape[0] == 5:
        x, y, w, length, yaw = (float(v) for v in box)
    elif box.shape[0] >= 7:
        x, y, w, length, yaw = (float(box[i]) for i in (0, 1, 3, 4, 6))
    else:
        raise ValueError(f"a box must have 5 (x, y, w, l, yaw) or >= 7 (x, y, z, w, l, h, yaw, ...) values, "
                         f"got {box.shape[0]}")
    c, s = math.cos(yaw), math.sin(yaw)
    local = np.array([[1, 1], [1, -1], [-1, -1], [-1, 1], [1, 1]]) * [length / 2, w / 2]
    return local @ np.array([[c, s], [-s, c]]) + [x, y]


def _panel(ax: plt.Axes, grid: BEVGrid | None, image: np.ndarray, title: str, **kwargs: object) -> object:
    """A map panel: on a BEV grid forward (ego x) up and left (ego y) to the left; without a grid, array order."""
    ax.axis("on")
    if grid is None:
        handle = ax.imshow(image, interpolation="nearest", **kwargs)
    else:
        (x0, x1), (y0, y1), _ = grid.bounds
        # rows = ix (forward, drawn upwards), columns = iy (left): the y axis is inverted so that left is left
        handle = ax.imshow(image, origin="lower", extent=(y0, y1, x0, x1), interpolation="nearest", **kwargs)
        ax.set_xlim(y1, y0)  # fixed limits so that outlines past the grid do not pan the view
        ax.set_ylim(x0, x1)
    ax.set_title(title, fontsize=9)
    ax.set_xticks([])
    ax.set_yticks([])
    return handle


def _outline_colour(sensors: Sequence[str], colours: Mapping[str, str]) -> str:
    if len(sensors) == 1:
        return colours.get(sensors[0], SEVERAL)
    return SEVERAL if sensors else NONE


def _outlines(ax: plt.Axes, boxes: torch.Tensor | None, seen_by: Sequence[Sequence[str]] | None,
              colours: Mapping[str, str]) -> None:
    if boxes is None or boxes.shape[0] == 0:
        return
    limits = ax.get_xlim(), ax.get_ylim()
    for i, box in enumerate(boxes):
        sensors = seen_by[i] if seen_by is not None else ()
        xy = box_corners(box)
        ax.plot(xy[:, 1], xy[:, 0], color=_outline_colour(sensors, colours) if seen_by is not None else SEVERAL,
                lw=1.6 if len(sensors) == 1 else 0.7)
    ax.set_xlim(*limits[0])
    ax.set_ylim(*limits[1])


def dominant_modality_image(components: Mapping[str, torch.Tensor], prediction: torch.Tensor,
                            colours: Mapping[str, str] | None = None) -> np.ndarray:
    """RGB ``(H, W, 3)``: each cell in the colour of the modality with the largest component there, brightness the
    sigmoid of the prediction -- which sensor carries each detection, at a glance (the bias is not a sensor)."""
    names = [n for n in components if n != "bias"]
    colours = colours or {n: modality_colour(n, i) for i, n in enumerate(names)}
    winner = torch.stack([components[n] for n in names]).argmax(0)
    palette = torch.tensor([matplotlib.colors.to_rgb(colours[n]) for n in names])
    return (palette[winner] * torch.sigmoid(prediction)[..., None]).numpy()


def decomposition_figure(
    path: str | Path,
    components: Mapping[str, torch.Tensor],
    *,
    output: torch.Tensor | None = None,
    target: torch.Tensor | None = None,
    grid: BEVGrid | None = None,
    images: torch.Tensor | Sequence[torch.Tensor] | None = None,
    image_titles: Sequence[str] | None = None,
    boxes: torch.Tensor | None = None,
    seen_by: Sequence[Sequence[str]] | None = None,
    cams: Mapping[str, torch.Tensor] | None = None,
    logits: bool = True,
    title: str = "",
) -> Path:
    """Write a decomposition panel (module docstring) as a PNG and return its path.

    Args:
        components: name -> 2-D map (the modalities, then ``"bias"`` if present).
        output: the studied 2-D output map (``None``: the sum of the components).
        target: a ground-truth 2-D map, drawn beside the output.
        grid: the maps' BEV grid (boxes in metres, forward up); ``None`` draws maps in array order (boxes need a grid).
        images: camera images ``(N, 3, H, W)`` in [0, 1] (any count, or none), or a list of ``(3, H, W)``.
        image_titles: one per image (default ``image 0``, ...).
        boxes: ``(N, 5)`` ``(x, y, w, l, yaw)`` or ``(N, >=7)`` boxes outlined in every map panel.
        seen_by: per box, the sensors that saw it (outline colour).
        cams: Grad-CAM maps per component (and ``"total"``), drawn in a last row.
        logits: the maps are logits: add the sigmoid view row and the dominant-modality panel.
    """
    comps = {n: torch.as_tensor(c).detach().float().cpu() for n, c in components.items()}
    if not comps:
        raise ValueError("decomposition_figure needs at least one component map")
    shapes = {tuple(c.shape) for c in comps.values()}
    if len(shapes) != 1 or len(next(iter(shapes))) != 2:
        raise ValueError(f"components must be 2-D maps of one shape, got shapes {sorted(shapes)}")
    if boxes is not None and boxes.shape[0] and grid is None:
        raise ValueError("boxes are in metres: decomposition_figure needs grid= to draw them")
    if seen_by is not None and boxes is not None and len(seen_by) != boxes.shape[0]:
        raise ValueError(f"seen_by has {len(seen_by)} entries for {boxes.shape[0]} boxes")
    names = list(comps)
    modalities = [n for n in names if n != "bias"]
    colours = {n: modality_colour(n, i) for i, n in enumerate(modalities)}
    out_map = (torch.as_tensor(output).detach().float().cpu() if output is not None
               else sum(comps.values()))  # type: ignore[assignment]
    if isinstance(images, (list, tuple)):
        images = torch.stack(list(images)) if images else None
    cams = {k: torch.as_tensor(v).detach().float().cpu() for k, v in (cams or {}).items()}
    rows = 2 + int(logits) + int(bool(cams))
    cols = max(4, len(names) + 1)
    fig, axes = plt.subplots(rows, cols, figsize=(3.0 * cols, 3.0 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    top = list(axes[0])
    slot = 0
    if images is not None and images.shape[0]:
        mosaic, r, c = camera_grid(images)
        top[0].imshow(mosaic)
        labels = list(image_titles) if image_titles is not None else [f"image {i}" for i in range(images.shape[0])]
        top[0].set_title("cameras: " + " | ".join(labels[:c]) + (" / ..." if r > 1 else ""), fontsize=8)
        slot = 1
    maps_top: list[plt.Axes] = []
    if target is not None:
        _panel(top[slot], grid, torch.as_tensor(target).float().cpu().numpy(), "target", cmap="gray", vmin=0, vmax=1)
        maps_top.append(top[slot])
        slot += 1
    if slot < cols:
        view = torch.sigmoid(out_map).numpy() if logits else out_map.numpy()
        _panel(top[slot], grid, view, "output σ(logit)" if logits else "output", cmap="magma",
               **({"vmin": 0, "vmax": 1} if logits else {}))
        maps_top.append(top[slot])
        slot += 1
    if logits and modalities and slot < cols:
        _panel(top[slot], grid, dominant_modality_image({n: comps[n] for n in modalities}, out_map, colours),
               "dominant modality × σ(output)\n(" + ", ".join(f"{n}" for n in modalities) + " in their colours)")
        maps_top.append(top[slot])
    for ax in maps_top:
        _outlines(ax, boxes, seen_by, colours)
    # one signed scale for the modalities (comparable with each other), its own for the bias
    mod_scale = max([float(comps[n].abs().max()) for n in modalities] + [1e-6])
    bias_scale = max(float(comps["bias"].abs().max()) if "bias" in comps else 0.0, 1e-6)
    for j, name in enumerate(names):
        scale = bias_scale if name == "bias" else mod_scale
        row = 1
        comp = comps[name].numpy()
        if logits:
            _panel(axes[row][j], grid, 1 / (1 + np.exp(-comp)), f"{name}: σ view", cmap="magma", vmin=0, vmax=1)
            _outlines(axes[row][j], boxes, seen_by, colours)
            row += 1
        _panel(axes[row][j], grid, comp, f"{name}: signed ±{scale:.2g}", cmap="RdBu_r", vmin=-scale, vmax=scale)
        _outlines(axes[row][j], boxes, seen_by, colours)
    if cams:
        cam_scale = max(max(float(c.max()) for c in cams.values()), 1e-12)
        for j, name in enumerate([*names, "total"]):
            if name in cams and j < cols:
                ax = axes[rows - 1][j]
                _panel(ax, grid, cams[name].numpy(), f"{name}: Grad-CAM" if name != "total" else "Seg-Grad-CAM (all)",
                       cmap="inferno", vmin=0, vmax=cam_scale)
                _outlines(ax, boxes, seen_by, colours)
    if boxes is not None and boxes.shape[0] and seen_by is not None:
        legend = [Line2D([], [], color=colours[m], lw=2, label=f"seen by {m} only") for m in modalities
                  if any(list(s) == [m] for s in seen_by)]
        legend += [Line2D([], [], color=SEVERAL, lw=1, label="seen by several"),
                   Line2D([], [], color=NONE, lw=1, label="seen by none")]
        fig.legend(handles=legend, loc="lower center", ncol=len(legend), facecolor="#303030", labelcolor="white",
                   fontsize=9)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout(rect=(0, 0.03, 1, 0.97))
    path = Path(path)
    try:
        atomic_save_with(path, lambda p: fig.savefig(p, dpi=90, facecolor="white", format="png"))
    finally:
        plt.close(fig)
    return path


def explanation_figure(path: str | Path, explanation: Explanation) -> Path:
    """Draw an :class:`~fusionlens.evaluate.explain.Explanation` with :func:`decomposition_figure`."""
    e = explanation
    return decomposition_figure(path, e.components, output=e.output, target=e.target, grid=e.grid, images=e.images,
                                image_titles=e.image_titles,
                                boxes=e.boxes, seen_by=e.seen_by, cams=e.cams, title=e.title)
