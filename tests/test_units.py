"""systemd/: the units parse cleanly (``systemd-analyze verify`` reports nothing, no
ordering cycle with the host's own targets), the service keeps to the host's mount
namespace, and composefs-mount-generator turns mounts.conf into the expected units
and refuses bad lines clearly."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
import varlink

from composefsd.repository import Repository
from composefsd.service.daemon import build_service
from composefsd.service.mounts import MountTracker
from composefsd.service.registry import SYSTEM_REGISTRY, registered_interfaces

REPO = Path(__file__).resolve().parent.parent
UNITS = REPO / "systemd"
IDL = REPO / "src" / "composefsd" / "service" / "io.composefs.Repository.varlink"
SOCKET = "unix:/run/composefs/io.composefs.Repository"

SYSTEMD_ANALYZE = shutil.which("systemd-analyze")
SYSTEMD_ESCAPE = shutil.which("systemd-escape")


@dataclass
class Installed:
    root: Path
    unit_dir: Path
    generator: Path
    composefsd: str
    composefsctl: str


def _directives(path: Path) -> list[tuple[str, str, str]]:
    """(section, key, value) of every assignment, in order (duplicates kept)."""
    section = ""
    out = []
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        out.append((section, key.strip(), value.strip()))
    return out


def _values(path: Path, section: str, key: str) -> list[str]:
    return [v for s, k, v in _directives(path) if s == section and k == key]


def _install(tmp_path: Path, *extra: str) -> Installed:
    """install-units into tmp_path/root, with a fake composefsd and, beside it, a
    composefsctl (the default install-units picks) that also exist at the same absolute paths on the host (systemd-analyze verify checks
    ExecStart= binaries there)."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    root = tmp_path / "root"
    for name in ("composefsd", "composefsctl"):
        for where in (bindir, Path(str(root) + str(bindir))):
            where.mkdir(parents=True, exist_ok=True)
            (where / name).write_text("#!/bin/sh\nexit 0\n")
            (where / name).chmod(0o755)
    proc = subprocess.run(
        [
            str(UNITS / "install-units"),
            "--root",
            str(root),
            "--composefsd",
            str(bindir / "composefsd"),
            *extra,
        ],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    if "--enable" not in extra:  # (systemctl enable reports its symlinks on stderr)
        assert proc.stderr == ""
    unit_dir = root / "etc/systemd/system"
    return Installed(
        root=root,
        unit_dir=unit_dir,
        generator=root / "etc/systemd/system-generators/composefs-mount-generator",
        composefsd=str(bindir / "composefsd"),
        composefsctl=str(bindir / "composefsctl"),
    )


def _generate(
    generator: Path, conf_text: str | None, tmp_path: Path
) -> tuple[subprocess.CompletedProcess[str], Path]:
    conf = tmp_path / "mounts.conf"
    if conf_text is not None:
        conf.write_text(conf_text)
    out = tmp_path / "gen"
    dirs = [out / "normal", out / "early", out / "late"]
    for d in dirs:
        d.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, COMPOSEFS_MOUNTS_CONF=str(conf))
    proc = subprocess.run(
        [str(generator), *map(str, dirs)], capture_output=True, text=True, env=env
    )
    return proc, dirs[0]


def _verify(unit_paths: list[str], *search: Path) -> subprocess.CompletedProcess[str]:
    assert SYSTEMD_ANALYZE is not None, "systemd-analyze is missing (Debian: systemd)"
    env = dict(os.environ, SYSTEMD_UNIT_PATH=":".join(map(str, search)) + ":")
    env.pop("SYSTEMD_LOG_LEVEL", None)
    return subprocess.run(
        [SYSTEMD_ANALYZE, "verify", "--man=no", "--generators=no", *unit_paths],
        capture_output=True,
        text=True,
        env=env,
    )


def _escape(where: str, template: str = "composefs-mount@.service") -> str:
    assert SYSTEMD_ESCAPE is not None
    return subprocess.run(
        [SYSTEMD_ESCAPE, "--path", f"--template={template}", where],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()


def _mount_name(where: str) -> str:
    assert SYSTEMD_ESCAPE is not None
    return subprocess.run(
        [SYSTEMD_ESCAPE, "--path", "--suffix=mount", where],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()


SAMPLE = """\
# boot mounts
/srv/app        app/v1
/opt/my-tools   tools/stable   optional,verity=try     # a comment
/srv/base\tsha256:{d}  required,digest={d},verity=required

/srv/rw         {d}   rw=/var/cfs/up:/var/cfs/work,optional
"""
DIGEST = "0123456789abcdef" * 4


def _sample() -> str:
    return SAMPLE.format(d=DIGEST)


# -- systemd-analyze verify ---------------------------------------------------------------------


def test_verify_reports_nothing(tmp_path: Path) -> None:
    inst = _install(tmp_path)
    proc, gen = _generate(inst.generator, _sample(), tmp_path)
    assert proc.returncode == 0, proc.stderr
    generated = sorted(str(p) for p in gen.glob("*.service"))
    assert len(generated) == 4
    units = [
        str(inst.unit_dir / "composefsd.socket"),
        str(inst.unit_dir / "composefsd.service"),
        *generated,
        # The host's targets, with our units hooked in: any ordering cycle shows.
        "local-fs.target",
        "sockets.target",
        "multi-user.target",
    ]
    result = _verify(units, inst.unit_dir, gen)
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")


def test_verify_catches_what_it_should(tmp_path: Path) -> None:
    """The check above can fail: a typo and an ordering cycle are reported."""
    inst = _install(tmp_path)
    service = inst.unit_dir / "composefsd.service"
    service.write_text(service.read_text().replace("Type=notify", "Type=notiffy"))
    result = _verify([str(service)], inst.unit_dir)
    assert "Failed to parse service type" in result.stderr
    # The mount units run before local-fs.target; with the default dependencies the
    # daemon would wait for basic.target (after local-fs.target): a cycle.
    service.write_text(
        service.read_text()
        .replace("Type=notiffy", "Type=notify")
        .replace("DefaultDependencies=no", "DefaultDependencies=yes")
    )
    proc, gen = _generate(inst.generator, "/srv/app app/v1\n", tmp_path)
    assert proc.returncode == 0
    mount_unit = gen / _escape("/srv/app")
    mount_unit.write_text(
        mount_unit.read_text().replace("Requires=composefsd.socket", "Requires=composefsd.service")
    )
    result = _verify([str(mount_unit), "local-fs.target"], inst.unit_dir, gen)
    assert "ordering cycle" in result.stderr, result.stderr


def test_shipped_units_verify_in_place(tmp_path: Path) -> None:
    """The files in systemd/ as they are (ExecStart=/usr/local/bin/composefsd), under
    a root that has that binary."""
    root = tmp_path / "root"
    (root / "usr/local/bin").mkdir(parents=True)
    (root / "usr/local/bin/composefsd").write_text("#!/bin/sh\n")
    (root / "usr/local/bin/composefsd").chmod(0o755)
    unit_dir = root / "etc/systemd/system"
    unit_dir.mkdir(parents=True)
    for name in ("composefsd.socket", "composefsd.service"):
        shutil.copy(UNITS / name, unit_dir / name)
    assert SYSTEMD_ANALYZE is not None
    result = subprocess.run(
        [
            SYSTEMD_ANALYZE,
            "verify",
            f"--root={root}",
            "--man=no",
            "--generators=no",
            "/etc/systemd/system/composefsd.socket",
            "/etc/systemd/system/composefsd.service",
        ],
        capture_output=True,
        text=True,
    )
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")


# -- what the units say ---------------------------------------------------------------------------


def test_socket_unit() -> None:
    sock = UNITS / "composefsd.socket"
    assert _values(sock, "Socket", "ListenStream") == ["/run/composefs/io.composefs.Repository"]
    assert _values(sock, "Socket", "FileDescriptorName") == ["varlink"]
    assert _values(sock, "Socket", "SocketMode") == ["0600"]
    assert _values(sock, "Socket", "RemoveOnStop") == ["yes"]
    assert _values(sock, "Socket", "Accept") == []  # one daemon owns the repository
    assert _values(sock, "Unit", "DefaultDependencies") == ["no"]
    assert "sockets.target" in " ".join(_values(sock, "Unit", "Before"))
    assert _values(sock, "Install", "WantedBy") == ["sockets.target"]


# Options that give the service its own mount namespace (systemd.exec(5)): with any
# of them, mounts made at "where" would not be visible outside the service.
# (PrivateNetwork= too, unless PrivateMounts=no says otherwise: see below.)
NAMESPACING = {
    "PrivateMounts",
    "PrivateTmp",
    "PrivateDevices",
    "PrivateUsers",
    "ProtectSystem",
    "ProtectHome",
    "ProtectKernelTunables",
    "ProtectKernelModules",
    "ProtectKernelLogs",
    "ProtectControlGroups",
    "ProtectProc",
    "ProcSubset",
    "ReadOnlyPaths",
    "ReadWritePaths",
    "InaccessiblePaths",
    "ExecPaths",
    "NoExecPaths",
    "TemporaryFileSystem",
    "BindPaths",
    "BindReadOnlyPaths",
    "MountAPIVFS",
    "RootDirectory",
    "RootImage",
    "DynamicUser",
    "MemoryDenyWriteExecute",  # not a namespace, but breaks ctypes/libffi closures
}


_OFF = {"no", "false", "off", "0", ""}


def test_service_unit() -> None:
    svc = UNITS / "composefsd.service"
    namespacing = {k for s, k, v in _directives(svc) if k in NAMESPACING and v not in _OFF}
    assert not namespacing, namespacing
    # skopeo (OCI Pull from registries) needs the network: no network namespace,
    # no IP filter (the unit says why); and nothing may bring a mount namespace.
    assert _values(svc, "Service", "PrivateNetwork") == []
    assert _values(svc, "Service", "PrivateMounts") == ["no"]
    assert _values(svc, "Service", "ProtectHostname") == ["yes"]  # a UTS namespace only
    assert _values(svc, "Service", "IPAddressDeny") == []
    assert _values(svc, "Service", "UMask") == ["0077"]
    assert _values(svc, "Service", "KeyringMode") == ["private"]
    # user: idmapped mounts; mnt: MountDumpfile's creator thread enters a caller's.
    assert _values(svc, "Service", "RestrictNamespaces") == ["user mnt"]
    assert _values(svc, "Service", "SystemCallFilter") == [
        "@system-service @mount",
        "~@privileged @resources",
        # setgroups setresuid: a caller's tree is read with its ids; setgroups
        # setfsuid capset: MountDumpfile's overlay is created with them.
        "setgroups setresuid setfsuid capset",
    ]
    assert _values(svc, "Service", "Type") == ["notify"]
    assert _values(svc, "Service", "ExecStart") == ["/usr/local/bin/composefsd $COMPOSEFSD_OPTIONS"]
    assert _values(svc, "Unit", "Requires") == ["composefsd.socket"]
    assert "composefsd.socket" in _values(svc, "Unit", "After")
    assert _values(svc, "Unit", "DefaultDependencies") == ["no"]
    assert _values(svc, "Unit", "Conflicts") == ["shutdown.target"]
    # Socket activation only: nothing pulls the service in at boot by itself.
    assert _values(svc, "Install", "WantedBy") == []
    assert _values(svc, "Install", "Also") == ["composefsd.socket"]
    caps = set(_values(svc, "Service", "CapabilityBoundingSet")[0].split())
    # Each one is used (the unit says for what); CAP_KILL, CAP_SETUID and CAP_SETGID
    # also for the workers that read a caller's tree with its ids.
    assert caps == {
        "CAP_SYS_ADMIN",
        "CAP_DAC_OVERRIDE",
        "CAP_DAC_READ_SEARCH",
        "CAP_FOWNER",
        "CAP_SETUID",
        "CAP_SETGID",
        "CAP_KILL",
        "CAP_SYS_CHROOT",  # setns into a MountDumpfile caller's mount namespace
        "CAP_SETFCAP",  # a user namespace mapping uid 0 (root's MountDumpfile)
    }
    assert _values(svc, "Service", "NoNewPrivileges") == ["yes"]
    assert _values(svc, "Service", "RestrictAddressFamilies") == ["AF_UNIX AF_INET AF_INET6"]
    assert _values(svc, "Service", "SystemCallArchitectures") == ["native"]
    # Reload: synchronously over the socket (systemd 252 has no Type=notify-reload).
    assert _values(svc, "Service", "ExecReload") == ["/usr/local/bin/composefsd --reload"]
    assert _values(svc, "Service", "WatchdogSec") == ["3min"]
    assert _values(svc, "Service", "Restart") == ["on-failure"]  # a watchdog kill restarts


def _syscall_set(name: str, seen: frozenset[str] = frozenset()) -> set[str]:
    """The system calls of ``name`` (a group such as ``@privileged``, nested groups
    expanded, as this machine's systemd defines them; or one system call)."""
    if not name.startswith("@"):
        return {name}
    assert SYSTEMD_ANALYZE is not None
    proc = subprocess.run(
        [SYSTEMD_ANALYZE, "syscall-filter", "--no-pager", name],
        capture_output=True,
        text=True,
        check=True,
    )
    out: set[str] = set()
    for line in proc.stdout.splitlines()[1:]:
        item = line.strip()
        if not item or item.startswith("#"):
            continue
        if item not in seen:
            out |= _syscall_set(item, seen | {name})
    return out


def _allowed_syscalls(svc: Path) -> set[str]:
    """What the unit's SystemCallFilter= lines let through, applied in order as
    systemd does when the first one is an allow list (``~`` takes away, a plain
    line adds)."""
    lines = _values(svc, "Service", "SystemCallFilter")
    assert lines and not lines[0].startswith("~")
    allowed: set[str] = set()
    for line in lines:
        deny = line.startswith("~")
        names: set[str] = set()
        for item in line.lstrip("~").split():
            names |= _syscall_set(item)
        allowed = allowed - names if deny else allowed | names
    return allowed


#: The system calls MountDumpfile's creator thread makes (kernel/ownmount.py:
#: raw setgroups/setfsuid/setfsgid, capget/capset, unshare(CLONE_FS), setns) and
#: what it mounts with; each must pass the unit's filter, or the call fails with
#: EPERM (SystemCallErrorNumber=).
OWNMOUNT_SYSCALLS = (
    "setgroups",
    "setfsuid",
    "setfsgid",
    "capget",
    "capset",
    "unshare",
    "setns",
    "memfd_create",
    "fsopen",
    "fsconfig",
    "fsmount",
    "mount_setattr",
    "ioctl",
)


def test_service_filter_lets_mountdumpfile_through() -> None:
    """Every system call MountDumpfile (and CreateImage's workers) makes passes
    the unit's SystemCallFilter=, and the filter re-allows nothing of @privileged
    but those (chroot and pivot_root, which @mount brings, stay out)."""
    svc = UNITS / "composefsd.service"
    allowed = _allowed_syscalls(svc)
    missing = [c for c in (*OWNMOUNT_SYSCALLS, "setresuid") if c not in allowed]
    assert not missing, f"composefsd.service filters {missing}"
    privileged = _syscall_set("@privileged") & allowed
    assert privileged == {"setgroups", "setresuid", "setfsuid", "capset"}
    assert not {"chroot", "pivot_root", "setrlimit", "chown"} & allowed


def test_service_filter_check_can_fail(tmp_path: Path) -> None:
    """Without the re-allow line, capset and setfsuid are filtered (as they were
    before MountDumpfile ran under the unit)."""
    svc = tmp_path / "composefsd.service"
    text = (UNITS / "composefsd.service").read_text()
    svc.write_text(
        text.replace(
            "SystemCallFilter=setgroups setresuid setfsuid capset",
            "SystemCallFilter=setgroups setresuid",
        )
    )
    allowed = _allowed_syscalls(svc)
    assert "capset" not in allowed and "setfsuid" not in allowed
    assert "setgroups" in allowed


def _comments(path: Path) -> str:
    return "\n".join(
        line.lstrip("# ") for line in path.read_text().splitlines() if line.startswith("#")
    )


def test_every_exception_is_documented() -> None:
    """Every capability the service keeps, every address family it may use and
    each hardening option it goes without is named in the unit's comments (with
    why), and in the README's systemd section."""
    svc = UNITS / "composefsd.service"
    comments = _comments(svc)
    readme = (REPO / "README.md").read_text().partition("\n## systemd integration\n")[2]
    readme = readme.split("\n## ", 1)[0]
    assert readme, "README.md has no '## systemd integration' section"
    caps = _values(svc, "Service", "CapabilityBoundingSet")[0].split()
    families = _values(svc, "Service", "RestrictAddressFamilies")[0].split()
    for name in [*caps, *families, "PrivateNetwork", "IPAddressDeny", "WatchdogSec"]:
        assert name in comments, f"{name} is not explained in composefsd.service"
        assert name in readme, f"{name} is not explained in the README's systemd section"


def test_socket_registers_the_served_interfaces(tmp_path: Path) -> None:
    """The socket unit's Symlinks= register exactly the interfaces composefsd serves,
    less those every service has (as systemd's own sockets do)."""
    repo = Repository.init(tmp_path / "repo")
    service = build_service(repo, MountTracker(tmp_path / "runtime"))
    links = _values(UNITS / "composefsd.socket", "Socket", "Symlinks")
    assert len(links) == 1
    expected = [str(SYSTEM_REGISTRY / name) for name in registered_interfaces(service.interfaces)]
    assert sorted(links[0].split()) == expected, (
        "composefsd.socket's Symlinks= must name every interface composefsd serves"
    )
    assert not any(("io.systemd.service" in link or "org.varlink" in link) for link in expected)


# -- systemd-analyze security ----------------------------------------------------------------------

#: The goals: the daemon must keep the host's mount namespace, and its OCI pulls
#: from registries (skopeo, a child) the host's network (1.0 of its 4.7: no
#: PrivateNetwork=, no IPAddressDeny=, AF_INET/AF_INET6); the boot-mount units
#: only run composefsctl (a Varlink client reading its own installation) and can
#: be sandboxed almost entirely.
DAEMON_GOAL = 4.7  # 4.5 before MountDumpfile needed CAP_SETFCAP (0.2)
MOUNT_UNIT_GOAL = 3.0
_EXPOSURE = re.compile(r"Overall exposure level for (\S+): (\d+\.\d+) ")


def _exposure(unit: Path) -> float:
    """What ``systemd-analyze security`` (offline, on the unit file) rates it."""
    assert SYSTEMD_ANALYZE is not None
    env = dict(os.environ, LC_ALL="C")
    env.pop("SYSTEMD_LOG_LEVEL", None)
    proc = subprocess.run(
        [SYSTEMD_ANALYZE, "security", "--offline=true", "--no-pager", str(unit)],
        capture_output=True,
        text=True,
        env=env,
    )
    found = _EXPOSURE.findall(proc.stdout)
    assert [name for name, _ in found] == [unit.name], proc.stdout + proc.stderr
    return float(found[0][1])


def test_daemon_exposure(tmp_path: Path) -> None:
    inst = _install(tmp_path)
    for svc in (UNITS / "composefsd.service", inst.unit_dir / "composefsd.service"):
        assert _exposure(svc) <= DAEMON_GOAL


def test_boot_mount_unit_exposure(tmp_path: Path) -> None:
    inst = _install(tmp_path)
    proc, gen = _generate(inst.generator, _sample(), tmp_path)
    assert proc.returncode == 0, proc.stderr
    units = sorted(gen.glob("*.service"))
    assert len(units) == 4
    for unit in units:
        assert _exposure(unit) <= MOUNT_UNIT_GOAL, unit.name


def test_exposure_check_can_fail(tmp_path: Path) -> None:
    """The measure moves: without the sandbox lines a boot-mount unit rates far
    above its goal, and the daemon without its [Service] hardening above its own."""
    inst = _install(tmp_path)
    proc, gen = _generate(inst.generator, "/srv/app app/v1\n", tmp_path)
    assert proc.returncode == 0
    unit = gen / "composefs-mount@srv-app.service"
    keep = ("Type=", "RemainAfterExit=", "TimeoutSec=", "ExecStart", "ExecStop=")
    lines = unit.read_text().split("[Service]\n")
    bare = [line for line in lines[1].splitlines() if line.startswith(keep)]
    unit.write_text(lines[0] + "[Service]\n" + "\n".join(bare) + "\n")
    assert _exposure(unit) > 9.0
    svc = inst.unit_dir / "composefsd.service"
    head, _, _ = svc.read_text().partition("NoNewPrivileges=")
    svc.write_text(head + "\n[Install]\nAlso=composefsd.socket\n")
    assert _exposure(svc) > DAEMON_GOAL


def test_install_units_writes_the_paths(tmp_path: Path) -> None:
    inst = _install(tmp_path)
    svc = inst.unit_dir / "composefsd.service"
    assert _values(svc, "Service", "ExecStart") == [f"{inst.composefsd} $COMPOSEFSD_OPTIONS"]
    # Everything else is the shipped file.
    shipped = (UNITS / "composefsd.service").read_text()
    assert svc.read_text() == shipped.replace(
        "ExecStart=/usr/local/bin/composefsd ", f"ExecStart={inst.composefsd} "
    ).replace("ExecReload=/usr/local/bin/composefsd ", f"ExecReload={inst.composefsd} ")
    assert _values(svc, "Service", "ExecReload") == [f"{inst.composefsd} --reload"]
    assert (inst.unit_dir / "composefsd.socket").read_text() == (
        UNITS / "composefsd.socket"
    ).read_text()
    gen_text = inst.generator.read_text()
    assert f"\nCOMPOSEFSCTL={inst.composefsctl}\n" in gen_text
    assert os.access(inst.generator, os.X_OK)
    assert (inst.root / "etc/composefs/mounts.conf.example").read_text() == (
        UNITS / "mounts.conf.example"
    ).read_text()
    assert not (inst.root / "etc/composefs/mounts.conf").exists()


def test_install_units_enable_offline(tmp_path: Path) -> None:
    inst = _install(tmp_path, "--enable")
    link = inst.unit_dir / "sockets.target.wants" / "composefsd.socket"
    assert link.is_symlink()
    assert not (inst.unit_dir / "multi-user.target.wants").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--composefsd", "composefsd"], "--composefsd must be an absolute path"),
        (["--bogus"], "unknown argument --bogus"),
    ],
)
def test_install_units_errors(tmp_path: Path, args: list[str], message: str) -> None:
    proc = subprocess.run(
        [str(UNITS / "install-units"), "--root", str(tmp_path), *args],
        capture_output=True,
        text=True,
    )
    assert proc.returncode != 0
    assert message in proc.stderr
    assert not (tmp_path / "etc").exists()


def test_install_units_missing_composefsd(tmp_path: Path) -> None:
    """Without --root a missing composefsd is an error; below --root only a warning
    (an image or a VM overlay may get it from elsewhere at boot)."""
    proc = subprocess.run(
        [str(UNITS / "install-units"), "--composefsd", "/nonexistent/composefsd", "--no-reload"],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 1
    assert proc.stderr == "install-units: /nonexistent/composefsd is not an executable file\n"
    proc = subprocess.run(
        [
            str(UNITS / "install-units"),
            "--root",
            str(tmp_path),
            "--composefsd",
            "/nonexistent/composefsd",
        ],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0
    assert proc.stderr.startswith(
        f"install-units: warning: {tmp_path}/nonexistent/composefsd is not an executable file"
    )
    assert f"{tmp_path}/nonexistent/composefsctl is not an executable file" in proc.stderr
    svc = tmp_path / "etc/systemd/system/composefsd.service"
    assert "ExecStart=/nonexistent/composefsd $COMPOSEFSD_OPTIONS\n" in svc.read_text()


def test_install_units_help() -> None:
    proc = subprocess.run(
        [str(UNITS / "install-units"), "--help"], capture_output=True, text=True, check=True
    )
    assert proc.stdout.startswith("install-units: install composefsd's systemd units")
    assert "--composefsctl PATH" in proc.stdout
    assert "varlinkctl PATH" not in proc.stdout


# -- the generator -------------------------------------------------------------------------------


def _mount_interface() -> varlink.Interface:
    return varlink.Interface(IDL.read_text())


def _exec_json(unit: Path, key: str, method: str) -> dict[str, object]:
    (line,) = _values(unit, "Service", key)
    argv = shlex.split(line)
    assert argv[1:8] == [
        "--connect",
        SOCKET,
        "--timeout",
        "0",
        "call",
        "--json",
        "short",
    ]
    assert argv[8] == f"io.composefs.Repository.{method}"
    assert len(argv) == 10
    doc = json.loads(argv[9])
    assert isinstance(doc, dict)
    # Every field is one the IDL declares for the method.
    fields = _mount_interface().members[method].in_type.fields
    assert set(doc) <= set(fields), set(doc) - set(fields)
    return doc


def _assert_sandboxed(unit: Path) -> None:
    """composefsctl as uid 0 without a capability, in namespaces of its own, that can
    reach the daemon's socket path and nothing else."""
    one = {
        "CapabilityBoundingSet": "",
        "NoNewPrivileges": "yes",
        "PrivateUsers": "yes",
        "PrivateNetwork": "yes",
        "PrivateDevices": "yes",
        "PrivateMounts": "yes",
        "ProtectSystem": "strict",
        "ProtectHome": "read-only",
        "ProtectKernelTunables": "yes",
        "ProtectKernelModules": "yes",
        "ProtectKernelLogs": "yes",
        "ProtectControlGroups": "yes",
        "ProtectClock": "yes",
        "ProtectHostname": "yes",
        "ProtectProc": "invisible",
        "ProcSubset": "pid",
        "RestrictAddressFamilies": "AF_UNIX",
        "IPAddressDeny": "any",
        "RestrictNamespaces": "yes",
        "RestrictRealtime": "yes",
        "RestrictSUIDSGID": "yes",
        "LockPersonality": "yes",
        "MemoryDenyWriteExecute": "yes",
        "SystemCallArchitectures": "native",
        "SystemCallErrorNumber": "EPERM",
        "DevicePolicy": "closed",
    }
    for key, value in one.items():
        assert _values(unit, "Service", key) == [value], key
    assert _values(unit, "Service", "SystemCallFilter") == [
        "@system-service",
        "~@privileged @resources",
    ]
    # Not before local-fs.target: /tmp may not be there yet. And root it stays,
    # for the daemon's authorization.
    for key in ("PrivateTmp", "User", "DynamicUser", "DeviceAllow"):
        assert _values(unit, "Service", key) == [], key


def test_generator_sample(tmp_path: Path) -> None:
    inst = _install(tmp_path)
    proc, gen = _generate(inst.generator, _sample(), tmp_path)
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, "", "")

    expected = {
        "/srv/app": ({"image": "app/v1", "where": "/srv/app"}, "required"),
        "/opt/my-tools": (
            {"image": "tools/stable", "where": "/opt/my-tools", "verity": "try"},
            "optional",
        ),
        "/srv/base": (
            {
                "image": f"sha256:{DIGEST}",
                "where": "/srv/base",
                "verity": "required",
                "expectedDigest": DIGEST,
            },
            "required",
        ),
        "/srv/rw": (
            {
                "image": DIGEST,
                "where": "/srv/rw",
                "upperDirectory": "/var/cfs/up",
                "workDirectory": "/var/cfs/work",
            },
            "optional",
        ),
    }
    names = {_escape(where): where for where in expected}
    assert names["composefs-mount@opt-my\\x2dtools.service"] == "/opt/my-tools"
    assert sorted(p.name for p in gen.glob("*.service")) == sorted(names)
    for name, where in names.items():
        params, kind = expected[where]
        unit = gen / name
        assert _exec_json(unit, "ExecStart", "Mount") == params
        assert _exec_json(unit, "ExecStop", "Unmount") == {"where": where}
        assert _values(unit, "Service", "ExecStart")[0].startswith(inst.composefsctl + " ")
        assert _values(unit, "Service", "Environment") == ["PYTHONDONTWRITEBYTECODE=1"]
        assert _values(unit, "Service", "Type") == ["oneshot"]
        assert _values(unit, "Service", "RemainAfterExit") == ["yes"]
        # Made outside the sandbox ("+"), traversable by everyone (UMask=0022).
        assert _values(unit, "Service", "ExecStartPre") == [f"-+/bin/mkdir -p {where}"]
        assert _values(unit, "Service", "UMask") == ["0022"]
        _assert_sandboxed(unit)
        assert _values(unit, "Unit", "DefaultDependencies") == ["no"]
        assert _values(unit, "Unit", "Requires") == ["composefsd.socket"]
        after = _values(unit, "Unit", "After")[0].split()
        assert {"composefsd.socket", "composefsd.service", "local-fs-pre.target"} <= set(after)
        assert _mount_name(where) in after
        assert _values(unit, "Unit", "Before") == ["local-fs.target umount.target"]
        assert _values(unit, "Unit", "Conflicts") == ["umount.target"]
        assert _values(unit, "Unit", "RequiresMountsFor") == [os.path.dirname(where)]
        assert f"({kind})" in _values(unit, "Unit", "Description")[0]
        link_dir = "local-fs.target.requires" if kind == "required" else "local-fs.target.wants"
        link = gen / link_dir / name
        assert link.is_symlink() and link.resolve() == unit.resolve()
        other = "local-fs.target.wants" if kind == "required" else "local-fs.target.requires"
        assert not (gen / other / name).exists()
    # Nothing in the early and late directories.
    assert not any((tmp_path / "gen" / "early").iterdir())
    assert not any((tmp_path / "gen" / "late").iterdir())


def test_generator_unit_text(tmp_path: Path) -> None:
    """One generated unit, in full."""
    inst = _install(tmp_path)
    proc, gen = _generate(inst.generator, "/srv/app app/v1 optional,verity=disabled\n", tmp_path)
    assert proc.returncode == 0
    conf = tmp_path / "mounts.conf"
    c = f"{inst.composefsctl} --connect {SOCKET} --timeout 0 call --json short"
    assert (
        (gen / "composefs-mount@srv-app.service").read_text()
        == f"""\
# Automatically generated by composefs-mount-generator
# from {conf} line 1: /srv/app app/v1 optional,verity=disabled
[Unit]
Description=composefs image app/v1 at /srv/app (optional)
Documentation=https://github.com/containers/composefs
SourcePath={conf}
DefaultDependencies=no
Requires=composefsd.socket
After=composefsd.socket composefsd.service local-fs-pre.target srv-app.mount
RequiresMountsFor=/srv
Before=local-fs.target umount.target
Conflicts=umount.target

[Service]
Type=oneshot
RemainAfterExit=yes
TimeoutSec=2min
ExecStartPre=-+/bin/mkdir -p /srv/app
ExecStart={c} io.composefs.Repository.Mount '{{"image":"app/v1","where":"/srv/app","verity":"disabled"}}'
ExecStop={c} io.composefs.Repository.Unmount '{{"where":"/srv/app"}}'
Environment=PYTHONDONTWRITEBYTECODE=1
UMask=0022
CapabilityBoundingSet=
NoNewPrivileges=yes
PrivateUsers=yes
PrivateNetwork=yes
PrivateDevices=yes
PrivateMounts=yes
ProtectSystem=strict
ProtectHome=read-only
ProtectKernelTunables=yes
ProtectKernelModules=yes
ProtectKernelLogs=yes
ProtectControlGroups=yes
ProtectClock=yes
ProtectHostname=yes
ProtectProc=invisible
ProcSubset=pid
RestrictAddressFamilies=AF_UNIX
IPAddressDeny=any
RestrictNamespaces=yes
RestrictRealtime=yes
RestrictSUIDSGID=yes
LockPersonality=yes
MemoryDenyWriteExecute=yes
SystemCallArchitectures=native
SystemCallFilter=@system-service
SystemCallFilter=~@privileged @resources
SystemCallErrorNumber=EPERM
DevicePolicy=closed
"""
    )


BAD_LINES = [
    ("justone", "expected 'WHERE IMAGE [OPTIONS]', found 1 fields"),
    ("/a b c d", "expected 'WHERE IMAGE [OPTIONS]', found 4 fields"),
    ("relative img", "WHERE 'relative' is not a normalized absolute path"),
    ("/ img", "WHERE '/' is not a normalized absolute path"),
    ("/srv//x img", "WHERE '/srv//x' is not a normalized absolute path"),
    ("/srv/../x img", "WHERE '/srv/../x' is not a normalized absolute path"),
    ("/srv/x/ img", "WHERE '/srv/x/' is not a normalized absolute path"),
    ("/srv/it's img", "is not a normalized absolute path"),
    ("/srv/50% img", "is not a normalized absolute path"),
    ('/srv/x "img"', "IMAGE '\"img\"' is not a ref or digest"),
    ("/srv/x img\\1", "is not a ref or digest"),
    ("/srv/x os/", "IMAGE 'os/' is not a ref or digest"),
    ("/srv/x img bogus", "unknown option 'bogus'"),
    ("/srv/x img verity=maybe", "verity must be required, try or disabled, not 'maybe'"),
    ("/srv/x img digest=abc", "digest 'abc' is not 64 or 128 lower-case hex digits"),
    (f"/srv/x img digest={DIGEST.upper()}", "is not 64 or 128 lower-case hex digits"),
    ("/srv/x img rw=/up", "unknown option 'rw=/up'"),
    ("/srv/x img rw=up:/work", "rw needs two absolute paths, UPPER:WORK, not 'up:/work'"),
]


@pytest.mark.parametrize(("line", "message"), BAD_LINES)
def test_generator_rejects_bad_lines(tmp_path: Path, line: str, message: str) -> None:
    inst = _install(tmp_path)
    conf_text = f"# first\n/srv/good good/v1\n{line}\n/srv/after after\n"
    proc, gen = _generate(inst.generator, conf_text, tmp_path)
    assert proc.returncode == 1
    conf = tmp_path / "mounts.conf"
    assert proc.stderr.startswith(f"composefs-mount-generator: {conf}:3: ")
    assert message in proc.stderr
    assert proc.stderr.endswith("; line skipped\n")
    assert proc.stderr.count("\n") == 1
    # The good lines around it still become units.
    assert sorted(p.name for p in gen.glob("*.service")) == [
        "composefs-mount@srv-after.service",
        "composefs-mount@srv-good.service",
    ]


def test_generator_duplicate_where(tmp_path: Path) -> None:
    inst = _install(tmp_path)
    proc, gen = _generate(inst.generator, "/srv/x a\n/srv/x b optional\n", tmp_path)
    assert proc.returncode == 1
    assert ":2: '/srv/x' is already mounted by an earlier line; line skipped" in proc.stderr
    assert _exec_json(gen / "composefs-mount@srv-x.service", "ExecStart", "Mount")["image"] == "a"


def test_generator_without_config(tmp_path: Path) -> None:
    inst = _install(tmp_path)
    proc, gen = _generate(inst.generator, None, tmp_path)
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, "", "")
    assert not any(gen.iterdir())
    proc, gen = _generate(inst.generator, "# nothing yet\n\n   \n", tmp_path)
    assert (proc.returncode, proc.stderr) == (0, "")
    assert not any(gen.iterdir())


def test_generator_last_line_without_newline(tmp_path: Path) -> None:
    inst = _install(tmp_path)
    proc, gen = _generate(inst.generator, "/srv/x img", tmp_path)
    assert proc.returncode == 0
    assert (gen / "composefs-mount@srv-x.service").exists()


def test_generator_usage_and_missing_composefsctl(tmp_path: Path) -> None:
    inst = _install(tmp_path)
    proc = subprocess.run([str(inst.generator)], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr == "usage: composefs-mount-generator NORMAL-DIR [EARLY-DIR LATE-DIR]\n"
    os.unlink(inst.composefsctl)
    proc, gen = _generate(inst.generator, "/srv/x img\n", tmp_path)
    assert proc.returncode == 0  # the units are still written; they fail clearly at boot
    assert f"{inst.composefsctl} is missing: composefs boot mounts will fail" in proc.stderr
    assert (gen / "composefs-mount@srv-x.service").exists()


def test_generator_unreadable_config(tmp_path: Path) -> None:
    inst = _install(tmp_path)
    conf = tmp_path / "mounts.conf"
    conf.mkdir()  # a directory: exists, cannot be read as lines
    proc, _ = _generate(inst.generator, None, tmp_path)
    assert proc.returncode == 1
    assert proc.stderr == (
        f"composefs-mount-generator: cannot read {conf}: not a readable file; "
        "no composefs mounts generated\n"
    )


def test_generator_is_plain_sh() -> None:
    """No Python in the boot path: the generator is a POSIX shell script that dash runs."""
    gen = UNITS / "composefs-mount-generator"
    assert gen.read_text().startswith("#!/bin/sh\n")
    dash = shutil.which("dash")
    if dash is not None:
        subprocess.run([dash, "-n", str(gen)], check=True)
    checkbashisms = shutil.which("checkbashisms")
    if checkbashisms is not None:
        subprocess.run([checkbashisms, str(gen)], check=True)
    assert not re.search(r"\bpython", gen.read_text().split("set -u", 1)[1])


def test_example_config_is_accepted(tmp_path: Path) -> None:
    inst = _install(tmp_path)
    text = (UNITS / "mounts.conf.example").read_text()
    uncommented = "\n".join(
        line[1:] if line.startswith("#/") else line for line in text.splitlines()
    )
    proc, gen = _generate(inst.generator, uncommented, tmp_path)
    assert (proc.returncode, proc.stderr) == (0, "")
    assert len(list(gen.glob("*.service"))) == 3


def test_install_units_composefsctl(tmp_path: Path) -> None:
    """Boot mounts run the composefsctl beside composefsd unless told another; one
    that is not there (outside --root) is an error, not a unit failing at boot."""
    other = tmp_path / "root/opt/cfs/bin/composefsctl"
    other.parent.mkdir(parents=True)
    other.write_text("#!/bin/sh\nexit 0\n")
    other.chmod(0o755)
    inst = _install(tmp_path, "--composefsctl", "/opt/cfs/bin/composefsctl")
    assert "\nCOMPOSEFSCTL=/opt/cfs/bin/composefsctl\n" in inst.generator.read_text()
    bindir = tmp_path / "bin"
    (bindir / "composefsctl").unlink()
    spaced = tmp_path / "x y" / "composefsctl"
    spaced.parent.mkdir()
    spaced.write_text("#!/bin/sh\nexit 0\n")
    spaced.chmod(0o755)
    for extra, want in (
        ([], f"install-units: {bindir}/composefsctl is not an executable file"),
        (["--composefsctl", "bin/composefsctl"], "--composefsctl must be an absolute path"),
        (["--composefsctl", str(spaced)], "has characters unit files would mangle"),
    ):
        proc = subprocess.run(
            [
                str(UNITS / "install-units"),
                "--unit-dir",
                str(tmp_path / "u"),
                "--generator-dir",
                str(tmp_path / "g"),
                "--no-reload",
                "--composefsd",
                str(bindir / "composefsd"),
                *extra,
            ],
            capture_output=True,
            text=True,
        )
        assert proc.returncode == 1, extra
        assert want in proc.stderr, proc.stderr
        assert not (tmp_path / "g").exists()
    # varlinkctl is not needed, and no longer an option.
    proc = subprocess.run(
        [str(UNITS / "install-units"), "--varlinkctl", "/usr/bin/varlinkctl"],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    assert "unknown argument --varlinkctl" in proc.stderr
