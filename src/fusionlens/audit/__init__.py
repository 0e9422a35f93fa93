"""Sensor-reliance audit: which sensor a fusion model relies on, where, and when it fails, over a dataset
(:func:`audit`, ``fusionlens audit``), written as a static HTML report with every number in JSON / CSV.

* :mod:`~fusionlens.audit.labels` -- what a user supplies per sample (boxes, classes, tags, visibility, target).
* :mod:`~fusionlens.audit.sample` -- one sample's shares, objects, partners and faults.
* :mod:`~fusionlens.audit.monitor` -- the share-vector outlier monitor (LMD appendix E.1's safety use).
* :mod:`~fusionlens.audit.tables` / :mod:`~fusionlens.audit.report` -- the tables and the pages.
"""

from fusionlens.audit.api import AuditResult, audit
from fusionlens.audit.labels import SampleLabels, sample_labels
from fusionlens.audit.monitor import ShareMonitor, auroc
from fusionlens.audit.sample import blackout_spec

__all__ = ["AuditResult", "SampleLabels", "ShareMonitor", "audit", "auroc", "blackout_spec", "sample_labels"]
