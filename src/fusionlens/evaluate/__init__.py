"""Measuring decompositions and detectors, on any model described by a :class:`~fusionlens.spec.ModelSpec`.

* Separation (LMD appendix D.2): :func:`perturbation_metrics` of any attribution :class:`Method` --
  :class:`LMD` (frozen or recomputed), :class:`Shapley`, :class:`LMDShap`, :class:`Captum`, built by name with
  :func:`make_method` -- on a model seen through a :class:`Subject`.
* Ground truth: :func:`attribute_objects` / :func:`summarise_attribution` score the share of each single-sensor
  object's logit that a method gives to the sensor that alone could see it.
* Shares and regions: :func:`modality_shares` (each modality's share of the output over a mask),
  :func:`attribute_regions` (per user box or mask, per-modality scores and the right-sensor criterion).
* One sample explained (:func:`explain`, :class:`Explanation`; ``fusionlens.viz`` draws it).
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
from fusionlens.evaluate.explain import Explanation, explain, explain_world_sample
from fusionlens.evaluate.gradcam import seg_grad_cam
from fusionlens.evaluate.regions import RegionAttribution, attribute_regions, modality_shares, score_regions
from fusionlens.evaluate.separation import (
    Method,
    SeparationResult,
    mse,
    pairing_offsets,
    pcc,
    perturbation_metrics,
)

__all__ = [
    "LMD", "Captum", "DetectionReport", "Explanation", "LMDShap", "Method", "ObjectAttribution", "RegionAttribution",
    "SeparationResult", "Shapley", "attribute_objects", "attribute_regions", "evaluate_detection",
    "evaluate_detector", "exact_shapley", "explain", "explain_world_sample", "make_method", "mean_component_maps",
    "modality_shares", "mse", "pairing_offsets", "pcc", "perturbation_metrics", "score_regions", "seg_grad_cam",
    "summarise_attribution",
]
