"""Every Python example in README.md and docs/*.md runs as written: the ```python blocks of each page, in order,
as one script in a fresh interpreter (a scratch working directory), which must exit 0."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)


def python_blocks(page: Path) -> list[str]:
    return BLOCK.findall(page.read_text())


@pytest.mark.parametrize("page", [p for p in PAGES if python_blocks(p)], ids=lambda p: p.name)
def test_page_examples_run_as_written(page, tmp_path):
    script = tmp_path / f"doc_example_{page.stem}.py"  # not the page name: nuscenes.py would shadow the devkit
    script.write_text("\n\n".join(python_blocks(page)))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg"}
    done = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=240)
    assert done.returncode == 0, f"{page.name}'s examples failed:\n{done.stderr[-3000:]}"


def test_the_block_extractor_sees_every_python_block(tmp_path):
    page = tmp_path / "p.md"
    page.write_text("text\n```python\na = 1\n```\n```bash\nls\n```\n```python\nb = a + 1\n```\n")
    assert python_blocks(page) == ["a = 1\n", "b = a + 1\n"]
