"""org.composefs.Oci's image methods (service/rsoci.py): every entry of cfsctl's
recorded transcript for them answered alike (ListImages, Check, Inspect, Tag,
Untag, ComputeId, Pull of the golden layout with its frames and ``stats``), then
what the transcript does not show: hostile names and digests, another uid's
handle, the methods an unprivileged peer may not call, a pull cancelled when its
client leaves, a pull from a registry, the boot image search of
``expected_digest``."""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import varlink

import users
from composefsd.repository import Repository
from composefsd.repository.oci import iter_tags
from composefsd.repository.ocilayer import ImportStats, human_bytes
from composefsd.service import imageproxy
from composefsd.service import rsoci as rsoci_module
from composefsd.service.context import CallCancelled, CallContext, Peer, VarlinkReplyError
from composefsd.service.methods import RepositoryInterface
from composefsd.service.mounts import MountTracker
from composefsd.service.rshandles import HandleTable
from composefsd.service.rsoci import INTERFACE, RsOciInterface
from composefsd.service.rsrepository import RsRepositoryInterface
from conftest import TestUsers
from registry import CuttingProxy, Registry, write_layout
from rsgolden import RS, unpack_repo
from rsreplay import received_fd_inspection
from servicehelpers import running_daemon, unmount_below
from test_service_methods import _check_struct

TRANSCRIPT = RS / "varlink" / "transcript.jsonl"
LAYOUT = RS / "inputs" / "oci" / "layout"
IDL = varlink.Interface(
    (Path(rsoci_module.__file__).parent / "org.composefs.Oci.varlink").read_text()
)


@cache
def _transcript() -> dict[int, dict[str, Any]]:
    with open(TRANSCRIPT) as fh:
        return {e["seq"]: e for e in map(json.loads, fh)}


def recorded(seq: int) -> dict[str, Any]:
    """Transcript entry ``seq`` (a copy: callers may change it)."""
    entry: dict[str, Any] = json.loads(json.dumps(_transcript()[seq]))
    return entry


def _substituted(value: Any, paths: dict[str, str]) -> Any:
    if isinstance(value, str):
        for name, path in paths.items():
            value = value.replace(name, path)
        return value
    if isinstance(value, list):
        return [_substituted(v, paths) for v in value]
    if isinstance(value, dict):
        return {k: _substituted(v, paths) for k, v in value.items()}
    return value


# -- calling the handler as the transport does ---------------------------------------------


@dataclass
class Env:
    """The golden sha256 repository ($REPO, handle 1), a fresh one ($VL/new-sha256,
    handle 2) and the handler, as the transcript's session had them."""

    golden: Repository
    fresh: Repository
    handles: HandleTable
    iface: RsOciInterface
    golden_handle: int
    fresh_handle: int

    def call(
        self,
        method: str,
        params: dict[str, Any],
        *,
        uid: int = 0,
        more: bool = False,
        frames: list[dict[str, Any]] | None = None,
        ctx: CallContext | None = None,
    ) -> dict[str, Any]:
        """``method`` with the IDL's fields positionally (absent ones None); the reply
        and every frame checked against the IDL."""
        member = IDL.members[method]
        args = [params.get(name) for name in member.in_type.fields]
        sent = frames if frames is not None else []

        def send(reply: dict[str, Any]) -> None:
            _check_struct(member.out_type, reply, method)
            sent.append(reply)

        if ctx is None:
            ctx = CallContext(
                peer=Peer(os.getpid(), uid, uid),
                method=f"{INTERFACE}.{method}",
                more=more,
                send_continues=send,
            )
        reply = getattr(self.iface, method)(*args, _request=ctx)
        _check_struct(member.out_type, reply, method)
        return dict(reply)

    def error(self, method: str, params: dict[str, Any], **kw: Any) -> VarlinkReplyError:
        with pytest.raises(VarlinkReplyError) as info:
            self.call(method, params, **kw)
        err = info.value
        if err.name.startswith(INTERFACE + "."):
            name = err.name[len(INTERFACE) + 1 :]
            _check_struct(IDL.members[name].type, err.parameters, name)
        return err

    def paths(self) -> dict[str, str]:
        return {"$LAYOUT": str(LAYOUT), "$REPO": str(self.golden.path)}


@pytest.fixture
def env(tmp_path: Path) -> Iterator[Env]:
    golden = Repository.open(unpack_repo("sha256", tmp_path / "golden"))
    fresh = Repository.init(tmp_path / "vl" / "new-sha256", algorithm="sha256")
    own = Repository.init(tmp_path / "own", algorithm="sha256")
    handles = HandleTable(own)
    repository = RepositoryInterface(own, MountTracker(tmp_path / "run"))
    iface = RsOciInterface(RsRepositoryInterface(repository, handles))
    one = handles.open(golden, 0).handle
    two = handles.open(fresh, 0).handle
    assert (one, two) == (1, 2)  # the transcript's numbers
    yield Env(golden, fresh, handles, iface, one, two)
    unmount_below(tmp_path)


def replay(env: Env, seq: int) -> None:
    """Transcript entry ``seq`` called directly; its one reply (or error) must be ours."""
    entry = recorded(seq)
    request = _substituted(entry["request"], env.paths())
    method = request["method"].rpartition(".")[2]
    params = request.get("parameters", {})
    (want,) = _substituted(entry["replies"], env.paths())
    if "error" in want:
        err = env.error(method, params)
        assert (err.name, err.parameters) == (want["error"], want["parameters"]), seq
        return
    got = env.call(method, params)
    expected = want.get("parameters", {})
    if method == "ListImages":
        # cfsctl lists in directory order; composefsd by name.
        expected["images"].sort(key=lambda i: i["name"])
    assert got == expected, seq


# -- the transcript ------------------------------------------------------------------------


@pytest.mark.parametrize("seq", [21, 22, 23, 24, 25, 26, 27, 28, 33, 34, 35, 36, 37, 38])
def test_transcript_reads(env: Env, seq: int) -> None:
    """ListImages (with and without filter), Inspect by tag and by @digest (and a
    digest without '@', a tag there is not), Check of all and of one, ComputeId in
    every variant: cfsctl's replies exactly."""
    replay(env, seq)


@pytest.mark.parametrize("seq", [67, 68, 69])
def test_transcript_errors(env: Env, seq: int) -> None:
    """A handle never issued, an image that is not there (Inspect and ComputeId)."""
    replay(env, seq)


def test_transcript_tag_untag(env: Env) -> None:
    """Tag, ListImages finding it, Untag, Untag again: cfsctl's message."""
    for seq in (29, 30, 31, 32):
        replay(env, seq)
    assert "vl-tag:1" not in dict(iter_tags(env.golden))


def test_transcript_pulls(env: Env) -> None:
    """The pulls of the golden layout into an empty repository: the first with every
    layer's started/progress/done, the second with every layer skipped, a bootable one
    without ``more`` (its boot image), one of a tag the layout lacks, then ListImages:
    cfsctl's frames (order within a layer kept; layers interleave freely), ``stats``,
    digests and verities."""
    for seq in (42, 43):
        entry = recorded(seq)
        request = _substituted(entry["request"], env.paths())
        frames: list[dict[str, Any]] = []
        final = env.call("Pull", request["parameters"], more=True, frames=frames)
        want = [r["parameters"] for r in entry["replies"]]
        assert final == want[-1]
        assert _per_layer(frames) == _per_layer(want[:-1])
        assert frames[0] == want[0] and frames[-1] == want[-2]
        assert sorted(map(json.dumps, frames)) == sorted(map(json.dumps, want[:-1]))
    for seq in (44, 45, 46):
        replay(env, seq)


def _per_layer(frames: list[dict[str, Any]]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for frame in frames:
        ((kind, value),) = frame.items()
        if isinstance(value, dict):
            out.setdefault(value["id"], []).append(kind)
    return out


def test_transcript_compute_id_of_a_copy(env: Env) -> None:
    """ComputeId of the image under another tag (the transcript's copy): the same id."""
    env.call("Tag", {"handle": 1, "manifest_digest": _single_digest(), "name": "copied"})
    want = recorded(60)["replies"][0]["parameters"]
    assert env.call("ComputeId", {"handle": 1, "image": "copied", "bootable": False}) == want


def _single_digest() -> str:
    """The manifest digest of the golden ``single``, as ListImages recorded it."""
    images = recorded(21)["replies"][0]["parameters"]["images"]
    return str(next(i["manifest_digest"] for i in images if i["name"] == "single"))


# -- stats -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("size", "text"),
    [
        (0, "0 B"),
        (1023, "1023 B"),
        (1024, "1.00 KiB"),
        (207667, "202.80 KiB"),
        (3 << 30, "3.00 GiB"),
    ],
)
def test_human_bytes(size: int, text: str) -> None:
    assert human_bytes(size) == text


def test_stats_line() -> None:
    stats = ImportStats(objects_new=9, objects_present=2, bytes_new=2048, bytes_inlined=10)
    assert str(stats) == "9 new + 2 already present objects; 2.00 KiB stored, 10 B inlined"


# -- hostile values --------------------------------------------------------------------------

HUGE = "x" * 100_000


@pytest.mark.parametrize(
    "image",
    ["../single", "single/../single", "/single", "a\0b", HUGE, "@", "@sha256:", "@sha256:1", ".."],
)
def test_inspect_hostile_names(env: Env, image: str) -> None:
    """A name that cannot be a tag or a digest finds nothing: NoSuchImage, or for a
    malformed ``@`` digest cfsctl's InternalError; a huge name is not echoed whole."""
    err = env.error("Inspect", {"handle": 1, "image": image})
    if image.startswith("@"):
        assert err.name == f"{INTERFACE}.InternalError"
        assert "Invalid OCI digest after '@'" in err.parameters["message"]
    else:
        assert err.name == f"{INTERFACE}.NoSuchImage"
        assert len(err.parameters["image"]) < 400


@pytest.mark.parametrize(
    "digest",
    [
        "sha256:" + "A" * 64,
        "sha256:" + "1" * 63,
        "sha256",
        "../../" + "1" * 64,
        "sha256:" + "1" * 64 + "/x",
        HUGE,
    ],
)
def test_tag_bad_digest(env: Env, digest: str) -> None:
    err = env.error("Tag", {"handle": 1, "manifest_digest": digest, "name": "t"})
    assert err.name == f"{INTERFACE}.InternalError"
    assert err.parameters["message"].startswith("invalid digest: ")
    assert len(err.parameters["message"]) < 400
    assert "t" not in dict(iter_tags(env.golden))


@pytest.mark.parametrize("digest", ["sha256:" + "1" * 64, "md5:" + "1" * 32, "nope:12"])
def test_tag_missing_manifest(env: Env, digest: str) -> None:
    """A well-formed digest (oci-spec takes unknown algorithms) of no stored manifest."""
    err = env.error("Tag", {"handle": 1, "manifest_digest": digest, "name": "t"})
    assert err.name == f"{INTERFACE}.InternalError"
    assert "t" not in dict(iter_tags(env.golden))


def test_inspect_unknown_algorithm(env: Env) -> None:
    """``@nope:12`` parses as cfsctl parses it, and names no image."""
    err = env.error("Inspect", {"handle": 1, "image": "@nope:12"})
    assert (err.name, err.parameters) == (f"{INTERFACE}.NoSuchImage", {"image": "nope:12"})


@pytest.mark.parametrize("name", ["..", ".", "", "@x", "a\nb", "y" * 300])
def test_tag_bad_names(env: Env, name: str) -> None:
    """Names that cannot be one file below streams/refs/oci: refused, nothing written."""
    before = sorted(os.listdir(env.golden.path / "streams" / "refs" / "oci"))
    err = env.error("Tag", {"handle": 1, "manifest_digest": _single_digest(), "name": name})
    assert err.name == f"{INTERFACE}.InternalError"
    assert sorted(os.listdir(env.golden.path / "streams" / "refs" / "oci")) == before


@pytest.mark.parametrize("name", ["../escape", "a/../../b", "x/y"])
def test_tag_slashes_stay_inside(env: Env, name: str) -> None:
    """``/`` and ``..`` in a tag are encoded into one file name below refs/oci, as
    composefs-rs does: the tag works and nothing is written outside."""
    env.call("Tag", {"handle": 1, "manifest_digest": _single_digest(), "name": name})
    assert dict(iter_tags(env.golden))[name] == _single_digest()
    assert not (env.golden.path / "streams" / "escape").exists()
    listed = env.call("ListImages", {"handle": 1, "filter": name})["images"]
    assert [i["name"] for i in listed] == [name]
    env.call("Untag", {"handle": 1, "name": name})
    assert name not in dict(iter_tags(env.golden))


def test_untag_hostile(env: Env) -> None:
    for name in ("..", "../single", HUGE, "@sha256:" + "1" * 64):
        err = env.error("Untag", {"handle": 1, "name": name})
        assert err.name == f"{INTERFACE}.InternalError"
        assert err.parameters["message"].endswith("No such file or directory (os error 2)")
    assert "single" in dict(iter_tags(env.golden))


def test_compute_id_bad_values(env: Env) -> None:
    base = {"handle": 1, "bootable": False}
    err = env.error("ComputeId", {**base, "image": "@sha256:xyz"})
    assert err.parameters["message"].startswith("invalid image reference:")
    config = "@" + recorded(38)["request"]["parameters"]["image"][1:]
    err = env.error("ComputeId", {**base, "image": config, "verity": "zz"})
    assert err.parameters["message"].startswith("invalid verity:")
    err = env.error("ComputeId", {**base, "image": "@sha256:" + "1" * 64})
    assert err.name == f"{INTERFACE}.InternalError"
    err = env.error("ComputeId", {**base, "image": "single", "xattrs": "Bogus"})
    assert err.name == "org.varlink.service.InvalidParameter"


def test_list_images_filter_matches_nothing(env: Env) -> None:
    assert env.call("ListImages", {"handle": 1, "filter": HUGE}) == {"images": []}


def test_other_uids_handle(env: Env) -> None:
    """A handle another uid opened does not exist for this one (nor for root)."""
    theirs = env.handles.open(env.golden, 4242).handle
    calls: list[tuple[str, dict[str, Any]]] = [
        ("ListImages", {}),
        ("Inspect", {"image": "single"}),
        ("Check", {}),
        ("Tag", {"manifest_digest": _single_digest(), "name": "stolen"}),
        ("Untag", {"name": "single"}),
        ("ComputeId", {"image": "single", "bootable": False}),
        ("Pull", {"image": f"oci:{LAYOUT}:single", "local_fetch": "disabled", "bootable": False}),
    ]
    for method, params in calls:
        err = env.error(method, {"handle": theirs, **params}, uid=1000)
        assert (err.name, err.parameters) == (f"{INTERFACE}.InvalidHandle", {"handle": theirs})
    assert env.call("ListImages", {"handle": theirs}, uid=4242)["images"]
    assert "stolen" not in dict(iter_tags(env.golden))


# -- Check ------------------------------------------------------------------------------------


def test_check_finds_damage(env: Env) -> None:
    """A layer stream gone and a tag to nothing: cfsctl's ``fsck: <kind>:`` lines, each
    image counted once, and the repository's own findings."""
    single = (
        env.golden.path
        / "streams"
        / ("oci-layer-sha256:75ec5fc207bf04ed80bdf00113363d5e73152da8711eacccbea7e45cd13bfc5c")
    )
    single.unlink()
    reply = env.call("Check", {"handle": 1})
    assert not reply["ok"]
    assert reply["images_checked"] == 6
    assert reply["images_corrupted"] == 1
    assert reply["errors"] == [
        "fsck: layer-stream-missing: single: "
        "sha256:75ec5fc207bf04ed80bdf00113363d5e73152da8711eacccbea7e45cd13bfc5c"
    ]
    reply = env.call("Check", {"handle": 1, "image": "nope"})
    assert (reply["images_checked"], reply["images_corrupted"]) == (1, 1)
    assert reply["errors"][0].startswith("fsck: ref-resolve-failed: nope: ")


def test_check_manifest_damaged(env: Env) -> None:
    """A tag whose manifest stream is gone: manifest-read-failed."""
    digest = _single_digest()
    (env.golden.path / "streams" / f"oci-manifest-{digest}").unlink()
    reply = env.call("Check", {"handle": 1, "image": "single"})
    assert reply["images_corrupted"] == 1
    assert reply["errors"][0].startswith("fsck: manifest-read-failed: single: ")


# -- Pull ---------------------------------------------------------------------------------------


def _pull(env: Env, image: str, **extra: Any) -> dict[str, Any]:
    params = {"handle": 2, "image": image, "local_fetch": "disabled", "bootable": False}
    return {**params, **extra}


def test_pull_bad_requests(env: Env) -> None:
    """Checked before anything is read: cfsctl's InvalidRequest/InvalidDigest, and
    references our pull refuses (relative, ``..``, unknown transport, huge)."""
    layout = f"oci:{LAYOUT}:boot"
    cases: list[tuple[dict[str, Any], str, str | None]] = [
        (_pull(env, layout, expected_digest="0" * 64), "InvalidRequest", "requires bootable"),
        (
            _pull(env, layout, bootable=True, expected_digest="0" * 64, xattrs="AllowlistOnly"),
            "InvalidRequest",
            "mutually exclusive",
        ),
        (_pull(env, layout, bootable=True, expected_digest="nothex"), "InvalidDigest", None),
        (_pull(env, "oci:relative/path:boot"), "InternalError", None),
        (_pull(env, f"oci:{LAYOUT}/../layout:boot"), "InternalError", None),
        (_pull(env, "ftp://example.com/x"), "InternalError", None),
        (_pull(env, "docker://" + HUGE), "InternalError", None),
        (_pull(env, layout, name="../x\n"), "InternalError", None),
        (_pull(env, layout, storage_root="relative"), "InvalidRequest", None),
    ]
    for params, name, text in cases:
        err = env.error("Pull", params)
        assert err.name == f"{INTERFACE}.{name}", params
        if text is not None:
            assert text in err.parameters["message"]
        assert len(json.dumps(err.parameters)) < 1000
    assert list(iter_tags(env.fresh)) == []


def test_pull_unknown_local_fetch_is_disabled(env: Env) -> None:
    """cfsctl takes any other ``local_fetch`` as ``disabled``."""
    reply = env.call("Pull", _pull(env, f"oci:{LAYOUT}:single", local_fetch="bogus" * 2000))
    assert reply["completed"]["manifest_digest"] == _single_digest()


def test_pull_cancelled_when_the_client_leaves(env: Env) -> None:
    """The client goes away after the first frame: the pull stops, no tag is written."""
    ctx = CallContext(peer=Peer(os.getpid(), 0, 0), method=f"{INTERFACE}.Pull", more=True)
    sent: list[dict[str, Any]] = []

    def send(reply: dict[str, Any]) -> None:
        sent.append(reply)
        ctx.cancelled.set()

    ctx.send_continues = send
    with pytest.raises(CallCancelled):
        env.call("Pull", _pull(env, f"oci:{LAYOUT}:multi", name="multi"), ctx=ctx)
    assert len(sent) == 1
    assert list(iter_tags(env.fresh)) == []


def test_pull_without_more_sends_no_frames(env: Env) -> None:
    frames: list[dict[str, Any]] = []
    reply = env.call("Pull", _pull(env, f"oci:{LAYOUT}:multi"), frames=frames)
    assert frames == []
    assert reply["completed"]["stats"].startswith("9 new + 0 already present objects")
    assert list(iter_tags(env.fresh)) == []  # no name: no tag


def test_pull_expected_digest(env: Env) -> None:
    """``expected_digest``: the boot image the UKI names is found (and said in which
    mode and format); one that no mode gives is BootImageMismatch with the count."""
    boot = recorded(44)["replies"][0]["parameters"]["completed"]
    reply = env.call(
        "Pull", _pull(env, f"oci:{LAYOUT}:boot", bootable=True, expected_digest=boot["boot_image"])
    )
    assert reply["completed"]["boot_image"] == boot["boot_image"]
    assert reply["completed"]["boot_image_mode"] == "allowlist-only"
    assert reply["completed"]["boot_image_format_version"] == "V1"
    err = env.error(
        "Pull", _pull(env, f"oci:{LAYOUT}:boot", bootable=True, expected_digest="0" * 64)
    )
    assert (err.name, err.parameters) == (
        f"{INTERFACE}.BootImageMismatch",
        {"expected": "0" * 64, "tried": 4},
    )


def test_pull_bootable_keep_user_xattrs(env: Env) -> None:
    """A bootable pull with KeepUserXattrs: its boot image is ComputeId's for that mode."""
    reply = env.call(
        "Pull", _pull(env, f"oci:{LAYOUT}:boot", name="b", bootable=True, xattrs="KeepUserXattrs")
    )
    done = reply["completed"]
    assert done["boot_image_mode"] == "keep-user-xattrs"
    want = env.call(
        "ComputeId", {"handle": 2, "image": "b", "bootable": True, "xattrs": "KeepUserXattrs"}
    )
    assert done["boot_image"] == want["image_id"]


@pytest.fixture
def insecure_registry(env: Env, registry: Registry, tmp_path: Path) -> str:
    """registries.conf marking the test registry plain HTTP, given to skopeo as the
    daemon's (Pull has no TLS option of its own, as cfsctl's)."""
    conf = tmp_path / "registries.conf"
    conf.write_text(f'[[registry]]\nlocation = "{registry.host}"\ninsecure = true\n')
    env.iface.proxy_options = imageproxy.ProxyOptions(registries_conf=str(conf))
    return registry.push(f"oci:{LAYOUT}:multi", "rs/pull", "1")


def test_pull_from_registry(env: Env, insecure_registry: str) -> None:
    """Through skopeo: cfsctl's frames for a registry (config and manifest messages
    naming digests, each layer started, progressed, done), then the image as the
    layout's pull stores it."""
    frames: list[dict[str, Any]] = []
    reply = env.call("Pull", _pull(env, insecure_registry, name="r"), more=True, frames=frames)
    want = recorded(42)["replies"][-1]["parameters"]["completed"]
    assert reply["completed"]["manifest_digest"] == want["manifest_digest"]
    assert reply["completed"]["stats"] == want["stats"]
    config = want["config_digest"]
    assert frames[0] == {"message": f"Fetching config {config}"}
    assert frames[-1] == {"message": f"Storing manifest {want['manifest_digest']}"}
    per_layer = _per_layer(frames)
    assert len(per_layer) == 3
    for kinds in per_layer.values():
        assert kinds[0] == "started" and kinds[-2:] == ["progress", "done"]
    assert dict(iter_tags(env.fresh)) == {"r": want["manifest_digest"]}


# -- through the daemon --------------------------------------------------------------------


def test_unprivileged_peer_refused(
    tmp_path: Path, test_users: TestUsers, user_python: users.UserPython
) -> None:
    """Another uid may call the read-only methods (which then find no handle of its
    own); Tag, Untag, Pull and OciMount are refused before their parameters are
    looked at."""
    path = unpack_repo("sha256", tmp_path)
    calls: list[tuple[str, dict[str, Any]]] = [
        (f"{INTERFACE}.ListImages", {"handle": 1}),
        (f"{INTERFACE}.Inspect", {"handle": 1, "image": "single"}),
        (f"{INTERFACE}.Check", {"handle": 1}),
        (f"{INTERFACE}.ComputeId", {"handle": 1, "image": "single", "bootable": False}),
        (f"{INTERFACE}.Tag", {"handle": 1, "manifest_digest": "x", "name": "y"}),
        (f"{INTERFACE}.Untag", {"handle": 1, "name": "single"}),
        (
            f"{INTERFACE}.Pull",
            {"handle": 1, "image": "oci:/x", "local_fetch": "disabled", "bootable": False},
        ),
        (
            f"{INTERFACE}.OciMount",
            {"handle": 1, "image": "single", "bootable": False, "options": {}},
        ),
    ]
    invalid = f"{INTERFACE}.InvalidHandle"
    denied = "org.varlink.service.PermissionDenied"
    with running_daemon(path, public=True) as d:
        results = users.call_errors(user_python, test_users.bob, d.address, calls)
    assert results == [invalid] * 4 + [denied] * 4
    assert "single" in dict(iter_tags(Repository.open(path)))


def test_registered_in_the_daemon(tmp_path: Path) -> None:
    """The interface is served beside io.composefs.*, with its IDL."""
    from composefsd.service import client

    path = unpack_repo("sha256", tmp_path)
    with running_daemon(path) as d, client.connect(d.address) as conn:
        info = dict(conn.call("org.varlink.service.GetInfo", {}))
        assert INTERFACE in info["interfaces"]
        desc = dict(
            conn.call("org.varlink.service.GetInterfaceDescription", {"interface": INTERFACE})
        )
        assert (
            desc["description"].startswith(f"interface {INTERFACE}")
            or INTERFACE in desc["description"]
        )


# -- OciMount ---------------------------------------------------------------------------------


def _mounted(env: Env, params: dict[str, Any]) -> list[str]:
    """OciMount of the golden repository; the top of the detached mount it sent."""
    ctx = CallContext(peer=Peer(os.getpid(), 0, 0), method=f"{INTERFACE}.OciMount")
    try:
        reply = env.call("OciMount", {"handle": 1, "options": {}, **params}, ctx=ctx)
        assert reply == {"fd_index": 0} and len(ctx.out_fds) == 1
        return received_fd_inspection(ctx.out_fds[0])["top_level_entries"]  # type: ignore[no-any-return]
    finally:
        ctx.close_fds()


def test_oci_mount_by_tag_and_digest(env: Env) -> None:
    """By tag, by ``@`` digest and by cfsctl's bare ``sha256:`` digest: the same
    tree as the transcript's mount of ``single``."""
    want = recorded(49)["received_fd_inspection"][0]["top_level_entries"]
    digest = _single_digest()
    for image in ("single", f"@{digest}", digest):
        assert _mounted(env, {"image": image, "bootable": False}) == want


def test_oci_mount_bootable(env: Env) -> None:
    """The boot image of ``boot``; ``single`` has none (cfsctl's message)."""
    assert _mounted(env, {"image": "boot", "bootable": True})
    err = env.error("OciMount", {"handle": 1, "image": "single", "bootable": True, "options": {}})
    assert (err.name, err.parameters) == (
        f"{INTERFACE}.InternalError",
        {"message": "No boot EROFS image linked"},
    )


@pytest.mark.parametrize("image", ["nope", "../single", "@sha256:" + "1" * 64, "sha256:x", HUGE])
def test_oci_mount_no_such_image(env: Env, image: str) -> None:
    err = env.error("OciMount", {"handle": 1, "image": image, "bootable": False, "options": {}})
    assert err.name == f"{INTERFACE}.NoSuchImage"
    assert err.parameters["image"].startswith(image[:300])
    assert len(err.parameters["image"]) < 400


def test_oci_mount_overlay_without_fds(env: Env) -> None:
    """``overlay`` wants the upper and work directories as the call's fds."""
    err = env.error(
        "OciMount",
        {"handle": 1, "image": "single", "bootable": False, "options": {"overlay": True}},
    )
    assert err.name == f"{INTERFACE}.InternalError"


def test_pull_cancelled_on_a_stalled_registry(env: Env, registry: Registry, tmp_path: Path) -> None:
    """A registry that stops answering mid-blob sends no progress: when the client
    leaves, skopeo is closed under the transfer (the shared ``run_pull``), the pull
    ends in CallCancelled, no tag is written and the repository stays fsck-clean."""
    layout = tmp_path / "layout"
    image = write_layout(layout, {"big": [[("blob", os.urandom(4 << 20))]]})["big"]
    registry.push(f"oci:{layout}:big", "rs/stall", "1")
    with CuttingProxy(
        registry.host, image.layers[0].digest, cut_after=64 * 1024, stall=True
    ) as cutter:
        conf = tmp_path / "registries.conf"
        conf.write_text(f'[[registry]]\nlocation = "{cutter.host}"\ninsecure = true\n')
        env.iface.proxy_options = imageproxy.ProxyOptions(registries_conf=str(conf))
        ctx = CallContext(
            peer=Peer(os.getpid(), 0, 0),
            method=f"{INTERFACE}.Pull",
            more=True,
            send_continues=lambda _reply: None,
        )
        raised: list[BaseException] = []

        def pull() -> None:
            try:
                env.call(
                    "Pull", _pull(env, f"docker://{cutter.host}/rs/stall:1", name="s"), ctx=ctx
                )
            except BaseException as exc:
                raised.append(exc)

        thread = threading.Thread(target=pull)
        thread.start()
        assert cutter.stalled.wait(120), "the blob request never reached the registry"
        ctx.cancelled.set()
        thread.join(120)
        assert not thread.is_alive(), "the pull hangs after its client left"
    assert len(raised) == 1 and isinstance(raised[0], CallCancelled), raised
    assert list(iter_tags(env.fresh)) == []
    assert env.fresh.fsck().ok
