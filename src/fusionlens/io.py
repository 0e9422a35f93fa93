"""Safe file handling for everything fusionlens reads and writes.

* Atomic writes: write to a temporary file in the same directory, fsync, then rename over the target, so that an
  interrupted job never leaves a truncated file behind; the file gets the mode a plain ``open`` would give it.
* :func:`check_output_path` / :func:`check_output_dir`: refuse an output that cannot be written (or would replace
  an input) *before* any work, with an error naming the option.
* :func:`load_torch_file`: read a PyTorch file, or fail with an error naming the file, what it is and what was
  expected (instead of an unpickling traceback).
* :func:`claim_settings`: a record-or-refuse settings file on top of the atomic writes.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import stat
import tempfile
import zipfile
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

import torch


def current_umask() -> int:
    """The process umask, read without changing it (``os.umask`` can only be read by setting it, which races with
    other threads creating files)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _plain_open_mode(target: Path) -> int:
    """The permission bits ``open(target, "w")`` would leave: an existing file keeps its own, a new one gets
    0o666 less the umask (``mkstemp`` alone would make every file private, 0o600)."""
    try:
        return stat.S_IMODE(target.stat().st_mode)
    except OSError:
        return 0o666 & ~current_umask()


def _refuse_directory(target: Path) -> None:
    if target.is_dir():
        raise IsADirectoryError(f"{target} is a directory; cannot replace it with a file")


@contextmanager
def atomic_open(path: str | os.PathLike[str], mode: str = "wb") -> Iterator[IO[Any]]:
    """Open a temporary sibling of ``path`` for writing; it replaces ``path`` only if the block succeeds."""
    if "w" not in mode:
        raise ValueError(f"atomic_open is for writing, got mode {mode!r}")
    target = Path(path)
    _refuse_directory(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, mode) as handle:
            yield handle
            handle.flush()
            os.fchmod(handle.fileno(), _plain_open_mode(target))
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
    _refuse_directory(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=target.suffix or ".tmp", dir=target.parent)
    os.close(fd)
    try:
        writer(Path(tmp))
        os.chmod(tmp, _plain_open_mode(target))
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | os.PathLike[str]) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# -- output paths, checked before any work -----------------------------------------------------------------------
PathLike = str | os.PathLike[str]


def _same_file(a: PathLike, b: PathLike) -> bool:
    a, b = Path(a).expanduser(), Path(b).expanduser()
    try:
        if a.exists() and b.exists():
            return os.path.samefile(a, b)  # hard links and symlinks too
    except OSError:
        pass
    return a.resolve() == b.resolve()


def _check_creatable(option: str, target: Path, folder: Path) -> None:
    """``folder`` is (or can be made) a writable directory: its nearest existing ancestor is a directory in which
    an entry can be created. Probed by creating and removing an empty directory (``os.access`` says yes to root
    even on read-only or virtual file systems such as /proc)."""
    existing = folder
    while not existing.exists() and existing != existing.parent:
        if existing.is_symlink():  # a dangling link: mkdir would fail on it
            raise ValueError(f"{option} {target}: {existing} is a broken symbolic link")
        existing = existing.parent
    if not existing.is_dir():
        raise ValueError(f"{option} {target}: {existing} is a file, not a folder")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".fusionlens-probe-", dir=existing))
    except OSError as exc:
        raise ValueError(f"{option} {target}: cannot create files in {existing} ({exc.strerror or exc})") from None


def check_output_path(option: str, path: PathLike, *, inputs: Mapping[str, PathLike | None] | None = None,
                      sidecar_suffixes: tuple[str, ...] | list[str] = (), sidecars: tuple[PathLike, ...] = ()) -> Path:
    """Refuse, before any work, an output file ``path`` (given as ``option``) that could not be written or would
    destroy something: it is a directory, a parent is a file, its folder cannot be created or written, it or one of
    its sidecars (files written beside it: ``path.with_suffix(s)`` for each of ``sidecar_suffixes``, e.g. a JSON
    report, and the paths ``sidecars``) is the same file as one of the ``inputs`` (option name -> path; ``None``
    values are skipped), or a sidecar is the output itself. ``ValueError`` naming ``option``; returns ``path`` as a
    ``Path``."""
    target = Path(path).expanduser()
    if target.is_dir() or target.name in ("", ".", ".."):
        raise ValueError(f"{option} {target} is a directory; give a file name")
    _check_creatable(option, target, target.parent)
    sidecars = (*(target.with_suffix(s) for s in sidecar_suffixes), *sidecars)
    for sidecar in sidecars:
        if _same_file(sidecar, target):
            raise ValueError(f"{option} {target}: the report written beside it would be the same file "
                             f"({sidecar}); use another suffix (e.g. .pt)")
        if Path(sidecar).is_dir():
            raise ValueError(f"{option} {target}: its report {sidecar} is a directory")
    for name, source in (inputs or {}).items():
        if source is None:
            continue
        for out in (target, *sidecars):
            if _same_file(out, source):
                raise ValueError(f"{option} {target} would overwrite the input {name} {source}"
                                 + (f" (with its report {out})" if out != target else "")
                                 + f"; choose another {option}")
    return target


def check_output_dir(option: str, path: PathLike) -> Path:
    """Refuse, before any work, an output folder ``path`` (given as ``option``) that is a file, sits under a file
    or cannot be created or written. ``ValueError`` naming ``option``; returns ``path`` as a ``Path``."""
    folder = Path(path).expanduser()
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"{option} {folder} is a file, not a folder")
    _check_creatable(option, folder, folder)
    return folder


def check_same_source(option: str, path: PathLike, report: PathLike, source: PathLike, *,
                      key: str = "checkpoint") -> None:
    """A *default* output name (one the user did not choose) may replace only an earlier output of the same
    ``source``: that is what the JSON ``report`` beside it records under ``key``. Otherwise ``ValueError``: an
    output of another source (or of an unknown one) is never silently replaced."""
    target, report = Path(path), Path(report)
    if not target.exists():
        return
    try:
        made_from = json.loads(report.read_text()).get(key)
    except (OSError, ValueError, AttributeError):
        made_from = None
    if made_from is not None and _same_file(made_from, source):
        return
    origin = f"made from {made_from}" if made_from is not None else f"of unknown origin (no readable {report.name})"
    raise ValueError(f"the default {option} {target} exists, {origin}, not from {source}; pass {option} to choose "
                     "a file (or delete the old one)")


# -- reading PyTorch files ---------------------------------------------------------------------------------------
# a format tag as pickle stores a string: BINUNICODE ("X", 4-byte length; torch.save's protocol 2) or
# SHORT_BINUNICODE (0x8c, 1-byte length), then the UTF-8 bytes
_FORMAT_TAG = re.compile(rb"(?:X(.{4})|\x8c(.))(fusionlens-[a-z0-9-]+)", re.DOTALL)


def describe_torch_file(data: bytes) -> str:
    """What the bytes of a file that was meant to be a PyTorch file actually are, in words: empty, JSON or other
    text, a damaged zip archive, a fusionlens payload (its ``format`` tag, found in the pickle without running
    it), a state dict or some other PyTorch file."""
    if not data:
        return "an empty file (0 bytes)"
    if data[:4] != b"PK\x03\x04":
        head = data[:4096].lstrip()
        if head[:1] in (b"{", b"["):
            try:
                json.loads(data)
                return "a JSON file"
            except ValueError:
                return "a text file starting like JSON"
        try:
            head.decode("utf-8")
            return "a text file"
        except UnicodeDecodeError:
            return f"not a PyTorch file (it starts with bytes {data[:8].hex(' ')})"
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            pickle_name = next(n for n in archive.namelist() if n.endswith("data.pkl"))
            pickled = archive.read(pickle_name)
    except (zipfile.BadZipFile, StopIteration, KeyError, OSError, EOFError):
        return "a truncated or damaged PyTorch file"
    tag = _FORMAT_TAG.search(pickled)
    if tag is not None:
        size = int.from_bytes(tag.group(1) or tag.group(2), "little")
        return f"a {tag.group(3)[:size].decode()} file"
    return "a PyTorch file of another kind"


def load_torch_file(path: PathLike, *, what: str, expected: str, weights_only: bool = False,
                    data: bytes | None = None, mmap: bool = False) -> Any:
    """``torch.load`` (on the CPU) of ``path`` -- the file named as ``what`` (e.g. ``"checkpoint"``, an option
    name) -- failing with ``FileNotFoundError`` if it is missing and ``ValueError`` "<what> <path> is <what the file
    is>, not <expected>" if it cannot be loaded (random bytes, JSON, empty, truncated; with ``weights_only``, one
    that holds more than tensors and plain containers). ``data``: the file's bytes, if already read."""
    path = Path(path)
    if data is None and not path.is_file():
        raise FileNotFoundError(f"{what}: no such file {path}")
    try:
        if data is not None:
            return torch.load(io.BytesIO(data), map_location="cpu", weights_only=weights_only)
        return torch.load(path, map_location="cpu", weights_only=weights_only, mmap=mmap)
    except Exception as exc:  # noqa: BLE001 -- any failure to unpickle means the file is not what was expected
        if data is None:
            data = path.read_bytes()
        kind = describe_torch_file(data)
        if kind.endswith(" file") and kind.startswith(("a fusionlens-", "a PyTorch file of")):
            # an intact archive: either it holds objects a weights-only load refuses, or its records are damaged
            if weights_only:
                kind = kind.replace("of another kind", "holding Python objects (not only tensors)")
            else:
                kind = f"an unreadable PyTorch file ({str(exc).strip().splitlines()[0][:200]})"
        raise ValueError(f"{what} {path} is {kind}, not {expected}") from None


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
        try:
            record = json.loads(target.read_text())
            stored = record[under] if under else record
            if not isinstance(stored, dict):
                raise TypeError(f"a JSON {type(stored).__name__} where an object of settings belongs")
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"{target} is not a settings record of this kind ({type(exc).__name__}: {exc}); it was "
                             f"edited or damaged -- {remedy}") from None
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
