"""A share-vector monitor: flag samples (and objects) whose modality shares look unlike a reference split's.

The LMD paper's broader-impact note (appendix E.1) proposes modality attributions as a way to catch single-sensor
failures before they become errors. The audit makes that a measurable monitor:

* **vector** -- per sample, the signed shares of the modalities on the predicted positives (zeros where there are
  none) followed by those over the whole map (``2M`` numbers); per object, its ``M`` signed shares.
* **score** -- the Mahalanobis distance ``sqrt((v - mu)^T (Sigma + lambda I)^{-1} (v - mu))`` to the reference
  vectors' mean ``mu`` and covariance ``Sigma``; ``lambda = ridge * trace(Sigma) / d`` keeps it defined when the
  shares are collinear (signed shares of two modalities on one region sum to +-1 in absolute value).
* **threshold** -- the ``quantile`` of the reference scores (default 0.95: about 5 % of reference samples flagged,
  the false-alarm rate the user chooses).
* **how good** -- where labels exist, the AUROC of the score for the model's own errors (a sample whose IoU is
  below ``error_iou``, by default the lower quartile of the reference samples' IoUs; an object the model
  missed), and the error rate among flagged vs unflagged items.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from scipy.stats import mannwhitneyu


@dataclass
class ShareMonitor:
    """Mahalanobis outlier score of share vectors, fitted on a reference set (module docstring)."""

    mean: torch.Tensor
    precision: torch.Tensor
    threshold: float
    quantile: float
    reference_count: int

    @classmethod
    def fit(cls, vectors: torch.Tensor, *, quantile: float = 0.95, ridge: float = 0.05) -> ShareMonitor:
        if not 0 < quantile < 1:
            raise ValueError(f"monitor quantile must be in (0, 1), got {quantile}")
        if not ridge > 0:
            raise ValueError(f"monitor ridge must be > 0, got {ridge}")
        if vectors.ndim != 2 or vectors.shape[0] < 2:
            raise ValueError(f"the monitor needs at least 2 reference vectors, got {vectors.shape[0]}")
        v = vectors.double()
        mean = v.mean(0)
        cov = torch.cov(v.T).reshape(v.shape[1], v.shape[1])
        lam = ridge * float(torch.trace(cov)) / v.shape[1] + 1e-9
        precision = torch.linalg.inv(cov + lam * torch.eye(v.shape[1], dtype=v.dtype))
        monitor = cls(mean, precision, math.inf, quantile, int(v.shape[0]))
        monitor.threshold = float(torch.quantile(monitor.score(v), quantile))
        return monitor

    def score(self, vectors: torch.Tensor) -> torch.Tensor:
        d = vectors.double() - self.mean
        return torch.sqrt(torch.einsum("ni,ij,nj->n", d, self.precision, d).clamp(min=0))

    def to_dict(self) -> dict[str, object]:
        return {"threshold": self.threshold, "quantile": self.quantile, "reference_count": self.reference_count,
                "mean": self.mean.tolist()}


def auroc(scores: Sequence[float], errors: Sequence[bool]) -> float | None:
    """Probability that an erroneous item scores above a correct one (ties count half): the Mann-Whitney U of the
    two groups over their product of sizes. ``None`` when either group is empty."""
    pos = [s for s, e in zip(scores, errors) if e]
    neg = [s for s, e in zip(scores, errors) if not e]
    if not pos or not neg:
        return None
    return float(mannwhitneyu(pos, neg, alternative="two-sided").statistic) / (len(pos) * len(neg))


def flag_quality(scores: Sequence[float], flagged: Sequence[bool], errors: Sequence[bool | None]) -> dict[str, object]:
    """How well the score and the flag predict errors, over the items whose error is known."""
    known = [(s, f, bool(e)) for s, f, e in zip(scores, flagged, errors) if e is not None]
    flagged_err = [e for _, f, e in known if f]
    other_err = [e for _, f, e in known if not f]
    return {"items": len(known), "errors": sum(e for _, _, e in known),
            "auroc": auroc([s for s, _, _ in known], [e for _, _, e in known]),
            "error_rate_flagged": sum(flagged_err) / len(flagged_err) if flagged_err else None,
            "error_rate_unflagged": sum(other_err) / len(other_err) if other_err else None,
            "flagged": len(flagged_err)}


def sample_vector(record: dict, modalities: Sequence[str]) -> list[float]:
    """A sample's monitored vector: shares on the predicted positives (0 where none), then over the whole map."""
    pos = record["shares"]["positive"] or {}
    whole = record["shares"]["map"] or {}
    return [float(pos.get(m, 0.0)) for m in modalities] + [float(whole.get(m, 0.0)) for m in modalities]


def object_vector(obj: dict, modalities: Sequence[str]) -> list[float]:
    return [float(obj["shares"][m]) for m in modalities]
