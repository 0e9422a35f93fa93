"""Measuring decompositions and detectors (LMD issue 5, detection issue 9).

* Separation (LMD appendix D.2): :func:`perturbation_metrics` of any attribution :class:`Method` --
  :class:`LMD` (frozen or recomputed), :class:`Shapley`, :class:`LMDShap`, :class:`Captum`, built by name with
  :func:`make_method` -- on a model seen through a :class:`Subject`.
* Ground truth: :func:`attribute_objects` / :func:`summarise_attribution` score the share of each single-sensor
  object's logit that a method gives to the sensor that alone could see it.
* Per-modality Seg-Grad-CAM (appendix E.3): :func:`seg_grad_cam`.
* Detection: :func:`evaluate_detector` (nuScenes mAP / NDS by the devkit's own algorithms).
"""

from fusionlens.evaluate.attribution import (
    ObjectAttribution,
    attribute_objects,
    mean_component_maps,
    summarise_attribution,
)
from fusionlens.evaluate.baselines import LMD, Captum, LMDShap, Shapley, exact_shapley, make_method
from fusionlens.evaluate.detection import DetectionReport, evaluate_detection, evaluate_detector
from fusionlens.evaluate.gradcam import seg_grad_cam
from fusionlens.evaluate.separation import (
    Method,
    SeparationResult,
    Subject,
    mse,
    pairing_offsets,
    pcc,
    perturbation_metrics,
)

__all__ = [
    "LMD", "Captum", "DetectionReport", "LMDShap", "Method", "ObjectAttribution", "SeparationResult", "Shapley",
    "Subject", "attribute_objects", "evaluate_detection", "evaluate_detector", "exact_shapley", "make_method",
    "mean_component_maps", "mse", "pairing_offsets", "pcc", "perturbation_metrics", "seg_grad_cam",
    "summarise_attribution",
]
