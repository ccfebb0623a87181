"""MountDumpfile as an unprivileged caller sees it (standard library only; run as a
test user by tests/test_ownmount.py).

``ownmount_client.py call SOCKET SPEC``: opens what SPEC (JSON) names, calls
io.composefs.Repository.MountDumpfile over SOCKET with those fds and prints one
JSON line: ``{"error": name, "parameters": {...}}`` or ``{"reply": {...},
"seen": ...}``, where ``seen`` is what ``attach`` printed for the mount fd (when
SPEC asks to look at files).

``ownmount_client.py attach SPEC`` (run by ``call`` under ``unshare -Urm``, the
mount fd as fd 3): attaches the mount at SPEC's "where" with move_mount and
prints each file's uid, gid, mode and content (or errno name) and the mount's
options from mountinfo.

SPEC keys: dumpfile (path), dumpfile_kind ("file", "opath", "pipe", "socket",
"dir", "wronly"), objects (paths), object_kind ("dir", "opath", "file", "socket"),
userns ("own", "init", "mnt"), extra_fds (how many more fds to send), files (to
look at), where, index_override (fields to replace in the parameters), wait (a
path to create once the call went out, then wait for the reply), orphan (the
process that connects exits, and its child makes the call once it has: the
daemon's caller is gone), clear_flags (attach tries to clear ro, nosuid and nodev with mount_setattr,
on the detached mount, then once attached), unshare_after_open (the fds are opened, then the
client enters a user and mount namespace of its own and calls from there).
"""

from __future__ import annotations

import array
import ctypes
import errno
import json
import os
import select
import socket
import subprocess
import sys
import time
from typing import Any

SYS_MOVE_MOUNT = {"x86_64": 429, "aarch64": 429, "riscv64": 429}[os.uname().machine]
MOVE_MOUNT_F_EMPTY_PATH = 0x4
SYS_MOUNT_SETATTR = 442
AT_FDCWD = -100
AT_EMPTY_PATH = 0x1000
MOUNT_ATTR_RDONLY, MOUNT_ATTR_NOSUID, MOUNT_ATTR_NODEV = 0x1, 0x2, 0x4
CLONE_NEWNS = 0x00020000
CLONE_NEWUSER = 0x10000000


def _open_kind(path: str, kind: str, closers: list[object]) -> int:
    if kind in ("file", "dir"):
        return os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    if kind == "opath":
        return os.open(path, os.O_PATH | os.O_CLOEXEC)
    if kind == "wronly":
        return os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    if kind == "pipe":
        r, w = os.pipe()
        os.write(w, b"/ 0 40755 2 0 0 0 0.0 - - -\n")
        closers.append(w)
        return r
    if kind == "socket":
        a, b = socket.socketpair()
        closers.append(b)
        closers.append(a)
        return a.fileno()
    raise ValueError(kind)


def _userns(kind: str, closers: list[object]) -> int:
    if kind == "init":
        return os.open("/proc/self/ns/user", os.O_RDONLY | os.O_CLOEXEC)
    if kind == "mnt":
        return os.open("/proc/self/ns/mnt", os.O_RDONLY | os.O_CLOEXEC)
    # A user namespace of the caller's own, held by a child that waits.
    child = subprocess.Popen(["unshare", "-Ur", "sleep", "600"])
    closers.append(child)
    mine = os.readlink("/proc/self/ns/user")
    for _ in range(1000):
        try:
            if os.readlink(f"/proc/{child.pid}/ns/user") != mine:
                break
        except OSError:
            pass
        time.sleep(0.01)
    return os.open(f"/proc/{child.pid}/ns/user", os.O_RDONLY | os.O_CLOEXEC)


def call(address: str, spec: dict[str, Any]) -> dict[str, Any]:
    closers: list[object] = []
    fds: list[int] = []
    params: dict[str, Any] = {}
    fds.append(_open_kind(spec["dumpfile"], spec.get("dumpfile_kind", "file"), closers))
    params["dumpfileFileDescriptor"] = 0
    indexes = []
    for path in spec["objects"]:
        indexes.append(len(fds))
        fds.append(_open_kind(path, spec.get("object_kind", "dir"), closers))
    params["objectDirectoryFileDescriptors"] = indexes
    if spec.get("userns"):
        params["userNamespaceFileDescriptor"] = len(fds)
        fds.append(_userns(spec["userns"], closers))
    for _ in range(spec.get("extra_fds", 0)):
        fds.append(os.open("/", os.O_RDONLY | os.O_CLOEXEC))
    params.update(spec.get("index_override", {}))
    if spec.get("unshare_after_open"):
        # Leave for a user and mount namespace of our own with the files already
        # open, as composefsctl mount-dumpfile did (Python 3.11 has no os.unshare).
        libc = ctypes.CDLL(None, use_errno=True)
        uid, gid = os.getuid(), os.getgid()
        if libc.unshare(CLONE_NEWUSER | CLONE_NEWNS) < 0:
            raise OSError(ctypes.get_errno(), "unshare")
        # As unshare -r: 0 inside is us, so attach's own namespaces can be made.
        for name, text in (
            ("setgroups", "deny"),
            ("uid_map", f"0 {uid} 1"),
            ("gid_map", f"0 {gid} 1"),
        ):
            with open(f"/proc/self/{name}", "w") as f:
                f.write(text)
    s = socket.socket(socket.AF_UNIX)
    s.connect(address)
    if spec.get("orphan"):
        parent = os.getpid()
        watch = os.pidfd_open(parent)
        if os.fork():
            os._exit(0)
        # The child: the connecting process (the socket's peer) is gone once its
        # pidfd is readable; our stdout stays open for the reply.
        select.select([watch], [], [])
        os.close(watch)
    msg = json.dumps({"method": "io.composefs.Repository.MountDumpfile", "parameters": params})
    s.sendmsg(
        [msg.encode() + b"\0"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))]
    )
    if spec.get("wait"):
        open(spec["wait"], "w").close()
    buf = b""
    got: list[int] = []
    while not buf.endswith(b"\0"):
        data, anc, _, _ = s.recvmsg(1 << 20, socket.CMSG_SPACE(16 * 4))
        if not data:
            return {"error": "disconnected"}
        buf += data
        for level, kind, raw in anc:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                a = array.array("i")
                a.frombytes(raw[: len(raw) - len(raw) % 4])
                got.extend(a)
    reply = json.loads(buf[:-1])
    for c in closers:
        if isinstance(c, subprocess.Popen):
            c.kill()
            c.wait()
        elif isinstance(c, socket.socket):
            c.close()
        elif isinstance(c, int):
            os.close(c)
    if "error" in reply:
        return {"error": reply["error"], "parameters": reply.get("parameters", {})}
    out: dict[str, Any] = {"reply": reply["parameters"], "fds": len(got)}
    mount_fd = got[reply["parameters"]["mountFileDescriptor"]]
    if spec.get("files") is not None:
        os.dup2(mount_fd, 3, inheritable=True)
        seen = subprocess.run(
            ["unshare", "-Urm", sys.executable, __file__, "attach", json.dumps(spec)],
            pass_fds=[3],
            capture_output=True,
            text=True,
            check=False,
        )
        if seen.returncode != 0:
            out["attach_error"] = seen.stderr
        else:
            out["seen"] = json.loads(seen.stdout)
    if spec.get("hold"):
        # Keep the mount fd open until told (the file "hold" names appears).
        open(spec["hold"] + ".ready", "w").close()
        while not os.path.exists(spec["hold"]):
            time.sleep(0.02)
    return out


def _clear_flags(libc: ctypes.CDLL, fd: int) -> str:
    """mount_setattr clearing ro, nosuid and nodev on ``fd``'s mount: "ok" or the
    errno name."""
    attr = (ctypes.c_uint64 * 4)(0, MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV, 0, 0)
    res = libc.syscall(SYS_MOUNT_SETATTR, fd, b"", AT_EMPTY_PATH, attr, ctypes.sizeof(attr))
    return "ok" if res == 0 else errno.errorcode[ctypes.get_errno()]


def attach(spec: dict[str, Any]) -> dict[str, Any]:
    libc = ctypes.CDLL(None, use_errno=True)
    where = spec["where"]
    cleared: dict[str, str] = {}
    if spec.get("clear_flags"):
        cleared["detached"] = _clear_flags(libc, 3)
    res = libc.syscall(SYS_MOVE_MOUNT, 3, b"", AT_FDCWD, where.encode(), MOVE_MOUNT_F_EMPTY_PATH)
    if res < 0:
        return {"move_mount": errno.errorcode[ctypes.get_errno()]}
    if spec.get("clear_flags"):
        fd = os.open(where, os.O_PATH | os.O_CLOEXEC)
        cleared["attached"] = _clear_flags(libc, fd)
        os.close(fd)
    files: dict[str, Any] = {}
    for name in spec["files"]:
        path = os.path.join(where, name)
        entry: dict[str, Any] = {}
        try:
            st = os.lstat(path)
            entry.update(uid=st.st_uid, gid=st.st_gid, mode=st.st_mode)
        except OSError as e:
            entry["stat"] = errno.errorcode[e.errno or 0]
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
            try:
                entry["content"] = os.read(fd, 1 << 16).decode("utf-8", "replace")
            finally:
                os.close(fd)
        except OSError as e:
            entry["error"] = errno.errorcode[e.errno or 0]
        files[name] = entry
    options = ""
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            if fields[4] == where:
                options = fields[5] + " " + " ".join(fields[fields.index("-") + 1 :])
    return {"files": files, "mountinfo": options, "cleared": cleared}


if __name__ == "__main__":
    if sys.argv[1] == "call":
        print(json.dumps(call(sys.argv[2], json.loads(sys.argv[3]))))
    else:
        print(json.dumps(attach(json.loads(sys.argv[2]))))
