"""A repository's image formats follow its ``meta.json`` as in composefs-rs: what
``init`` writes (byte for byte cfsctl's), how ``erofs_formats`` and ``v1_erofs``
are read, CreateImage writing the default format and each extra format, the
per-call ``erofs_version``, and feature flags refusing a repository or opening it
read-only, through the daemon too."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest

from composefsd.image.formats import ErofsVersion, image_version
from composefsd.repository import (
    CorruptRepositoryError,
    CreateOptions,
    FormatConfig,
    InvalidNameError,
    ReadOnlyRepositoryError,
    RepoMetadata,
    Repository,
    RepositoryError,
    UnknownFeatureError,
    UnsupportedRepositoryError,
)
from composefsd.service.client import VarlinkCallError, connect
from ctlrun import run_ctl
from rsgolden import read_json
from servicehelpers import DAEMON, running_daemon, short_dir
from trees import small_tree


@pytest.fixture(scope="module")
def rs_meta() -> dict[str, bytes]:
    """cfsctl's meta.json texts (``cfsctl init --insecure [--erofs-version 2]``)."""
    summary = read_json("expected/oci/summary.json")
    return {name: text.encode() for name, text in summary["meta_json"].items()}


def _meta_doc(**formats: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "version": 1,
        "algorithm": "fsverity-sha256-12",
        "features": {"compatible": [], "read-only-compatible": [], "incompatible": []},
    }
    doc.update(formats)
    return doc


def _write_meta(path: Path, doc: dict[str, Any]) -> None:
    (path / "meta.json").write_text(json.dumps(doc, indent=2) + "\n")


# -- init -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("algorithm", "version", "golden"),
    [
        ("sha256", None, "sha256"),
        ("sha512", None, "sha512"),
        ("sha512", 1, "sha512"),
        ("sha256", 2, "sha256-erofs-v2"),
    ],
)
def test_init_writes_what_cfsctl_init_writes(
    tmp_path: Path, rs_meta: dict[str, bytes], algorithm: str, version: int | None, golden: str
) -> None:
    repo = Repository.init(tmp_path / "r", algorithm=algorithm, erofs_version=version)
    assert (repo.path / "meta.json").read_bytes() == rs_meta[golden]
    assert repo.erofs_version == (version if version is not None else 1)
    assert Repository.open(repo.path).formats == FormatConfig(ErofsVersion(version or 1))


def test_init_v0_and_extra_formats(tmp_path: Path) -> None:
    # V0 has no feature flag of its own (composefs-rs's new_with_formats).
    repo = Repository.init(tmp_path / "v0", erofs_version="0")
    doc = json.loads((repo.path / "meta.json").read_bytes())
    assert doc["features"] == {"compatible": [], "read-only-compatible": [], "incompatible": []}
    assert doc["erofs_formats"] == {"default": 0}
    assert repo.erofs_version is ErofsVersion.V0
    # A default and extras, as bootc configures them; the flag follows the default.
    formats = FormatConfig(ErofsVersion.V1, (ErofsVersion.V2, ErofsVersion.V2))
    repo = Repository.init(tmp_path / "dual", formats=formats)
    doc = json.loads((repo.path / "meta.json").read_bytes())
    assert doc["features"]["read-only-compatible"] == ["v1_erofs"]
    assert doc["erofs_formats"] == {"default": 1, "extra": [2]}
    assert list(Repository.open(repo.path).formats.versions()) == [ErofsVersion.V1, ErofsVersion.V2]


def test_init_keeps_the_formats_of_an_existing_repository(tmp_path: Path) -> None:
    path = tmp_path / "r"
    Repository.init(path, erofs_version=2)
    before = (path / "meta.json").read_bytes()
    assert Repository.init(path, erofs_version=2).erofs_version is ErofsVersion.V2
    for other in (None, 0, 1):
        wanted = 1 if other is None else other
        with pytest.raises(RepositoryError, match=rf"images V2, not .* V{wanted}$"):
            Repository.init(path, erofs_version=other)
    with pytest.raises(RepositoryError, match=r"V2 \(\+V1\)"):
        Repository.init(path, formats=FormatConfig(ErofsVersion.V2, (ErofsVersion.V1,)))
    assert (path / "meta.json").read_bytes() == before


@pytest.mark.parametrize("bad", [3, -1, "3", "v9", "", True, 1.0, None])
def test_init_refuses_unknown_formats(tmp_path: Path, bad: object) -> None:
    if bad is None:
        with pytest.raises(InvalidNameError, match="not both"):
            Repository.init(tmp_path / "r", erofs_version=1, formats=FormatConfig())
    else:
        with pytest.raises(InvalidNameError, match="unknown EROFS format version"):
            Repository.init(tmp_path / "r", erofs_version=bad)  # type: ignore[arg-type]
    assert not (tmp_path / "r").exists()


# -- reading meta.json ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("formats", "ro_compat", "expected"),
    [
        # No erofs_formats: older composefs-rs; v1_erofs says V1, else V2.
        (None, [], FormatConfig(ErofsVersion.V2)),
        (None, ["v1_erofs"], FormatConfig(ErofsVersion.V1)),
        ({"default": 0}, [], FormatConfig(ErofsVersion.V0)),
        ({"default": 1}, [], FormatConfig(ErofsVersion.V1)),
        ({"default": 2}, [], FormatConfig(ErofsVersion.V2)),
        # The field wins over the flag...
        ({"default": 0}, ["v1_erofs"], FormatConfig(ErofsVersion.V0)),
        # ...except that exactly {"default": 2} reads like an absent field.
        ({"default": 2}, ["v1_erofs"], FormatConfig(ErofsVersion.V1)),
        (
            {"default": 2, "extra": [1]},
            ["v1_erofs"],
            FormatConfig(ErofsVersion.V2, (ErofsVersion.V1,)),
        ),
        (
            {"default": 1, "extra": [2, 0, 2]},
            [],
            FormatConfig(ErofsVersion.V1, (ErofsVersion.V0, ErofsVersion.V2)),
        ),
    ],
)
def test_formats_read_as_composefs_rs_reads_them(
    tmp_path: Path,
    formats: dict[str, Any] | None,
    ro_compat: list[str],
    expected: FormatConfig,
) -> None:
    doc = _meta_doc()
    doc["features"]["read-only-compatible"] = ro_compat
    if formats is not None:
        doc["erofs_formats"] = formats
    meta = RepoMetadata.from_json(json.dumps(doc).encode())
    assert meta.format_config() == expected
    path = tmp_path / "r"
    Repository.init(path)
    _write_meta(path, doc)
    repo = Repository.open(path)
    assert (repo.formats, repo.erofs_version) == (expected, expected.default)
    assert not repo.read_only
    # What is read is written back unchanged (extras sorted and without repeats).
    again = json.loads(meta.to_json())
    if formats is not None:
        assert again["erofs_formats"]["default"] == formats["default"]
        assert again["erofs_formats"].get("extra", []) == sorted(set(formats.get("extra", [])))
    else:
        assert "erofs_formats" not in again


@pytest.mark.parametrize(
    ("formats", "error", "message"),
    [
        ({"default": 3}, UnsupportedRepositoryError, "unknown EROFS format version 3"),
        ({"default": 1, "extra": [7]}, UnsupportedRepositoryError, "version 7"),
        ({"default": "1"}, CorruptRepositoryError, "'1' is not an integer"),
        ({"default": True}, CorruptRepositoryError, "True is not an integer"),
        ({"default": 1, "extra": 2}, CorruptRepositoryError, "extra' is not a list"),
        ({"extra": [1]}, CorruptRepositoryError, "has no 'default'"),
        ([1], CorruptRepositoryError, "has no 'default'"),
        ({"default": 1, "extra": [[[[]]]] * 3}, CorruptRepositoryError, "not an integer"),
        ("[" * 100_000 + "]" * 100_000, CorruptRepositoryError, "not valid JSON"),
    ],
)
def test_bad_formats_are_refused(
    tmp_path: Path, formats: Any, error: type[Exception], message: str
) -> None:
    path = tmp_path / "r"
    Repository.init(path)
    _write_meta(path, _meta_doc(erofs_formats=formats))
    if isinstance(formats, str):
        # Nested too deep for the JSON parser.
        text = json.dumps(_meta_doc(erofs_formats=0)).replace("0}", formats + "}")
        (path / "meta.json").write_text(text)
    with pytest.raises(error, match=message):
        Repository.open(path)


# -- CreateImage ------------------------------------------------------------------------------


@pytest.mark.parametrize("algorithm", ["sha256", "sha512"])
@pytest.mark.parametrize("version", list(ErofsVersion))
def test_create_image_writes_the_repository_format(
    tmp_path: Path, version: ErofsVersion, algorithm: str
) -> None:
    src = small_tree(tmp_path / "src")
    repo = Repository.init(tmp_path / "r", algorithm=algorithm, erofs_version=version)
    result = repo.create_image(src, ref="app")
    assert (result.erofs_version, result.extra_images) == (version, {})
    assert image_version((repo.images_dir / result.digest).read_bytes()) is version
    details = repo.describe_image("app")
    assert (details.composefs_version, details.object_count) == (version, 6)
    assert repo.verify_image("app").ok
    # Per call: one image in another format, no extras.
    other = ErofsVersion.V1 if version is ErofsVersion.V0 else ErofsVersion.V0
    single = repo.create_image(src, options=CreateOptions(erofs_version=other))
    assert single.erofs_version is other and single.digest != result.digest
    assert image_version((repo.images_dir / single.digest).read_bytes()) is other
    # A C version range: C mkcomposefs's choice (no whiteouts here: the minimum).
    c_range = repo.create_image(src, options=CreateOptions(min_version=0, max_version=1))
    assert c_range.erofs_version is ErofsVersion.V0


def test_create_image_writes_extra_formats_unnamed(tmp_path: Path) -> None:
    src = small_tree(tmp_path / "src")
    formats = FormatConfig(ErofsVersion.V1, (ErofsVersion.V0,))
    repo = Repository.init(tmp_path / "r", formats=formats)
    result = repo.create_image(src, ref="app")
    assert result.erofs_version is ErofsVersion.V1
    assert list(result.extra_images) == [ErofsVersion.V0]
    extra = result.extra_images[ErofsVersion.V0]
    # Both are images of the repository; only the default one is named.
    assert {e.digest: e.refs for e in repo.list_images()} == {result.digest: ["app"], extra: []}
    assert repo.describe_image(extra).composefs_version == 0
    # Alone, the V0 image is what a V0 repository writes.
    v0 = Repository.init(tmp_path / "v0", erofs_version=0).create_image(src)
    assert v0.digest == extra
    # The override writes exactly one image.
    assert (
        repo.create_image(src, options=CreateOptions(erofs_version=ErofsVersion.V1)).extra_images
        == {}
    )
    # Unnamed, the extra image goes at the next GC (as composefs-rs's do).
    repo.gc()
    assert [e.digest for e in repo.list_images()] == [result.digest]


@pytest.mark.parametrize(
    "fields",
    [
        {"erofs_version": 1, "min_version": 0},
        {"erofs_version": 0, "max_version": 1},
        {"erofs_version": 3},
        {"min_version": 2},
        {"max_version": -1},
    ],
)
def test_create_options_refuse_bad_versions(fields: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        CreateOptions(**fields)


# -- feature flags, directly and through the daemon ------------------------------------------


def test_unknown_incompatible_feature_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "r"
    Repository.init(path)
    doc = _meta_doc(erofs_formats={"default": 1})
    doc["features"]["incompatible"] = ["zstd_objects", "v1_erofs"]
    _write_meta(path, doc)
    with pytest.raises(UnknownFeatureError) as info:
        Repository.open(path)
    # v1_erofs is known, but not as an incompatible flag.
    assert info.value.features == ["zstd_objects", "v1_erofs"]
    assert "unknown incompatible feature(s): zstd_objects, v1_erofs" in str(info.value)
    # The daemon does not start on it, and says why.
    rundir = short_dir()
    try:
        proc = subprocess.run(
            [
                *DAEMON,
                "--repo",
                str(path),
                "--listen",
                str(rundir / "sock"),
                "--runtime-dir",
                str(rundir / "run"),
            ],
            capture_output=True,
            text=True,
            timeout=60,
            env={k: v for k, v in os.environ.items() if not k.startswith(("LISTEN_", "NOTIFY"))},
        )
    finally:
        subprocess.run(["rm", "-rf", str(rundir)], check=True)
    assert proc.returncode == 1
    assert "unknown incompatible feature(s): zstd_objects" in proc.stderr
    assert json.loads((path / "meta.json").read_text()) == doc


def test_unknown_read_only_compatible_feature_opens_read_only(tmp_path: Path) -> None:
    path = tmp_path / "r"
    repo = Repository.init(path)
    src = small_tree(tmp_path / "src")
    digest = repo.create_image(src, ref="app").digest
    doc = json.loads((path / "meta.json").read_text())
    doc["features"]["read-only-compatible"].append("future_ro")
    doc["features"]["compatible"].append("future_compat")  # ignored
    _write_meta(path, doc)
    repo = Repository.open(path)
    assert repo.read_only and "future_ro" in str(repo.read_only_reason)
    assert repo.erofs_version is ErofsVersion.V1
    with pytest.raises(ReadOnlyRepositoryError, match="future_ro"):
        repo.create_image(src)
    before = sorted(p for p, _d, _f in os.walk(path))
    with running_daemon(path) as daemon, connect(daemon.address) as conn:
        method = "io.composefs.Repository."
        described = conn.call(method + "Describe")
        assert "future_ro" in described["readOnlyReason"]
        assert described["erofsVersion"] == 1
        # Reads work...
        images = conn.call(method + "ListImages")["images"]
        assert [i["digest"] for i in images] == [digest]
        assert conn.call(method + "Verify", {"image": "app"})["ok"] is True
        # ...every write is refused with ReadOnlyRepository.
        writes: list[tuple[str, dict[str, Any]]] = [
            ("CreateImage", {"sourcePath": str(src), "ref": "new"}),
            ("RemoveImage", {"image": "app"}),
            ("GarbageCollect", {}),
        ]
        for name, params in writes:
            with pytest.raises(VarlinkCallError) as info:
                conn.call(method + name, params)
            assert info.value.name == method + "ReadOnlyRepository", name
            assert "future_ro" in info.value.parameters["message"], name
    assert sorted(p for p, _d, _f in os.walk(path)) == before
    assert Repository.open(path).resolve_image("app") == digest


@pytest.mark.parametrize(
    ("params", "parameter"),
    [
        ({"erofsVersion": 3}, "erofsVersion"),
        ({"erofsVersion": -1}, "erofsVersion"),
        ({"erofsVersion": 1 << 40}, "erofsVersion"),
        ({"erofsVersion": "1"}, "erofsVersion"),
        ({"erofsVersion": True}, "erofsVersion"),
        ({"erofsVersion": 1, "minVersion": 0}, "erofsVersion"),
        ({"erofsVersion": 2, "maxVersion": 1}, "erofsVersion"),
        ({"minVersion": 2}, "minVersion"),
        ({"xattrs": "keepUserXattrs"}, "xattrs"),
        ({"xattrs": "keep-user-xattrs", "propagateUsrToRoot": True}, "xattrs"),
        ({"xattrs": "all", "propagateUsrToRoot": True}, "xattrs"),
        ({"propagateUsrToRoot": True, "minVersion": 0}, "propagateUsrToRoot"),
        ({"bootable": True, "maxVersion": 1}, "bootable"),
        ({"bootable": "yes"}, "bootable"),
    ],
)
def test_create_image_refuses_bad_format_and_transform_options(
    tmp_path: Path, params: dict[str, Any], parameter: str
) -> None:
    path = tmp_path / "r"
    Repository.init(path)
    src = small_tree(tmp_path / "src")
    with (
        running_daemon(path) as daemon,
        connect(daemon.address) as conn,
        pytest.raises(VarlinkCallError) as info,
    ):
        conn.call("io.composefs.Repository.CreateImage", {"sourcePath": str(src), **params})
    assert info.value.name == "org.varlink.service.InvalidParameter"
    assert info.value.parameters == {"parameter": parameter}
    assert Repository.open(path).list_images() == []


def test_composefsctl_formats(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "r"
    src = small_tree(tmp_path / "src")
    status, out, _ = run_ctl(capsys, "--repo", str(path), "init", "--erofs-version", "2")
    assert status == 0 and out.endswith("images: V2)\n")
    status, out, _ = run_ctl(capsys, "--repo", str(path), "status")
    assert "format:      V2\n" in out
    status, out, _ = run_ctl(capsys, "--repo", str(path), "status", "--json")
    doc = json.loads(out)
    assert (doc["erofsVersion"], doc["extraErofsVersions"]) == (2, [])
    # Init again with other formats: refused, the repository unchanged.
    status, _, err = run_ctl(capsys, "--repo", str(path), "init")
    assert status == 1 and "images V2, not fsverity-sha256-12, try and V1" in err
    status, out, _ = run_ctl(capsys, "--repo", str(path), "create-image", str(src), "--json")
    assert status == 0
    result = json.loads(out)
    assert (result["erofs_version"], result["extra_images"]) == (2, {})
    for argv, message in [
        (["init", "--erofs-version", "3"], "not an EROFS format version"),
        (["create-image", str(src), "--erofs-version", "V1"], "not an EROFS format version"),
        (["create-image", str(src), "--erofs-version", "1", "--min-version", "0"], "exclude"),
        (["create-image", str(src), "--xattrs", "keep-user-xattrs"], "only goes with"),
        (["create-image", str(src), "--bootable", "--max-version", "1"], "exclude"),
        (["create-image", str(src), "--xattrs", "all", "--propagate-usr-to-root"], "invalid"),
    ]:
        status, _, err = run_ctl(capsys, "--repo", str(tmp_path / "r2"), *argv)
        assert status == 2 and message in err, (argv, err)
    assert not (tmp_path / "r2").exists()
