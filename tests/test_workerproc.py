"""The worker-process lanes (:class:`composefsd.workerproc.Pool`) and the workers'
loop (:func:`composefsd.workerproc.serve`), on toy batches of integers."""

from __future__ import annotations

import contextlib
import subprocess
import sys
import threading
from collections.abc import Callable

import pytest

from composefsd import workerproc

# A worker that doubles every number (serve without a configuration) ...
_DOUBLER = "from composefsd import workerproc; workerproc.serve(lambda r: [x * 2 for x in r])"
# ... one that multiplies by the factor of its first message ...
_SCALER = """
import contextlib
from composefsd import workerproc

@contextlib.contextmanager
def init(factor):
    yield lambda r: [x * factor for x in r]

workerproc.serve(init=init)
"""
# ... and one that exits with status 3 at its first request.
_QUITTER = "import sys; sys.stdin.buffer.read(1); sys.exit(3)"


def _worker(code: str) -> Callable[[], subprocess.Popen[bytes]]:
    def start() -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            [sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE
        )

    return start


def _double(batch: list[int]) -> list[int]:
    return [x * 2 for x in batch]


class _Consumer:
    """Collects what the lanes report."""

    def __init__(self) -> None:
        self.results: dict[int, int] = {}
        self.errors: list[BaseException] = []
        self.finished = 0
        self.lock = threading.Lock()

    def done(self, batch: list[int], results: list[int]) -> None:
        with self.lock:
            self.results.update(zip(batch, results, strict=True))

    def fail(self, exc: BaseException) -> None:
        with self.lock:
            self.errors.append(exc)

    def finish(self) -> None:
        with self.lock:
            self.finished += 1


def _run(
    consumer: _Consumer,
    batches: list[list[int]],
    *,
    processes: bool,
    local: Callable[[list[int]], list[int]] = _double,
    size: int = 2,
    **kwargs: object,
) -> workerproc.Pool[list[int], list[int], int]:
    pool: workerproc.Pool[list[int], list[int], int] = workerproc.Pool(
        "test-lane",
        size,
        request=list,
        local=lambda: contextlib.nullcontext(local),
        done=consumer.done,
        fail=consumer.fail,
        finished=consumer.finish,
        **kwargs,  # type: ignore[arg-type]
    )
    pool.processes = processes
    for batch in batches:
        pool.put(batch)
    pool.close()
    pool.start()
    pool.join(0.05)
    return pool


_BATCHES = [list(range(i, i + 5)) for i in range(0, 50, 5)]
_EXPECTED = {x: x * 2 for x in range(50)}


def test_in_process() -> None:
    consumer = _Consumer()
    _run(consumer, _BATCHES, processes=False, start=_worker(_QUITTER))
    assert consumer.results == _EXPECTED
    assert consumer.errors == [] and consumer.finished == 2


@pytest.mark.parametrize("depth", [1, 2])
def test_worker_processes(depth: int) -> None:
    def local(batch: list[int]) -> list[int]:
        raise AssertionError("the workers do the work")

    consumer = _Consumer()
    _run(
        consumer,
        _BATCHES,
        processes=True,
        local=local,
        start=_worker(_DOUBLER),
        depth=depth,
        pipe_size=1 << 20,
        exact=True,
    )
    assert consumer.results == _EXPECTED
    assert consumer.errors == []


def test_first_message_configures_the_worker() -> None:
    consumer = _Consumer()
    _run(consumer, _BATCHES, processes=True, start=_worker(_SCALER), first=2)
    assert consumer.results == _EXPECTED and consumer.errors == []


@pytest.mark.parametrize("depth", [1, 2])
def test_a_dying_worker_falls_back_in_process(depth: int) -> None:
    consumer = _Consumer()
    _run(consumer, _BATCHES, processes=True, start=_worker(_QUITTER), depth=depth, pipe_size=4096)
    assert consumer.results == _EXPECTED
    assert consumer.errors == []


def test_a_worker_that_cannot_start_falls_back_in_process() -> None:
    def unavailable() -> subprocess.Popen[bytes]:
        raise OSError(24, "Too many open files")

    consumer = _Consumer()
    _run(consumer, _BATCHES, processes=True, start=unavailable)
    assert consumer.results == _EXPECTED and consumer.errors == []


def test_a_wrong_answer_count_falls_back_when_exact() -> None:
    short = "from composefsd import workerproc; workerproc.serve(lambda r: r[:1])"
    consumer = _Consumer()
    _run(consumer, _BATCHES, processes=True, start=_worker(short), exact=True)
    assert consumer.results == _EXPECTED and consumer.errors == []


class _Lost(Exception):
    pass


def test_a_dying_worker_fails_when_configured() -> None:
    consumer = _Consumer()
    _run(
        consumer,
        _BATCHES,
        processes=True,
        size=1,
        start=_worker(_QUITTER),
        lost=lambda status: _Lost(f"worker exited with status {status}"),
    )
    assert [str(e) for e in consumer.errors] == ["worker exited with status 3"]
    assert consumer.finished == 1


def test_a_start_failure_fails_when_configured() -> None:
    def unavailable() -> subprocess.Popen[bytes]:
        raise OSError(24, "Too many open files")

    consumer = _Consumer()
    _run(consumer, _BATCHES, processes=True, size=1, start=unavailable, lost=_Lost)
    assert len(consumer.errors) == 1 and isinstance(consumer.errors[0], OSError)


@pytest.mark.parametrize("processes", [False, True])
def test_an_exception_in_a_lane_reaches_the_consumer(processes: bool) -> None:
    # Raised by the batch function or by the consumer's own callback: either way the
    # lane reports it and ends, rather than leaving the consumer waiting.
    def broken(batch: list[int]) -> list[int]:
        raise KeyError("broken batch function")

    consumer = _Consumer()
    _run(consumer, _BATCHES, processes=False, local=broken)
    assert consumer.errors and all(isinstance(e, KeyError) for e in consumer.errors)
    assert consumer.finished == 2

    def done(batch: list[int], results: list[int]) -> None:
        raise ZeroDivisionError("consumer callback")

    consumer = _Consumer()
    consumer.done = done  # type: ignore[method-assign]
    _run(consumer, _BATCHES, processes=processes, start=_worker(_DOUBLER))
    assert consumer.errors and all(isinstance(e, ZeroDivisionError) for e in consumer.errors)
    assert consumer.finished == 2


def test_skip_drops_batches() -> None:
    consumer = _Consumer()
    _run(consumer, _BATCHES, processes=False, skip=lambda: len(consumer.results) >= 5, size=1)
    assert consumer.results == {x: x * 2 for x in range(5)}


def test_abort_kills_the_workers() -> None:
    # A worker stuck on a request: abort() kills it and the lanes end.
    stuck = "import sys, time; sys.stdin.buffer.read(4); time.sleep(60)"
    procs: list[subprocess.Popen[bytes]] = []

    def start() -> subprocess.Popen[bytes]:
        proc = _worker(stuck)()
        procs.append(proc)
        return proc

    consumer = _Consumer()
    pool: workerproc.Pool[list[int], list[int], int] = workerproc.Pool(
        "test-lane",
        2,
        request=list,
        local=lambda: contextlib.nullcontext(_double),
        done=consumer.done,
        fail=consumer.fail,
        start=start,
    )
    pool.processes = True
    for batch in _BATCHES:
        pool.put(batch)
    pool.start()
    while len(procs) < 2:
        threading.Event().wait(0.01)
    pool.abort()
    assert all(not lane.is_alive() for lane in pool.lanes)
    assert all(proc.returncode is not None for proc in procs)
    assert consumer.results == {} and consumer.errors == []


@pytest.mark.parametrize("start_ok", [True, False])
def test_eager_workers_start_before_any_batch(start_ok: bool) -> None:
    # With eager, each lane starts its worker at once: before a batch is there. A
    # start that fails makes that lane work in-process, as without eager.
    started = threading.Semaphore(0)
    procs: list[subprocess.Popen[bytes]] = []

    def start() -> subprocess.Popen[bytes]:
        try:
            if not start_ok:
                raise OSError(24, "Too many open files")
            proc = _worker(_DOUBLER)()
            procs.append(proc)
            return proc
        finally:
            started.release()

    consumer = _Consumer()
    pool: workerproc.Pool[list[int], list[int], int] = workerproc.Pool(
        "test-lane",
        2,
        request=list,
        local=lambda: contextlib.nullcontext(_double),
        done=consumer.done,
        fail=consumer.fail,
        start=start,
        eager=True,
    )
    pool.processes = True
    pool.start()
    for _ in pool.lanes:
        assert started.acquire(timeout=60), "a lane did not start its worker"
    assert len(procs) == (2 if start_ok else 0)
    for batch in _BATCHES:
        pool.put(batch)
    pool.close()
    pool.join()
    assert consumer.results == _EXPECTED and consumer.errors == []
    assert len(procs) == (2 if start_ok else 0)
    assert all(proc.returncode is not None for proc in procs)


def test_serve_ends_at_eof() -> None:
    proc = _worker(_DOUBLER)()
    workerproc.send(proc, [1, 2, 3])
    assert proc.stdout is not None
    assert workerproc.receive(proc.stdout) == [2, 4, 6]
    workerproc.stop(proc, kill=False, timeout=10)
    assert proc.returncode == 0
