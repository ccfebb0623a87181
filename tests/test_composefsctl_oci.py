"""``composefsctl oci ...`` through a real composefsd on a golden repository: images
(text and --json), inspect, tag/untag, mount (attached by the daemon and with
--fd-attach), exit statuses (1 failed, 2 usage, 3 no daemon), hostile tag names
printed escaped, and the per-layer progress display of pull."""

from __future__ import annotations

import io
import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from composefsd.cli.composefsctl import oci as ctl_oci
from composefsd.cli.composefsctl.output import LayerProgressPrinter
from composefsd.service.client import Reply
from ctlrun import run_ctl
from rsgolden import OCI_DUMPS, RS, check_tree, unpack_repo
from servicehelpers import Daemon, running_daemon, unmount_below


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[Path, Daemon]]:
    path = unpack_repo("sha256", tmp_path)
    with running_daemon(path) as d:
        yield path, d
    unmount_below(tmp_path)


def _manifests() -> dict[str, str]:
    with open(RS / "inputs" / "oci" / "MANIFEST.json") as fh:
        return {i["tag"]: i["manifest_digest"] for i in json.load(fh)["images"]}


def test_images_inspect_tag_untag(
    capsys: pytest.CaptureFixture[str], served: tuple[Path, Daemon]
) -> None:
    path, d = served
    c = ("--connect", d.address)
    status, out, err = run_ctl(capsys, *c, "oci", "images")
    assert (status, err) == (0, "")
    lines = out.splitlines()
    assert lines[0].split() == [
        "TAG", "MANIFEST", "IMAGE", "ID", "PLATFORM", "LAYERS", "SIZE", "CREATED",
    ]  # fmt: skip
    rows = {line.split()[0]: line.split() for line in lines[1:]}
    assert sorted(rows) == ["boot", "boot-t1", "multi", "multi:v2", "shared", "single"]
    multi = _manifests()["multi"]
    assert rows["multi"][1] == multi.removeprefix("sha256:")[:12]
    assert rows["multi"][3:5] == ["linux/amd64", "3"]

    status, out, _ = run_ctl(capsys, *c, "oci", "images", "--json")
    docs = json.loads(out)
    assert status == 0 and [i["tag"] for i in docs] == sorted(rows)
    by_tag = {i["tag"]: i for i in docs}
    assert rows["multi"][2] == by_tag["multi"]["imageId"][:12]

    status, out, _ = run_ctl(capsys, *c, "oci", "inspect", "multi")
    doc = json.loads(out)
    assert status == 0 and doc["manifestDigest"] == multi
    assert doc["imageId"] == by_tag["multi"]["imageId"]
    assert doc["config"]["rootfs"]["diff_ids"] == by_tag["multi"]["layers"]
    status, out2, _ = run_ctl(capsys, *c, "oci", "inspect", "@" + multi)
    assert status == 0 and json.loads(out2) == doc

    status, out, err = run_ctl(capsys, *c, "oci", "tag", "multi", "release/1", "-v")
    assert (status, out, err) == (0, f"tagged {multi} as release/1\n", "")
    assert os.path.islink(path / "streams" / "refs" / "oci" / "release%2F1")
    status, out, _ = run_ctl(capsys, *c, "oci", "untag", "release/1", "--json")
    assert status == 0 and json.loads(out) == {"tag": "release/1", "manifestDigest": multi}
    status, out, err = run_ctl(capsys, *c, "oci", "untag", "release/1")
    assert (status, out) == (1, "")
    assert err == (
        "composefsctl: error: io.composefs.Oci.ImageNotFound: no OCI image 'release/1'\n"
    )
    status, _, err = run_ctl(capsys, *c, "oci", "tag", "multi", "..")
    assert status == 1 and err.startswith("composefsctl: error: io.composefs.Oci.InvalidTag: ")


def test_hostile_tag_printed_escaped(
    capsys: pytest.CaptureFixture[str], served: tuple[Path, Daemon]
) -> None:
    """A tag another tool left with control characters in its name cannot drive the
    terminal or forge a row."""
    path, d = served
    multi = _manifests()["multi"]
    (path / "streams" / "refs" / "oci" / "evil\n\x1b[2Jrow").symlink_to(
        f"../../oci-manifest-{multi}"
    )
    status, out, err = run_ctl(capsys, "--connect", d.address, "oci", "images")
    assert (status, err) == (0, "")
    assert all(line.isprintable() for line in out.splitlines())
    assert "evil\\n\\x1b[2Jrow" in out
    assert len(out.splitlines()) == 8


def test_mount(
    capsys: pytest.CaptureFixture[str], served: tuple[Path, Daemon], tmp_path: Path
) -> None:
    _path, d = served
    c = ("--connect", d.address)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    status, out, err = run_ctl(capsys, *c, "oci", "mount", "multi", str(mnt), "--json")
    assert (status, err) == (0, "")
    doc = json.loads(out)
    assert doc["where"] == str(mnt) and doc["readOnly"] is True
    assert doc["source"] == f"composefs:{doc['imageDigest']}"
    assert check_tree(mnt, OCI_DUMPS / "multi" / "dump.txt") > 0
    assert run_ctl(capsys, *c, "unmount", str(mnt))[0] == 0

    status, out, err = run_ctl(
        capsys, *c, "oci", "mount", "boot", str(mnt), "--bootable", "--fd-attach", "-v"
    )
    assert (status, err) == (0, "")
    assert out.startswith("mounted composefs:") and "(attached here)" in out
    assert check_tree(mnt, OCI_DUMPS / "boot" / "dump.bootable.txt") > 0
    assert run_ctl(capsys, *c, "unmount", str(mnt))[0] == 0

    status, _, err = run_ctl(capsys, *c, "oci", "mount", "multi", str(mnt), "--upperdir", "/x")
    assert status == 2 and "--upperdir and --workdir go together" in err
    status, _, err = run_ctl(capsys, *c, "oci", "mount", "--bootable", "single", str(mnt))
    assert status == 1 and "has no bootable composefs image" in err
    assert not os.path.ismount(mnt)


def test_exit_statuses(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    status, _, err = run_ctl(capsys, "oci")
    assert status == 2 and "OCI_COMMAND" in err
    status, _, err = run_ctl(capsys, "--direct", "oci", "images")
    assert status == 2 and "works through composefsd only" in err
    status, _, err = run_ctl(capsys, "oci", "images", "--repo", str(tmp_path))
    assert status == 2 and "works through composefsd only" in err
    status, _, err = run_ctl(capsys, "--connect", str(tmp_path / "nothing"), "oci", "images")
    assert status == 3 and err.startswith("composefsctl: error: ")


def test_absolute_reference(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)
    assert ctl_oci.absolute_reference("oci:layout:v1") == f"oci:{tmp_path}/layout:v1"
    assert ctl_oci.absolute_reference("oci-archive:a.tar") == f"oci-archive:{tmp_path}/a.tar"
    assert ctl_oci.absolute_reference("oci:/abs:tag") == "oci:/abs:tag"
    assert ctl_oci.absolute_reference("docker://h/x:1") == "docker://h/x:1"
    assert ctl_oci.absolute_reference("containers-storage:x") == "containers-storage:x"


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def _progress(phase: str, done: int, total: int | None, layer: str | None = None) -> Reply:
    p: dict[str, object] = {"phase": phase, "done": done}
    if total is not None:
        p["total"] = total
    if layer is not None:
        p["layer"] = layer
    return Reply({"progress": p})


def _screen(text: str) -> list[str]:
    """What a terminal shows after ``text``: lines, with the cursor-up-N-lines
    (ESC [ N F) and erase-line (ESC [ 2 K) sequences the printer uses applied."""
    rows: list[str] = []
    row = 0
    i = 0
    while i < len(text):
        if text.startswith("\x1b[", i):
            end = i + 2
            while not text[end].isalpha():
                end += 1
            arg, cmd = text[i + 2 : end], text[end]
            if cmd == "F":
                row -= int(arg)
            elif cmd == "K" and row < len(rows):
                rows[row] = ""
            i = end + 1
            continue
        nl = text.find("\n", i)
        esc = text.find("\x1b[", i)
        stop = min(x for x in (nl, esc, len(text)) if x >= 0)
        while len(rows) <= row:
            rows.append("")
        rows[row] += text[i:stop]
        if stop == nl:
            row += 1
            stop += 1
        i = stop
    return rows


def test_layer_progress_bars() -> None:
    """On a terminal each layer has its own bar line, redrawn in place while layers
    are fetched together; elsewhere plain lines."""
    a, b = "sha256:" + "a" * 64, "sha256:" + "b" * 64
    replies = [
        _progress("manifest", 1, 1),
        _progress("fetch", 10, 100, a),
        _progress("fetch", 5, 50, b),
        _progress("fetch", 100, 100, a),
        _progress("fetch", 50, 50, b),
        _progress("image", 0, None),
    ]
    tty = _Tty()
    printer = LayerProgressPrinter(tty)
    for r in replies:
        assert printer.reply(r)
    printer.finish()
    assert not printer.reply(Reply({"digest": "x"}))
    screen = _screen(tty.getvalue())
    assert len(screen) == 4, screen
    assert screen[0].startswith("manifest [") and screen[0].endswith("100% 1/1")
    assert screen[1].startswith("fetch sha256:aaaaaaaaaaaa [") and "100% 100/100" in screen[1]
    assert screen[2].startswith("fetch sha256:bbbbbbbbbbbb [") and "100% 50/50" in screen[2]
    assert screen[3] == "image: 0"
    # Only the layer lines were rewritten: nothing scrolled away, no line repeated.
    assert tty.getvalue().count("\n") == 1 + 2 + 3 + 3 + 3 + 4

    plain = io.StringIO()
    printer = LayerProgressPrinter(plain)
    for r in [*replies, _progress("skip", 0, 0, b)]:
        printer.reply(r)
    printer.finish()
    assert plain.getvalue().splitlines() == [
        "manifest: 1/1",
        "fetch sha256:aaaaaaaaaaaa: 10/100",
        "fetch sha256:bbbbbbbbbbbb: 5/50",
        "fetch sha256:aaaaaaaaaaaa: 100/100",
        "fetch sha256:bbbbbbbbbbbb: 50/50",
        "image: 0",
        "skip sha256:bbbbbbbbbbbb: 0/0",
    ]


def test_pull(
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    daemon: Daemon,
) -> None:
    """A pull of the golden layout by a relative path (made absolute for the daemon):
    a progress line per report with --progress, the result as text or JSON."""
    layout = RS / "inputs" / "oci" / "layout"
    monkeypatch.chdir(layout.parent)
    c = ("--connect", daemon.address)
    status, out, err = run_ctl(capsys, *c, "oci", "pull", "oci:layout:multi", "cli/m", "--progress")
    assert status == 0, err
    lines = err.splitlines()
    assert any(line.startswith("fetch sha256:") for line in lines), err
    assert lines[-1].startswith("image")
    multi = _manifests()["multi"]
    assert out.splitlines()[0] == f"manifest {multi}"
    assert out.splitlines()[2].startswith("image    ")

    status, out, err = run_ctl(capsys, *c, "oci", "pull", "oci:layout:multi", "--json", "-v")
    assert (status, err) == (0, "")
    doc = json.loads(out)
    assert doc["manifestDigest"] == multi
    assert [layer["skipped"] for layer in doc["layers"]] == [True, True, True]

    status, _, err = run_ctl(capsys, *c, "oci", "pull", "oci:layout:nothing")
    assert status == 1 and "io.composefs.Oci.PullFailed" in err
    status, _, err = run_ctl(capsys, *c, "oci", "pull", "ftp://x")
    assert status == 1 and "io.composefs.Oci.InvalidReference" in err
    status, _, err = run_ctl(capsys, *c, "oci", "pull", "oci:layout:multi", "--tls-verify", "maybe")
    assert status == 2
