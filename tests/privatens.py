"""Running a test's body in a mount namespace of its own (tests' helper).

The machine's mount table changes whenever any process mounts; a test that
compares mountinfo, or watches it for changes, runs its body here so that only
its own mounts count.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import traceback
from collections.abc import Callable

from composefsd.kernel.mountinfo import list_composefs_mounts
from composefsd.kernel.syscalls import MNT_DETACH, umount2, unshare

CLONE_NEWNS = 0x00020000

__all__ = ["in_private_mount_namespace"]


def in_private_mount_namespace(fn: Callable[[], dict[str, object]]) -> dict[str, object]:
    """Run ``fn`` in a forked child in its own mount namespace (private propagation), so
    that mounts made meanwhile by anything else on the machine cannot disturb a
    comparison of mountinfo; returns ``fn``'s JSON-able result."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            os.close(r)
            try:
                unshare(CLONE_NEWNS)
                subprocess.run(["mount", "--make-rprivate", "/"], check=True)
                # The copies of composefs mounts made elsewhere (tests running
                # meanwhile) would hold their images in use as long as this lives.
                for m in reversed(list_composefs_mounts()):
                    with contextlib.suppress(OSError):
                        umount2(m.mountpoint, MNT_DETACH)
                result: dict[str, object] = {"ok": True, "value": fn()}
            except BaseException:
                result = {"ok": False, "error": traceback.format_exc()}
            with os.fdopen(w, "wb") as f:
                f.write(json.dumps(result).encode())
        finally:
            os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        data = f.read()
    _, status = os.waitpid(pid, 0)
    assert status == 0 and data, f"child status {status}"
    answer = json.loads(data)
    assert answer["ok"], answer.get("error")
    value = answer["value"]
    assert isinstance(value, dict)
    return value
