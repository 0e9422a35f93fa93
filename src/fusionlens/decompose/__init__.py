"""Layer-wise Modality Decomposition (LMD) of any PyTorch fusion model.

>>> from fusionlens import decompose
>>> d = decompose(model, {"camera": images, "radar": points}, forward_kwargs={"intrinsics": K})
>>> d.components["camera"], d.components["radar"], d.components["bias"]  # sum to d.output
"""

from ._engine import UnsupportedOperationError
from .api import ConservationError, Decomposition, ModalityNotReachedWarning, decompose
from .ruleset import PRESETS, LinearizationSettings, RuleSet, register_rule, unregister_rule

__all__ = [
    "decompose", "Decomposition", "ConservationError", "LinearizationSettings", "RuleSet", "PRESETS",
    "register_rule", "unregister_rule", "UnsupportedOperationError", "ModalityNotReachedWarning",
]
