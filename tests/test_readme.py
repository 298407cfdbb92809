"""The README's quick-start program runs as written, on the CPU, in a fresh interpreter."""

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def quick_start_code() -> str:
    """The first ``python`` block of the README's "Quick start" section."""
    text = (ROOT / "README.md").read_text()
    section = re.search(r"^## Quick start\n(.*?)(?=^## |\Z)", text, re.MULTILINE | re.DOTALL)
    assert section, "README.md has no '## Quick start' section"
    block = re.search(r"^```python\n(.*?)^```$", section.group(1), re.MULTILINE | re.DOTALL)
    assert block, "the Quick start section has no python block"
    return block.group(1)


def test_quick_start_runs_as_written(tmp_path):
    environment = {**os.environ, "PYTHONPATH": str(ROOT), "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run(
        [sys.executable, "-c", quick_start_code()],
        cwd=tmp_path,
        env=environment,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    accuracy = float(re.search(r"training accuracy ([0-9.]+)", done.stdout).group(1))
    assert accuracy > 0.9, done.stdout  # it learned: chance is about 0.25
