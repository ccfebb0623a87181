"""A private system bus and a real polkitd on it, for tests of composefsd's polkit
checks (tests/test_polkit.py, tests/test_unprivileged_hostile.py).

Nothing of the machine's is used or changed: the bus is a private dbus-daemon on a
socket in a temporary directory (``Bus.env()`` sets DBUS_SYSTEM_BUS_ADDRESS for the
daemon under test and for polkitd), and polkitd runs in a mount namespace of its
own (``unshare -m``) with bind mounts over /etc/polkit-1/rules.d,
/usr/share/polkit-1/rules.d and /usr/share/polkit-1/actions, which then hold the
test's rules and the shipped .policy file.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jeepney.bus_messages import message_bus
from jeepney.io.blocking import open_dbus_connection

from composefsd.service.polkit import bus_socket_exists

ROOT = Path(__file__).resolve().parent.parent
POLICY = ROOT / "polkit" / "io.composefs.composefsd.policy"
POLKITD = "/usr/lib/polkit-1/polkitd"
POLKIT_NAME = "org.freedesktop.PolicyKit1"
ACTION_PREFIX = "io.composefs.composefsd."

_BUS_CONF = """<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-BUS Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>system</type>
  <auth>EXTERNAL</auth>
  <listen>unix:path={path}</listen>
  <policy context="default">
    <allow user="*"/>
    <allow own="*"/>
    <allow send_destination="*"/>
    <allow send_type="method_call"/>
    <allow send_type="signal"/>
    <allow send_requested_reply="true"/>
    <allow receive_type="method_call"/>
    <allow receive_type="method_return"/>
    <allow receive_type="error"/>
    <allow receive_type="signal"/>
  </policy>
</busconfig>
"""


def wait_for(predicate: Any, what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def _name_has_owner(address: str, name: str) -> bool:
    try:
        conn = open_dbus_connection(address)
    except OSError:
        return False
    try:
        reply = conn.send_and_get_reply(message_bus.NameHasOwner(name), timeout=5)
        return bool(reply.body[0])
    finally:
        conn.close()


@dataclass
class Bus:
    """A private dbus-daemon (and the polkitd on it, when started)."""

    dir: Path
    proc: subprocess.Popen[bytes]
    polkitd: subprocess.Popen[bytes] | None = None

    @property
    def path(self) -> Path:
        return self.dir / "bus"

    @property
    def address(self) -> str:
        return f"unix:path={self.path}"

    def env(self) -> dict[str, str]:
        return {**os.environ, "DBUS_SYSTEM_BUS_ADDRESS": self.address}

    def start_polkitd(self, rules: str) -> None:
        """polkitd on this bus, with ``rules`` and the shipped actions, in a mount
        namespace of its own (the machine's polkit directories stay as they are)."""
        for sub in ("rules", "empty", "actions"):
            (self.dir / sub).mkdir(mode=0o755, exist_ok=True)
        (self.dir / "rules" / "10-composefsd-test.rules").write_text(rules)
        shutil.copy(POLICY, self.dir / "actions" / POLICY.name)
        for path in (self.dir / "rules", self.dir / "actions"):
            for f in path.iterdir():
                f.chmod(0o644)
        script = (
            "mount --make-rprivate / && "
            f"mount --bind {self.dir}/rules /etc/polkit-1/rules.d && "
            f"mount --bind {self.dir}/empty /usr/share/polkit-1/rules.d && "
            f"mount --bind {self.dir}/actions /usr/share/polkit-1/actions && "
            f"exec {POLKITD} --no-debug"
        )
        with open(self.dir / "polkitd.log", "ab") as log:
            # unshare and sh exec: the pid is polkitd's.
            self.polkitd = subprocess.Popen(
                ["unshare", "-m", "sh", "-c", script],
                env=self.env(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
            )
        wait_for(lambda: _name_has_owner(self.address, POLKIT_NAME), "polkitd on the bus")

    def stop_polkitd(self) -> None:
        if self.polkitd is not None and self.polkitd.poll() is None:
            self.polkitd.kill()
            self.polkitd.wait()
        self.polkitd = None
        wait_for(lambda: not _name_has_owner(self.address, POLKIT_NAME), "polkitd gone")

    def stop(self) -> None:
        if self.polkitd is not None and self.polkitd.poll() is None:
            self.polkitd.kill()
            self.polkitd.wait()
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def start_bus(where: Path) -> Bus:
    where.mkdir(mode=0o755, exist_ok=True)
    conf = where / "bus.conf"
    conf.write_text(_BUS_CONF.format(path=where / "bus"))
    proc = subprocess.Popen(
        ["dbus-daemon", f"--config-file={conf}", "--nofork", "--nopidfile"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    bus = Bus(where, proc)
    wait_for(lambda: bus_socket_exists(bus.address), "the bus socket")
    return bus


def allow_all_rules(user: str) -> str:
    """polkit rules allowing ``user`` every composefsd action (and no one else any)."""
    return (
        "polkit.addRule(function(action, subject) {\n"
        f"    if (action.id.indexOf({ACTION_PREFIX!r}) != 0) return polkit.Result.NOT_HANDLED;\n"
        f"    if (subject.user == {user!r}) return polkit.Result.YES;\n"
        "    return polkit.Result.NO;\n"
        "});\n"
    )
