"""Plug-in registries: point encoders (one per point modality) and extra output heads.

A point encoder maps zero-padded points to a BEV feature map::

    factory(modality: str, grid: BEVGrid, **kwargs) -> nn.Module with attribute ``out_channels: int`` and
    forward(points: (B, P, F) float, valid: (B, P) bool) -> (B, out_channels, X, Y)

An extra head reads the decoder's BEV features::

    factory(in_channels: int, grid: BEVGrid, **kwargs) -> nn.Module with
    forward(features: (B, in_channels, X, Y)) -> dict[str, Tensor]  (keys unlike seg/center/offset)
    and optionally ``loss(outputs: dict, batch: dict) -> dict[str, Tensor]`` which training adds to its
    loss (the ``total`` or ``*_total`` term when there is one, else the sum of the terms).

Register with :func:`register_point_encoder` / :func:`register_head` at import time of your module; modules
named in ``_PLUGIN_MODULES`` are imported on first lookup of an unknown name, so a config can name them
without the caller importing anything.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

from torch import nn

PointEncoderFactory = Callable[..., nn.Module]
HeadFactory = Callable[..., nn.Module]

_POINT_ENCODERS: dict[str, PointEncoderFactory] = {}
_HEADS: dict[str, HeadFactory] = {}
# modules that register plug-ins when imported (written by other parts of fusionlens; may be absent)
_PLUGIN_MODULES: tuple[str, ...] = ("fusionlens.models.pillars", "fusionlens.models.centerpoint")


def register_point_encoder(name: str, factory: PointEncoderFactory) -> PointEncoderFactory:
    if name in _POINT_ENCODERS and _POINT_ENCODERS[name] is not factory:
        raise ValueError(f"point encoder {name!r} is already registered")
    _POINT_ENCODERS[name] = factory
    return factory


def register_head(name: str, factory: HeadFactory) -> HeadFactory:
    if name in ("seg", "center", "offset"):
        raise ValueError(f"head name {name!r} is reserved for the built-in heads")
    if name in _HEADS and _HEADS[name] is not factory:
        raise ValueError(f"head {name!r} is already registered")
    _HEADS[name] = factory
    return factory


def _load_plugins() -> None:
    for module in _PLUGIN_MODULES:
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name != module:  # the plug-in exists but is broken: say so
                raise


def get_point_encoder(name: str) -> PointEncoderFactory:
    if name not in _POINT_ENCODERS:
        _load_plugins()
    if name not in _POINT_ENCODERS:
        raise ValueError(f"point encoder {name!r} is not registered; known: {sorted(_POINT_ENCODERS)}")
    return _POINT_ENCODERS[name]


def get_head(name: str) -> HeadFactory:
    if name not in _HEADS:
        _load_plugins()
    if name not in _HEADS:
        raise ValueError(f"head {name!r} is not registered; known: {sorted(_HEADS)}")
    return _HEADS[name]
