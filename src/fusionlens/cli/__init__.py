"""``fusionlens`` command line: a thin layer over the library. Each subcommand lives in its own module
that exposes ``register(subparsers)``; add the module's name to ``_COMMAND_MODULES``."""

from __future__ import annotations

import argparse
import importlib
import sys

_COMMAND_MODULES: tuple[str, ...] = (
    "world", "pretrain", "train", "evaluate", "prune", "reproduce", "explain", "kitti", "audit",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fusionlens",
        description="Explain (LMD) and prune (AlterMOMA) multi-sensor BEV fusion networks.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for name in _COMMAND_MODULES:
        importlib.import_module(f"fusionlens.cli.{name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    # bad input, or a file system that refuses (permission, disk full: OSError names the file): one line, no trace
    except (ValueError, OSError, KeyError, RuntimeError) as exc:
        print(f"fusionlens {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
