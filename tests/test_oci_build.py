"""OCI images built into composefs images (composefsd.repository.ocibuild) against
cfsctl's golden ids, dumps, config streams and listings."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from composefsd.image.dump_print import format_rs_dump
from composefsd.image.escape import escape_equal, escape_lone_dash
from composefsd.image.formats import ErofsVersion
from composefsd.image.ocitar import EntryKind, TarEntry, entry_node, iter_entries
from composefsd.image.transforms import XattrFilter
from composefsd.repository import Repository
from composefsd.repository.fsck import fsck
from composefsd.repository.oci import (
    BOOT_IMAGE_REF_KEY_V1,
    IMAGE_REF_KEY,
    IMAGE_REF_KEY_V1,
    iter_tags,
    open_tag,
    write_config_stream,
    write_manifest_stream,
)
from composefsd.repository.ocibuild import (
    OciBuildError,
    compute_id,
    ensure_image,
    image_transform,
    transformed_tree,
)
from composefsd.repository.ocilayer import import_layer
from composefsd.repository.streams import existing_stream, read_stream, use_chunks
from composefsd.splitstream import Chunk, read_refs
from rsgolden import ALGORITHMS, EXPECTED, RS, listing, read_json, unpack_repo
from test_oci_write import IMAGES, SAME_ZSTD, _blob, _import_time, _repo

OCI = EXPECTED / "oci"


def _oci_commands(algorithm: str) -> list[dict[str, Any]]:
    """What cfsctl printed for the native ``oci:`` pulls into a fresh repository."""
    runs: list[dict[str, Any]] = read_json(f"expected/oci/{algorithm}/commands.json")
    return runs


def _variant(args: list[str]) -> dict[str, Any]:
    kw: dict[str, Any] = {}
    if "--bootable" in args:
        kw["bootable"] = True
    if "keep-user-xattrs" in args:
        kw["xattrs"] = XattrFilter.KEEP_USER_XATTRS
    return kw


def _runs(algorithm: str, verb: str) -> list[tuple[list[str], dict[str, Any]]]:
    """``cfsctl oci <verb> [flags] TAG`` runs that succeeded: (args, run)."""
    out = []
    for run in _oci_commands(algorithm):
        cmd = run["command"]
        marker = f" oci {verb} "
        if marker in cmd and run["exit"] == 0 and "@" not in cmd:
            out.append((cmd.split(marker, 1)[1].split(), run))
    return out


@pytest.fixture(scope="module", params=ALGORITHMS)
def golden(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> tuple[str, Repository]:
    algorithm: str = request.param
    return algorithm, Repository.open(unpack_repo(algorithm, tmp_path_factory.mktemp("repo")))


def test_compute_id_is_cfsctls(golden: tuple[str, Repository]) -> None:
    algorithm, repo = golden
    runs = _runs(algorithm, "compute-id")
    assert len(runs) == 12  # 5 default, 5 keep-user-xattrs, 2 bootable
    with repo.object_store() as store:
        for args, run in runs:
            image = open_tag(repo, store, args[-1])
            assert compute_id(repo, store, image, **_variant(args)) == run["stdout"].strip(), args


def test_dump_is_cfsctls(golden: tuple[str, Repository]) -> None:
    algorithm, repo = golden
    runs = _runs(algorithm, "dump")
    assert len(runs) == 12  # 5 default, 5 keep-user-xattrs, 2 bootable
    with repo.object_store() as store:
        for args, run in runs:
            image = open_tag(repo, store, args[-1])
            root = transformed_tree(repo, store, image, image_transform(**_variant(args)))
            expected = Path(run["stdout_file"].replace("$OUTDIR", str(RS))).read_bytes()
            assert format_rs_dump(root) == expected, args


def test_failing_transform_is_typed(golden: tuple[str, Repository]) -> None:
    _, repo = golden
    with repo.object_store() as store:
        image = open_tag(repo, store, "single")
        with pytest.raises(OciBuildError, match='"boot" does not exist'):
            compute_id(repo, store, image, bootable=True)


def test_the_golden_images_are_the_ones_recorded(golden: tuple[str, Repository]) -> None:
    """The config streams cfsctl rewrote name the images we compute."""
    _, repo = golden
    with repo.object_store() as store:
        for tag, _ in iter_tags(repo):
            image = open_tag(repo, store, tag)
            assert image.image_ref_v1 == compute_id(repo, store, image)


def _compute_id_stdout(algorithm: str, tag: str, flags: str = "") -> str:
    for run in _oci_commands(algorithm):
        if run["command"] == f"cfsctl --repo $REPO oci compute-id {flags}{tag}":
            return str(run["stdout"]).strip()
    raise KeyError(tag)


def _pull(repo: Repository, tag: str, *, bootable: bool = False) -> str | None:
    """What ``cfsctl oci pull [--bootable]`` does once the layers are in."""
    _, manifest = _import_time(repo, tag)
    digest = IMAGES[tag]["manifest_digest"]
    found = ensure_image(repo, digest, manifest, tag)
    if bootable:
        ensure_image(repo, digest, None, None, bootable=True)
    return found


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_ensure_image_commits_what_cfsctl_pull_does(tmp_path: Path, algorithm: str) -> None:
    repo = _repo(tmp_path, algorithm)
    for tag in sorted(IMAGES):
        assert _pull(repo, tag) == _compute_id_stdout(algorithm, tag)
        with repo.object_store() as store:
            image = open_tag(repo, store, tag)
            assert image.config_json == _blob(IMAGES[tag]["config_digest"])
            assert image.image_ref_v1 == _compute_id_stdout(algorithm, tag)
            assert image.image_ref is None and image.boot_image_refs == {}
            # The rewritten config stream names what cfsctl's names.
            golden = OCI / algorithm / "streams-after-pulls"
            rs_config = read_refs(
                (
                    golden / f"oci-config-{image.config_digest.replace(':', '_')}.splitstream"
                ).read_bytes(),
                repo.hash_algorithm.digest_size,
            )
            ours = read_stream(store, image.config_verity).refs
            assert [k for k, _ in ours.named_refs] == [k for k, _ in rs_config.named_refs]
            assert (
                dict(ours.named_refs)[IMAGE_REF_KEY_V1]
                == dict(rs_config.named_refs)[IMAGE_REF_KEY_V1]
            )
            assert (repo.path / "images" / str(image.image_ref_v1)).is_symlink()
            if SAME_ZSTD:
                assert ours == rs_config
    assert not (repo.path / "images" / "refs").exists() or not any(
        (repo.path / "images" / "refs").iterdir()
    )
    assert fsck(repo).ok


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_bootable_image_is_cfsctls(tmp_path: Path, algorithm: str) -> None:
    """``cfsctl oci pull --bootable``: the plain image, then the boot image under
    ``composefs.image.boot.v1`` (as in the golden repository, which pulled boot so),
    the plain one kept."""
    repo = _repo(tmp_path, algorithm)
    golden = Repository.open(unpack_repo(algorithm, tmp_path / "golden"))
    for tag in ("boot", "boot-t1"):
        plain = _pull(repo, tag, bootable=True)
        with repo.object_store() as store:
            image = open_tag(repo, store, tag)
            assert image.image_ref_v1 == plain
            boot = _compute_id_stdout(algorithm, tag, "--bootable ")
            assert image.boot_image_refs == {BOOT_IMAGE_REF_KEY_V1: boot}
            assert (repo.path / "images" / boot).is_symlink()
    with golden.object_store() as store:
        recorded = open_tag(golden, store, "boot").boot_image_refs
    assert recorded == {BOOT_IMAGE_REF_KEY_V1: _compute_id_stdout(algorithm, "boot", "--bootable ")}
    assert fsck(repo).ok


@pytest.mark.skipif(not SAME_ZSTD, reason="stream ids need libzstd 1.5.4 (CI builds against it)")
@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_listing_after_pull_single(tmp_path: Path, algorithm: str) -> None:
    repo = _repo(tmp_path, algorithm)
    _pull(repo, "single")
    expected = (OCI / algorithm / "listing.1-after-pull-single.txt").read_text().splitlines()
    assert _written(listing(repo.path)) == _written(expected)


def _written(lines: list[str]) -> list[str]:
    """What a pull writes: objects, image links and streams (not what init made)."""
    return [x for x in lines if x.startswith(("f objects/", "l images/", "l streams/"))]


def test_v2_repository(tmp_path: Path) -> None:
    """A repository of format V2: ``composefs.image`` and cfsctl's V2 ids."""
    repo = Repository.init(
        tmp_path / "repo", algorithm="fsverity-sha256-12", verity="disabled", erofs_version=2
    )
    runs = {
        r["command"]: r["stdout"].strip()
        for r in read_json("expected/oci/sha256-erofs-v2-repo/commands.json")
        if "compute-id" in r["command"]
    }
    for tag in ("single", "multi"):
        found = _pull(repo, tag)
        assert found == runs[f"cfsctl --repo $REPO oci compute-id {tag}"]
        with repo.object_store() as store:
            image = open_tag(repo, store, tag)
            assert image.image_ref == found and image.image_ref_v1 is None
            named = dict(read_stream(store, image.config_verity).refs.named_refs)
            assert named[IMAGE_REF_KEY] == found
            v1 = compute_id(repo, store, image, version=ErofsVersion.V1)
            assert v1 == runs[f"cfsctl --repo $REPO --erofs-version 1 oci compute-id {tag}"]
    expected = (OCI / "sha256-erofs-v2-repo" / "listing.txt").read_text().splitlines()
    ours = _written(listing(repo.path))
    assert [x for x in ours if x.startswith("l images/")] == [
        x for x in _written(expected) if x.startswith("l images/")
    ]
    # (multi's manifest stream, and so the full listing, varies between cfsctl runs)


def test_artifact_gives_none(tmp_path: Path) -> None:
    repo = _repo(tmp_path, "sha256")
    config = b'{"artifact": true}'
    manifest = (
        b'{"schemaVersion":2,"config":{"mediaType":"application/vnd.example+json",'
        b'"digest":"sha256:%s","size":%d},"layers":[]}'
    )
    manifest = manifest % (hashlib.sha256(config).hexdigest().encode(), len(config))
    with repo.object_store() as store:
        verity = write_config_stream(repo, store, config, [])
        write_manifest_stream(
            repo, store, manifest, "sha256:" + hashlib.sha256(config).hexdigest(), verity, []
        )
    digest = "sha256:" + hashlib.sha256(manifest).hexdigest()
    assert ensure_image(repo, digest, tag="artifact") is None
    assert list(iter_tags(repo)) == []


# -- hostile layers --------------------------------------------------------------------------


def _tar(*members: tuple[str, bytes, str]) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data, link in members:
            info = tarfile.TarInfo(name)
            if name.endswith("/"):
                info.type = tarfile.DIRTYPE
            elif link:
                info.type = tarfile.LNKTYPE
                info.linkname = link
            else:
                info.size = len(data)
            tar.addfile(info, io.BytesIO(data) if info.isreg() else None)
    return out.getvalue()


@dataclass(frozen=True, slots=True)
class Documents:
    """An OCI image's config and manifest for some uncompressed layers."""

    layers: list[bytes]
    diff_ids: list[str]
    config: bytes
    config_digest: str
    manifest: bytes
    manifest_digest: str


def documents(layers: list[bytes]) -> Documents:
    diff_ids = ["sha256:" + hashlib.sha256(t).hexdigest() for t in layers]
    config = json.dumps(
        {
            "architecture": "amd64",
            "os": "linux",
            "config": {},
            "rootfs": {"type": "layers", "diff_ids": diff_ids},
        }
    ).encode()
    config_digest = "sha256:" + hashlib.sha256(config).hexdigest()
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {
                "mediaType": "application/vnd.oci.image.config.v1+json",
                "digest": config_digest,
                "size": len(config),
            },
            "layers": [
                {"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": d, "size": len(t)}
                for d, t in zip(diff_ids, layers, strict=True)
            ],
        }
    ).encode()
    return Documents(
        layers,
        diff_ids,
        config,
        config_digest,
        manifest,
        "sha256:" + hashlib.sha256(manifest).hexdigest(),
    )


def image_of_layers(repo: Repository, layers: list[bytes]) -> Documents:
    """An image of ``layers`` in the repository as a pull writes it before the image
    is built (layers imported, config and manifest streams, no tag)."""
    docs = documents(layers)
    refs = [
        (d, import_layer(repo, io.BytesIO(t), d))
        for d, t in zip(docs.diff_ids, layers, strict=True)
    ]
    with repo.object_store() as store:
        verity = write_config_stream(repo, store, docs.config, refs)
        write_manifest_stream(repo, store, docs.manifest, docs.config_digest, verity, refs)
    return docs


@pytest.mark.parametrize(
    ("members", "words"),
    [
        ([("usr/", b"", ""), ("../escape", b"x", "")], "'..'"),
        ([("usr/", b"", ""), ("usr/../../etc/passwd", b"x", "")], "'..'"),
        ([("usr/", b"", ""), ("hl", b"", "../../etc/shadow")], "'..'"),
        ([("usr/", b"", ""), ("hl", b"", "missing")], "does not exist"),
        ([("usr/", b"", ""), ("no/parent", b"x", "")], "does not exist"),
    ],
)
def test_hostile_layer_leaves_no_tag(
    tmp_path: Path, members: list[tuple[str, bytes, str]], words: str
) -> None:
    repo = _repo(tmp_path, "sha256")
    digest = image_of_layers(repo, [_tar(*members)]).manifest_digest
    before = listing(repo.path)
    with pytest.raises(OciBuildError, match=words) as info:
        ensure_image(repo, digest, tag="hostile")
    assert "layer sha256:" in str(info.value)
    assert list(iter_tags(repo)) == []
    assert listing(repo.path) == before
    assert fsck(repo).ok
    assert existing_stream(repo, "oci-manifest-" + digest) is not None


# -- each layer's entries, as ``cfsctl oci layer --dumpfile`` prints them -------------------


def _absolute(path: bytes) -> bytes:
    """composefs-rs's ``make_absolute_path`` (the path as printed, ``.`` kept)."""
    out = b"/" + path.removeprefix(b"/")
    while len(out) > 1 and out.endswith(b"/"):
        out = out[:-1]
    return out


def _entry_line(entry: TarEntry) -> bytes:
    """composefs-rs's ``TarEntry`` Display: one dumpfile line, nlink 1."""
    path = escape_lone_dash(_absolute(entry.path))
    if entry.kind is EntryKind.HARDLINK:
        assert entry.link is not None
        target = escape_lone_dash(_absolute(entry.link))
        return path + b" 0 @120000 - - - - 0.0 " + target + b" - -"
    node = entry_node(entry)
    payload = content = digest = b"-"
    size = 0
    if entry.kind is EntryKind.REGULAR:
        size = entry.size
        if node.payload:
            payload, digest = node.payload, node.payload.replace(b"/", b"")
        elif node.content:
            content = escape_lone_dash(node.content)
    elif entry.kind is EntryKind.SYMLINK:
        assert node.payload is not None
        size, payload = len(node.payload), escape_lone_dash(node.payload)
    line = b"%s %d %o 1 %d %d %d %d.%d %s %s %s" % (
        path,
        size,
        node.mode,
        node.uid,
        node.gid,
        node.rdev,
        node.mtime_sec,
        node.mtime_nsec,
        payload,
        content,
        digest,
    )
    return line + b"".join(b" " + escape_equal(k) + b"=" + escape_equal(v) for k, v in node.xattrs)


def test_layer_entries_are_cfsctls(golden: tuple[str, Repository]) -> None:
    algorithm, repo = golden
    layers = {x["name"]: x["diff_id"] for i in IMAGES.values() for x in i["layers"]}
    dumps = sorted((OCI / algorithm / "layers").glob("*.dumpfile.txt"))
    assert len(dumps) == 7
    with repo.object_store() as store:
        for dump in dumps:
            verity = existing_stream(repo, "oci-layer-" + layers[dump.name.split(".")[0]])
            assert verity is not None

            def lines(_parsed: object, chunks: Iterator[Chunk]) -> list[bytes]:
                return [
                    _entry_line(e)
                    for e in iter_entries(c if isinstance(c, bytes) else c.digest for c in chunks)
                ]

            assert use_chunks(store, verity, lines) == dump.read_bytes().splitlines(), dump.name
