"""Atomic file writes: write to a temporary file in the same directory, fsync, then rename over the target, so
that an interrupted job never leaves a truncated file behind. :func:`claim_settings`: a record-or-refuse settings
file on top of them."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

import torch


@contextmanager
def atomic_open(path: str | os.PathLike[str], mode: str = "wb") -> Iterator[IO[Any]]:
    """Open a temporary sibling of ``path`` for writing; it replaces ``path`` only if the block succeeds."""
    if "w" not in mode:
        raise ValueError(f"atomic_open is for writing, got mode {mode!r}")
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, mode) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    with atomic_open(path, "wb") as handle:
        handle.write(data)


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    with atomic_open(path, "w") as handle:
        handle.write(text)


def atomic_write_json(path: str | os.PathLike[str], obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def atomic_torch_save(path: str | os.PathLike[str], obj: Any) -> None:
    with atomic_open(path, "wb") as handle:
        torch.save(obj, handle)


def atomic_save_with(path: str | os.PathLike[str], writer: Callable[[Path], None]) -> None:
    """For libraries that insist on a file name (matplotlib, safetensors): ``writer(tmp_path)`` then rename."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=target.suffix or ".tmp", dir=target.parent)
    os.close(fd)
    try:
        writer(Path(tmp))
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


_ABSENT = object()


def claim_settings(path: str | os.PathLike[str], settings: Mapping[str, Any], *, what: str, remedy: str,
                   under: str | None = None, extra: Mapping[str, Any] | None = None,
                   assumed: Mapping[str, Any] | None = None) -> None:
    """Record ``settings`` in the JSON file ``path`` on first use; refuse, on every later use, settings that differ.

    For a folder of results keyed by less than what made them (a cell tree, say): the first run writes the file
    (atomically); a later run must bring the same settings, else ``ValueError``: "<folder> holds ``what`` <each
    differing key: stored vs now> (<file>) -- ``remedy``", so ``what`` reads like "cells measured with another
    protocol" and ``remedy`` says how to proceed. A key only one side has differs too. Settings are compared as
    they read back from JSON (tuples as lists).

    ``under``: the settings live under this key of the file's object, beside ``extra`` (written, never compared);
    by default they are the whole object. ``assumed``: the settings to take as recorded while there is no file
    (results from before it existed); the file is then written, if they agree.
    """
    target = Path(path)
    settings = json.loads(json.dumps(settings))
    recorded = target.is_file()
    if recorded:
        record = json.loads(target.read_text())
        stored = record[under] if under else record
    else:
        stored = assumed
    if stored is not None:
        diff = {k: (stored.get(k, _ABSENT), settings.get(k, _ABSENT))
                for k in [*settings, *(k for k in stored if k not in settings)]
                if stored.get(k, _ABSENT) != settings.get(k, _ABSENT)}
        if diff:
            def show(value: Any) -> str:
                return "(absent)" if value is _ABSENT else repr(value)

            source = target.name if recorded else f"no {target.name} yet: assumed"
            raise ValueError(f"{target.parent} holds {what} "
                             + "; ".join(f"{k}: {show(a)} there vs {show(b)} now" for k, (a, b) in diff.items())
                             + f" ({source}) -- {remedy}")
    if not recorded:
        atomic_write_json(target, {under: settings, **(extra or {})} if under else settings)
