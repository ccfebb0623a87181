"""Real registries for tests: Debian's ``docker-registry`` (distribution 2.8) on
127.0.0.1, plain HTTP, TLS with a self-signed certificate, or basic auth; OCI
layouts to fill them with; and a TCP forwarder that hangs up in the middle of a blob.

The pytest fixtures built on these live in tests/conftest.py (``registry``,
``tls_registry``, ``auth_registry``); a test needing another kind calls
:func:`running_registry` itself. Readiness is polled on ``/v2/`` (no fixed sleeps).
"""

from __future__ import annotations

import abc
import contextlib
import gzip
import hashlib
import io
import json
import os
import shutil
import socket
import ssl
import stat
import subprocess
import tarfile
import threading
import time
import urllib.error
import urllib.request
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Self

import pytest

REGISTRY_BIN = "docker-registry"
# Generous: the registry starts in well under a second; this only bounds a broken one.
_READY_BOUND = 60.0


def have_registry_tools() -> bool:
    return all(shutil.which(t) for t in (REGISTRY_BIN, "skopeo", "openssl"))


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def bcrypt_htpasswd(user: str, password: str) -> str:
    """One htpasswd line with a bcrypt hash (all distribution accepts), made with
    libxcrypt through Python's crypt module: no extra package needed."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        import crypt

    hashed = crypt.crypt(password, crypt.mksalt(crypt.METHOD_BLOWFISH, rounds=1 << 4))
    assert hashed and hashed.startswith("$2"), "libxcrypt has no bcrypt"
    return f"{user}:{hashed}\n"


def self_signed_cert(directory: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 (and its key), made with the openssl CLI."""
    directory.mkdir(parents=True, exist_ok=True)
    cert, key = directory / "registry.crt", directory / "registry.key"
    subprocess.run(
        [
            "openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
            "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
            "-keyout", str(key), "-out", str(cert),
        ],
        check=True,
        capture_output=True,
    )  # fmt: skip
    return cert, key


@dataclass(slots=True)
class Registry:
    """A running registry: ``host`` is ``127.0.0.1:PORT``."""

    host: str
    process: subprocess.Popen[bytes]
    storage: Path
    #: A directory holding the CA certificate as ``ca.crt`` (for skopeo's
    #: --cert-dir), or None for plain HTTP.
    cert_dir: Path | None = None
    user: str | None = None
    password: str | None = None

    @property
    def tls(self) -> bool:
        return self.cert_dir is not None

    @property
    def creds(self) -> str | None:
        return None if self.user is None else f"{self.user}:{self.password}"

    def ref(self, name: str, tag: str) -> str:
        return f"docker://{self.host}/{name}:{tag}"

    def dest_flags(self) -> list[str]:
        """skopeo copy's flags to write to this registry."""
        flags = (
            ["--dest-cert-dir", str(self.cert_dir)]
            if self.cert_dir
            else ["--dest-tls-verify=false"]
        )
        if self.creds is not None:
            flags += ["--dest-creds", self.creds]
        return flags

    def push(self, source: str, name: str, tag: str, *extra: str) -> str:
        """``skopeo copy source docker://HOST/name:tag``; returns the destination."""
        dest = self.ref(name, tag)
        copy(source, dest, "--preserve-digests", *self.dest_flags(), *extra)
        return dest


def copy(source: str, dest: str, *flags: str, env: dict[str, str] | None = None) -> None:
    """``skopeo copy`` without consulting the machine's signature policy."""
    result = subprocess.run(
        ["skopeo", "--insecure-policy", "copy", "-q", *flags, source, dest],
        capture_output=True,
        env=env,
    )
    if result.returncode != 0:
        raise AssertionError(f"skopeo copy {source} {dest} failed: {result.stderr.decode()}")


def _probe(url: str, context: ssl.SSLContext | None) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=5, context=context):
            return True
    except urllib.error.HTTPError as exc:
        return exc.code == 401  # up, and wanting credentials
    except OSError:
        return False


@contextlib.contextmanager
def running_registry(
    workdir: Path, *, tls: bool = False, auth: tuple[str, str] | None = None
) -> Iterator[Registry]:
    """A docker-registry on 127.0.0.1 with its storage and config under ``workdir``."""
    workdir.mkdir(parents=True, exist_ok=True)
    storage = workdir / "storage"
    storage.mkdir(exist_ok=True)
    http: dict[str, object] = {"secret": "composefsd-test", "headers": {}}
    cert_dir: Path | None = None
    context: ssl.SSLContext | None = None
    if tls:
        cert, key = self_signed_cert(workdir / "tls")
        http["tls"] = {"certificate": str(cert), "key": str(key)}
        cert_dir = workdir / "certs.d"
        cert_dir.mkdir(exist_ok=True)
        shutil.copy(cert, cert_dir / "ca.crt")
        context = ssl.create_default_context(cafile=str(cert))
    config: dict[str, object] = {
        "version": 0.1,
        "log": {"level": "error", "accesslog": {"disabled": True}},
        "storage": {"filesystem": {"rootdirectory": str(storage)}, "delete": {"enabled": True}},
        "http": http,
    }
    if auth is not None:
        htpasswd = workdir / "htpasswd"
        htpasswd.write_text(bcrypt_htpasswd(*auth))
        config["auth"] = {"htpasswd": {"realm": "composefsd-test", "path": str(htpasswd)}}
    log = (workdir / "registry.log").open("wb")
    # The port is free when picked; if another process takes it first, the
    # registry exits at once and the next port is tried.
    for _ in range(5):
        port = _free_port()
        http["addr"] = f"127.0.0.1:{port}"
        # JSON is YAML: the registry reads it as its config file.
        (workdir / "config.yml").write_text(json.dumps(config))
        proc = subprocess.Popen(
            [REGISTRY_BIN, "serve", str(workdir / "config.yml")],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
        )
        url = f"{'https' if tls else 'http'}://127.0.0.1:{port}/v2/"
        deadline = time.monotonic() + _READY_BOUND
        while proc.poll() is None and not _probe(url, context):
            if time.monotonic() > deadline:
                proc.kill()
                proc.wait()
                raise AssertionError(f"docker-registry did not answer {url}")
            time.sleep(0.05)
        if proc.poll() is None:
            break
    else:
        log.close()
        raise AssertionError(
            f"docker-registry would not start: {(workdir / 'registry.log').read_text()}"
        )
    registry = Registry(
        f"127.0.0.1:{port}",
        proc,
        storage,
        cert_dir,
        auth[0] if auth else None,
        auth[1] if auth else None,
    )
    try:
        yield registry
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


# --- OCI layouts the tests write themselves -------------------------------------


@dataclass(slots=True)
class Blob:
    digest: str
    size: int
    data: bytes


@dataclass(slots=True)
class LayoutImage:
    """What :func:`write_layout` wrote for one tag."""

    manifest: Blob
    config: Blob
    layers: list[Blob] = field(default_factory=list)


def _digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def layer_tar(files: Sequence[tuple[str, bytes]]) -> bytes:
    """An uncompressed tar of regular files (deterministic: fixed mtimes, owners)."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in files:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mode = 0o644
            info.mtime = 1_700_000_000
            tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


def write_layout(
    layout: Path,
    tags: dict[str, Sequence[Sequence[tuple[str, bytes]] | bytes]],
    *,
    compress: bool = True,
) -> dict[str, LayoutImage]:
    """An OCI image layout with one image per tag, each a list of layers, each a
    list of (path, content) files or a whole tar (bytes); layers gzip-compressed
    unless ``compress`` is False. Returns what each tag's manifest, config and
    layers are."""
    blobs = layout / "blobs" / "sha256"
    blobs.mkdir(parents=True, exist_ok=True)

    def put(data: bytes) -> Blob:
        digest = _digest(data)
        (blobs / digest.split(":")[1]).write_bytes(data)
        return Blob(digest, len(data), data)

    manifests = []
    images: dict[str, LayoutImage] = {}
    for tag, layers in tags.items():
        stored: list[Blob] = []
        diff_ids: list[str] = []
        for files in layers:
            tar = files if isinstance(files, bytes) else layer_tar(files)
            diff_ids.append(_digest(tar))
            stored.append(put(gzip.compress(tar, mtime=0) if compress else tar))
        config = put(
            json.dumps(
                {
                    "architecture": "amd64",
                    "os": "linux",
                    "config": {"Env": [f"TAG={tag}"]},
                    "rootfs": {"type": "layers", "diff_ids": diff_ids},
                },
                sort_keys=True,
            ).encode()
        )
        layer_type = "application/vnd.oci.image.layer.v1.tar" + ("+gzip" if compress else "")
        manifest = put(
            json.dumps(
                {
                    "schemaVersion": 2,
                    "mediaType": "application/vnd.oci.image.manifest.v1+json",
                    "config": {
                        "mediaType": "application/vnd.oci.image.config.v1+json",
                        "digest": config.digest,
                        "size": config.size,
                    },
                    "layers": [
                        {"mediaType": layer_type, "digest": b.digest, "size": b.size}
                        for b in stored
                    ],
                },
                sort_keys=True,
            ).encode()
        )
        manifests.append(
            {
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "digest": manifest.digest,
                "size": manifest.size,
                "annotations": {"org.opencontainers.image.ref.name": tag},
            }
        )
        images[tag] = LayoutImage(manifest, config, stored)
    (layout / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')
    (layout / "index.json").write_text(
        json.dumps({"schemaVersion": 2, "manifests": manifests}, sort_keys=True)
    )
    return images


def add_index(layout: Path, tag: str, platforms: dict[str, str]) -> Blob:
    """Tag in ``layout`` an image index whose instances are the images tagged
    ``platforms[arch]`` (all linux); returns the index blob."""
    index_path = layout / "index.json"
    index = json.loads(index_path.read_text())
    by_tag = {d["annotations"]["org.opencontainers.image.ref.name"]: d for d in index["manifests"]}
    instances = []
    for arch, image_tag in platforms.items():
        desc = {k: v for k, v in by_tag[image_tag].items() if k != "annotations"}
        instances.append({**desc, "platform": {"architecture": arch, "os": "linux"}})
    data = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.index.v1+json",
            "manifests": instances,
        },
        sort_keys=True,
    ).encode()
    blob = Blob(_digest(data), len(data), data)
    (layout / "blobs" / "sha256" / blob.digest.split(":")[1]).write_bytes(data)
    index["manifests"].append(
        {
            "mediaType": "application/vnd.oci.image.index.v1+json",
            "digest": blob.digest,
            "size": blob.size,
            "annotations": {"org.opencontainers.image.ref.name": tag},
        }
    )
    index_path.write_text(json.dumps(index, sort_keys=True))
    return blob


def read_layout(layout: Path, tag: str) -> LayoutImage:
    """The manifest, config and layers of ``tag`` in an existing OCI layout."""
    blobs = layout / "blobs" / "sha256"

    def get(digest: str) -> Blob:
        data = (blobs / digest.split(":")[1]).read_bytes()
        return Blob(digest, len(data), data)

    index = json.loads((layout / "index.json").read_text())
    for desc in index["manifests"]:
        if desc.get("annotations", {}).get("org.opencontainers.image.ref.name") == tag:
            manifest = get(desc["digest"])
            doc = json.loads(manifest.data)
            return LayoutImage(
                manifest, get(doc["config"]["digest"]), [get(d["digest"]) for d in doc["layers"]]
            )
    raise KeyError(tag)


# --- a forwarder that hangs up mid-blob -------------------------------------------


class BlobForwarder(abc.ABC):
    """A TCP forwarder to ``upstream`` on 127.0.0.1 (``host``) that acts once per
    connection on the response to a request naming ``/blobs/<digest>`` for one of
    ``digests``: after ``after`` bytes of it (headers included) it calls
    :meth:`_reached`, which says whether to go on forwarding. Every other byte is
    forwarded as is. Subclasses: :class:`CuttingProxy`, ``holdproxy.HoldingProxy``."""

    def __init__(self, upstream: str, digests: Iterable[str], after: int) -> None:
        host, _, port = upstream.rpartition(":")
        self._upstream = (host, int(port))
        self._needles = {f"/blobs/{d}".encode(): d for d in digests}
        self._after = after
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.host = f"127.0.0.1:{self._listener.getsockname()[1]}"
        self._cond = threading.Condition()
        self._stopping = False
        self._open: list[socket.socket] = []
        self._threads: list[threading.Thread] = []
        self._start(self._accept)

    @abc.abstractmethod
    def _reached(self, client: socket.socket, upstream: socket.socket, digest: str) -> bool:
        """What happens once ``after`` bytes of the response went out; whether to
        go on forwarding it."""

    def _start(self, target: Callable[..., None], *args: object) -> None:
        t = threading.Thread(target=target, args=args, daemon=True)
        t.start()
        self._threads.append(t)

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self._upstream)
            except OSError:
                client.close()
                continue
            with self._cond:
                if self._stopping:
                    client.close()
                    upstream.close()
                    return
                self._open += [client, upstream]
            # The digest a request on this connection asked for, once one did.
            armed: list[str | None] = [None]
            self._start(self._requests, client, upstream, armed)
            self._start(self._responses, client, upstream, armed)

    def _requests(
        self, client: socket.socket, upstream: socket.socket, armed: list[str | None]
    ) -> None:
        longest = max((len(n) for n in self._needles), default=0)
        seen = b""
        while True:
            try:
                data = client.recv(65536)
            except OSError:
                data = b""
            if not data:
                with contextlib.suppress(OSError):
                    upstream.shutdown(socket.SHUT_WR)
                return
            # Kept across reads: a request line may arrive in pieces.
            seen = (seen + data)[-(longest + 65536) :]
            for needle, digest in self._needles.items():
                if needle in seen:
                    armed[0] = digest
            try:
                upstream.sendall(data)
            except OSError:
                return

    def _responses(
        self, client: socket.socket, upstream: socket.socket, armed: list[str | None]
    ) -> None:
        acting: str | None = None
        sent = 0
        while True:
            try:
                data = upstream.recv(65536)
            except OSError:
                data = b""
            if not data:
                with contextlib.suppress(OSError):
                    client.shutdown(socket.SHUT_WR)
                return
            if acting is None and armed[0] is not None:
                acting, sent = armed[0], 0
            if acting is not None and sent >= 0:
                room = self._after - sent
                if len(data) >= room:
                    try:
                        client.sendall(data[:room])
                    except OSError:
                        return
                    if not self._reached(client, upstream, acting):
                        return
                    data = data[room:]
                    sent = -1  # once per connection
                else:
                    sent += len(data)
            try:
                client.sendall(data)
            except OSError:
                return

    def close(self) -> None:
        with self._cond:
            self._stopping = True
            sockets = list(self._open)
            self._cond.notify_all()
        # shutdown wakes the accept and recv calls blocked on these sockets.
        for s in [self._listener, *sockets]:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
        for t in self._threads:
            t.join()
        for s in [self._listener, *sockets]:
            s.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class CuttingProxy(BlobForwarder):
    """Once a client asks for ``/blobs/<digest>``, the response to it is cut after
    ``cut_after`` bytes (headers included) and both connections are closed, or,
    with ``stall``, kept open with nothing more forwarded (a registry that stops
    answering). ``cuts`` counts the connections it cut or stalled; ``stalled`` is
    set at the first stall."""

    def __init__(self, upstream: str, digest: str, cut_after: int, *, stall: bool = False) -> None:
        self.cuts = 0
        self._stall = stall
        self.stalled = threading.Event()
        super().__init__(upstream, [digest], cut_after)

    def _reached(self, client: socket.socket, upstream: socket.socket, digest: str) -> bool:
        with self._cond:
            self.cuts += 1
        if self._stall:
            self.stalled.set()
            return False
        for s in (client, upstream):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
        return False


@contextlib.contextmanager
def vfs_storage(directory: Path) -> Iterator[tuple[str, dict[str, str]]]:
    """A containers-storage of its own below ``directory`` (vfs driver): its
    storage.conf path and an environment for ``skopeo copy`` into it. Removed at
    the end (vfs layers hold read-only directories)."""
    conf = directory / "storage.conf"
    graph = directory / "graph"
    conf.write_text(
        f'[storage]\ndriver = "vfs"\ngraphroot = "{graph}"\nrunroot = "{directory / "run"}"\n'
    )
    try:
        yield str(conf), dict(os.environ, CONTAINERS_STORAGE_CONF=str(conf))
    finally:
        if graph.exists():
            for sub in graph.rglob("*"):
                if sub.is_dir() and not sub.is_symlink():
                    sub.chmod(sub.stat().st_mode | stat.S_IWUSR | stat.S_IXUSR)


def pid_is_reaped(pid: int) -> bool:
    """True if ``pid`` is no child of ours any more (reaped, not a zombie)."""
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        return True
    return False


# --- pytest fixtures (tests/conftest.py imports them) ------------------------------

AUTH = ("composefsd", "s3cret-pässword")


def _require_tools() -> None:
    if not have_registry_tools():
        pytest.fail(
            f"{REGISTRY_BIN}, skopeo and openssl must be installed (run-tests installs them)"
        )


@pytest.fixture(scope="session")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    """A plain-HTTP registry for the session (push under names of your own)."""
    _require_tools()
    with running_registry(tmp_path_factory.mktemp("registry")) as reg:
        yield reg


@pytest.fixture(scope="session")
def tls_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    """A registry behind TLS with a self-signed certificate (``cert_dir`` holds it)."""
    _require_tools()
    with running_registry(tmp_path_factory.mktemp("tls-registry"), tls=True) as reg:
        yield reg


@pytest.fixture(scope="session")
def auth_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    """A plain-HTTP registry that wants basic auth (``user``/``password``: AUTH)."""
    _require_tools()
    with running_registry(tmp_path_factory.mktemp("auth-registry"), auth=AUTH) as reg:
        yield reg


#: The tags of composefs-rs's golden OCI layout (inputs/oci/layout).
GOLDEN_TAGS = ("single", "multi", "shared", "boot", "boot-t1")


@pytest.fixture(scope="session")
def golden_registry(registry: Registry) -> dict[str, str]:
    """composefs-rs's golden OCI layout pushed (digests preserved) to ``registry``
    as ``golden:<tag>``: tag -> ``docker://`` reference."""
    from rsgolden import RS  # here: rsgolden imports conftest, which imports us

    layout = RS / "inputs" / "oci" / "layout"
    return {tag: registry.push(f"oci:{layout}:{tag}", "golden", tag) for tag in GOLDEN_TAGS}
