"""Where each channel of a modality branch lands behind the cross-modality concatenation, and the branch
on its own, for :mod:`fusionlens.prune.structured`'s workaround of Torch-Pruning's concat bugs (see there).

Split out of ``structured.py`` to keep it readable. :func:`concat_mapping` works on the model's wiring by
running it (probing), never through Torch-Pruning's concat index bookkeeping; :func:`branch_graph` builds
Torch-Pruning's graph of one branch alone (no cross-modality concatenation in it) and holds the workaround for
a second Torch-Pruning bug, a concatenation at the very end of a traced graph.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch_pruning as tp
from torch import nn

from fusionlens.prune.params import call_model


def branch_of(model: nn.Module, name: str) -> str:
    """The outermost callable (non-container) module holding ``name``: its modality branch, e.g.
    ``encoders.radar`` for ``encoders.radar.convs.0``."""
    parts = name.split(".")
    for depth in range(1, len(parts)):
        prefix = ".".join(parts[:depth])
        if not isinstance(model.get_submodule(prefix), (nn.ModuleDict, nn.ModuleList)):
            return prefix
    return name


def _width(layer: nn.Module) -> int:
    return layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels


_MIXING: tuple[type[nn.Module], ...] = (nn.modules.conv._ConvNd, nn.Linear)


class _Reached(Exception):
    """Raised by the consumer's pre-hook once its input is captured: the rest of the forward is not needed."""


def concat_mapping(
    model: nn.Module,
    producer: str,
    consumer: str,
    example_inputs: Any,
    coupled: Mapping[str, Sequence[Sequence[int]]] | None = None,
) -> list[list[int]]:
    """Which input channels of ``consumer`` each output channel of ``producer`` feeds *directly*: through
    wiring only (concatenation offsets, reshapes, a camera lift spreading a latent channel over Z height bins,
    BatchNorm, activations, resampling, residual adds), never through another Conv/Linear layer.

    Found by probing, independent of Torch-Pruning's concat bookkeeping: output channel ``j`` is set to NaN
    while every other Conv/Linear layer replays its output of a clean pass, and the consumer's input channels
    that turn NaN are recorded. ``coupled`` names the layers whose output channels Torch-Pruning prunes
    together with the producer's (e.g. the other operand of a residual add), with the channels of theirs tied
    to each producer channel: they are poisoned along with it, as they are removed along with it. Holding the
    other layers fixed is what makes multi-path encoders work: the pillars encoder's ``block1`` reaches the
    fusion conv directly *and* through ``block2``/``up2``, and the columns behind ``up2`` are ``up2``'s, not
    ``block1``'s (counting them for both removed one column twice). NaN rather than a finite shift because it
    survives a ReLU's dead zone and a zero BatchNorm scale (0 * NaN = NaN): the map is structural, not a
    property of the example's activations. One forward pass per channel, cut off at the consumer."""
    prod, cons = model.get_submodule(producer), model.get_submodule(consumer)
    tied = {producer: [[j] for j in range(_width(prod))], **(coupled or {})}
    free = {id(cons), *(id(model.get_submodule(n)) for n in tied)}
    held = [m for m in model.modules() if isinstance(m, _MIXING) and id(m) not in free]
    # per held layer and call, its clean output -- None for calls before the producer ran: they cannot see a NaN,
    # so they need not be replayed, and the record stays small (the camera trunk runs before the lidar branch)
    recorded: dict[int, list[torch.Tensor | None]] = {id(m): [] for m in held}
    calls: dict[int, int] = {}
    probe: list[int] = []  # the channel being probed; empty in the clean pass, which records
    started: list[bool] = []  # set once a tied layer has run in the clean pass
    captured: list[torch.Tensor] = []
    in_dim = -1 if isinstance(cons, nn.Linear) else 1

    def hold(m: nn.Module, _i: Any, out: torch.Tensor) -> torch.Tensor | None:
        if not probe:
            recorded[id(m)].append(out.detach() if started else None)
            return None
        calls[id(m)] = calls.get(id(m), 0) + 1
        clean = recorded[id(m)][calls[id(m)] - 1]
        return None if clean is None else clean.clone()  # a copy: later in-place ops must not alter the record

    def poisoner(channels: Sequence[Sequence[int]], dim: int) -> Any:
        def poison(_m: nn.Module, _i: Any, out: torch.Tensor) -> torch.Tensor | None:
            if not probe:
                started[:] = [True]
                return None
            if not channels[probe[0]]:
                return None
            out = out.clone()
            out.index_fill_(dim, torch.as_tensor(channels[probe[0]], device=out.device), float("nan"))
            return out

        return poison

    def capture(_m: nn.Module, args: tuple) -> None:
        captured.append(args[0].detach())
        raise _Reached

    def run() -> torch.Tensor:
        calls.clear()
        try:
            call_model(model, example_inputs)
        except _Reached:
            return captured.pop()
        raise RuntimeError(f"concat_mapping: {consumer} is not called in the forward pass")

    hooks = [m.register_forward_hook(hold) for m in held]
    for name, channels in tied.items():
        layer = model.get_submodule(name)
        hooks.append(layer.register_forward_hook(poisoner(channels, -1 if isinstance(layer, nn.Linear) else 1)))
    hooks.append(cons.register_forward_pre_hook(capture))
    mapping = []
    try:
        with torch.no_grad():
            if torch.isnan(run()).any():
                raise RuntimeError(f"concat_mapping: the input of {consumer} is already NaN on the example inputs")
            for j in range(_width(prod)):
                probe[:] = [j]
                hit = torch.isnan(run()).movedim(in_dim, 0).flatten(1).any(1)
                mapping.append([int(i) for i in torch.nonzero(hit).flatten()])
    finally:
        for h in hooks:
            h.remove()
    return mapping


def branch_inputs(model: nn.Module, branch: str, example_inputs: Any) -> tuple[tuple, dict]:
    """The positional and keyword arguments ``branch`` is called with (first call) in a forward pass."""
    seen: list[tuple[tuple, dict]] = []
    hook = model.get_submodule(branch).register_forward_pre_hook(
        lambda _m, args, kwargs: seen.append((args, kwargs)) if not seen else None, with_kwargs=True
    )
    try:
        with torch.no_grad():
            call_model(model, example_inputs)
    finally:
        hook.remove()
    return seen[0]


def _behind_output(out: Any) -> Any:
    """``out`` with a no-op elementwise step (``* 1``) after every tensor: see :func:`branch_graph`."""
    if isinstance(out, torch.Tensor):
        return out * 1
    if isinstance(out, Mapping):
        return {k: _behind_output(v) for k, v in out.items()}
    if isinstance(out, (tuple, list)):
        return type(out)(_behind_output(v) for v in out)
    return out


def branch_graph(model: nn.Module, branch: str, example_inputs: Any) -> tp.DependencyGraph:
    """Torch-Pruning's dependency graph of the submodule ``branch`` alone, traced on the inputs it receives
    in a forward pass of ``model``; its module objects are the model's own.

    Torch-Pruning bug worked around here (1.6.1, ``DependencyGraph._trace_computational_graph``): the op that
    produces a traced output becomes an ``_OutputOp``, whatever it is, and an ``_OutputOp`` couples its inputs
    channel by channel like an add. A branch that *ends* in a concatenation -- the pillars encoder's
    ``cat([block1, up2])`` -- so had ``block1`` and ``up2`` fused into one group, and pruning ``up2`` pruned
    ``block1`` too. The traced outputs therefore get a no-op ``* 1`` behind them, which takes the
    ``_OutputOp`` role, and the concatenation is traced as a ``_ConcatOp``."""
    args, kwargs = branch_inputs(model, branch, example_inputs)
    return tp.DependencyGraph().build_dependency(
        model.get_submodule(branch),
        example_inputs=(args, kwargs),
        forward_fn=lambda m, x: _behind_output(m(*x[0], **x[1])),
    )
