"""composefsd driven by systemd's own client, varlinkctl 257 (from the reference
tools): info, list-interfaces, list-methods, introspect, a call of every method
(--more / -E for the streaming ones), errors shown by name, exec: activation, and
socket activation under systemd-socket-activate (a listening socket, and
--accept's connected sockets)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import composefsd
from composefsd.kernel.mountinfo import composefs_mount_at
from composefsd.service import client
from servicehelpers import (
    DAEMON,
    TEST_ALGORITHM,
    Daemon,
    creation_args,
    exec_wrapper,
    short_dir,
)

REPO_ROOT = Path(__file__).resolve().parent.parent
IFACE = "io.composefs.Repository"
IDL = Path(composefsd.__file__).parent / "service" / "io.composefs.Repository.varlink"
OCI = "io.composefs.Oci"
SYSTEMD = "io.systemd.service"
OCI_IDL = Path(composefsd.__file__).parent / "service" / "io.composefs.Oci.varlink"
OCI_METHODS = ["Inspect", "ListImages", "Mount", "Pull", "Tag", "Untag"]
RS_REPOSITORY = "org.composefs.Repository"
RS_OCI = "org.composefs.Oci"
#: Every interface composefsd serves, as varlinkctl lists them (sorted).
INTERFACES = sorted([OCI, IFACE, SYSTEMD, RS_OCI, RS_REPOSITORY, "org.varlink.service"])
METHODS = [
    "CreateImage",
    "Describe",
    "GarbageCollect",
    "ListImages",
    "ListMounts",
    "Mount",
    "MountDumpfile",
    "RemoveImage",
    "Unmount",
    "Verify",
]


def _vctl(varlinkctl: str, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([varlinkctl, *args], capture_output=True, text=True, timeout=120)
    if check:
        assert proc.returncode == 0, f"varlinkctl {' '.join(args)}: {proc.stderr}{proc.stdout}"
    return proc


def _call(varlinkctl: str, address: str, method: str, params: dict[str, Any] | None = None) -> Any:
    out = _vctl(varlinkctl, "call", address, f"{IFACE}.{method}", json.dumps(params or {})).stdout
    return json.loads(out)


def _call_more(
    varlinkctl: str, address: str, method: str, params: dict[str, Any] | None = None
) -> list[dict[str, Any]]:
    """-E (--more, no timeout): JSON-SEQ, each reply after an RS (0x1e)."""
    out = _vctl(
        varlinkctl, "call", "-E", address, f"{IFACE}.{method}", json.dumps(params or {})
    ).stdout
    assert out.startswith("\x1e")
    return [json.loads(part) for part in out.split("\x1e")[1:]]


def _error(
    varlinkctl: str, address: str, method: str, params: dict[str, Any], *flags: str
) -> tuple[str, Any]:
    """(error name from stderr, its parameters from stdout) of a failing call."""
    proc = _vctl(varlinkctl, "call", *flags, address, method, json.dumps(params), check=False)
    assert proc.returncode != 0
    # (with --more varlinkctl leaves the method name out)
    prefixes = (f"Method call {method}() failed: ", "Method call failed: ")
    (line,) = [ln for ln in proc.stderr.splitlines() if ln.startswith(prefixes)]
    name = line.split(" failed: ", 1)[1]
    stdout = proc.stdout.strip().lstrip("\x1e")
    return name, json.loads(stdout) if stdout else None


# -- introspection --------------------------------------------------------------------------------


def test_info(varlinkctl: str, daemon: Daemon) -> None:
    out = _vctl(varlinkctl, "info", daemon.address).stdout
    fields = {}
    key = ""
    for line in out.splitlines():
        k, _, v = line.partition(":")
        if v:
            key = k.strip()
            fields[key] = [v.strip()]
        else:
            fields[key].append(line.strip())
    assert fields == {
        "Vendor": ["composefsd"],
        "Product": ["composefsd"],
        "Version": [composefsd.version()],
        "URL": ["https://github.com/containers/composefs"],
        "Interfaces": INTERFACES,
    }
    doc = json.loads(_vctl(varlinkctl, "--json=short", "info", f"unix:{daemon.address}").stdout)
    assert sorted(doc["interfaces"]) == INTERFACES


def test_list_interfaces_and_methods(varlinkctl: str, daemon: Daemon) -> None:
    out = _vctl(varlinkctl, "list-interfaces", daemon.address).stdout
    assert out.split() == INTERFACES
    out = _vctl(varlinkctl, "list-methods", daemon.address, IFACE).stdout
    assert out.split() == [f"{IFACE}.{m}" for m in METHODS]
    out = _vctl(varlinkctl, "list-methods", daemon.address, OCI).stdout
    assert out.split() == [f"{OCI}.{m}" for m in OCI_METHODS]
    out = _vctl(varlinkctl, "list-methods", daemon.address, RS_REPOSITORY).stdout
    assert sorted(out.split()) == [
        f"{RS_REPOSITORY}.{m}"
        for m in sorted(
            [
                "CloseRepository",
                "EnsureRepository",
                "Fsck",
                "Gc",
                "ImageObjects",
                "InitRepository",
                "ListImageRefs",
                "Mount",
                "OpenRepository",
            ]
        )
    ]


def test_composefs_rs_repository(varlinkctl: str, daemon: Daemon) -> None:
    """org.composefs.Repository through varlinkctl, which cannot talk to cfsctl's own
    server (it sends "parameters":{} and cannot parse zlink's IDL): introspect,
    and a handle opened by one varlinkctl used by the next."""
    out = _vctl(varlinkctl, "introspect", daemon.address, RS_REPOSITORY).stdout
    assert f"interface {RS_REPOSITORY}\n" in out and "Opened,\n" in out
    opened = json.loads(
        _vctl(
            varlinkctl,
            "call",
            daemon.address,
            f"{RS_REPOSITORY}.OpenRepository",
            json.dumps({"path": str(daemon.repo)}),
        ).stdout
    )
    assert opened["hash_algorithm"] == TEST_ALGORITHM
    handle = json.dumps({"handle": opened["handle"]})
    listed = _vctl(varlinkctl, "call", daemon.address, f"{RS_REPOSITORY}.ListImageRefs", handle)
    refs = {r for i in _call(varlinkctl, daemon.address, "ListImages")["images"] for r in i["refs"]}
    assert {i["name"] for i in json.loads(listed.stdout)["images"]} == refs
    _vctl(varlinkctl, "call", daemon.address, f"{RS_REPOSITORY}.CloseRepository", handle)


def test_composefs_rs_oci(varlinkctl: str, daemon: Daemon) -> None:
    """org.composefs.Oci through varlinkctl: its methods, and ListImages and
    ComputeId on a handle opened by an earlier varlinkctl."""
    out = _vctl(varlinkctl, "list-methods", daemon.address, RS_OCI).stdout
    assert sorted(out.split()) == [
        f"{RS_OCI}.{m}"
        for m in sorted(
            [
                "Check",
                "ComputeId",
                "FinalizeImage",
                "GetInfo",
                "GetLayer",
                "HasLayer",
                "Inspect",
                "ListImages",
                "OciMount",
                "Pull",
                "PutLayer",
                "Tag",
                "Untag",
            ]
        )
    ]
    opened = json.loads(
        _vctl(
            varlinkctl,
            "call",
            daemon.address,
            f"{RS_REPOSITORY}.OpenRepository",
            json.dumps({"path": str(daemon.repo)}),
        ).stdout
    )
    handle = {"handle": opened["handle"]}
    listed = _vctl(varlinkctl, "call", daemon.address, f"{RS_OCI}.ListImages", json.dumps(handle))
    assert json.loads(listed.stdout) == {"images": []}
    name, params = _error(
        varlinkctl,
        daemon.address,
        f"{RS_OCI}.ComputeId",
        {**handle, "image": "nope", "bootable": False},
    )
    assert (name, params) == (
        f"{RS_OCI}.InternalError",
        {"message": "OCI reference not found: nope"},
    )
    _vctl(
        varlinkctl, "call", daemon.address, f"{RS_REPOSITORY}.CloseRepository", json.dumps(handle)
    )


def test_introspect_oci(varlinkctl: str, daemon: Daemon, tmp_path: Path) -> None:
    """io.composefs.Oci: served beside io.composefs.Repository, its IDL valid for
    systemd's parser (types, errors and comments included), one ListImages call."""
    out = _vctl(varlinkctl, "introspect", daemon.address, OCI).stdout
    assert f"interface {OCI}\n" in out
    for method in OCI_METHODS:
        assert f"method {method}(" in out
    for error in ("ImageNotFound", "InvalidReference", "InvalidTag", "PullFailed"):
        assert f"error {error}(" in out
    (tmp_path / f"{OCI}.varlink").write_text(out)
    _vctl(varlinkctl, "validate-idl", str(tmp_path / f"{OCI}.varlink"))
    _vctl(varlinkctl, "validate-idl", str(OCI_IDL))
    with client.connect(daemon.address) as conn:
        assert conn.get_interface_description(OCI) == OCI_IDL.read_text()
    assert OCI_IDL.read_text() == (REPO_ROOT / "varlink" / f"{OCI}.varlink").read_text()
    got = _vctl(varlinkctl, "call", daemon.address, f"{OCI}.ListImages", "{}").stdout
    assert json.loads(got) == {"images": []}
    name, params = _error(varlinkctl, daemon.address, f"{OCI}.Inspect", {"image": "nope"})
    assert (name, params) == (f"{OCI}.ImageNotFound", {"image": "nope"})


def test_introspect(varlinkctl: str, daemon: Daemon, tmp_path: Path) -> None:
    out = _vctl(varlinkctl, "introspect", daemon.address, IFACE).stdout
    assert f"interface {IFACE}\n" in out
    for method in METHODS:
        assert f"method {method}(" in out
    # varlinkctl re-renders the IDL; what it printed is valid IDL again, and what
    # the service sends is the file itself, comments included.
    (tmp_path / f"{IFACE}.varlink").write_text(out)
    _vctl(varlinkctl, "validate-idl", str(tmp_path / f"{IFACE}.varlink"))
    _vctl(varlinkctl, "validate-idl", str(IDL))
    with client.connect(daemon.address) as conn:
        assert conn.get_interface_description(IFACE) == IDL.read_text()
    assert "# How hard to insist on fs-verity." in out
    out = _vctl(varlinkctl, "introspect", daemon.address, "org.varlink.service").stdout
    assert "method GetInfo()" in out


# -- a call of every method ---------------------------------------------------------------------


def test_every_method(varlinkctl: str, daemon: Daemon, tree: Path, mnt: Path) -> None:
    v, a = varlinkctl, daemon.address
    d = _call(v, a, "Describe")
    assert d["path"] == str(daemon.repo) and d["version"] == composefsd.version()

    # CreateImage, streamed: progress replies, then the result.
    replies = _call_more(v, a, "CreateImage", {"sourcePath": str(tree), "ref": "vc/v1"})
    *progress, result = replies
    assert progress and all(set(r) == {"progress"} for r in progress)
    assert {"scan", "import"} <= {r["progress"]["phase"] for r in progress}
    digest = result["digest"]
    assert result["ref"] == "vc/v1" and result["files"] > 0
    # ... and as a single call.
    again = _call(v, a, "CreateImage", {"sourcePath": str(tree), "useEpoch": True})
    assert set(again) >= {"digest", "files", "objectsWritten", "objectsReused"}

    images = _call(v, a, "ListImages")["images"]
    assert digest in [i["digest"] for i in images]
    (one,) = _call(v, a, "ListImages", {"image": "vc/v1"})["images"]
    assert one["refs"] == ["vc/v1"] and one["digest"] == digest

    *progress, verified = _call_more(v, a, "Verify", {"image": "vc/v1"})
    assert verified == {
        "digest": digest,
        "ok": True,
        "objectsChecked": verified["objectsChecked"],
        "verityMeasured": 0,
        "problems": [],
    }
    # Every image: one result per image (collected into one array).
    out = _vctl(v, "call", "--more", "--collect", a, f"{IFACE}.Verify", "{}").stdout
    results = [r for r in json.loads(out.lstrip("\x1e")) if "digest" in r]
    assert sorted(r["digest"] for r in results) == sorted(i["digest"] for i in images)

    mounted = _call(v, a, "Mount", {"image": "vc/v1", "where": str(mnt)})
    assert mounted["where"] == str(mnt) and mounted["digest"] == digest
    assert (mnt / "hello").read_text() == "hello from composefs\n"
    listed = _call(v, a, "ListMounts")["mounts"]
    assert [m["where"] for m in listed] == [str(mnt)]
    assert listed[0]["inRepository"] is True and listed[0]["digest"] == digest
    assert str(mnt) in [m["where"] for m in _call(v, a, "ListMounts", {"all": True})["mounts"]]
    assert _call(v, a, "Unmount", {"where": str(mnt)}) == {"digest": digest}
    assert composefs_mount_at(str(mnt)) is None

    # Without "where": a detached mount fd with the reply (varlinkctl drops it).
    detached = _call(v, a, "Mount", {"image": digest, "verity": "disabled"})
    assert detached["mountFileDescriptor"] == 0 and "where" not in detached

    removed = _call(v, a, "RemoveImage", {"image": again["digest"]})
    assert removed == {"removedRefs": []}

    *progress, dry = _call_more(v, a, "GarbageCollect", {"dryRun": True})
    assert dry["dryRun"] is True
    assert {"mark", "sweep"} <= {r["progress"]["phase"] for r in progress}
    gc = _call(v, a, "GarbageCollect")
    assert gc["dryRun"] is False and gc["objectsRemoved"] >= 1


# -- errors -------------------------------------------------------------------------------------


def test_errors_by_name(varlinkctl: str, daemon: Daemon, tmp_path: Path) -> None:
    v, a = varlinkctl, daemon.address
    assert _error(v, a, f"{IFACE}.Mount", {"image": "no/such", "where": str(tmp_path)}) == (
        f"{IFACE}.NoSuchImage",
        {"image": "no/such"},
    )
    assert _error(v, a, f"{IFACE}.RemoveImage", {"image": "../x"})[0] == f"{IFACE}.InvalidName"
    assert _error(v, a, f"{IFACE}.Unmount", {"where": str(tmp_path)}) == (
        f"{IFACE}.NotMounted",
        {"where": str(tmp_path)},
    )
    assert _error(v, a, f"{IFACE}.Mount", {"image": 5}) == (
        "org.varlink.service.InvalidParameter",
        {"parameter": "image"},
    )
    assert _error(v, a, f"{IFACE}.Mount", {"image": "x", "bogus": 1}) == (
        "org.varlink.service.InvalidParameter",
        {"parameter": "bogus"},
    )
    assert _error(v, a, f"{IFACE}.Mount", {"image": "x", "verity": "maybe"}) == (
        "org.varlink.service.InvalidParameter",
        {"parameter": "verity"},
    )
    assert _error(v, a, f"{IFACE}.Mount", {}) == (
        "org.varlink.service.InvalidParameter",
        {"parameter": "image"},
    )
    assert _error(v, a, f"{IFACE}.Nope", {}) == (
        "org.varlink.service.MethodNotFound",
        {"method": f"{IFACE}.Nope"},
    )
    assert _error(v, a, "io.composefs.Nope.Describe", {}) == (
        "org.varlink.service.InterfaceNotFound",
        {"interface": "io.composefs.Nope"},
    )
    assert _error(v, a, f"{IFACE}.Verify", {})[0] == "org.varlink.service.ExpectedMore"
    name, params = _error(
        v, a, f"{IFACE}.CreateImage", {"sourcePath": str(tmp_path / "none")}, "-E"
    )
    assert name == f"{IFACE}.SourceError" and "message" in params
    # --graceful turns a named error into success.
    proc = _vctl(
        v,
        "call",
        f"--graceful={IFACE}.NoSuchImage",
        a,
        f"{IFACE}.ListImages",
        '{"image":"no/such"}',
        check=False,
    )
    assert proc.returncode == 0


# -- activation -----------------------------------------------------------------------------------


def test_exec_activation(varlinkctl: str, tmp_path: Path, tree: Path) -> None:
    """varlinkctl call exec:PROGRAM runs composefsd on a connected fd 3."""
    repo = tmp_path / "repo"
    wrapper = exec_wrapper(tmp_path / "composefsd-exec", repo, tmp_path / "runtime")
    address = f"exec:{wrapper}"
    assert _call(varlinkctl, address, "Describe")["path"] == str(repo)
    *_, created = _call_more(
        varlinkctl, address, "CreateImage", {"sourcePath": str(tree), "ref": "x/v1"}
    )
    (image,) = _call(varlinkctl, address, "ListImages")["images"]
    assert image["digest"] == created["digest"] and image["refs"] == ["x/v1"]
    assert _vctl(varlinkctl, "list-interfaces", address).stdout.split() == INTERFACES
    assert _error(varlinkctl, address, f"{IFACE}.Mount", {"image": "nope", "where": str(tmp_path)})[
        0
    ] == (f"{IFACE}.NoSuchImage")


def _socket_activate(sock: Path, repo: Path, runtime: Path, *flags: str) -> subprocess.Popen[bytes]:
    activate = shutil.which("systemd-socket-activate")
    assert activate is not None, "systemd-socket-activate is missing (Debian: systemd)"
    proc = subprocess.Popen(
        [
            activate,
            "-l",
            str(sock),
            "--fdname=varlink",
            "-E",
            "PATH",
            *flags,
            *DAEMON,
            "--repo",
            str(repo),
            "--runtime-dir",
            str(runtime),
            *creation_args(repo, (), TEST_ALGORITHM),
        ],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + 10
    while not sock.exists():
        assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
        assert time.monotonic() < deadline, "systemd-socket-activate did not listen"
        time.sleep(0.02)
    return proc


def _comm(pid: int) -> str:
    return Path(f"/proc/{pid}/comm").read_text().strip()


def test_socket_activation(varlinkctl: str, tmp_path: Path, tree: Path) -> None:
    """A listening socket from systemd-socket-activate: composefsd starts at the
    first connection, serves every later one, and stops on SIGTERM with status 0."""
    rundir = short_dir()
    sock = rundir / "sock"
    repo = tmp_path / "repo"
    proc = _socket_activate(sock, repo, rundir / "runtime")
    try:
        assert _comm(proc.pid) == "systemd-socket-"  # nothing started yet
        assert not repo.exists()
        out = _vctl(varlinkctl, "info", str(sock)).stdout
        assert "Product: composefsd" in out
        assert _comm(proc.pid).startswith("python")  # exec'd in place: the same pid
        assert _call(varlinkctl, str(sock), "Describe")["path"] == str(repo)
        *_, created = _call_more(varlinkctl, str(sock), "CreateImage", {"sourcePath": str(tree)})
        assert len(created["digest"]) == 64
        # Concurrent clients on the one listening socket.
        procs = [
            subprocess.Popen(
                [varlinkctl, "call", str(sock), f"{IFACE}.ListImages", "{}"],
                stdout=subprocess.PIPE,
                text=True,
            )
            for _ in range(8)
        ]
        for p in procs:
            out, _ = p.communicate(timeout=60)
            assert p.returncode == 0 and created["digest"] in out
    finally:
        proc.send_signal(signal.SIGTERM)
        out_bytes, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, out_bytes.decode(errors="replace")
    shutil.rmtree(rundir, ignore_errors=True)


def test_socket_activation_accept(varlinkctl: str, tmp_path: Path) -> None:
    """--accept: one composefsd per connection, each on a connected socket, each
    exiting when its client disconnects."""
    rundir = short_dir()
    sock = rundir / "sock"
    repo = tmp_path / "repo"
    proc = _socket_activate(sock, repo, rundir / "runtime", "--accept")
    try:
        for _ in range(2):
            assert _call(varlinkctl, str(sock), "Describe")["path"] == str(repo)
        # The per-connection daemons are gone (reaped by systemd-socket-activate).
        deadline = time.monotonic() + 15
        while True:
            children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
            if not children:
                break
            assert time.monotonic() < deadline, f"per-connection daemons left: {children}"
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=30)
        shutil.rmtree(rundir, ignore_errors=True)


def test_unit_generated_call_works(
    varlinkctl: str, daemon: Daemon, tree: Path, mnt: Path, tmp_path: Path
) -> None:
    """The exact command lines composefs-mount-generator writes (Mount with where,
    then Unmount; composefsctl, not varlinkctl), run against the daemon's socket
    instead of /run/composefs with this environment's composefsctl; a refused
    Mount exits non-zero, which fails the unit."""
    import shlex
    import sys

    repo_root = Path(__file__).resolve().parent.parent
    composefsctl = str(Path(sys.executable).parent / "composefsctl")
    conf = tmp_path / "mounts.conf"
    missing = tmp_path / "missing"
    conf.write_text(f"{mnt} boot/v1 required,verity=try\n{missing} nope/v9 optional\n")
    _call_more(
        varlinkctl, daemon.address, "CreateImage", {"sourcePath": str(tree), "ref": "boot/v1"}
    )
    gen = tmp_path / "gen"
    gen.mkdir()
    env = dict(os.environ, COMPOSEFS_MOUNTS_CONF=str(conf))
    subprocess.run(
        [str(repo_root / "systemd" / "composefs-mount-generator"), str(gen), str(gen), str(gen)],
        check=True,
        env=env,
        capture_output=True,
    )

    def command(unit: Path, key: str) -> list[str]:
        (line,) = (x for x in unit.read_text().splitlines() if x.startswith(f"{key}="))
        argv = shlex.split(line.split("=", 1)[1])
        assert argv[1:3] == ["--connect", "unix:/run/composefs/io.composefs.Repository"]
        argv[0], argv[2] = composefsctl, f"unix:{daemon.address}"
        return argv

    (unit,) = (u for u in gen.glob("*.service") if "missing" not in u.name)
    for key in ("ExecStart", "ExecStop"):
        subprocess.run(command(unit, key), check=True, capture_output=True, timeout=60)
        if key == "ExecStart":
            assert (mnt / "hello").read_text() == "hello from composefs\n"
    assert composefs_mount_at(str(mnt)) is None
    (bad,) = (u for u in gen.glob("*.service") if "missing" in u.name)
    proc = subprocess.run(command(bad, "ExecStart"), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    assert proc.stderr.endswith(
        "method call io.composefs.Repository.Mount() failed: io.composefs.Repository.NoSuchImage\n"
    )
    assert composefs_mount_at(str(missing)) is None
