"""Running ``composefsctl`` in-process from a test and capturing what it prints, and
checking that it prints hostile names escaped."""

from __future__ import annotations

from pathlib import Path

import pytest

from composefsd.cli.composefsctl import main


def run_ctl(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """(exit status, stdout, stderr) of ``composefsctl argv`` run in-process."""
    try:
        status = main(list(argv))
    except SystemExit as exc:
        status = exc.code if isinstance(exc.code, int) else 1
    out, err = capsys.readouterr()
    return status, out, err


#: A ref name that, printed as it is, adds a row to ``composefsctl images``.
FORGED_REF = "evil\n" + "0" * 64 + "     1.0 KiB  2024-01-01 00:00:00  forged"
#: Names that drive a terminal (clear the screen) or reorder what it shows.
PLANTED_REFS = (FORGED_REF, "clear\x1b[2J", "rtl\u202etxt.exe", "back\\slash")


def plant_refs(repo: Path, digest: str) -> None:
    """Refs with names composefsd no longer accepts, as an older version or another
    tool could have left them in a repository."""
    for name in PLANTED_REFS:
        (repo / "images" / "refs" / name).symlink_to(f"../{digest}")


def check_escaped(text: str) -> None:
    """Every line printable, and the planted names only in escaped form."""
    for line in text.splitlines():
        assert line.isprintable(), line
    assert "evil\\n" + "0" * 64 in text
    assert "clear\\x1b[2J" in text
    assert "rtl\\u202etxt.exe" in text
    assert "back\\\\slash" in text
