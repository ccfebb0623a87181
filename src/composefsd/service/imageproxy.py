"""A client of skopeo's image proxy (``skopeo experimental-image-proxy``).

The containers-image-proxy protocol, as skopeo's ``cmd/skopeo/proxy.go`` serves it
(Debian's skopeo 1.9.3 speaks protocol 0.2.3): one JSON request per packet on a
``SOCK_SEQPACKET`` socketpair, ``{"method": ..., "args": [...]}``, answered by one
packet ``{"success", "value", "pipeid", "error"[, "error_code"]}``. Payloads
(manifest, config, blobs) come through the read end of a pipe passed with
SCM_RIGHTS; skopeo closes the write end only when the client calls ``FinishPipe``,
whose reply carries the transfer's error (a digest or size mismatch, a registry that
hung up). So every transfer here sends ``FinishPipe`` *before* reading: skopeo
answers it once its writer is done, the pipe then reaches EOF, and the reply is
waiting on the socket. Reading to EOF therefore never hangs on a failed transfer.
Skopeo serves requests one at a time (a pending ``FinishPipe`` holds its lock), so a
source serves one transfer at a time; parallel fetches open several sources.

A dead skopeo shows as EOF on the socket (or on a pipe whose reply then never comes)
and raises :class:`ProxyDiedError`; the child is reaped whenever the source closes.

Skopeo runs as the caller's :class:`~composefsd.credentials.Credentials` when given,
so the caller reads only the local paths (layouts, archives, authfile) it could read
itself. A password never goes on skopeo's command line (where ``ps`` shows it): it is
handed over as an auth file in an unlinked file skopeo reads through
``/proc/self/fd/N``, as containers-image-proxy-rs does.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import hashlib
import io
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import IO, BinaryIO

from composefsd.credentials import Credentials
from composefsd.service.fds import close_all, fds_from_ancillary

__all__ = [
    "MAX_CONFIG_SIZE",
    "MAX_MANIFEST_SIZE",
    "PROXY_VARIABLES",
    "BlobTransferError",
    "ContentTooLargeError",
    "DigestMismatchError",
    "ImageAccessDeniedError",
    "ImageNotFoundError",
    "ImageProxyBusyError",
    "ImageProxyError",
    "ImageProxyPool",
    "ImageProxySource",
    "PlatformNotFoundError",
    "ProxyAuthError",
    "ProxyDiedError",
    "ProxyOptions",
    "ProxyOptionsError",
    "ProxyProtocolError",
    "ProxyStartError",
    "ProxyTLSError",
    "RequestError",
    "open_image_proxy",
    "skopeo_path",
]

log = logging.getLogger(__name__)

#: Environment variables of the HTTP proxy skopeo (Go's net/http) uses.
PROXY_VARIABLES = frozenset(
    {"HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY", "http_proxy", "https_proxy", "no_proxy"}
)

#: containers/image refuses manifests and configs above 4 MiB; so do we.
MAX_MANIFEST_SIZE = 4 * 1024 * 1024
MAX_CONFIG_SIZE = 4 * 1024 * 1024
# skopeo's own limit on a request packet; replies are small JSON too (no
# GetLayerInfo here), so anything near this is not a reply we can use.
_MAX_MSG = 32 * 1024
_MAX_REPLY = 64 * 1024
# GetRawBlob (0.2.8) passes two fds; more than that is a protocol error.
_MAX_FDS = 2
_PIPE_CHUNK = 1 << 20
# How long a graceful exit may take after Shutdown before the child is killed.
_EXIT_GRACE = 10.0
_STDERR_TAIL = 4096
_DIGEST = re.compile(r"sha256:[0-9a-f]{64}\Z")
_TRANSPORTS = ("docker://", "oci:", "oci-archive:", "docker-archive:", "containers-storage:")


class ImageProxyError(Exception):
    """Base class: ``str()`` is a complete sentence; ``skopeo_message`` is skopeo's
    own text where it said something (else None)."""

    def __init__(self, message: str, *, skopeo_message: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.skopeo_message = skopeo_message

    def __str__(self) -> str:
        return self.message


class ProxyOptionsError(ImageProxyError):
    """The reference or the options are not something this client passes on."""


class ProxyStartError(ImageProxyError):
    """skopeo could not be found or started."""


class ProxyDiedError(ImageProxyError):
    """skopeo exited (or hung up its socket) in the middle of the conversation."""


class ProxyProtocolError(ImageProxyError):
    """skopeo's reply broke the protocol: not JSON, too large, missing or extra fds,
    an unsupported protocol version."""


class ImageProxyBusyError(ImageProxyError):
    """A transfer is already open on this source (skopeo serves one at a time)."""


class RequestError(ImageProxyError):
    """skopeo answered a request with an error. ``method`` is the request;
    ``error_code`` the protocol's code (0.2.8 and later), else None."""

    def __init__(
        self,
        message: str,
        *,
        method: str,
        skopeo_message: str | None,
        error_code: str | None = None,
    ) -> None:
        super().__init__(message, skopeo_message=skopeo_message)
        self.method = method
        self.error_code = error_code


class ImageNotFoundError(RequestError):
    """No such image: an unknown tag or repository, a layout or archive without it."""


class PlatformNotFoundError(ImageNotFoundError):
    """The image is a manifest list without an instance for this platform (or the
    one ``override_arch``/``override_os``/``override_variant`` ask for)."""


class ProxyAuthError(RequestError):
    """The registry refused the credentials (or wants some)."""


class ProxyTLSError(RequestError):
    """The registry's TLS certificate could not be verified."""


class ImageAccessDeniedError(RequestError):
    """A local path of the reference is not readable with the caller's rights."""


class BlobTransferError(RequestError):
    """A payload transfer failed: skopeo's verdict at FinishPipe (a registry that hung
    up, a digest or size mismatch), or a stream shorter or longer than announced."""


class ContentTooLargeError(ImageProxyError):
    """A manifest or config is larger than the bound for it."""


class DigestMismatchError(ImageProxyError):
    """Content whose sha256 is not the digest it was fetched by."""


# skopeo 1.9.3 (protocol 0.2.3) gives no error codes at all, and even 0.2.8 only
# tells "retryable" apart; OpenImageOptional (0.2.4) is the one structured
# not-found signal, used when skopeo has it. Otherwise the class of a failure is
# known only from containers/image's wording, so this table is its one home.
_CLASSES: tuple[tuple[type[RequestError], tuple[str, ...]], ...] = (
    (
        ProxyTLSError,
        ("x509: ", "tls: failed to verify", "certificate signed by unknown authority"),
    ),
    (
        ProxyAuthError,
        ("unauthorized", "authentication required", "invalid username/password"),
    ),
    (ImageAccessDeniedError, ("permission denied",)),
    (
        PlatformNotFoundError,
        ("no image found in manifest list for", "no image found in image index for"),
    ),
    (
        ImageNotFoundError,
        (
            "manifest unknown",
            "name unknown",
            "no descriptor found for reference",
            "no such file or directory",
            "identifier is not an image",
            "image not known",
        ),
    ),
)


def _classify(method: str, skopeo_message: str, code: str | None) -> RequestError:
    text = skopeo_message.lower()
    cls: type[RequestError] = RequestError
    for candidate, needles in _CLASSES:
        if any(n in text for n in needles):
            cls = candidate
            break
    return cls(
        f"skopeo's {method} failed: {skopeo_message}",
        method=method,
        skopeo_message=skopeo_message,
        error_code=code,
    )


@dataclass(slots=True, frozen=True)
class ProxyOptions:
    """What skopeo's proxy takes (its flags, and the files containers/image reads
    from the environment); None leaves skopeo's default."""

    #: ``--authfile``: registry credentials (containers-auth.json).
    authfile: str | None = None
    #: ``--cert-dir``: ``*.crt`` CAs, ``*.cert``/``*.key`` client certificates.
    cert_dir: str | None = None
    #: ``--tls-verify``: False allows plain HTTP and unverified TLS.
    tls_verify: bool | None = None
    #: ``USER:PASSWORD`` for a ``docker://`` registry (never on the command line,
    #: nor in this record's repr, which logs may show). Takes the place of
    #: ``authfile``, as skopeo's --creds overrides its auth file.
    creds: str | None = field(default=None, repr=False)
    #: ``--no-creds``: access the registry anonymously.
    no_creds: bool = False
    #: ``--override-arch`` / ``--override-os`` / ``--override-variant``: which
    #: instance of a manifest list to pick.
    override_arch: str | None = None
    override_os: str | None = None
    override_variant: str | None = None
    #: ``--tmpdir``: where skopeo unpacks ``oci-archive:`` and ``docker-archive:``.
    tmpdir: str | None = None
    #: ``--registries-conf`` (a hidden global flag): registries.conf for
    #: mirrors, location rewrites and insecure registries.
    registries_conf: str | None = None
    #: ``CONTAINERS_STORAGE_CONF``: storage.conf for ``containers-storage:``.
    storage_conf: str | None = None


def skopeo_path() -> str:
    """$COMPOSEFSD_SKOPEO, else ``skopeo`` on PATH; :class:`ProxyStartError` if none."""
    configured = os.environ.get("COMPOSEFSD_SKOPEO")
    if configured:
        return configured
    found = shutil.which("skopeo")
    if found is None:
        raise ProxyStartError("skopeo is not installed (not on PATH, and no $COMPOSEFSD_SKOPEO)")
    return found


def _check_reference(reference: str) -> None:
    if not reference.startswith(_TRANSPORTS):
        raise ProxyOptionsError(
            f"image reference {reference!r} names no supported transport "
            f"({', '.join(t.rstrip(':/') for t in _TRANSPORTS)})"
        )
    if any(c in reference for c in "\0\n") or len(reference) > 4096:
        raise ProxyOptionsError(f"image reference {reference!r} is not a valid reference")


def _registry_of(reference: str) -> str:
    """The registry host of a ``docker://`` reference, as auth.json keys it (the
    docker reference rule: the first component is a host if it has ``.`` or ``:``
    or is ``localhost``)."""
    rest = reference[len("docker://") :]
    first, slash, _ = rest.partition("/")
    if slash and ("." in first or ":" in first or first == "localhost"):
        return first
    return "docker.io"


def _auth_file(reference: str, creds: str, owner: Credentials | None) -> int:
    """An unlinked auth.json holding ``creds`` for the reference's registry, owned
    by whoever skopeo runs as; returns its fd (the caller closes it)."""
    if not reference.startswith("docker://"):
        raise ProxyOptionsError("credentials apply only to docker:// references")
    user, colon, _ = creds.partition(":")
    if not colon or not user or any(c in creds for c in "\0\n"):
        raise ProxyOptionsError("credentials must be given as USER:PASSWORD")
    doc = {"auths": {_registry_of(reference): {"auth": base64.b64encode(creds.encode()).decode()}}}
    try:
        fd = os.open(tempfile.gettempdir(), os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise ProxyStartError(f"cannot make the auth file for skopeo: {exc.strerror}") from exc
    try:
        os.write(fd, json.dumps(doc).encode())
        if owner is not None:
            os.fchown(fd, owner.uid, owner.gid)
    except OSError as exc:
        os.close(fd)
        raise ProxyStartError(f"cannot write the auth file for skopeo: {exc.strerror}") from exc
    return fd


def _command(skopeo: str, options: ProxyOptions, sockfd: int, authfd: int | None) -> list[str]:
    cmd = [skopeo]
    for flag, value in (
        ("--override-arch", options.override_arch),
        ("--override-os", options.override_os),
        ("--override-variant", options.override_variant),
        ("--tmpdir", options.tmpdir),
        ("--registries-conf", options.registries_conf),
    ):
        if value is not None:
            cmd += [flag, value]
    cmd += ["experimental-image-proxy", "--sockfd", str(sockfd)]
    if authfd is not None:
        cmd += ["--authfile", f"/proc/self/fd/{authfd}"]
    elif options.authfile is not None:
        cmd += ["--authfile", options.authfile]
    if options.no_creds:
        cmd.append("--no-creds")
    if options.cert_dir is not None:
        cmd += ["--cert-dir", options.cert_dir]
    if options.tls_verify is not None:
        cmd.append(f"--tls-verify={'true' if options.tls_verify else 'false'}")
    return cmd


def _environment(options: ProxyOptions, creds: Credentials | None) -> dict[str, str]:
    # As another user, nothing of the daemon's environment (its HOME, its
    # XDG dirs) may steer what skopeo reads: containers/image then finds that
    # user's own defaults, or none.
    if creds is None or creds.uid == 0:
        env = dict(os.environ)
    else:
        env = {"PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"), "HOME": "/"}
        # The machine's proxy settings (the daemon's environment, e.g.
        # composefsd.env) are how skopeo takes them, and steer no file reads.
        env.update({k: v for k, v in os.environ.items() if k in PROXY_VARIABLES})
    if options.storage_conf is not None:
        env["CONTAINERS_STORAGE_CONF"] = options.storage_conf
    return env


def _version_at_least(version: str, minor: int, patch: int) -> bool:
    parts = version.split(".")
    return (int(parts[1]), int(parts[2])) >= (minor, patch)


@dataclass(slots=True)
class _Reply:
    value: object
    pipeid: int
    fds: list[int]


class _Proxy:
    """One skopeo child and its socket: requests, replies, and the child's end."""

    def __init__(self, options: ProxyOptions, creds: Credentials | None, reference: str) -> None:
        self.lock = threading.Lock()
        self.closed = False
        self.dead = False
        skopeo = skopeo_path()
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.sock = parent
        authfd: int | None = None
        # Lives as long as the child: read for its last words when it dies.
        self.stderr: IO[bytes] = tempfile.TemporaryFile()  # noqa: SIM115
        try:
            if options.creds is not None:
                authfd = _auth_file(reference, options.creds, creds)
            pass_fds = (child.fileno(),) if authfd is None else (child.fileno(), authfd)
            cmd = _command(skopeo, options, child.fileno(), authfd)
            try:
                self.proc = subprocess.Popen(
                    cmd,
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL,
                    stderr=self.stderr,
                    pass_fds=pass_fds,
                    env=_environment(options, creds),
                    cwd="/",
                    start_new_session=True,
                    user=None if creds is None else creds.uid,
                    group=None if creds is None else creds.gid,
                    extra_groups=None if creds is None else list(creds.groups),
                )
            except OSError as exc:
                raise ProxyStartError(f"cannot start {skopeo}: {exc.strerror or exc}") from exc
        except BaseException:
            parent.close()
            self.stderr.close()
            raise
        finally:
            child.close()
            if authfd is not None:
                os.close(authfd)
        log.debug("started skopeo image proxy, pid %d", self.proc.pid)

    def stderr_tail(self) -> str:
        try:
            size = self.stderr.seek(0, os.SEEK_END)
            self.stderr.seek(max(0, size - _STDERR_TAIL))
            return self.stderr.read().decode(errors="replace").strip()
        except (OSError, ValueError):
            return ""

    def died(self, what: str) -> ProxyDiedError:
        """The child is gone (or unusable): reap it and describe how it ended."""
        self.dead = True
        self.reap(graceful=False)
        tail = self.stderr_tail()
        status = self.proc.returncode
        how = f"exit status {status}" if status >= 0 else f"signal {-status}"
        message = f"skopeo image proxy died ({how}) {what}"
        if tail:
            message += f": {tail}"
        return ProxyDiedError(message, skopeo_message=tail or None)

    def send(self, method: str, args: Sequence[object]) -> None:
        data = json.dumps({"method": method, "args": list(args)}).encode()
        if len(data) > _MAX_MSG:
            raise ProxyOptionsError(f"{method} request of {len(data)} bytes is too large")
        try:
            sent = self.sock.send(data)
        except OSError as exc:
            raise self.died(f"while sending {method}") from exc
        if sent != len(data):
            raise ProxyProtocolError(f"short write of the {method} request")

    def receive(self, method: str) -> _Reply:
        try:
            data, anc, flags, _ = self.sock.recvmsg(
                _MAX_REPLY, socket.CMSG_SPACE(_MAX_FDS * 4), socket.MSG_CMSG_CLOEXEC
            )
        except OSError as exc:
            raise self.died(f"while waiting for the {method} reply") from exc
        fds = fds_from_ancillary(anc)
        if not data and not fds:
            raise self.died(f"before answering {method}")
        try:
            if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
                raise ProxyProtocolError(f"skopeo's {method} reply is larger than {_MAX_REPLY}")
            try:
                reply = json.loads(data)
            except ValueError as exc:
                raise ProxyProtocolError(f"skopeo's {method} reply is not JSON") from exc
            if not isinstance(reply, dict) or not isinstance(reply.get("success"), bool):
                raise ProxyProtocolError(f"skopeo's {method} reply is not a reply object")
            if not reply["success"]:
                error = reply.get("error")
                code = reply.get("error_code")
                raise _classify(
                    method,
                    error if isinstance(error, str) and error else "(no message)",
                    code if isinstance(code, str) and code else None,
                )
            pipeid = reply.get("pipeid", 0)
            if not isinstance(pipeid, int) or isinstance(pipeid, bool) or pipeid < 0:
                raise ProxyProtocolError(f"skopeo's {method} reply has a bad pipeid")
        except ProxyProtocolError:
            close_all(fds)
            self.broken()
            raise
        except BaseException:
            close_all(fds)
            raise
        return _Reply(reply.get("value"), pipeid, fds)

    def broken(self) -> None:
        """After a reply that broke the protocol, requests and replies may no
        longer pair up: end skopeo, so that every later request fails plainly."""
        self.dead = True
        self.reap(graceful=False)

    def call(self, method: str, args: Sequence[object]) -> object:
        """A request without a pipe; its value."""
        self.check_open()
        self.send(method, args)
        reply = self.receive(method)
        if reply.fds:
            close_all(reply.fds)
            self.broken()
            raise ProxyProtocolError(f"skopeo's {method} reply passed unexpected fds")
        return reply.value

    def call_pipe(self, method: str, args: Sequence[object]) -> tuple[object, int, int]:
        """A request whose reply passes one pipe: (value, pipe fd, pipeid), with
        FinishPipe already sent (module notes); its reply is read by :meth:`finish`."""
        self.check_open()
        self.send(method, args)
        reply = self.receive(method)
        if len(reply.fds) != 1 or reply.pipeid == 0:
            close_all(reply.fds)
            self.broken()
            raise ProxyProtocolError(f"skopeo's {method} reply passed no pipe")
        try:
            self.send("FinishPipe", [reply.pipeid])
        except BaseException:
            close_all(reply.fds)
            raise
        return reply.value, reply.fds[0], reply.pipeid

    def finish(self, method: str) -> None:
        """The pending FinishPipe's reply: raises the transfer's error, if any."""
        try:
            self.call_finish()
        except RequestError as exc:
            raise BlobTransferError(
                f"skopeo's {method} transfer failed: {exc.skopeo_message}",
                method=method,
                skopeo_message=exc.skopeo_message,
                error_code=exc.error_code,
            ) from exc

    def call_finish(self) -> None:
        reply = self.receive("FinishPipe")
        if reply.fds:
            close_all(reply.fds)
            self.broken()
            raise ProxyProtocolError("skopeo's FinishPipe reply passed unexpected fds")

    def check_open(self) -> None:
        if self.closed:
            raise ImageProxyError("the image proxy is closed")
        if self.dead:
            raise ProxyDiedError("the image proxy has ended after an earlier failure")

    def read_pipe(self, method: str, fd: int, limit: int) -> bytes:
        """All of a pipe (closing it) and the FinishPipe verdict; at most ``limit``."""
        chunks: list[bytes] = []
        total = 0
        try:
            while True:
                chunk = os.read(fd, min(_PIPE_CHUNK, limit + 1 - total))
                if not chunk:
                    break
                chunks.append(chunk)
                total += len(chunk)
                if total > limit:
                    break
        finally:
            os.close(fd)
        if total > limit:
            # Closed early: skopeo's writer fails (EPIPE), then FinishPipe answers.
            with contextlib.suppress(ImageProxyError):
                self.call_finish()
            raise ContentTooLargeError(f"skopeo's {method} content is larger than {limit} bytes")
        self.finish(method)
        return b"".join(chunks)

    def reap(self, *, graceful: bool) -> None:
        if self.proc.poll() is None and graceful:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(_EXIT_GRACE)
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()

    def close(self) -> None:
        """Shut skopeo down (or kill it if a request is under way in another
        thread, or it does not go), reap it, close everything."""
        if self.closed:
            return
        self.closed = True
        graceful = False
        if not self.dead and self.lock.acquire(blocking=False):
            try:
                self.sock.send(json.dumps({"method": "Shutdown", "args": []}).encode())
                graceful = True
            except OSError:
                pass
            finally:
                self.lock.release()
        # Wakes any thread blocked in recvmsg (it sees EOF).
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.reap(graceful=graceful)
        self.sock.close()
        self.stderr.close()
        log.debug("skopeo image proxy %d ended: %s", self.proc.pid, self.proc.returncode)


class _BlobReader(io.RawIOBase):
    """The read end of a GetBlob pipe: raises at EOF if the transfer failed."""

    def __init__(self, proxy: _Proxy, fd: int, size: int, digest: str) -> None:
        super().__init__()
        self._proxy = proxy
        self._fd: int | None = fd
        self._size = size
        self._digest = digest
        self._done = 0
        self.finished = False
        # A failed transfer keeps failing: a caller that swallowed the first
        # error must not take the next read's b"" for a complete blob.
        self._error: ImageProxyError | None = None
        # A 1 MiB pipe instead of 64 KiB: skopeo and the reader wake each other
        # 16 times less (a 500 MB image: 10 % less time and CPU on both sides).
        # Above the system's pipe-max-size (unprivileged) the pipe stays as it is.
        with contextlib.suppress(OSError):
            fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, _PIPE_CHUNK)

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview | bytearray) -> int:  # type: ignore[override]
        if self._error is not None:
            raise self._error
        if self.finished:
            return 0
        if self._fd is None:
            raise ValueError("read from a closed blob stream")
        try:
            n = os.readv(self._fd, [memoryview(buffer).cast("B")])
            self._done += n
            if self._done > self._size:
                raise BlobTransferError(
                    f"blob {self._digest} is longer than its {self._size} bytes",
                    method="GetBlob",
                    skopeo_message=None,
                )
            if n == 0:
                self._end()
        except ImageProxyError as exc:
            self._error = exc
            raise
        return n

    def _end(self) -> None:
        self.finished = True
        self.release_fd()
        self._proxy.finish("GetBlob")
        if self._done != self._size:
            raise BlobTransferError(
                f"blob {self._digest} ended after {self._done} of its {self._size} bytes",
                method="GetBlob",
                skopeo_message=None,
            )

    def release_fd(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def abandon(self) -> None:
        """Stop early: close the pipe so skopeo's writer stops, then take the
        pending FinishPipe reply (an EPIPE error, or success) off the socket."""
        self.release_fd()
        if not self.finished:
            self.finished = True
            # The caller's own exception (or none) is what matters here; a dead
            # proxy shows again at the next request.
            with contextlib.suppress(ImageProxyError):
                self._proxy.call_finish()


class ImageProxySource:
    """One image opened through skopeo's proxy; the image source the OCI puller
    reads (``fetch_manifest``, ``fetch_config``, ``open_blob``, ``close``).
    One transfer at a time (:class:`ImageProxyBusyError` otherwise)."""

    def __init__(self, proxy: _Proxy, image_id: int, reference: str, version: str) -> None:
        self._proxy = proxy
        self._image = image_id
        self.reference = reference
        #: The protocol version skopeo announced.
        self.protocol_version = version

    @property
    def pid(self) -> int:
        return self._proxy.proc.pid

    @property
    def returncode(self) -> int | None:
        """skopeo's exit status once reaped (None while it runs)."""
        return self._proxy.proc.returncode

    @contextlib.contextmanager
    def _exclusive(self) -> Iterator[_Proxy]:
        if not self._proxy.lock.acquire(blocking=False):
            raise ImageProxyBusyError(f"a transfer from {self.reference} is already under way")
        try:
            yield self._proxy
        finally:
            self._proxy.lock.release()

    def fetch_manifest(self) -> tuple[str, bytes]:
        """(digest, manifest JSON) of the image for this platform, as skopeo's
        GetManifest gives them: a manifest list resolved to this platform's (or the
        overridden) instance; a Docker schema 2 manifest converted to OCI, its digest
        still the original's (as composefs-rs stores it)."""
        with self._exclusive() as proxy:
            value, fd, _ = proxy.call_pipe("GetManifest", [self._image])
            if not isinstance(value, str) or not _DIGEST.match(value):
                os.close(fd)
                proxy.broken()
                raise ProxyProtocolError(f"skopeo's GetManifest gave a bad digest {value!r}")
            return value, proxy.read_pipe("GetManifest", fd, MAX_MANIFEST_SIZE)

    def fetch_config(self, digest: str, size: int) -> bytes:
        """The raw config blob; its sha256 must be ``digest``."""
        _check_blob(digest, size, MAX_CONFIG_SIZE)
        with self._exclusive() as proxy:
            try:
                _, fd, _ = proxy.call_pipe("GetBlob", [self._image, digest, size])
                data = proxy.read_pipe("GetBlob", fd, MAX_CONFIG_SIZE)
            except RequestError as exc:
                # A Docker-format image's manifest, converted to OCI, names an
                # OCI config the source does not store: containers/image's
                # conversion of the config, which GetFullConfig serializes the
                # same way. Taken only if it is exactly that digest.
                data = self._full_config(proxy)
                if _sha256(data) != digest:
                    raise exc from None
        actual = _sha256(data)
        if actual != digest:
            raise DigestMismatchError(f"config {digest} has the digest {actual}")
        return data

    def _full_config(self, proxy: _Proxy) -> bytes:
        _, fd, _ = proxy.call_pipe("GetFullConfig", [self._image])
        return proxy.read_pipe("GetFullConfig", fd, MAX_CONFIG_SIZE)

    @contextlib.contextmanager
    def open_blob(self, digest: str, size: int) -> Iterator[BinaryIO]:
        """The raw (compressed) blob, streamed. skopeo checks its digest and size;
        a failure raises :class:`BlobTransferError` from the read that reaches the
        end. Leaving early stops the transfer."""
        _check_blob(digest, size, None)
        with self._exclusive() as proxy:
            _, fd, _ = proxy.call_pipe("GetBlob", [self._image, digest, size])
            raw = _BlobReader(proxy, fd, size, digest)
            try:
                yield io.BufferedReader(raw, _PIPE_CHUNK)
            finally:
                raw.abandon()

    def close(self) -> None:
        """End skopeo (reaped); the source is unusable afterwards."""
        self._proxy.close()

    def __enter__(self) -> ImageProxySource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _check_blob(digest: str, size: int, limit: int | None) -> None:
    if not isinstance(digest, str) or not _DIGEST.match(digest):
        raise ProxyOptionsError(f"blob digest {digest!r} is not sha256:<64 hex digits>")
    if isinstance(size, bool) or not isinstance(size, int) or size < 0 or size >= 1 << 53:
        raise ProxyOptionsError(f"blob {digest} has an invalid size {size!r}")
    if limit is not None and size > limit:
        raise ContentTooLargeError(f"blob {digest} of {size} bytes is larger than {limit}")


def open_image_proxy(
    reference: str, options: ProxyOptions, *, creds: Credentials | None
) -> ImageProxySource:
    """Start skopeo's proxy (as ``creds`` if given) and open ``reference``
    (``docker://``, ``oci:``, ``oci-archive:``, ``docker-archive:``,
    ``containers-storage:``). Raises :class:`ImageNotFoundError` for a missing
    image and other :class:`ImageProxyError` s; skopeo is reaped on any failure."""
    _check_reference(reference)
    proxy = _Proxy(options, creds, reference)
    try:
        with proxy.lock:
            version = proxy.call("Initialize", [])
            if not isinstance(version, str) or not re.fullmatch(r"0\.2\.\d+", version):
                raise ProxyProtocolError(f"skopeo speaks protocol {version!r}, not 0.2.x")
            if _version_at_least(version, 2, 4):
                image = proxy.call("OpenImageOptional", [reference])
                if image == 0:
                    raise ImageNotFoundError(
                        f"no image {reference}",
                        method="OpenImageOptional",
                        skopeo_message=None,
                    )
            else:
                image = proxy.call("OpenImage", [reference])
            if not isinstance(image, int) or isinstance(image, bool) or image <= 0:
                raise ProxyProtocolError(f"skopeo's OpenImage gave a bad image id {image!r}")
    except BaseException:
        proxy.close()
        raise
    return ImageProxySource(proxy, image, reference, version)


class ImageProxyPool:
    """An image source over up to ``size`` skopeo proxies of one reference, so that
    a pull fetches several layers at once (a proxy serves one transfer at a time).
    The first proxy opens at once (a missing image fails here); the others open as
    parallel blobs need them. A proxy whose transfer failed is closed, not
    reused (its conversation may be out of step)."""

    def __init__(
        self,
        reference: str,
        options: ProxyOptions,
        *,
        creds: Credentials | None,
        size: int = 4,
    ) -> None:
        if size < 1:
            raise ValueError("a pool holds at least one proxy")
        self.reference = reference
        self._options = options
        self._creds = creds
        self._size = size
        self._cond = threading.Condition()
        self._idle: list[ImageProxySource] = []
        self._all: list[ImageProxySource] = []
        self._closed = False
        self._opening = 0
        first = open_image_proxy(reference, options, creds=creds)
        self._all.append(first)
        self._idle.append(first)

    @contextlib.contextmanager
    def _source(self) -> Iterator[ImageProxySource]:
        source: ImageProxySource | None = None
        with self._cond:
            while source is None:
                if self._closed:
                    raise ProxyDiedError(f"the proxies of {self.reference} are closed")
                if self._idle:
                    source = self._idle.pop()
                elif len(self._all) + self._opening < self._size:
                    self._opening += 1
                    break
                else:
                    self._cond.wait()
        if source is None:
            try:
                source = open_image_proxy(self.reference, self._options, creds=self._creds)
            finally:
                with self._cond:
                    self._opening -= 1
                    late = self._closed
                    if source is not None and not late:
                        self._all.append(source)
                    self._cond.notify()
            if late:
                source.close()
                raise ProxyDiedError(f"the proxies of {self.reference} are closed")
        ok = False
        try:
            yield source
            ok = True
        finally:
            with self._cond:
                if ok and not self._closed:
                    self._idle.append(source)
                else:
                    self._all.remove(source)
                self._cond.notify()
            if not ok:
                source.close()

    @property
    def pids(self) -> list[int]:
        """The pids of the skopeo children this pool holds now (idle or busy)."""
        with self._cond:
            return [source.pid for source in self._all]

    def fetch_manifest(self) -> tuple[str, bytes]:
        with self._source() as source:
            return source.fetch_manifest()

    def fetch_config(self, digest: str, size: int) -> bytes:
        with self._source() as source:
            return source.fetch_config(digest, size)

    @contextlib.contextmanager
    def open_blob(self, digest: str, size: int) -> Iterator[BinaryIO]:
        with self._source() as source, source.open_blob(digest, size) as blob:
            yield blob

    def close(self) -> None:
        """End every proxy (reaped); a transfer under way then fails."""
        with self._cond:
            self._closed = True
            sources = list(self._all)
            self._cond.notify_all()
        for source in sources:
            source.close()

    def __enter__(self) -> ImageProxyPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()
