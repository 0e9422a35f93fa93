"""Saving and loading pruned models of any class, unstructured (masked) or structured (channels removed).

    save_pruned(result.model, "pruned.pt")
    model = load_pruned("pruned.pt", MyModel())      # a freshly built instance of the same class

What is stored: the state dict with every ``torch.nn.utils.prune`` mask folded into its weight (pruned entries are
plain zeros; the masks are kept next to it, ``load_pruned(..., masks=True)`` re-installs them for further
fine-tuning), the *structure* -- each parameter's and buffer's shape, and every module's
plain public attributes (``in_channels``, ``out_channels``, ``num_features``, ``groups``, ``embed_dim``,
``head_dim``, ...) -- and the model's class name. Loading reshapes the fresh instance to the recorded structure
and then calls ``load_state_dict(strict=True)``; the file is read with ``torch.load(weights_only=True)``.

Why not Torch-Pruning's ``tp.state_dict`` / ``tp.load_state_dict``: it stores each module's whole ``__dict__``
(hooks, arbitrary Python objects), so reading it needs ``weights_only=False`` -- unpickling code from a file --
and it restores whatever attributes the saving process had, including ones unrelated to pruning. Recording only
shapes and plain attribute values keeps the file to tensors and literals, loads safely, and fails with a clear
message when the fresh instance is not the architecture that was pruned.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fusionlens.io import atomic_torch_save, load_torch_file
from fusionlens.prune.params import clone_model
from fusionlens.prune.pruner import apply_masks, get_masks, make_dense

PRUNED_FORMAT = "fusionlens-pruned-v1"
_PLAIN = (bool, int, float, str, type(None))


def _plain(value: Any) -> bool:
    if isinstance(value, (tuple, list)):
        return all(_plain(v) for v in value)
    return isinstance(value, _PLAIN)


def _tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    """Parameters and buffers of ``module`` itself (not its children), masks' ``*_orig`` under the public name."""
    out = {n.removesuffix("_orig"): p for n, p in module.named_parameters(recurse=False)}
    out.update({n: b for n, b in module.named_buffers(recurse=False) if b is not None and not n.endswith("_mask")})
    return out


def pruned_structure(model: nn.Module) -> dict[str, Any]:
    """``{"shapes": {tensor name: shape}, "attributes": {module name: {attribute: value}}}`` of ``model``: what a
    fresh instance must be reshaped to before it can load the pruned state dict (see :func:`reshape_to`)."""
    shapes: dict[str, list[int]] = {}
    attributes: dict[str, dict[str, Any]] = {}
    for mod_name, module in model.named_modules():
        prefix = f"{mod_name}." if mod_name else ""
        for name, t in _tensors(module).items():
            shapes[prefix + name] = list(t.shape)
        attributes[mod_name] = {
            k: list(v) if isinstance(v, tuple) else v
            for k, v in vars(module).items()
            if not k.startswith("_") and k != "training" and _plain(v)
        }
    return {"shapes": shapes, "attributes": attributes}


def reshape_to(model: nn.Module, structure: Mapping[str, Any]) -> nn.Module:
    """Reshape ``model`` in place to ``structure`` (from :func:`pruned_structure`): every tensor whose recorded shape
    differs is replaced by an uninitialised one of that shape (its values come from the state dict loaded next),
    and every existing plain attribute whose recorded value differs is set to it (``in_channels``, ``num_features``
    ... -- also of modules that hold no tensor, such as a parameter-free InstanceNorm). ``ValueError`` if the
    model's tensors are not the recorded ones (another architecture)."""
    shapes, attributes = structure["shapes"], structure["attributes"]
    mine = {f"{m}.{n}" if m else n for m, mod in model.named_modules() for n in _tensors(mod)}
    if mine != set(shapes):
        missing, extra = sorted(set(shapes) - mine), sorted(mine - set(shapes))
        raise ValueError(
            f"{type(model).__name__} is not the architecture that was pruned: tensors missing {missing[:5]}, "
            f"not in the file {extra[:5]}"
        )
    for mod_name, module in model.named_modules():
        prefix = f"{mod_name}." if mod_name else ""
        for name, t in _tensors(module).items():
            shape = torch.Size(shapes[prefix + name])
            if t.shape == shape:
                continue
            fresh = torch.empty(shape, dtype=t.dtype, device=t.device)
            if isinstance(t, nn.Parameter):
                setattr(module, name, nn.Parameter(fresh, requires_grad=t.requires_grad))
            else:
                module._buffers[name] = fresh
        for key, value in attributes.get(mod_name, {}).items():  # widths, also of modules without tensors
            current = getattr(module, key, None)
            value = tuple(value) if isinstance(current, tuple) else value
            if hasattr(module, key) and current != value:
                setattr(module, key, value)
    return model


def pruning_record(model: nn.Module) -> tuple[nn.Module, dict[str, Any]]:
    """A copy of ``model`` with every mask folded into its weight, and ``{"masks", "structure"}``: what a file needs
    besides that copy's state dict to rebuild the pruned model on a fresh instance."""
    module = getattr(model, "module", model)
    dense = make_dense(clone_model(module))
    return dense, {"masks": get_masks(module), "structure": pruned_structure(dense)}


def save_pruned(model: nn.Module, path: str | Path, metadata: Mapping[str, Any] | None = None) -> Path:
    """Write ``model`` (pruned by :func:`fusionlens.prune.prune`, either kind) to ``path`` atomically: the state dict
    with masks folded into the weights, the masks, the structure and ``metadata`` (plain values: a report)."""
    module = getattr(model, "module", model)
    dense, record = pruning_record(module)
    payload = {
        "format": PRUNED_FORMAT,
        "class": f"{type(module).__module__}.{type(module).__qualname__}",
        "state_dict": dense.state_dict(),
        **record,
        "metadata": dict(metadata or {}),
    }
    atomic_torch_save(path, payload)
    return Path(path)


def load_pruned(path: str | Path, model: nn.Module, masks: bool = False) -> nn.Module:
    """Load a file written by :func:`save_pruned` into ``model``, a freshly built instance of the pruned model's
    class: reshaped to the saved structure, then ``load_state_dict(strict=True)``; returns ``model``. ``masks``:
    re-install the unstructured masks (``torch.nn.utils.prune``) so fine-tuning keeps the pruned entries at zero.

    The file is read with ``weights_only=True`` (no pickled code); ``ValueError`` names what the file is if it is
    not a pruned model, and the class or the tensors that differ if ``model`` is not its architecture."""
    payload = load_torch_file(path, what="pruned model", expected=f"a {PRUNED_FORMAT} file", weights_only=True)
    if not isinstance(payload, dict) or payload.get("format") != PRUNED_FORMAT:
        kind = payload.get("format") if isinstance(payload, dict) else type(payload).__name__
        raise ValueError(f"pruned model {path} is a {kind!s} file, not a {PRUNED_FORMAT} file (save_pruned)")
    cls = f"{type(model).__module__}.{type(model).__qualname__}"
    if payload["class"] != cls:
        raise ValueError(f"pruned model {path} was saved from {payload['class']}, not {cls}")
    if get_masks(model):
        raise ValueError("load_pruned needs a freshly built model; this one already carries pruning masks")
    reshape_to(model, payload["structure"])
    model.load_state_dict(payload["state_dict"], strict=True)
    if masks and payload["masks"]:
        apply_masks(model, payload["masks"])
    return model
