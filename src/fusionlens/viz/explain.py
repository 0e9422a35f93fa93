"""The explanation panel of ``fusionlens explain`` (LMD figures 3-6): for one sample, the camera mosaic, ground
truth, prediction, then each modality's and the bias component's BEV map -- sigmoid view (fig. 3: where a sensor
pushes towards "vehicle") and signed diverging view (fig. 4: support in red, suppression in blue) -- and the
per-modality Seg-Grad-CAM (fig. 6). Ground-truth vehicles are outlined in every BEV panel, coloured by which sensors
could see them, so that a reader sees at a glance which sensor found which car."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402

from fusionlens.data.sample import BEVGrid  # noqa: E402
from fusionlens.io import atomic_save_with  # noqa: E402

# outline colour of a ground-truth vehicle by the set of sensors that saw it
ONLY_COLOURS = {"camera": "#ffb000", "radar": "#00e5ff", "lidar": "#ff40ff"}
COLOUR_NAMES = {"camera": "orange", "radar": "cyan", "lidar": "magenta"}
SEVERAL, NONE = "#ffffff", "#808080"


# CAMERA_NAMES order (F, FR, BR, B, BL, FL) laid out as a driver sees it: FL F FR on top, BL B BR below
MOSAIC_ORDER = (5, 0, 1, 4, 3, 2)


def camera_mosaic(images: torch.Tensor, columns: int = 3) -> np.ndarray:
    """``(Ncam, 3, H, W)`` in [0, 1] -> one ``(rows*H, columns*W, 3)`` image; six nuScenes cameras are arranged
    FL F FR / BL B BR, other rigs in stored order."""
    n, _, h, w = images.shape
    order = MOSAIC_ORDER if n == len(MOSAIC_ORDER) else tuple(range(n))
    rows = math.ceil(n / columns)
    out = np.zeros((rows * h, columns * w, 3), dtype=np.float32)
    for slot, i in enumerate(order):
        r, c = divmod(slot, columns)
        out[r * h:(r + 1) * h, c * w:(c + 1) * w] = images[i].permute(1, 2, 0).clamp(0, 1).numpy()
    return out


def box_corners(box: torch.Tensor) -> np.ndarray:
    """Footprint corners ``(5, 2)`` (closed) of a box (BOX_FIELDS) in ego x, y."""
    x, y, w, length, yaw = (float(box[i]) for i in (0, 1, 3, 4, 6))
    c, s = math.cos(yaw), math.sin(yaw)
    local = np.array([[1, 1], [1, -1], [-1, -1], [-1, 1], [1, 1]]) * [length / 2, w / 2]
    return local @ np.array([[c, s], [-s, c]]) + [x, y]


def _bev(ax: plt.Axes, grid: BEVGrid, image: np.ndarray, title: str, **kwargs: object) -> object:
    """Forward (ego x) up, left (ego y) to the left."""
    (x0, x1), (y0, y1), _ = grid.bounds
    # rows = ix (forward, drawn upwards), columns = iy (left): the y axis is inverted below so that left is left
    handle = ax.imshow(image, origin="lower", extent=(y0, y1, x0, x1), interpolation="nearest", **kwargs)
    ax.set_xlim(y1, y0)  # left (+y) on the left; fixed limits so that outlines past the grid do not pan the view
    ax.set_ylim(x0, x1)
    ax.set_title(title, fontsize=9)
    ax.set_xticks([])
    ax.set_yticks([])
    return handle


def _outlines(ax: plt.Axes, boxes: torch.Tensor, seen_by: Sequence[Sequence[str]]) -> None:
    limits = ax.get_xlim(), ax.get_ylim()
    for box, sensors in zip(boxes, seen_by):
        colour = ONLY_COLOURS.get(sensors[0], SEVERAL) if len(sensors) == 1 else (SEVERAL if sensors else NONE)
        xy = box_corners(box)
        ax.plot(xy[:, 1], xy[:, 0], color=colour, lw=1.6 if len(sensors) == 1 else 0.7)
    ax.set_xlim(*limits[0])
    ax.set_ylim(*limits[1])


def dominant_modality_image(components: Mapping[str, torch.Tensor], prediction: torch.Tensor) -> np.ndarray:
    """RGB ``(X, Y, 3)``: each cell in the colour of the modality with the largest component there, brightness the
    predicted probability -- which sensor carries each detection, at a glance (the bias is not a sensor)."""
    names = [n for n in components if n != "bias"]
    winner = torch.stack([components[n] for n in names]).argmax(0)
    palette = torch.tensor([matplotlib.colors.to_rgb(ONLY_COLOURS.get(n, "#ffffff")) for n in names])
    return (palette[winner] * torch.sigmoid(prediction)[..., None]).numpy()


def explain_figure(
    path: str | Path,
    *,
    grid: BEVGrid,
    images: torch.Tensor | None,
    gt: torch.Tensor,
    prediction: torch.Tensor,
    components: Mapping[str, torch.Tensor],
    cams: Mapping[str, torch.Tensor],
    boxes: torch.Tensor,
    seen_by: Sequence[Sequence[str]],
    title: str = "",
) -> Path:
    """Write the panel (module docstring) as a PNG. ``prediction`` and ``components`` are seg logits ``(X, Y)``,
    ``cams`` Grad-CAM maps ``(X', Y')`` per component, ``seen_by`` the sensors that saw each of ``boxes``."""
    names = list(components)
    cols = max(4, len(names) + 1)
    fig, axes = plt.subplots(4, cols, figsize=(3.0 * cols, 12.0), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    top = axes[0]
    if images is not None:
        top[0].imshow(camera_mosaic(images))
        top[0].set_title("cameras: FL F FR / BL B BR", fontsize=9)
    _bev(top[1], grid, gt.numpy(), "ground truth", cmap="gray", vmin=0, vmax=1)
    _bev(top[2], grid, torch.sigmoid(prediction).numpy(), "prediction σ(logit)", cmap="magma", vmin=0, vmax=1)
    _bev(top[3], grid, dominant_modality_image(components, prediction),
         "dominant modality × σ(prediction)\n(" + ", ".join(f"{n} {c}" for n, c in COLOUR_NAMES.items()
                                                        if n in components) + ")")
    for ax in top[1:4]:
        ax.axis("on")
        _outlines(ax, boxes, seen_by)
    # one signed scale for the sensors (comparable with each other), its own for the bias
    mod_scale = max([float(c.abs().max()) for n, c in components.items() if n != "bias"] + [1e-6])
    bias_scale = max(float(components["bias"].abs().max()) if "bias" in components else 0.0, 1e-6)
    cam_scale = max(float(max(c.max() for c in cams.values())), 1e-12)
    for j, name in enumerate(names):
        comp = components[name].numpy()
        for row, (image, kwargs, label) in enumerate((
            (1 / (1 + np.exp(-comp)), {"cmap": "magma", "vmin": 0, "vmax": 1}, "σ view"),
            (comp, {"cmap": "RdBu_r", "vmin": -(bias_scale if name == "bias" else mod_scale),
                    "vmax": bias_scale if name == "bias" else mod_scale},
             f"signed ±{bias_scale if name == 'bias' else mod_scale:.1f}"),
        ), start=1):
            ax = axes[row][j]
            ax.axis("on")
            _bev(ax, grid, image, f"{name}: {label}", **kwargs)
            _outlines(ax, boxes, seen_by)
        if name in cams:
            ax = axes[3][j]
            ax.axis("on")
            _bev(ax, grid, cams[name].numpy(), f"{name}: Grad-CAM", cmap="inferno", vmin=0, vmax=cam_scale)
            _outlines(ax, boxes, seen_by)
    if "total" in cams:
        ax = axes[3][len(names)]
        ax.axis("on")
        _bev(ax, grid, cams["total"].numpy(), "Seg-Grad-CAM (all)", cmap="inferno", vmin=0, vmax=cam_scale)
        _outlines(ax, boxes, seen_by)
    legend = [Line2D([], [], color=c, lw=2, label=f"seen by {m} only") for m, c in ONLY_COLOURS.items()
              if any(list(s) == [m] for s in seen_by)]
    legend += [Line2D([], [], color=SEVERAL, lw=1, label="seen by several"), Line2D([], [], color=NONE, lw=1,
                                                                                   label="seen by none")]
    fig.legend(handles=legend, loc="lower center", ncol=len(legend), facecolor="#303030", labelcolor="white",
               fontsize=9)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout(rect=(0, 0.03, 1, 0.97))
    path = Path(path)
    atomic_save_with(path, lambda p: fig.savefig(p, dpi=90, facecolor="white", format="png"))
    plt.close(fig)
    return path


def explain_sample(model: torch.nn.Module, sample: object, out_dir: str | Path, *, name: str, rules: str = "paper",
                   layer: str = "fusion", visibility: object = None) -> dict[str, object]:
    """Decompose one sample, compute the per-modality Grad-CAM of the predicted vehicle cells at ``layer``, write
    ``<name>.png`` (:func:`explain_figure`) and ``<name>.json`` (numbers behind it), and return the JSON dict."""
    from fusionlens import decompose
    from fusionlens.data.collate import collate_samples
    from fusionlens.evaluate.attribution import Visibility, object_cells, single_sensor_objects
    from fusionlens.evaluate.gradcam import seg_grad_cam
    from fusionlens.io import atomic_write_json
    from fusionlens.models import batch_to_inputs

    vis = visibility if isinstance(visibility, Visibility) else Visibility()
    batch = collate_samples([sample])  # type: ignore[list-item]
    inputs, kwargs = batch_to_inputs(model, batch)  # type: ignore[arg-type]
    d = decompose(model, inputs, forward_kwargs=kwargs, rules=rules)
    comps = {n: d.components[n]["seg"][0, 0] for n in d.names}
    logit = d.output["seg"][0, 0]
    roi = torch.sigmoid(d.output["seg"]) > 0.5
    cams = seg_grad_cam(model, inputs, kwargs, layer, roi if roi.any() else None, rules=rules)
    cams = {k: v[0] for k, v in cams.items()}
    mods = list(model.modalities)  # type: ignore[attr-defined]
    boxes, labels = sample.boxes, sample.box_labels  # type: ignore[attr-defined]
    truth = sample.visibility  # type: ignore[attr-defined]
    seen = vis.sensors(truth, mods) if truth else torch.zeros(boxes.shape[0], len(mods), dtype=torch.bool)
    seen_by = [[m for j, m in enumerate(mods) if seen[i, j]] for i in range(boxes.shape[0])]
    cells = object_cells(sample)  # type: ignore[arg-type]
    single = dict(single_sensor_objects(sample, mods, vis)) if truth else {}  # type: ignore[arg-type]
    objects = []
    for i in range(boxes.shape[0]):
        mask = cells[i]
        if not mask.any():
            continue
        scores = {n: float(comps[n][mask].sum()) for n in d.names}
        objects.append({"box": i, "label": int(labels[i]), "xy": [float(boxes[i, 0]), float(boxes[i, 1])],
                        "seen_by": seen_by[i], "single_sensor": single.get(i), "cells": int(mask.sum()),
                        "probability": float(torch.sigmoid(logit[mask]).mean()), "component_logit_sum": scores})
    meta = getattr(sample, "meta", {})
    report = {"sample": name, "rules": rules, "gradcam_layer": layer, "tags": meta.get("tags", []),
              "conservation_error": d.conservation_error()._asdict(),
              "predicted_cells": int(roi.sum()),
              "component_sum_on_predicted_cells": {n: float(comps[n][roi[0, 0]].sum()) for n in d.names},
              "objects": objects}
    out = Path(out_dir)
    explain_figure(out / f"{name}.png", grid=sample.grid, images=sample.images, gt=sample.bev_seg,  # type: ignore[attr-defined]
                   prediction=logit, components=comps, cams=cams, boxes=boxes, seen_by=seen_by,
                   title=f"{name} [{', '.join(meta.get('tags', []))}] -- LMD ({rules}); outline colour = sensor "
                         "that saw the vehicle")
    atomic_write_json(out / f"{name}.json", report)
    return report
