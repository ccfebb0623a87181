"""Worker processes for bulk hashing: starting them, talking to them, stopping them.

fs-verity hashing holds the GIL for every 4 KiB block, so threads do not add up
to more CPUs; the scanner, the object importer and Verify each run their bulk
work in child Python processes instead. The three share this plumbing:

* :func:`start` runs ``python -c "from MODULE import FUNC; FUNC()"`` with this
  copy of the package on ``PYTHONPATH`` (a source checkout need not be installed),
  so a worker pays for the imports of MODULE (keep it light: Verify's workers
  import :mod:`composefsd.objectcheck`, not the repository package);
* messages go both ways as a 4-byte little-endian length and a ``marshal`` body
  (:func:`send`/:func:`write_message`, :func:`receive`);
* :func:`stop` closes the request pipe (a worker ends at EOF), kills the worker
  when the caller gave up, and reaps it;
* :class:`Pool` runs the lanes that hand batches to those workers (or work
  in-process), and :func:`serve` is the workers' side of the pipe.

Each user keeps only its batch function and its policy: whether a lost worker
means working in-process from then on (the scanner, Verify) or failing (the
importer, whose workers publish under the caller's lock), and when to skip or
kill.
"""

from __future__ import annotations

import collections
import logging
import marshal
import os
import queue
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Sequence, Sized
from contextlib import AbstractContextManager
from typing import IO, Any, Generic, TypeVar

from composefsd.cpus import cpus
from composefsd.kernel.files import set_pipe_size

__all__ = [
    "Pool",
    "cpus",
    "receive",
    "send",
    "serve",
    "start",
    "stop",
    "widen_pipes",
    "write_message",
]

log = logging.getLogger(__name__)

_PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def start(
    module: str,
    function: str,
    *,
    pass_fds: Sequence[int] = (),
    quiet: bool = True,
    site: bool = True,
) -> subprocess.Popen[bytes]:
    """Start a worker running ``module.function()``; ``quiet`` discards its stderr.

    ``site=False`` starts Python with ``-S``, for a worker that needs nothing but
    the standard library and this package (which is on ``PYTHONPATH``): no
    ``site`` module, no ``.pth`` files run, ~10-40 ms less per worker.
    """
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, (_PACKAGE_ROOT, env.get("PYTHONPATH"))))
    flags = [] if site else ["-S"]
    return subprocess.Popen(
        [sys.executable, *flags, "-c", f"from {module} import {function}; {function}()"],
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


def widen_pipes(proc: subprocess.Popen[bytes], size: int) -> bool:
    """Give both of ``proc``'s pipes ``size`` bytes of room, or say it is not possible.

    With two batches in flight, a lane writes the next request while the worker
    writes a reply; if neither pipe could hold a whole message, both would block.
    """
    try:
        for f in (proc.stdin, proc.stdout):
            assert f is not None
            if set_pipe_size(f.fileno(), size) < size:
                return False
    except OSError:
        return False
    return True


# -- the worker's side ----------------------------------------------------------------------

Handler = Callable[[Any], Any]


def serve(
    handler: Handler | None = None,
    *,
    init: Callable[[Any], AbstractContextManager[Handler]] | None = None,
) -> None:
    """A worker process's main loop: requests on stdin, ``handler``'s replies on
    stdout, until EOF or the parent is gone.

    With ``init``, the first message is a configuration: ``init(config)`` gives a
    context that yields the handler for the requests after it.
    """
    # The parent handles ^C and stops us; a traceback from here would only be noise.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    parent = os.getppid()
    inp, out = sys.stdin.buffer, sys.stdout.buffer
    if init is None:
        assert handler is not None
        _serve(inp, out, parent, handler)
        return
    try:
        config = receive(inp)
    except EOFError:
        return
    with init(config) as configured:
        _serve(inp, out, parent, configured)


def _serve(inp: IO[bytes], out: IO[bytes], parent: int, handler: Handler) -> None:
    while True:
        try:
            request = receive(inp)
        except EOFError:
            return
        if os.getppid() != parent:
            return
        reply = handler(request)
        try:
            write_message(out, reply)
        except BrokenPipeError:
            # The parent is gone (killed): what this batch did is complete (an import
            # worker's objects); leave without a traceback, and without flushing again.
            os._exit(0)


# -- the parent's side: lanes ---------------------------------------------------------------

BatchT = TypeVar("BatchT", bound=Sized)
RequestT = TypeVar("RequestT")
ResultT = TypeVar("ResultT")


def _never() -> bool:
    return False


class Pool(Generic[BatchT, RequestT, ResultT]):
    """``size`` lanes (threads) that take batches from one queue, each one optionally
    driving one worker process.

    A lane turns a batch into a request (``request``; marshal-able, it is also what
    the worker gets), has it run by its worker when :attr:`processes` is set, else
    in-process by ``local`` (a context, entered once per lane, that yields the
    function), and gives the batch and its results to ``done``. Every exception in
    a lane goes to ``fail``: a lane never dies silently, which would leave the
    consumer waiting. ``finished`` is called when a lane ends.

    Workers are started by ``start`` (then sent ``first``, if not None), each with
    its lane's first batch, or as soon as the lane starts if ``eager`` (so that its
    start overlaps whatever the caller does before handing out work). With
    ``depth`` > 1 and both pipes widened to ``pipe_size`` (:func:`widen_pipes`),
    a lane keeps that many batches in flight, so that the worker never waits for
    the lane to get the GIL. A worker that cannot be started, or that dies, makes
    its lane work in-process from then on (logged with ``note``); with ``lost``,
    the lane instead raises ``lost(exit status)`` (and start failures as they
    are). ``exact``: a reply must hold one result per item of the batch.

    Batches are dropped unread once ``skip()`` says so or the pool is cancelled
    (:meth:`abort`). A lane's worker is stopped (:func:`stop`) when the lane ends,
    killed if ``kill()`` says so or the pool was cancelled.
    """

    def __init__(
        self,
        name: str,
        size: int,
        *,
        request: Callable[[BatchT], RequestT],
        local: Callable[[], AbstractContextManager[Callable[[RequestT], list[ResultT]]]],
        done: Callable[[BatchT, list[ResultT]], None],
        fail: Callable[[BaseException], None],
        start: Callable[[], subprocess.Popen[bytes]] | None = None,
        first: object = None,
        finished: Callable[[], None] | None = None,
        skip: Callable[[], bool] = _never,
        kill: Callable[[], bool] = _never,
        lost: Callable[[int], BaseException] | None = None,
        exact: bool = False,
        depth: int = 1,
        pipe_size: int = 0,
        eager: bool = False,
        stop_timeout: float = 10,
        note: str = "working",
    ) -> None:
        self.request = request
        self.local = local
        self.done = done
        self.fail = fail
        self.start_worker = start
        self.first = first
        self.finished = finished
        self.skip = skip
        self.kill = kill
        self.lost = lost
        self.exact = exact
        self.depth = depth
        self.pipe_size = pipe_size
        self.eager = eager
        self.stop_timeout = stop_timeout
        self.note = note
        #: Whether lanes hand batches to worker processes (may be set at any time).
        self.processes = False
        self.cancelled = False
        self.work: queue.SimpleQueue[BatchT | None] = queue.SimpleQueue()
        self.lanes = [_Lane(self, f"{name}-{i}") for i in range(max(1, size))]
        self._started = False

    def put(self, batch: BatchT) -> None:
        self.work.put(batch)

    def close(self) -> None:
        """No more batches: each lane ends once the queue is drained."""
        for _ in self.lanes:
            self.work.put(None)

    def start(self) -> None:
        if not self._started:
            self._started = True
            for lane in self.lanes:
                lane.start()

    def join(self, interval: float | None = None, tick: Callable[[], None] | None = None) -> None:
        """Wait for every lane to end, calling ``tick`` every ``interval`` seconds."""
        for lane in self.lanes:
            while lane.is_alive():
                lane.join(interval)
                if tick is not None and lane.is_alive():
                    tick()

    def cancel(self) -> None:
        """Drop the batches not begun and kill the workers (their lanes then end)."""
        self.cancelled = True
        for lane in self.lanes:
            proc = lane.proc
            if proc is not None:
                proc.kill()

    def abort(self) -> None:
        """:meth:`cancel`, and wait for the lanes to end."""
        self.cancel()
        self.close()
        for lane in self.lanes:
            if lane.is_alive():
                lane.join()


class _Lane(threading.Thread, Generic[BatchT, RequestT, ResultT]):
    def __init__(self, pool: Pool[BatchT, RequestT, ResultT], name: str) -> None:
        super().__init__(name=name, daemon=True)
        self.pool = pool
        self.proc: subprocess.Popen[bytes] | None = None
        self.use_proc = pool.start_worker is not None
        self.depth = 1

    def run(self) -> None:
        pool = self.pool
        get = pool.work.get
        skip = pool.skip
        request = pool.request
        done = pool.done
        inflight: collections.deque[tuple[BatchT, RequestT]] = collections.deque()
        eof = False
        try:
            if pool.eager and self.use_proc and pool.processes and not pool.cancelled:
                self._start_proc()
            with pool.local() as local:
                while True:
                    while not eof and len(inflight) < self.depth:
                        try:
                            batch = get(block=not inflight)
                        except queue.Empty:
                            break
                        if batch is None:
                            eof = True
                            continue
                        if pool.cancelled or skip():
                            continue
                        req = request(batch)
                        if self.use_proc and pool.processes and self._send(req):
                            inflight.append((batch, req))
                        else:
                            inflight.append((batch, req))
                            self._local(local, inflight)
                    if inflight:
                        results = self._receive(len(inflight[0][0]))
                        if results is None:
                            self._local(local, inflight)
                        else:
                            done(inflight.popleft()[0], results)
                    elif eof:
                        return
        except BaseException as exc:  # never die silently: the consumer would wait forever
            pool.fail(exc)
        finally:
            self.stop()
            if pool.finished is not None:
                pool.finished()

    def _local(
        self,
        local: Callable[[RequestT], list[ResultT]],
        batches: collections.deque[tuple[BatchT, RequestT]],
    ) -> None:
        pool = self.pool
        while batches:
            batch, req = batches.popleft()
            if pool.cancelled or pool.skip():
                batches.clear()
                return
            pool.done(batch, local(req))

    def _send(self, req: RequestT) -> bool:
        pool = self.pool
        if self.proc is None and not self._start_proc():
            return False
        assert self.proc is not None
        try:
            send(self.proc, req)
            return True
        except (OSError, ValueError) as exc:
            if pool.lost is not None:
                raise
            self._give_up(exc)
            return False

    def _start_proc(self) -> bool:
        """Start this lane's worker; False if it could not be (the lane then works
        in-process, unless ``lost`` says to raise)."""
        pool = self.pool
        try:
            assert pool.start_worker is not None
            self.proc = pool.start_worker()
            if pool.first is not None:
                send(self.proc, pool.first)
            if pool.depth > 1 and widen_pipes(self.proc, pool.pipe_size):
                self.depth = pool.depth
            return True
        except (OSError, ValueError) as exc:
            if pool.lost is not None:
                raise
            self._give_up(exc)
            return False

    def _receive(self, items: int) -> list[ResultT] | None:
        pool = self.pool
        proc = self.proc
        assert proc is not None and proc.stdout is not None
        try:
            results: list[ResultT] = receive(proc.stdout)
            if pool.exact and len(results) != items:
                raise ValueError(f"a worker answered for {len(results)} items, not {items}")
            return results
        except (OSError, EOFError, ValueError) as exc:
            if pool.lost is None:
                self._give_up(exc)
                return None
            if isinstance(exc, EOFError):
                raise pool.lost(proc.wait()) from None
            raise

    def _give_up(self, exc: BaseException) -> None:
        if not self.pool.cancelled:
            log.info("%s in-process from now on: %s", self.pool.note, exc)
        self.use_proc = False
        self.stop()

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None:
            pool = self.pool
            stop(proc, kill=pool.cancelled or pool.kill(), timeout=pool.stop_timeout)
