"""org.composefs.Oci's layer transfer (service/rslayers.py) and the splitdirfdstream
format under it (image/splitdirfd.py, repository/layersync.py).

* The format against cfsctl's own bytes (``varlink/getlayer-single-l1.splitdirfdstream``
  of the golden data): our stored layer encodes to them, they decode to the layer;
  cfsctl's fd layout for that layer; hostile streams (truncated, oversized
  lengths, bad slots and names, unknown chunks) fail typed, without reading more
  than a piece at a time.
* Through a daemon: GetInfo/HasLayer/GetLayer as the transcript recorded them, the
  transcript's copy flow (GetLayer -> PutLayer with the right and a wrong diff_id
  -> FinalizeImage) between two repositories, hostile fds for PutLayer, callers
  without the daemon's rights, and a client that goes away in the middle of a
  GetLayer (the producer thread and every fd go with it).
"""

from __future__ import annotations

import gc
import hashlib
import io
import json
import os
import random
import shutil
import stat
import struct
import tarfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import servicehelpers
from composefsd.fsverity import digest_fd
from composefsd.image.splitdirfd import (
    MAX_FDS_PER_FRAME,
    MAX_INLINE_CHUNK,
    PIECE,
    ChunkTooLargeError,
    DirfdIndexError,
    FileBacked,
    FilenameError,
    InlineData,
    Metadata,
    StreamReader,
    StreamWriter,
    TruncatedError,
    UnknownChunkTypeError,
    frame_sizes,
    plan_layout,
    seed_from_id,
)
from composefsd.repository import Repository, oci
from composefsd.repository.layersync import drain, produce
from composefsd.repository.ocilayer import import_layer
from composefsd.repository.store import ObjectStore
from composefsd.repository.streams import existing_stream
from composefsd.service import rslayers
from composefsd.service.context import CallContext, Peer, VarlinkReplyError
from composefsd.service.rshandles import HandleTable
from composefsd.service.rslayers import InvalidDigestError, may_link, oci_digest
from conftest import TestUsers
from layerclient import LayerClient as Client
from rsgolden import RS, unpack_repo
from servicehelpers import Daemon, start_daemon
from users import UserPython, run_as

VARLINK = RS / "varlink"
GOLDEN = VARLINK / "getlayer-single-l1.splitdirfdstream"
DIFF_ID = "sha256:75ec5fc207bf04ed80bdf00113363d5e73152da8711eacccbea7e45cd13bfc5c"
LAYER_VERITY = "39db76107cdc63b74f7663656e32b32862d884d5ce65cac801846617a2f77679"
OCI = "org.composefs.Oci."
REPO_IFACE = "org.composefs.Repository."
DENIED = {"error": "org.varlink.service.PermissionDenied", "parameters": {}}


def transcript() -> dict[int, dict[str, Any]]:
    with open(VARLINK / "transcript.jsonl", encoding="utf-8") as f:
        return {e["seq"]: e for e in map(json.loads, f)}


def replies_of(seq: int) -> list[dict[str, Any]]:
    replies: list[dict[str, Any]] = transcript()[seq]["replies"]
    # cfsctl sends "continues": false on final replies; composefsd leaves it out.
    return [{k: v for k, v in r.items() if not (k == "continues" and v is False)} for r in replies]


def reply_of(seq: int) -> dict[str, Any]:
    (reply,) = replies_of(seq)
    return reply


@pytest.fixture(scope="module")
def golden_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return unpack_repo("sha256", tmp_path_factory.mktemp("rs-layers"))


# -- the format ----------------------------------------------------------------------------


def rebuild(stream: bytes, dirs: dict[int, Path]) -> bytes:
    """The bytes a stream stands for, its files read from ``dirs`` by slot."""
    out = io.BytesIO()
    for chunk, body in StreamReader(io.BytesIO(stream), max(dirs) + 1).chunks():
        if isinstance(chunk, FileBacked):
            out.write((dirs[chunk.index] / os.fsdecode(chunk.filename)).read_bytes())
        else:
            out.write(body)
    return out.getvalue()


def test_golden_stream_is_our_stored_layer(golden_repo: Path) -> None:
    repo = Repository.open(golden_repo)
    assert existing_stream(repo, "oci-layer-" + DIFF_ID) == LAYER_VERITY
    out = io.BytesIO()
    with repo.object_store() as store:
        produce(store, LAYER_VERITY, 1, out)
    assert out.getvalue() == GOLDEN.read_bytes()


def test_golden_stream_decodes_to_the_layer(golden_repo: Path) -> None:
    data = GOLDEN.read_bytes()
    chunks = list(StreamReader(io.BytesIO(data), 2).chunks())
    files = [c for c, _ in chunks if isinstance(c, FileBacked)]
    assert len(files) == 3
    assert {c.index for c in files} == {1}
    assert all(isinstance(c, Metadata | FileBacked) for c, _ in chunks)
    tar = rebuild(data, {1: golden_repo / "objects"})
    assert "sha256:" + hashlib.sha256(tar).hexdigest() == DIFF_ID
    # ...and every object it names is one of the repository's, by its content.
    for c in files:
        fd = os.open(golden_repo / "objects" / os.fsdecode(c.filename), os.O_RDONLY)
        try:
            assert digest_fd(fd, "sha256").hex() == os.fsdecode(c.filename).replace("/", "")
        finally:
            os.close(fd)


def test_layout_is_cfsctls() -> None:
    entry = transcript()[51]
    layout = entry["fd_layout"]
    plan = plan_layout(1, seed_from_id("oci-layer-" + DIFF_ID), more=True)
    assert plan.dir_count == layout["dir_fds"] == 2
    assert plan.total == layout["total"] == 5
    assert 1 + plan.extra_lifetime == layout["lifetime_fds"]
    assert layout["dir_fd_targets"][plan.real_slots[0]] == "$REPO/objects"
    assert len(plan.frames) == len(entry["replies"])
    assert plan_layout(1, seed_from_id("oci-layer-" + DIFF_ID), more=False).frames == (5,)
    # composefs-rs's own unit test values (transport.rs): the seed of an id, the
    # placeholders and lifetime fds of two real directories, the frames of 9 fds.
    seed = seed_from_id("child-layer-001")
    assert seed == 9_551_015_030_439_334_514
    two = plan_layout(2, seed, more=True)
    assert (two.dir_count, len(two.real_slots), two.extra_lifetime) == (5, 2, 2)
    assert len(frame_sizes(9, seed, True)) == 4


@pytest.mark.parametrize("count", [1, 2, 3, 240, 241, 1000, 5000])
def test_frames_stay_under_the_kernel_limit(count: int) -> None:
    for seed in (0, 1, 42, 2**64 - 1):
        sizes = frame_sizes(count, seed, True)
        assert sum(sizes) == count
        assert max(sizes) <= MAX_FDS_PER_FRAME
        assert min(sizes) >= 1
        assert frame_sizes(count, seed, False) == (count,)


def test_round_trip() -> None:
    rnd = random.Random(15)
    written: list[tuple[object, bytes]] = []
    out = io.BytesIO()
    w = StreamWriter(out)
    for _ in range(300):
        kind = rnd.randrange(3)
        if kind == 0:
            data = rnd.randbytes(rnd.randrange(1, 3000))
            w.metadata(data)
            written.append((Metadata(len(data)), data))
        elif kind == 1:
            data = rnd.randbytes(rnd.randrange(0, 3000))
            w.inline_data(data)
            written.append((InlineData(len(data)), data))
        else:
            chunk = FileBacked(
                rnd.randrange(4), rnd.randrange(2**64), b"ab/" + os.urandom(4).hex().encode()
            )
            w.file_backed(chunk.index, chunk.length, chunk.filename)
            written.append((chunk, b""))
    w.metadata(b"")  # nothing: composefs-rs never writes an empty Metadata chunk
    assert list(StreamReader(io.BytesIO(out.getvalue()), 4).chunks()) == written


def test_every_cut_is_truncated_or_a_chunk_boundary() -> None:
    out = io.BytesIO()
    w = StreamWriter(out)
    w.metadata(b"header")
    w.file_backed(0, 5, b"aa/bb")
    w.inline_data(b"")
    w.inline_data(b"xyz")
    data = out.getvalue()
    boundaries = {0, 11, 11 + 17 + 5, 11 + 17 + 5 + 5, len(data)}
    for cut in range(len(data) + 1):
        reader = StreamReader(io.BytesIO(data[:cut]), 1)
        if cut in boundaries:
            list(reader.chunks())
        else:
            with pytest.raises(TruncatedError):
                list(reader.chunks())


class CountingSource(io.BytesIO):
    """Records the largest read asked for: bodies must come in bounded pieces."""

    def __init__(self, data: bytes) -> None:
        super().__init__(data)
        self.largest = 0

    def read(self, n: int | None = -1, /) -> bytes:
        assert n is not None and n >= 0, "unbounded read"
        self.largest = max(self.largest, n)
        return super().read(n)


def test_declared_lengths_are_bounded() -> None:
    # The largest body allowed, declared but not sent: read in pieces, then truncated.
    src = CountingSource(b"\x00" + struct.pack("<I", MAX_INLINE_CHUNK) + b"x" * 10)
    with pytest.raises(TruncatedError):
        list(StreamReader(src).chunks())
    assert src.largest <= PIECE
    for kind in (0, 1):
        with pytest.raises(ChunkTooLargeError):
            StreamReader(io.BytesIO(bytes([kind]) + struct.pack("<I", 0xFFFFFFFF))).next()
    huge_name = b"\x02" + struct.pack("<QII", 1, 0, 0xFFFFFFFF)
    with pytest.raises(ChunkTooLargeError):
        StreamReader(io.BytesIO(huge_name), 1).next()


@pytest.mark.parametrize("kind", [3, 0x7F, 0xFF])
def test_unknown_chunk_type(kind: int) -> None:
    with pytest.raises(UnknownChunkTypeError, match=f"0x{kind:02x}"):
        StreamReader(io.BytesIO(bytes([kind]))).next()


def file_chunk(index: int, name: bytes, length: int = 100) -> bytes:
    return b"\x02" + struct.pack("<QII", length, index, len(name)) + name


def test_bad_directory_slot() -> None:
    with pytest.raises(DirfdIndexError):
        StreamReader(io.BytesIO(file_chunk(2, b"aa/bb")), 2).next()
    with pytest.raises(DirfdIndexError):
        StreamReader(io.BytesIO(file_chunk(0xFFFFFFFF, b"aa/bb")), 2).next()


@pytest.mark.parametrize(
    "name", [b"", b"..", b"../x", b"a/../b", b"a/..", b"/etc/passwd", b"a\0b", b"x" * 4097]
)
def test_bad_names(name: bytes) -> None:
    with pytest.raises((FilenameError, ChunkTooLargeError)):
        StreamReader(io.BytesIO(file_chunk(0, name)), 1).next()
    with pytest.raises((FilenameError, ChunkTooLargeError)):
        StreamWriter(io.BytesIO()).file_backed(0, 1, name)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("not-a-digest", "missing ':' in digest"),
        (":abc", "Empty algorithm component"),
        ("Sha256:abc", "Invalid algorithm component: Sha256"),
        ("sha256:", "Empty algorithm value"),
        ("sha256:a/b", "Invalid encoded value a/b"),
        ("sha256:abc", "Invalid digest length 3 expected 64"),
        ("sha256:" + "A" * 64, "Invalid non-hexadecimal character in digest: " + "A" * 64),
    ],
)
def test_digest_messages_are_oci_specs(text: str, message: str) -> None:
    with pytest.raises(InvalidDigestError) as info:
        oci_digest(text)
    assert str(info.value) == message


def test_may_link() -> None:
    def st(mode: int, uid: int = 0) -> os.stat_result:
        return os.stat_result((mode, 1, 1, 1, uid, 0, 100, 0, 0, 0))

    assert may_link(st(stat.S_IFREG | 0o644))
    assert may_link(st(stat.S_IFREG | 0o444))
    assert not may_link(st(stat.S_IFREG | 0o664))  # group-writable
    assert not may_link(st(stat.S_IFREG | 0o646))  # writable by others
    assert not may_link(st(stat.S_IFREG | 0o4755))  # set-uid
    assert not may_link(st(stat.S_IFREG | 0o644, uid=12345))  # somebody else's
    assert not may_link(st(stat.S_IFLNK | 0o777))


# -- through the daemon --------------------------------------------------------------------


def close_all(fds: list[int]) -> None:
    for fd in fds:
        os.close(fd)


class Served:
    def __init__(self, daemon: Daemon, src: Path, work: Path) -> None:
        self.daemon = daemon
        self.src = src
        self.work = work
        self.client = Client(daemon.address)
        self.src_handle = self.open(src)

    def open(self, path: Path) -> int:
        reply = self.client.one(REPO_IFACE + "OpenRepository", {"path": str(path)})
        handle: int = reply["parameters"]["handle"]
        return handle

    def new_repo(self, name: str) -> tuple[Path, int]:
        path = self.work / name
        reply = self.client.one(
            REPO_IFACE + "InitRepository",
            {"path": str(path), "algorithm": "fsverity-sha256-12", "insecure": True},
        )
        assert reply == {"parameters": {"created": True}}
        return path, self.open(path)

    def threads(self) -> int:
        return len(os.listdir(f"/proc/{self.daemon.proc.pid}/task"))

    def fds(self) -> int:
        return len(os.listdir(f"/proc/{self.daemon.proc.pid}/fd"))


def many_files_layer(count: int) -> tuple[bytes, str]:
    """A layer tar of ``count`` files of 100 bytes (objects) and its diff_id."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for i in range(count):
            data = f"file {i:06d} ".encode() * 8
            info = tarfile.TarInfo(f"usr/share/many/{i:06d}")
            info.size = len(data)
            info.mtime = 0
            tar.addfile(info, io.BytesIO(data))
    data = out.getvalue()
    return data, "sha256:" + hashlib.sha256(data).hexdigest()


MANY_FILES, MANY_DIFF_ID = many_files_layer(3000)


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, test_users: TestUsers) -> Iterator[Served]:
    work = servicehelpers.short_dir("cfsd-rsl-")
    os.chmod(work, 0o755)
    src = unpack_repo("sha256", tmp_path_factory.mktemp("rs-layers-src"))
    import_layer(Repository.open(src), io.BytesIO(MANY_FILES), MANY_DIFF_ID)
    daemon = start_daemon(work / "own", "--group", str(test_users.group), public=True)
    try:
        yield Served(daemon, src, work)
    finally:
        status = daemon.stop()
        shutil.rmtree(work, ignore_errors=True)
        assert status == 0, daemon.log_text()


def test_get_info_and_has_layer(served: Served) -> None:
    c = served.client
    assert c.one(OCI + "GetInfo") == reply_of(20)
    h = served.src_handle
    assert c.one(OCI + "HasLayer", {"handle": h, "diff_id": DIFF_ID}) == reply_of(39)
    absent = "sha256:" + "1" * 64
    assert c.one(OCI + "HasLayer", {"handle": h, "diff_id": absent}) == reply_of(40)
    assert c.one(OCI + "HasLayer", {"handle": h, "diff_id": "not-a-digest"}) == reply_of(41)
    # A well-formed digest of another algorithm names no layer (never looked up).
    assert c.one(OCI + "HasLayer", {"handle": h, "diff_id": "foo:bar"})["parameters"] == {
        "present": False,
        "layer_verity": None,
    }
    assert c.one(OCI + "HasLayer", {"handle": 9999, "diff_id": DIFF_ID}) == {
        "error": OCI + "InvalidHandle",
        "parameters": {"handle": 9999},
    }


def test_get_layer_is_the_transcripts(served: Served) -> None:
    c = served.client
    replies, fds = c.call(
        OCI + "GetLayer",
        {"handle": served.src_handle, "params": {"diff_id": DIFF_ID, "consumer_has_cap_dac_override": True}},
        more=True,
    )  # fmt: skip
    try:
        assert replies == replies_of(51)
        layout = transcript()[51]["fd_layout"]
        assert len(fds) == layout["total"]
        assert stat.S_ISFIFO(os.fstat(fds[0]).st_mode)
        assert os.readlink(f"/proc/self/fd/{fds[1]}") == "/dev/null"
        objects = os.fstat(fds[2])
        assert (objects.st_dev, objects.st_ino) == (
            os.stat(served.src / "objects").st_dev,
            os.stat(served.src / "objects").st_ino,
        )
        assert stat.S_ISFIFO(os.fstat(fds[3]).st_mode)  # the lifetime fd
        with os.fdopen(os.dup(fds[0]), "rb") as pipe:
            assert pipe.read() == GOLDEN.read_bytes()
    finally:
        close_all(fds)
    # Without "more": the same fds with the one reply.
    replies, fds = c.call(
        OCI + "GetLayer",
        {"handle": served.src_handle, "params": {"diff_id": DIFF_ID, "consumer_has_cap_dac_override": False}},
    )  # fmt: skip
    close_all(fds)
    assert replies == [{"parameters": {"dir_count": 2}}]
    assert len(fds) == 5


def test_get_layer_errors(served: Served) -> None:
    c = served.client
    h = served.src_handle
    absent = "sha256:" + "3" * 64
    params = {"diff_id": absent, "consumer_has_cap_dac_override": False}
    assert c.one(OCI + "GetLayer", {"handle": h, "params": params}) == reply_of(62)
    nothing = c.one(
        OCI + "GetLayer", {"handle": h, "params": {"consumer_has_cap_dac_override": False}}
    )
    assert nothing["error"] == OCI + "InvalidRequest"
    storage = {"storage": {"storage_path": "/var/lib/containers/storage", "layer_id": "x"},
               "consumer_has_cap_dac_override": False}  # fmt: skip
    reply = c.one(OCI + "GetLayer", {"handle": h, "params": storage})
    assert reply["error"] == OCI + "InvalidRequest"
    assert "containers-storage" in reply["parameters"]["message"]
    bad = c.one(
        OCI + "GetLayer",
        {"handle": h, "params": {"diff_id": "x", "consumer_has_cap_dac_override": False}},
    )
    assert bad == {
        "error": OCI + "InvalidDigest",
        "parameters": {"message": "missing ':' in digest"},
    }


def golden_pipe(data: bytes) -> tuple[int, threading.Thread, list[BaseException]]:
    """A pipe's read end with ``data`` written into it by a thread (which records
    what it raised: a PutLayer must drain the pipe, so the writer never fails)."""
    r, w = os.pipe()
    errors: list[BaseException] = []

    def write() -> None:
        try:
            with os.fdopen(w, "wb") as f:
                f.write(data)
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=write, daemon=True)
    thread.start()
    return r, thread, errors


def put_layer(
    served: Served, handle: int, diff_id: str, data: bytes, dirs: list[int]
) -> dict[str, Any]:
    r, writer, errors = golden_pipe(data)
    try:
        reply = served.client.one(
            OCI + "PutLayer",
            {"handle": handle, "diff_id": diff_id, "zerocopy": False},
            fds=[r, *dirs],
        )
    finally:
        os.close(r)
    writer.join(60)
    assert not writer.is_alive() and not errors, errors
    return reply


def objects_named_by_content(repo: Path) -> None:
    for sub in (repo / "objects").iterdir():
        if sub.is_dir():
            for obj in sub.iterdir():
                fd = os.open(obj, os.O_RDONLY)
                try:
                    assert digest_fd(fd, "sha256").hex() == sub.name + obj.name
                finally:
                    os.close(fd)


def test_copy_flow(served: Served) -> None:
    c = served.client
    dst, handle = served.new_repo("copy-dst")
    _, nothing = served.new_repo("wrong-dst")
    devnull = os.open("/dev/null", os.O_RDONLY)
    objects = os.open(served.src / "objects", os.O_RDONLY | os.O_DIRECTORY)
    wrong = "sha256:" + "2" * 64
    try:
        # A wrong diff_id first, into a repository of its own: nothing is stored.
        reply = put_layer(served, nothing, wrong, GOLDEN.read_bytes(), [devnull, objects])
        assert reply == reply_of(56)
        absent = c.one(OCI + "HasLayer", {"handle": nothing, "diff_id": DIFF_ID})
        assert absent == reply_of(40)
        # The transcript's: cfsctl's bytes, fed to PutLayer with the recorded dir fds.
        reply = put_layer(served, handle, DIFF_ID, GOLDEN.read_bytes(), [devnull, objects])
        assert put_layer(served, handle, wrong, GOLDEN.read_bytes(), [devnull, objects]) == (
            reply_of(56)
        )
    finally:
        os.close(devnull)
        os.close(objects)
    expected = reply_of(55)["parameters"]
    got = reply["parameters"]
    # Root's 0644 objects on one filesystem: reflinked where it can, else linked.
    assert got["objects_reflinked"] + got["objects_hardlinked"] == 3
    assert {
        k: v for k, v in got.items() if k not in ("objects_reflinked", "objects_hardlinked")
    } == {k: v for k, v in expected.items() if k not in ("objects_reflinked", "objects_hardlinked")}
    assert c.one(OCI + "HasLayer", {"handle": handle, "diff_id": DIFF_ID}) == reply_of(61)
    # Again, straight from the source's GetLayer: already there.
    replies, fds = c.call(
        OCI + "GetLayer",
        {"handle": served.src_handle, "params": {"diff_id": DIFF_ID, "consumer_has_cap_dac_override": True}},
        more=True,
    )  # fmt: skip
    dir_count = replies[0]["parameters"]["dir_count"]
    try:
        again = c.one(
            OCI + "PutLayer",
            {"handle": handle, "diff_id": DIFF_ID, "zerocopy": False},
            fds=fds[: 1 + dir_count],
        )
    finally:
        close_all(fds)
    assert again["parameters"]["already_present"] is True
    assert again["parameters"]["objects_already_present"] == 3
    assert again["parameters"]["layer_verity"] == LAYER_VERITY

    finalize = transcript()[58]["request"]["parameters"]
    for _ in range(2):  # idempotent
        reply = c.one(OCI + "FinalizeImage", {**finalize, "handle": handle})
        assert reply == reply_of(58)
    repo = Repository.open(dst)
    (tag, image), = oci.list_images(repo)  # fmt: skip
    assert tag == "copied"
    assert image.manifest_digest == reply_of(59)["parameters"]["images"][0]["manifest_digest"]
    assert image.erofs_image(repo.erofs_version) == reply_of(60)["parameters"]["image_id"]
    objects_named_by_content(dst)


def test_finalize_never_trusts_layer_verity(served: Served) -> None:
    c = served.client
    _, handle = served.new_repo("finalize-dst")
    objects = os.open(served.src / "objects", os.O_RDONLY | os.O_DIRECTORY)
    try:
        assert "error" not in put_layer(
            served, handle, DIFF_ID, GOLDEN.read_bytes(), [objects, objects]
        )
    finally:
        os.close(objects)
    finalize = transcript()[58]["request"]["parameters"]

    def with_layer(**layer: str) -> dict[str, Any]:
        return c.one(OCI + "FinalizeImage", {**finalize, "handle": handle, "name": "x",
                                             "layers": [{**finalize["layers"][0], **layer}]})  # fmt: skip

    other = with_layer(layer_verity="ab" * 32)
    assert other["error"] == OCI + "InvalidRequest"
    assert with_layer(layer_verity="zz") == {
        "error": OCI + "InvalidDigest",
        "parameters": {"message": "layer_verity 'zz': not 64 hex digits"},
    }
    unknown = "sha256:" + "4" * 64
    assert with_layer(diff_id=unknown) == {
        "error": OCI + "NoSuchLayer",
        "parameters": {"diff_id": unknown},
    }
    lying = c.one(OCI + "FinalizeImage", {**finalize, "handle": handle, "config_json": "{}"})
    assert lying["error"] == OCI + "InvalidRequest"
    assert c.one(OCI + "HasLayer", {"handle": handle, "diff_id": DIFF_ID})["parameters"]["present"]


def test_put_layer_hostile_fds(served: Served, tmp_path: Path) -> None:
    c = served.client
    dst, handle = served.new_repo("hostile-dst")
    golden = GOLDEN.read_bytes()
    params = {"handle": handle, "diff_id": DIFF_ID, "zerocopy": False}

    reply = c.one(OCI + "PutLayer", params)
    assert reply == {
        "error": OCI + "InvalidRequest",
        "parameters": {"message": "expected at least 2 fds (1 pipe + >=1 dir fd), got 0"},
    }
    (tmp_path / "stream").write_bytes(golden)
    regular = os.open(tmp_path / "stream", os.O_RDONLY)
    objects = os.open(served.src / "objects", os.O_RDONLY | os.O_DIRECTORY)
    try:
        reply = c.one(OCI + "PutLayer", params, fds=[regular, objects, objects])
        assert reply["error"] == OCI + "InvalidRequest"
        assert "pipe" in reply["parameters"]["message"]
    finally:
        os.close(regular)

    def refused(dirs: list[int], data: bytes = golden, error: str = "InvalidRequest") -> str:
        reply = put_layer(served, handle, DIFF_ID, data, dirs)
        assert reply["error"] == OCI + error, reply
        message: str = reply["parameters"].get("message", "")
        return message

    # The stream names slot 1; a placeholder (/dev/null) there is no directory.
    devnull = os.open("/dev/null", os.O_RDONLY)
    try:
        assert "not a directory" in refused([objects, devnull])
    finally:
        os.close(devnull)
    # A symlink farm pointing outside: neither directories nor files are followed.
    outside = tmp_path / "outside"
    shutil.copytree(served.src / "objects", outside, symlinks=True)
    farm = tmp_path / "farm"
    farm.mkdir()
    for sub in outside.iterdir():
        (farm / sub.name).symlink_to(sub)
    farm2 = tmp_path / "farm2"
    for sub in outside.iterdir():
        (farm2 / sub.name).mkdir(parents=True)
        for obj in sub.iterdir():
            (farm2 / sub.name / obj.name).symlink_to(obj)
    for directory in (farm, farm2):
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            assert "symbolic link" in refused([fd, fd])
        finally:
            os.close(fd)
    # Objects whose content is not what their names say (same size): the layer is
    # not the diff_id's, and nothing enters the repository under a false name.
    forged = tmp_path / "forged"
    shutil.copytree(served.src / "objects", forged)
    for sub in sorted(p for p in forged.iterdir() if p.is_dir()):
        for obj in sub.iterdir():
            data = bytearray(obj.read_bytes())
            data[0] ^= 0xFF
            obj.chmod(0o644)
            obj.write_bytes(bytes(data))
    fd = os.open(forged, os.O_RDONLY | os.O_DIRECTORY)
    try:
        assert refused([fd, fd], error="DiffIdMismatch") == ""
    finally:
        os.close(fd)
    # A file of another length than the stream says.
    short = tmp_path / "short"
    shutil.copytree(served.src / "objects", short)
    for sub in sorted(p for p in short.iterdir() if p.is_dir()):
        for obj in sub.iterdir():
            obj.chmod(0o644)
            obj.write_bytes(obj.read_bytes()[:-1])
    fd = os.open(short, os.O_RDONLY | os.O_DIRECTORY)
    try:
        assert "the stream says" in refused([fd, fd])
    finally:
        os.close(fd)
    sha512 = "sha512:" + "5" * 128
    r, writer, errors = golden_pipe(golden)
    try:
        reply = c.one(OCI + "PutLayer", {**params, "diff_id": sha512}, fds=[r, objects])
    finally:
        os.close(r)
    writer.join(60)
    assert not errors
    assert reply == {
        "error": OCI + "InternalError",
        "parameters": {
            "message": 'unsupported diff_id algorithm "sha512": only sha256 is supported'
        },
    }
    # Garbage and a truncated stream: refused, and the pipe drained to its end.
    assert "bad splitdirfdstream" in refused([objects, objects], b"\x07" + os.urandom(1 << 20))
    assert "bad splitdirfdstream" in refused([objects, objects], golden[:-3])
    os.close(objects)
    assert (
        c.one(OCI + "HasLayer", {"handle": handle, "diff_id": DIFF_ID})["parameters"]["present"]
        is False
    )
    objects_named_by_content(dst)


PEER = r"""
import json, os, socket, struct, sys
path, method, params = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.connect(path)
r, w = os.pipe()
data = json.dumps({"method": method, "parameters": params}).encode() + b"\0"
s.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack("2i", r, r))])
buf = b""
while not buf.endswith(b"\0"):
    buf += s.recv(65536)
print(buf[:-1].decode())
"""


def test_callers_without_the_daemons_rights(
    served: Served, test_users: TestUsers, user_python: UserPython
) -> None:
    """alice is in the daemon's --group (the transport lets her call every method),
    bob is not: neither may pass directory fds across."""
    calls = [
        (
            "GetLayer",
            {"handle": 1, "params": {"diff_id": DIFF_ID, "consumer_has_cap_dac_override": False}},
        ),
        ("PutLayer", {"handle": 1, "diff_id": DIFF_ID, "zerocopy": False}),
    ]
    for user in (test_users.alice, test_users.bob):
        for method, params in calls:
            out = run_as(
                user,
                user_python.command("-c", PEER, served.daemon.address, OCI + method, json.dumps(params)),
                env=user_python.env, capture_output=True, text=True, check=True,
            )  # fmt: skip
            assert json.loads(out.stdout) == DENIED, (user, method, out)


def wait_until(predicate: Any, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, what
        time.sleep(0.02)


def test_client_gone_mid_get_layer(served: Served) -> None:
    """A stream larger than a pipe holds: the producer blocks on the full pipe until
    the client goes away, then stops; its thread and every fd go."""
    params = {
        "handle": served.src_handle,
        "params": {"diff_id": MANY_DIFF_ID, "consumer_has_cap_dac_override": False},
    }
    # At most as many fds as before, not exactly: a connection an earlier test of
    # this module closed may still be on its way out of the daemon when this count
    # is taken, and go later.
    fds_before = served.fds()
    # Once through, read to the end, to let the daemon start the workers it keeps.
    _, fds = served.client.call(OCI + "GetLayer", params, more=True)
    with os.fdopen(os.dup(fds[0]), "rb") as pipe:
        whole = pipe.read()
    close_all(fds)
    assert len(whole) > 4 * 65536
    wait_until(lambda: served.fds() <= fds_before, "the first producer is done")
    threads = served.threads()

    client = Client(served.daemon.address)
    _, fds = client.call(OCI + "GetLayer", params, more=True)
    assert os.read(fds[0], 1000)
    # The producer waits on the full pipe, holding its end of it and the lock.
    assert served.fds() > fds_before
    close_all(fds)
    client.close()
    wait_until(lambda: served.fds() <= fds_before, "the daemon's fds are back")
    wait_until(lambda: served.threads() <= threads, "the producer thread ended")

    # Gone before the replies could be sent: nothing stays either.
    client = Client(served.daemon.address)
    client.send(OCI + "GetLayer", params, more=True)
    client.close()
    wait_until(lambda: served.fds() <= fds_before, "no fd left")
    wait_until(lambda: served.threads() <= threads, "no producer left")
    # The daemon still serves.
    assert served.client.one(OCI + "GetInfo") == reply_of(20)


def test_many_files_layer_copies(served: Served) -> None:
    """A layer of 3000 objects, GetLayer to PutLayer through the daemon."""
    _, handle = served.new_repo("many-dst")
    c = served.client
    replies, fds = c.call(
        OCI + "GetLayer",
        {"handle": served.src_handle, "params": {"diff_id": MANY_DIFF_ID, "consumer_has_cap_dac_override": False}},
        more=True,
    )  # fmt: skip
    dir_count = replies[0]["parameters"]["dir_count"]
    try:
        reply = c.one(
            OCI + "PutLayer",
            {"handle": handle, "diff_id": MANY_DIFF_ID, "zerocopy": False},
            fds=fds[: 1 + dir_count],
        )
    finally:
        close_all(fds)
    got = reply["parameters"]
    assert got["already_present"] is False
    assert (
        got["objects_reflinked"]
        + got["objects_hardlinked"]
        + got["objects_copied"]
        + got["objects_already_present"]
        == 3000
    )
    src_stream = existing_stream(Repository.open(served.src), "oci-layer-" + MANY_DIFF_ID)
    assert got["layer_verity"] == src_stream


def test_producers_are_bounded(golden_repo: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """In process: with one producer place taken, GetLayer refuses, leaking nothing,
    until the client of the first closes its fds."""
    monkeypatch.setattr(rslayers, "_producers", threading.BoundedSemaphore(1))
    handles = HandleTable(Repository.open(golden_repo))
    handle = handles.open(Repository.open(golden_repo), os.geteuid()).handle
    params = {"diff_id": DIFF_ID, "consumer_has_cap_dac_override": False}

    def call() -> CallContext:
        ctx = CallContext(Peer(os.getpid(), os.geteuid(), os.getegid()), OCI + "GetLayer")
        assert rslayers.get_layer(handles, ctx, handle, params) == {"dir_count": 2}
        return ctx

    first = call()
    # Read to the end: the producer then only waits for the lifetime fd.
    with os.fdopen(first.out_fds.pop(0), "rb") as pipe:
        assert pipe.read() == GOLDEN.read_bytes()
    # Sockets of earlier tests that nothing refers to any more close now, not below.
    gc.collect()
    before = len(os.listdir("/proc/self/fd"))
    with pytest.raises(VarlinkReplyError) as info:
        call()
    assert info.value.name == OCI + "InternalError"
    gc.collect()
    assert len(os.listdir("/proc/self/fd")) == before
    first.close_fds()  # the lifetime fd with them: the producer ends
    deadline = time.monotonic() + 30
    while True:
        try:
            call().close_fds()
            break
        except VarlinkReplyError:
            assert time.monotonic() < deadline, "the producer place was never given back"
            time.sleep(0.02)


@pytest.mark.parametrize("change", ["owner", "mode"])
def test_put_layer_never_links_what_others_can_change(
    served: Served, test_users: TestUsers, tmp_path: Path, change: str
) -> None:
    """Objects owned by a user, or writable by a group: copied (hashed as they are
    copied) or reflinked, never hard-linked; the repository's objects are other
    inodes than theirs."""
    theirs = tmp_path / "theirs"
    shutil.copytree(served.src / "objects", theirs)
    sources = [obj for sub in theirs.iterdir() if sub.is_dir() for obj in sub.iterdir()]
    for obj in sources:
        if change == "owner":
            os.chown(obj, test_users.bob.uid, test_users.bob.gid)
        else:
            obj.chmod(0o664)
    dst, handle = served.new_repo(f"theirs-{change}")
    fd = os.open(theirs, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for _ in range(2):
            reply = put_layer(served, handle, DIFF_ID, GOLDEN.read_bytes(), [fd, fd])
    finally:
        os.close(fd)
    got = reply["parameters"]
    assert got["layer_verity"] == LAYER_VERITY
    assert got["objects_hardlinked"] == 0
    assert got["objects_already_present"] == 3  # the second time
    inodes = {(s.st_dev, s.st_ino) for s in map(os.stat, sources)}
    stored = [o for sub in (dst / "objects").iterdir() if sub.is_dir() for o in sub.iterdir()]
    assert not inodes & {(s.st_dev, s.st_ino) for s in map(os.stat, stored)}
    objects_named_by_content(dst)


def test_drain_copies_in_one_read(
    golden_repo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """In process: where nothing may be linked and reflinks failed once, the other
    objects are copied as they are hashed (store_chunks), not hashed then copied."""
    repo = Repository.init(tmp_path / "dst", algorithm="fsverity-sha256-12")
    one_pass: list[int] = []
    original = ObjectStore.store_chunks

    def counting(self: ObjectStore, chunks: Any) -> Any:
        one_pass.append(1)
        return original(self, chunks)

    monkeypatch.setattr(ObjectStore, "store_chunks", counting)
    fd = os.open(golden_repo / "objects", os.O_RDONLY | os.O_DIRECTORY)
    try:
        verity, stats = drain(repo, io.BytesIO(GOLDEN.read_bytes()), [fd, fd], DIFF_ID)
    finally:
        os.close(fd)
    assert verity == LAYER_VERITY
    assert stats.hardlinked == 0
    if stats.reflinked == 0:
        assert stats.copied == 3
        assert len(one_pass) == 2  # the first object found out that reflinks fail
    objects_named_by_content(tmp_path / "dst")


def encode_tar(tar: bytes, files: Path) -> bytes:
    """A stream of ``tar`` as a producer might send it: headers and padding as
    Metadata, each regular file's data in turns as InlineData or as FileBacked (the
    file written below ``files``, slot 0)."""
    out = io.BytesIO()
    w = StreamWriter(out)
    pos = 0
    with tarfile.open(fileobj=io.BytesIO(tar)) as t:
        for i, member in enumerate(t.getmembers()):
            if not member.isreg():
                continue
            w.metadata(tar[pos : member.offset_data])
            data = tar[member.offset_data : member.offset_data + member.size]
            if i % 2:
                w.inline_data(data)
            else:
                name = f"f/{i:05d}"
                (files / name).parent.mkdir(exist_ok=True)
                (files / name).write_bytes(data)
                w.file_backed(0, len(data), name.encode())
            pos = member.offset_data + member.size
    w.metadata(tar[pos:])
    return out.getvalue()


def test_drain_stores_what_import_layer_stores(tmp_path: Path) -> None:
    """However a producer splits the tar (inline or by file, small or large files),
    the layer stream drained is the one a tar import writes, byte for byte."""
    rnd = random.Random(7)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as t:
        for d in ("usr", "usr/x"):
            info = tarfile.TarInfo(d)
            info.type = tarfile.DIRTYPE
            t.addfile(info)
        for i, size in enumerate([0, 1, 63, 64, 65, 4095, 4096, 70000, 300000, 5, 200]):
            info = tarfile.TarInfo(f"usr/x/{i:03d}")
            info.size = size
            t.addfile(info, io.BytesIO(rnd.randbytes(size)))
        link = tarfile.TarInfo("usr/x/link")
        link.type = tarfile.SYMTYPE
        link.linkname = "000"
        t.addfile(link)
    tar = buf.getvalue()
    diff_id = "sha256:" + hashlib.sha256(tar).hexdigest()
    files = tmp_path / "files"
    files.mkdir()
    stream = encode_tar(tar, files)
    assert any(
        isinstance(c, InlineData) and c.length > 64
        for c, _ in StreamReader(io.BytesIO(stream)).chunks()
    )
    drained = Repository.init(tmp_path / "drained", algorithm="fsverity-sha256-12")
    fd = os.open(files, os.O_RDONLY | os.O_DIRECTORY)
    try:
        verity, stats = drain(drained, io.BytesIO(stream), [fd], diff_id, link_ok=may_link)
    finally:
        os.close(fd)
    imported = Repository.init(tmp_path / "imported", algorithm="fsverity-sha256-12")
    assert verity == import_layer(imported, io.BytesIO(tar), diff_id)
    # Files over 64 bytes (65, 4095, 4096, 70000, 300000, 200) are objects.
    assert stats.copied + stats.hardlinked + stats.reflinked + stats.already_present == 6
    objects_named_by_content(tmp_path / "drained")
