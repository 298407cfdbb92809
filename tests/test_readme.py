"""The README's quick-start program runs as written, on the CPU, in a fresh interpreter."""

import importlib
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


DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
# Built by nvcc only (tests/backends/test_cuda_build.py checks it where a toolkit is found).
COMPILED = {"lorasc_kernels._C"}


def resolve(path: str):
    """The object at the dotted ``path``: its longest importable module prefix, then
    attributes."""
    parts = path.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            found = importlib.import_module(".".join(parts[:cut]))
        except ModuleNotFoundError:
            continue
        for attribute in parts[cut:]:
            found = getattr(found, attribute)
        return found
    raise ModuleNotFoundError(path)


def api_table_names() -> list[str]:
    """The first column of the README's "## API" table: a name with its signature, or a
    dotted path."""
    text = (ROOT / "README.md").read_text()
    section = re.search(r"^## API\n(.*?)(?=^## |\Z)", text, re.MULTILINE | re.DOTALL)
    assert section, "README.md has no '## API' section"
    names = re.findall(r"^\| `([A-Za-z_][\w.]*)", section.group(1), re.MULTILINE)
    assert len(names) >= 10, names
    return names


def documented_paths() -> list[str]:
    """Every ``from lorasc_kernels... import a, b`` (as ``module.a``) and every backticked
    ``lorasc_kernels.dotted.path`` of the README and docs/."""
    paths = []
    for document in DOCUMENTS:
        text = document.read_text()
        for module, names in re.findall(r"from (lorasc_kernels[\w.]*) import ([\w, ]+)", text):
            paths += [f"{module}.{name.strip()}" for name in names.split(",") if name.strip()]
        paths += re.findall(r"`(?:python -m )?(lorasc_kernels(?:\.\w+)+)", text)
    return sorted(set(paths) - COMPILED)


def test_api_table_names_are_public():
    import lorasc_kernels

    for name in api_table_names():
        if name.startswith("lorasc_kernels."):
            assert resolve(name) is not None, name
        else:
            assert name in lorasc_kernels.__all__, name
            assert getattr(lorasc_kernels, name) is not None, name
    for name in lorasc_kernels.__all__:
        assert getattr(lorasc_kernels, name) is not None, name


def test_documented_imports_resolve():
    paths = documented_paths()
    assert "lorasc_kernels.integrations.peft.use_fused_kernels" in paths
    for path in paths:
        assert resolve(path) is not None, path
