"""Verify's faster paths check what the slower ones did.

* ``image.reader.scan_objects`` (Verify's list of objects) finds the objects a walk
  of ``read_image(c_quirks=False)``'s tree finds, and refuses exactly the images
  ``read_image`` refuses, with the same error, on every format and on thousands of
  damaged images;
* Verify reports the image's payloads that name no object and objects recorded with
  two sizes;
* ``check_files``' work units are the greedy ones (largest files first);
* ``fsverity.FileDigester`` gives ``fsverity digest``'s answer with its buffer kept
  from file to file and for files that change size under it;
* a checking worker's summary of a batch accounts for every file.
"""

from __future__ import annotations

import os
import random
import stat
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import cast

import pytest

from composefsd import objectcheck
from composefsd.fsverity import FileDigester, digest_bytes
from composefsd.image.dump_parse import parse_dumpfile
from composefsd.image.format import ErofsVersion
from composefsd.image.formats import write_format
from composefsd.image.reader import ImageFormatError, read_image, scan_objects
from composefsd.image.tree import S_IFMT, Node
from composefsd.image.writer import write_image
from composefsd.kernel.verity import Algorithm
from composefsd.objectlayout import object_relpath
from composefsd.repository import Repository
from composefsd.repository import verify as verify_mod
from composefsd.repository.verify import verify_image
from verifyhooks import hold_until_all_take_a_batch

SEED = 0x5CA7


def _tree_objects(root: Node) -> list[tuple[bytes, int]]:
    """What Verify listed before scan_objects: regular files with a payload and no
    inline content, hardlink entries (mode 0) skipped."""
    found: list[tuple[bytes, int]] = []
    stack = [root]
    while stack:
        node = stack.pop()
        if node.children:
            stack.extend(node.children.values())
        if node.mode & S_IFMT == stat.S_IFREG and node.payload is not None and not node.content:
            found.append((node.payload, node.size))
    return found


def _digest(i: int) -> str:
    return digest_bytes(b"object %d" % i).hex()


def _dump(rng: random.Random) -> bytes:
    """A tree with every kind of inode: objects, inline files, symlinks, devices,
    a FIFO, whiteouts, hardlinks, escaped overlay xattrs and stored xattrs."""
    lines = [b"/ 4096 40755 2 0 0 0 0.0 - - - user.top=1"]
    for d in range(4):
        lines.append(b"/d%d 4096 40755 2 0 0 0 0.0 - - - trusted.overlay.opaque=y" % d)
        for f in range(rng.randint(20, 60)):
            digest = _digest(rng.randrange(200))
            kind = rng.randrange(6)
            name = b"/d%d/f%03d" % (d, f)
            if kind <= 2:
                xattrs = b" user.x=%d" % f if kind == 1 else b""
                lines.append(
                    b"%s %d 100644 1 0 0 0 0.0 %s/%s - %s%s"
                    % (
                        name,
                        rng.randrange(1, 1 << 20),
                        digest[:2].encode(),
                        digest[2:].encode(),
                        digest.encode(),
                        xattrs,
                    )
                )
            elif kind == 3:
                lines.append(b"%s 5 100644 1 0 0 0 0.0 - hello -" % name)
            elif kind == 4:
                lines.append(b"%s 3 120777 1 0 0 0 0.0 abc - -" % name)
            else:
                lines.append(b"%s 0 20000 1 0 0 0 0.0 - - -" % name)
    lines += [
        b"/empty 0 100644 1 0 0 0 0.0 - - -",
        b"/link 0 @100644 1 0 0 0 0.0 /d0/f000 - -",
        b"/dev 0 60644 1 0 0 259 0.0 - - - security.selinux=x",
        b"/fifo 0 10644 1 0 0 0 0.0 - - - user.a=b",
    ]
    return b"\n".join(lines) + b"\n"


@pytest.fixture(scope="module")
def images() -> list[bytes]:
    """The same kind of tree in each format (V0, V1, V2)."""
    rng = random.Random(SEED)
    out = []
    for version in ErofsVersion:
        out.append(write_format(parse_dumpfile(_dump(rng)), version))
    assert len(out) == 3
    return out


def _verdict(fn: Callable[[bytes], object], data: bytes) -> tuple[str, object]:
    try:
        return "ok", fn(data)
    except ImageFormatError as exc:
        return "error", (type(exc), exc.errno, str(exc))
    except (OSError, ValueError) as exc:
        return "other", (type(exc), str(exc))


def _same(data: bytes) -> str:
    expected = _verdict(lambda d: sorted(_tree_objects(read_image(d, c_quirks=False).root)), data)
    got = _verdict(lambda d: sorted(scan_objects(d)), data)
    assert got == expected
    return got[0]


def test_scan_finds_the_tree_objects(images: list[bytes]) -> None:
    for data in images:
        objects = scan_objects(data)
        assert objects, "no objects in the test image"
        assert sorted(objects) == sorted(_tree_objects(read_image(data, c_quirks=False).root))
        # once per inode: the hardlink to /d0/f000 does not add a second entry
        assert len(objects) == len(_tree_objects(read_image(data, c_quirks=False).root))


def test_scan_refuses_what_read_image_refuses(images: list[bytes]) -> None:
    rng = random.Random(SEED + 1)
    verdicts: dict[str, int] = {}
    for data in images:
        size = len(data)
        for cut in sorted({0, 100, 1024, 1151, 4095, 4096, size // 2, size - 1}):
            _same(data[:cut])
        meta_end = min(size, 32768)
        for _ in range(400):
            damaged = bytearray(data)
            for _ in range(rng.randint(1, 6)):
                pos = rng.randrange(1024, meta_end) if rng.random() < 0.9 else rng.randrange(size)
                damaged[pos] = (
                    rng.randrange(256)
                    if rng.random() < 0.5
                    else damaged[pos] ^ (1 << rng.randrange(8))
                )
            verdict = _same(bytes(damaged))
            verdicts[verdict] = verdicts.get(verdict, 0) + 1
    # Both outcomes are well represented, so the comparison means something.
    assert verdicts.get("ok", 0) > 100 and verdicts.get("error", 0) > 100, verdicts


def _add_image(repo: Repository, data: bytes) -> str:
    """Put ``data`` into ``repo`` as an image, as CreateImage links one."""
    digest = digest_bytes(data, repo.hash_name).hex()
    obj = repo.path / "objects" / object_relpath(digest)
    obj.parent.mkdir(parents=True, exist_ok=True)
    obj.write_bytes(data)
    (repo.path / "images" / digest).symlink_to(Path("..") / "objects" / object_relpath(digest))
    return digest


def test_verify_reports_bad_payloads_and_two_sizes(tmp_path: Path) -> None:
    repo = Repository.init(tmp_path / "repo", algorithm="fsverity-sha256-12")
    content = b"x" * 100
    good = digest_bytes(content).hex()
    obj = repo.path / "objects" / object_relpath(good)
    obj.parent.mkdir(parents=True, exist_ok=True)
    obj.write_bytes(content)
    lines = [
        b"/ 4096 40755 2 0 0 0 0.0 - - -",
        b"/a 100 100644 1 0 0 0 0.0 %s/%s - -" % (good[:2].encode(), good[2:].encode()),
        b"/b 200 100644 1 0 0 0 0.0 %s/%s - -" % (good[:2].encode(), good[2:].encode()),
        b"/c 7 100644 1 0 0 0 0.0 not/an/object - -",
        b"/d 7 100644 1 0 0 0 0.0 %s/%s - -" % (good[:2].upper().encode(), good[2:].encode()),
    ]
    image = _add_image(repo, write_image(parse_dumpfile(b"\n".join(lines) + b"\n")))
    report = verify_image(repo, image)
    assert not report.ok
    # In the order the walk meets them: a, b, c, d.
    assert report.image_problems == [
        f"object {good} is recorded with sizes 100 and 200",
        "file payload b'not/an/object' is not an object path (XX/rest, sha256)",
        f"file payload {(good[:2].upper() + '/' + good[2:]).encode()!r} is not an "
        "object path (XX/rest, sha256)",
    ]
    assert report.objects_checked == 1 and report.missing == [] and report.corrupt == []


def test_verify_reports_a_malformed_image_with_the_right_digest(tmp_path: Path) -> None:
    # An image whose digest is its name but that does not parse: the format check
    # is still made (the image is refused, its objects are not checked).
    repo = Repository.init(tmp_path / "repo", algorithm="fsverity-sha256-12")
    data = bytearray(write_image(parse_dumpfile(b"/ 4096 40755 2 0 0 0 0.0 - - -\n")))
    data[1024:1028] = b"\0\0\0\0"  # the EROFS superblock magic
    image = _add_image(repo, bytes(data))
    report = verify_image(repo, image)
    assert [p.split(":")[0] for p in report.image_problems] == ["not a valid composefs image"]
    assert "magic" in report.image_problems[0]


def _greedy(sizes: list[int]) -> list[list[int]]:
    """check_files' work units as the loop before worked them out."""
    order = sorted(range(len(sizes)), key=lambda i: sizes[i], reverse=True)
    batches, batch, cost = [], [], 0
    for i in order:
        batch.append(i)
        cost += max(sizes[i], 0) + verify_mod._FILE_COST_BYTES
        if cost >= verify_mod._BATCH_COST:
            batches.append(batch)
            batch, cost = [], 0
    if batch:
        batches.append(batch)
    return batches


def test_batches_are_the_greedy_units() -> None:
    rng = random.Random(SEED + 2)
    for n in (0, 1, 2, 7, 1000, 5000):
        for _ in range(3):
            sizes = [
                rng.choice([-1, 0, rng.randrange(1 << 16), rng.randrange(1 << 26)])
                for _ in range(n)
            ]
            files = [(b"f%d" % i, size) for i, size in enumerate(sizes)]
            assert verify_mod._batches(files) == _greedy(sizes)


def test_file_digester_matches_digest_bytes(tmp_path: Path) -> None:
    rng = random.Random(SEED + 3)
    sizes = [0, 1, 4095, 4096, 4097, 8192, 3 * 4096 + 5, 128 * 4096, 128 * 4096 + 1, 100]
    sizes += [rng.randrange(1 << 20) for _ in range(10)]
    # Large files first, then small ones: the kept buffer holds old bytes past the end.
    sizes.sort(reverse=True)
    for algorithm in ("sha256", "sha512"):
        digester = FileDigester(algorithm)
        for i, size in enumerate(sizes):
            data = rng.randbytes(size)
            path = tmp_path / f"{algorithm}-{i}"
            path.write_bytes(data)
            fd = os.open(path, os.O_RDONLY)
            try:
                assert digester.digest(fd, size) == digest_bytes(data, algorithm)
            finally:
                os.close(fd)


def test_file_digester_reads_the_file_as_it_is(tmp_path: Path) -> None:
    # The size from fstat is a hint: a file that grew or shrank since is digested
    # whole as it now is.
    path = tmp_path / "f"
    data = os.urandom(10000)
    path.write_bytes(data)
    digester = FileDigester("sha256")
    fd = os.open(path, os.O_RDONLY)
    try:
        assert digester.digest(fd, 5000) == digest_bytes(data)
        assert digester.digest(fd, 20000) == digest_bytes(data)
    finally:
        os.close(fd)


def test_worker_summary_accounts_for_every_file(tmp_path: Path) -> None:
    objects = tmp_path / "objects"
    items: list[tuple[bytes, int]] = []
    for i in range(6):
        data = b"%d" % i * (i + 1) * 1000
        digest = digest_bytes(data).hex()
        path = objects / object_relpath(digest)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        items.append((os.fsencode(path), len(data) if i % 2 else -1))
    # a wrong size, a wrong digest, a missing file, a directory
    wrong_size = (items[1][0], items[1][1] + 1)
    wrong = objects / object_relpath("ab" * 32)
    wrong.parent.mkdir(parents=True, exist_ok=True)
    wrong.write_bytes(b"not that")
    missing = objects / object_relpath("cd" * 32)
    directory = objects / object_relpath("ef" * 32)
    directory.mkdir(parents=True)
    # Right content, but its path is not .../XX/rest: not taken for a match.
    flat = tmp_path / digest_bytes(b"flat").hex()
    flat.write_bytes(b"flat")
    batch = [*items, wrong_size, (os.fsencode(wrong), -1), (os.fsencode(missing), 5)]
    batch += [(os.fsencode(directory), -1), (os.fsencode(flat), -1)]
    answer = objectcheck.serve_request((Algorithm.SHA256.value, batch, True))
    groups, others = cast(objectcheck.Summary, answer)
    matched = sorted(i for positions, _ in groups.values() for i in positions)
    assert matched == list(range(6))
    # Bytes are counted for the files whose size was not given (even indices).
    assert sum(unknown for _, unknown in groups.values()) == sum(
        (i + 1) * 1000 * len(b"%d" % i) for i in range(0, 6, 2)
    )
    assert [position for position, _ in others] == [6, 7, 8, 9, 10]
    wires = dict(others)
    assert wires[6][0] is None and wires[6][2] is None  # size differs: no digest
    assert wires[7][2] == digest_bytes(b"not that").hex()
    assert wires[8][0] == 2  # ENOENT
    assert wires[9][0] == objectcheck.NOT_REGULAR
    assert wires[10][2] == digest_bytes(b"flat").hex()
    with pytest.raises(ValueError, match="checks for a batch"):
        objectcheck.summarize(batch, [])


def test_in_process_results_come_as_the_work_goes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Checked in the calling process (one worker), results are handed over run by
    # run, so that progress moves while the files are checked.
    monkeypatch.setattr(verify_mod, "_LOCAL_RUN", 2)
    files = []
    for i in range(5):
        data = b"file %d" % i
        path = tmp_path / "objects" / object_relpath(digest_bytes(data).hex())
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        files.append((os.fsencode(path), len(data)))
    calls: list[list[int]] = []
    verify_mod.check_files(
        files,
        Algorithm.SHA256,
        lambda index, check: calls.append([-1]),
        lambda indices, why, unknown: calls.append(indices),
        workers=1,
    )
    assert calls == [[0, 1], [2, 3], [4]]


# -- overlap: objects handed out while the image is scanned --------------------------------


def _chunked(data: bytes, chunk: int) -> tuple[list[list[tuple[bytes, int]]], tuple[str, object]]:
    """The chunks ``scan_objects`` hands over, and its verdict (what it returned)."""
    chunks: list[list[tuple[bytes, int]]] = []
    verdict = _verdict(lambda d: scan_objects(d, chunk=chunk, on_chunk=chunks.append), data)
    return chunks, verdict


def test_scan_in_chunks_hands_over_every_object_once(images: list[bytes]) -> None:
    for data in images:
        whole = scan_objects(data)
        for chunk in (1, 2, 7, len(whole), len(whole) + 1):
            chunks, (kind, rest) = _chunked(data, chunk)
            assert kind == "ok"
            assert all(len(c) == chunk for c in chunks)
            assert [o for c in chunks for o in c] + cast("list[tuple[bytes, int]]", rest) == whole


def _late_refusal(images: list[bytes]) -> tuple[bytes, ImageFormatError]:
    """A damaged image that ``scan_objects`` refuses after handing over objects."""
    rng = random.Random(SEED + 2)
    data = images[0]
    for _ in range(2000):
        damaged = bytearray(data)
        damaged[rng.randrange(1024, min(len(data), 32768))] ^= 1 << rng.randrange(8)
        chunks: list[object] = []
        try:
            scan_objects(bytes(damaged), chunk=1, on_chunk=chunks.append)
        except ImageFormatError as exc:
            if len(chunks) > 4:
                assert _verdict(scan_objects, bytes(damaged))[0] == "error"
                return bytes(damaged), exc
    raise AssertionError("no image refused late")


def test_scan_in_chunks_refuses_as_before(images: list[bytes]) -> None:
    rng = random.Random(SEED + 3)
    for data in images:
        for _ in range(100):
            damaged = bytearray(data)
            for _ in range(rng.randint(1, 4)):
                damaged[rng.randrange(1024, min(len(data), 32768))] ^= 1 << rng.randrange(8)
            expected = _verdict(scan_objects, bytes(damaged))
            chunks, verdict = _chunked(bytes(damaged), 3)
            if expected[0] == "ok":
                got = [o for c in chunks for o in c] + cast("list[tuple[bytes, int]]", verdict[1])
                assert ("ok", got) == expected
            else:
                assert verdict == expected


def _counting_start(monkeypatch: pytest.MonkeyPatch) -> list[subprocess.Popen[bytes]]:
    started: list[subprocess.Popen[bytes]] = []
    real = verify_mod._start_worker

    def start() -> subprocess.Popen[bytes]:
        proc = real()
        started.append(proc)
        return proc

    monkeypatch.setattr(verify_mod, "_start_worker", start)
    return started


def _early(monkeypatch: pytest.MonkeyPatch, early: bool, chunk: int) -> None:
    """Workers started before the scan (as for a large image file), or at its first
    chunk of ``chunk`` objects; objects handed over in chunks of ``chunk``."""
    monkeypatch.setattr(verify_mod, "_EARLY_IMAGE_BYTES", 0 if early else 1 << 62)
    monkeypatch.setattr(verify_mod, "_EARLY_CHUNK", chunk)
    monkeypatch.setattr(verify_mod, "_SCAN_CHUNK", chunk)


@pytest.mark.parametrize("early", [False, True])
def test_verify_late_image_error_reports_no_object(
    tmp_path: Path, images: list[bytes], monkeypatch: pytest.MonkeyPatch, early: bool
) -> None:
    # None of the image's objects exists: any result of the checks begun during the
    # scan would show as "missing". The image is refused whole, as without overlap.
    data, error = _late_refusal(images)
    repo = Repository.init(tmp_path / "repo", algorithm="fsverity-sha256-12")
    image = _add_image(repo, data)
    alone = verify_image(repo, image, workers=1)
    _early(monkeypatch, early, 1)
    monkeypatch.setattr(verify_mod, "_PROCESS_MIN_COST", 0)
    started = _counting_start(monkeypatch)
    handed: list[bytes] = []
    real_add = verify_mod._Checking.add

    def add(self: verify_mod._Checking, files: list[tuple[bytes, int]]) -> None:
        handed.extend(path for path, _ in files)
        real_add(self, files)

    monkeypatch.setattr(verify_mod._Checking, "add", add)
    overlapped = verify_image(repo, image, workers=2)
    assert handed, "no object was handed out during the scan"
    assert all(p.poll() is not None for p in started)  # stopped, if started at all
    assert overlapped.image_problems == [f"not a valid composefs image: {error}"]
    assert overlapped.missing == [] and overlapped.corrupt == []
    assert overlapped.objects_checked == 0 and overlapped.bytes_checked == 0
    assert overlapped.to_dict() == alone.to_dict()


def _object_repo(tmp_path: Path, count: int) -> tuple[Repository, str, list[bytes]]:
    """A repository with an image of ``count`` files, each its own object."""
    repo = Repository.init(tmp_path / "repo", algorithm="fsverity-sha256-12")
    lines = [b"/ 4096 40755 2 0 0 0 0.0 - - -"]
    contents = []
    for i in range(count):
        content = b"content %d " % i * (1 + i * 37)
        contents.append(content)
        digest = digest_bytes(content).hex()
        obj = repo.path / "objects" / object_relpath(digest)
        obj.parent.mkdir(parents=True, exist_ok=True)
        obj.write_bytes(content)
        lines.append(
            b"/f%03d %d 100644 1 0 0 0 0.0 %s/%s - -"
            % (i, len(content), digest[:2].encode(), digest[2:].encode())
        )
    image = _add_image(repo, write_image(parse_dumpfile(b"\n".join(lines) + b"\n")))
    return repo, image, contents


@pytest.mark.parametrize("early", [False, True])
def test_verify_with_overlap_finds_the_same(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, early: bool
) -> None:
    repo, image, contents = _object_repo(tmp_path, 40)
    objects = [repo.path / "objects" / object_relpath(digest_bytes(c).hex()) for c in contents]
    objects[3].unlink()
    objects[17].write_bytes(b"X" + contents[17][1:])
    os.truncate(objects[30], 5)
    alone = verify_image(repo, image, workers=1)
    assert len(alone.missing) == 1 and len(alone.corrupt) == 2
    _early(monkeypatch, early, 3)
    monkeypatch.setattr(verify_mod, "_PROCESS_MIN_COST", 0)
    monkeypatch.setattr(verify_mod, "_BATCH_COST", 1)
    # Every lane starts its worker and the calling thread checks a share, whatever
    # the scheduling (verifyhooks).
    held = hold_until_all_take_a_batch(monkeypatch, 1)
    for workers in (2, 3):
        held.reset()
        held.lanes = workers - 1
        overlapped = verify_image(repo, image, workers=workers)
        assert len(held.started) == workers - 1
        assert all(proc.poll() is not None for proc in held.started)
        assert held.caller_checked
        assert overlapped.to_dict() == alone.to_dict()


@pytest.mark.parametrize("damage", ["missing", "swapped", "truncated"])
def test_verify_early_workers_stop_when_the_image_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, damage: str
) -> None:
    # Workers started for a large image file (before it is checked) are stopped when
    # it turns out missing, another image or not an image: the report is the same.
    repo, image, _ = _object_repo(tmp_path, 12)
    link = repo.path / "images" / image
    target = link.resolve()
    if damage == "missing":
        target.unlink()
    elif damage == "swapped":
        other = _add_image(repo, write_image(parse_dumpfile(b"/ 4096 40755 2 0 0 0 0.0 - - -\n")))
        os.chmod(target, 0o644)
        target.write_bytes((repo.path / "images" / other).read_bytes())
    else:
        os.chmod(target, 0o644)
        os.truncate(target, 4096)
    alone = verify_image(repo, image, workers=1)
    assert alone.image_problems and not alone.ok
    _early(monkeypatch, True, 3)
    started = _counting_start(monkeypatch)
    early = verify_image(repo, image, workers=2)
    assert early.to_dict() == alone.to_dict()
    assert all(proc.poll() is not None for proc in started)


def test_caller_checks_its_share_every_file_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # With N processes, N - 1 workers and the calling thread check the batches,
    # every file once.
    repo, _image, contents = _object_repo(tmp_path, 30)
    paths = [
        os.fsencode(repo.path / "objects" / object_relpath(digest_bytes(c).hex())) for c in contents
    ]
    os.unlink(paths[2])
    with open(paths[9], "r+b") as f:
        f.write(b"Y")
    files = [(p, len(c)) for p, c in zip(paths, contents, strict=True)]
    files[20] = (files[20][0], files[20][1] + 1)
    monkeypatch.setattr(verify_mod, "_PROCESS_MIN_COST", 0)
    monkeypatch.setattr(verify_mod, "_BATCH_COST", 1)
    # Each lane's worker start and the calling thread's first check wait until all
    # three hold a batch: both workers start and the calling thread checks a share,
    # whatever the scheduling (verifyhooks).
    held = hold_until_all_take_a_batch(monkeypatch, 2)
    seen: list[int] = []
    results: dict[int, verify_mod.FileCheck] = {}

    def on_result(index: int, result: verify_mod.FileCheck) -> None:
        seen.append(index)
        results[index] = result

    for summary in (True, False):
        held.reset()
        seen.clear()
        results.clear()

        verify_mod.check_files(
            files,
            Algorithm.SHA256,
            on_result,
            (lambda indices, why, unknown: seen.extend(indices)) if summary else None,
            workers=3,
        )
        assert len(held.started) == 2
        assert all(proc.poll() is not None for proc in held.started)
        # A share, not all: each worker held a batch the calling thread could not take.
        assert 1 <= len(held.caller_checked) <= len(files) - 2
        assert len(set(held.caller_checked)) == len(held.caller_checked)
        # Every file's result once, whoever checked it.
        assert sorted(seen) == list(range(len(files)))
        assert results[2].error == 2  # ENOENT
        assert results[9].digest != digest_bytes(contents[9]).hex()
        assert results[20].size == len(contents[20]) and results[20].digest is None
        if summary:
            assert sorted(results) == [2, 9, 20]
