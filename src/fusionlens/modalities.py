"""The sensor modalities of fusionlens' own models and data, defined once.

Each :class:`Modality` names what the rest of the package used to spell locally: the key of its tensor in a
:class:`~fusionlens.data.sample.Sample` and in a collated batch, the forward keyword inputs that belong to it (so
they travel with it when the modality is swapped for another sample's: calibration, validity masks), the letter of
the LMD paper's tables (``Rp/C``: the camera map with radar perturbed) and its colour in every figure.

A combination of modalities -- a reference model's inputs, a row of a paper table -- is spelled one way,
``"camera-radar"`` (:func:`combination_name`), in the table's order; :func:`parse_modalities` reads it back, and
also reads the command line's comma list ``camera,radar`` and the checkpoint files' ``camera_radar``.

Models brought by a user name their modalities freely (:class:`fusionlens.spec.ModelSpec`); this table is only
the vocabulary of the built-in ones.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True)
class Modality:
    """One sensor modality of the built-in models and data."""

    name: str
    batch_key: str  # its tensor in a Sample and a collated batch (the forward argument is the name)
    kwargs: tuple[str, ...]  # forward keyword inputs (batch keys) that belong to it and travel with it
    letter: str  # the LMD tables' abbreviation
    colour: str  # matplotlib colour in every figure


#: the built-in modalities, in the order models and tables list them
TABLE: tuple[Modality, ...] = (
    Modality("camera", "images", ("intrinsics", "cam_to_ego"), "C", "#ffb000"),
    Modality("radar", "radar", ("radar_valid",), "R", "#00e5ff"),
    Modality("lidar", "lidar", ("lidar_valid",), "L", "#ff40ff"),
)
_BY_NAME: dict[str, Modality] = {m.name: m for m in TABLE}
#: the names, in table order
NAMES: tuple[str, ...] = tuple(_BY_NAME)


def modality(name: str) -> Modality:
    """The table entry of ``name``; ``ValueError`` naming the known modalities otherwise."""
    try:
        return _BY_NAME[name]
    except KeyError:
        raise ValueError(f"unknown modality {name!r}; choose from {list(NAMES)}") from None


def parse_modalities(spec: str | Iterable[str]) -> tuple[str, ...]:
    """Modality names in table order from ``"camera-radar"``, ``"camera,radar"``, ``"camera_radar"`` or a sequence
    of names. ``ValueError`` for an unknown name, a repeated one, or none."""
    names = [n for n in re.split(r"[-,_+\s]+", spec.strip())] if isinstance(spec, str) else list(spec)
    names = [n for n in names if n]
    if not names:
        raise ValueError(f"no modality given in {spec!r}; choose from {list(NAMES)}")
    for name in names:
        modality(name)
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ValueError(f"modalities {repeated} given twice in {spec!r}")
    return tuple(n for n in NAMES if n in names)


def combination_name(spec: str | Iterable[str]) -> str:
    """The one spelling of a combination of modalities: ``"camera-radar"`` (table order)."""
    return "-".join(parse_modalities(spec))
