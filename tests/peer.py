"""A hostile (or just busy) local caller of composefsd, run as a test user.

    python peer.py SOCKET MODE ARGS...

Modes (each prints one JSON line when its connections are in place, then waits
for a line on stdin, then prints a last JSON line and exits):

* ``partial COUNT SIZE``: COUNT connections, each sending the start of a call that
  never ends, SIZE bytes of it in all, 64 KiB at a time round-robin, until the
  daemon closes it or all is sent. Reports how many connections the daemon closed;
  given ``wait`` (rather than an empty line) it then waits until the daemon has
  closed them all and reports again.
* ``connections COUNT``: COUNT connections, each sending a Describe call at once
  and reading its reply. Reports how many were answered and how many refused
  (with the refusals' error and parameters).
* ``flood COUNT METHOD JSON``: COUNT threads, each on its own connection, calling
  METHOD with the parameters JSON in a loop. Reports once every thread has had a
  reply, and at the end how many calls were answered and the errors.

Only the standard library: it runs from the test tree as another user.
"""

from __future__ import annotations

import errno
import json
import select
import socket
import sys
import threading
from typing import Any

IFACE = "io.composefs.Repository"
CHUNK = 64 << 10


def report(doc: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(doc) + "\n")
    sys.stdout.flush()


def connect(path: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(60)
    sock.connect(path)
    return sock


def call_bytes(method: str, params: dict[str, Any] | None = None) -> bytes:
    msg: dict[str, Any] = {"method": method}
    if params:
        msg["parameters"] = params
    return json.dumps(msg).encode() + b"\0"


def read_reply(sock: socket.socket, buf: bytearray) -> dict[str, Any] | None:
    """The next message, or None if the connection ended first."""
    while b"\0" not in buf:
        try:
            data = sock.recv(1 << 16)
        except ConnectionResetError:
            return None
        if not data:
            return None
        buf += data
    end = buf.index(b"\0")
    msg: dict[str, Any] = json.loads(bytes(buf[:end]))
    del buf[: end + 1]
    return msg


def partial(path: str, count: int, size: int) -> None:
    socks = [connect(path) for _ in range(count)]
    head = b'{"method":"io.composefs.Repository.Describe","parameters":{"x":"'
    sent = [0] * count
    closed = [False] * count
    for sock in socks:
        sock.setblocking(False)
    progress = True
    while progress:
        progress = False
        for i, sock in enumerate(socks):
            if closed[i] or sent[i] >= size:
                continue
            chunk = head if sent[i] == 0 else b"x" * min(CHUNK, size - sent[i])
            try:
                n = sock.send(chunk)
            except BlockingIOError:
                continue
            except OSError as exc:
                if exc.errno not in (errno.EPIPE, errno.ECONNRESET):
                    raise
                closed[i] = True
                continue
            sent[i] += n
            progress = True
        if not progress and not all(closed[i] or sent[i] >= size for i in range(count)):
            # Everyone left is blocked on a full socket: wait for the daemon to read
            # or to close one.
            waiting = [s for i, s in enumerate(socks) if not closed[i] and sent[i] < size]
            select.select([], waiting, [], 60)
            progress = True
    # A closed connection reads as EOF (or a reset) here too.
    for i, sock in enumerate(socks):
        if not closed[i]:
            try:
                closed[i] = sock.recv(1) == b""
            except BlockingIOError:
                pass
            except OSError:
                closed[i] = True
    report({"connections": count, "closed": sum(closed), "sent": sum(sent)})
    if sys.stdin.readline().strip() == "wait":
        # Until the daemon has closed every connection (on the incomplete-message
        # timeout, say).
        for i, sock in enumerate(socks):
            if not closed[i]:
                sock.setblocking(True)
                sock.settimeout(120)
                try:
                    while sock.recv(1 << 16):
                        pass
                except TimeoutError:
                    continue
                except OSError:
                    pass
                closed[i] = True
        report({"closed": sum(closed)})
        sys.stdin.readline()
    for sock in socks:
        sock.close()
    report({"done": True})


def connections(path: str, count: int) -> None:
    socks: list[socket.socket] = []
    answered = 0
    refusals: list[dict[str, Any]] = []
    other: list[Any] = []
    describe = call_bytes(f"{IFACE}.Describe")
    for _ in range(count):
        sock = connect(path)
        socks.append(sock)
        try:
            sock.sendall(describe)
        except OSError as exc:  # refused before the call went out: the reply is there
            if exc.errno not in (errno.EPIPE, errno.ECONNRESET):
                raise
        reply = read_reply(sock, bytearray())
        if reply is None:
            other.append("closed without a reply")
        elif "error" not in reply:
            answered += 1
        elif reply["error"] == f"{IFACE}.TooManyConnections":
            refusals.append(reply)
            sock.close()
            socks.pop()
        else:
            other.append(reply)
    report(
        {
            "answered": answered,
            "refused": len(refusals),
            "refusals": refusals[:3],
            "other": other[:10],
        }
    )
    sys.stdin.readline()
    for sock in socks:
        sock.close()
    report({"done": True})


def flood(path: str, count: int, method: str, params: dict[str, Any]) -> None:
    stop = threading.Event()
    lock = threading.Lock()
    started = threading.Barrier(count + 1)
    calls = [0]
    errors: list[Any] = []
    message = call_bytes(method, params)

    def loop() -> None:
        first = True
        try:
            with connect(path) as sock:
                buf = bytearray()
                while not stop.is_set():
                    sock.sendall(message)
                    reply = read_reply(sock, buf)
                    with lock:
                        calls[0] += 1
                        if reply is None or "error" in reply:
                            errors.append(reply)
                    if first:
                        first = False
                        started.wait()
                    if reply is None:
                        return
        except Exception as exc:
            with lock:
                errors.append(repr(exc))
        finally:
            if first:
                started.wait()

    threads = [threading.Thread(target=loop) for _ in range(count)]
    for t in threads:
        t.start()
    started.wait()
    report({"flooding": count})
    sys.stdin.readline()
    stop.set()
    for t in threads:
        t.join()
    report({"calls": calls[0], "errors": errors[:10]})


def main() -> None:
    path, mode, *args = sys.argv[1:]
    if mode == "partial":
        partial(path, int(args[0]), int(args[1]))
    elif mode == "connections":
        connections(path, int(args[0]))
    elif mode == "flood":
        flood(path, int(args[0]), args[1], json.loads(args[2]))
    else:
        raise SystemExit(f"unknown mode {mode!r}")


if __name__ == "__main__":
    main()
