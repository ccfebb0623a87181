"""composefsd.fsverity against fsverity-utils and C composefs, and composefsd.kernel.verity's
ioctls against the kernel."""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import random
import shutil
import struct
import subprocess
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from composefsd import fsverity
from composefsd.fsverity import (
    FsVerityHasher,
    c_compat_digest_bytes,
    digest_bytes,
    digest_fd,
    measure_or_compute,
)
from composefsd.kernel.verity import (
    Algorithm,
    VerityAlgorithmMismatchError,
    VerityAlreadyEnabledError,
    VerityError,
    VerityFileBusyError,
    VerityNotEnabledError,
    VerityUnsupportedError,
    enable_verity,
    measure_verity,
)

BS = 4096
ALGS = ["sha256", "sha512"]
# Hashes per Merkle block: 128 for SHA-256, 64 for SHA-512.
PER_BLOCK = {"sha256": BS // 32, "sha512": BS // 64}

# Sizes around every place where the tree changes shape: one block, one level-1 block
# full (64 or 128 blocks), and the 2- to 3-level step for both algorithms
# (64*64 and 128*128 blocks).
EDGE_SIZES = sorted(
    {
        0,
        1,
        BS - 1,
        BS,
        BS + 1,
        2 * BS,
        64 * BS - 1,
        64 * BS,
        64 * BS + 1,
        128 * BS - 1,
        128 * BS,
        128 * BS + 1,
        64 * 64 * BS - 1,
        64 * 64 * BS,
        64 * 64 * BS + 1,
        128 * 128 * BS,
        128 * 128 * BS + 1,
    }
)
RANDOM_SIZES = sorted(random.Random(1234).randrange(0, 6 << 20) for _ in range(16))
ALL_SIZES = EDGE_SIZES + RANDOM_SIZES
MAX_SIZE = max(ALL_SIZES)


def _cli_digests(alg: str, paths: list[Path]) -> dict[Path, bytes]:
    """``fsverity digest`` for many files in one run."""
    out = subprocess.run(
        ["fsverity", "digest", f"--hash-alg={alg}", *map(str, paths)],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.splitlines()
    assert len(out) == len(paths)
    result = {}
    for path, line in zip(paths, out, strict=True):
        tag, _, rest = line.partition(":")
        hexdigest, _, name = rest.partition(" ")
        assert tag == alg
        assert name == str(path)
        result[path] = bytes.fromhex(hexdigest)
    return result


@pytest.fixture(scope="module")
def blob() -> bytes:
    return random.Random(99).randbytes(MAX_SIZE)


@pytest.fixture(scope="module")
def sample_files(blob: bytes) -> Iterator[dict[int, Path]]:
    """A file for every size in ALL_SIZES, each a prefix of ``blob``."""
    tmp = Path(tempfile.mkdtemp(prefix="test-fsverity-", dir="/var/tmp"))
    try:
        files = {}
        for size in ALL_SIZES:
            path = tmp / f"f{size}"
            path.write_bytes(blob[:size])
            files[size] = path
        yield files
    finally:
        shutil.rmtree(tmp)


@pytest.fixture(scope="module")
def cli_digests(sample_files: dict[int, Path]) -> dict[str, dict[int, bytes]]:
    assert shutil.which("fsverity"), "fsverity-utils missing (apt-get install fsverity)"
    result = {}
    for alg in ALGS:
        by_path = _cli_digests(alg, list(sample_files.values()))
        result[alg] = {size: by_path[path] for size, path in sample_files.items()}
    return result


# --- known vectors ---------------------------------------------------------------------


def test_known_vectors() -> None:
    assert digest_bytes(b"hello world").hex() == (
        "1e2eaa4202d750a41174ee454970b92c1bc2f925b1e35076d8c7d5f56362ba64"
    )
    sha512 = digest_bytes(b"hello world", "sha512").hex()
    assert len(sha512) == 128
    assert sha512.startswith("18430270729d162d")
    assert sha512.endswith("6f570409")
    # C composefs test-units.sh vectors; identical for both digests as input is non-empty.
    for data, expected in [
        (b"hello world\n", "37061ef2ac4c21bec68489b56138c5780306a4ad7fe6676236ecdf2c9027cd92"),
        (b"foo bar baz\n", "91e7d88cb7bc9cf6d8db3b0ecf89af4abf204bef5b3ade5113d5b62ef374e70b"),
    ]:
        assert digest_bytes(data).hex() == expected
        assert c_compat_digest_bytes(data).hex() == expected


def test_empty_input() -> None:
    # Kernel/fsverity-utils: all-zero root hash. C composefs: hash of one zero block.
    kernel = digest_bytes(b"")
    c = c_compat_digest_bytes(b"")
    assert kernel.hex().startswith("3d248ca5")
    assert c.hex().startswith("cfc33910")
    desc = struct.pack("<BBBBIQ64s32s144x", 1, 1, 12, 0, 0, 0, b"", b"")
    assert kernel == hashlib.sha256(desc).digest()
    assert len(digest_bytes(b"", "sha512")) == 64
    assert digest_bytes(b"", "sha512") != c_compat_digest_bytes(b"", "sha512")


# --- against fsverity-utils ------------------------------------------------------------


@pytest.mark.parametrize("alg", ALGS)
def test_digest_bytes_matches_cli(
    alg: str, blob: bytes, cli_digests: dict[str, dict[int, bytes]]
) -> None:
    for size in ALL_SIZES:
        assert digest_bytes(blob[:size], alg) == cli_digests[alg][size], size


@pytest.mark.parametrize("alg", ALGS)
@pytest.mark.parametrize("threads", [1, 2])
def test_digest_fd_matches_cli(
    alg: str,
    threads: int,
    sample_files: dict[int, Path],
    cli_digests: dict[str, dict[int, bytes]],
) -> None:
    for size, path in sample_files.items():
        fd = os.open(path, os.O_RDONLY)
        try:
            assert digest_fd(fd, alg, threads=threads) == cli_digests[alg][size], size
        finally:
            os.close(fd)


@pytest.mark.parametrize("alg", ALGS)
@pytest.mark.parametrize("threads", [2, 3])
def test_digest_fd_parallel_small_spans(
    alg: str, threads: int, monkeypatch: pytest.MonkeyPatch, blob: bytes, tmp_path: Path
) -> None:
    # Tiny spans make every file take the threaded path and cycle its buffers often,
    # with EOF landing on and off span boundaries. (digest_bytes is checked against
    # fsverity-utils above.)
    monkeypatch.setattr(fsverity, "_SPAN", 3 * BS)
    monkeypatch.setattr(fsverity, "_PARALLEL_MIN_SIZE", 0)
    for size in [0, 1, BS, 3 * BS, 3 * BS + 1, 6 * BS, 7 * BS - 1, 64 * BS + 5, 128 * BS + 1]:
        path = tmp_path / f"f{size}"
        path.write_bytes(blob[:size])
        fd = os.open(path, os.O_RDONLY)
        try:
            assert digest_fd(fd, alg, threads=threads) == digest_bytes(blob[:size], alg), size
        finally:
            os.close(fd)


def test_digest_fd_threads_agree_on_big_file(sample_files: dict[int, Path]) -> None:
    path = sample_files[128 * 128 * BS + 1]
    fd = os.open(path, os.O_RDONLY)
    try:
        one = digest_fd(fd, threads=1)
        assert digest_fd(fd, threads=2) == one
        assert digest_fd(fd, threads=None) == one
        assert digest_fd(fd, "sha512", threads=1) == digest_fd(fd, "sha512", threads=2)
    finally:
        os.close(fd)


def test_digest_fd_small_files_start_no_threads(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    def no_pool(*args: object, **kwargs: object) -> None:
        raise AssertionError("a thread pool was started for a small file")

    monkeypatch.setattr(fsverity, "ThreadPoolExecutor", no_pool)
    for size in (0, 1, 1 << 20):
        data = os.urandom(size)
        path = tmp_path / f"f{size}"
        path.write_bytes(data)
        fd = os.open(path, os.O_RDONLY)
        try:
            assert digest_fd(fd, threads=2) == digest_bytes(data)
        finally:
            os.close(fd)


def test_digest_fd_leaves_offset_alone(tmp_path: Path) -> None:
    path = tmp_path / "f"
    data = os.urandom(3 * BS + 17)
    path.write_bytes(data)
    fd = os.open(path, os.O_RDONLY)
    try:
        os.lseek(fd, 100, os.SEEK_SET)
        assert digest_fd(fd) == digest_bytes(data)
        assert os.lseek(fd, 0, os.SEEK_CUR) == 100
    finally:
        os.close(fd)


@pytest.mark.parametrize("threads", [1, 2])
def test_digest_fd_pipe(threads: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fsverity, "_SPAN", 4 * BS)
    data = random.Random(5).randbytes(40 * BS + 123)
    r, w = os.pipe()

    def feed() -> None:
        try:
            with os.fdopen(w, "wb") as f:
                for i in range(0, len(data), 1000):
                    f.write(data[i : i + 1000])
                    f.flush()
        except BrokenPipeError:
            pass  # the reader gave up early; the assertion below reports it

    t = threading.Thread(target=feed)
    t.start()
    try:
        assert digest_fd(r, threads=threads) == digest_bytes(data)
    finally:
        os.close(r)
        t.join()


@pytest.mark.parametrize("threads", [1, 2])
def test_digest_fd_read_error_propagates(threads: int, tmp_path: Path) -> None:
    # A directory is not a regular file, so threads=2 takes the threaded path and the
    # EISDIR happens in a worker.
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        with pytest.raises(IsADirectoryError):
            digest_fd(fd, threads=threads)
    finally:
        os.close(fd)


def test_digest_fd_rejects_bad_threads(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"x")
    fd = os.open(path, os.O_RDONLY)
    try:
        with pytest.raises(ValueError, match="threads"):
            digest_fd(fd, threads=0)
    finally:
        os.close(fd)


# --- incremental hasher ----------------------------------------------------------------


@pytest.mark.parametrize("alg", ALGS)
def test_hasher_random_splits(alg: str, blob: bytes) -> None:
    rng = random.Random(alg)
    cases = [(size, piece) for size in (0, 1, BS - 1, BS, BS + 1, 3 * BS + 7) for piece in (1, 5)]
    cases += [
        (size, piece)
        for size in (128 * BS + 1, 300_001, 2 * 64 * 64 * BS + 3)
        for piece in (5000, 3 * BS + 11, 1 << 20)
    ]
    for size, max_piece in cases:
        data = memoryview(blob)[:size]
        h = FsVerityHasher(alg)
        pos = 0
        while pos < size:
            step = rng.randint(0, max_piece)
            h.update(data[pos : pos + step])
            pos += step
        assert h.size == size
        assert h.digest() == digest_bytes(data, alg), (size, max_piece)


def test_hasher_digest_does_not_finalize() -> None:
    data = os.urandom(5 * BS + 3)
    h = FsVerityHasher()
    h.update(data[: BS + 1])
    assert h.digest() == digest_bytes(data[: BS + 1])
    assert h.digest() == digest_bytes(data[: BS + 1])
    h.update(memoryview(data)[BS + 1 :])
    assert h.hexdigest() == digest_bytes(data).hex()
    assert h.algorithm is Algorithm.SHA256


def test_hasher_accepts_buffers() -> None:
    import array

    data = bytes(range(256)) * 40
    want = digest_bytes(data)
    h = FsVerityHasher()
    h.update(bytearray(data[:1000]))
    h.update(memoryview(data)[1000:5000])
    h.update(array.array("B", data[5000:]))
    assert h.digest() == want
    # Non-byte item formats count bytes, not items.
    arr = array.array("I", range(3000))
    assert digest_bytes(arr) == digest_bytes(arr.tobytes())


def test_hasher_c_compat() -> None:
    assert FsVerityHasher(c_compat=True).digest() == c_compat_digest_bytes(b"")
    h = FsVerityHasher(c_compat=True)
    h.update(b"hello world\n")
    assert h.digest() == digest_bytes(b"hello world\n")


# --- algorithms --------------------------------------------------------------------------


def test_algorithm_parse() -> None:
    for value in ("sha256", "SHA256", "fsverity-sha256-12", 1, Algorithm.SHA256):
        alg = Algorithm.parse(value)
        assert alg is Algorithm.SHA256
    for value in ("sha512", "fsverity-sha512-12", 2):
        assert Algorithm.parse(value) is Algorithm.SHA512
    assert (Algorithm.SHA256.kernel_id, Algorithm.SHA256.digest_size) == (1, 32)
    assert (Algorithm.SHA512.kernel_id, Algorithm.SHA512.digest_size) == (2, 64)
    assert Algorithm.SHA512.composefs_rs_name == "fsverity-sha512-12"
    for bad in ("md5", "fsverity-sha256-13", "fsverity-sha256", "", 0, 3, True):
        with pytest.raises(ValueError):
            Algorithm.parse(bad)
    with pytest.raises(ValueError, match="4096-byte blocks"):
        digest_bytes(b"x", "fsverity-sha512-16")
    assert digest_bytes(b"x", "fsverity-sha512-12") == digest_bytes(b"x", 2)


# --- ioctls: error mapping with a fake ioctl -------------------------------------------


def _fake_ioctl(
    monkeypatch: pytest.MonkeyPatch, fn: Callable[[int, int, Any, bool], None]
) -> list[tuple[int, int, bytes]]:
    calls: list[tuple[int, int, bytes]] = []

    def ioctl(fd: int, request: int, arg: Any = 0, mutate: bool = True) -> int:
        calls.append((fd, request, bytes(arg)))
        fn(fd, request, arg, mutate)
        return 0

    monkeypatch.setattr(fcntl, "ioctl", ioctl)
    return calls


def _raising(err: int) -> Callable[[int, int, Any, bool], None]:
    def fn(fd: int, request: int, arg: Any, mutate: bool) -> None:
        raise OSError(err, os.strerror(err))

    return fn


@pytest.mark.parametrize(
    ("err", "cls"),
    [
        (errno.ENOTTY, VerityUnsupportedError),
        (errno.EOPNOTSUPP, VerityUnsupportedError),
        (errno.ENOPKG, VerityUnsupportedError),
        (errno.EEXIST, VerityAlreadyEnabledError),
        (errno.ETXTBSY, VerityFileBusyError),
        (errno.EBUSY, VerityFileBusyError),
        (errno.EPERM, VerityError),
        (errno.EROFS, VerityError),
    ],
)
def test_enable_error_mapping(
    monkeypatch: pytest.MonkeyPatch, err: int, cls: type[VerityError]
) -> None:
    _fake_ioctl(monkeypatch, _raising(err))
    with pytest.raises(cls) as info:
        enable_verity(7, path="/some/file")
    e = info.value
    assert type(e) is cls
    assert isinstance(e, OSError)
    assert e.errno == err
    assert e.strerror == os.strerror(err)
    assert e.filename == "/some/file"
    assert "/some/file" in str(e)
    assert os.strerror(err) in str(e)
    with pytest.raises(cls, match="fd 7"):
        enable_verity(7)


@pytest.mark.parametrize(
    ("err", "cls"),
    [
        (errno.ENODATA, VerityNotEnabledError),
        (errno.ENOTTY, VerityUnsupportedError),
        (errno.EOPNOTSUPP, VerityUnsupportedError),
        (errno.EOVERFLOW, VerityError),
        (errno.EIO, VerityError),
    ],
)
def test_measure_error_mapping(
    monkeypatch: pytest.MonkeyPatch, err: int, cls: type[VerityError]
) -> None:
    _fake_ioctl(monkeypatch, _raising(err))
    with pytest.raises(cls) as info:
        measure_verity(3, path=Path("/a/b"))
    assert type(info.value) is cls
    assert info.value.errno == err
    assert "/a/b" in str(info.value)


def test_enable_argument_layout(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _fake_ioctl(monkeypatch, lambda *a: None)
    enable_verity(5, "sha512")
    ((fd, request, arg),) = calls
    assert (fd, request) == (5, 0x40806685)
    assert len(arg) == 128
    assert struct.unpack_from("<IIII", arg) == (1, 2, 4096, 0)
    assert arg[16:] == bytes(112)


def test_measure_result_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    digest512 = bytes(range(64))

    def answer(alg: int, size: int, digest: bytes) -> Callable[[int, int, Any, bool], None]:
        def fn(fd: int, request: int, arg: Any, mutate: bool) -> None:
            assert request == 0xC0046686
            assert mutate
            assert struct.unpack_from("<HH", arg)[1] == 64  # capacity
            struct.pack_into("<HH", arg, 0, alg, size)
            arg[4 : 4 + len(digest)] = digest

        return fn

    calls = _fake_ioctl(monkeypatch, answer(2, 64, digest512))
    assert measure_verity(4, "sha512") == digest512
    assert struct.unpack_from("<HH", calls[0][2]) == (2, 64)
    with pytest.raises(VerityAlgorithmMismatchError, match="uses sha512") as info:
        measure_verity(4, "sha256")
    assert info.value.errno == errno.EOVERFLOW
    assert (info.value.expected, info.value.actual) == (1, 2)

    _fake_ioctl(monkeypatch, answer(1, 32, digest512[:32]))
    assert measure_verity(4) == digest512[:32]
    assert measure_or_compute(4) == digest512[:32]
    with pytest.raises(VerityAlgorithmMismatchError) as info:
        measure_verity(4, "sha512")
    assert info.value.errno == errno.EINVAL
    # A mismatch is an error, not a reason to fall back.
    with pytest.raises(VerityAlgorithmMismatchError):
        measure_or_compute(4, "sha512")


# --- ioctls on real filesystems --------------------------------------------------------


def _check_unsupported(path: Path, expected_errno: int) -> None:
    data = os.urandom(10_000)
    path.write_bytes(data)
    fd = os.open(path, os.O_RDONLY)
    try:
        with pytest.raises(VerityUnsupportedError) as info:
            enable_verity(fd, path=str(path))
        assert info.value.errno == expected_errno
        assert str(path) in str(info.value)
        with pytest.raises(VerityUnsupportedError) as info:
            measure_verity(fd)
        assert info.value.errno == expected_errno
        assert f"fd {fd}" in str(info.value)
        assert measure_or_compute(fd) == digest_bytes(data)
        assert measure_or_compute(fd, "sha512") == digest_bytes(data, "sha512")
    finally:
        os.close(fd)


def test_ioctls_on_tmpfs() -> None:
    # tmpfs has no fs-verity in any kernel; its ioctl handler says ENOTTY.
    with tempfile.TemporaryDirectory(dir="/dev/shm") as d:
        _check_unsupported(Path(d) / "f", errno.ENOTTY)


def _kernel_has_verity() -> bool:
    return Path("/sys/fs/ext4/features/verity").exists()


@pytest.fixture(scope="module")
def ext4_verity_dir() -> Iterator[Path]:
    """A freshly made ext4 filesystem with the verity feature, loop-mounted."""
    if os.geteuid() != 0:
        pytest.skip("mounting an ext4 image needs root (CI runs as root)")
    work = Path(tempfile.mkdtemp(prefix="test-fsverity-ext4-", dir="/var/tmp"))
    image, mnt = work / "ext4.img", work / "mnt"
    mnt.mkdir()
    try:
        with image.open("wb") as f:
            f.truncate(16 << 20)
        subprocess.run(
            ["mkfs.ext4", "-q", "-F", "-O", "verity", "-b", "4096", str(image)],
            check=True,
            capture_output=True,
        )
        subprocess.run(["mount", "-o", "loop", str(image), str(mnt)], check=True)
        try:
            yield mnt
        finally:
            subprocess.run(["umount", str(mnt)], check=True)
    finally:
        shutil.rmtree(work)


def test_ioctls_on_ext4(ext4_verity_dir: Path) -> None:
    path = ext4_verity_dir / "f"
    if not _kernel_has_verity():
        # This kernel lacks CONFIG_FS_VERITY: ext4 answers EOPNOTSUPP even with -O verity.
        _check_unsupported(path, errno.EOPNOTSUPP)
        return
    # A kernel with fs-verity: exercise the real thing.
    data = os.urandom(200_000)
    path.write_bytes(data)
    fd = os.open(path, os.O_RDONLY)
    try:
        with pytest.raises(VerityNotEnabledError) as info:
            measure_verity(fd, path=str(path))
        assert info.value.errno == errno.ENODATA
        assert measure_or_compute(fd) == digest_bytes(data)
        with open(path, "ab"), pytest.raises(VerityFileBusyError):
            enable_verity(fd)
        enable_verity(fd, path=str(path))
        with pytest.raises(VerityAlreadyEnabledError):
            enable_verity(fd)
        assert measure_verity(fd) == digest_bytes(data)
        assert measure_or_compute(fd) == digest_bytes(data)
        with pytest.raises(VerityAlgorithmMismatchError):
            measure_verity(fd, "sha512")
    finally:
        os.close(fd)
    path512 = ext4_verity_dir / "g"
    path512.write_bytes(b"")
    fd = os.open(path512, os.O_RDONLY)
    try:
        enable_verity(fd, "sha512")
        assert measure_verity(fd, "sha512") == digest_bytes(b"", "sha512")
    finally:
        os.close(fd)


# --- against C composefs-info measure-file ---------------------------------------------


def test_composefs_info_measure_file(reference_bin: Path, tmp_path: Path) -> None:
    files = {
        "empty": b"",
        "hello": b"hello world\n",
        "block": os.urandom(BS),
        "big": os.urandom(300_000),
    }
    paths = []
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
        paths.append(tmp_path / name)
    out = subprocess.run(
        [str(reference_bin / "composefs-info"), "measure-file", *map(str, paths)],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.splitlines()
    for path, line in zip(paths, out, strict=True):
        data = files[path.name]
        assert c_compat_digest_bytes(data).hex() == line, path.name
        fd = os.open(path, os.O_RDONLY)
        try:
            assert measure_or_compute(fd, c_compat=True).hex() == line
            if data:
                assert measure_or_compute(fd).hex() == line
            else:
                assert measure_or_compute(fd) == digest_bytes(b"") != bytes.fromhex(line)
        finally:
            os.close(fd)


@pytest.mark.parametrize("alg", ALGS)
def test_digest_fd_file_grown_after_fstat(
    alg: str, blob: bytes, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # Small files are read whole at the size fstat gave; one that has grown since is
    # read again to its end, so the digest is of everything readable, as for any fd.
    data = blob[: 3 * BS + 7]
    path = tmp_path / "grown"
    path.write_bytes(data)
    monkeypatch.setattr(fsverity, "_regular_size", lambda fd: 100)
    fd = os.open(path, os.O_RDONLY)
    try:
        assert digest_fd(fd, alg, threads=1) == digest_bytes(data, alg)
    finally:
        os.close(fd)


@pytest.mark.parametrize("alg", ALGS)
def test_digest_fd_small_whole_path_matches_streaming(
    alg: str, blob: bytes, tmp_path: Path
) -> None:
    # The whole-file path (small files) against the streaming hasher, at the sizes
    # where the tree gains a level, and the empty file in both digest flavours.
    per = PER_BLOCK[alg]
    for size in [0, 1, BS, per * BS, per * BS + 1, 2000 * BS + 3]:
        data = blob[:size]
        path = tmp_path / f"f{size}"
        path.write_bytes(data)
        fd = os.open(path, os.O_RDONLY)
        try:
            for compat in (False, True):
                h = FsVerityHasher(alg, c_compat=compat)
                h.update(data)
                assert digest_fd(fd, alg, threads=1, c_compat=compat) == h.digest(), size
        finally:
            os.close(fd)
