"""Importing an OCI layer tar as ``cfsctl oci import-layer`` does (ocilayer.py)."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile
import threading
from functools import cache
from pathlib import Path

import pytest
from backports import zstd

from composefsd import splitstream as ss
from composefsd.repository import Repository
from composefsd.repository.errors import InvalidNameError
from composefsd.repository.ocilayer import LayerDigestError, TarFormatError, import_layer
from composefsd.repository.streams import cat, resolve_stream
from rsgolden import ALGORITHMS, RS, read_json

EXPECTED_OCI = RS / "expected" / "oci"
SAME_ZSTD = ss.zstd_version_info()[:3] == (1, 5, 4)


@cache
def layer_tar(name: str) -> bytes:
    """``$LAYERS/<name>.tar``: the decompressed blob MANIFEST.json names."""
    manifest = json.loads((RS / "inputs" / "oci" / "MANIFEST.json").read_text())
    for image in manifest["images"]:
        for layer in image["layers"]:
            if layer["name"] == name:
                hexdigest = layer["blob_digest"].partition(":")[2]
                blob = RS / "inputs" / "oci" / "layout" / "blobs" / "sha256" / hexdigest
                data: bytes = blob.read_bytes()
                if layer["compression"] == "gzip":
                    data = gzip.decompress(data)
                elif layer["compression"] == "zstd":
                    data = bytes(zstd.decompress(data))
                assert hashlib.sha256(data).hexdigest() == layer["diff_id"].partition(":")[2]
                return data
    raise KeyError(name)


def _imports(algorithm: str) -> list[tuple[str, str | None, str, str]]:
    """(diff_id, name, layer, printed hex id) of each recorded import-layer."""
    out = []
    for run in read_json(f"expected/oci/{algorithm}/import-layer.commands.json"):
        words = run["command"].split()
        if "import-layer" not in words:
            continue
        rest = words[words.index("import-layer") + 1 :]
        layer = Path(run["stdin"]).stem
        out.append(
            (
                rest[0],
                rest[1] if len(rest) > 1 else None,
                layer,
                run["stdout"].split(":")[1].strip(),
            )
        )
    return out


def _repo(tmp_path: Path, algorithm: str) -> Repository:
    return Repository.init(
        tmp_path / "repo", algorithm=f"fsverity-{algorithm}-12", verity="disabled"
    )


def _listing(root: Path, renamed: dict[str, str]) -> list[str]:
    """The stream links and object files under ``root``, as import-layer.listing.txt
    has them; the objects in ``renamed`` (our stream object -> cfsctl's) under
    cfsctl's names, so that another libzstd's bytes compare too."""
    lines = []
    for path in (root / "streams").rglob("*"):
        if path.is_symlink():
            target = os.readlink(path)
            digest = target.rpartition("/")[0][-2:] + target.rpartition("/")[2]
            if digest in renamed:
                target = f"../objects/{renamed[digest][:2]}/{renamed[digest][2:]}"
            lines.append(f"l {path.relative_to(root)} -> {target}")
    for path in (root / "objects").rglob("*"):
        if path.is_file():
            cfs = renamed.get(path.parent.name + path.name)
            rel = f"objects/{cfs[:2]}/{cfs[2:]}" if cfs else str(path.relative_to(root))
            lines.append(f"f {rel}")
    return sorted(lines)


def _chunks(raw: bytes, digest_size: int) -> list[dict[str, object]]:
    """A splitstream's chunks as the golden streams.json lists them."""
    out: list[dict[str, object]] = []
    for chunk in ss.iter_chunks(raw, ss.parse(raw, digest_size)):
        if isinstance(chunk, ss.ObjectChunk):
            out.append({"external": chunk.index, "object": chunk.digest})
        else:
            out.append({"inline": len(chunk), "sha256": hashlib.sha256(chunk).hexdigest()})
    return out


def _check_stream(ours: bytes, golden: dict[str, object], digest_size: int) -> None:
    parsed = ss.parse(ours, digest_size)
    assert list(parsed.refs.object_refs) == golden["object_refs"]
    assert parsed.stream_size == golden["info"]["stream_size"]  # type: ignore[index]
    assert parsed.refs.content_type == ss.CONTENT_TYPE_OCI_LAYER
    assert _chunks(ours, digest_size) == golden["chunks"]


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_golden_imports(tmp_path: Path, algorithm: str) -> None:
    repo = _repo(tmp_path, algorithm)
    golden = EXPECTED_OCI / algorithm / "streams-import-layer"
    decoded = json.loads((golden / "streams.json").read_text())
    renamed: dict[str, str] = {}
    for diff_id, name, layer, printed in _imports(algorithm):
        verify = not diff_id.endswith("0" * 64)
        got = import_layer(repo, io.BytesIO(layer_tar(layer)), diff_id, name, verify=verify)
        renamed[got] = printed
        ours = repo.object_path(got).read_bytes()
        if SAME_ZSTD:
            raw = (golden / f"oci-layer-{diff_id.replace(':', '_')}.splitstream").read_bytes()
            assert got == printed, (diff_id, layer)
            assert ours == raw
        _check_stream(ours, decoded[f"oci-layer-{diff_id}"], len(printed) // 2)
        out = io.BytesIO()
        with repo.object_store() as store:
            cat(store, got, out)
        assert out.getvalue() == layer_tar(layer)
        assert resolve_stream(repo, f"oci-layer-{diff_id}") == (f"oci-layer-{diff_id}", got)
    listing = (EXPECTED_OCI / algorithm / "import-layer.listing.txt").read_text().splitlines()
    expected = sorted(
        line.split(" size=")[0]
        for line in listing
        if line.startswith("l streams/") or line.startswith("f objects/")
    )
    assert _listing(repo.path, renamed) == expected
    report = repo.fsck()
    assert report.problems == []
    assert report.ok


def test_reimport_is_idempotent_and_reads_nothing(tmp_path: Path) -> None:
    repo = _repo(tmp_path, "sha256")
    diff_id, name, layer, _printed = _imports("sha256")[0]
    first = import_layer(repo, io.BytesIO(layer_tar(layer)), diff_id, name)
    unread = io.BytesIO(b"not read")
    assert import_layer(repo, unread, diff_id, "again") == first
    assert unread.tell() == 0
    assert os.readlink(repo.path / "streams" / "refs" / "again") == f"../oci-layer-{diff_id}"


def test_diff_id_mismatch_links_nothing(tmp_path: Path) -> None:
    repo = _repo(tmp_path, "sha256")
    _diff_id, _name, layer, _printed = _imports("sha256")[0]
    with pytest.raises(LayerDigestError, match="not its diff_id"):
        import_layer(repo, io.BytesIO(layer_tar(layer)), "sha256:" + "1" * 64, "bad")
    assert not (repo.path / "streams").exists() or not any((repo.path / "streams").rglob("*"))


def _tar(*members: tuple[str, bytes]) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


def _diff_id(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _with_checksum(header: bytearray) -> bytearray:
    header[148:156] = b" " * 8
    header[148:156] = f"{sum(header[:512]):06o}\0 ".encode()
    return header


def _hostile() -> dict[str, tuple[bytes, str]]:
    """Each hostile tar and the offset its error must name."""
    good = _tar(("a", b"x" * 1000), ("b" * 200, b"small"))
    bad_sum = bytearray(good)
    bad_sum[0] ^= 1
    huge = bytearray(_tar(("a", b"")))
    huge[124:136] = b"77777777777\0"
    huge_pax = bytearray(_tar(("a", b"")))
    huge_pax[156:157] = b"x"
    huge_pax[124:136] = b"00077777777\0"
    pax_at_end = bytearray(_tar(("a", b""))[:512])
    pax_at_end[156:157] = b"x"
    lone = _tar(("a", b"x"))[:1024] + bytes(512) + b"\1" * 512
    return {
        "truncated-data": (good[:700], "offset 700 in the data of the entry at offset 0"),
        "truncated-header": (good[:300], "offset 300 in a header"),
        "bad-checksum": (bytes(bad_sum), "header at offset 0 has a bad checksum"),
        "huge-size": (bytes(_with_checksum(huge)[:2048]), "offset 2048"),
        "huge-pax": (bytes(_with_checksum(huge_pax)[:2048]), "header at offset 0 is 16777215"),
        "not-tar": (b"hello, this is not a tar file at all" * 40, "offset 0"),
        "lone-zero-block": (lone, "lone zero block at offset 1024"),
        "pax-at-end": (bytes(_with_checksum(pax_at_end)), "offset 512 after an extension"),
    }


@pytest.mark.parametrize("case", sorted(_hostile()))
def test_hostile_tars_are_refused_and_leave_no_link(tmp_path: Path, case: str) -> None:
    repo = _repo(tmp_path, "sha256")
    data, where = _hostile()[case]
    with pytest.raises(TarFormatError, match=where):
        import_layer(repo, io.BytesIO(data), _diff_id(data), "name")
    assert not (repo.path / "streams").exists() or not any((repo.path / "streams").rglob("*"))
    assert repo.fsck().ok


@pytest.mark.parametrize("name", ["../x", "a/../b", "bad\nname", "", ".hidden"])
def test_bad_names_are_refused(tmp_path: Path, name: str) -> None:
    repo = _repo(tmp_path, "sha256")
    data = _tar(("a", b"x"))
    with pytest.raises(InvalidNameError):
        import_layer(repo, io.BytesIO(data), _diff_id(data), name)


@pytest.mark.parametrize("diff_id", ["sha256:abc", "md5:" + "0" * 32, "sha256:" + "g" * 64, "x"])
def test_bad_diff_ids_are_refused(tmp_path: Path, diff_id: str) -> None:
    repo = _repo(tmp_path, "sha256")
    with pytest.raises(InvalidNameError):
        import_layer(repo, io.BytesIO(b""), diff_id)


def test_large_and_small_files_split_as_composefs_rs(tmp_path: Path) -> None:
    repo = _repo(tmp_path, "sha256")
    data = _tar(("inline", b"i" * 64), ("external", b"e" * 65), ("long/" * 30 + "f", b"z" * 5000))
    got = import_layer(repo, io.BytesIO(data), _diff_id(data))
    raw = repo.object_path(got).read_bytes()
    parsed = ss.parse(raw, 32)
    assert len(parsed.refs.object_refs) == 2
    assert parsed.refs.content_type == ss.CONTENT_TYPE_OCI_LAYER
    out = io.BytesIO()
    with repo.object_store() as store:
        cat(store, got, out)
    assert out.getvalue() == data


_MEMORY_CHILD = r"""
import hashlib, io, resource, sys, tarfile
from composefsd.repository import Repository
from composefsd.repository.ocilayer import import_layer

SIZE = 200 << 20

class Gen(io.RawIOBase):
    def __init__(self, parts):
        self.parts, self.buf = iter(parts), b""
    def readable(self):
        return True
    def readinto(self, b):
        while not self.buf:
            self.buf = next(self.parts, None)
            if self.buf is None:
                return 0
        n = min(len(b), len(self.buf))
        b[:n] = self.buf[:n]
        self.buf = self.buf[n:]
        return n

def parts(h):
    info = tarfile.TarInfo("big")
    info.size = SIZE
    for p in (info.tobuf(tarfile.GNU_FORMAT),):
        h.update(p); yield p
    block = bytes(range(256)) * 4096
    for i in range(SIZE // len(block)):
        p = block[:-8] + i.to_bytes(8, "big")
        h.update(p); yield p
    h.update(bytes(1024)); yield bytes(1024)

h = hashlib.sha256()
for _ in parts(h):
    pass
diff_id = "sha256:" + h.hexdigest()
repo = Repository.init(sys.argv[1], algorithm="fsverity-sha256-12", verity="disabled")
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
import_layer(repo, io.BufferedReader(Gen(parts(hashlib.sha256()))), diff_id)
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print((after - before) // 1024)
"""


def test_memory_is_bounded(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-c", _MEMORY_CHILD, str(tmp_path / "repo")],
        check=True, capture_output=True, text=True,
    )  # fmt: skip
    grown_mib = int(out.stdout.strip())
    assert grown_mib < 40, f"peak RSS grew by {grown_mib} MiB for a 200 MiB layer"


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_golden_repository_imports(tmp_path: Path, algorithm: str) -> None:
    """The imports recorded on the tarred repositories: a nested ref name, and
    tree t2's tar (special files) as a layer."""
    repo = _repo(tmp_path, algorithm)
    runs = [
        r
        for r in read_json(f"expected/repos/repo-{algorithm}.commands.json")
        if " oci import-layer " in r.get("command", "")
    ]
    assert len(runs) == 2
    decoded = read_json(f"expected/repos/repo-{algorithm}.streams/streams.json")
    for run in runs:
        diff_id, name = run["command"].split()[-2:]
        stdin = Path(run["stdin"])
        if stdin.parent.name == "trees":
            data = gzip.decompress((RS / "inputs" / "trees" / f"{stdin.name}.gz").read_bytes())
        else:
            data = layer_tar(stdin.stem)
        got = import_layer(repo, io.BytesIO(data), diff_id, name)
        printed = run["stdout"].split(":")[1].strip()
        if SAME_ZSTD:
            assert got == printed
        ours = repo.object_path(got).read_bytes()
        _check_stream(ours, decoded[f"oci-layer-{diff_id}"], len(printed) // 2)
        link = repo.path / "streams" / "refs" / name
        assert os.readlink(link) == "../" * (name.count("/") + 1) + f"oci-layer-{diff_id}"


def test_import_from_a_pipe_with_short_writes(tmp_path: Path) -> None:
    """A pipe delivers the tar in pieces that match no header or block boundary."""
    repo = _repo(tmp_path, "sha256")
    diff_id, _name, layer, _printed = _imports("sha256")[0]
    data = layer_tar(layer)
    expected = import_layer(_repo(tmp_path / "other", "sha256"), io.BytesIO(data), diff_id)
    rfd, wfd = os.pipe()

    def feed() -> None:
        with open(wfd, "wb", buffering=0) as out:
            for start in range(0, len(data), 333):
                out.write(data[start : start + 333])

    thread = threading.Thread(target=feed)
    thread.start()
    try:
        with open(rfd, "rb", buffering=0) as reader:
            assert import_layer(repo, reader, diff_id) == expected
    finally:
        thread.join()
