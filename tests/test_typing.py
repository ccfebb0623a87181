"""The code is type-checked as part of the suite: ``mypy`` (configured in pyproject.toml,
strict) is clean on src/ and on tests/."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("paths", [[], ["tests"]], ids=["src", "tests"])
def test_mypy_is_clean(paths: list[str]) -> None:
    # With no paths mypy checks the configured files (src/composefsd).
    proc = subprocess.run(
        [sys.executable, "-m", "mypy", *paths],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
