"""composefsd.repository: init and open, CreateImage against C ``mkcomposefs
--digest-store`` on generated trees, dumpfile imports, the verity policies on this
kernel (and on a simulated fs-verity kernel), object publishing, image operations."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import re
import select
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

import gen_tree
from composefsd.fsverity import digest_bytes, digest_fd
from composefsd.image.formats import ErofsVersion
from composefsd.image.reader import read_image
from composefsd.image.writer import write_image
from composefsd.kernel import verity as fsverity
from composefsd.kernel.verity import VerityFileBusyError, VerityNotEnabledError
from composefsd.repository import (
    CorruptRepositoryError,
    CreateOptions,
    ImageNotFoundError,
    InvalidNameError,
    NotARepositoryError,
    Progress,
    ReadOnlyRepositoryError,
    Repository,
    RepositoryError,
    SourceError,
    UnsupportedRepositoryError,
    VerityPolicy,
    VerityRequiredError,
    default_path,
    gc_lock,
)
from composefsd.repository import digestcache as digestcache_mod
from composefsd.repository import importer as importer_mod
from composefsd.repository import repo as repo_mod
from composefsd.repository import store as store_mod
from composefsd.repository.images import normalize_ref
from composefsd.repository.meta import RepoMetadata
from composefsd.repository.store import ObjectStore, PublishState
from composefsd.sources.directory import ScanOptions, scan_directory
from trees import write_tree

TREE_SEEDS = [11, 2024, 77]
#: (our options, C mkcomposefs arguments)
# A version range asks for the image C mkcomposefs --digest-store writes; without
# one CreateImage writes the repository's format the composefs-rs way.
COMBOS: list[tuple[CreateOptions, list[str]]] = [
    (CreateOptions(min_version=0, max_version=1), []),
    (
        CreateOptions(use_epoch=True, skip_devices=True, min_version=0),
        ["--use-epoch", "--skip-devices"],
    ),
    (CreateOptions(user_xattrs=True, max_version=1), ["--user-xattrs"]),
    (
        CreateOptions(skip_xattrs=True, min_version=1, max_version=1),
        ["--skip-xattrs", "--min-version=1", "--max-version=1"],
    ),
]

RS_META = b"""{
  "version": 1,
  "algorithm": "fsverity-sha512-12",
  "features": {
    "compatible": [],
    "read-only-compatible": [
      "v1_erofs"
    ],
    "incompatible": []
  },
  "erofs_formats": {
    "default": 1
  }
}
"""


# -- helpers --------------------------------------------------------------------------------


def store_listing(store: Path) -> dict[str, tuple[int, str]]:
    """``XX/rest`` -> (mode, sha256 of the content) of every object file."""
    out: dict[str, tuple[int, str]] = {}
    for sub in sorted(store.iterdir()):
        if sub.is_dir() and len(sub.name) == 2:
            for f in sub.iterdir():
                out[f"{sub.name}/{f.name}"] = (
                    f.lstat().st_mode,
                    hashlib.sha256(f.read_bytes()).hexdigest(),
                )
    return out


def repo_objects(repo: Repository, image_digest: str | None = None) -> dict[str, tuple[int, str]]:
    out = store_listing(repo.objects_dir)
    if image_digest is not None:
        out.pop(f"{image_digest[:2]}/{image_digest[2:]}")
    return out


def snapshot(root: Path) -> dict[str, tuple[int, int, bytes]]:
    """Every entry under ``root``: mode, size, and content (files) or target (links)."""
    out: dict[str, tuple[int, int, bytes]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            st = p.lstat()
            if stat.S_ISLNK(st.st_mode):
                data = os.readlink(p).encode()
            elif stat.S_ISREG(st.st_mode):
                data = p.read_bytes()
            else:
                data = b""
            out[str(p.relative_to(root))] = (st.st_mode, st.st_size, data)
    return out


def c_mkcomposefs(reference_bin: Path, tree: Path, out: Path, args: list[str]) -> bytes:
    store = out.with_suffix(".store")
    subprocess.run(
        [str(reference_bin / "mkcomposefs"), f"--digest-store={store}", *args, str(tree), str(out)],
        check=True,
        capture_output=True,
    )
    return out.read_bytes()


def simple_tree(root: Path, seed: int = 5) -> dict[str, bytes]:
    rng = random.Random(seed)
    files = {
        "a": rng.randbytes(5000),
        "b/c": rng.randbytes(70_000),
        "b/same": b"",
        "tiny": b"hello\n",
        "empty": b"",
        "big": rng.randbytes((1 << 20) + 3),
    }
    files["b/same"] = files["a"]
    write_tree(root, files, {"b/link": "../a"})
    return files


@pytest.fixture(scope="module")
def trees(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    base = tmp_path_factory.mktemp("repo-trees")
    out = []
    for i, seed in enumerate(TREE_SEEDS):
        tree = base / f"tree{i}"
        gen_tree.generate_tree(random.Random(seed), tree, big_files=i == 0, n_entries=80)
        out.append(tree)
    return out


# -- init and open ----------------------------------------------------------------------------


def test_init_writes_composefs_rs_metadata_and_layout(tmp_path: Path) -> None:
    repo = Repository.init(tmp_path / "parent" / "repo")
    assert repo.path == tmp_path / "parent" / "repo"
    assert (repo.algorithm, repo.hash_name, repo.verity) == (
        "fsverity-sha256-12",
        "sha256",
        VerityPolicy.TRY,
    )
    meta = (repo.path / "meta.json").read_bytes()
    assert meta == (
        b'{\n  "version": 1,\n  "algorithm": "fsverity-sha256-12",\n  "features": {\n'
        b'    "compatible": [],\n'
        b'    "read-only-compatible": [\n      "v1_erofs"\n    ],\n'
        b'    "incompatible": []\n  },\n  "erofs_formats": {\n    "default": 1\n  }\n}\n'
    )
    assert stat.S_IMODE(repo.path.stat().st_mode) == 0o700
    for sub in ("objects", "images", "images/refs"):
        assert (repo.path / sub).is_dir()
    again = Repository.open(repo.path)
    assert (again.algorithm, again.verity) == (repo.algorithm, repo.verity)
    assert repo.object_path("ab" + "0" * 62) == repo.path / "objects" / "ab" / ("0" * 62)
    assert repo.image_path("ab" * 32) == repo.path / "images" / ("ab" * 32)


@pytest.mark.parametrize("policy", list(VerityPolicy.__members__.values()))
def test_init_records_policy_and_algorithm(tmp_path: Path, policy: VerityPolicy) -> None:
    if policy is VerityPolicy.REQUIRED:
        with pytest.raises(VerityRequiredError):
            Repository.init(tmp_path / "r", algorithm="fsverity-sha512-12", verity=policy)
        return
    repo = Repository.init(tmp_path / "r", algorithm="fsverity-sha512-12", verity=policy)
    doc = json.loads((repo.path / "meta.json").read_bytes())
    assert doc["algorithm"] == "fsverity-sha512-12"
    # "try" is composefs-rs's insecure mode: no flag, as cfsctl init --insecure writes.
    flags = [] if policy is VerityPolicy.TRY else [f"composefsd-verity-{policy.value}"]
    assert doc["features"]["compatible"] == flags
    opened = Repository.open(repo.path)
    assert (opened.hash_name, opened.verity) == ("sha512", policy)


def test_init_is_idempotent_and_refuses_other_settings(tmp_path: Path) -> None:
    path = tmp_path / "r"
    Repository.init(path)
    before = snapshot(path)
    Repository.init(path)  # same settings: opens it
    assert snapshot(path) == before
    with pytest.raises(RepositoryError, match="already a repository"):
        Repository.init(path, algorithm="fsverity-sha512-12")
    with pytest.raises(RepositoryError, match="already a repository"):
        Repository.init(path, verity="disabled")
    with pytest.raises(InvalidNameError, match="unsupported algorithm"):
        Repository.init(tmp_path / "x", algorithm="fsverity-sha1-12")
    with pytest.raises(InvalidNameError, match="unknown verity policy"):
        Repository.init(tmp_path / "x", verity="sometimes")
    assert not (tmp_path / "x").exists()


def test_init_refuses_to_adopt_other_directories(tmp_path: Path) -> None:
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "precious").write_text("data")
    with pytest.raises(NotARepositoryError, match="not empty and not a composefs repository"):
        Repository.init(busy)
    assert sorted(os.listdir(busy)) == ["precious"]
    afile = tmp_path / "file"
    afile.write_text("x")
    with pytest.raises(NotARepositoryError, match="not a directory"):
        Repository.init(afile)
    empty = tmp_path / "empty"
    empty.mkdir()
    assert Repository.init(empty).path == empty
    # What a killed init leaves (empty skeleton, no meta.json) is taken over.
    half = tmp_path / "half"
    (half / "images" / "refs").mkdir(parents=True)
    (half / "objects").mkdir()
    Repository.init(half)
    assert (half / "meta.json").exists()


def test_open_refuses_non_repositories(tmp_path: Path) -> None:
    with pytest.raises(NotARepositoryError, match="does not exist"):
        Repository.open(tmp_path / "missing")
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotARepositoryError, match="not a directory"):
        Repository.open(tmp_path / "file")
    plain = tmp_path / "plain"
    plain.mkdir()
    with pytest.raises(NotARepositoryError, match=r"has no meta\.json"):
        Repository.open(plain)
    (plain / "objects").mkdir()
    with pytest.raises(NotARepositoryError, match="old-format"):
        Repository.open(plain)
    assert sorted(os.listdir(plain)) == ["objects"]


def _repo_with_meta(tmp_path: Path, meta: dict[str, Any] | bytes) -> Path:
    path = tmp_path / "r"
    Repository.init(path)
    data = meta if isinstance(meta, bytes) else json.dumps(meta).encode()
    (path / "meta.json").write_bytes(data)
    return path


def _meta(**changes: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "version": 1,
        "algorithm": "fsverity-sha256-12",
        "features": {"compatible": [], "read-only-compatible": ["v1_erofs"], "incompatible": []},
        "erofs_formats": {"default": 1},
    }
    for key, value in changes.items():
        if key in ("compatible", "read_only_compatible", "incompatible"):
            doc["features"][key.replace("_", "-")] = value
        else:
            doc[key] = value
    return doc


@pytest.mark.parametrize(
    ("meta", "error", "message"),
    [
        (_meta(version=2), UnsupportedRepositoryError, "format version 2 is newer"),
        (_meta(algorithm="fsverity-sha384-12"), UnsupportedRepositoryError, "sha384-12"),
        (_meta(algorithm="fsverity-sha256-16"), UnsupportedRepositoryError, "sha256-16"),
        (_meta(algorithm="sha256"), UnsupportedRepositoryError, "unsupported algorithm"),
        (_meta(incompatible=["zstd_objects"]), UnsupportedRepositoryError, "zstd_objects"),
        (_meta(version=0), CorruptRepositoryError, "version"),
        (_meta(algorithm=5), CorruptRepositoryError, "algorithm"),
        (_meta(compatible="x"), CorruptRepositoryError, "compatible"),
        (
            _meta(compatible=["composefsd-verity-try", "composefsd-verity-disabled"]),
            CorruptRepositoryError,
            "conflicting verity policy",
        ),
        (b"{not json", CorruptRepositoryError, "not valid JSON"),
        (b"[1, 2]", CorruptRepositoryError, "not a JSON object"),
    ],
)
def test_open_rejects_unknown_or_bad_metadata(
    tmp_path: Path, meta: dict[str, Any] | bytes, error: type[Exception], message: str
) -> None:
    path = _repo_with_meta(tmp_path, meta)
    with pytest.raises(error, match=message):
        Repository.open(path)


def test_feature_flags_follow_the_ext4_model(tmp_path: Path) -> None:
    path = _repo_with_meta(tmp_path, _meta(compatible=["future_thing"]))
    repo = Repository.open(path)
    assert not repo.read_only and repo.verity is VerityPolicy.TRY
    (path / "meta.json").write_text(json.dumps(_meta(read_only_compatible=["v1_erofs", "v9"])))
    repo = Repository.open(path)
    assert repo.read_only
    src = tmp_path / "src"
    simple_tree(src)
    with pytest.raises(ReadOnlyRepositoryError, match=r"read-only-compatible feature flag.*v9"):
        repo.create_image(src, ref="x")
    with pytest.raises(ReadOnlyRepositoryError):
        repo.gc()
    assert repo.list_images() == []
    assert repo_objects(repo) == {}


def test_composefs_rs_repository_opens_as_try(tmp_path: Path) -> None:
    """What ``cfsctl init`` writes: SHA-512, no policy flag, no verity on meta.json."""
    path = _repo_with_meta(tmp_path, RS_META)
    repo = Repository.open(path)
    assert (repo.algorithm, repo.hash_name, repo.verity) == (
        "fsverity-sha512-12",
        "sha512",
        VerityPolicy.TRY,
    )
    meta = RepoMetadata.from_json(RS_META)
    assert meta.to_json() == RS_META
    extra = json.loads(RS_META)
    extra["future"] = {"x": [1]}
    text = (json.dumps(extra, indent=2) + "\n").encode()
    assert RepoMetadata.from_json(text).to_json() == text


def test_default_path(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("COMPOSEFSD_REPOSITORY", raising=False)
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    assert default_path() == Path("/sysroot/composefs")
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    monkeypatch.setenv("HOME", "/home/someone")
    assert default_path() == Path("/home/someone/.var/lib/composefs")
    monkeypatch.setenv("COMPOSEFSD_REPOSITORY", str(tmp_path / "env-repo"))
    assert default_path() == tmp_path / "env-repo"
    with pytest.raises(NotARepositoryError, match="env-repo does not exist"):
        Repository.open()
    Repository.init(tmp_path / "env-repo")
    assert Repository.open().path == tmp_path / "env-repo"
    assert Repository.open(None).path == tmp_path / "env-repo"


# -- CreateImage against C --------------------------------------------------------------------


@pytest.mark.parametrize("combo", range(len(COMBOS)))
@pytest.mark.parametrize("tree_index", range(len(TREE_SEEDS)))
def test_create_image_matches_c_digest_store(
    trees: list[Path], reference_bin: Path, tmp_path: Path, tree_index: int, combo: int
) -> None:
    options, c_args = COMBOS[combo]
    tree = trees[tree_index]
    c_image = c_mkcomposefs(reference_bin, tree, tmp_path / "c.img", c_args)
    c_store = store_listing(tmp_path / "c.store")
    repo = Repository.init(tmp_path / "repo")
    first = repo.create_image(tree, options=options, ref="t")
    image_path = repo.images_dir / first.digest
    assert image_path.read_bytes() == c_image
    assert first.digest == digest_bytes(c_image).hex()
    assert repo_objects(repo, first.digest) == c_store
    assert first.objects_written == len(c_store) and first.objects_reused == 0
    assert first.image_written and first.image_size == len(c_image)
    assert first.bytes_written == sum(
        (tmp_path / "c.store" / rel).stat().st_size for rel in c_store
    )
    assert not first.verity_enabled  # no fs-verity on this kernel
    # The image's own object, then the link, then the ref: all relative symlinks.
    assert os.readlink(image_path) == f"../objects/{first.digest[:2]}/{first.digest[2:]}"
    assert os.readlink(repo.refs_dir / "t") == f"../{first.digest}"
    # Unchanged tree: every object reused, with the digest cache and without it.
    for cache in (True, False):
        opts = CreateOptions(**{**_fields(options), "digest_cache": cache})
        again = repo.create_image(tree, options=opts, ref="t")
        assert again.digest == first.digest
        assert (again.objects_written, again.bytes_written, again.image_written) == (0, 0, False)
        assert again.objects_reused == len(c_store)
        assert (again.files, again.bytes_total) == (first.files, first.bytes_total)
    assert repo_objects(repo, first.digest) == c_store


def _fields(options: CreateOptions) -> dict[str, Any]:
    return {name: getattr(options, name) for name in CreateOptions.__dataclass_fields__}


def test_create_image_statistics_and_progress(tmp_path: Path) -> None:
    src = tmp_path / "src"
    files = simple_tree(src)
    repo = Repository.init(tmp_path / "repo")
    seen: list[Progress] = []
    result = repo.create_image(src, ref="stats", progress=seen.append)
    external = {rel: data for rel, data in files.items() if len(data) > 64}
    distinct = {digest_bytes(d) for d in external.values()}
    assert result.files == len(files)
    assert result.entries == len(files) + 3  # root, b, b/link
    assert result.bytes_total == sum(len(d) for d in external.values())
    assert result.objects_written == len(distinct)
    assert result.bytes_written == sum(
        len(d) for d in {digest_bytes(d): d for d in external.values()}.values()
    )
    phases = [p.phase for p in seen]
    order = ["scan", "import", "image", "sync", "publish"]
    assert [ph for i, ph in enumerate(phases) if i == 0 or phases[i - 1] != ph] == order
    imports = [p for p in seen if p.phase == "import"]
    assert imports[0].total == result.bytes_total


def test_create_image_in_worker_processes(
    tmp_path: Path, reference_bin: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Large trees import in worker processes: same image and objects."""
    monkeypatch.setattr(importer_mod, "_PROCESS_MIN_BYTES", 0)
    monkeypatch.setattr(importer_mod, "_BATCH_FILES", 2)
    src = tmp_path / "src"
    rng = random.Random(3)
    for i in range(30):
        (src / f"d{i % 4}").mkdir(parents=True, exist_ok=True)
        (src / f"d{i % 4}" / f"f{i}").write_bytes(rng.randbytes(rng.choice([10, 100, 9000])))
    c_image = c_mkcomposefs(reference_bin, src, tmp_path / "c.img", [])
    repo = Repository.init(tmp_path / "repo")
    # Plain files only: composefs-rs's V0 is C's default image here.
    options = CreateOptions(threads=3, digest_cache=False, erofs_version=ErofsVersion.V0)
    result = repo.create_image(src, options=options)
    assert (repo.images_dir / result.digest).read_bytes() == c_image
    assert repo_objects(repo, result.digest) == store_listing(tmp_path / "c.store")


def test_preserve_hardlinks_is_opt_in(tmp_path: Path, reference_bin: Path) -> None:
    src = tmp_path / "src"
    simple_tree(src)
    os.link(src / "a", src / "hard-a")
    os.link(src / "tiny", src / "hard-tiny")
    c_image = c_mkcomposefs(reference_bin, src, tmp_path / "c.img", [])
    repo = Repository.init(tmp_path / "repo")
    # C mkcomposefs's image (a version range asks for it) breaks hardlinks.
    plain = repo.create_image(src, ref="plain", options=CreateOptions(min_version=0))
    assert (repo.images_dir / plain.digest).read_bytes() == c_image
    options = CreateOptions(preserve_hardlinks=True, min_version=0)
    linked = repo.create_image(src, options=options, ref="hl")
    assert linked.digest != plain.digest
    # The same as writing the scanner's hardlink-preserving tree with these objects.
    root = scan_directory(src, ScanOptions(preserve_hardlinks=True))
    assert (repo.images_dir / linked.digest).read_bytes() == write_image(root)
    info = read_image((repo.images_dir / linked.digest).read_bytes())
    assert info.root.children is not None
    assert info.root.children[b"a"].nlink == 2
    assert linked.files == plain.files - 2


def test_create_image_refs_replace_atomically_and_nest(tmp_path: Path) -> None:
    one, two = tmp_path / "one", tmp_path / "two"
    simple_tree(one, seed=1)
    simple_tree(two, seed=2)
    repo = Repository.init(tmp_path / "repo")
    d1 = repo.create_image(one, ref="os/stable").digest
    d2 = repo.create_image(two, ref="os/stable").digest
    assert os.readlink(repo.refs_dir / "os" / "stable") == f"../../{d2}"
    assert repo.resolve_image("os/stable") == d2
    repo.create_image(one, ref="refs/os/old")
    assert repo.resolve_image("refs/os/old") == d1
    assert not [n for n in os.listdir(repo.images_dir) if n.startswith(".")]
    for bad in ("", "/abs", "a//b", "a/./b", "../x", ".hidden", "a/.b", "x" * 300, "a\0b"):
        with pytest.raises(InvalidNameError):
            repo.create_image(one, ref=bad)
    with pytest.raises(InvalidNameError, match="directory of refs"):
        repo.create_image(one, ref="os")
    with pytest.raises(InvalidNameError, match="is a ref itself"):
        repo.create_image(one, ref="os/stable/deeper")


@pytest.mark.parametrize(
    ("bad", "why"),
    [
        ("a\nb", "control characters"),
        ("os/v1\n0123abcd  1.0 KiB  2024-01-01 00:00:00  forged", "control characters"),
        ("a\rb", "control characters"),
        ("a\tb", "control characters"),
        ("a\x1b[31mred", "control characters"),
        ("a\x7f", "control characters"),
        ("a\x85b", "control characters"),
        ("a\x9bb", "control characters"),
        ("a\0b", "control characters"),
        ("a\udcffb", "not valid Unicode"),
        ("/".join(["d"] * 1999), "1999 components, at most 64"),
        ("/".join(["d"] * 65), "65 components, at most 64"),
        ("/".join(["x" * 255] * 5), "1279 bytes, at most 1024"),
        ("é" * 513, "1026 bytes, at most 1024"),
    ],
    ids=[
        "newline",
        "forged-row",
        "cr",
        "tab",
        "escape",
        "del",
        "nel",
        "csi",
        "nul",
        "surrogate",
        "1999-levels",
        "65-levels",
        "1279-bytes",
        "1026-bytes-utf8",
    ],
)
def test_ref_name_limits(tmp_path: Path, bad: str, why: str) -> None:
    """Untrusted names (CreateImage's ref, any image name) are checked before any
    file system work: control characters would forge rows in listings and log lines,
    and a 1999-level name recursed past Python's limit when its directories were made."""
    with pytest.raises(InvalidNameError, match=re.escape(why)) as info:
        normalize_ref(bad)
    # The message itself is printable and short, whatever the name holds.
    message = str(info.value)
    assert message.isprintable() and len(message) < 300, message
    repo = Repository.init(tmp_path / "repo")
    src = tmp_path / "src"
    simple_tree(src)
    with pytest.raises(InvalidNameError, match=re.escape(why)):
        repo.create_image(src, ref=bad)
    with pytest.raises(InvalidNameError, match=re.escape(why)):
        repo.resolve_image(bad)
    assert not list(repo.refs_dir.iterdir())


def test_ref_names_at_the_limits(tmp_path: Path) -> None:
    src = tmp_path / "src"
    simple_tree(src)
    repo = Repository.init(tmp_path / "repo")
    deep = "/".join(f"d{i}" for i in range(64))
    long = "/".join(["x" * 255] * 4)  # 1023 bytes
    wide = "é" * 127 + "/" + "ü" * 127 + "/" + "ß" * 127 + "/" + "ø" * 127 + "/" + "abcd"
    assert len(wide.encode()) == 1024
    for name in (deep, long, wide, "printable ☃ & spaces", "back\\slash"):
        digest = repo.create_image(src, ref=name).digest
        assert repo.resolve_image(name) == digest
        assert normalize_ref("refs/" + name) == name


def test_sha512_repository(tmp_path: Path) -> None:
    src = tmp_path / "src"
    files = simple_tree(src)
    repo = Repository.init(tmp_path / "repo", algorithm="fsverity-sha512-12")
    result = repo.create_image(src, ref="x")
    assert len(result.digest) == 128
    image = (repo.images_dir / result.digest).read_bytes()
    assert digest_bytes(image, "sha512").hex() == result.digest
    expected = {digest_bytes(d, "sha512").hex() for d in files.values() if len(d) > 64} | {
        result.digest
    }
    names = {k.replace("/", "") for k in store_listing(repo.objects_dir)}
    assert names == expected
    info = read_image(image)
    assert info.root.children is not None
    big = info.root.children[b"big"]
    sha = digest_bytes(files["big"], "sha512").hex()
    assert big.payload == f"{sha[:2]}/{sha[2:]}".encode()
    assert big.digest is None  # the image format's metacopy digest is SHA-256 only
    assert repo.verify_image("x").ok
    assert repo.fsck().ok


# -- CreateImage from a dumpfile ----------------------------------------------------------------


def _dump(reference_bin: Path, image: Path) -> bytes:
    return subprocess.run(
        [str(reference_bin / "composefs-info"), "dump", str(image)],
        check=True,
        capture_output=True,
    ).stdout


def test_create_image_from_dumpfile_and_objects(
    trees: list[Path], reference_bin: Path, tmp_path: Path
) -> None:
    tree = trees[0]
    c_image = c_mkcomposefs(reference_bin, tree, tmp_path / "c.img", [])
    store = tmp_path / "c.store"
    dump = _dump(reference_bin, tmp_path / "c.img")
    repo = Repository.init(tmp_path / "repo")
    result = repo.create_image_from_dumpfile(dump, store, ref="from-dump")
    assert (repo.images_dir / result.digest).read_bytes() == c_image
    assert repo_objects(repo, result.digest) == store_listing(store)
    assert result.objects_written == len(store_listing(store))
    (tmp_path / "dump").write_bytes(dump)
    again = repo.create_image_from_dumpfile(tmp_path / "dump", store, ref="from-dump")
    assert again.digest == result.digest
    assert (again.objects_written, again.objects_reused) == (0, result.objects_written)
    assert repo.verify_image("from-dump").ok


def test_dumpfile_import_errors_leave_no_damage(tmp_path: Path, reference_bin: Path) -> None:
    src = tmp_path / "src"
    simple_tree(src)
    c_mkcomposefs(reference_bin, src, tmp_path / "c.img", [])
    store = tmp_path / "c.store"
    dump = _dump(reference_bin, tmp_path / "c.img")
    repo = Repository.init(tmp_path / "repo")
    before = snapshot(repo.path)
    objs = sorted(store_listing(store))

    with pytest.raises(SourceError, match="invalid dumpfile"):
        repo.create_image_from_dumpfile(b"/ 0 40755 2 0 0 0 0.0 - - -\nnot a line\n", store)
    with pytest.raises(SourceError, match="cannot read dumpfile"):
        repo.create_image_from_dumpfile(tmp_path / "no-such-dump", store)
    with pytest.raises(SourceError, match="objects directory"):
        repo.create_image_from_dumpfile(dump, tmp_path / "no-such-dir")
    escaping = dump.replace(objs[0].encode(), b"../" + objs[0].encode())
    with pytest.raises(SourceError, match="not a plain relative path"):
        repo.create_image_from_dumpfile(escaping, store)
    assert snapshot(repo.path) == before

    # A corrupt object: its digest is not what the dumpfile says.
    bad_store = tmp_path / "bad"
    subprocess.run(["cp", "-a", str(store), str(bad_store)], check=True)
    victim = bad_store / objs[-1]
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 1
    victim.write_bytes(bytes(data))
    with pytest.raises(SourceError, match="its digest is"):
        repo.create_image_from_dumpfile(dump, bad_store, ref="bad")
    victim.unlink()
    with pytest.raises(SourceError, match="No such file"):
        repo.create_image_from_dumpfile(dump, bad_store, ref="bad")
    # Objects are read beneath the objects directory: a symlink on the way (to a
    # directory holding the right bytes, even) or as the object is refused.
    elsewhere = tmp_path / "elsewhere"
    subprocess.run(["cp", "-a", str(store), str(elsewhere)], check=True)
    linked = tmp_path / "linked"
    linked.mkdir()
    for sub in store.iterdir():
        (linked / sub.name).symlink_to(elsewhere / sub.name)
    with pytest.raises(SourceError, match="a directory on its path is a symbolic link"):
        repo.create_image_from_dumpfile(dump, linked, ref="bad")
    victim.symlink_to(elsewhere / objs[-1])
    with pytest.raises(SourceError, match="it is a symbolic link"):
        repo.create_image_from_dumpfile(dump, bad_store, ref="bad")
    assert repo.list_images() == []
    assert not (repo.refs_dir / "bad").exists()
    assert repo.fsck().ok


# -- verity policies ----------------------------------------------------------------------------


def test_required_init_fails_clearly_and_leaves_nothing(tmp_path: Path) -> None:
    with pytest.raises(VerityRequiredError, match="fs-verity unsupported") as info:
        Repository.init(tmp_path / "new" / "repo", verity=VerityPolicy.REQUIRED)
    assert info.value.errno in (errno.EOPNOTSUPP, errno.ENOTTY)
    assert not (tmp_path / "new" / "repo").exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(VerityRequiredError):
        Repository.init(empty, verity="required")
    assert os.listdir(empty) == []


def test_required_repository_refuses_to_write_without_verity(tmp_path: Path) -> None:
    path = _repo_with_meta(tmp_path, _meta(compatible=["composefsd-verity-required"]))
    repo = Repository.open(path)
    assert repo.verity is VerityPolicy.REQUIRED
    src = tmp_path / "src"
    simple_tree(src)
    before = snapshot(path)
    with pytest.raises(VerityRequiredError, match="fs-verity unsupported"):
        repo.create_image(src, ref="x")
    assert snapshot(path) == before
    with (
        pytest.raises(VerityRequiredError, match="fs-verity unsupported"),
        repo.object_store() as store,
    ):
        store.store_bytes(b"some data" * 100)
    assert snapshot(path) == before
    assert repo.fsck().ok


def test_try_records_that_verity_is_absent(tmp_path: Path) -> None:
    src = tmp_path / "src"
    simple_tree(src)
    repo = Repository.init(tmp_path / "repo", verity="try")
    result = repo.create_image(src, ref="x")
    assert result.verity_enabled is False
    with repo.object_store() as store:
        assert store.probe_verity() is False
        obj = store.store_bytes(b"x" * 10000)
    assert (obj.written, obj.verity) == (True, False)
    assert repo.describe_image("x").verity is False
    report = repo.verify_image("x")
    assert report.ok and report.verity_measured == 0


def _forbid_verity(monkeypatch: pytest.MonkeyPatch) -> None:
    def forbidden(*args: object, **kwargs: object) -> None:
        raise AssertionError("fs-verity was attempted under the disabled policy")

    for module in (store_mod, repo_mod, fsverity):
        monkeypatch.setattr(module, "enable_verity", forbidden)
    monkeypatch.setattr(store_mod, "measure_verity", forbidden)


def test_disabled_never_attempts_verity(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src = tmp_path / "src"
    simple_tree(src)
    _forbid_verity(monkeypatch)
    repo = Repository.init(tmp_path / "repo", verity=VerityPolicy.DISABLED)
    assert Repository.open(repo.path).verity is VerityPolicy.DISABLED
    first = repo.create_image(src, ref="x")
    again = repo.create_image(src, ref="x")
    assert not first.verity_enabled and again.objects_written == 0
    with repo.object_store() as store:
        assert store.probe_verity() is False
        assert store.store_bytes(b"y" * 5000).verity is False


class FakeVerity:
    """A kernel with fs-verity, simulated: enable/measure keyed by inode."""

    def __init__(self, busy: int = 0, wrong: bool = False) -> None:
        self.enabled: dict[tuple[int, int], bytes] = {}
        self.calls = 0
        self.busy = busy
        self.wrong = wrong

    def enable(self, fd: int, algorithm: object = "sha256", **_: object) -> None:
        self.calls += 1
        st = os.fstat(fd)
        info = Path(f"/proc/self/fdinfo/{fd}").read_text()
        flags = int(info.split("flags:")[1].split()[0], 8)
        assert flags & os.O_ACCMODE == os.O_RDONLY, "verity must be enabled on a read-only fd"
        if self.busy:
            self.busy -= 1
            raise VerityFileBusyError(errno.ETXTBSY, "busy")
        digest = digest_fd(fd, algorithm)  # type: ignore[arg-type]
        self.enabled[(st.st_dev, st.st_ino)] = b"\xff" * 32 if self.wrong else digest

    def measure(self, fd: int, algorithm: object = "sha256", **_: object) -> bytes:
        st = os.fstat(fd)
        try:
            return self.enabled[(st.st_dev, st.st_ino)]
        except KeyError:
            raise VerityNotEnabledError(errno.ENODATA, "not enabled") from None


def _fake_kernel(monkeypatch: pytest.MonkeyPatch, fake: FakeVerity) -> None:
    monkeypatch.setattr(store_mod, "enable_verity", fake.enable)
    monkeypatch.setattr(store_mod, "measure_verity", fake.measure)


@pytest.mark.parametrize("policy", [VerityPolicy.TRY, VerityPolicy.REQUIRED])
def test_verity_enabled_where_the_kernel_can(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, policy: VerityPolicy
) -> None:
    src = tmp_path / "src"
    files = simple_tree(src)
    repo = Repository.init(tmp_path / "repo")
    repo.verity = policy
    fake = FakeVerity()
    _fake_kernel(monkeypatch, fake)
    result = repo.create_image(src, ref="x")
    assert result.verity_enabled
    objects = {digest_bytes(d) for d in files.values() if len(d) > 64}
    # The probe file, every new object and the image.
    assert fake.calls == 1 + len(objects) + 1
    assert objects | {bytes.fromhex(result.digest)} <= set(fake.enabled.values())
    again = repo.create_image(src, ref="x")
    assert again.verity_enabled and fake.calls == 1 + len(objects) + 1 + 1  # one more probe


def test_verity_retries_etxtbsy_then_copies(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    repo = Repository.init(tmp_path / "repo")
    # Busy three times: the retries absorb it.
    fake = FakeVerity(busy=3)
    _fake_kernel(monkeypatch, fake)
    with repo.object_store() as store:
        store.state.verity = True
        res = store.store_bytes(b"a" * 9000)
    assert res.verity and fake.calls == 4
    # Busy through every retry: the data is copied to a new file, which gets verity.
    fake = FakeVerity(busy=4)
    _fake_kernel(monkeypatch, fake)
    with repo.object_store() as store:
        store.state.verity = True
        res = store.store_bytes(b"b" * 9000)
    assert res.verity and fake.calls == 5
    assert repo.object_path(res.digest).read_bytes() == b"b" * 9000
    # Always busy: Try stores without verity, Required refuses.
    for policy, verity in ((VerityPolicy.TRY, False), (VerityPolicy.REQUIRED, None)):
        _fake_kernel(monkeypatch, FakeVerity(busy=100))
        store = ObjectStore(repo.objects_dir, repo.hash_algorithm, policy, state=PublishState(True))
        with store:
            data = policy.value.encode() * 3000
            if verity is None:
                with pytest.raises(VerityRequiredError, match="open for writing"):
                    store.store_bytes(data)
                assert not repo.object_path(digest_bytes(data).hex()).exists()
            else:
                assert store.store_bytes(data).verity is False
    assert not [n for n in os.listdir(repo.objects_dir) if n.startswith(".")]


def test_verity_mismatch_publishes_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    repo = Repository.init(tmp_path / "repo")
    _fake_kernel(monkeypatch, FakeVerity(wrong=True))
    src = tmp_path / "f"
    src.write_bytes(b"q" * 20000)
    with repo.object_store() as store:
        store.state.verity = True
        fd = os.open(src, os.O_RDONLY)
        try:
            with pytest.raises(SourceError, match="changed while it was copied"):
                store.import_fd(fd)
        finally:
            os.close(fd)
    assert store_listing(repo.objects_dir) == {}


# -- object publishing --------------------------------------------------------------------------


@pytest.mark.parametrize("tmpfile", [True, False])
@pytest.mark.parametrize("hashing_copy", [False, True])
def test_object_publishing(tmp_path: Path, tmpfile: bool, hashing_copy: bool) -> None:
    repo = Repository.init(tmp_path / "repo")
    state = PublishState()
    state.tmpfile = tmpfile
    data = random.Random(1).randbytes(300_000)
    src = tmp_path / "src"
    src.write_bytes(data)
    store = ObjectStore(repo.objects_dir, repo.hash_algorithm, repo.verity, state=state)
    with store:
        fd = os.open(src, os.O_RDONLY)
        try:
            importer = store.import_fd_hashing_copy if hashing_copy else store.import_fd
            first = importer(fd)
            second = importer(fd)
        finally:
            os.close(fd)
    digest = digest_bytes(data).hex()
    assert (first.digest, first.written, first.size) == (digest, True, len(data))
    assert (second.digest, second.written) == (digest, False)
    obj = repo.object_path(digest)
    assert obj.read_bytes() == data
    assert stat.S_IMODE(obj.stat().st_mode) == 0o644
    assert os.listdir(repo.objects_dir) == [digest[:2]]


def test_damaged_objects_are_replaced(tmp_path: Path) -> None:
    repo = Repository.init(tmp_path / "repo")
    data = b"z" * 12345
    digest = digest_bytes(data).hex()
    obj = repo.object_path(digest)
    obj.parent.mkdir()
    obj.write_bytes(b"short")
    with repo.object_store() as store:
        res = store.store_bytes(data)
    assert res.written and obj.read_bytes() == data
    obj.unlink()
    obj.mkdir()
    with repo.object_store() as store, pytest.raises(RepositoryError):
        store.store_bytes(data)  # a directory cannot be renamed over


def test_publish_race_counts_as_dedup(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Another writer links the object between our lookup and our link."""
    repo = Repository.init(tmp_path / "repo")
    data = b"race" * 5000
    with repo.object_store() as store:
        store.store_bytes(data)
        real = ObjectStore.existing
        calls = []

        def first_miss(self: ObjectStore, digest: bytes, size: int) -> object:
            calls.append(digest)
            return None if len(calls) == 1 else real(self, digest, size)

        monkeypatch.setattr(ObjectStore, "existing", first_miss)
        res = store.store_bytes(data)
    assert (res.written, len(calls)) == (False, 2)
    assert repo.object_path(res.digest).read_bytes() == data


def test_failed_copy_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    repo = Repository.init(tmp_path / "repo")
    src = tmp_path / "src"
    src.write_bytes(b"x" * 100_000)

    def broken(src_fd: int, dst_fd: int, state: object) -> None:
        os.write(dst_fd, b"partial")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(store_mod, "copy_fd_data", broken)
    for tmpfile in (True, False):
        state = PublishState()
        state.tmpfile = tmpfile
        with ObjectStore(repo.objects_dir, repo.hash_algorithm, repo.verity, state=state) as store:
            fd = os.open(src, os.O_RDONLY)
            try:
                with pytest.raises(RepositoryError, match="No space left"):
                    store.import_fd(fd)
            finally:
                os.close(fd)
        assert os.listdir(repo.objects_dir) == []


def test_source_changing_during_import_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    repo = Repository.init(tmp_path / "repo")
    src = tmp_path / "src"
    src.write_bytes(b"1" * 50_000)
    real = store_mod.copy_fd_data  # type: ignore[attr-defined]  # patched where the store looks it up

    def copy_then_touch(src_fd: int, dst_fd: int, state: Any) -> None:
        real(src_fd, dst_fd, state)
        with open(src, "r+b") as f:
            f.write(b"2")

    monkeypatch.setattr(store_mod, "copy_fd_data", copy_then_touch)
    with repo.object_store() as store:
        fd = os.open(src, os.O_RDONLY)
        try:
            with pytest.raises(SourceError, match="changed while it was being imported"):
                store.import_fd(fd)
        finally:
            os.close(fd)
    assert os.listdir(repo.objects_dir) == []


def test_digest_cache_is_trusted_only_for_unchanged_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = tmp_path / "src"
    files = simple_tree(src)
    old = 1_600_000_000
    repo = Repository.init(tmp_path / "repo")
    repo.create_image(src, ref="x")  # files just written: too recent to cache
    assert not repo.cache_dir.exists() or not list(repo.cache_dir.iterdir())
    hashed: list[int] = []
    real = store_mod.digest_fd  # type: ignore[attr-defined]

    def counting(fd: int, *args: Any, **kwargs: Any) -> bytes:
        hashed.append(fd)
        return real(fd, *args, **kwargs)

    real_hasher = store_mod.FsVerityHasher  # type: ignore[attr-defined]

    def counting_hasher(*args: Any, **kwargs: Any) -> Any:
        hashed.append(-1)
        return real_hasher(*args, **kwargs)

    monkeypatch.setattr(store_mod, "digest_fd", counting)
    monkeypatch.setattr(store_mod, "FsVerityHasher", counting_hasher)
    monkeypatch.setattr(digestcache_mod.DigestCache, "RACY_NS", -(10**18))  # cache everything now
    repo.create_image(src, ref="x")
    assert len(hashed) == 4  # a, b/c, b/same, big: the first run cached nothing
    [cache_file] = list(repo.cache_dir.iterdir())
    hashed.clear()
    again = repo.create_image(src, ref="x")
    assert hashed == [] and again.objects_written == 0
    # A changed file misses the cache (its ctime moved), even with the old size and mtime.
    data = bytearray(files["b/c"])
    data[0] ^= 1
    (src / "b" / "c").write_bytes(bytes(data))
    os.utime(src / "b" / "c", (old, old))
    changed = repo.create_image(src, ref="x")
    assert len(hashed) == 1 and hashed[0] >= 0 and changed.objects_written == 1
    assert repo.verify_image("x").ok
    # A cache hit whose object is gone is hashed while copied again.
    hashed.clear()
    gone = digest_bytes(files["big"]).hex()
    repo.object_path(gone).unlink()
    again = repo.create_image(src, ref="x")
    assert hashed == [-1]  # hashed as it was copied, in one pass
    assert again.objects_written == 1 and repo.object_path(gone).read_bytes() == files["big"]
    assert cache_file.exists()


def test_modes_do_not_depend_on_the_umask(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Under umask 0077 (composefsd.service has UMask=0077) a repository is made as
    readable as under 0022: missing parents and every directory in it 0755, objects
    0644; the repository itself 0700 and the digest cache private, as always."""
    src = tmp_path / "src"
    simple_tree(src)
    monkeypatch.setattr(digestcache_mod.DigestCache, "RACY_NS", -(10**18))  # cache everything now
    old = os.umask(0o077)
    try:
        repo = Repository.init(tmp_path / "new" / "parent" / "repo")
        repo.create_image(src, ref="app/v1/stable")
    finally:
        os.umask(old)
    assert [stat.S_IMODE((tmp_path / p).stat().st_mode) for p in ("new", "new/parent")] == [
        0o755,
        0o755,
    ]
    assert stat.S_IMODE(repo.path.stat().st_mode) == 0o700
    cache = [repo.cache_dir, *repo.cache_dir.iterdir()]
    assert len(cache) == 2
    modes = {}
    for path in repo.path.rglob("*"):
        st = path.lstat()
        if not stat.S_ISLNK(st.st_mode):
            modes[path] = stat.S_IMODE(st.st_mode)
    for path, mode in modes.items():
        if path in cache:
            assert mode == (0o700 if path == repo.cache_dir else 0o600), path
        else:
            assert mode == (0o755 if path.is_dir() else 0o644), path
    assert repo.refs_dir / "app" / "v1" in modes
    assert sum(p.parent.parent == repo.path / "objects" for p in modes) >= 4


# -- image operations ------------------------------------------------------------------------------


def test_list_describe_resolve_remove(tmp_path: Path, reference_bin: Path) -> None:
    one, two = tmp_path / "one", tmp_path / "two"
    simple_tree(one, seed=1)
    simple_tree(two, seed=2)
    repo = Repository.init(tmp_path / "repo")
    d1 = repo.create_image(one, ref="first").digest
    repo.create_image(one, ref="group/alias")
    d2 = repo.create_image(two).digest
    listing = {e.digest: e for e in repo.list_images()}
    assert set(listing) == {d1, d2}
    assert listing[d1].refs == ["first", "group/alias"] and listing[d2].refs == []
    assert listing[d1].size == (repo.images_dir / d1).stat().st_size
    assert listing[d1].created <= listing[d2].created

    details = repo.describe_image("first")
    c_objects = subprocess.run(
        [str(reference_bin / "composefs-info"), "objects", str(repo.images_dir / d1)],
        check=True,
        capture_output=True,
    ).stdout.split()
    assert details.object_count == len(c_objects) == 3
    assert (details.digest, details.refs, details.composefs_version) == (
        d1,
        ["first", "group/alias"],
        1,  # a new repository's images are V1
    )
    assert details.size == listing[d1].size and details.created == listing[d1].created

    for name in (d1, f"sha256:{d1}", "first", "refs/first", "group/alias"):
        assert repo.resolve_image(name) == d1
    with pytest.raises(ImageNotFoundError):
        repo.resolve_image("nothing")
    with pytest.raises(ImageNotFoundError):
        repo.resolve_image("0" * 64)
    with pytest.raises(ImageNotFoundError, match="directory of refs"):
        repo.resolve_image("group")
    with pytest.raises(ImageNotFoundError, match="no image or ref"):
        repo.resolve_image("first/below")
    with pytest.raises(InvalidNameError, match="sha512 digest"):
        repo.resolve_image("sha512:" + d1)
    with pytest.raises(InvalidNameError):
        repo.resolve_image("../first")

    repo.remove_ref("group/alias")
    assert not (repo.refs_dir / "group").exists()  # the emptied directory goes too
    with pytest.raises(ImageNotFoundError):
        repo.remove_ref("group/alias")
    repo.create_image(one, ref="again")
    assert sorted(repo.remove_image("first")) == ["again", "first"]
    assert [e.digest for e in repo.list_images()] == [d2]
    assert repo.object_path(d1).exists()  # until GC
    with pytest.raises(ImageNotFoundError):
        repo.describe_image(d1)
    assert repo.remove_image(d2) == []
    assert repo.list_images() == []
    assert repo.fsck().ok


def test_source_errors(tmp_path: Path) -> None:
    repo = Repository.init(tmp_path / "repo")
    with pytest.raises(SourceError, match="does not exist"):
        repo.create_image(tmp_path / "missing")
    (tmp_path / "file").write_text("x")
    with pytest.raises(SourceError, match="is not a directory"):
        repo.create_image(tmp_path / "file")
    with pytest.raises(ValueError, match="exclude each other"):
        CreateOptions(skip_xattrs=True, user_xattrs=True)
    assert repo.list_images() == [] and store_listing(repo.objects_dir) == {}


KILLED_PARENT = r"""
import sys
from composefsd.repository import CreateOptions, Repository
from composefsd.repository import importer
importer._PROCESS_MIN_BYTES = 0
importer._BATCH_FILES = 1
repo = Repository.open(sys.argv[1])
def progress(p):
    print(p.phase, p.done, flush=True)
repo.create_image(sys.argv[2], ref="never", options=CreateOptions(threads=2), progress=progress)
"""


def _past_user_space(pid: int, pidfd: int) -> bool:
    """Whether worker ``pid`` can no longer touch the repository: it has ended, or it
    is in the kernel's exit path with its files closed. (The kernel drops a
    process's flocks in exit_files(), after exit_mm(), so no user code runs after
    that; the task shows as running until exit_notify() makes it a zombie, and on
    a busy machine it can be preempted in between.)"""
    if select.select([pidfd], [], [], 0)[0]:
        return True  # exited: a zombie, or reaped already
    try:
        return os.listdir(f"/proc/{pid}/fd") == []
    except FileNotFoundError:
        return True


def test_killed_parent_leaves_workers_to_finish_cleanly(tmp_path: Path) -> None:
    """kill -9 of CreateImage while worker processes import: they finish their batch
    and exit, holding the repository lock until then (GC waits for them; once GC has
    the lock none of them can write any more), and the repository is clean, with no
    image and no ref."""
    src = tmp_path / "src"
    rng = random.Random(9)
    for i in range(200):
        (src / f"d{i % 5}").mkdir(parents=True, exist_ok=True)
        (src / f"d{i % 5}" / f"f{i}").write_bytes(rng.randbytes(400_000))
    repo = Repository.init(tmp_path / "repo")
    proc = subprocess.Popen(
        [sys.executable, "-c", KILLED_PARENT, str(repo.path), str(src)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    for line in proc.stdout:
        if line.startswith("import"):
            break
    # Kill once the workers run and have published something.
    deadline = time.monotonic() + 30
    children: list[str] = []
    while time.monotonic() < deadline:
        children = subprocess.run(
            ["pgrep", "-P", str(proc.pid)], capture_output=True, text=True
        ).stdout.split()
        if children and any(p.is_dir() for p in repo.objects_dir.iterdir()):
            break
        time.sleep(0.002)
    assert children, "no import workers were running"
    # pidfds name these very processes even after they are reaped (no pid reuse).
    pidfds = {int(pid): os.pidfd_open(int(pid)) for pid in children}
    try:
        proc.kill()
        proc.wait()
        stderr = proc.stderr.read() if proc.stderr else ""
        with gc_lock(repo.path, timeout=30):  # held by the workers until they exit
            assert all(_past_user_space(pid, fd) for pid, fd in pidfds.items())
            objects_at_lock = repo_objects(repo)
            # ...and they do end (a generous bound: this waits for an event).
            pending = list(pidfds.values())
            while pending:
                ready, _, _ = select.select(pending, [], [], 60)
                assert ready, "a worker did not finish exiting within 60 s"
                pending = [fd for fd in pending if fd not in ready]
            assert repo_objects(repo) == objects_at_lock
    finally:
        for fd in pidfds.values():
            os.close(fd)
    assert "Traceback" not in stderr
    assert repo.list_images() == [] and not (repo.refs_dir / "never").exists()
    report = repo.fsck()
    assert report.ok, report.problems
    left = repo_objects(repo)
    assert left  # some objects made it, complete (fsck checked their digests)
    assert repo.gc().objects_removed == len(left)
