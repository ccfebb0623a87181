"""composefsd.objectlayout: digest <-> ``XX/rest``, hostile names, and iteration."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from composefsd.fsverity import digest_bytes
from composefsd.kernel.verity import Algorithm
from composefsd.objectlayout import (
    TMP_PREFIX,
    contains,
    digest_of_link_target,
    digest_of_relpath,
    is_hex,
    is_hex_digest,
    is_object_dir_name,
    is_object_rest,
    is_temp_name,
    iter_objects,
    link_file_name,
    object_payload,
    object_relpath,
)
from composefsd.repository import InvalidNameError, Repository

SHA256 = Algorithm.SHA256
SHA512 = Algorithm.SHA512


@pytest.mark.parametrize("algorithm", [SHA256, SHA512])
def test_digest_and_path_round_trip(algorithm: Algorithm) -> None:
    digest = digest_bytes(b"hello", algorithm)
    hexdigest = digest.hex()
    rel = object_relpath(hexdigest)
    assert rel == f"{hexdigest[:2]}/{hexdigest[2:]}"
    assert object_payload(digest) == rel.encode()
    assert digest_of_relpath(rel, algorithm) == hexdigest
    assert is_hex_digest(hexdigest, algorithm)
    dirname, rest = rel.split("/")
    assert is_object_dir_name(dirname) and is_object_rest(rest, algorithm)


@pytest.mark.parametrize(
    "rel",
    [
        "ab/" + "0" * 61,  # too short
        "ab/" + "0" * 63,  # too long
        "AB/" + "0" * 62,  # uppercase
        "ab/" + "0" * 61 + "F",
        "ab/" + "0" * 61 + "g",  # not hex
        "ab/" + "0" * 60 + "..",
        "../" + "0" * 61,
        "ab/" + "0" * 30 + "/" + "0" * 31,  # an extra component
        "ab0" + "0" * 62,  # no component
        "a/b" + "0" * 62,
        "",
    ],
)
def test_hostile_paths_are_no_digest(rel: str) -> None:
    assert digest_of_relpath(rel, SHA256) is None


def test_hostile_names_are_rejected() -> None:
    assert not is_hex("") and not is_hex("AB") and not is_hex("a/b") and not is_hex("..")
    assert not is_hex_digest("0" * 63, SHA256) and not is_hex_digest("0" * 63 + "A", SHA256)
    assert not is_hex_digest("0" * 64, SHA512)
    assert not is_object_dir_name("a") and not is_object_dir_name("abc")
    assert not is_object_dir_name("AB") and not is_object_dir_name("..")
    assert not is_object_rest("0" * 61 + "/", SHA256)
    assert is_temp_name(TMP_PREFIX + "x") and is_temp_name(".tmpABC123")
    assert not is_temp_name("ab")


def _tree(objects: Path) -> list[str]:
    """Good objects, plus everything iteration must skip."""
    good = [digest_bytes(bytes([i]) * 10).hex() for i in range(3)]
    for h in good:
        path = objects / object_relpath(h)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x")
    (objects / (TMP_PREFIX + "abcdef")).write_bytes(b"t")  # our temporary
    (objects / ".tmpXyZ123").write_bytes(b"t")  # C's
    (objects / ("f" * 64)).write_bytes(b"flat")  # not in XX/
    (objects / "AB").mkdir()
    (objects / "AB" / ("0" * 62)).write_bytes(b"upper dir")
    (objects / "zz").mkdir()
    (objects / "zz" / ("0" * 62)).write_bytes(b"non-hex dir")
    sub = objects / good[0][:2]
    (sub / ("0" * 61)).write_bytes(b"short")
    (sub / ("A" * 62)).write_bytes(b"upper")
    (sub / (TMP_PREFIX + "in-xx")).write_bytes(b"t")
    (sub / ("1" * 62)).mkdir()  # a directory is no object
    (sub / ("2" * 62)).symlink_to(object_relpath(good[1]).split("/")[1])
    return good


def test_iteration_skips_temporaries_and_hostile_names(tmp_path: Path) -> None:
    objects = tmp_path / "objects"
    objects.mkdir()
    good = _tree(objects)
    assert sorted(iter_objects(str(objects), SHA256)) == sorted(good)
    assert list(iter_objects(str(objects), SHA512)) == []
    fd = os.open(objects, os.O_PATH | os.O_DIRECTORY)
    try:
        assert sorted(iter_objects(fd, SHA256)) == sorted(good)
        assert contains(fd, good[0]) and not contains(fd, "0" * 64)
    finally:
        os.close(fd)
    assert contains(str(objects), good[1]) and contains(os.fsencode(objects), good[2])
    assert not contains(str(objects), "1" * 64)


def test_object_store_reads_through_the_layout(tmp_path: Path) -> None:
    repo = Repository.init(tmp_path / "repo")
    with repo.object_store() as store:
        a = store.store_bytes(b"a" * 5000).digest
        b = store.store_bytes(b"b" * 100).digest
        (repo.objects_dir / (TMP_PREFIX + "leftover")).write_bytes(b"t")
        assert sorted(store.iter_objects()) == sorted([a, b])
        assert store.contains(a) and not store.contains("0" * 64)
        fd = store.open(b)
        try:
            assert os.read(fd, 1000) == b"b" * 100
        finally:
            os.close(fd)
        with pytest.raises(FileNotFoundError):
            store.open("0" * 64)
        for bad in ("../meta.json", "A" * 64, "0" * 63, a[:2] + "/" + a[2:]):
            with pytest.raises(InvalidNameError):
                store.contains(bad)
            with pytest.raises(InvalidNameError):
                store.open(bad)


@pytest.mark.parametrize(
    ("target", "expected"),
    [
        (f"../objects/ab/{'0' * 62}", "ab" + "0" * 62),
        # composefs-rs looks at the tail only, in either case.
        (f"elsewhere/AB/{'0' * 61}F", "ab" + "0" * 61 + "f"),
        (f"ab/{'0' * 62}", "ab" + "0" * 62),
        (f"../objects/ab/{'0' * 62}/", None),
        ("../objects/ab/00", None),
        (f"../objects/zz/{'0' * 62}", None),
        (f"../objects/a\u0130/{'0' * 61}", None),
        (f"../objects/ab0{'0' * 62}", None),
        ("", None),
    ],
)
def test_link_targets_name_objects_as_composefs_rs_reads_them(
    target: str, expected: str | None
) -> None:
    assert digest_of_link_target(target, SHA256) == expected


def test_link_target_width_follows_the_algorithm() -> None:
    digest = "cd" + "1" * 126
    target = "../objects/" + object_relpath(digest)
    assert digest_of_link_target(target, SHA512) == digest
    assert digest_of_link_target(target, SHA256) is None


@pytest.mark.parametrize(
    ("target", "expected"),
    [
        ("../abc", "abc"),
        ("../abc/", "abc"),
        ("../abc/.", "abc"),
        ("abc//./", "abc"),
        ("/abc", "abc"),
        ("..", None),
        ("../abc/..", None),
        (".", None),
        ("/", None),
        ("", None),
    ],
)
def test_ref_link_file_name_is_rusts_path_file_name(target: str, expected: str | None) -> None:
    assert link_file_name(target) == expected
