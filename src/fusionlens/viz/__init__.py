"""Figures (matplotlib PNG); ``viz`` only draws. :func:`plot_sample` draws a world sample (cameras, BEV points,
boxes); :func:`decomposition_figure` draws any decomposition (component maps, signed and sigmoid views, boxes, camera
images of any count, Grad-CAM); :func:`explanation_figure` draws an :class:`fusionlens.evaluate.Explanation`."""

from fusionlens.viz.explain import decomposition_figure, explanation_figure
from fusionlens.viz.world import plot_sample

__all__ = ["decomposition_figure", "explanation_figure", "plot_sample"]
