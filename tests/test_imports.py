"""Every public module of fusionlens imports as the first fusionlens module of an interpreter.

The rest of the suite cannot see an import cycle: by the time a test runs, its conftest and earlier tests have
loaded most of the package, and a cycle only bites when the module that closes it is imported first. So each
module is imported in a fresh child: one interpreter loads torch and the other third-party packages (no
fusionlens module), then forks one child per module, which imports that module alone and reports how it went.
"""

from __future__ import annotations

import json
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "fusionlens"


def _public_modules() -> list[str]:
    names = ["fusionlens"]
    for info in pkgutil.walk_packages([str(SRC)], prefix="fusionlens."):
        if not any(part.startswith("_") for part in info.name.split(".")[1:]):
            names.append(info.name)
    return sorted(names)


MODULES = _public_modules()

# The parent preloads every third-party package fusionlens uses (a first child imports all of fusionlens and
# names them), so each forked child starts with no fusionlens module in sys.modules and imports only its own.
_RUNNER = """
import importlib, json, os, sys, traceback
import numpy, torch  # noqa: F401  (loaded once, before the discovery child forks)
names = json.loads(sys.argv[1])
read, write = os.pipe()
if os.fork() == 0:
    for name in names:
        try:
            importlib.import_module(name)
        except BaseException:
            pass
    with os.fdopen(write, "w") as out:
        out.write(json.dumps([m for m in sys.modules if not m.startswith(("fusionlens", "__"))]))
    os._exit(0)
os.close(write)
with os.fdopen(read) as pipe:
    third_party = json.loads(pipe.read())
os.wait()
for module in third_party:
    try:
        importlib.import_module(module)
    except BaseException:
        pass
assert not any(m == "fusionlens" or m.startswith("fusionlens.") for m in sys.modules)
results = {}
for name in names:
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read)
        try:
            importlib.import_module(name)
            message = ""
        except BaseException:
            message = traceback.format_exc(limit=6)
        with os.fdopen(write, "w") as out:
            out.write(message)
        os._exit(0)
    os.close(write)
    with os.fdopen(read) as pipe:
        message = pipe.read()
    os.waitpid(pid, 0)
    results[name] = message
print(json.dumps(results))
"""


@pytest.fixture(scope="module")
def first_import_errors() -> dict[str, str]:
    proc = subprocess.run([sys.executable, "-c", _RUNNER, json.dumps(MODULES)], capture_output=True, text=True,
                          timeout=300, env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_the_module_list_covers_the_package():
    """The walk finds the subpackages and their modules (a broken walk would make every other test vacuous)."""
    for name in ("fusionlens.world", "fusionlens.world.conditions", "fusionlens.data.builtin",
                 "fusionlens.decompose.rules", "fusionlens.prune.altermoma", "fusionlens.cli.train"):
        assert name in MODULES
    assert not any("._" in name for name in MODULES)


@pytest.mark.parametrize("module", MODULES)
def test_imports_first_in_a_fresh_interpreter(first_import_errors, module):
    assert first_import_errors[module] == "", first_import_errors[module]
