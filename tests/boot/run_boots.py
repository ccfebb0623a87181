"""Boot tests: composefsd's systemd units and boot mounts in a real systemd boot.

Each boot is a throw-away VM whose PID 1 is this machine's systemd
(../shared/tools/systemd-vm). Before each boot, on the host: a repository with
two images, the project's units installed into an overlay directory exactly as
the README tells a user (``systemd/install-units --root OVERLAY --enable``,
``/etc/composefs/composefsd.env``, ``/etc/composefs/mounts.conf``). In the guest,
after multi-user.target, ``check.sh`` (bash: a Python process costs seconds
there) checks mounts and content and calls the daemon with composefsctl (the
boot-mount units' client: no varlinkctl anywhere, the guest's systemd is this
machine's 252); the rest is checked here from what it and systemd-vm leave in
/sdvm/out.

Boots (``--only NAME ...`` runs some of them):

  happy     a required mount pinned by digest and an optional one by image
            digest: socket activation (the socket listens first, the daemon
            starts at the first boot mount's connection), both mounted before
            local-fs.target with the source's content, no unit failed,
            composefsctl info and Verify, the unit's hardening as it runs
            (composefsd in the host's mount and network namespaces, with a
            hostname namespace of its own and umask 0077; the boot-mount
            units sandboxed), the systemd integration (WatchdogUSec and
            keep-alives, STATUS=, io.systemd.service.Ping, "systemctl
            reload" through Reload and failing on a bad composefsd.conf,
            the registry links of the socket unit), an OCI Pull from a
            registry (docker-registry on the guest's 127.0.0.1) under the
            unit's network settings, a non-root caller's CreateImage read with its
            rights under the unit's system call filter (a root-only file of
            its tree refused, its own tree imported), MountDumpfile under the
            unit's filter, capabilities and namespace restrictions (uid 4711
            from composefsd's mount namespace, root with CAP_SETFCAP alone
            from one of its own; the returned mount attached in unshare -Urm and
            read: each reads its own objects and not the other's 0600 one;
            root with every capability, which composefsd cannot name without
            CAP_SYS_PTRACE, refused), polkit (a plain user's Tag allowed by a
            rule, its RemoveImage refused by polkitd), ListMounts after a
            daemon restart, and a clean
            (non-forced) shutdown that unmounts through the daemon
  optional  an optional mount of a missing image fails exactly its unit
            (NoSuchImage in the journal); the boot goes on; and composefsd
            mounts with a read-only /tmp (as before local-fs.target on a
            read-only root)
  required  a required mount with the wrong digest fails its unit
            (ImageVerityFailed) and stops the boot in emergency mode
  baseline  no project units: boot time and Python processes to compare with

Every boot traces exec() from the kernel's start (``trace_event=``), so the
Python processes of the boot path are counted, not guessed. Timings go to
stdout; exit status 0 when every check passed.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
SDVM_DEFAULT = (
    Path(os.environ.get("COMPOSEFSD_SHARED") or REPO.parent / "shared") / "tools" / "systemd-vm"
)
BOOTS = ("happy", "optional", "required", "baseline")
SOCKET_PATH = "/run/composefs/io.composefs.Repository"
GUEST_REPO = "/var/lib/composefs"
RECORDER = "boot-test-shutdown-log.service"
#: Boots of one kind, when the guest kernel dies before systemd even starts:
#: under QEMU's software CPU a 6.12 guest now and then oopses while it patches its
#: own code at early boot ("Oops: int3", seen once in some 20 boots), before any
#: of the code under test runs. Any later failure counts at once.
BOOT_ATTEMPTS = 3


def log(msg: str) -> None:
    print(msg, flush=True)


def run(cmd: list[str], **kw: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, check=True, capture_output=True, text=True, **kw)


def escape(where: str, template: str) -> str:
    return run(["systemd-escape", "--path", f"--template={template}", where]).stdout.strip()


def mount_unit(where: str) -> str:
    return run(["systemd-escape", "--path", "--suffix=mount", where]).stdout.strip()


def cfs_unit(where: str) -> str:
    return escape(where, "composefs-mount@.service")


# ----------------------------------------------------------------- setup --


def make_tree(root: Path, seed: int, nfiles: int) -> None:
    """A small but varied source tree: empty, inline-sized and object-sized files,
    an executable, nested directories, relative and absolute symlinks, a hard
    link, another owner, fixed mtimes (with nanoseconds)."""
    rng = random.Random(seed)
    root.mkdir(parents=True)
    (root / "empty").write_bytes(b"")
    (root / "hello.txt").write_text(f"hello from composefs, tree {seed}\n")
    for i in range(nfiles):
        d = root / f"d{i % 3}" / ("sub" if i % 2 else "")
        d.mkdir(parents=True, exist_ok=True)
        size = rng.choice([1, 100, 4095, 4096, 4097, 20000, 300000])
        (d / f"f{i}.bin").write_bytes(rng.randbytes(size))
    big = root / "big.bin"
    big.write_bytes(rng.randbytes(1 << 20))
    tool = root / "bin" / "tool"
    tool.parent.mkdir()
    tool.write_text("#!/bin/sh\necho tool\n")
    tool.chmod(0o755)
    os.symlink("hello.txt", root / "link")
    os.symlink("/etc/os-release", root / "abs-link")
    os.link(big, root / "big.hardlink")
    os.chown(root / "hello.txt", 1000, 1000)
    (root / "d0").chmod(0o750)
    for path in sorted(root.rglob("*"), reverse=True):
        ns = 1_700_000_000_123_456_789 + rng.randrange(10**12)
        os.utime(path, ns=(ns, ns), follow_symlinks=False)
    os.utime(root, ns=(1_700_000_000_000_000_001,) * 2)


@dataclass
class Image:
    name: str  # short name, for files
    ref: str
    src: Path
    digest: str = ""


@dataclass
class Boot:
    name: str
    conf: str  # mounts.conf
    mode: str  # check.sh mode
    caller: bool = False  # a non-root user, uid 4711, may use the socket and CreateImage
    expect: list[tuple[str, Image]] = field(default_factory=list)  # mounted at the end
    absent: list[str] = field(default_factory=list)
    fine: list[str] = field(default_factory=list)  # other boot mounts that succeed
    units: bool = True  # the project's units installed
    graceful: bool = False  # non-forced poweroff, with the shutdown recorder
    want_rc: int = 0


def composefsctl(*args: str) -> str:
    return run([sys.executable, "-m", "composefsd.cli.composefsctl", *args]).stdout


def install(overlay: Path, composefsd: str, repo: Path) -> None:
    """What the README tells a user: install-units (with --enable; boot mounts get
    the composefsctl beside composefsd), the daemon's env file; plus the
    repository, made on the host, where the env file says."""
    proc = run(
        [
            str(REPO / "systemd" / "install-units"),
            "--root",
            str(overlay),
            "--composefsd",
            composefsd,
            "--enable",
        ]
    )
    wanted = overlay / "etc/systemd/system/sockets.target.wants/composefsd.socket"
    assert wanted.is_symlink(), f"install-units --enable did not enable the socket:\n{proc.stderr}"
    (overlay / "etc/composefs/composefsd.env").write_text(f"COMPOSEFSD_REPOSITORY={GUEST_REPO}\n")
    shutil.copytree(repo, overlay / GUEST_REPO.lstrip("/"), symlinks=True)


CALLER_UID = 4711
CALLER_GROUP = "cfsboot"
#: A user in no group of composefsd's: MountDumpfile (open to anyone who can
#: connect) and polkit (a rule lets it tag).
PLAIN_UID = 4712
PLAIN_USER = "cfsplain"
POLKIT_RULE = f"""// boot test: {PLAIN_USER} may tag OCI images (composefsd asks polkitd)
polkit.addRule(function(action, subject) {{
    if (action.id == "io.composefs.composefsd.tag" && subject.user == "{PLAIN_USER}")
        return polkit.Result.YES;
}});
"""


def add_caller(overlay: Path) -> None:
    """Non-root callers as an administrator would add them: a user and group in
    composefsd's --group, and a plain user (the guest's /etc/passwd and
    /etc/group are the host's, plus these); the socket open to everyone (as the
    README says for MountDumpfile and polkit: SocketMode=0666) and a polkit rule
    for the plain user."""
    etc = overlay / "etc"
    nologin = "::/nonexistent:/usr/sbin/nologin\n"
    for name, lines in (
        (
            "passwd",
            f"{CALLER_GROUP}:x:{CALLER_UID}:{CALLER_UID}{nologin}"
            f"{PLAIN_USER}:x:{PLAIN_UID}:{PLAIN_UID}{nologin}",
        ),
        ("group", f"{CALLER_GROUP}:x:{CALLER_UID}:\n{PLAIN_USER}:x:{PLAIN_UID}:\n"),
    ):
        (etc / name).write_text(Path("/etc", name).read_text() + lines)
    dropin = etc / "systemd/system/composefsd.socket.d"
    dropin.mkdir(parents=True)
    (dropin / "caller.conf").write_text(f"[Socket]\nSocketMode=0666\nSocketGroup={CALLER_GROUP}\n")
    rules = etc / "polkit-1/rules.d"
    rules.mkdir(parents=True)
    (rules / "50-composefsd-boot.rules").write_text(POLKIT_RULE)
    env = etc / "composefs/composefsd.env"
    env.write_text(env.read_text() + f"COMPOSEFSD_OPTIONS=--group {CALLER_GROUP}\n")


def harness(dirpath: Path, boot: Boot) -> None:
    """Test-only units: a non-forced poweroff after the check, and a unit that
    stops after the boot mounts and composefsd (it is ordered before them) and
    then saves the journal and the mount table to /sdvm/out."""
    unit_dir = dirpath / "etc/systemd/system"
    (unit_dir / "sdvm-test.service.d").mkdir(parents=True)
    (unit_dir / "sdvm-test.service.d/graceful.conf").write_text(
        "[Unit]\nSuccessAction=poweroff\nFailureAction=poweroff\n"
    )
    before = " ".join(cfs_unit(w) for w, _ in boot.expect)
    (unit_dir / RECORDER).write_text(
        f"""[Unit]
Description=boot test: save the journal once composefs boot mounts and composefsd have stopped
DefaultDependencies=no
RequiresMountsFor=/sdvm
Before={before} composefsd.service composefsd.socket
Conflicts=shutdown.target
Before=shutdown.target

[Service]
Type=oneshot
RemainAfterExit=yes
ExecStart=/bin/true
ExecStop=/bin/sh -c 'cat /proc/self/mountinfo >/sdvm/out/shutdown-mountinfo.txt; \
journalctl --sync; journalctl -b --no-pager -o short-monotonic >/sdvm/out/shutdown-journal.txt; sync'

[Install]
WantedBy=local-fs.target
"""
    )


# -------------------------------------------------------------- parsing --

JOURNAL_RE = re.compile(r"^\[\s*(\d+\.\d+)\] \S+ ([^:\[]+)(?:\[(\d+)\])?: (.*)$")


@dataclass
class Line:
    t: float
    ident: str
    pid: int
    msg: str


def journal(path: Path) -> list[Line]:
    out = []
    if path.exists():
        for raw in path.read_text(errors="replace").splitlines():
            m = JOURNAL_RE.match(raw)
            if m:
                out.append(Line(float(m[1]), m[2], int(m[3] or 0), m[4]))
    return out


def first(lines: list[Line], ident: str, prefix: str) -> Line | None:
    return next((ln for ln in lines if ln.ident == ident and ln.msg.startswith(prefix)), None)


def show_blocks(path: Path) -> dict[str, dict[str, str]]:
    units: dict[str, dict[str, str]] = {}
    if not path.exists():
        return units
    for block in path.read_text().split("\n\n"):
        props = dict(line.split("=", 1) for line in block.splitlines() if "=" in line)
        if "Id" in props:
            units[props["Id"]] = props
    return units


def failed_units(path: Path) -> list[str]:
    failed = []
    if path.exists():
        for line in path.read_text().splitlines():
            tok = line.replace("\u25cf", " ").split()
            if len(tok) >= 3 and tok[1] == "loaded" and tok[2] == "failed":
                failed.append(tok[0])
    return failed


def boot_times(path: Path) -> dict[str, float]:
    times = {}
    if path.exists():
        for line in path.read_text().splitlines():
            key, _, val = line.partition("=")
            if val.strip().isdigit() and int(val) > 0:
                times[key] = int(val) / 1e6
    return times


EXEC_RE = re.compile(
    r"^\s*(.+?)-(\d+)\s+\[\d+\].*?\s(\d+\.\d+): sched_process_exec: filename=(\S+) pid=(\d+)"
)


def is_python(path: str, overlays: list[Path]) -> bool:
    """Does exec'ing this guest path start a Python interpreter? The guest's root
    is the host's plus the overlays, so the file can be read here."""
    for base in [*overlays, Path("/")]:
        p = base / path.lstrip("/")
        if p.exists():
            break
    else:
        return False
    if re.fullmatch(r"python[0-9.]*", Path(os.path.realpath(p)).name):
        return True
    try:
        with open(p, "rb") as f:
            head = f.readline(256)
    except OSError:
        return False
    return head.startswith(b"#!") and b"python" in head


def python_execs(trace: Path, overlays: list[Path]) -> tuple[list[tuple[float, str, int]], str]:
    """(time, filename, pid) of every exec of a Python interpreter or script in the
    trace from PID 1's exec of systemd on (before it, the initrd's busybox ran from
    files the host does not have), and a note on the trace (events, lost events)."""
    if not trace.exists():
        return [], "no trace"
    text = trace.read_text(errors="replace")
    m = re.search(r"entries-in-buffer/entries-written: (\d+)/(\d+)", text)
    execs = [(float(x[3]), x[4], int(x[5])) for x in map(EXEC_RE.match, text.splitlines()) if x]
    start = next((i for i, (_, f, pid) in enumerate(execs) if pid == 1 and "systemd" in f), None)
    if start is None:
        return [], "no exec of systemd by PID 1 in the trace"
    note = f"{len(execs) - start} execs from systemd's start"
    if not m or m[1] != m[2]:
        note += ", some LOST" if m else ", no trace header"
    cache: dict[str, bool] = {}
    found = []
    for t, filename, pid in execs[start:]:
        if filename not in cache:
            cache[filename] = is_python(filename, overlays)
        if cache[filename]:
            found.append((t, filename, pid))
    return found, note


def died_before_userspace(out: Path | None) -> str | None:
    """Why a boot never reached PID 1 (a kernel panic on the console and no
    userspace start time), or None."""
    if out is None:
        return None
    if boot_times(out / "boot-times.txt"):
        return None  # systemd ran
    try:
        console = (out / "console.log").read_text(errors="replace")
    except OSError:
        return None
    m = re.search(r"Kernel panic - not syncing: .*", console)
    return m[0].strip() if m else None


# ------------------------------------------------------------- checking --


class Checks:
    def __init__(self, boot: str) -> None:
        self.boot = boot
        self.failed = 0
        self.passed = 0

    def __call__(self, cond: object, msg: str, detail: str = "") -> bool:
        if cond:
            self.passed += 1
            log(f"  ok   {msg}")
        else:
            self.failed += 1
            log(f"  FAIL {msg}" + (f"\n       {detail}" if detail else ""))
        return bool(cond)


def ts(units: dict[str, dict[str, str]], unit: str, prop: str) -> float:
    try:
        return int(units[unit][prop]) / 1e6
    except (KeyError, ValueError):
        return float("nan")


def load_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text().lstrip("\x1e"))
    except (OSError, ValueError):
        return None


def check_mounted(
    ck: Checks, boot: Boot, units: dict[str, dict[str, str]], lines: list[Line]
) -> None:
    local_fs = ts(units, "local-fs.target", "ActiveEnterTimestampMonotonic")
    ck(units.get("local-fs.target", {}).get("ActiveState") == "active", "local-fs.target is active")
    for where, img in boot.expect:
        cu, mu = cfs_unit(where), mount_unit(where)
        props = units.get(cu, {})
        ck(
            (props.get("ActiveState"), props.get("SubState")) == ("active", "exited"),
            f"{cu} is active",
            str(props),
        )
        kind = "required" if "local-fs.target" in props.get("RequiredBy", "") else "wanted"
        t_cu = ts(units, cu, "ActiveEnterTimestampMonotonic")
        t_mu = ts(units, mu, "ActiveEnterTimestampMonotonic")
        ck(
            units.get(mu, {}).get("ActiveState") == "active",
            f"{mu} is active (systemd sees the mount)",
        )
        ck(
            t_cu <= local_fs and t_mu <= local_fs,
            f"{where} ({img.ref}, {kind} by local-fs.target) mounted at {t_mu:.2f} s, "
            f"its unit done at {t_cu:.2f} s, before local-fs.target at {local_fs:.2f} s",
        )
        mounted = first(lines, "composefsd", f"mounted image {img.digest} at {where}")
        ck(mounted, f"the journal has composefsd's 'mounted image {img.digest[:12]}... at {where}'")


def check_happy(ck: Checks, boot: Boot, out: Path, lines: list[Line], data: Path) -> dict[str, Any]:
    units = show_blocks(out / "units.txt")
    sock, svc = units.get("composefsd.socket", {}), units.get("composefsd.service", {})
    # Socket activation, not an eager start.
    ck(sock.get("ActiveState") == "active", "composefsd.socket is active (listening)")
    ck(
        svc.get("UnitFileState") != "enabled"
        and svc.get("WantedBy", "") == ""
        and svc.get("RequiredBy", "") == ""
        and "composefsd.socket" in svc.get("TriggeredBy", ""),
        "composefsd.service is not enabled nor wanted by anything; TriggeredBy=composefsd.socket "
        f"(UnitFileState={svc.get('UnitFileState')})",
        str(svc),
    )
    listening = first(lines, "systemd", "Listening on composefsd.socket")
    mount_start = first(lines, "systemd", "Starting composefs-mount@")
    svc_start = first(lines, "systemd", "Starting composefsd.service")
    ready = first(lines, "composefsd", "composefsd ")
    t_check = check_start(out)
    starts = [
        ln for ln in lines if ln.msg.startswith("Starting composefsd.service") and ln.t < t_check
    ]
    ck(
        listening and mount_start and svc_start and listening.t < mount_start.t < svc_start.t,
        "journal order: socket listening "
        f"({listening.t if listening else '?'} s) < first boot mount starting "
        f"({mount_start.t if mount_start else '?'} s) < composefsd.service starting "
        f"({svc_start.t if svc_start else '?'} s): started by the mount's connection",
    )
    first_exec = min(
        (ts(units, cfs_unit(w), "InactiveExitTimestampMonotonic") for w, _ in boot.expect),
        default=float("nan"),
    )
    ck(
        ts(units, "composefsd.socket", "ActiveEnterTimestampMonotonic")
        < first_exec
        <= ts(units, "composefsd.service", "InactiveExitTimestampMonotonic"),
        "unit timestamps: socket active < first boot mount started <= composefsd started",
    )
    ck(len(starts) == 1, f"composefsd started once during the boot ({len(starts)})")
    check_mounted(ck, boot, units, lines)
    failed = failed_units(out / "failed-units.txt")
    ck(not failed, f"no unit failed ({', '.join(failed) or 'none'})")

    # Content: check.sh compared in the guest; compare its manifests here too.
    for _where, img in boot.expect:
        guest = out / f"{img.name}.manifest"
        host = data / f"{img.name}.manifest"
        ck(
            guest.exists() and guest.read_text() == host.read_text(),
            f"{img.ref}: the mounted tree's manifest equals the source's "
            f"({len(host.read_text().splitlines())} lines: metadata and sha256)",
        )

    # Varlink.
    info = (out / "info.txt").read_text() if (out / "info.txt").exists() else ""
    ck("io.composefs.Repository" in info, "composefsctl info lists io.composefs.Repository")
    verify = load_json(out / "verify.json") or {}
    img0 = boot.expect[0][1]
    ck(
        verify.get("ok") is True
        and verify.get("digest") == img0.digest
        and not verify.get("problems"),
        f"Verify {img0.ref}: ok, digest {img0.digest[:12]}..., "
        f"{verify.get('objectsChecked')} objects",
        str(verify),
    )

    check_ownmount(ck, out, lines)
    check_polkit(ck, out, lines)

    # Restart keeps the mounts.
    def mounts(name: str) -> set[tuple[str, str]]:
        data = load_json(out / name) or {}
        return {(m.get("where"), m.get("digest")) for m in data.get("mounts", [])}

    want = {(w, img.digest) for w, img in boot.expect}
    before, after = mounts("mounts-before.json"), mounts("mounts-after.json")
    restart = show_blocks_plain(out / "restart.txt")
    ck(
        restart.get("ActiveState") == "active"
        and restart.get("MainPID") not in ("", "0", svc.get("MainPID")),
        f"composefsd restarted: pid {svc.get('MainPID')} -> {restart.get('MainPID')}",
    )
    ck(want <= before, "ListMounts before the restart lists the boot mounts", str(before))
    ck(
        want <= after and after == before,
        "ListMounts after the restart lists the same mounts",
        str(after),
    )

    # Clean shutdown: each boot mount unmounted through composefsd, before it stops.
    sd = journal(out / "shutdown-journal.txt")
    ck(sd, "the shutdown recorder saved the journal after the boot mounts stopped")
    svc_stopped = first(sd, "systemd", "Stopped composefsd.service")
    # The last SIGTERM: the restart during the check had one too.
    sigterm = next(
        (ln for ln in reversed(sd) if ln.ident == "composefsd" and "received SIGTERM" in ln.msg),
        None,
    )
    for where, _img in boot.expect:
        cu = cfs_unit(where)
        stopping = first(sd, "systemd", f"Stopping {cu}")
        unmounted = next(
            (
                ln
                for ln in sd
                if ln.ident == "composefsd"
                and ln.msg.startswith("unmounted ")
                and f" from {where} " in ln.msg
                and stopping
                and ln.t >= stopping.t
            ),
            None,
        )
        stopped = first(sd, "systemd", f"Stopped {cu}")
        ck(
            stopping
            and unmounted
            and stopped
            and sigterm
            and stopping.t <= unmounted.t <= stopped.t <= sigterm.t,
            f"shutdown: {cu} stopping ({stopping.t if stopping else '?'} s) -> "
            f"composefsd '{unmounted.msg if unmounted else 'unmounted ... (missing)'}' -> "
            f"unit stopped -> composefsd SIGTERM ({sigterm.t if sigterm else '?'} s)",
        )
    ck(svc_stopped, "shutdown: composefsd.service stopped")
    mi = (
        (out / "shutdown-mountinfo.txt").read_text()
        if (out / "shutdown-mountinfo.txt").exists()
        else ""
    )
    still = [w for w, _ in boot.expect if re.search(rf"^\S+ \S+ \S+ \S+ {re.escape(w)} ", mi, re.M)]
    ck(
        mi and not still,
        f"shutdown: nothing mounted at the boot mounts afterwards ({still or 'none'})",
    )
    bad = [ln.msg for ln in sd if re.search(r"[Ff]ailed to unmount|Failed with result", ln.msg)]
    ck(not bad, "shutdown: no unit failed and nothing failed to unmount", "; ".join(bad))
    return {
        "listening": listening.t if listening else None,
        "daemon_start": svc_start.t if svc_start else None,
        "daemon_ready": ready.t if ready else None,
    }


#: What check.sh's MountDumpfile callers must read through the mount: content,
#: or the errno name, per file. uid 4712 owns "mine" and "theirs" (0600), root
#: "secret" (0600): each caller reads exactly what it could open itself.
OWNMOUNT_EXPECT = {
    "own-user.json": (
        f"uid {PLAIN_UID}, from composefsd's mount namespace",
        {"mine": "own image file\n", "secret": "EACCES", "theirs": "user secret\n"},
    ),
    "own-root-ns.json": (
        "root with CAP_SETFCAP alone, from a mount namespace of its own (unshare -m)",
        {"mine": "own image file\n", "secret": "root secret\n", "theirs": "EACCES"},
    ),
}
#: What composefsd logs when its creator thread cannot enter a caller's mount
#: namespace (setns refused) and falls back to its own.
CANNOT_JOIN = "cannot enter the caller's mount namespace"


def check_ownmount(ck: Checks, out: Path, lines: list[Line]) -> None:
    """MountDumpfile under the unit (check.sh: tests/ownmount_client.py as uid 4711
    and as root in ``unshare -m``): the mount came back and each file reads as its
    caller's rights allow, and the creator thread entered the other namespace."""
    for name, (who, want) in OWNMOUNT_EXPECT.items():
        res = load_json(out / name) or {}
        files = (res.get("seen") or {}).get("files") or {}
        got = {f: e.get("content", e.get("error")) for f, e in files.items()}
        ck(
            "reply" in res and got == want,
            f"MountDumpfile as {who} under the unit: {got or res.get('error')}",
            (out / name).read_text()[-1500:] if (out / name).exists() else "(no output)",
        )
    # Root with every capability: composefsd (without CAP_SYS_PTRACE) cannot name
    # its namespace, so it is served from its own, which takes no layer of another.
    full = load_json(out / "own-root-caps.json") or {}
    ck(
        full.get("error") == "io.composefs.Repository.MountFailed"
        and (full.get("parameters") or {}).get("errnoName") == "EINVAL"
        and first(lines, "composefsd", "cannot tell the caller's mount namespace"),
        "MountDumpfile as root with all capabilities in another mount namespace: "
        "its namespace cannot be told without CAP_SYS_PTRACE, refused with EINVAL",
        str(full),
    )
    joined = [ln.msg for ln in lines if ln.ident == "composefsd" and CANNOT_JOIN in ln.msg]
    ck(
        not joined,
        "MountDumpfile: composefsd entered the CAP_SETFCAP-only root caller's mount "
        "namespace (setns allowed by the unit)",
        "; ".join(joined),
    )


def check_polkit(ck: Checks, out: Path, lines: list[Line]) -> None:
    """polkit under the unit (check.sh: uid 4712, in no group of composefsd's):
    Tag, which a rule allows, works; RemoveImage, which none does, is refused by
    polkitd's answer (composefsd logs it), not for want of a bus."""
    tag = load_json(out / "polkit-tag.json")
    allowed = first(lines, "composefsd", "polkit allowed io.composefs.Oci.Tag")
    ck(
        isinstance(tag, dict)
        and "error" not in tag
        and allowed
        and f"(uid {PLAIN_UID})" in allowed.msg,
        f"uid {PLAIN_UID}'s Tag, allowed by a polkit rule, works under the unit: "
        f"{allowed.msg if allowed else '(no polkit answer in the journal)'}",
        str(tag),
    )
    remove = load_json(out / "polkit-remove.json") or {}
    refused = first(lines, "composefsd", "polkit refused io.composefs.Repository.RemoveImage")
    ck(
        remove.get("error") == "org.varlink.service.PermissionDenied"
        and refused
        and f"(uid {PLAIN_UID})" in refused.msg,
        f"uid {PLAIN_UID}'s RemoveImage refused by polkitd: "
        f"{refused.msg if refused else '(no refusal in the journal)'}",
        str(remove),
    )


def show_blocks_plain(path: Path) -> dict[str, str]:
    if not path.exists():
        return {}
    return dict(line.split("=", 1) for line in path.read_text().splitlines() if "=" in line)


def check_start(out: Path) -> float:
    try:
        return float((out / "check-times.txt").read_text().split()[0])
    except (OSError, IndexError, ValueError):
        return float("inf")


#: What a boot mount's composefsctl logs when composefsd refuses the Mount.
MOUNT_FAILED = "composefsctl: error: method call io.composefs.Repository.Mount() failed: "


def check_optional(ck: Checks, boot: Boot, out: Path, lines: list[Line]) -> None:
    units = show_blocks(out / "units.txt")
    check_mounted(ck, boot, units, lines)
    failed = failed_units(out / "failed-units.txt")
    (where,) = boot.absent
    cu = cfs_unit(where)
    ck(failed == [cu], f"exactly {cu} failed ({', '.join(failed) or 'none'})")
    props = units.get(cu, {})
    ck(
        (props.get("ActiveState"), props.get("Result")) == ("failed", "exit-code")
        and "local-fs.target" in props.get("WantedBy", ""),
        f"{cu}: failed (exit-code), only wanted by local-fs.target",
        str(props),
    )
    err = first(lines, "composefsctl", MOUNT_FAILED)
    ck(
        err and err.msg.endswith("io.composefs.Repository.NoSuchImage"),
        f"journal: composefsctl[{err.pid if err else '?'}]: {err.msg if err else '(missing)'}",
    )
    ck(
        first(lines, "systemd", f"Failed to start {cu}"),
        f"journal: systemd: Failed to start {cu} - ...",
    )
    ck(
        units.get("multi-user.target", {}).get("ActiveState") == "active",
        "the boot went on: multi-user.target is active",
    )


def check_required(ck: Checks, boot: Boot, out: Path, lines: list[Line], wrong: str) -> None:
    state = (out / "boot-failed").read_text().strip() if (out / "boot-failed").exists() else ""
    ck(state == "emergency", f"systemd fell into emergency mode ({state or 'no'})")
    failed = failed_units(out / "failed-units.txt")
    where, img = boot.expect[0]
    cu = cfs_unit(where)
    others = [u for u in failed if u.startswith("composefs-mount@") and u != cu]
    ck(cu in failed and not others, f"{cu} failed, and no other boot mount ({', '.join(failed)})")
    err = first(lines, "composefsctl", MOUNT_FAILED)
    ck(
        err and err.msg.endswith("io.composefs.Repository.ImageVerityFailed"),
        f"journal: composefsctl[{err.pid if err else '?'}]: {err.msg if err else '(missing)'}",
    )
    detail = next(
        (ln for ln in lines if ln.ident == "composefsctl" and f"expected {wrong}" in ln.msg), None
    )
    ck(
        detail and img.digest in detail.msg,
        f"journal: the reason names both digests: {detail.msg[:160] if detail else '(missing)'}",
    )
    ck(
        first(lines, "systemd", f"Failed to start {cu}"),
        f"journal: systemd: Failed to start {cu} - ...",
    )
    for other in boot.fine:
        ok = first(lines, "systemd", f"Finished {cfs_unit(other)}")
        ck(ok, f"journal: the other boot mount, {cfs_unit(other)}, finished")
    dep = first(lines, "systemd", "Dependency failed for local-fs.target")
    ck(dep, "journal: systemd: Dependency failed for local-fs.target")
    ck(not (out / "started").exists(), "the check command never ran (no multi-user.target)")


# ---------------------------------------------------------------- main --


#: Where the happy boot's guest serves a registry on its own loopback: a pull
#: from it goes through the unit's network settings (a network namespace of the
#: service's own, as before, would have a loopback without it). Not 5000: the
#: guest boots the host's system, where Debian's docker-registry.service may
#: be enabled on that port.
GUEST_REGISTRY = "127.0.0.1:47123"
PULLED_FILE = ("usr/pulled.txt", b"pulled from a registry\n")


def _pulled_layer() -> bytes:
    """A layer with PULLED_FILE and its directory (an image needs a /usr)."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        usr = tarfile.TarInfo("usr")
        usr.type, usr.mode, usr.mtime = tarfile.DIRTYPE, 0o755, 1_700_000_000
        tar.addfile(usr)
        name, content = PULLED_FILE
        info = tarfile.TarInfo(name)
        info.size, info.mode, info.mtime = len(content), 0o644, 1_700_000_000
        tar.addfile(info, io.BytesIO(content))
    return out.getvalue()


def registry_data(work: Path, data: Path) -> None:
    """DATA/registry: the storage of a registry holding test/pulled:v1 (one layer,
    PULLED_FILE) and the config the guest serves it with, read-only."""
    sys.path.insert(0, str(HERE.parent))
    from registry import running_registry, write_layout  # tests/registry.py

    layout = work / "pull-layout"
    write_layout(layout, {"v1": [_pulled_layer()]})
    with running_registry(work / "pull-registry") as reg:
        reg.push(f"oci:{layout}:v1", "test/pulled", "v1")
    config = {
        "version": 0.1,
        "log": {"level": "error", "accesslog": {"disabled": True}},
        "storage": {
            "filesystem": {"rootdirectory": str(work / "pull-registry" / "storage")},
            "maintenance": {"uploadpurging": {"enabled": False}, "readonly": {"enabled": True}},
        },
        "http": {"addr": GUEST_REGISTRY, "secret": "composefsd-boot-test"},
    }
    (data / "registry.yml").write_text(json.dumps(config))


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--only", nargs="+", choices=BOOTS, default=list(BOOTS))
    ap.add_argument("--systemd-vm", default=os.environ.get("SYSTEMD_VM", str(SDVM_DEFAULT)))
    ap.add_argument("--keep", action="store_true", help="keep the work and VM run directories")
    args = ap.parse_args()

    composefsd = str(Path(sys.executable).parent / "composefsd")
    client = str(Path(sys.executable).parent / "composefsctl")
    for what, path in (
        ("composefsd", composefsd),
        ("composefsctl", client),
        ("systemd-vm", args.systemd_vm),
    ):
        if not os.access(path, os.X_OK):
            log(f"boot tests: no {what} at {path}")
            return 2

    t_all = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="composefsd-boot.", dir="/tmp"))
    os.chmod(work, 0o755)
    log(f"boot tests in {work}")
    app = Image("app", "app/v1", work / "src/app")
    tools = Image("tools", "tools/v1", work / "src/tools")
    make_tree(app.src, 1, 24)
    make_tree(tools.src, 2, 6)
    repo = work / "repo"
    composefsctl("--repo", str(repo), "init")
    for img in (app, tools):
        img.digest = composefsctl(
            "--repo", str(repo), "create-image", str(img.src), "--ref", img.ref
        ).split()[-1]
    wrong = tools.digest

    boots = {
        "happy": Boot(
            "happy",
            f"# boot test: both kinds, one pinned by digest, one named by digest\n"
            f"/srv/app    {app.ref}    required,digest={app.digest}\n"
            f"/opt/tools  sha256:{tools.digest}    optional,verity=try\n",
            "happy",
            expect=[("/srv/app", app), ("/opt/tools", tools)],
            graceful=True,
            caller=True,
        ),
        "optional": Boot(
            "optional",
            f"/srv/app      {app.ref}\n/opt/missing  nope/v9   optional\n",
            "optional",
            expect=[("/srv/app", app)],
            absent=["/opt/missing"],
        ),
        "required": Boot(
            "required",
            f"/opt/tools  {tools.ref}  optional\n/srv/app    {app.ref}    required,digest={wrong}\n",
            "none",  # the check never runs
            expect=[("/srv/app", app)],
            fine=["/opt/tools"],
            want_rc=125,
        ),
        "baseline": Boot("baseline", "", "baseline", units=False),
    }

    results: dict[str, dict[str, Any]] = {}
    total_failed = 0
    for name in args.only:
        boot = boots[name]
        bdir = work / name
        data = bdir / "data"
        data.mkdir(parents=True)
        overlays: list[Path] = []
        if boot.units:
            ov = bdir / "overlay"
            install(ov, composefsd, repo)
            (ov / "etc/composefs/mounts.conf").write_text(boot.conf)
            if boot.caller:
                add_caller(ov)
            overlays.append(ov)
        if boot.graceful:
            hv = bdir / "harness"
            harness(hv, boot)
            overlays.append(hv)
        show = ["composefsd.socket", "composefsd.service", "local-fs.target", "multi-user.target"]
        for where, img in boot.expect:
            show += [cfs_unit(where), mount_unit(where)]
            (data / f"{img.name}.manifest").write_text(
                run(["sh", str(HERE / "manifest.sh"), str(img.src)]).stdout
            )
        show += [cfs_unit(w) for w in boot.absent]
        (data / "units").write_text(" ".join(show) + "\n")
        (data / "expect").write_text(
            "".join(f"{w} {img.name} {img.ref}\n" for w, img in boot.expect)
        )
        (data / "absent").write_text("".join(f"{w}\n" for w in boot.absent))
        if name == "happy":
            registry_data(work, data)

        cmd = [args.systemd_vm]
        for ov in overlays:
            cmd += ["--overlay", str(ov)]
        if boot.graceful:
            cmd += ["--enable", RECORDER]
        cmd += ["--", "bash", str(HERE / "check.sh"), boot.mode, str(data), client]
        env = dict(os.environ, SDVM_KEEP="1")
        # systemd-vm hands PATH to the check: none of it may offer a varlinkctl,
        # which Debian 12 lacks and nothing here needs.
        env["PATH"] = os.pathsep.join(
            d
            for d in env.get("PATH", "").split(os.pathsep)
            if d and not Path(d, "varlinkctl").exists()
        )
        env.setdefault("SDVM_TIMEOUT", "300")
        env["SDVM_APPEND"] = (
            env.get("SDVM_APPEND", "") + " trace_event=sched:sched_process_exec"
        ).strip()
        log(
            f"\n== boot '{name}'"
            + (
                f": mounts.conf:\n{boot.conf.rstrip()}"
                if boot.conf
                else ": without the project's units"
            )
        )
        for attempt in range(1, BOOT_ATTEMPTS + 1):
            t0 = time.monotonic()
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO)
            wall = time.monotonic() - t0
            m = re.search(r"run dir kept: (\S+)", proc.stderr)
            died = died_before_userspace(Path(m[1]) / "out") if m else None
            if m is None or not died or attempt == BOOT_ATTEMPTS:
                break
            log(f"  the guest kernel died before systemd started ({died}); booting again")
            shutil.rmtree(m[1], ignore_errors=True)
        ck = Checks(name)
        if m is None:
            ck(False, "systemd-vm kept its run directory", proc.stderr[-2000:])
            total_failed += 1
            continue
        rundir = Path(m[1])
        out = rundir / "out"
        lines = journal(out / "journal.txt")
        ck(
            proc.returncode == boot.want_rc,
            f"systemd-vm exit status {proc.returncode} (expected {boot.want_rc})",
            (proc.stdout + proc.stderr)[-3000:],
        )
        if boot.mode != "baseline" and boot.want_rc == 0:
            tlog = (out / "test.log").read_text() if (out / "test.log").exists() else ""
            for line in tlog.splitlines():
                if line.startswith(("ok ", "FAIL ")):
                    ck(line.startswith("ok "), "guest: " + line.split(None, 1)[1])
        extra: dict[str, Any] = {}
        if name == "happy":
            extra = check_happy(ck, boot, out, lines, data)
        elif name == "optional":
            check_optional(ck, boot, out, lines)
        elif name == "required":
            check_required(ck, boot, out, lines, wrong)
        py, note = python_execs(out / "exec-trace.txt", overlays)
        times = boot_times(out / "boot-times.txt")
        res = {"wall": wall, "times": times, "python": py, "trace": note, **extra}
        pre = first(lines, "systemd", "Reached target local-fs-pre.target")
        lfs = first(lines, "systemd", "Reached target local-fs.target")
        if pre and lfs:
            res["local_fs_pre_to_local_fs"] = lfs.t - pre.t
        results[name] = res
        summary = " ".join(f"{k}={v:.1f}" for k, v in times.items() if k != "test-end")
        log(f"  VM wall time {wall:.1f} s; guest s since kernel start: {summary or '(none)'}")
        if boot.want_rc == 0:
            pys = ", ".join(f"{Path(f).name}[{p}] at {t:.1f} s" for t, f, p in py) or "none"
            log(f"  Python processes started before the check ({note}): {len(py)}: {pys}")
        if extra.get("daemon_start") and extra.get("daemon_ready"):
            log(
                f"  composefsd: started at {extra['daemon_start']:.1f} s, ready at "
                f"{extra['daemon_ready']:.1f} s ({extra['daemon_ready'] - extra['daemon_start']:.1f} s)"
            )
        if "local_fs_pre_to_local_fs" in res:
            log(
                f"  local-fs-pre.target -> local-fs.target: {res['local_fs_pre_to_local_fs']:.1f} s"
            )
        total_failed += ck.failed
        if ck.failed == 0 and not args.keep:
            shutil.rmtree(rundir, ignore_errors=True)
        else:
            log(f"  kept: {rundir}")

    log("\n== summary")
    for name, res in results.items():
        mu = res["times"].get("multi-user.target")
        lf = res["times"].get("local-fs.target")
        log(
            f"  {name:9} VM {res['wall']:5.1f} s; local-fs.target "
            + (f"{lf:5.1f} s" if lf else "    - ")
            + "; multi-user.target "
            + (f"{mu:5.1f} s" if mu else "    - ")
            + (
                f"; Python processes in the boot path: {len(res['python'])}"
                if name != "required"
                else ""
            )
        )
    if "happy" in results and "baseline" in results:
        a = results["happy"]["times"].get("multi-user.target")
        b = results["baseline"]["times"].get("multi-user.target")
        if a and b:
            log(
                f"  multi-user.target with the units and two boot mounts: {a:.1f} s, without: {b:.1f} s ({a - b:+.1f} s)"
            )
    log(
        f"  total {time.monotonic() - t_all:.0f} s; {'all checks passed' if total_failed == 0 else f'{total_failed} checks FAILED'}"
    )
    if total_failed == 0 and not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    else:
        log(f"  work directory kept: {work}")
    return 1 if total_failed else 0


if __name__ == "__main__":
    sys.exit(main())
