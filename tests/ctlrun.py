"""Running ``composefsctl`` in-process from a test and capturing what it prints."""

from __future__ import annotations

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
