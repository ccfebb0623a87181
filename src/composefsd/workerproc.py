"""Worker processes for bulk hashing: starting them, talking to them, stopping them.

fs-verity hashing holds the GIL for every 4 KiB block, so threads do not add up
to more CPUs; the scanner, the object importer and Verify each run their bulk
work in child Python processes instead. The three share this plumbing:

* :func:`start` runs ``python -c "from MODULE import FUNC; FUNC()"`` with this
  copy of the package on ``PYTHONPATH`` (a source checkout need not be installed);
* messages go both ways as a 4-byte little-endian length and a ``marshal`` body
  (:func:`send`/:func:`write_message`, :func:`receive`);
* :func:`stop` closes the request pipe (a worker ends at EOF), kills the worker
  when the caller gave up, and reaps it.
"""

from __future__ import annotations

import logging
import marshal
import os
import subprocess
import sys
from collections.abc import Sequence
from typing import IO, Any

__all__ = ["receive", "send", "start", "stop", "write_message"]

log = logging.getLogger(__name__)

_PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def start(
    module: str, function: str, *, pass_fds: Sequence[int] = (), quiet: bool = True
) -> subprocess.Popen[bytes]:
    """Start a worker running ``module.function()``; ``quiet`` discards its stderr."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, (_PACKAGE_ROOT, env.get("PYTHONPATH"))))
    return subprocess.Popen(
        [sys.executable, "-c", f"from {module} import {function}; {function}()"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL if quiet else None,
        env=env,
        close_fds=True,
        pass_fds=tuple(pass_fds),
    )


def write_message(stream: IO[bytes], message: Any) -> None:
    body = marshal.dumps(message)
    stream.write(len(body).to_bytes(4, "little") + body)
    stream.flush()


def send(proc: subprocess.Popen[bytes], message: Any) -> None:
    """Write one request to the worker."""
    assert proc.stdin is not None
    write_message(proc.stdin, message)


def receive(stream: IO[bytes]) -> Any:
    """Read one message; raises ``EOFError`` when the other side has gone."""
    header = stream.read(4)
    if len(header) < 4:
        raise EOFError("the other end of the worker pipe closed")
    return marshal.loads(stream.read(int.from_bytes(header, "little")))


def stop(proc: subprocess.Popen[bytes], *, kill: bool, timeout: float) -> None:
    """End the worker: EOF on its input; if ``kill``, its output closed too and
    SIGKILL; and reap it, killing it after ``timeout`` seconds.

    A worker that took on a caller's ids can only be signalled with CAP_KILL; one
    that cannot be signalled still ends at its next write into the closed output
    (Python ignores SIGPIPE, so the write fails and it exits). One that neither
    ends nor can be killed is left to be reaped later (with a warning), rather
    than hang the caller.
    """
    _close(proc.stdin)
    if kill:
        _close(proc.stdout)
        _kill(proc)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill(proc)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            log.warning("worker process %d does not end; leaving it", proc.pid)
    _close(proc.stdout)


def _close(stream: IO[bytes] | None) -> None:
    try:
        if stream is not None:
            stream.close()
    except OSError:
        pass


def _kill(proc: subprocess.Popen[bytes]) -> None:
    try:
        proc.kill()
    except ProcessLookupError:
        pass
    except PermissionError as exc:
        log.warning("cannot kill worker process %d: %s", proc.pid, exc.strerror)
