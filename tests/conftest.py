"""Shared fixtures: where the C reference tools and the C test assets are, the session's
test users, and a composefsd with a source tree and a mount point for the service tests.

The helpers behind them live in tests/servicehelpers.py (running the daemon) and
tests/trees.py (source trees); a module needing another kind of daemon (another scope,
options or exit check) overrides ``daemon`` with one built on ``running_daemon``."""

from __future__ import annotations

import os
import re
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

import users
from composefsd.kernel.mountinfo import composefs_mount_at
from composefsd.kernel.syscalls import MNT_DETACH, umount2
from registry import (  # noqa: F401 - fixtures
    auth_registry,
    golden_registry,
    registry,
    tls_registry,
)
from servicehelpers import Daemon, running_daemon
from trees import small_tree

REPO = Path(__file__).resolve().parent.parent
# run-tests exports where tests/shared-dir found it; else it sits beside the checkout.
SHARED = Path(os.environ.get("COMPOSEFSD_SHARED") or REPO.parent / "shared")
TESTDATA = SHARED / "testdata" / "composefs-c"
#: The daemons the tests start must not ask the machine's polkit (if it has one): no
#: system bus for them, unless a test gives its own (tests/test_polkit.py).
NO_SYSTEM_BUS = "unix:path=/nonexistent/composefsd-tests/system_bus_socket"
os.environ["DBUS_SYSTEM_BUS_ADDRESS"] = NO_SYSTEM_BUS


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
def varlinkctl(reference_bin: Path) -> str:
    """systemd 257's varlinkctl, the reference client the tests compare with."""
    path = reference_bin / "varlinkctl"
    assert path.exists(), f"no varlinkctl in {reference_bin}"
    version = subprocess.run([str(path), "--version"], capture_output=True, text=True, check=True)
    assert version.stdout.startswith("systemd 257"), version.stdout
    return str(path)


@pytest.fixture(scope="session")
def testdata() -> Path:
    assert TESTDATA.is_dir(), f"C test assets missing at {TESTDATA}"
    return TESTDATA


_LINE_NUMBER = re.compile(rb" \(line \d+\)$", re.MULTILINE)


def without_line_numbers(stderr: bytes) -> bytes:
    """Our dumpfile errors are C's messages plus " (line N)"; drop that to compare with C."""
    return _LINE_NUMBER.sub(b"", stderr)


@dataclass(frozen=True, slots=True)
class TestUsers:
    """Two non-root users made for this session, and a group only ``alice`` is in."""

    alice: users.TestUser
    bob: users.TestUser
    #: A supplementary group of alice's (bob is not a member).
    group: int

    __test__ = False


@pytest.fixture(scope="session")
def test_users() -> Iterator[TestUsers]:
    """Non-root users created for the session and deleted after it (tests run as root)."""
    assert os.geteuid() == 0, "the tests run as root (they create users)"
    users.remove_stale_users()
    group = users.create_group()
    made: list[users.TestUser] = []
    try:
        made.append(users.create_user(groups=(group,)))
        made.append(users.create_user())
        yield TestUsers(made[0], made[1], group)
    finally:
        for user in made:
            users.delete_user(user)
        users.delete_group(group)


@pytest.fixture(scope="session")
def user_python() -> Iterator[users.UserPython]:
    """A Python test users can run composefsd code with (see tests/users.py)."""
    dest = users.public_dir("cfsd-pylib-")
    try:
        yield users.make_user_python(dest)
    finally:
        users.remove_tree(dest)


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    """One composefsd on a new repository for a module's tests; it must exit 0 at the end."""
    with running_daemon(tmp_path_factory.mktemp("repo") / "repo") as d:
        yield d


@pytest.fixture(scope="session")
def rs_trees(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The composefs-rs golden trees, extracted once a session (``rsgolden.unpack_trees``):
    ``<path>/<tree>``. Tests must not change them."""
    from rsgolden import unpack_trees  # rsgolden imports this module

    return unpack_trees(tmp_path_factory.mktemp("rs-trees"))


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A module's ``trees.small_tree``."""
    return small_tree(tmp_path_factory.mktemp("tree"))


@pytest.fixture
def mnt(tmp_path: Path) -> Iterator[Path]:
    """A mount point that is cleaned up even if the test leaves something mounted."""
    where = tmp_path / "mnt"
    where.mkdir()
    yield where
    while composefs_mount_at(str(where)) is not None:
        umount2(where, MNT_DETACH)
