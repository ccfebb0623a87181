"""Registration under a Varlink registry (/run/varlink/registry/ as systemd 260
has it): one link per interface composefsd serves, not io.systemd.service or
org.varlink.service; made when serving starts, removed at exit; never replacing
or removing an entry that is not ours; only in a trusted directory. Every test
uses a registry of its own (--registry-dir): never the real /run/varlink."""

from __future__ import annotations

import os
import socket
import subprocess
from pathlib import Path

import pytest

from composefsd.service.registry import register, registered_interfaces
from composefsd.service.runtime import UnsafeDirectoryError
from sdnotify import notified_daemon
from servicehelpers import DAEMON, TEST_ALGORITHM, short_dir

SERVED = [
    "org.varlink.service",
    "io.composefs.Repository",
    "io.composefs.Oci",
    "io.systemd.service",
]
OURS = ["io.composefs.Oci", "io.composefs.Repository"]
#: What a composefsd registers: every interface it serves but the two every service has.
DAEMON_REGISTERS = [
    "io.composefs.Oci",
    "io.composefs.Repository",
    "org.composefs.Oci",
    "org.composefs.Repository",
]


def test_registered_interfaces() -> None:
    assert registered_interfaces(SERVED) == OURS
    # Names that are not interface names never become file names.
    assert registered_interfaces(["../etc", "a/b", ".hidden", "x", "ok.name", ""]) == ["ok.name"]


def test_register_and_remove(tmp_path: Path) -> None:
    registry = tmp_path / "varlink" / "registry"
    sock = tmp_path / "sock"
    reg = register(registry, SERVED, sock)
    assert sorted(p.name for p in registry.iterdir()) == OURS
    for name in OURS:
        assert os.readlink(registry / name) == str(sock)
    assert registry.stat().st_mode & 0o777 == 0o755
    reg.remove()
    assert list(registry.iterdir()) == []


def test_never_clobbers(tmp_path: Path) -> None:
    registry = tmp_path / "registry"
    registry.mkdir()
    sock = tmp_path / "sock"
    (registry / "io.composefs.Repository").symlink_to("/run/somebody-else/socket")
    (registry / "io.composefs.Oci").write_text("not a link\n")
    reg = register(registry, SERVED, sock)
    assert reg.entries == []
    assert os.readlink(registry / "io.composefs.Repository") == "/run/somebody-else/socket"
    reg.remove()
    assert os.readlink(registry / "io.composefs.Repository") == "/run/somebody-else/socket"
    assert (registry / "io.composefs.Oci").read_text() == "not a link\n"
    # A link of ours left by an earlier run is taken over, and removed at the end;
    # one that was replaced in the meantime is not ours any more.
    (registry / "io.composefs.Oci").unlink()
    (registry / "io.composefs.Oci").symlink_to(sock)
    reg = register(registry, SERVED, sock)
    assert [p.name for p in reg.entries] == ["io.composefs.Oci"]
    (registry / "io.composefs.Oci").unlink()
    (registry / "io.composefs.Oci").symlink_to("/elsewhere")
    reg.remove()
    assert os.readlink(registry / "io.composefs.Oci") == "/elsewhere"


@pytest.mark.parametrize("mode", [0o777, 0o1777, 0o775])
def test_untrusted_registry(tmp_path: Path, mode: int) -> None:
    registry = tmp_path / "registry"
    registry.mkdir()
    registry.chmod(mode)
    with pytest.raises(UnsafeDirectoryError):
        register(registry, SERVED, tmp_path / "sock")
    assert list(registry.iterdir()) == []


def test_registry_is_a_link(tmp_path: Path) -> None:
    real = tmp_path / "real"
    real.mkdir()
    os.chown(real, 65534, 65534)
    (tmp_path / "registry").symlink_to(real)
    with pytest.raises(UnsafeDirectoryError):
        register(tmp_path / "registry", SERVED, tmp_path / "sock")


def test_daemon_registers(tmp_path: Path) -> None:
    registry = tmp_path / "registry"
    with notified_daemon(tmp_path / "repo", "--registry-dir", str(registry)) as d:
        assert sorted(p.name for p in registry.iterdir()) == DAEMON_REGISTERS
        for name in DAEMON_REGISTERS:
            target = os.readlink(registry / name)
            assert target == d.address
            s = socket.socket(socket.AF_UNIX)
            s.connect(str(registry / name))  # the link leads to the daemon
            s.close()
    assert list(registry.iterdir()) == []


def test_daemon_leaves_others_alone(tmp_path: Path) -> None:
    registry = tmp_path / "registry"
    registry.mkdir()
    (registry / "io.composefs.Oci").symlink_to("/run/another/io.composefs.Oci")
    (registry / "io.example.Other").symlink_to("/run/example")
    with notified_daemon(tmp_path / "repo", "--registry-dir", str(registry)) as d:
        assert os.readlink(registry / "io.composefs.Repository") == d.address
        d.wait_log("not registering io.composefs.Oci")
    assert sorted(p.name for p in registry.iterdir()) == ["io.composefs.Oci", "io.example.Other"]
    assert os.readlink(registry / "io.composefs.Oci") == "/run/another/io.composefs.Oci"


def test_daemon_with_untrusted_registry_still_serves(tmp_path: Path) -> None:
    registry = tmp_path / "registry"
    registry.mkdir()
    registry.chmod(0o777)
    with notified_daemon(tmp_path / "repo", "--registry-dir", str(registry)) as d:
        d.wait_log(f"not registering in {registry}")
    assert list(registry.iterdir()) == []


def test_no_registration_without_asking(tmp_path: Path) -> None:
    """--listen without --registry-dir, --no-registry, and a socket systemd hands
    over (its socket unit registers it): no links anywhere."""
    registry = tmp_path / "registry"
    with notified_daemon(tmp_path / "repo", "--registry-dir", str(registry), "--no-registry") as d:
        d.wait_log("ready")
    assert not registry.exists()
    rundir = short_dir("cfsd-reg-")
    try:
        listener = socket.socket(socket.AF_UNIX)
        listener.bind(str(rundir / "sock"))
        listener.listen()
        fd = listener.fileno()
        # Moves the socket to fd 3 and runs the daemon with LISTEN_PID set to its
        # own pid, as systemd does.
        launcher = (
            "import os, sys\n"
            f"fd = {fd}\n"
            "if fd != 3:\n"
            "    os.dup2(fd, 3)\n"
            "    os.close(fd)\n"
            "os.environ.update(LISTEN_PID=str(os.getpid()), LISTEN_FDS='1')\n"
            "from composefsd.service.daemon import main\n"
            "sys.exit(main(sys.argv[1:]))\n"
        )
        env = {k: v for k, v in os.environ.items() if not k.startswith(("LISTEN_", "NOTIFY"))}
        argv = [DAEMON[0], "-c", launcher, "--repo", str(tmp_path / "repo2")]
        argv += ["--algorithm", TEST_ALGORITHM, "--runtime-dir", str(rundir / "rt")]
        argv += ["--registry-dir", str(registry), "--idle-timeout", "0.5"]
        proc = subprocess.Popen(
            argv,
            pass_fds=[fd],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        out, _ = proc.communicate(timeout=60)
        assert proc.returncode == 0, out
        assert b"ready" in out
        assert not registry.exists()
        listener.close()
    finally:
        for child in rundir.iterdir():
            if child.is_dir():
                for c in child.iterdir():
                    c.unlink()
                child.rmdir()
            else:
                child.unlink()
        rundir.rmdir()


def test_which_registry() -> None:
    """Root on the default socket: systemd's registry; --listen: only with
    --registry-dir; --no-registry or a socket from systemd: none."""
    from argparse import Namespace

    from composefsd.service.daemon import _Listener, _registry_dir
    from composefsd.service.registry import SYSTEM_REGISTRY

    own = _Listener(Path("/run/composefs/io.composefs.Repository"), 1)

    def ns(**kw: object) -> Namespace:
        return Namespace(**{"listen": None, "registry_dir": None, "no_registry": False, **kw})

    root = os.geteuid() == 0
    assert _registry_dir(ns(), own) == (SYSTEM_REGISTRY if root else None)
    assert _registry_dir(ns(listen="/x/sock"), own) is None
    assert _registry_dir(ns(listen="/x/sock", registry_dir="/r"), own) == Path("/r")
    assert _registry_dir(ns(registry_dir="/r", no_registry=True), own) is None
    assert _registry_dir(ns(registry_dir="/r"), None) is None
