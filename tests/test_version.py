"""``--version`` of composefsd and composefsctl: ``PROG VERSION`` on stdout, exit 0,
the version being the one pyproject.toml sets (through the installed metadata);
and ``python -m composefsd``, which is the daemon."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest

import composefsd
from composefsd.cli.composefsctl import main as composefsctl_main
from composefsd.service.daemon import main as composefsd_main

_PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"


def _project_version() -> str:
    with _PYPROJECT.open("rb") as f:
        version: str = tomllib.load(f)["project"]["version"]
    return version


def test_version_is_the_projects() -> None:
    assert composefsd.version() == _project_version()
    assert composefsd.__version__ == composefsd.version()
    with pytest.raises(AttributeError):
        _ = composefsd.no_such_attribute  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("prog", "main"), [("composefsctl", composefsctl_main), ("composefsd", composefsd_main)]
)
def test_version_option(
    prog: str, main: Callable[[Sequence[str]], int], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    out, err = capsys.readouterr()
    assert (out, err) == (f"{prog} {_project_version()}\n", "")


@pytest.mark.parametrize(
    ("module", "prog"),
    [
        ("composefsd.cli.composefsctl", "composefsctl"),
        ("composefsd.service.daemon", "composefsd"),
        ("composefsd", "composefsd"),
    ],
)
def test_version_in_a_fresh_process(module: str, prog: str) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", module, "--version"], capture_output=True, text=True, check=False
    )
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, f"{prog} {_project_version()}\n", "")


def test_composefsctl_help_names_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        composefsctl_main(["--help"])
    assert "--version" in capsys.readouterr().out


def test_python_m_composefsd_is_the_daemon() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "composefsd", "--help"], capture_output=True, text=True, check=False
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("usage: composefsd ")
    assert "--listen PATH" in proc.stdout and "--repo PATH" in proc.stdout
