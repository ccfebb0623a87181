"""composefsd against a hostile local user (issue 11, points 4 to 7), as a real daemon
with callers that are real other users (the session's throw-away ``test_users``).

* Bad input gets the error it should: deeply nested JSON is a protocol error, lone
  surrogates are InvalidParameter, over-long, over-deep and control-character ref
  names are InvalidName, and names end up escaped in the daemon's log.
* Memory: connections holding partial messages cannot take the daemon's memory,
  and what they held is given back once they are gone.
* Connections: one uid cannot open so many that others are locked out; root is
  always served.
* Work: one uid flooding heavy calls (Verify) does not slow down others' cheap
  calls (Describe).

Users' clients are ``tests/peer.py`` run as those users; they report on stdout
and wait for a line on stdin, so every step waits for an event, not for a time.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from composefsd.kernel.mountinfo import composefs_mount_at
from composefsd.kernel.syscalls import MNT_DETACH, umount2
from composefsd.service.client import connect
from composefsd.service.daemon import _Formatter, _JournalFormatter
from servicehelpers import make_tree, start_daemon

IFACE = "io.composefs.Repository"


def test_log_formatters_escape_the_message_not_the_traceback() -> None:
    try:
        raise ValueError("boom")
    except ValueError:
        exc_info = sys.exc_info()
    record = logging.LogRecord(
        "composefsd", logging.ERROR, __file__, 1, "removed %s", ("a\n<3>forged",), exc_info
    )
    text = _JournalFormatter("%(message)s").format(record)
    lines = text.splitlines()
    assert lines[0] == "<3>removed a\\n<3>forged"
    assert lines[1] == "<3>Traceback (most recent call last):"
    assert lines[-1] == "<3>ValueError: boom"
    record.exc_info = None
    record.exc_text = None
    plain = _Formatter("%(levelname)s: %(message)s").format(record)
    assert plain == "ERROR: removed a\\n<3>forged"


@pytest.fixture
def mnt(tmp_path: Path) -> Iterator[Path]:
    where = tmp_path / "mnt\n<3>forged entry"
    where.mkdir()
    yield where
    while composefs_mount_at(str(where)) is not None:
        umount2(str(where), MNT_DETACH)


def test_names_in_the_daemons_log_are_escaped(tmp_path: Path, mnt: Path) -> None:
    d = start_daemon(tmp_path / "repo", env={**os.environ, "JOURNAL_STREAM": "8:1234"})
    try:
        with connect(d.address) as conn:
            tree = make_tree(tmp_path / "tree")
            conn.call(f"{IFACE}.CreateImage", {"sourcePath": str(tree), "ref": "base"})
            conn.call(f"{IFACE}.Mount", {"image": "base", "where": str(mnt)})
            conn.call(f"{IFACE}.Unmount", {"where": str(mnt)})
        # Logged before the replies went out.
        lines = d.log_text().splitlines()
    finally:
        assert d.stop() == 0
    assert not [line for line in lines if line.startswith("<3>forged")], lines
    mounted = [line for line in lines if line.startswith("<6>mounted image ")]
    assert len(mounted) == 1 and "mnt\\n<3>forged entry" in mounted[0], lines
