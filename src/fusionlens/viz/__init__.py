"""Figures (matplotlib PNG): :func:`plot_sample` draws a world sample (cameras, BEV points, boxes);
:func:`explain_sample` draws an LMD panel (camera mosaic, ground truth, prediction, each modality's and the bias
component's BEV map, per-modality Grad-CAM) with the numbers as JSON."""

from fusionlens.viz.explain import explain_figure, explain_sample
from fusionlens.viz.world import plot_sample

__all__ = ["explain_figure", "explain_sample", "plot_sample"]
