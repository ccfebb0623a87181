"""The io.composefs.Oci interface: OCI images of the repository, as composefs-rs
stores them (:mod:`composefsd.repository.oci`), over Varlink.

:class:`OciInterface` is registered with ``varlink.Service`` beside
:class:`~composefsd.service.methods.RepositoryInterface` and called by the
transport the same way (IDL input fields positionally, the
:class:`~composefsd.service.context.CallContext` as ``_request``). Every library
error becomes one of the interface's errors (:func:`oci_reply_error`), or, for
what is not about OCI images (a mount that fails, a read-only repository), the
error io.composefs.Repository gives for it.

Behaviour beyond the IDL text:

* An image is named by a tag or by ``@`` and its manifest digest
  (:func:`parse_image_name`); a tag is checked by
  :func:`~composefsd.repository.oci.check_tag` before anything is opened.
* **Mount** resolves the image to the composefs image its config names for the
  repository's format and hands the rest to io.composefs.Repository's Mount, so
  both mount exactly alike (verity policy, idmaps, detached fds, pins).
* **Tag** and **Untag** hold the repository's writer lock, so a garbage
  collection never sees half of one; the reads hold the reader lock.
* **Pull** checks the reference (:func:`parse_reference`), the tag and the
  options before anything is read or started, then reads the image with the
  caller's rights (:func:`~composefsd.service.methods.caller_rights`): an
  ``oci:`` layout in-process (:class:`~composefsd.repository.ocilayout.OciLayoutSource`)
  for a caller with composefsd's own rights, everything else through skopeo's
  proxies run as the caller (:class:`~composefsd.service.imageproxy.ImageProxyPool`),
  and hands it to :func:`~composefsd.repository.ocipull.pull`. Progress reports
  become ``{"progress": {phase, done, total, layer}}`` replies, each layer's
  first and last report always sent. A cancelled call (the client gone, the
  daemon stopping) closes the proxies under the transfer, so that a registry
  that stalls mid-blob cannot hold the call. ``credentials`` go to skopeo only:
  they are scrubbed from every error message and never logged
  (:func:`pull_reply_error`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Callable, Hashable, Iterator
from dataclasses import dataclass
from typing import Any

from composefsd.credentials import Credentials
from composefsd.kernel.verity import Algorithm
from composefsd.objectlayout import is_hex_digest
from composefsd.repository import Progress, Repository, ocipull, reader_lock
from composefsd.repository.oci import (
    OciError,
    OciImage,
    OciTagError,
    check_tag,
    list_images,
    open_stored,
    open_tag,
    tag_image,
    untag_image,
)
from composefsd.repository.ocibuild import OciBuildError
from composefsd.repository.ocilayer import LayerDigestError, TarFormatError
from composefsd.repository.ocilayout import OciLayoutSource, parse_layout_ref
from composefsd.repository.streams import StreamError, StreamNotFoundError
from composefsd.service import imageproxy
from composefsd.service.context import CallContext, VarlinkReplyError
from composefsd.service.methods import (
    RepositoryInterface,
    caller_rights,
    mapped_errors,
    reply_error,
)

__all__ = [
    "INTERFACE",
    "MAX_REFERENCE",
    "OciInterface",
    "PullReference",
    "image_summary",
    "oci_reply_error",
    "open_source",
    "parse_image_name",
    "parse_reference",
    "pull_reply_error",
    "run_pull",
]

log = logging.getLogger(__name__)

INTERFACE = "io.composefs.Oci"
_INVALID_PARAMETER = "org.varlink.service.InvalidParameter"
#: The OCI digest algorithms a manifest digest may use, with their hex lengths.
_DIGEST_ALGORITHMS = {"sha256": Algorithm.SHA256, "sha512": Algorithm.SHA512}
#: Longest reference, path or credentials Pull takes (PATH_MAX).
MAX_REFERENCE = 4096
_TRANSPORTS = ("docker://", "oci:", "oci-archive:", "docker-archive:", "containers-storage:")
#: Seconds between two looks at whether a pull was cancelled.
_CANCEL_POLL = 0.2
#: Transports whose reference is ``PATH[:NAME]``.
_FILE_TRANSPORTS = ("oci:", "oci-archive:", "docker-archive:")


def _error(error: str, /, **parameters: Any) -> VarlinkReplyError:
    return VarlinkReplyError(f"{INTERFACE}.{error}", parameters)


def _invalid(parameter: str) -> VarlinkReplyError:
    return VarlinkReplyError(_INVALID_PARAMETER, {"parameter": parameter})


def _shown(name: str) -> str:
    """A caller's name for an error reply: bounded, so that a huge one is not echoed."""
    return name if len(name) <= 300 else name[:300] + "..."


def parse_image_name(name: str) -> tuple[str | None, str | None]:
    """``(tag, None)`` or ``(None, manifest digest)`` for an image name: a tag, or
    ``@<algorithm>:<hex>`` as cfsctl takes a manifest digest. InvalidTag (or
    ImageNotFound for a malformed digest) if it can be neither."""
    if name.startswith("@"):
        digest = name[1:]
        algorithm, colon, hexed = digest.partition(":")
        alg = _DIGEST_ALGORITHMS.get(algorithm)
        if not colon or alg is None or not is_hex_digest(hexed, alg):
            raise _error(
                "ImageNotFound",
                image=_shown(name),
                message="not a manifest digest (@sha256:<64 hex digits>)",
            )
        return None, digest
    try:
        return check_tag(name), None
    except OciTagError as exc:
        raise _error("InvalidTag", tag=_shown(name), message=str(exc)) from None


@dataclass(frozen=True, slots=True)
class PullReference:
    """A reference Pull accepts (:func:`parse_reference`)."""

    text: str
    #: ``"docker://"``, ``"oci:"``, ...
    transport: str
    #: File transports: the absolute path, and the tag or reference after it.
    path: str | None = None
    name: str | None = None


def parse_reference(reference: str) -> PullReference:
    """``reference`` checked before anything is opened or started: a supported
    transport, at most :data:`MAX_REFERENCE` bytes, no control characters; a file
    transport's path absolute (the daemon's working directory means nothing to the
    caller) and without ``..`` components; a registry reference without ``..``
    components or blanks. InvalidReference if not."""

    def bad(why: str) -> VarlinkReplyError:
        return _error("InvalidReference", reference=_shown(reference), message=why)

    if len(reference.encode("utf-8", "surrogatepass")) > MAX_REFERENCE:
        raise bad(f"longer than {MAX_REFERENCE} bytes")
    if any(ord(c) < 0x20 or 0x7F <= ord(c) <= 0x9F for c in reference):
        raise bad("it has control characters")
    transport = next((t for t in _TRANSPORTS if reference.startswith(t)), None)
    if transport is None:
        raise bad(f"no supported transport ({', '.join(_TRANSPORTS)})")
    rest = reference[len(transport) :]
    if not rest:
        raise bad(f"nothing after {transport!r}")
    if transport in _FILE_TRANSPORTS:
        path, name = parse_layout_ref(rest)
        if not path.startswith("/"):
            raise bad("the path must be absolute")
        if ".." in path.split("/"):
            raise bad("the path has '..' components")
        return PullReference(reference, transport, os.path.normpath(path), name)
    if any(c.isspace() for c in rest) or ".." in rest.split("/"):
        raise bad("not a valid image name")
    return PullReference(reference, transport)


def oci_reply_error(exc: BaseException, *, image: str | None = None) -> VarlinkReplyError | None:
    """The interface error for a library exception; io.composefs.Repository's
    (:func:`~composefsd.service.methods.reply_error`) for one that is not about OCI
    images; None for anything else."""
    shown = _shown(image) if image is not None else ""
    if isinstance(exc, VarlinkReplyError):
        return exc
    if isinstance(exc, OciTagError):
        return _error("InvalidTag", tag=shown, message=str(exc))
    if isinstance(exc, StreamNotFoundError):
        return _error("ImageNotFound", image=shown)
    if isinstance(exc, OciError | StreamError):
        return _error("ImageCorrupt", image=shown, message=str(exc))
    return reply_error(exc)


@contextlib.contextmanager
def _mapped(*, image: str | None = None) -> Iterator[None]:
    with mapped_errors(lambda exc: oci_reply_error(exc, image=image)):
        yield


def _scrubbed(text: str, secret: str | None) -> str:
    """``text`` without the credentials (or their password) in it, whoever wrote it."""
    if secret:
        for part in (secret, secret.partition(":")[2]):
            if part:
                text = text.replace(part, "***")
    return text


def pull_reply_error(exc: BaseException, *, secret: str | None = None) -> VarlinkReplyError | None:
    """The interface error for what a pull raised (the image proxy's, the fetch's,
    the layer import's, the build's), its message scrubbed of ``secret``;
    :func:`oci_reply_error` for the rest."""
    if isinstance(exc, VarlinkReplyError):
        return exc
    message = _scrubbed(str(exc), secret)

    def failed(reason: str, layer: str | None = None) -> VarlinkReplyError:
        params: dict[str, Any] = {"reason": reason, "message": message}
        if layer is not None:
            params["layer"] = layer
        return _error("PullFailed", **params)

    if isinstance(exc, imageproxy.ProxyAuthError | imageproxy.ImageAccessDeniedError):
        return _error("AuthenticationFailed", message=message)
    if isinstance(
        exc,
        imageproxy.ProxyTLSError | imageproxy.ProxyDiedError | imageproxy.BlobTransferError,
    ):
        return _error("RegistryUnavailable", message=message)
    if isinstance(exc, ocipull.BlobTransferError):
        return _error("RegistryUnavailable", message=message)
    if isinstance(exc, imageproxy.DigestMismatchError | LayerDigestError):
        return _error("DigestMismatch", message=message)
    if isinstance(exc, ocipull.BlobDigestError):
        return (
            _error("DigestMismatch", layer=exc.layer, message=message)
            if exc.layer is not None
            else _error("DigestMismatch", message=message)
        )
    if isinstance(exc, imageproxy.PlatformNotFoundError | ocipull.PlatformError):
        return failed("platform")
    if isinstance(exc, imageproxy.ImageNotFoundError | ocipull.TagNotFoundError):
        return failed("not-found")
    if isinstance(exc, imageproxy.ProxyOptionsError):
        return failed("options")
    if isinstance(exc, imageproxy.ProxyStartError):
        return failed("skopeo")
    if isinstance(exc, imageproxy.ContentTooLargeError | ocipull.ManifestFormatError):
        return failed("invalid-image")
    if isinstance(exc, ocipull.LayerFormatError | TarFormatError):
        return failed("invalid-layer")
    if isinstance(exc, ocipull.LayoutError):
        return failed("source")
    if isinstance(exc, imageproxy.ImageProxyError):
        return failed("source")
    if isinstance(exc, OciBuildError):
        return failed("build")
    if isinstance(exc, ocipull.OciPullError):
        return failed("pull")
    return oci_reply_error(exc)


@contextlib.contextmanager
def _pull_mapped(secret: str | None) -> Iterator[None]:
    # Not chained: a traceback of the cause could show the secret.
    with mapped_errors(
        lambda exc: pull_reply_error(exc, secret=secret),
        shown=lambda exc: "pull failed: " + _scrubbed(str(exc), secret),
        chain=False,
    ):
        yield


#: Pull phases whose reports name a layer (the report's detail is its diff_id).
_LAYER_PHASES = frozenset({"fetch", "skip"})


def _pull_params(p: Progress) -> dict[str, Any]:
    inner: dict[str, Any] = {"phase": p.phase, "done": p.done}
    if p.total is not None:
        inner["total"] = p.total
    if p.phase in _LAYER_PHASES and p.detail is not None:
        inner["layer"] = p.detail
    return {"progress": inner}


def _pull_key(p: Progress) -> Hashable:
    """A report goes out at once when it is of another phase or layer, or the last
    of a layer (its bar reaches the end); others once per interval."""
    return (p.phase, p.detail, p.total is not None and p.done >= p.total)


def _diff_ids(image: OciImage) -> list[str]:
    """The layers in order: the config's diff_ids, or an artifact's layer digests."""
    rootfs = (image.config or {}).get("rootfs")
    ids = rootfs.get("diff_ids") if isinstance(rootfs, dict) else None
    if isinstance(ids, list) and all(isinstance(i, str) for i in ids):
        return list(ids)
    return [d for d, _size in _layer_blobs(image) if d]


def _layer_blobs(image: OciImage) -> list[tuple[str, int]]:
    """The manifest's layer descriptors as (digest, size); what is malformed counts 0."""
    layers = image.manifest.get("layers")
    out: list[tuple[str, int]] = []
    for d in layers if isinstance(layers, list) else []:
        if not isinstance(d, dict):
            continue
        digest, size = d.get("digest"), d.get("size")
        out.append(
            (
                digest if isinstance(digest, str) else "",
                size if isinstance(size, int) and not isinstance(size, bool) and size > 0 else 0,
            )
        )
    return out


def image_summary(tag: str, image: OciImage, erofs_version: int) -> dict[str, Any]:
    """ListImages' entry for ``image`` under ``tag``."""
    out: dict[str, Any] = {
        "tag": tag,
        "manifestDigest": image.manifest_digest,
        "configDigest": image.config_digest,
        "architecture": image.architecture,
        "os": image.os,
        "layers": _diff_ids(image),
        "size": sum(size for _d, size in _layer_blobs(image)),
    }
    image_id = image.erofs_image(erofs_version)
    if image_id is not None:
        out["imageId"] = image_id
    if image.created is not None:
        out["created"] = image.created
    return out


@contextlib.contextmanager
def _closing_when_cancelled(
    ctx: CallContext, source: imageproxy.ImageProxyPool | None
) -> Iterator[None]:
    """Close ``source`` from another thread as soon as the call is cancelled (the
    client left, or the daemon stops): a registry that stops answering mid-blob
    sends no progress, so the pull would otherwise hang until skopeo gives up. A
    closed proxy fails the transfer under way at once; the pull then stops where
    it stands, leaving at most objects for GC and no tag."""
    if source is None:
        yield
        return
    done = threading.Event()

    def watch() -> None:
        while not done.wait(_CANCEL_POLL):
            if ctx.cancelled.is_set():
                log.debug("%s cancelled: closing its image source", ctx.method)
                source.close()
                return

    watcher = threading.Thread(target=watch, name=f"cancel {ctx.method}", daemon=True)
    watcher.start()
    try:
        yield
    finally:
        done.set()
        watcher.join()


def open_source(
    ref: PullReference,
    options: imageproxy.ProxyOptions,
    rights: Credentials | None,
) -> ocipull.ImageSource:
    """Where a pull reads ``ref`` from: an ``oci:`` layout in-process for a caller
    with composefsd's own rights (``rights`` None: read beneath its fd here),
    everything else through skopeo's proxies run with the caller's rights."""
    if ref.transport == "oci:" and rights is None:
        assert ref.path is not None
        return OciLayoutSource.open(ref.path, ref.name)
    # Several proxies, so that layers are fetched several at a time.
    return imageproxy.ImageProxyPool(ref.text, options, creds=rights)


def run_pull(
    ctx: CallContext,
    ref: PullReference,
    source: ocipull.ImageSource,
    pull: Callable[[ocipull.ImageSource], ocipull.PullResult],
) -> ocipull.PullResult:
    """``pull(source)`` of ``ref`` for the call ``ctx``, ``source`` closed afterwards: a
    cancelled call (the client gone, the daemon stopping) closes skopeo's proxies
    under the transfer (:func:`_closing_when_cancelled`) and ends in CallCancelled."""
    try:
        # Only skopeo's proxies are closed under a transfer (they are made
        # for it); a layout's fds are not, whose numbers could be reused.
        pool = source if isinstance(source, imageproxy.ImageProxyPool) else None
        with _closing_when_cancelled(ctx, pool):
            return pull(source)
    except Exception:
        if not ctx.cancelled.is_set():
            raise
        # The source was closed under the pull: that is why it failed.
        log.info("pull of %s cancelled for pid %d", _shown(ref.text), ctx.peer.pid)
        ctx.check_cancelled()
        raise
    finally:
        source.close()


def _path_option(value: str | None, field_name: str) -> str | None:
    """An absolute path Pull passes to skopeo (read there with the caller's rights)."""
    if value is None:
        return None
    if not value.startswith("/") or len(value) > MAX_REFERENCE or "\0" in value:
        raise _invalid(field_name)
    return value


class OciInterface:
    """Implements io.composefs.Oci on the repository ``repository`` serves (module notes)."""

    def __init__(self, repository: RepositoryInterface) -> None:
        self.repository = repository

    @property
    def repo(self) -> Repository:
        return self.repository.repo

    def _open(self, name: str) -> OciImage:
        """The image ``name`` (a tag or ``@digest``) names; library errors raised."""
        tag, digest = parse_image_name(name)
        repo = self.repo
        with reader_lock(repo.path), repo.object_store() as store:
            if tag is not None:
                return open_tag(repo, store, tag)
            assert digest is not None
            return open_stored(repo, store, digest)

    # -- Pull -------------------------------------------------------------------------------
    def Pull(
        self,
        reference: str,
        tag: str | None,
        bootable: bool | None,
        auth_file: str | None,
        cert_directory: str | None,
        tls_verify: bool | None,
        credentials: str | None,
        # allowInteractiveAuthentication: read by the polkit check before the call
        # (composefsd.service.polkit), not here.
        allow_interactive_authentication: bool | None = None,
        *,
        _request: CallContext,
    ) -> dict[str, Any]:
        ctx = _request
        ref = parse_reference(reference)
        if tag is not None:
            try:
                check_tag(tag)
            except OciTagError as exc:
                raise _error("InvalidTag", tag=_shown(tag), message=str(exc)) from None
        auth_file = _path_option(auth_file, "authFile")
        cert_directory = _path_option(cert_directory, "certDirectory")
        if credentials is not None:
            user, colon, _password = credentials.partition(":")
            if (
                not colon
                or not user
                or len(credentials) > MAX_REFERENCE
                or ref.transport != "docker://"
            ):
                raise _invalid("credentials")
        options = imageproxy.ProxyOptions(
            authfile=auth_file, cert_dir=cert_directory, tls_verify=tls_verify, creds=credentials
        )
        repo = self.repo
        with (
            self.repository._reporter(ctx, _pull_params, _pull_key) as report,
            _pull_mapped(credentials),
        ):
            source = open_source(ref, options, caller_rights(ctx.peer))
            result = run_pull(
                ctx,
                ref,
                source,
                lambda src: ocipull.pull(
                    repo, src, tag=tag, bootable=bool(bootable), progress=report
                ),
            )
        log.info(
            "pulled %s as %s%s for pid %d: image %s",
            _shown(reference),
            result.manifest_digest,
            f" (tag {tag!r})" if tag is not None else "",
            ctx.peer.pid,
            result.image_id,
        )
        out: dict[str, Any] = {
            "manifestDigest": result.manifest_digest,
            "configDigest": result.config_digest,
            "layers": [
                {"diffId": layer.diff_id, "size": layer.size, "skipped": layer.skipped}
                for layer in result.layers
            ],
        }
        if result.image_id is not None:
            out["imageId"] = result.image_id
        if result.boot_image_id is not None:
            out["bootImageId"] = result.boot_image_id
        return out

    # -- ListImages -------------------------------------------------------------------------
    def ListImages(self, *, _request: CallContext) -> dict[str, Any]:
        repo = self.repo
        with _mapped(), reader_lock(repo.path):
            images = list_images(repo)
        version = int(repo.erofs_version)
        return {"images": [image_summary(tag, image, version) for tag, image in images]}

    # -- Inspect ----------------------------------------------------------------------------
    def Inspect(self, image: str, *, _request: CallContext) -> dict[str, Any]:
        with _mapped(image=image):
            found = self._open(image)
        out: dict[str, Any] = {
            "manifest": found.manifest,
            "manifestDigest": found.manifest_digest,
            "configDigest": found.config_digest,
            "images": found.images,
        }
        if found.config is not None:
            out["config"] = found.config
        image_id = found.erofs_image(int(self.repo.erofs_version))
        if image_id is not None:
            out["imageId"] = image_id
        return out

    # -- Tag / Untag ------------------------------------------------------------------------
    def Tag(
        self,
        image: str,
        tag: str,
        # allowInteractiveAuthentication: read by the polkit check before the call
        # (composefsd.service.polkit), not here.
        allow_interactive_authentication: bool | None = None,
        *,
        _request: CallContext,
    ) -> dict[str, Any]:
        try:
            check_tag(tag)
        except OciTagError as exc:
            raise _error("InvalidTag", tag=_shown(tag), message=str(exc)) from None
        repo = self.repo
        with _mapped(image=image):
            found = self._open(image)
            tag_image(repo, found.manifest_digest, tag)
        log.info("tagged %s as %r for pid %d", found.manifest_digest, tag, _request.peer.pid)
        return {"manifestDigest": found.manifest_digest}

    def Untag(
        self,
        tag: str,
        # allowInteractiveAuthentication: read by the polkit check before the call
        # (composefsd.service.polkit), not here.
        allow_interactive_authentication: bool | None = None,
        *,
        _request: CallContext,
    ) -> dict[str, Any]:
        try:
            check_tag(tag)
        except OciTagError as exc:
            raise _error("InvalidTag", tag=_shown(tag), message=str(exc)) from None
        repo = self.repo
        with _mapped(image=tag):
            digest = untag_image(repo, tag)
        log.info("untagged %r (%s) for pid %d", tag, digest, _request.peer.pid)
        return {"manifestDigest": digest}

    # -- Mount ------------------------------------------------------------------------------
    def Mount(
        self,
        image: str,
        bootable: bool | None,
        verity: str | None,
        read_only: bool | None,
        upper_path: str | None,
        upper_fd_index: int | None,
        work_path: str | None,
        work_fd_index: int | None,
        userns_fd_index: int | None,
        uid_map: list[dict[str, Any]] | None,
        gid_map: list[dict[str, Any]] | None,
        where: str | None,
        # allowInteractiveAuthentication: read by the polkit check before the call
        # (composefsd.service.polkit), not here.
        allow_interactive_authentication: bool | None = None,
        *,
        _request: CallContext,
    ) -> dict[str, Any]:
        version = int(self.repo.erofs_version)
        with _mapped(image=image):
            found = self._open(image)
        if bootable:
            image_id = found.boot_erofs_image(version)
            missing = "has no bootable composefs image (pull it with bootable)"
        else:
            image_id = found.erofs_image(version)
            missing = f"has no composefs image in format V{version}"
        if image_id is None:
            raise _error("ImageNotFound", image=_shown(image), message=f"{image!r} {missing}")
        # The id is the image's digest, checked again by the mount itself: a
        # config naming another repository's id finds nothing here.
        return self.repository.Mount(
            image_id,
            image_id,
            verity,
            read_only,
            upper_path,
            upper_fd_index,
            work_path,
            work_fd_index,
            userns_fd_index,
            uid_map,
            gid_map,
            where,
            _request=_request,
        )
