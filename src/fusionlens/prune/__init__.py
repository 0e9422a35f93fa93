"""fusionlens.prune: AlterMOMA modality-aware pruning and the random, magnitude, IMP, SNIP, SynFlow and ProsPr
baselines, unstructured (``torch.nn.utils.prune`` masks) and structured (Torch-Pruning channel removal).

Every method is an importance function ``importance(model, names, sparsity) -> {name: score}``; one pruner
(:func:`prune_with_scores`) applies a global threshold. :func:`prune` does score + prune (unstructured, or whole
channels with ``structured=True``) + fine-tune; :func:`save_pruned` / :func:`load_pruned` store either kind.
"""

from fusionlens.prune.altermoma import AlterMOMA, altereva
from fusionlens.prune.api import METHODS, PruneResult, build_importance, prune
from fusionlens.prune.baselines import IMP, SNIP, Importance, MagnitudeImportance, RandomImportance, SynFlow
from fusionlens.prune.params import ParamGroups, prunable_parameters, resolve_groups
from fusionlens.prune.prospr import ProsPr
from fusionlens.prune.pruner import apply_masks, dense_state_dict, finetune, get_masks, global_masks, prune_with_scores
from fusionlens.prune.serialize import load_pruned, save_pruned
from fusionlens.prune.structured import structured_prune

__all__ = [
    "IMP", "METHODS", "SNIP", "AlterMOMA", "Importance", "MagnitudeImportance", "ParamGroups", "ProsPr",
    "PruneResult", "RandomImportance", "SynFlow", "altereva", "apply_masks", "build_importance",
    "dense_state_dict", "finetune", "get_masks", "global_masks", "load_pruned", "prunable_parameters", "prune",
    "prune_with_scores", "resolve_groups", "save_pruned", "structured_prune",
]
