"""Shared fixtures: where the C reference tools and the C test assets are."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
# run-tests exports where tests/shared-dir found it; else it sits beside the checkout.
SHARED = Path(os.environ.get("COMPOSEFSD_SHARED") or REPO.parent / "shared")
TESTDATA = SHARED / "testdata" / "composefs-c"


def _reference_bin() -> Path:
    env = os.environ.get("COMPOSEFS_REFERENCE_BIN")
    if env:
        return Path(env)
    script = SHARED / "tools" / "reference-tools"
    out = subprocess.run([str(script)], check=True, capture_output=True, text=True).stdout
    path = Path(out.strip().splitlines()[-1])
    os.environ["COMPOSEFS_REFERENCE_BIN"] = str(path)
    return path


@pytest.fixture(scope="session")
def reference_bin() -> Path:
    """Folder holding C mkcomposefs, composefs-info, mount.composefs (1.0.8) and varlinkctl."""
    path = _reference_bin()
    assert (path / "mkcomposefs").exists(), f"no C mkcomposefs in {path}"
    return path


@pytest.fixture(scope="session")
def testdata() -> Path:
    assert TESTDATA.is_dir(), f"C test assets missing at {TESTDATA}"
    return TESTDATA


_LINE_NUMBER = re.compile(rb" \(line \d+\)$", re.MULTILINE)


def without_line_numbers(stderr: bytes) -> bytes:
    """Our dumpfile errors are C's messages plus " (line N)"; drop that to compare with C."""
    return _LINE_NUMBER.sub(b"", stderr)
