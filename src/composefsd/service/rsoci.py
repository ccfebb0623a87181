"""The org.composefs.Oci interface of composefs-rs's ``cfsctl varlink`` (0.9): the OCI
images of a repository named by a handle (:mod:`composefsd.service.rshandles`), with
cfsctl's method, parameter and error names, reply shapes and, where its clients
may read them, its messages.

:class:`RsOciInterface` serves all of it. The image methods are here; the layer
transfer methods (GetInfo, HasLayer, GetLayer, PutLayer, FinalizeImage) are
:mod:`composefsd.service.rslayers`'s, called from here. Everything is worked by
the same library code as io.composefs.Oci (:mod:`composefsd.repository.oci`,
``ocibuild``, ``ocipull``); a pull opens its source and is cancelled as
io.composefs.Oci's (:func:`~composefsd.service.ocimethods.open_source`,
:func:`~composefsd.service.ocimethods.run_pull`).

Behaviour beyond the IDL text, as cfsctl has it:

* An image is a tag, or ``@`` and a digest: a manifest digest for Inspect, a
  config digest for ComputeId (which then takes ``verity``, the config stream's
  object, as cfsctl does). A name without ``@`` is always a tag, even one that
  looks like a digest. OciMount also takes a bare ``sha256:`` manifest digest.
* ListImages lists the tags sorted by name (cfsctl: directory order), Check counts
  every tag (two tags of one manifest are two images) and reports cfsctl's
  ``fsck: <kind>: <tag>: ...`` findings beside the repository's fsck.
* Errors cfsctl has no name for are ``InternalError`` with a message; the
  messages a client of cfsctl may match (a missing tag for Untag, an unknown
  reference for ComputeId, a tag missing from an ``oci:`` layout for Pull) are
  cfsctl's.
* Pull streams cfsctl's frames (``message``, ``started``, ``progress``,
  ``skipped``, ``done``; then ``completed`` as the last reply) when called with
  ``more``, else replies once. A pull also builds the image's composefs image
  (io.composefs.Oci's pull does, so OciMount works at once); cfsctl's builds
  none but the boot image of a ``bootable`` pull. ``local_fetch`` and ``storage_root`` name
  composefs-rs's direct read of containers-storage; here containers-storage is
  read through skopeo like every transport, so ``local_fetch`` changes nothing
  and ``storage_root`` is refused (InvalidRequest) for it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any, BinaryIO, Final

from composefsd.image.format import ErofsVersion
from composefsd.image.transforms import XattrFilter
from composefsd.kernel.verity import Algorithm
from composefsd.objectlayout import is_hex_digest
from composefsd.repository import Progress, Repository, ocipull, reader_lock
from composefsd.repository.errors import ImageNotFoundError, RepositoryError
from composefsd.repository.oci import (
    OciError,
    OciImage,
    OciTagError,
    check_tag,
    iter_tags,
    list_images,
    open_stored,
    open_tag,
    tag_image,
    untag_image,
)
from composefsd.repository.ocibuild import compute_config_id, compute_id, ensure_image
from composefsd.repository.ocilayer import layer_content_id
from composefsd.repository.progress import ProgressCallback
from composefsd.repository.store import ObjectStore
from composefsd.repository.streams import StreamError, StreamNotFoundError, existing_stream
from composefsd.service import imageproxy
from composefsd.service.context import CallContext, VarlinkReplyError
from composefsd.service.methods import caller_rights
from composefsd.service.ocimethods import (
    MAX_REFERENCE,
    PullReference,
    open_source,
    parse_reference,
    run_pull,
)
from composefsd.service.rshandles import MountFdsError, RepositoryHandle, rs_errors
from composefsd.service.rslayers import (
    finalize_image,
    get_info,
    get_layer,
    has_layer,
    oci_digest,
    put_layer,
)
from composefsd.service.rsrepository import RsRepositoryInterface, fsck_reply

__all__ = ["INTERFACE", "RsOciInterface", "oci_fsck", "xattr_filter"]

log = logging.getLogger(__name__)

INTERFACE: Final = "org.composefs.Oci"
#: The IDL's xattr modes.
_XATTR_MODES: Final = {
    "AllowlistOnly": XattrFilter.ALLOWLIST_ONLY,
    "KeepUserXattrs": XattrFilter.KEEP_USER_XATTRS,
}
#: ``local_fetch`` values cfsctl knows (any other is ``disabled`` there too).
_LOCAL_FETCH: Final = frozenset({"disabled", "auto", "if-possible", "zerocopy", "zero-copy"})
#: The formats and modes an ``expected_digest`` is looked for in (composefs-rs's
#: ``find_matching_boot_image``: every mode, boot formats V1 and V2).
_BOOT_VERSIONS: Final = (ErofsVersion.V1, ErofsVersion.V2)
#: Seconds between two ``progress`` frames of one layer (its first and last go at once).
_PROGRESS_INTERVAL: Final = 0.25


def _error(name: str, /, **parameters: Any) -> VarlinkReplyError:
    return VarlinkReplyError(f"{INTERFACE}.{name}", parameters)


def _internal(message: str) -> VarlinkReplyError:
    return _error("InternalError", message=message)


def _shown(text: str) -> str:
    """A caller's string for an error reply: bounded, so that a huge one is not echoed."""
    return text if len(text) <= 300 else text[:300] + "..."


def parse_digest(text: str) -> str:
    """``text`` if it is an OCI digest as cfsctl parses one
    (:func:`~composefsd.service.rslayers.oci_digest`); ValueError with oci-spec's
    reason otherwise."""
    oci_digest(text)
    return text


def xattr_filter(mode: str | None) -> XattrFilter:
    """The IDL's xattr mode (None: cfsctl's default, AllowlistOnly)."""
    if mode is None:
        return XattrFilter.ALLOWLIST_ONLY
    found = _XATTR_MODES.get(mode)
    if found is None:
        # The transport checks enum values already; a direct call may not.
        raise VarlinkReplyError("org.varlink.service.InvalidParameter", {"parameter": "xattrs"})
    return found


# -- Check ---------------------------------------------------------------------------------


@dataclass(slots=True)
class OciFsckResult:
    """The OCI half of Check: images (tags) checked and found bad, cfsctl's lines."""

    images_checked: int = 0
    images_corrupted: int = 0
    errors: list[str] = field(default_factory=list)


def _check_image(
    repo: Repository, store: ObjectStore, name: str, digest: str, out: OciFsckResult
) -> None:
    """composefs-rs's ``fsck_single_image`` for the tag ``name`` of manifest ``digest``:
    the manifest and config readable, their digests their JSON's, the config's
    layers named and present. One image counts as corrupted at most once."""
    out.images_checked += 1
    errors: list[str] = []
    try:
        image = open_stored(repo, store, digest)
    except (StreamNotFoundError, StreamError, OciError) as exc:
        errors.append(f"fsck: manifest-read-failed: {name}: {exc}")
        image = None
    if image is not None:
        errors.extend(_image_findings(repo, store, name, image))
    if errors:
        out.images_corrupted += 1
        out.errors.extend(errors)


def _image_findings(repo: Repository, store: ObjectStore, name: str, image: OciImage) -> list[str]:
    found: list[str] = []
    actual = "sha256:" + hashlib.sha256(image.manifest_json).hexdigest()
    if actual != image.manifest_digest:
        return [
            f"fsck: manifest-digest-mismatch: {name}: expected {image.manifest_digest}, "
            f"got {actual}"
        ]
    actual = "sha256:" + hashlib.sha256(image.config_json).hexdigest()
    if actual != image.config_digest:
        return [
            f"fsck: config-digest-mismatch: {name}: expected {image.config_digest}, got {actual}"
        ]
    if image.config is None:
        layers = image.manifest.get("layers")
        for desc in layers if isinstance(layers, list) else []:
            digest = desc.get("digest") if isinstance(desc, dict) else None
            if not isinstance(digest, str):
                continue
            verity = image.layer_refs.get(digest)
            if verity is None:
                found.append(f"fsck: artifact-layer-ref-missing: {name}: {digest}")
            elif not _has_object(store, verity):
                found.append(
                    f"fsck: artifact-layer-object-missing: {name}: {digest}: object {verity} "
                    "does not exist"
                )
        return found
    rootfs = image.config.get("rootfs")
    diff_ids = rootfs.get("diff_ids") if isinstance(rootfs, dict) else None
    for diff_id in diff_ids if isinstance(diff_ids, list) else []:
        if not isinstance(diff_id, str):
            continue
        verity = image.layer_refs.get(diff_id)
        if verity is None:
            found.append(f"fsck: layer-ref-missing: {name}: {diff_id}")
            continue
        try:
            parse_digest(diff_id)
        except ValueError as exc:
            found.append(f"fsck: layer-check-failed: {name}: {diff_id}: Invalid diff_id: {exc}")
            continue
        if existing_stream(repo, layer_content_id(diff_id)) is None:
            found.append(f"fsck: layer-stream-missing: {name}: {diff_id}")
        if not _has_object(store, verity):
            found.append(
                f"fsck: layer-object-missing: {name}: {diff_id}: object {verity} does not exist"
            )
    return found


def _has_object(store: ObjectStore, digest: str) -> bool:
    try:
        return store.contains(digest)
    except (ValueError, OSError, RepositoryError):
        return False


def oci_fsck(
    repo: Repository, image: str | None = None, progress: ProgressCallback | None = None
) -> dict[str, Any]:
    """Check's reply: the repository's fsck, then every tag (or the tag ``image``)."""
    report = repo.fsck(progress=progress)
    out = OciFsckResult()
    with reader_lock(repo.path), repo.object_store() as store:
        if image is None:
            for name, digest in iter_tags(repo):
                _check_image(repo, store, name, digest, out)
        else:
            tagged = _tag_digest(repo, image)
            if tagged is None:
                out.images_checked = out.images_corrupted = 1
                out.errors.append(
                    f"fsck: ref-resolve-failed: {_shown(image)}: OCI reference not found: "
                    f"{_shown(image)}"
                )
            else:
                _check_image(repo, store, image, tagged, out)
    repo_reply = fsck_reply(report)
    return {
        "ok": repo_reply["ok"] and not out.errors,
        "images_checked": out.images_checked,
        "images_corrupted": out.images_corrupted,
        "errors": out.errors,
        "repo": repo_reply,
    }


def _tag_digest(repo: Repository, name: str) -> str | None:
    """The manifest digest the tag ``name`` names, None if there is no such tag."""
    try:
        check_tag(name)
    except OciTagError:
        return None
    return dict(iter_tags(repo)).get(name)


# -- Pull ----------------------------------------------------------------------------------


class _LayerCounter:
    """An image source that notes how many layers its manifest lists (cfsctl's first
    message of a layout import names it)."""

    def __init__(self, inner: ocipull.ImageSource) -> None:
        self.inner = inner
        self.layers: int | None = None

    def fetch_manifest(self) -> tuple[str, bytes]:
        digest, data = self.inner.fetch_manifest()
        try:
            layers = json.loads(data).get("layers")
            self.layers = len(layers) if isinstance(layers, list) else 0
        except (ValueError, AttributeError, RecursionError):
            self.layers = 0  # the pull itself names what is wrong with it
        return digest, data

    def fetch_config(self, digest: str, size: int) -> bytes:
        return self.inner.fetch_config(digest, size)

    def open_blob(self, digest: str, size: int) -> contextlib.AbstractContextManager[BinaryIO]:
        return self.inner.open_blob(digest, size)

    def close(self) -> None:
        self.inner.close()


class _PullFrames:
    """The progress callback of one Pull: our pull's reports as cfsctl's frames."""

    def __init__(self, ctx: CallContext, source: _LayerCounter, layout: bool) -> None:
        self.ctx = ctx
        self.source = source
        self.layout = layout
        self._lock = threading.Lock()
        self._started: set[str] = set()
        self._finished: set[str] = set()
        self._sent: dict[str, float] = {}

    def _send(self, params: dict[str, Any]) -> None:
        self.ctx.progress(params)

    def __call__(self, p: Progress) -> None:
        self.ctx.check_cancelled()
        if not self.ctx.more:
            return
        with self._lock:
            if p.phase == "config":
                if self.layout:
                    count = self.source.layers or 0
                    self._send({"message": f"Importing {count} layers from OCI layout"})
                else:
                    self._send({"message": f"Fetching config {p.detail}"})
            elif p.phase == "skip" and p.detail is not None:
                self._send({"skipped": {"id": p.detail}})
            elif p.phase == "fetch" and p.detail is not None:
                self._fetch(p.detail, p.done, p.total)
            elif p.phase == "manifest":
                self._send(
                    {
                        "message": "Storing manifest"
                        if self.layout
                        else f"Storing manifest {p.detail}"
                    }
                )

    def _fetch(self, layer: str, done: int, total: int | None) -> None:
        if layer in self._finished:
            return
        now = time.monotonic()
        if layer not in self._started:
            self._started.add(layer)
            self._sent[layer] = now
            self._send({"started": {"id": layer, "total": total, "unit": "Bytes"}})
            if total is None or done < total:
                return
        end = total is not None and done >= total
        if end or now - self._sent[layer] >= _PROGRESS_INTERVAL:
            self._sent[layer] = now
            self._send({"progress": {"id": layer, "fetched": done, "total": total}})
        if end:
            self._finished.add(layer)
            self._send({"done": {"id": layer, "transferred": done}})


def _pull_error(exc: Exception, ref: PullReference) -> VarlinkReplyError | None:
    """cfsctl's InternalError for what a pull raised (its text for a tag missing from
    a layout); None for what is not a pull's failure."""
    if isinstance(exc, VarlinkReplyError):
        return None
    if isinstance(exc, ocipull.TagNotFoundError) and ref.transport == "oci:":
        return _internal(
            f"Importing OCI layout from {ref.path}: Resolving manifest for platform: "
            f"Tag '{ref.name}' not found in image index"
        )
    if isinstance(exc, RepositoryError | imageproxy.ImageProxyError | OSError | ValueError):
        return _internal(str(exc))
    return None


@dataclass(frozen=True, slots=True)
class _BootMatch:
    image_id: str
    mode: XattrFilter
    version: ErofsVersion


def _find_boot_image(
    repo: Repository, manifest_digest: str, built: str | None, expected: str
) -> _BootMatch | int:
    """composefs-rs's ``find_matching_boot_image``: the (xattr mode, format) whose
    boot image of the pulled image is ``expected``, or how many were tried. The one
    the pull built (AllowlistOnly, the repository's format) is looked at first; a
    match in another mode of the repository's format is committed like it."""
    tried = 0
    version = ErofsVersion(repo.erofs_version)
    if built is not None:
        if built == expected:
            return _BootMatch(built, XattrFilter.ALLOWLIST_ONLY, version)
        tried += 1
    with reader_lock(repo.path), repo.object_store() as store:
        image = open_stored(repo, store, manifest_digest)
        for mode in _XATTR_MODES.values():
            for boot_version in _BOOT_VERSIONS:
                if built is not None and (mode, boot_version) == (
                    XattrFilter.ALLOWLIST_ONLY,
                    version,
                ):
                    continue
                tried += 1
                found = compute_id(
                    repo, store, image, bootable=True, xattrs=mode, version=boot_version
                )
                if found == expected:
                    match = _BootMatch(found, mode, boot_version)
                    break
            else:
                continue
            break
        else:
            return tried
    if match.version == version and match.mode is not XattrFilter.ALLOWLIST_ONLY:
        ensure_image(repo, manifest_digest, None, bootable=True, xattrs=match.mode)
    return match


# -- the interface -------------------------------------------------------------------------


def _at_digest(image: str) -> str:
    """The digest of an ``@<digest>`` image name; InternalError with cfsctl's message
    if it is not one."""
    try:
        return parse_digest(image[1:])
    except ValueError as exc:
        raise _internal(f"invalid image reference: Invalid OCI digest after '@': {exc}") from None


class RsOciInterface:
    """Implements org.composefs.Oci (module notes) on the repositories of
    org.composefs.Repository's handles (``rs_repository``), whose mounts it shares."""

    #: skopeo's options for every Pull (cfsctl's Pull takes none from its caller:
    #: registries.conf, authentication and certificates are the machine's).
    proxy_options: imageproxy.ProxyOptions = imageproxy.ProxyOptions()

    def __init__(self, rs_repository: RsRepositoryInterface) -> None:
        self.rs_repository = rs_repository
        self.handles = rs_repository.handles

    def _entry(self, handle: int, ctx: CallContext) -> RepositoryHandle:
        return self.handles.get(handle, ctx.peer.uid)

    # -- ListImages -------------------------------------------------------------------------
    def ListImages(
        self, handle: int, filter: str | None, *, _request: CallContext
    ) -> dict[str, Any]:
        with rs_errors(INTERFACE):
            repo = self._entry(handle, _request).repo
            with reader_lock(repo.path):
                images = list_images(repo)
        return {
            "images": [
                image.info(name) for name, image in images if filter is None or filter in name
            ]
        }

    # -- Check ------------------------------------------------------------------------------
    def Check(self, handle: int, image: str | None, *, _request: CallContext) -> dict[str, Any]:
        with rs_errors(INTERFACE):
            repo = self._entry(handle, _request).repo
            return oci_fsck(repo, image, lambda _p: _request.check_cancelled())

    # -- Inspect ----------------------------------------------------------------------------
    def _open_image(self, repo: Repository, image: str) -> OciImage:
        """The image a tag or ``@<manifest digest>`` names; NoSuchImage if none."""
        if image.startswith("@"):
            digest = _at_digest(image)
            missing = digest
        else:
            missing = image
        try:
            with reader_lock(repo.path), repo.object_store() as store:
                if image.startswith("@"):
                    return open_stored(repo, store, digest)
                check_tag(image)
                return open_tag(repo, store, image)
        except (StreamNotFoundError, OciTagError):
            raise _error("NoSuchImage", image=_shown(missing)) from None

    def Inspect(self, handle: int, image: str, *, _request: CallContext) -> dict[str, Any]:
        with rs_errors(INTERFACE):
            repo = self._entry(handle, _request).repo
            found = self._open_image(repo, image)
            try:
                return found.inspect(int(repo.erofs_version))
            except UnicodeDecodeError:
                raise _internal(f"the manifest or config of {_shown(image)} is not UTF-8") from None

    # -- Tag / Untag ------------------------------------------------------------------------
    def Tag(
        self, handle: int, manifest_digest: str, name: str, *, _request: CallContext
    ) -> dict[str, Any]:
        with rs_errors(INTERFACE):
            repo = self._entry(handle, _request).repo
            try:
                parse_digest(manifest_digest)
            except ValueError as exc:
                raise _internal(f"invalid digest: {exc}") from None
            try:
                tag_image(repo, manifest_digest, name)
            except OciTagError as exc:
                raise _internal(str(exc)) from None
            except StreamNotFoundError:
                raise _internal(f"Manifest {manifest_digest} not found") from None
        log.info("tagged %s as %r for pid %d", manifest_digest, name, _request.peer.pid)
        return {}

    def Untag(self, handle: int, name: str, *, _request: CallContext) -> dict[str, Any]:
        with rs_errors(INTERFACE):
            repo = self._entry(handle, _request).repo
            try:
                untag_image(repo, name)
            except (StreamNotFoundError, OciTagError):
                # cfsctl's words for unlinking a tag that is not there.
                raise _internal(
                    f"Failed to remove tag {_shown(name)}: No such file or directory (os error 2)"
                ) from None
        log.info("untagged %r for pid %d", name, _request.peer.pid)
        return {}

    # -- ComputeId --------------------------------------------------------------------------
    def ComputeId(
        self,
        handle: int,
        image: str,
        verity: str | None,
        bootable: bool,
        xattrs: str | None,
        *,
        _request: CallContext,
    ) -> dict[str, Any]:
        mode = xattr_filter(xattrs)
        with rs_errors(INTERFACE):
            repo = self._entry(handle, _request).repo
            if image.startswith("@"):
                digest = _at_digest(image)
                if verity is not None and not is_hex_digest(
                    verity, Algorithm.parse(repo.hash_name)
                ):
                    raise _internal(f"invalid verity: not a {repo.hash_name} digest")
                with reader_lock(repo.path), repo.object_store() as store:
                    try:
                        image_id = compute_config_id(
                            repo, store, digest, verity, bootable=bootable, xattrs=mode
                        )
                    except StreamNotFoundError:
                        raise _internal(f"OCI config not found: {digest}") from None
            else:
                with reader_lock(repo.path), repo.object_store() as store:
                    try:
                        check_tag(image)
                        found = open_tag(repo, store, image)
                    except (StreamNotFoundError, OciTagError):
                        raise _internal(f"OCI reference not found: {_shown(image)}") from None
                    image_id = compute_id(repo, store, found, bootable=bootable, xattrs=mode)
        return {"image_id": image_id}

    # -- OciMount ---------------------------------------------------------------------------
    def OciMount(
        self,
        handle: int,
        image: str,
        bootable: bool,
        options: dict[str, Any],
        *,
        _request: CallContext,
    ) -> dict[str, Any]:
        ctx = _request
        with rs_errors(INTERFACE):
            entry = self._entry(handle, ctx)
            repo = entry.repo
            by_digest = image.startswith(("@", "sha256:"))
            digest = image.removeprefix("@")
            try:
                with reader_lock(repo.path), repo.object_store() as store:
                    if by_digest:
                        parse_digest(digest)
                        found = open_stored(repo, store, digest)
                    else:
                        check_tag(image)
                        found = open_tag(repo, store, image)
            except (StreamNotFoundError, OciTagError, ValueError):
                what = (
                    f"OCI image not found: {digest}"
                    if by_digest
                    else (f"OCI reference not found: {image}")
                )
                raise _error("NoSuchImage", image=_shown(f"{image}: {what}")) from None
            version = int(repo.erofs_version)
            image_id = found.boot_erofs_image(version) if bootable else found.erofs_image(version)
            if image_id is None:
                raise _internal(
                    "No boot EROFS image linked" if bootable else "No composefs EROFS image linked"
                )
            try:
                index = self.rs_repository.mount_handle(entry, image_id, options, ctx)
            except MountFdsError as exc:
                raise _internal(str(exc)) from None
            except ImageNotFoundError as exc:
                raise _internal(f"Mounting image {image_id}: {exc}") from None
        return {"fd_index": index}

    # -- layer transfer: service/rslayers.py -------------------------------------------------
    def GetInfo(self, *, _request: CallContext) -> dict[str, Any]:
        return get_info(self.handles, _request)

    def HasLayer(self, handle: int, diff_id: str, *, _request: CallContext) -> dict[str, Any]:
        return has_layer(self.handles, _request, handle, diff_id)

    def GetLayer(
        self, handle: int, params: dict[str, Any], *, _request: CallContext
    ) -> dict[str, Any]:
        return get_layer(self.handles, _request, handle, params)

    def PutLayer(
        self, handle: int, diff_id: str, zerocopy: bool, *, _request: CallContext
    ) -> dict[str, Any]:
        return put_layer(self.handles, _request, handle, diff_id, zerocopy)

    def FinalizeImage(
        self,
        handle: int,
        manifest_json: str,
        config_json: str,
        layers: list[dict[str, Any]],
        name: str | None,
        *,
        _request: CallContext,
    ) -> dict[str, Any]:
        return finalize_image(
            self.handles, _request, handle, manifest_json, config_json, layers, name
        )

    # -- Pull -------------------------------------------------------------------------------
    def Pull(
        self,
        handle: int,
        image: str,
        name: str | None,
        local_fetch: str,
        storage_root: str | None,
        bootable: bool,
        xattrs: str | None,
        expected_digest: str | None,
        *,
        _request: CallContext,
    ) -> dict[str, Any]:
        ctx = _request
        mode = xattr_filter(xattrs)
        with rs_errors(INTERFACE):
            entry = self._entry(handle, ctx)
            repo = entry.repo
            if expected_digest is not None and not bootable:
                raise _error("InvalidRequest", message="expected_digest requires bootable")
            if expected_digest is not None and xattrs is not None:
                raise _error(
                    "InvalidRequest",
                    message="expected_digest and xattrs are mutually exclusive: "
                    "expected_digest searches every mode",
                )
            if expected_digest is not None and not is_hex_digest(
                expected_digest, Algorithm.parse(repo.hash_name)
            ):
                raise _error(
                    "InvalidDigest",
                    message=f"invalid expected_digest: not a {repo.hash_name} digest",
                )
            if len(local_fetch) > MAX_REFERENCE or local_fetch not in _LOCAL_FETCH:
                # cfsctl takes an unknown value as "disabled"; so do we.
                local_fetch = "disabled"
            ref = parse_reference(image)
            if storage_root is not None:
                if (
                    not storage_root.startswith("/")
                    or "\0" in storage_root
                    or len(storage_root) > MAX_REFERENCE
                ):
                    raise _error("InvalidRequest", message="storage_root must be an absolute path")
                if ref.transport == "containers-storage:" and local_fetch != "disabled":
                    raise _error(
                        "InvalidRequest",
                        message="storage_root: containers-storage is read through skopeo "
                        "here, from its configured storage",
                    )
            if name is not None:
                try:
                    check_tag(name)
                except OciTagError as exc:
                    raise _internal(str(exc)) from None
            result = self._pull(ctx, repo, ref, name, bootable, mode)
            completed: dict[str, Any] = {
                "manifest_digest": result.manifest_digest,
                "config_digest": result.config_digest,
                "manifest_verity": result.manifest_verity,
                "config_verity": result.config_verity,
                "stats": str(result.stats),
                "boot_image": None,
                "boot_image_mode": None,
                "boot_image_format_version": None,
            }
            if bootable:
                boot_id, boot_mode = result.boot_image_id, mode
                version = ErofsVersion(repo.erofs_version)
                if expected_digest is not None:
                    match = _find_boot_image(
                        repo, result.manifest_digest, result.boot_image_id, expected_digest
                    )
                    if isinstance(match, int):
                        raise _error("BootImageMismatch", expected=expected_digest, tried=match)
                    boot_id, boot_mode, version = match.image_id, match.mode, match.version
                completed["boot_image"] = boot_id
                completed["boot_image_mode"] = boot_mode.value
                completed["boot_image_format_version"] = version.name
        log.info(
            "pulled %s as %s%s into %s for pid %d",
            _shown(image),
            result.manifest_digest,
            f" (tag {name!r})" if name is not None else "",
            repo.path,
            ctx.peer.pid,
        )
        return {"completed": completed}

    def _pull(
        self,
        ctx: CallContext,
        repo: Repository,
        ref: PullReference,
        name: str | None,
        bootable: bool,
        mode: XattrFilter,
    ) -> ocipull.PullResult:
        try:
            source = open_source(ref, self.proxy_options, caller_rights(ctx.peer))
            counted = _LayerCounter(source)
            frames = _PullFrames(ctx, counted, ref.transport == "oci:")
            return run_pull(
                ctx,
                ref,
                source,
                lambda _source: ocipull.pull(
                    repo, counted, tag=name, bootable=bootable, xattrs=mode, progress=frames
                ),
            )
        except Exception as exc:
            mapped = _pull_error(exc, ref)
            if mapped is None:
                raise
            raise mapped from exc
