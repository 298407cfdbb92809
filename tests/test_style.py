"""Style is enforced: CI runs `make lint` (ruff's lint and formatter) before the tests, and
the recipe fails on a file ruff would reformat."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _style(path: Path) -> subprocess.CompletedProcess:
    """`make style` (the checks of `make lint`, without its install step) on ``path``."""
    return subprocess.run(
        ["make", "--no-print-directory", "style", f"LINT_PATHS={path}", f"PY={sys.executable}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.fixture(scope="module")
def ruff_and_make():
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    if (
        subprocess.run([sys.executable, "-m", "ruff", "--version"], capture_output=True).returncode
        != 0
    ):
        pytest.skip("ruff is not installed (the dev extra)")


def test_ci_runs_the_style_checks_before_the_tests():
    lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert lines.index("make lint") < lines.index("make test")


def test_the_recipe_fails_on_an_unformatted_file(ruff_and_make, tmp_path):
    source = tmp_path / "unformatted.py"
    source.write_text("x = {  'a':1,\n'b' : 2}\n")
    result = _style(source)
    assert result.returncode != 0
    assert "would be reformatted" in result.stdout + result.stderr


def test_the_recipe_passes_on_a_formatted_file(ruff_and_make, tmp_path):
    source = tmp_path / "formatted.py"
    source.write_text('x = {"a": 1, "b": 2}\n')
    assert _style(source).returncode == 0
