"""Run fusionlens subcommands under ``torchrun`` with two gloo processes on CPU (shared by the DDP tests)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

# registers only the named CLI modules, so a test depends on just those
_RUNNER = textwrap.dedent("""
    import argparse, importlib, sys
    import torch
    torch.set_num_threads(1)
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command", required=True)
    for name in {modules!r}:
        importlib.import_module("fusionlens.cli." + name).register(sub)
    args = parser.parse_args(sys.argv[1:])
    raise SystemExit(args.func(args))
""")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_cli(tmp_path: Path, modules: tuple[str, ...], *argv: str, nproc: int = 2) -> subprocess.CompletedProcess:
    """``torchrun --nproc_per_node nproc`` of the CLI ``argv``; asserts it succeeded and returns the process."""
    script = tmp_path / "runner.py"
    script.write_text(_RUNNER.format(modules=tuple(modules)))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr",
           "127.0.0.1", "--master_port", str(free_port()), str(script), *argv]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"),
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc
