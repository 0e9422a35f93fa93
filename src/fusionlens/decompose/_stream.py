"""The decomposed tensor: a ``torch.Tensor`` subclass whose data is the operating point (the ordinary value the
model computes) and which carries its modality components alongside.

Two representations, chosen to keep the cost of a decomposition close to one forward pass:

* **single** (``owner`` set, no parts): the whole tensor belongs to one component. Inside a single-modality
  branch with ``bias="local"`` (the paper's eq. 20: the decomposition starts at the fusion layer) every op keeps
  it single, so a camera backbone costs exactly what it costs without fusionlens, and needs no rules.
* **multi** (``parts`` of shape ``(M, *shape)``): one slice per modality. The bias component is carried
  implicitly as ``data - parts.sum(0)``: every rule conserves the sum layer by layer (Prop. 1–3), so the bias
  that would be propagated explicitly equals that difference — and keeping it implicit saves one of the
  ``M + 2`` streams (total, modalities, bias) in every layer after the fusion.

A multi tensor made by concatenating single-modality tensors (the fusion layer's input) also records which
slice along the concatenated dimension each modality holds (``blocks``; zero elsewhere), so that the convolution
that follows computes each component on its own channels only (``rules.convolution``).

A :class:`Stream` outside an active decomposition behaves as a plain tensor.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from torch.utils._pytree import SUPPORTED_NODES, tree_flatten, tree_unflatten

_ACTIVE: list[Any] = []  # stack of engines; the innermost one handles intercepted calls


class Blocks(NamedTuple):
    """Where each modality's component of a multi tensor can be non-zero: ``spans`` of ``(start, stop, owner)``
    along dimension ``dim`` of the tensor (not of the parts); every component is zero outside its own spans."""

    dim: int
    spans: tuple[tuple[int, int, int], ...]


class BlockedParts(NamedTuple):
    """What a rule returns to attach ``blocks`` to its output's ``parts``."""

    parts: torch.Tensor
    blocks: Blocks


class Stream(torch.Tensor):
    """Operating-point tensor with modality components (see module docstring)."""

    _fl_owner: int | None
    _fl_parts: torch.Tensor | None
    _fl_blocks: Blocks | None
    # Which modalities' values flowed into this tensor through ops that carry values (bit m for modality m; -1:
    # all). Unlike the parts, not zeroed by a dead activation: it tells "no path" from "zero at this input".
    _fl_reach: int

    @staticmethod
    def single(total: torch.Tensor, owner: int) -> Stream:
        out = _plain(total).as_subclass(Stream)
        out._fl_owner, out._fl_parts, out._fl_blocks, out._fl_reach = owner, None, None, 1 << owner
        return out

    @staticmethod
    def multi(total: torch.Tensor, parts: torch.Tensor, blocks: Blocks | None = None, reach: int = -1) -> Stream:
        if parts.shape[1:] != total.shape:
            raise RuntimeError(f"internal: parts {tuple(parts.shape)} do not match total {tuple(total.shape)}")
        out = _plain(total).as_subclass(Stream)
        out._fl_owner, out._fl_parts, out._fl_blocks, out._fl_reach = None, parts, blocks, reach
        return out

    def fl_total(self) -> torch.Tensor:
        return _plain(self)

    def fl_parts(self, num_modalities: int) -> torch.Tensor:
        """Modality components as a ``(M, *shape)`` tensor, materialising the single representation if needed."""
        if self._fl_parts is not None:
            return self._fl_parts
        total = _plain(self)
        parts = total.new_zeros((num_modalities, *total.shape))
        parts[self._fl_owner] = total
        return parts

    def fl_components(self, num_modalities: int) -> torch.Tensor:
        """All ``M + 1`` components, the bias last (``total - sum of modalities``)."""
        parts = self.fl_parts(num_modalities)
        return torch.cat([parts, (_plain(self) - parts.sum(0)).unsqueeze(0)])

    @classmethod
    def __torch_function__(cls, func: Callable, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if not _ACTIVE:
            with torch._C.DisableTorchFunctionSubclass():
                return func(*unwrap(args), **unwrap(kwargs))
        return _ACTIVE[-1].dispatch(func, args, kwargs)


def _plain(t: torch.Tensor) -> torch.Tensor:
    if type(t) is torch.Tensor:
        return t
    with torch._C.DisableTorchFunctionSubclass():
        return t.as_subclass(torch.Tensor)


# The arguments of a torch call are nearly always tuples, lists and dicts of leaves: those are walked here
# directly (the per-op cost of a decomposition); anything else pytree opens goes through pytree.
def _is_other_node(x: Any) -> bool:
    return isinstance(x, tuple | list | dict) or type(x) in SUPPORTED_NODES


def replace_streams(tree: Any, fn: Callable[[Stream], Any]) -> Any:
    """``tree`` (a pytree) with every :class:`Stream` ``s`` replaced by ``fn(s)``."""
    kind = type(tree)
    if kind is tuple:
        return tuple(replace_streams(x, fn) for x in tree)
    if kind is list:
        return [replace_streams(x, fn) for x in tree]
    if kind is dict:
        return {k: replace_streams(v, fn) for k, v in tree.items()}
    if isinstance(tree, Stream):
        return fn(tree)
    if _is_other_node(tree):
        leaves, spec = tree_flatten(tree)
        return tree_unflatten([fn(x) if isinstance(x, Stream) else x for x in leaves], spec)
    return tree


def unwrap(tree: Any) -> Any:
    """Replace every :class:`Stream` in a nested structure by its plain operating-point tensor."""
    return replace_streams(tree, _plain)


def streams_in(tree: Any, out: list[Stream] | None = None) -> list[Stream]:
    """The :class:`Stream` leaves of ``tree``, in pytree order."""
    out = [] if out is None else out
    kind = type(tree)
    if kind is tuple or kind is list:
        for x in tree:
            streams_in(x, out)
    elif kind is dict:
        for x in tree.values():
            streams_in(x, out)
    elif isinstance(tree, Stream):
        out.append(tree)
    elif _is_other_node(tree):
        out.extend(x for x in tree_flatten(tree)[0] if isinstance(x, Stream))
    return out


class ActiveEngine:
    """Context manager making ``engine`` the handler of intercepted torch calls."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine

    def __enter__(self) -> Any:
        _ACTIVE.append(self.engine)
        return self.engine

    def __exit__(self, *exc: Any) -> None:
        _ACTIVE.remove(self.engine)
