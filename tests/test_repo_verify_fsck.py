"""Verify and fsck: a clean repository passes, and each kind of damage is reported as
exactly that damage (one byte flipped in an object, an object deleted or truncated, an
image truncated or swapped for another), plus the smaller fsck findings."""

from __future__ import annotations

import dataclasses
import os
import random
import shutil
import subprocess
from pathlib import Path

import pytest

from composefsd.fsverity import digest_bytes
from composefsd.kernel.verity import Algorithm
from composefsd.repository import Progress, Repository, VerityPolicy
from composefsd.repository import verify as verify_mod
from composefsd.repository.fsck import FsckProblem, fsck
from composefsd.repository.meta import RepoMetadata
from composefsd.repository.verify import verify_image
from trees import write_tree
from verifyhooks import hold_until_all_take_a_batch

SEED = 20240603


def _make_tree(root: Path, rng: random.Random, variant: int) -> dict[str, bytes]:
    """A small tree; returns relative path -> content of its regular files."""
    files = {
        "a": rng.randbytes(100),
        "b": rng.randbytes(5000),
        "c": rng.randbytes(70000),
        "big": rng.randbytes((1 << 20) + 17),
        "small": b"tiny file\n",
        "empty": b"",
        "sub/f": rng.randbytes(200_000),
        f"only-{variant}": rng.randbytes(9000 + variant),
    }
    files["same-as-a"] = files["a"]
    write_tree(root, files, {"sub/link": "../a"})
    return files


def _hex(data: bytes, algorithm: str = "sha256") -> str:
    return digest_bytes(data, algorithm).hex()


def _rel(digest: str) -> str:
    return f"objects/{digest[:2]}/{digest[2:]}"


@dataclasses.dataclass
class Built:
    repo: Repository
    one: str  # image digests
    two: str
    files_one: dict[str, bytes]
    files_two: dict[str, bytes]

    def obj(self, digest: str) -> Path:
        return self.repo.object_path(digest)


def _build(tmp_path: Path, algorithm: str = "fsverity-sha256-12") -> Built:
    rng = random.Random(SEED)
    t1, t2 = tmp_path / "tree1", tmp_path / "tree2"
    f1 = _make_tree(t1, rng, 1)
    for rel in ("a", "same-as-a", "c", "big", "sub/f"):
        (t2 / rel).parent.mkdir(parents=True, exist_ok=True)
        (t2 / rel).write_bytes(f1[rel])
    f2 = {rel: f1[rel] for rel in ("a", "same-as-a", "c", "big", "sub/f")}
    f2["other"] = rng.randbytes(12345)
    (t2 / "other").write_bytes(f2["other"])
    repo = Repository.init(tmp_path / "repo", algorithm=algorithm)
    one = repo.create_image(t1, ref="one").digest
    two = repo.create_image(t2, ref="two").digest
    return Built(repo, one, two, f1, f2)


@pytest.fixture
def built(tmp_path: Path) -> Built:
    return _build(tmp_path)


def _fsck_kinds(report_problems: list[FsckProblem]) -> list[tuple[str, str]]:
    return sorted((p.kind, p.path) for p in report_problems)


# -- clean ------------------------------------------------------------------------------------


def test_clean_repository(built: Built) -> None:
    seen: list[Progress] = []
    report = verify_image(built.repo, built.one, progress=seen.append)
    assert report.ok, report
    objects = {_hex(d) for d in built.files_one.values() if len(d) > 64}
    assert report.objects_checked == len(objects)
    assert report.bytes_checked == sum(len(d) for d in {*built.files_one.values()} if len(d) > 64)
    assert report.missing == [] and report.corrupt == []
    assert report.image_problems == [] and report.no_verity == []
    # No fs-verity on this kernel/filesystem: everything was computed.
    assert report.verity_measured == 0
    assert seen[0] == Progress("image", 0, 1)
    assert seen[-1] == Progress("objects", len(objects), len(objects))
    assert [p.phase for p in seen] == sorted(
        (p.phase for p in seen), key=["image", "objects"].index
    )

    phases: list[str] = []
    freport = fsck(built.repo, progress=lambda p: phases.append(p.phase))
    assert freport.ok and freport.problems == []
    all_objects = objects | {_hex(d) for d in built.files_two.values() if len(d) > 64}
    assert freport.objects_checked == len(all_objects) + 2  # plus the two image files
    assert freport.images_checked == 2 and freport.refs_checked == 2
    assert list(dict.fromkeys(phases)) == ["metadata", "objects", "images", "refs"]

    # The Repository methods (with locking and name resolution) agree.
    assert built.repo.verify_image("one").ok
    assert built.repo.verify_image("refs/two").digest == built.two
    assert built.repo.fsck().ok


def test_c_mkcomposefs_image_verifies(tmp_path: Path, reference_bin: Path) -> None:
    """An image and objects made by C ``mkcomposefs --digest-store`` into our layout."""
    rng = random.Random(SEED + 1)
    files = _make_tree(tmp_path / "tree", rng, 3)
    repo = Repository.init(tmp_path / "repo")
    out = subprocess.run(
        [
            str(reference_bin / "mkcomposefs"),
            "--print-digest",
            f"--digest-store={repo.path / 'objects'}",
            str(tmp_path / "tree"),
            str(tmp_path / "img"),
        ],
        check=True,
        capture_output=True,
        text=True,
    )
    digest = out.stdout.strip()
    obj = repo.object_path(digest)
    obj.parent.mkdir(exist_ok=True)
    shutil.copyfile(tmp_path / "img", obj)
    (repo.path / "images" / digest).symlink_to(f"../objects/{digest[:2]}/{digest[2:]}")
    (repo.path / "images" / "refs" / "c").symlink_to(f"../{digest}")
    report = verify_image(repo, digest)
    assert report.ok, report
    assert report.objects_checked == len({_hex(d) for d in files.values() if len(d) > 64})
    assert fsck(repo).ok


def test_sha512_repository(tmp_path: Path) -> None:
    b = _build(tmp_path, "fsverity-sha512-12")
    assert len(b.one) == 128
    assert verify_image(b.repo, b.one).ok
    assert fsck(b.repo).ok
    victim = _hex(b.files_one["c"], "sha512")
    path = b.obj(victim)
    data = bytearray(path.read_bytes())
    data[5] ^= 1
    path.write_bytes(data)
    report = verify_image(b.repo, b.one)
    assert report.corrupt == [(victim, f"digest mismatch: {_hex(bytes(data), 'sha512')}")]
    assert _fsck_kinds(fsck(b.repo).problems) == [("object-digest-mismatch", _rel(victim))]


# -- the five kinds of damage -----------------------------------------------------------------


def test_flipped_byte_in_object(built: Built) -> None:
    victim = _hex(built.files_one["c"])
    path = built.obj(victim)
    data = bytearray(path.read_bytes())
    data[12345] ^= 0x40
    path.write_bytes(data)
    measured = _hex(bytes(data))

    report = verify_image(built.repo, built.one)
    assert not report.ok
    assert report.corrupt == [(victim, f"digest mismatch: {measured}")]
    assert report.missing == [] and report.image_problems == []
    # Image two uses the same object.
    assert verify_image(built.repo, built.two).corrupt == report.corrupt

    freport = fsck(built.repo)
    assert not freport.ok
    assert freport.problems == [
        FsckProblem("object-digest-mismatch", _rel(victim), f"computed {measured}")
    ]


def test_deleted_object(built: Built) -> None:
    victim = _hex(built.files_one["only-1"])
    built.obj(victim).unlink()

    report = verify_image(built.repo, built.one)
    assert not report.ok
    assert report.missing == [victim]
    assert report.corrupt == [] and report.image_problems == []
    assert verify_image(built.repo, built.two).ok  # does not use it

    freport = fsck(built.repo)
    assert freport.problems == [
        FsckProblem(
            "image-missing-object", f"images/{built.one}", f"object {victim} does not exist"
        )
    ]


def test_truncated_object(built: Built) -> None:
    victim = _hex(built.files_one["big"])
    path = built.obj(victim)
    os.truncate(path, 4096)

    report = verify_image(built.repo, built.one)
    assert report.corrupt == [(victim, f"size 4096 != expected {(1 << 20) + 17}")]
    assert report.missing == [] and report.image_problems == []

    freport = fsck(built.repo)
    truncated = built.files_one["big"][:4096]
    assert freport.problems == [
        FsckProblem("object-digest-mismatch", _rel(victim), f"computed {_hex(truncated)}")
    ]


def test_truncated_image(built: Built) -> None:
    path = built.obj(built.one)
    data = path.read_bytes()
    os.truncate(path, len(data) // 2)

    report = verify_image(built.repo, built.one)
    assert not report.ok
    assert report.missing == [] and report.corrupt == []
    assert len(report.image_problems) == 2
    assert report.image_problems[0] == f"digest mismatch: {_hex(data[: len(data) // 2])}"
    assert report.image_problems[1].startswith("not a valid composefs image: ")
    assert verify_image(built.repo, built.two).ok

    freport = fsck(built.repo)
    assert _fsck_kinds(freport.problems) == sorted(
        [("object-digest-mismatch", _rel(built.one)), ("image-invalid", f"images/{built.one}")]
    )


def test_swapped_image(built: Built) -> None:
    """Image one's file replaced by image two's (a valid image, the wrong one)."""
    path = built.obj(built.one)
    path.write_bytes(built.obj(built.two).read_bytes())

    report = verify_image(built.repo, built.one)
    assert not report.ok
    assert report.image_problems == [f"digest mismatch: {built.two}"]
    assert report.missing == [] and report.corrupt == []

    freport = fsck(built.repo)
    assert freport.problems == [
        FsckProblem("object-digest-mismatch", _rel(built.one), f"computed {built.two}")
    ]


# -- worker processes ---------------------------------------------------------------------------


def test_worker_processes_find_the_same(built: Built, monkeypatch: pytest.MonkeyPatch) -> None:
    flipped = _hex(built.files_one["sub/f"])
    gone = _hex(built.files_one["b"])
    path = built.obj(flipped)
    data = bytearray(path.read_bytes())
    data[-1] ^= 1
    path.write_bytes(data)
    built.obj(gone).unlink()
    expected_corrupt = [(flipped, f"digest mismatch: {_hex(bytes(data))}")]

    in_process = verify_image(built.repo, built.one, workers=1)
    monkeypatch.setattr(verify_mod, "_PROCESS_MIN_COST", 0)
    monkeypatch.setattr(verify_mod, "_BATCH_COST", 1)
    # The worker starts and the calling thread checks a share, whatever the
    # scheduling: each waits until both hold a batch (verifyhooks).
    held = hold_until_all_take_a_batch(monkeypatch, 1)
    parallel = verify_image(built.repo, built.one, workers=2)
    assert len(held.started) == 1
    assert held.caller_checked
    for report in (in_process, parallel):
        assert report.missing == [gone]
        assert report.corrupt == expected_corrupt
        assert report.image_problems == []
    assert _fsck_kinds(fsck(built.repo, workers=2).problems) == sorted(
        [
            ("object-digest-mismatch", _rel(flipped)),
            ("image-missing-object", f"images/{built.one}"),
        ]
    )


def test_worker_start_failure_falls_back(built: Built, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken() -> subprocess.Popen[bytes]:
        raise OSError(24, "Too many open files")

    monkeypatch.setattr(verify_mod, "_PROCESS_MIN_COST", 0)
    monkeypatch.setattr(verify_mod, "_start_worker", broken)
    victim = _hex(built.files_one["a"])
    os.truncate(built.obj(victim), 10)
    report = verify_image(built.repo, built.one, workers=2)
    assert report.corrupt == [(victim, "size 10 != expected 100")]
    assert report.objects_checked > 2


# -- verity policies ----------------------------------------------------------------------------


@dataclasses.dataclass
class _PolicyView:
    """The repository seen with another verity policy (this kernel has no fs-verity,
    so a required repository cannot be created here)."""

    inner: Repository
    verity: VerityPolicy

    @property
    def path(self) -> Path:
        return self.inner.path

    @property
    def algorithm(self) -> str:
        return self.inner.algorithm

    @property
    def hash_name(self) -> str:
        return self.inner.hash_name

    def object_path(self, hexdigest: str) -> Path:
        return self.inner.object_path(hexdigest)

    def image_path(self, hexdigest: str) -> Path:
        return self.inner.image_path(hexdigest)


def test_verity_required_without_verity(built: Built) -> None:
    view = _PolicyView(built.repo, VerityPolicy.REQUIRED)
    report = verify_image(view, built.one)
    assert not report.ok and report.verity_required
    objects = sorted({_hex(d) for d in built.files_one.values() if len(d) > 64})
    assert report.no_verity == sorted([*objects, built.one])
    assert report.missing == [] and report.corrupt == [] and report.image_problems == []

    freport = fsck(view)
    assert not freport.ok
    assert {p.kind for p in freport.problems} == {"object-verity-missing"}
    assert all(p.fatal for p in freport.problems)
    assert freport.objects_checked == len(freport.problems)


@pytest.mark.parametrize("policy", [VerityPolicy.TRY, VerityPolicy.DISABLED])
def test_verity_not_required(built: Built, policy: VerityPolicy) -> None:
    view = _PolicyView(built.repo, policy)
    report = verify_image(view, built.one)
    assert report.ok and report.no_verity == []
    assert fsck(view).problems == []


# -- other findings -----------------------------------------------------------------------------


def test_verify_bad_names(built: Built) -> None:
    report = verify_image(built.repo, "xyz")
    assert not report.ok and "is not a sha256 image digest" in report.image_problems[0]
    absent = "0" * 64
    report = verify_image(built.repo, absent)
    assert report.image_problems == [
        f"image {absent} not found ({built.repo.path}/images/{absent} does not exist)"
    ]


def test_verify_image_link_to_wrong_object(built: Built) -> None:
    link = built.repo.path / "images" / built.one
    link.unlink()
    link.symlink_to(f"../objects/{built.two[:2]}/{built.two[2:]}")
    report = verify_image(built.repo, built.one)
    # Not followed: the link names another object than its own.
    assert report.image_problems == [
        f"{link} links to '../objects/{built.two[:2]}/{built.two[2:]}', not to its object "
        f"../objects/{built.one[:2]}/{built.one[2:]}; not followed",
    ]
    assert [(p.kind, p.path) for p in fsck(built.repo).problems] == [
        ("image-invalid", f"images/{built.one}")
    ]


def test_fsck_stray_temp_files_are_harmless(built: Built) -> None:
    root = built.repo.path
    (root / "objects" / ".tmp-object-abcdefghijkl").write_bytes(b"half written")
    (root / "objects" / ".tmpXy12Zq").write_bytes(b"from C mkcomposefs")
    (root / "images" / ".symlink-abcdefghijkl").symlink_to("../objects/nowhere")
    (root / "images" / "refs" / ".symlink-abcdefghijkl").symlink_to(f"../{built.one}")
    report = fsck(built.repo)
    assert report.ok
    assert _fsck_kinds(report.problems) == [
        ("stray-temp-file", "images/.symlink-abcdefghijkl"),
        ("stray-temp-file", "images/refs/.symlink-abcdefghijkl"),
        ("stray-temp-file", "objects/.tmp-object-abcdefghijkl"),
        ("stray-temp-file", "objects/.tmpXy12Zq"),
    ]
    assert not any(p.fatal for p in report.problems)


def test_fsck_bad_entries(built: Built) -> None:
    root = built.repo.path
    objects = root / "objects"
    (objects / "zz").mkdir()
    (objects / "ab" / "short").parent.mkdir(exist_ok=True)
    (objects / "ab" / "short").write_bytes(b"x")
    (objects / "ab" / ("A" * 62)).write_bytes(b"x")
    (objects / "cd").mkdir(exist_ok=True)
    (objects / "cd" / ("0" * 62)).symlink_to("elsewhere")
    (objects / "stray").write_bytes(b"x")
    (root / "images" / ("1" * 64)).write_bytes(b"not a link")
    (root / "images" / ("2" * 64)).symlink_to("../objects/22/" + "2" * 62)
    (root / "images" / "refs" / "nested").mkdir()
    (root / "images" / "refs" / "nested" / "dangling").symlink_to("../../" + "3" * 64)
    (root / "images" / "refs" / "outside").symlink_to("../../meta.json")
    (root / "images" / "refs" / "plain").write_bytes(b"x")
    report = fsck(built.repo)
    assert _fsck_kinds(report.problems) == sorted(
        [
            ("object-invalid-name", "objects/zz"),
            ("object-invalid-name", "objects/ab/short"),
            ("object-invalid-name", "objects/ab/" + "A" * 62),
            ("unexpected-file-type", "objects/cd/" + "0" * 62),
            ("unexpected-file-type", "objects/stray"),
            ("entry-not-symlink", "images/" + "1" * 64),
            ("broken-symlink", "images/" + "2" * 64),
            ("broken-symlink", "images/refs/nested/dangling"),
            ("broken-symlink", "images/refs/outside"),
            ("entry-not-symlink", "images/refs/plain"),
        ]
    )
    assert not report.ok


@pytest.mark.parametrize(
    ("content", "kind"),
    [
        (None, "metadata-parse-failed"),
        (b"{not json", "metadata-parse-failed"),
        (b'{"version": 1}', "metadata-parse-failed"),
        (b'{"version": 99, "algorithm": "fsverity-sha256-12"}', "metadata-parse-failed"),
        (
            RepoMetadata.from_json(b'{"version": 1, "algorithm": "fsverity-sha512-12"}').to_json(),
            "metadata-algorithm-mismatch",
        ),
    ],
)
def test_fsck_meta_json(built: Built, content: bytes | None, kind: str) -> None:
    meta = built.repo.path / "meta.json"
    if content is None:
        meta.unlink()
    else:
        meta.write_bytes(content)
    report = fsck(built.repo)
    assert [(p.kind, p.path) for p in report.problems] == [(kind, "meta.json")]
    assert not report.ok


def test_reports_serialise(built: Built) -> None:
    os.truncate(built.obj(_hex(built.files_one["a"])), 0)
    doc = verify_image(built.repo, built.one).to_dict()
    assert doc["ok"] is False and doc["corrupt"][0]["reason"] == "size 0 != expected 100"
    fdoc = fsck(built.repo).to_dict()
    assert fdoc["ok"] is False
    assert fdoc["problems"][0]["kind"] == "object-digest-mismatch"


def test_image_object_deleted(built: Built) -> None:
    """The image file itself gone: its link and its ref dangle."""
    built.obj(built.one).unlink()
    link = built.repo.path / "images" / built.one
    report = verify_image(built.repo, built.one)
    assert report.image_problems == [
        f"{link} is a dangling link (to ../objects/{built.one[:2]}/{built.one[2:]}): "
        "image object missing"
    ]
    assert report.objects_checked == 0 and not report.ok
    assert verify_image(built.repo, built.two).ok
    assert _fsck_kinds(fsck(built.repo).problems) == [
        ("broken-symlink", f"images/{built.one}"),
        ("broken-symlink", "images/refs/one"),
    ]


def _object_file(root: Path, data: bytes) -> tuple[bytes, str]:
    digest = digest_bytes(data).hex()
    path = root / "objects" / digest[:2] / digest[2:]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return os.fsencode(path), digest


def test_checker_batch_keeps_directories_and_no_symlinks(tmp_path: Path) -> None:
    # One batch checks several files of one XX directory through one open directory,
    # and a directory that is a symlink is refused (ELOOP), whether asked once or twice.
    alg = Algorithm.SHA256
    files = [_object_file(tmp_path, bytes([i]) * (100 + i)) for i in range(40)]
    results = verify_mod._check_batch(("sha256", [(p, -1) for p, _ in files]))
    assert [r[2] for r in results] == [d for _, d in files]
    path, digest = files[0]
    sub = tmp_path / "objects" / digest[:2]
    moved = tmp_path / "elsewhere"
    sub.rename(moved)
    sub.symlink_to(moved)
    with verify_mod._Checker(alg) as checker:
        first = checker.check(path, -1)
        again = checker.check(path, -1)
    assert first[0] is not None and first[2] is None
    assert again[0] is not None and again[2] is None


def test_checker_remembers_unsupported_per_filesystem(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Once the kernel says a filesystem cannot do fs-verity, its other files are not
    # asked again, but each is still hashed and reported as "unsupported".
    files = [_object_file(tmp_path, bytes([i]) * 5000) for i in range(5)]
    files.append((files[0][0], "0" * 64))  # content that does not match a name
    calls: list[int] = []

    def measure(fd: int, algorithm: object) -> tuple[bytes | None, str | None]:
        calls.append(fd)
        return None, "unsupported"

    monkeypatch.setattr(verify_mod, "_measure", measure)
    with verify_mod._Checker(Algorithm.SHA256) as checker:
        results = [checker.check(p, -1) for p, _ in files]
    assert len(calls) == 1
    assert [r[2] for r in results[:5]] == [d for _, d in files[:5]]
    assert results[5][2] == files[0][1]
    assert all(r[3] is False and r[4] == "unsupported" for r in results)
