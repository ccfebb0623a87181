"""org.composefs.Oci's layer transfer, as cfsctl 0.9 serves it: GetInfo, HasLayer,
GetLayer, PutLayer, FinalizeImage. ``RsOciInterface`` (service/rsoci.py) owns the
interface; its methods of these names call the functions here, each
``(handles, ctx, <the IDL's parameters>) -> reply``, raising
:class:`~composefsd.service.context.VarlinkReplyError` with
``org.composefs.Oci`` errors (cfsctl's names, parameters and, where the transcript
shows them, messages).

How a layer moves (composefs-rs's layer sync): the source's GetLayer hands out a
pipe carrying the layer as a splitdirfdstream (:mod:`composefsd.image.splitdirfd`,
written by :func:`composefsd.repository.layersync.produce` in a thread of its own),
the repository's ``objects/`` directory among placeholder directories, and
lifetime fds; the client passes the pipe and the directories on to the
destination's PutLayer (:func:`composefsd.repository.layersync.drain`), which
rebuilds the layer, opening the objects it names beneath the directories, and
stores it if its sha256 is the diff_id; FinalizeImage then writes the config and
manifest streams and builds the composefs image. Objects on the same filesystem
are reflinked or hard-linked instead of copied.

Policy beyond cfsctl's (which trusts its callers):

* GetLayer and PutLayer pass directory fds across: composefsd opens names beneath
  a caller's directories with its own rights, and hands out its objects
  directory, so both are only for callers with the daemon's rights (root or the
  daemon's uid); others get ``org.varlink.service.PermissionDenied``.
* PutLayer takes ``fds[0]`` only if it is a pipe (or socket), reads it with
  cancellation and an idle limit (:data:`IDLE_TIMEOUT`), and drains it to its end
  even when it fails, so the client's writer never wedges. A file is hard-linked
  only if it is owned by root or the daemon's uid, writable by nobody else, and
  has no set-id bits (:func:`may_link`): content anybody else could change under
  us never becomes an object by link. Everything else is copied or reflinked and
  checked (the module notes of layersync).
* FinalizeImage never trusts ``layers[].layer_verity``: each must be the stream
  this repository stores for that diff_id (``NoSuchLayer`` if there is none,
  ``InvalidRequest`` if it is another), and the manifest must name the config given.
* The GetLayer producer holds the repository's shared lock (GC waits) from
  before the reply until the client closes its lifetime fd or
  :data:`LIFETIME_LIMIT` passes; it stops when the reader goes away (EPIPE), or
  when the pipe stays full for :data:`IDLE_TIMEOUT`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import select
import stat
import threading
import time
from typing import Any, Final

from composefsd.image.splitdirfd import MAX_FDS_PER_FRAME, plan_layout, seed_from_id
from composefsd.objectlayout import is_hex
from composefsd.repository import Repository
from composefsd.repository.layersync import (
    DiffIdMismatchError,
    LayerSourceError,
    drain,
    produce,
)
from composefsd.repository.locking import reader_lock, writer_lock
from composefsd.repository.oci import (
    check_tag,
    tag_image,
    write_config_stream,
    write_manifest_stream,
)
from composefsd.repository.ocibuild import ensure_image
from composefsd.repository.streams import existing_stream
from composefsd.service.context import CallContext, VarlinkReplyError
from composefsd.service.methods import caller_rights
from composefsd.service.rshandles import HandleTable, rs_errors
from composefsd.splitstream import OCI_CONFIG_PREFIX, OCI_LAYER_PREFIX, OCI_MANIFEST_PREFIX

__all__ = [
    "FEATURES",
    "IDLE_TIMEOUT",
    "LIFETIME_LIMIT",
    "MAX_JSON",
    "MAX_LAYERS",
    "MAX_PRODUCERS",
    "InvalidDigestError",
    "finalize_image",
    "get_info",
    "get_layer",
    "has_layer",
    "may_link",
    "oci_digest",
    "put_layer",
]

log = logging.getLogger(__name__)

INTERFACE: Final = "org.composefs.Oci"
#: What GetInfo advertises.
FEATURES: Final = ("splitdirfdstream-v0",)
#: Seconds a pipe may stay silent (PutLayer) or full (GetLayer) before we give up.
IDLE_TIMEOUT: Final = 300.0
#: Seconds a GetLayer client may keep its lifetime fd (and with it GC waiting).
LIFETIME_LIMIT: Final = 3600.0
#: GetLayer producers that may run at once (each a thread and a few fds).
MAX_PRODUCERS: Final = 64
#: The longest manifest or config JSON FinalizeImage takes.
MAX_JSON: Final = 16 << 20
#: The most layers FinalizeImage takes.
MAX_LAYERS: Final = 4096
#: The longest digest string looked at (longer ones are refused unread).
_MAX_DIGEST: Final = 1024
_POLL_MS: Final = 250

_ALGORITHM_PART = re.compile(r"[a-z0-9]+")
_ENCODED = re.compile(r"[a-zA-Z0-9=_-]+")
_HEX_LENGTHS: Final = {"sha256": 64, "sha384": 96, "sha512": 128}


def _error(name: str, /, **parameters: Any) -> VarlinkReplyError:
    return VarlinkReplyError(f"{INTERFACE}.{name}", parameters)


def _shown(text: str) -> str:
    return text if len(text) <= 200 else text[:200] + "..."


# -- digests ---------------------------------------------------------------------------------


class InvalidDigestError(ValueError):
    """Not an OCI digest; ``str()`` is oci-spec's reason, as cfsctl replies it."""


def oci_digest(text: str) -> tuple[str, str]:
    """``(algorithm, encoded)`` of an OCI digest, checked as oci-spec (cfsctl's
    parser) checks it, with its messages; :class:`InvalidDigestError` otherwise."""
    if len(text) > _MAX_DIGEST:
        raise InvalidDigestError(f"digest of {len(text)} characters, at most {_MAX_DIGEST}")
    algorithm, colon, value = text.partition(":")
    if not colon:
        raise InvalidDigestError("missing ':' in digest")
    for part in re.split(r"[+._-]", algorithm):
        if not part:
            raise InvalidDigestError("Empty algorithm component")
        if not _ALGORITHM_PART.fullmatch(part):
            raise InvalidDigestError(f"Invalid algorithm component: {_shown(part)}")
    if not value:
        raise InvalidDigestError("Empty algorithm value")
    if not _ENCODED.fullmatch(value):
        raise InvalidDigestError(f"Invalid encoded value {_shown(value)}")
    expected = _HEX_LENGTHS.get(algorithm)
    if expected is not None:
        if len(value) != expected:
            raise InvalidDigestError(f"Invalid digest length {len(value)} expected {expected}")
        if not all(c in "0123456789abcdef" for c in value):
            raise InvalidDigestError(f"Invalid non-hexadecimal character in digest: {value}")
    return algorithm, value


def _diff_id(text: str, what: str = "") -> str:
    try:
        oci_digest(text)
    except InvalidDigestError as exc:
        raise _error("InvalidDigest", message=f"{what}{exc}") from None
    return text


def _layer_stream(repo: Repository, diff_id: str) -> str | None:
    """The stream stored for ``diff_id`` (checked by :func:`_diff_id`). Only sha256
    and sha512 diff_ids can name one: others are never looked up on disk."""
    algorithm = diff_id.partition(":")[0]
    if algorithm not in ("sha256", "sha512"):
        return None
    return existing_stream(repo, OCI_LAYER_PREFIX + diff_id)


def _require_daemon_rights(ctx: CallContext) -> None:
    if caller_rights(ctx.peer) is not None and ctx.peer.uid != 0:
        log.info("refused %s to pid %d (uid %d)", ctx.method, ctx.peer.pid, ctx.peer.uid)
        raise VarlinkReplyError("org.varlink.service.PermissionDenied")


# -- GetInfo, HasLayer -----------------------------------------------------------------------


def get_info(handles: HandleTable, ctx: CallContext) -> dict[str, Any]:
    """GetInfo: the capability tokens (``splitdirfdstream-v0``)."""
    del handles, ctx
    return {"features": list(FEATURES)}


def has_layer(handles: HandleTable, ctx: CallContext, handle: int, diff_id: str) -> dict[str, Any]:
    """HasLayer: whether the repository stores the layer, and its stream's verity."""
    with rs_errors(INTERFACE):
        _diff_id(diff_id)
        entry = handles.get(handle, ctx.peer.uid)
        verity = _layer_stream(entry.repo, diff_id)
    return {"present": verity is not None, "layer_verity": verity}


# -- GetLayer --------------------------------------------------------------------------------


class _PipeOut:
    """The write end of GetLayer's pipe (non-blocking, ours): ``write`` waits while it
    is full, up to :data:`IDLE_TIMEOUT` without progress; ``BrokenPipeError`` once
    the reader is gone."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def write(self, data: bytes | bytearray | memoryview) -> int:
        view = memoryview(data).cast("B")
        deadline = time.monotonic() + IDLE_TIMEOUT
        poller = select.poll()
        poller.register(self.fd, select.POLLOUT)
        while view:
            try:
                n = os.write(self.fd, view)
            except BlockingIOError:
                n = 0
            if n:
                view = view[n:]
                deadline = time.monotonic() + IDLE_TIMEOUT
                continue
            if time.monotonic() > deadline:
                raise TimeoutError(f"nobody read the layer pipe for {IDLE_TIMEOUT:.0f} s")
            poller.poll(_POLL_MS)
        return len(data)


_producers = threading.BoundedSemaphore(MAX_PRODUCERS)


def _wait_eof(fd: int, limit: float) -> None:
    """Until ``fd`` (a pipe's read end) sees its writers gone, or ``limit`` seconds."""
    deadline = time.monotonic() + limit
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    while time.monotonic() < deadline:
        if not poller.poll(_POLL_MS):
            continue
        try:
            if not os.read(fd, 4096):
                return
        except BlockingIOError:
            continue


class _Producer:
    """GetLayer's producer: a daemon thread that takes the repository's shared lock,
    writes the layer to the pipe, closes it, and waits for the client to close its
    lifetime fd (module notes). Owns ``pipe_w`` and ``keepalive_r``."""

    def __init__(
        self, repo: Repository, verity: str, slot: int, pipe_w: int, keepalive_r: int
    ) -> None:
        self.repo = repo
        self.verity = verity
        self.slot = slot
        self.pipe_w = pipe_w
        self.keepalive_r = keepalive_r
        self.locked = threading.Event()
        self.failed: BaseException | None = None
        self.place = _producers
        self.thread = threading.Thread(target=self._run, name="GetLayer producer", daemon=True)

    def start(self) -> None:
        """Start, and return once the lock is held (or taking it failed). Takes one
        of :data:`MAX_PRODUCERS` places (``InternalError`` if none is free), which
        the thread gives back at its end. The producer's fds are closed whatever
        happens."""
        place = self.place
        if not place.acquire(blocking=False):
            os.close(self.pipe_w)
            os.close(self.keepalive_r)
            raise _error(
                "InternalError", message=f"{MAX_PRODUCERS} layers are being served already"
            )
        try:
            self.thread.start()
        except BaseException:
            place.release()
            os.close(self.pipe_w)
            os.close(self.keepalive_r)
            raise
        self.locked.wait()
        if self.failed is not None:
            raise self.failed

    def _run(self) -> None:
        try:
            with contextlib.ExitStack() as stack:
                try:
                    stack.enter_context(reader_lock(self.repo.path))
                except BaseException as exc:
                    self.failed = exc
                    return
                finally:
                    self.locked.set()
                try:
                    with self.repo.object_store() as store:
                        produce(store, self.verity, self.slot, _PipeOut(self.pipe_w))
                except (BrokenPipeError, TimeoutError) as exc:
                    log.info("GetLayer of stream %s stopped: %s", self.verity, exc)
                except Exception:
                    log.exception("GetLayer of stream %s failed", self.verity)
                os.close(self.pipe_w)
                self.pipe_w = -1
                _wait_eof(self.keepalive_r, LIFETIME_LIMIT)
        finally:
            if self.pipe_w >= 0:
                os.close(self.pipe_w)
            os.close(self.keepalive_r)
            self.place.release()


def _placeholder(ordinal: int) -> int:
    """What fills an empty directory slot or an extra lifetime fd, as cfsctl:
    ``/dev/null`` and an empty memfd, alternately."""
    if ordinal % 2 == 0:
        return os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC)
    return os.memfd_create("composefs-layer-transfer-dummy", os.MFD_CLOEXEC)


def get_layer(
    handles: HandleTable, ctx: CallContext, handle: int, params: dict[str, Any]
) -> dict[str, Any]:
    """GetLayer: the layer as a splitdirfdstream on a pipe (module notes).

    The fds, in order over the replies: the pipe's read end, ``dir_count``
    directory slots (the objects directory at a seed-chosen slot, ``/dev/null`` or
    memfd placeholders in the others), a lifetime fd (the write end of a pipe whose
    closing tells us the client is done) and 0-2 more placeholders. With ``more``
    they are spread over several replies, as cfsctl does; without, all go with the
    one reply, or ``FdLimitExceeded`` past :data:`MAX_FDS_PER_FRAME`. cfsctl's
    layout for the same layer: the same slots, counts and frames.
    """
    _require_daemon_rights(ctx)
    diff_id = params.get("diff_id")
    if diff_id is None:
        if params.get("storage") is not None:
            raise _error(
                "InvalidRequest",
                message="GetLayer: containers-storage layers (params.storage) are not "
                "served by composefsd; name the layer by diff_id",
            )
        raise _error("InvalidRequest", message="GetLayer: diff_id is required for the repo service")
    with rs_errors(INTERFACE):
        _diff_id(diff_id)
        entry = handles.get(handle, ctx.peer.uid)
        repo = entry.repo
        verity = _layer_stream(repo, diff_id)
        if verity is None:
            raise _error("NoSuchLayer", diff_id=diff_id)
        plan = plan_layout(1, seed_from_id(OCI_LAYER_PREFIX + diff_id), ctx.more)
        if not ctx.more and plan.total > MAX_FDS_PER_FRAME:
            raise _error("FdLimitExceeded", fd_count=plan.total, max_per_frame=MAX_FDS_PER_FRAME)
        fds = _layer_fds(repo, verity, plan.dir_count, plan.real_slots[0], plan.extra_lifetime)
    reply = {"dir_count": plan.dir_count}
    start = 0
    for size in plan.frames[:-1]:
        ctx.continues_with_fds(reply, fds[start : start + size])
        start += size
    for fd in fds[start:]:
        ctx.push_fd(fd)
    return reply


def _layer_fds(repo: Repository, verity: str, dir_count: int, slot: int, extra: int) -> list[int]:
    """The fds GetLayer hands out, its producer started (they are the caller's)."""
    fds: list[int] = []
    mine: list[int] = []
    try:
        pipe_r, pipe_w = os.pipe2(os.O_CLOEXEC)
        fds.append(pipe_r)
        mine.append(pipe_w)
        os.set_blocking(pipe_w, False)
        for i in range(dir_count):
            if i == slot:
                fds.append(os.open(repo.objects_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC))
            else:
                fds.append(_placeholder(i - (1 if i > slot else 0)))
        keep_r, keep_w = os.pipe2(os.O_CLOEXEC)
        mine.append(keep_r)
        fds.append(keep_w)
        fds.extend(_placeholder(i) for i in range(extra))
        producer = _Producer(repo, verity, slot, pipe_w, keep_r)
        mine.clear()
        producer.start()
    except BaseException:
        for fd in fds + mine:
            os.close(fd)
        raise
    return fds


# -- PutLayer --------------------------------------------------------------------------------


class _PipeIn:
    """The stream PutLayer reads: the caller's pipe, polled so that a cancelled call
    (client gone) or :data:`IDLE_TIMEOUT` of silence ends the read instead of
    blocking a worker for ever. The fd's flags are the caller's too (one open file
    description), so it stays blocking and is read only when poll says so."""

    def __init__(self, fd: int, ctx: CallContext) -> None:
        self.fd = fd
        self.ctx = ctx
        self.poller = select.poll()
        self.poller.register(fd, select.POLLIN)

    def read(self, n: int = -1, /) -> bytes:
        deadline = time.monotonic() + IDLE_TIMEOUT
        while not self.poller.poll(_POLL_MS):
            self.ctx.check_cancelled()
            if time.monotonic() > deadline:
                raise LayerSourceError(f"the layer pipe stayed silent for {IDLE_TIMEOUT:.0f} s")
        return os.read(self.fd, n if n >= 0 else 1 << 20)

    def drain(self) -> None:
        """Read to the end (the client's writer must not wedge), unless the call is
        cancelled or the pipe goes silent."""
        try:
            while self.read(1 << 16):
                pass
        except Exception as exc:
            log.debug("stopped draining a PutLayer pipe: %s", exc)


def may_link(st: os.stat_result) -> bool:
    """Whether PutLayer may hard-link a file with this stat into the repository: a
    regular file owned by root or the daemon's uid, writable by nobody else, and
    without set-id or sticky bits (module notes)."""
    return (
        stat.S_ISREG(st.st_mode)
        and st.st_uid in (0, os.geteuid())
        and stat.S_IMODE(st.st_mode) & 0o7022 == 0
    )


def put_layer(
    handles: HandleTable, ctx: CallContext, handle: int, diff_id: str, zerocopy: bool
) -> dict[str, Any]:
    """PutLayer: store the layer streamed on ``fds[0]`` (objects beneath ``fds[1..]``)
    if its sha256 is ``diff_id`` (module notes). ``DiffIdMismatch`` stores nothing."""
    _require_daemon_rights(ctx)
    received = [i for i, fd in enumerate(ctx.fds) if fd is not None]
    if len(received) < 2:
        raise _error(
            "InvalidRequest",
            message=f"expected at least 2 fds (1 pipe + >=1 dir fd), got {len(received)}",
        )
    fds = [ctx.take_fd(i, "fds") for i in range(len(ctx.fds))]
    pipe = _PipeIn(fds[0], ctx)
    try:
        if not stat.S_ISFIFO(os.fstat(fds[0]).st_mode) and not stat.S_ISSOCK(
            os.fstat(fds[0]).st_mode
        ):
            raise _error("InvalidRequest", message="fds[0] is not the read end of a pipe")
        with rs_errors(INTERFACE):
            _diff_id(diff_id)
            algorithm = diff_id.partition(":")[0]
            if algorithm != "sha256":
                # cfsctl's words: its drain hashes with sha256 only, as OCI does.
                raise _error(
                    "InternalError",
                    message=f'unsupported diff_id algorithm "{algorithm}": only sha256 is '
                    "supported",
                )
            entry = handles.get(handle, ctx.peer.uid)
            already = _layer_stream(entry.repo, diff_id) is not None
            try:
                verity, stats = drain(
                    entry.repo,
                    pipe,
                    fds[1:],
                    diff_id,
                    zerocopy=zerocopy,
                    link_ok=may_link,
                    check=ctx.check_cancelled,
                )
            except DiffIdMismatchError as exc:
                raise _error("DiffIdMismatch", expected=exc.expected, actual=exc.actual) from exc
            except LayerSourceError as exc:
                raise _error("InvalidRequest", message=str(exc)) from exc
    except BaseException:
        pipe.drain()
        raise
    finally:
        for fd in fds:
            os.close(fd)
    return {
        "layer_verity": verity,
        "already_present": already,
        "objects_reflinked": stats.reflinked,
        "objects_hardlinked": stats.hardlinked,
        "objects_copied": stats.copied,
        "objects_already_present": stats.already_present,
    }


# -- FinalizeImage ---------------------------------------------------------------------------


def _json_object(text: str, what: str) -> tuple[bytes, dict[str, Any]]:
    data = text.encode()
    if len(data) > MAX_JSON:
        raise _error("InvalidRequest", message=f"{what} is larger than {MAX_JSON} bytes")
    try:
        doc = json.loads(data)
    except ValueError as exc:
        raise _error("InvalidRequest", message=f"{what} is not JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise _error("InvalidRequest", message=f"{what} is not a JSON object")
    return data, doc


def _layer_refs(repo: Repository, layers: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """``(diff_id, verity)`` per layer, each verity checked to be this repository's
    stream of that layer (module notes)."""
    if len(layers) > MAX_LAYERS:
        raise _error("InvalidRequest", message=f"{len(layers)} layers, at most {MAX_LAYERS}")
    hex_len = 2 * repo.hash_algorithm.digest_size
    refs = []
    for layer in layers:
        diff_id, verity = layer["diff_id"], layer["layer_verity"]
        _diff_id(diff_id, f"diff_id {_shown(diff_id)!r}: ")
        if len(verity) != hex_len or not is_hex(verity):
            raise _error(
                "InvalidDigest",
                message=f"layer_verity {_shown(verity)!r}: not {hex_len} hex digits",
            )
        stored = _layer_stream(repo, diff_id)
        if stored is None:
            raise _error("NoSuchLayer", diff_id=diff_id)
        if stored != verity.lower():
            raise _error(
                "InvalidRequest",
                message=f"layer_verity {verity} of layer {diff_id} is not the stream this "
                f"repository stores for it ({stored})",
            )
        refs.append((diff_id, stored))
    return refs


def finalize_image(
    handles: HandleTable,
    ctx: CallContext,
    handle: int,
    manifest_json: str,
    config_json: str,
    layers: list[dict[str, Any]],
    name: str | None,
) -> dict[str, Any]:
    """FinalizeImage: store the config and manifest (their bytes as given, so the
    digests hold) with references to the layers' streams, build the composefs
    image as a pull does (:func:`composefsd.repository.ocibuild.ensure_image`), and
    point ``name`` at it. Idempotent: streams that exist are kept."""
    manifest, manifest_doc = _json_object(manifest_json, "manifest_json")
    config, _ = _json_object(config_json, "config_json")
    config_digest = "sha256:" + hashlib.sha256(config).hexdigest()
    manifest_digest = "sha256:" + hashlib.sha256(manifest).hexdigest()
    named = manifest_doc.get("config")
    if isinstance(named, dict) and named.get("digest") not in (None, config_digest):
        raise _error(
            "InvalidRequest",
            message=f"the manifest names config {_shown(str(named.get('digest')))}, "
            f"config_json is {config_digest}",
        )
    with rs_errors(INTERFACE):
        entry = handles.get(handle, ctx.peer.uid)
        repo = entry.repo
        if name is not None:
            check_tag(name)
        repo.ensure_writable()
        with writer_lock(repo.path):
            refs = _layer_refs(repo, layers)
            ctx.check_cancelled()
            config_id = OCI_CONFIG_PREFIX + config_digest
            manifest_id = OCI_MANIFEST_PREFIX + manifest_digest
            config_verity = existing_stream(repo, config_id)
            manifest_verity = existing_stream(repo, manifest_id)
            with repo.object_store() as store:
                if config_verity is None:
                    config_verity = write_config_stream(repo, store, config, refs)
                if manifest_verity is None:
                    manifest_verity = write_manifest_stream(
                        repo, store, manifest, config_digest, config_verity, refs
                    )
            ctx.check_cancelled()
            built = ensure_image(repo, manifest_digest, manifest_verity, name)
            if built is None and name is not None:
                # An artifact: no image to build, the tag names the manifest alone.
                tag_image(repo, manifest_digest, name)
            # ensure_image rewrote both streams (with the image refs): read them again.
            config_verity = existing_stream(repo, config_id)
            manifest_verity = existing_stream(repo, manifest_id)
    return {
        "manifest_digest": manifest_digest,
        "manifest_verity": manifest_verity,
        "config_digest": config_digest,
        "config_verity": config_verity,
    }
