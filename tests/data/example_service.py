"""org.example.test: a small Varlink service for the transport's tests.

Importable (``make_service()``), and runnable as a socket-activated server::

    python tests/data/example_service.py    # sockets from LISTEN_FDS / SYSTEMD_VARLINK_LISTEN
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import queue
import signal
import sys
import time
from pathlib import Path
from typing import Any

import varlink

from composefsd.kernel.syscalls import FsContext
from composefsd.service.activation import notify, sockets_from_environment
from composefsd.service.context import CallCancelled, CallContext, VarlinkReplyError
from composefsd.service.transport import Server

HERE = Path(__file__).resolve().parent
INTERFACE = "org.example.test"
IDL = HERE / f"{INTERFACE}.varlink"


class ExampleInterface:
    """Methods take the IDL's input fields positionally, plus ``_request``."""

    def __init__(self) -> None:
        #: Tags of Sleep calls as they start.
        self.started: queue.Queue[str] = queue.Queue()
        #: (tag, "done" | "cancelled") as Sleep calls end.
        self.ended: queue.Queue[tuple[str, str]] = queue.Queue()

    def Echo(self, *args: Any, _request: CallContext) -> dict[str, Any]:
        names = (
            "text",
            "number",
            "ratio",
            "flag",
            "color",
            "ranges",
            "labels",
            "names",
            "item",
            "blob",
            "nested",
        )
        return {k: v for k, v in zip(names, args, strict=True) if v is not None}

    def Count(self, count: int, delay: float | None, _request: CallContext) -> dict[str, Any]:
        send = _request.send_continues
        assert send is not None
        for i in range(count):
            _request.check_cancelled()
            send({"i": i})
            if delay:
                time.sleep(delay)
        return {"i": count}

    def Sleep(self, seconds: float, tag: str | None, _request: CallContext) -> dict[str, Any]:
        tag = tag or "sleep"
        start = time.monotonic()
        self.started.put(tag)
        while (elapsed := time.monotonic() - start) < seconds:
            if _request.cancelled.wait(0.01):
                self.ended.put((tag, "cancelled"))
                _request.check_cancelled()
        self.ended.put((tag, "done"))
        return {"slept": elapsed}

    def MakeMount(self, marker: str, _request: CallContext) -> dict[str, Any]:
        with FsContext("tmpfs") as fs:
            fs.set_string("mode", "0755")
            fs.create()
            mount_fd = fs.mount()
        try:
            fd = os.open("marker", os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o644, dir_fd=mount_fd)
            try:
                os.write(fd, marker.encode())
            finally:
                os.close(fd)
        except BaseException:
            os.close(mount_fd)
            raise
        return {"mountFileDescriptor": _request.push_fd(mount_fd)}

    def MakePipes(self, count: int, text: str, _request: CallContext) -> dict[str, Any]:
        indexes = []
        for _ in range(count):
            r, w = os.pipe()
            os.write(w, text.encode())
            os.close(w)
            indexes.append(_request.push_fd(r))
        return {"fileDescriptors": indexes}

    def PipeStream(self, count: int, text: str, _request: CallContext) -> dict[str, Any]:
        fds = []
        for _ in range(count):
            r, w = os.pipe()
            os.write(w, text.encode())
            os.close(w)
            fds.append(r)
        if _request.more and fds:
            for fd in fds[:-1]:
                _request.continues_with_fds({"fileDescriptors": [0]}, [fd])
            fds = fds[-1:]
        return {"fileDescriptors": [_request.push_fd(fd) for fd in fds]}

    def ReadFd(self, index: int, _request: CallContext) -> dict[str, Any]:
        fd = _request.take_fd(index, "fileDescriptor")
        try:
            chunks = []
            while chunk := os.read(fd, 65536):
                chunks.append(chunk)
        finally:
            os.close(fd)
        return {"data": b"".join(chunks).decode()}

    def IgnoreFds(self, _request: CallContext) -> dict[str, Any]:
        return {}

    def WhoAmI(self, _request: CallContext) -> dict[str, Any]:
        peer = _request.peer
        return {"pid": peer.pid, "uid": peer.uid, "gid": peer.gid, "groups": sorted(peer.groups)}

    def Fail(self, kind: str, message: str, _request: CallContext) -> dict[str, Any]:
        if kind == "runtime":
            raise RuntimeError(message)
        if kind == "oserror":
            raise FileNotFoundError(errno.ENOENT, message)
        if kind == "reply":
            raise VarlinkReplyError(f"{INTERFACE}.Refused", {"reason": message})
        if kind == "varlink":
            raise varlink.VarlinkError(
                {"error": f"{INTERFACE}.Refused", "parameters": {"reason": message}}
            )
        if kind == "cancelled":
            raise CallCancelled(message)
        if kind == "pushfail":
            r, w = os.pipe()
            os.close(w)
            _request.push_fd(r)
            raise RuntimeError(message)
        # badreply: not JSON.
        return {"bad": object()}

    def Legacy(self, text: str, _more: bool = False) -> dict[str, Any]:
        if text == "fail":
            raise varlink.VarlinkError(
                {"error": f"{INTERFACE}.Refused", "parameters": {"reason": "legacy"}}
            )
        return {"text": text, "more": _more}


def make_service() -> tuple[varlink.Service, ExampleInterface]:
    service = varlink.Service(
        vendor="composefsd tests",
        product="example",
        version="1",
        url="https://example.org",
        interface_dir=str(HERE),
    )
    impl = ExampleInterface()
    service._set_interface(str(IDL), impl)
    return service, impl


def main() -> None:
    logging.basicConfig(level=logging.DEBUG, stream=sys.stderr)
    sockets = sockets_from_environment()
    if not sockets:
        sys.exit("example_service: no sockets in the environment")
    service, _ = make_service()
    server = Server(service)

    async def run() -> None:
        loop = asyncio.get_running_loop()
        stop = lambda: loop.create_task(server.shutdown(1.0))  # noqa: E731
        loop.add_signal_handler(signal.SIGTERM, stop)
        notify("READY=1")
        await server.serve(sockets)

    asyncio.run(run())


if __name__ == "__main__":
    main()
