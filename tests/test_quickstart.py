"""The README's quick start, run verbatim, as a new user would on Debian 12: its
commands are taken from the README's code blocks (so that a change there is tried
here), run by /bin/sh with Debian's own python3 (PEP 668 and all), as root and as
a non-root user, with and without $XDG_RUNTIME_DIR, in a new HOME; and what they
print is checked against what the README says they print: the start-up line and
its repository and socket, and the output of every composefsctl (and, as root,
varlinkctl) command of the walk-through.

``pip install .`` fetches the dependencies from the package index, as it does for
a user. Root's run happens in a private mount namespace whose root is the
machine's with an empty /sysroot and a fresh /run/composefs and /run/composefsd,
so that root's default repository, socket and configuration are not the machine's."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

import composefsd
import users
from conftest import TestUsers

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")
SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
SOCKET_NAME = "io.composefs.Repository"


def _section(title: str) -> str:
    start = README.index(f"\n## {title}\n")
    end = README.find("\n## ", start + 1)
    return README[start:end]


def _blocks(section: str, lang: str) -> list[list[str]]:
    """The code blocks of ``section`` fenced as ```lang, as lists of lines."""
    return [
        block.splitlines()
        for block in re.findall(rf"^```{lang}\n(.*?)^```$", section, re.MULTILINE | re.DOTALL)
    ]


QUICK = _section("Quick start")
SERVICE = _section("Service quick start")
INSTALL_BLOCK = _blocks(QUICK, "sh")[0]
DAEMON_LINE = "composefsd"
WALK_BLOCK, VARLINKCTL_BLOCK = _blocks(SERVICE, "sh")[:2]
(STARTUP_EXAMPLE,) = _blocks(SERVICE, "")[0]


def _startup_pattern() -> re.Pattern[str]:
    """The README's example start-up line with its time, pid and paths as groups."""
    m = re.fullmatch(
        r"(\S+ \S+) composefsd\[(\d+)\] (INFO: serving )'([^']+)'( \(.*\) on )'([^']+)'",
        STARTUP_EXAMPLE,
    )
    assert m, STARTUP_EXAMPLE
    return re.compile(
        r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} composefsd\[\d+\] "
        + re.escape(m.group(3))
        + "'(?P<repo>[^']+)'"
        + re.escape(m.group(5))
        + "'(?P<socket>[^']+)'"
    )


def test_the_blocks_are_what_the_test_expects() -> None:
    # The daemon runs in the foreground: it is the quick start's last command.
    assert INSTALL_BLOCK[-1] == DAEMON_LINE
    assert INSTALL_BLOCK[0].startswith("python3 -m venv ")
    assert _startup_pattern().fullmatch(STARTUP_EXAMPLE)
    assert any(line.startswith("composefsctl call ") for line in WALK_BLOCK)
    assert any(line.startswith("varlinkctl info $S") for line in VARLINKCTL_BLOCK)


@dataclass(slots=True)
class Step:
    line: str
    status: int
    output: str


@dataclass(slots=True)
class Run:
    startup: str
    steps: list[Step]
    daemon_status: int
    log: str


def _script(checkout: str, log: str, varlinkctl: bool) -> str:
    """The shell script of one run: the README's lines, each verbatim, between
    markers that separate their output (stdout and stderr) and exit status."""
    out = ["cd " + checkout]
    out += INSTALL_BLOCK[:-1]
    # The daemon's output goes to the log, and it stops with the script, whatever
    # becomes of the script.
    out.append(f"{DAEMON_LINE} >{log} 2>&1 &")
    out.append("daemon=$!")
    out.append("trap 'kill -TERM \"$daemon\" 2>/dev/null' EXIT HUP INT TERM")
    # Until the start-up line names the socket (or the daemon is gone).
    out.append(
        'i=0; until grep -q "INFO: serving .* on \'" '
        + log
        + ' || ! kill -0 "$daemon" 2>/dev/null || [ $i -ge 1200 ]; do sleep 0.1; i=$((i+1)); done'
    )
    lines = list(WALK_BLOCK) + (list(VARLINKCTL_BLOCK) if varlinkctl else [])
    for n, line in enumerate(lines):
        out.append(f"echo '@@STEP {n}'")
        # (":" keeps a comment line from making an empty, invalid group.)
        out.append("{ :; " + line + "\n} 2>&1")
        out.append('echo "@@STATUS $?"')
    out.append('kill -TERM "$daemon"; wait "$daemon"; echo "@@DAEMON $?"; trap - EXIT')
    return "\n".join(out) + "\n"


def _parse(stdout: str, log: str, varlinkctl: bool) -> Run:
    lines = list(WALK_BLOCK) + (list(VARLINKCTL_BLOCK) if varlinkctl else [])
    parts = re.split(r"^@@STEP (\d+)\n", stdout, flags=re.MULTILINE)
    steps = []
    for i in range(1, len(parts), 2):
        n, body = int(parts[i]), parts[i + 1]
        m = re.search(r"^@@STATUS (\d+)\n", body, re.MULTILINE)
        assert m, body
        steps.append(Step(lines[n], int(m.group(1)), body[: m.start()]))
    m = re.search(r"^@@DAEMON (\d+)$", stdout, re.MULTILINE)
    assert m, stdout[-2000:]
    startup = next((line for line in log.splitlines() if " INFO: serving " in line), "")
    assert [s.line for s in steps] == lines, stdout[-3000:]
    return Run(startup, steps, int(m.group(1)), log)


def _make_tree(home: Path) -> None:
    tree = home / "src" / "tree"
    (tree / "etc").mkdir(parents=True)
    (tree / "etc" / "motd").write_text("hello from the quick start\n")
    (tree / "data.bin").write_bytes(bytes(range(256)) * 40)
    (tree / "link").symlink_to("etc/motd")


def _copy_checkout(dest: Path) -> None:
    ignore = shutil.ignore_patterns(
        ".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", ".*_cache"
    )
    shutil.copytree(ROOT, dest, ignore=ignore, symlinks=True)


def _env(home: Path, xdg: str | None, path: str = SYSTEM_PATH) -> dict[str, str]:
    env = {"HOME": str(home), "PATH": path, "LANG": "C.UTF-8", "USER": home.name}
    # How this machine reaches the package index, as a user's shell would have it.
    for name, value in os.environ.items():
        if name.startswith("PIP_") or name.lower() in ("http_proxy", "https_proxy", "no_proxy"):
            env[name] = value
    if xdg is not None:
        env["XDG_RUNTIME_DIR"] = xdg
    return env


#: Root's run: a mount namespace whose / is the machine's, but with an empty
#: /sysroot, /run without composefs's directories and the Varlink registry, and an
#: empty /etc/composefs.
_ROOT_JAIL = r"""
set -e
new=$1; shift
mount -t tmpfs -o mode=0755 quickstart "$new"
for entry in /* /.[!.]*; do
    [ -e "$entry" ] || [ -L "$entry" ] || continue
    name=${entry#/}
    if [ -L "$entry" ]; then
        ln -s "$(readlink "$entry")" "$new/$name"
    elif [ -d "$entry" ]; then
        mkdir "$new/$name"
        case $name in sysroot | run) ;; *) mount --rbind "$entry" "$new/$name" ;; esac
    fi
done
mkdir -p "$new/sysroot"
mount -t tmpfs -o mode=0755 run "$new/run"
for entry in /run/*; do
    name=${entry#/run/}
    case $name in composefs | composefsd | varlink) continue ;; esac
    if [ -L "$entry" ]; then
        ln -s "$(readlink "$entry")" "$new/run/$name"
    elif [ -d "$entry" ]; then
        mkdir "$new/run/$name" && mount --rbind "$entry" "$new/run/$name"
    elif [ -e "$entry" ]; then
        touch "$new/run/$name" && mount --bind "$entry" "$new/run/$name" || true
    fi
done
# Nor the machine's composefsd configuration.
[ ! -d /etc/composefs ] || mount -t tmpfs -o mode=0755 etc-composefs "$new/etc/composefs"
exec chroot "$new" /bin/sh "$@"
"""


@pytest.fixture(scope="module")
def varlinkctl_dir(reference_bin: Path) -> Path:
    assert (reference_bin / "varlinkctl").exists()
    return reference_bin


def _finish(proc: subprocess.Popen[str]) -> subprocess.CompletedProcess[str]:
    """Wait for a run; one that hangs is killed with everything it started (its
    own session), so that no daemon outlives the test."""
    try:
        out, err = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"the quick start did not finish:\n{out[-3000:]}{err[-3000:]}")
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def _run_root(tmp_path: Path, xdg: str | None, varlinkctl_dir: Path) -> tuple[Run, Path]:
    home = tmp_path / "root-home"
    home.mkdir()
    _make_tree(home)
    checkout = tmp_path / "composefsd"
    _copy_checkout(checkout)
    newroot = tmp_path / "newroot"
    newroot.mkdir()
    log = tmp_path / "composefsd.log"
    script = tmp_path / "quickstart.sh"
    script.write_text(_script(str(checkout), str(log), varlinkctl=True))
    env = _env(home, xdg, f"{SYSTEM_PATH}:{varlinkctl_dir}")
    started = subprocess.Popen(
        [
            *("unshare", "--mount", "--propagation", "private", "sh", "-c", _ROOT_JAIL, "sh"),
            *(str(newroot), str(script)),
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    proc = _finish(started)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return _parse(proc.stdout, log.read_text(), varlinkctl=True), home


def _run_user(user: users.TestUser, base: Path, xdg: str | None) -> tuple[Run, Path]:
    home = base / "home"
    home.mkdir()
    _make_tree(home)
    _copy_checkout(home / "composefsd")
    log = home / "composefsd.log"
    script = home / "quickstart.sh"
    script.write_text(_script(str(home / "composefsd"), str(log), varlinkctl=False))
    subprocess.run(["chown", "-R", f"{user.uid}:{user.gid}", str(home)], check=True)
    home.chmod(0o700)
    env = _env(home, xdg)
    # Not users.popen_as: that one takes HOME and XDG_RUNTIME_DIR away.
    proc = _finish(
        subprocess.Popen(
            ["/bin/sh", str(script)],
            user=user.uid,
            group=user.gid,
            extra_groups=list(user.groups),
            env=env,
            cwd=str(home),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return _parse(proc.stdout, log.read_text(), varlinkctl=False), home


# -- what the README says the commands print -----------------------------------------------------

_HEX = re.compile(r"[0-9a-f]{128}")  # sha512: the repository composefsd creates


def _check_steps(run: Run, socket: str) -> None:
    digest = ""
    version = composefsd.version()

    def status(out: str) -> None:
        # "ends 'service: composefsd 0.1.0 at <the socket>'"
        assert (
            re.sub(r"\s+", " ", out.splitlines()[-1])
            == f"service: composefsd {version} at {socket}"
        )

    def create(out: str) -> None:
        nonlocal digest
        # "a progress bar (on a terminal only), then the image digest"
        assert _HEX.fullmatch(out.strip()), out
        digest = out.strip()

    def images(out: str) -> None:
        (row,) = out.splitlines()
        assert row.startswith(digest) and row.endswith("  demo/v1"), row

    def verify(out: str) -> None:
        assert out.startswith(f"{digest}: ok ("), out

    def info(out: str) -> None:
        assert out.startswith("    Vendor: composefsd\n"), out
        assert re.search(rf"^\s+{re.escape(SOCKET_NAME)}$", out, re.MULTILINE), out

    def list_images(out: str) -> None:
        (image,) = json.loads(out)["images"]
        assert image["digest"] == digest and image["refs"] == ["demo/v1"]

    def verify_call(out: str) -> None:
        # (split on newlines only: str.splitlines() also splits at the RS varlinkctl writes)
        replies = [json.loads(line.lstrip("\x1e")) for line in out.split("\n") if line]
        assert all("progress" in r for r in replies[:-1]) and len(replies) > 1
        assert replies[-1]["ok"] is True and replies[-1]["digest"] == digest

    def introspect(out: str) -> None:
        assert f"\ninterface {SOCKET_NAME}\n" in out and "method ListImages(" in out

    def varlinkctl_info(out: str) -> None:
        assert out.startswith("    Vendor: composefsd\n") and SOCKET_NAME in out, out

    def nothing(out: str) -> None:
        assert out == ""

    checks: dict[str, Callable[[str], None]] = {
        "composefsctl status": status,
        "composefsctl create-image ~/src/tree --ref demo/v1": create,
        "composefsctl images": images,
        "composefsctl verify --all": verify,
        "composefsctl info": info,
        "composefsctl call io.composefs.Repository.ListImages": list_images,
        'composefsctl call -E io.composefs.Repository.Verify \'{"image":"demo/v1"}\'': verify_call,
        "composefsctl introspect io.composefs.Repository": introspect,
        "varlinkctl info $S": varlinkctl_info,
        "varlinkctl call $S io.composefs.Repository.ListImages '{}'": list_images,
        'varlinkctl call -E $S io.composefs.Repository.Verify \'{"image":"demo/v1"}\'': verify_call,
    }
    for step in run.steps:
        command = step.line.split("  #", 1)[0].strip()
        check: Callable[[str], None]
        if not command or command.startswith("#") or command.startswith(("[ ", "S=")):
            check = nothing
        else:
            assert command in checks, f"README command without a check here: {command!r}"
            check = checks[command]
        assert step.status == 0, f"{command}: exit status {step.status}:\n{step.output}"
        check(step.output)
    assert run.daemon_status == 0, run.log


def _check_startup(run: Run, repo: str, socket: str) -> None:
    m = _startup_pattern().fullmatch(run.startup.strip())
    assert m, f"start-up line not as in the README:\n{run.log}"
    assert (m["repo"], m["socket"]) == (repo, socket)


@pytest.mark.parametrize("xdg", [None, "/run/user/0"])
def test_quick_start_as_root(tmp_path: Path, xdg: str | None, varlinkctl_dir: Path) -> None:
    assert os.geteuid() == 0
    run, _ = _run_root(tmp_path, xdg, varlinkctl_dir)
    # The README: "as root /sysroot/composefs", "/run/composefs/... for root".
    socket = f"/run/composefs/{SOCKET_NAME}"
    _check_startup(run, "/sysroot/composefs", socket)
    _check_steps(run, socket)


@pytest.fixture
def user_base(test_users: TestUsers) -> Iterator[tuple[users.TestUser, Path]]:
    user = test_users.alice
    base = users.public_dir("cfsd-quick-")
    fallback = Path(f"/tmp/composefs-{user.uid}")
    try:
        yield user, base
    finally:
        users.remove_tree(base)
        if fallback.exists():
            shutil.rmtree(fallback)


@pytest.mark.parametrize("with_xdg", [False, True])
def test_quick_start_as_a_user(user_base: tuple[users.TestUser, Path], with_xdg: bool) -> None:
    user, base = user_base
    xdg = None
    if with_xdg:
        runtime = base / "run-user"
        runtime.mkdir(mode=0o700)
        os.chown(runtime, user.uid, user.gid)
        xdg = str(runtime)
    run, home = _run_user(user, base, xdg)
    # The README: "~/.var/lib/composefs"; "$XDG_RUNTIME_DIR/composefs/..., or
    # /tmp/composefs-<uid>/... where $XDG_RUNTIME_DIR is empty".
    socket = f"{xdg}/composefs/{SOCKET_NAME}" if xdg else f"/tmp/composefs-{user.uid}/{SOCKET_NAME}"
    _check_startup(run, f"{home}/.var/lib/composefs", socket)
    _check_steps(run, socket)
