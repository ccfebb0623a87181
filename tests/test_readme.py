"""What the README tells a new user holds: the files it names exist where it says
(with their ``src/``), and the quick start's ``S=`` finds the socket composefsd
listens on by default, for root and for other users with and without
$XDG_RUNTIME_DIR."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

from composefsd.service.runtime import default_socket_path

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")


def test_named_files_exist() -> None:
    named = re.findall(r"`((?:src|tests|benchmarks|systemd)/[\w./-]+)`", README)
    assert "src/composefsd/repository/locking.py" in named
    assert [p for p in named if not (ROOT / p).exists()] == []
    # A module's file path without its src/ leads nowhere from a checkout.
    assert re.findall(r"`composefsd/[\w/]+\.py`", README) == []


def _quick_start_socket_lines() -> str:
    block = README[README.index("## Service quick start") :]
    lines = block[: block.index("varlinkctl info $S")].splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("# S: "))
    chosen = lines[start + 1 : start + 3]
    assert chosen[-1].startswith("S="), chosen
    return "\n".join(chosen)


@pytest.mark.parametrize(
    ("uid", "xdg"), [(0, ""), (0, "/run/user/0"), (1000, ""), (1000, "/run/user/1000")]
)
def test_quick_start_finds_the_default_socket(
    uid: int, xdg: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # `id -u` answers as the user the line is tried for.
    stub = tmp_path / "id"
    stub.write_text(f'#!/bin/sh\n[ "$1" = -u ] && echo {uid}\n')
    stub.chmod(0o755)
    env = {"PATH": f"{tmp_path}:{os.environ.get('PATH', '/usr/bin:/bin')}"}
    if xdg:
        env["XDG_RUNTIME_DIR"] = xdg
    script = _quick_start_socket_lines() + '\nprintf %s "$S"'
    proc = subprocess.run(
        ["/bin/sh", "-c", script], env=env, capture_output=True, text=True, check=True
    )
    monkeypatch.setenv("XDG_RUNTIME_DIR", xdg)
    assert proc.stdout == str(default_socket_path(uid))
