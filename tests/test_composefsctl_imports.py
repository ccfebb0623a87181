"""composefsctl's client path loads no repository code: a command sent to the
daemon imports neither composefsd.repository nor the modules built on it (the
repository's mount logic, the daemon's methods, composefsctl's direct commands);
only a command that runs directly does. Nor does it load what only makes a start
slow (dataclasses and inspect, the socket module, logging, signal, ctypes and the
kernel code, the daemon's call records): a client command imports what it needs
to encode one call, send it and print the reply."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from servicehelpers import Daemon, start_daemon
from trees import small_tree

#: Modules that hold or import the repository's code.
_REPOSITORY_CODE = (
    "composefsd.repository",
    "composefsd.kernel.repomount",
    "composefsd.service.methods",
    "composefsd.service.replies",
    "composefsd.cli.composefsctl.direct",
)

#: What a client command has no use for, beside the repository's code (the
#: heavy standard modules, the kernel code, the server's records and the dumpfile
#: escapes): each of these cost a client's start a millisecond or many.
_CLIENT_HEAVY = (
    "asyncio",
    "ctypes",
    "dataclasses",
    "inspect",
    "logging",
    "selectors",
    "signal",
    "socket",
    "subprocess",
    "composefsd.image.escape",
    "composefsd.image.format",
    "composefsd.kernel",
    "composefsd.service.context",
    "composefsd.service.runtime",
    "composefsd.service.transport",
)

# Runs composefsctl in a fresh interpreter (so that nothing this test process
# imported counts) for each command line of argv[1] (a JSON list), then prints
# the exit statuses and the modules of argv[2] (a JSON list of prefixes) that
# were loaded after the interpreter started.
_PROBE = """
import json, sys
before = set(sys.modules)
from composefsd.cli.composefsctl import main
statuses = []
for argv in json.loads(sys.argv[1]):
    try:
        statuses.append(main(argv))
    except SystemExit as exc:
        statuses.append(exc.code)
loaded = sorted(
    m for m in set(sys.modules) - before
    if any(m == p or m.startswith(p + ".") for p in json.loads(sys.argv[2]))
)
print(json.dumps({"statuses": statuses, "loaded": loaded}))
"""


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    d = start_daemon(tmp_path_factory.mktemp("repo") / "repo")
    yield d
    assert d.stop() == 0, d.log_text()


def _probe(
    argvs: list[list[str]],
    env: dict[str, str] | None = None,
    watch: tuple[str, ...] = _REPOSITORY_CODE,
) -> dict[str, list[object]]:
    full_env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("COMPOSEFSD_SOCKET", "COMPOSEFSD_REPOSITORY")
    }
    full_env |= env or {}
    proc = subprocess.run(
        [sys.executable, "-c", _PROBE, json.dumps(argvs), json.dumps(watch)],
        capture_output=True,
        text=True,
        env=full_env,
        check=True,
    )
    result: dict[str, list[object]] = json.loads(proc.stdout.splitlines()[-1])
    return result


def test_daemon_commands_load_no_repository_code(daemon: Daemon, tmp_path: Path) -> None:
    tree = small_tree(tmp_path / "tree")
    connect = ["--connect", daemon.address]
    result = _probe(
        [
            ["--help"],
            [*connect, "status", "--json"],
            [*connect, "create-image", str(tree), "--ref", "probe"],
            [*connect, "images"],
            [*connect, "verify", "--all"],
            [*connect, "verify", "no-such-image"],
            [*connect, "mounts", "--all"],
            [*connect, "gc", "--dry-run"],
            [*connect, "oci", "images", "--json"],
            [*connect, "oci", "inspect", "no-such-tag"],
            [*connect, "oci", "pull", "oci:no/such/layout"],
        ]
    )
    assert result["statuses"] == [0, 0, 0, 0, 0, 1, 0, 0, 0, 1, 1]
    assert result["loaded"] == []
    # The daemon found through $COMPOSEFSD_SOCKET, as a user would have it.
    result = _probe([["images", "--json"]], env={"COMPOSEFSD_SOCKET": daemon.address})
    assert result == {"statuses": [0], "loaded": []}


def test_daemon_commands_load_no_heavy_modules(daemon: Daemon, tmp_path: Path) -> None:
    tree = small_tree(tmp_path / "tree")
    connect = ["--connect", daemon.address]
    argvs = [
        ["--help"],
        [*connect, "status"],
        [*connect, "create-image", str(tree), "--ref", "light"],
        [*connect, "images"],
        [*connect, "verify", "light"],
        [*connect, "mounts"],
        [*connect, "gc", "--dry-run"],
        # The whole client side of a mount and an unmount, which the daemon refuses
        # (no such image; nothing mounted there).
        [*connect, "mount", "no-such-image", str(tmp_path)],
        [*connect, "unmount", str(tmp_path)],
        [*connect, "remove-image", "light"],
        [*connect, "oci", "images"],
        [*connect, "info"],
        [*connect, "call", "io.composefs.Repository.ListImages", "{}"],
    ]
    result = _probe(argvs, watch=_CLIENT_HEAVY + _REPOSITORY_CODE)
    assert result["statuses"] == [0, 0, 0, 0, 0, 0, 0, 1, 1, 0, 0, 0, 0]
    assert result["loaded"] == []
    # The daemon named by $COMPOSEFSD_SOCKET: an address given, so no runtime checks.
    result = _probe([["status"]], env={"COMPOSEFSD_SOCKET": daemon.address}, watch=_CLIENT_HEAVY)
    assert result == {"statuses": [0], "loaded": []}


def test_the_client_probe_sees_heavy_modules(daemon: Daemon, tmp_path: Path) -> None:
    # The check can fail: an idmapped mount's mappings load the kernel code
    # (the daemon refuses the mount, but only after the client sent it).
    argv = ["--connect", daemon.address, "mount", "no-such-image", str(tmp_path)]
    result = _probe([[*argv, "--uid-map", "0:1000:1"]], watch=_CLIENT_HEAVY)
    assert result["statuses"] == [1]
    assert "composefsd.kernel.userns" in result["loaded"]
    assert "dataclasses" in result["loaded"]


def test_direct_commands_load_the_repository(daemon: Daemon) -> None:
    # The probe sees the modules when they are loaded: a command run directly.
    result = _probe([["--direct", "--repo", str(daemon.repo), "images"]])
    assert result["statuses"] == [0]
    assert "composefsd.repository" in result["loaded"]
    assert "composefsd.cli.composefsctl.direct" in result["loaded"]


# What each tool may not load just to start (its import and a --help, or
# composefsctl parsing a client command line): the code it needs only for real
# work, and the heavy standard modules (ctypes, asyncio, subprocess, dataclasses'
# inspect, ...) that used to make our start-up several times C's. Modules the
# interpreter already had before the import (site hooks, for one) do not count.
_HEAVY = (
    "asyncio",
    "ctypes",
    "dataclasses",
    "inspect",
    "subprocess",
    "varlink",
    "concurrent.futures",
    "composefsd.kernel.mount",
    "composefsd.kernel.syscalls",
    "composefsd.repository",
    "composefsd.workerproc",
)
_START_PROBE = """
import contextlib, json, sys
before = set(sys.modules)
import importlib
module = importlib.import_module(sys.argv[1])
if sys.argv[2] == "parse":
    module.parse_args(json.loads(sys.argv[3]))
else:
    with contextlib.suppress(SystemExit):
        module.main(json.loads(sys.argv[3]))
with open(sys.argv[4], "w") as f:
    json.dump(sorted(set(sys.modules) - before), f)
"""


def _loaded(module: str, how: str, argv: list[str], tmp_path: Path) -> list[str]:
    out = tmp_path / "loaded.json"
    subprocess.run(
        [sys.executable, "-c", _START_PROBE, module, how, json.dumps(argv), str(out)],
        capture_output=True,
        check=True,
    )
    loaded: list[str] = json.loads(out.read_text())
    return loaded


def _heavy(loaded: list[str], *extra: str) -> list[str]:
    return [m for m in loaded if any(m == p or m.startswith(p + ".") for p in _HEAVY + extra)]


@pytest.mark.parametrize(
    ("module", "argv"),
    [
        ("composefsd.cli.mkcomposefs", ["--help"]),
        ("composefsd.cli.mkcomposefs", ["--no-such-option"]),
        ("composefsd.cli.info", []),
        ("composefsd.cli.info", ["--help"]),
    ],
)
def test_c_tools_start_without_image_code(module: str, argv: list[str], tmp_path: Path) -> None:
    loaded = _loaded(module, "main", argv, tmp_path)
    assert module in loaded  # the probe saw the import
    assert _heavy(loaded, "composefsd.image", "composefsd.fsverity", "logging") == []


@pytest.mark.parametrize(
    "argv",
    [
        ["--help"],
        ["status"],
        ["images", "--json"],
        ["mount", "img", "/mnt", "--uid-map", "0:1000:1"],
        ["oci", "pull", "oci:/layout"],
        ["call", "io.composefs.Repository.ListImages", "{}"],
    ],
)
def test_composefsctl_parses_without_heavy_modules(argv: list[str], tmp_path: Path) -> None:
    how = "main" if argv == ["--help"] else "parse"
    loaded = _loaded("composefsd.cli.composefsctl", how, argv, tmp_path)
    assert "composefsd.cli.composefsctl.remote" in loaded
    assert _heavy(loaded, *_CLIENT_HEAVY, "composefsd.image.reader", "composefsd.image.tree") == []


def test_the_probe_sees_heavy_modules(tmp_path: Path) -> None:
    # The check can fail: a command that does real work loads them.
    (tmp_path / "tree").mkdir()
    argv = ["--print-digest-only", str(tmp_path / "tree")]
    loaded = _loaded("composefsd.cli.mkcomposefs", "main", argv, tmp_path)
    assert "composefsd.sources.directory" in _heavy(loaded, "composefsd.sources")
    assert "subprocess" in _heavy(loaded)
