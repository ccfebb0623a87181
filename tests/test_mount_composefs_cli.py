"""``mount.composefs`` against C 1.0.8: messages, exit status and real mounts.

Both tools run as processes. Our ``mount.composefs`` gets ``argv[0] =
"mount.composefs"``; C's runs through the reference folder's loader script, so the
``argv[0]`` glibc's getopt puts in front of its complaints is normalised.

* Bad command lines and failing mounts: exit status, stdout and stderr equal C's,
  byte for byte, and nothing stays mounted.
* Real mounts, as root: an image made by C ``mkcomposefs --digest-store`` mounted
  by both tools, and images made by our mkcomposefs and Repository mounted by C
  and by ours, compare identical (every xattr kept) and carry the source's file
  contents; ``ro``, ``rw`` with upperdir/workdir, several basedirs and
  ``idmap=`` (a user namespace by ``/proc/PID/ns/user`` and by ``/proc/self/fd/N``)
  behave alike in both.
* ``mount -t composefs``: in a private mount namespace our command sits in
  ``/usr/sbin`` (``/sbin`` is a link to it on Debian 12), and util-linux's
  ``mount`` and ``umount`` use it as the helper.

Every mount is made below the test's tmp_path and is taken down (lazily if need
be) when the test ends, whatever its outcome.
"""

from __future__ import annotations

import os
import pickle
import random
import re
import shutil
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

import gen_tree
from composefsd.cli import mkcomposefs as mkcomposefs_cli
from composefsd.kernel.syscalls import MNT_DETACH, KernelError, umount2
from composefsd.kernel.userns import IdMapping, create_userns
from composefsd.repository import Repository
from treecompare import Entry, diff, snapshot

OURS = [
    sys.executable,
    "-c",
    "import sys; from composefsd.cli.mountcomposefs import main; "
    "sys.argv[0] = 'mount.composefs'; sys.exit(main())",
]
_ARGV0 = re.compile(rb"^\S*/mount\.composefs: ", re.MULTILINE)
TESTS = Path(__file__).resolve().parent
STAMP = 1_700_000_000_123_456_789
USAGE = b"usage: mount.composefs [-t type] [-o opt[,opts..]] IMAGE MOUNTPOINT\n"


def _all_xattrs(name: bytes) -> bool:
    return True


def tree(root: Path) -> dict[bytes, Entry]:
    return snapshot(root, xattr_filter=_all_xattrs)


# -- processes and mounts ------------------------------------------------------------------


def run(
    cmd: Sequence[str],
    args: Sequence[str],
    cwd: Path,
    *,
    pass_fds: Sequence[int] = (),
    env: dict[str, str] | None = None,
) -> tuple[int, bytes, bytes]:
    res = subprocess.run(
        [*cmd, *args],
        capture_output=True,
        cwd=cwd,
        stdin=subprocess.DEVNULL,
        pass_fds=pass_fds,
        env=env,
        timeout=120,
    )
    return res.returncode, res.stdout, _ARGV0.sub(b"mount.composefs: ", res.stderr)


def _unescape_mountinfo(field: bytes) -> str:
    return os.fsdecode(re.sub(rb"\\([0-7]{3})", lambda m: bytes([int(m[1], 8)]), field))


def mountinfo() -> list[tuple[str, str, str, str, str]]:
    """(mountpoint, per-mount options, fstype, source, super options) of every mount."""
    out = []
    with open("/proc/self/mountinfo", "rb") as f:
        for line in f:
            fields = line.split()
            sep = fields.index(b"-")
            out.append(
                (
                    _unescape_mountinfo(fields[4]),
                    fields[5].decode(),
                    fields[sep + 1].decode(),
                    _unescape_mountinfo(fields[sep + 2]),
                    fields[sep + 3].decode(),
                )
            )
    return out


def mounts_below(root: Path) -> list[str]:
    prefix = str(root)
    return [m[0] for m in mountinfo() if m[0] == prefix or m[0].startswith(prefix + "/")]


def mount_at(where: Path) -> tuple[str, str, str, str, str]:
    found = [m for m in mountinfo() if m[0] == str(where)]
    assert len(found) == 1, f"{where}: {len(found)} mounts"
    return found[0]


def unmount_all_below(root: Path) -> None:
    for _ in range(20):
        points = mounts_below(root)
        if not points:
            return
        for point in reversed(points):
            try:
                umount2(point, MNT_DETACH)
            except KernelError:
                pass
    raise AssertionError(f"cannot unmount {mounts_below(root)}")


@pytest.fixture
def scratch(tmp_path: Path) -> Iterator[Path]:
    root = tmp_path.resolve()
    try:
        yield root
    finally:
        unmount_all_below(root)


# -- images --------------------------------------------------------------------------------


class Images:
    """One random source tree and its images: C's with a digest store, our
    mkcomposefs's with a digest store, and our Repository's."""

    def __init__(self, base: Path, c_mkcomposefs: Path) -> None:
        self.base = base
        self.src = base / "src"
        gen_tree.generate_tree(
            random.Random(4711), self.src, n_entries=180, big_files=False, wide_dir=False
        )
        self.c_image = base / "c.cfs"
        self.c_objs = base / "c-objs"
        subprocess.run(
            [str(c_mkcomposefs), f"--digest-store={self.c_objs}", str(self.src), str(self.c_image)],
            check=True,
        )
        self.our_image = base / "ours.cfs"
        self.our_objs = base / "our-objs"
        status = mkcomposefs_cli.main(
            [f"--digest-store={self.our_objs}", str(self.src), str(self.our_image)]
        )
        assert status == 0
        repo = Repository.init(base / "repo")
        digest = repo.create_image(self.src, ref="test").digest
        self.repo_image = repo.image_path(digest)
        self.repo_objs = repo.objects_dir
        self.src_tree = tree(self.src)


@pytest.fixture(scope="module")
def images(reference_bin: Path, tmp_path_factory: pytest.TempPathFactory) -> Images:
    return Images(tmp_path_factory.mktemp("images").resolve(), reference_bin / "mkcomposefs")


@pytest.fixture(scope="module")
def c_tool(reference_bin: Path) -> list[str]:
    path = reference_bin / "mount.composefs"
    assert path.exists(), f"no C mount.composefs in {reference_bin}"
    return [str(path)]


def do_mount(tool: Sequence[str], args: Sequence[str], cwd: Path, **kw: object) -> None:
    status, out, err = run(tool, args, cwd, **kw)  # type: ignore[arg-type]
    assert (status, out, err) == (0, b"", b""), f"{tool[-1][:40]} {args}: {err!r}"


def assert_same_tree(a: Path, b: Path) -> dict[bytes, Entry]:
    ta, tb = tree(a), tree(b)
    assert not diff(ta, tb), "\n".join(diff(ta, tb))
    return ta


def assert_source_content(mounted: dict[bytes, Entry], images: Images) -> None:
    """Every regular file of the source is in the mount with the same content."""
    files = [p for p, e in images.src_tree.items() if e.kind == "file"]
    assert len(files) > 30
    for path in files:
        assert mounted[path].kind == "file", path
        assert mounted[path].sha256 == images.src_tree[path].sha256, path


# -- command lines and failing mounts ------------------------------------------------------


@pytest.fixture(scope="module")
def errdir(reference_bin: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small image with its store, and things to point the options at."""
    d = tmp_path_factory.mktemp("errors").resolve()
    src = d / "src"
    (src / "sub").mkdir(parents=True)
    (src / "a").write_bytes(b"hello\n" * 100)
    (src / "sub" / "b").write_bytes(b"x" * 5000)
    subprocess.run(
        [str(reference_bin / "mkcomposefs"), "--digest-store=objs", "src", "img.cfs"],
        cwd=d,
        check=True,
    )
    (d / "file").write_bytes(b"not an image\n" * 1000)
    (d / "short.cfs").write_bytes((d / "img.cfs").read_bytes()[:20])
    for name in ("mnt", "upper", "work"):
        (d / name).mkdir()
    return d


REAL_DIGEST = "real-digest"  # replaced by the image's sha256 fs-verity digest
ZERO_DIGEST = "00" * 32

ERROR_CASES: list[tuple[str, list[str], bytes]] = [
    ("no-args", [], b"No source path specified\n" + USAGE),
    ("no-mountpoint", ["img.cfs"], b"No mount path specified\n" + USAGE),
    ("no-mountpoint-with-options", ["-o", "basedir=objs", "img.cfs"], b"No mount path specified\n"),
    ("type", ["-t", "foo", "img.cfs", "mnt"], b"mount.composefs: Unsupported fs type 'foo'\n\n"),
    ("type-attached", ["-text4", "img.cfs", "mnt"], b"Unsupported fs type 'ext4'\n\n"),
    (
        "type-after-operands",
        ["img.cfs", "mnt", "-o", "basedir=objs", "-t", "overlay"],
        b"'overlay'",
    ),
    ("type-before-bad-switch", ["-t", "x", "-q"], b"Unsupported fs type 'x'\n\n"),
    ("bad-switch", ["-x", "img.cfs", "mnt"], b"mount.composefs: invalid option -- 'x'\n" + USAGE),
    ("bad-switch-before-type", ["-q", "-t", "x"], b"invalid option -- 'q'\n"),
    ("bad-switch-clustered", ["-xh"], b"invalid option -- 'x'\n"),
    ("long-option", ["--help"], b"invalid option -- '-'\n"),
    ("o-without-value", ["img.cfs", "mnt", "-o"], b"option requires an argument -- 'o'\n" + USAGE),
    ("t-without-value", ["img.cfs", "mnt", "-t"], b"option requires an argument -- 't'\n"),
    (
        "unknown-option",
        ["-o", "basedir=objs,foo=bar", "img.cfs", "mnt"],
        b"mount.composefs: Unsupported option foo\n\n",
    ),
    (
        "unknown-option-first",
        ["-o", "noatime,basedir=objs", "img.cfs", "mnt"],
        b"Unsupported option noatime\n\n",
    ),
    ("empty-options", ["-o", "", "img.cfs", "mnt"], b"mount.composefs: Unsupported option \n\n"),
    ("trailing-comma", ["-o", "basedir=objs,", "img.cfs", "mnt"], b"Unsupported option \n\n"),
    (
        "escaped-key",
        ["-o", "basedi\\r=objs", "img.cfs", "mnt"],
        b"Unsupported option basedi\\r\n\n",
    ),
    (
        "escaped-comma",
        ["-o", "basedir=objs,ro\\,rw", "img.cfs", "mnt"],
        b"Unsupported option ro\\,rw\n\n",
    ),
    ("second-equals", ["-o", "basedir=objs,x=y=z", "img.cfs", "mnt"], b"Unsupported option x\n\n"),
    ("no-basedir", ["img.cfs", "mnt"], b"No object dirs specified\n" + USAGE),
    (
        "no-basedir-with-options",
        ["-o", "ro,verity,tryverity", "img.cfs", "mnt"],
        b"No object dirs specified\n",
    ),
    (
        "last-o-wins",
        ["-o", "basedir=objs", "-o", "ro", "img.cfs", "mnt"],
        b"No object dirs specified\n",
    ),
    ("double-dash", ["--", "-o", "basedir=objs", "img.cfs", "mnt"], b"No object dirs specified\n"),
    (
        "basedir-empty",
        ["-o", "basedir=", "img.cfs", "mnt"],
        b"mount.composefs: Value for basedir option has incorrect format\n\n",
    ),
    (
        "basedir-double-colon",
        ["-o", "basedir=objs::objs", "img.cfs", "mnt"],
        b"incorrect format\n\n",
    ),
    ("basedir-leading-colon", ["-o", "basedir=:objs", "img.cfs", "mnt"], b"incorrect format\n\n"),
    ("basedir-trailing-colon", ["-o", "basedir=objs:", "img.cfs", "mnt"], b"incorrect format\n\n"),
    (
        "upperdir-only",
        ["-o", "basedir=objs,upperdir=upper", "img.cfs", "mnt"],
        b"mount.composefs: Both workdir and upperdir must be specified if used\n\n",
    ),
    (
        "workdir-only",
        ["-o", "workdir=work,basedir=objs", "img.cfs", "mnt"],
        b"Both workdir and upperdir must be specified if used\n\n",
    ),
    *(
        (
            f"no-value-{key}",
            ["-o", f"basedir=objs,{key}", "img.cfs", "mnt"],
            f"mount.composefs: No value specified for {key} option\n\n".encode(),
        )
        for key in ("digest", "upperdir", "workdir", "idmap")
    ),
    (
        "no-value-basedir",
        ["-o", "basedir", "img.cfs", "mnt"],
        b"mount.composefs: No value specified for basedir option\n\n",
    ),
    (
        "idmap-missing",
        ["-o", "basedir=objs,idmap=nonexistent", "img.cfs", "mnt"],
        b"mount.composefs: Failed to open userns nonexistent: No such file or directory\n\n",
    ),
    (
        "idmap-before-image",
        ["-o", "basedir=objs,idmap=nonexistent", "missing.cfs", "mnt"],
        b"Failed to open userns nonexistent",
    ),
    (
        "idmap-not-a-userns",
        ["-o", "basedir=objs,idmap=file", "img.cfs", "mnt"],
        b"mount.composefs: Failed to mount composefs img.cfs: Invalid argument\n\n",
    ),
    (
        "image-missing",
        ["-o", "basedir=objs", "missing.cfs", "mnt"],
        b"mount.composefs: Failed to open missing.cfs: No such file or directory\n\n",
    ),
    (
        "image-is-a-directory",
        ["-o", "basedir=objs", "objs", "mnt"],
        b"Failed to mount composefs objs: Is a directory\n\n",
    ),
    (
        "image-bad-magic",
        ["-o", "basedir=objs", "file", "mnt"],
        b"Failed to mount composefs file: Invalid argument\n\n",
    ),
    (
        "image-short",
        ["-o", "basedir=objs", "short.cfs", "mnt"],
        b"Failed to mount composefs short.cfs: Invalid argument\n\n",
    ),
    (
        "digest-of-image",
        ["-o", f"basedir=objs,digest={REAL_DIGEST}", "img.cfs", "mnt"],
        b"mount.composefs: Failed to mount composefs img.cfs: Image has no fs-verity\n\n",
    ),
    (
        "digest-wrong",
        ["-o", f"digest={ZERO_DIGEST},basedir=objs", "img.cfs", "mnt"],
        b"Failed to mount composefs img.cfs: Image has no fs-verity\n\n",
    ),
    (
        "digest-short",
        ["-o", "basedir=objs,digest=ab", "img.cfs", "mnt"],
        b"Image has no fs-verity\n\n",
    ),
    (
        "digest-uppercase",
        ["-o", "basedir=objs,digest=ABCDEF", "img.cfs", "mnt"],
        b"Image has no fs-verity\n\n",
    ),
    (
        "digest-before-basedir-check",
        ["-o", f"basedir=missing,digest={ZERO_DIGEST}", "img.cfs", "mnt"],
        b"Image has no fs-verity\n\n",
    ),
    (
        "digest-not-hex",
        ["-o", "basedir=objs,digest=xyz0", "img.cfs", "mnt"],
        b"Failed to mount composefs img.cfs: Invalid argument\n\n",
    ),
    (
        "digest-odd-length",
        ["-o", "basedir=objs,digest=abc", "img.cfs", "mnt"],
        b"img.cfs: Invalid argument\n\n",
    ),
    (
        "digest-too-long",
        ["-o", "basedir=objs,digest=" + "ab" * 65, "img.cfs", "mnt"],
        b"img.cfs: Invalid argument\n\n",
    ),
    (
        "digest-on-bad-image",
        ["-o", f"basedir=objs,digest={ZERO_DIGEST}", "file", "mnt"],
        b"Failed to mount composefs file: Image has no fs-verity\n\n",
    ),
    (
        "verity-on-bad-image",
        ["-o", "basedir=objs,verity", "file", "mnt"],
        b"Failed to mount composefs file: Invalid argument\n\n",
    ),
    (
        "basedir-missing",
        ["-o", "basedir=objs:missing", "img.cfs", "mnt"],
        b"Failed to mount composefs img.cfs: No such file or directory\n\n",
    ),
    (
        "basedir-is-a-file",
        ["-o", "basedir=file", "img.cfs", "mnt"],
        b"Failed to mount composefs img.cfs: Invalid argument\n\n",
    ),
    (
        "upperdir-missing",
        ["-o", "basedir=objs,upperdir=missing,workdir=work", "img.cfs", "mnt"],
        b"No such file or directory\n\n",
    ),
    (
        "workdir-missing",
        ["-o", "basedir=objs,upperdir=upper,workdir=missing", "img.cfs", "mnt"],
        b"No such file or directory\n\n",
    ),
    (
        "upperdir-is-a-file",
        ["-o", "basedir=objs,upperdir=file,workdir=work", "img.cfs", "mnt"],
        b"img.cfs: Invalid argument\n\n",
    ),
    (
        "upperdir-is-workdir",
        ["-o", "basedir=objs,upperdir=upper,workdir=upper", "img.cfs", "mnt"],
        b"img.cfs: Invalid argument\n\n",
    ),
    (
        "mountpoint-missing",
        ["-o", "basedir=objs", "img.cfs", "missing"],
        b"Failed to mount composefs img.cfs: No such file or directory\n\n",
    ),
    (
        "mountpoint-is-a-file",
        ["-o", "basedir=objs", "img.cfs", "file"],
        b"Failed to mount composefs img.cfs: Invalid argument\n\n",
    ),
    (
        "options-after-operands",
        ["img.cfs", "missing", "-o", "rw,basedir=objs"],
        b"img.cfs: No such file or directory\n\n",
    ),
]


@pytest.fixture(scope="module")
def real_digest(errdir: Path) -> str:
    from composefsd.fsverity import digest_fd

    with open(errdir / "img.cfs", "rb") as f:
        return digest_fd(f.fileno(), "sha256").hex()


@pytest.mark.parametrize(
    ("args", "expect"), [c[1:] for c in ERROR_CASES], ids=[c[0] for c in ERROR_CASES]
)
def test_errors_like_c(
    args: list[str], expect: bytes, errdir: Path, c_tool: list[str], real_digest: str
) -> None:
    args = [a.replace(REAL_DIGEST, real_digest) for a in args]
    try:
        c = run(c_tool, args, errdir)
        ours = run(OURS, args, errdir)
    finally:
        leftover = mounts_below(errdir)
        unmount_all_below(errdir)
    assert not leftover
    assert ours == c
    status, out, err = ours
    assert status == 1
    assert out == b""
    assert expect in err


def test_help(errdir: Path, c_tool: list[str]) -> None:
    for args in (["-h"], ["img.cfs", "mnt", "-h"], ["-hx"], ["-o", "foo", "-h"]):
        ours = run(OURS, args, errdir)
        assert ours == run(c_tool, args, errdir)
        assert ours[0] == 0
        assert ours[1] == b""
        assert ours[2].startswith(USAGE)
        assert b"  basedir=PATH[:PATH]    Specify location of basedir(s)\n" in ours[2]
        assert ours[2].endswith(b"  workdir                Overlayfs workdir\n")


def test_usage_names_the_program(errdir: Path) -> None:
    """C's usage and errx name the program by the basename of argv[0]."""
    code = (
        "import sys; from composefsd.cli.mountcomposefs import main; "
        "sys.argv[0] = '/some/where/mount.cfs'; sys.exit(main(sys.argv[1:]))"
    )
    status, _, err = run([sys.executable, "-c", code], ["-t", "x"], errdir)
    assert (status, err) == (1, b"mount.cfs: Unsupported fs type 'x'\n\n")
    status, _, err = run([sys.executable, "-c", code], ["-y"], errdir)
    assert status == 1
    assert err.startswith(
        b"/some/where/mount.cfs: invalid option -- 'y'\nusage: mount.cfs [-t type]"
    )


def test_debug_line(errdir: Path) -> None:
    """With COMPOSEFSD_DEBUG, C's line comes first and our reason follows."""
    env = {**os.environ, "COMPOSEFSD_DEBUG": "1"}
    status, _, err = run(OURS, ["-o", "basedir=file", "img.cfs", "mnt"], errdir, env=env)
    lines = err.split(b"\n")
    assert status == 1
    assert lines[:2] == [
        b"mount.composefs: Failed to mount composefs img.cfs: Invalid argument",
        b"",
    ]
    assert b"basedir file is not a directory" in err
    env.pop("COMPOSEFSD_DEBUG")
    assert run(OURS, ["-o", "basedir=file", "img.cfs", "mnt"], errdir, env=env)[2] == (
        b"mount.composefs: Failed to mount composefs img.cfs: Invalid argument\n\n"
    )


def test_main_in_process(
    images: Images,
    scratch: Path,
    monkeypatch: pytest.MonkeyPatch,
    capfdbinary: pytest.CaptureFixture[bytes],
) -> None:
    """``main(argv)`` without the program name, as the other commands take it."""
    from composefsd.cli.mountcomposefs import main

    monkeypatch.setattr(sys, "argv", ["/usr/sbin/mount.composefs"])
    monkeypatch.chdir(scratch)
    (scratch / "mnt").mkdir()
    assert main(["-o", f"basedir={images.c_objs},ro", str(images.c_image), "mnt"]) == 0
    assert mount_at(scratch / "mnt")[1].split(",")[0] == "ro"
    assert_source_content(tree(scratch / "mnt"), images)
    assert main(["-o", f"basedir={images.c_objs}", str(images.c_image), "missing"]) == 1
    out, err = capfdbinary.readouterr()
    assert out == b""
    assert err == (
        f"mount.composefs: Failed to mount composefs {images.c_image}: "
        "No such file or directory\n\n".encode()
    )


# -- real mounts ---------------------------------------------------------------------------


def test_c_image_mounted_by_both(images: Images, scratch: Path, c_tool: list[str]) -> None:
    (scratch / "c").mkdir()
    (scratch / "ours").mkdir()
    opts = ["-o", f"basedir={images.c_objs}"]
    do_mount(c_tool, [*opts, str(images.c_image), "c"], scratch)
    do_mount(OURS, [str(images.c_image), "ours", *opts], scratch)
    mounted = assert_same_tree(scratch / "c", scratch / "ours")
    assert_source_content(mounted, images)
    for tool in ("c", "ours"):
        _, per_mount, fstype, source, options = mount_at(scratch / tool)
        assert (per_mount.split(",")[0], fstype, source) == ("rw", "overlay", "composefs")
        assert "metacopy=on" in options.split(",")
        assert "redirect_dir=on" in options.split(",")
        assert "verity=require" not in options.split(",")
    status, _, err = run(["umount"], ["ours"], scratch)
    assert (status, err) == (0, b"")
    assert mounts_below(scratch) == [str(scratch / "c")]


@pytest.mark.parametrize("which", ["mkcomposefs", "repository"])
def test_our_images_mounted_by_c(
    which: str, images: Images, scratch: Path, c_tool: list[str]
) -> None:
    if which == "mkcomposefs":
        image, objs = images.our_image, images.our_objs
    else:
        image, objs = images.repo_image, images.repo_objs
    for name in ("c", "ours", "reference"):
        (scratch / name).mkdir()
    do_mount(c_tool, ["-o", f"basedir={objs}", str(image), "c"], scratch)
    do_mount(OURS, ["-o", f"basedir={objs}", str(image), "ours"], scratch)
    mounted = assert_same_tree(scratch / "c", scratch / "ours")
    assert_source_content(mounted, images)
    # And the tree is the one C's own image of the same source gives.
    do_mount(c_tool, ["-o", f"basedir={images.c_objs}", str(images.c_image), "reference"], scratch)
    assert_same_tree(scratch / "c", scratch / "reference")


@pytest.mark.parametrize("read_only", [True, False])
def test_ro_and_default(read_only: bool, images: Images, scratch: Path, c_tool: list[str]) -> None:
    opts = f"basedir={images.c_objs}" + (",ro" if read_only else "")
    for tool, name in ((c_tool, "c"), (OURS, "ours")):
        (scratch / name).mkdir()
        do_mount(tool, ["-o", opts, str(images.c_image), name], scratch)
        per_mount = mount_at(scratch / name)[1].split(",")
        assert per_mount[0] == ("ro" if read_only else "rw")
        # Without an upperdir the overlay cannot be written either way.
        with pytest.raises(OSError) as exc:
            (scratch / name / "new").write_bytes(b"x")
        assert exc.value.errno == 30  # EROFS
    assert_same_tree(scratch / "c", scratch / "ours")


@pytest.mark.parametrize("extra", ["", ",rw", ",ro,rw"])
def test_upperdir_workdir(extra: str, images: Images, scratch: Path, c_tool: list[str]) -> None:
    for tool, name in ((c_tool, "c"), (OURS, "ours")):
        for sub in ("mnt", "upper", "work"):
            (scratch / name / sub).mkdir(parents=True)
        # The root of an overlay with an upper layer has the upperdir's times.
        os.utime(scratch / name / "upper", ns=(STAMP, STAMP))
        opts = f"basedir={images.c_objs},upperdir={name}/upper,workdir={name}/work{extra}"
        do_mount(tool, ["-o", opts, str(images.c_image), f"{name}/mnt"], scratch)
        _, per_mount, _, _, options = mount_at(scratch / name / "mnt")
        assert per_mount.split(",")[0] == "rw"
        assert "rw" in options.split(",")
    mounted = assert_same_tree(scratch / "c" / "mnt", scratch / "ours" / "mnt")
    assert_source_content(mounted, images)
    victim = next(p for p, e in sorted(images.src_tree.items()) if e.kind == "file")
    for name in ("c", "ours"):
        mnt = os.fsencode(scratch / name / "mnt")
        with open(mnt + b"/written-here", "wb") as f:
            f.write(b"new data")
        with open(mnt + victim, "ab") as f:
            f.write(b"appended")
        assert (scratch / name / "upper" / "written-here").read_bytes() == b"new data"
        upper_copy = os.fsencode(scratch / name / "upper") + victim
        assert open(upper_copy, "rb").read().endswith(b"appended")  # noqa: SIM115
        for changed in (b"", b"/written-here", victim):
            os.utime(mnt + changed, ns=(STAMP, STAMP), follow_symlinks=False)
    assert_same_tree(scratch / "c" / "mnt", scratch / "ours" / "mnt")


def test_several_basedirs(images: Images, scratch: Path, c_tool: list[str]) -> None:
    a, b = scratch / "objs-a", scratch / "objs-b"
    shutil.copytree(images.c_objs, a, symlinks=True)
    b.mkdir()
    moved = 0
    for i, sub in enumerate(sorted(a.iterdir())):
        if i % 2:
            sub.rename(b / sub.name)
            moved += 1
    assert moved > 5
    for tool, name in ((c_tool, "c"), (OURS, "ours")):
        (scratch / name).mkdir()
        do_mount(tool, ["-o", f"basedir={a}:{b}", str(images.c_image), name], scratch)
    mounted = assert_same_tree(scratch / "c", scratch / "ours")
    assert_source_content(mounted, images)
    # The second basedir is really used: without it, some contents cannot be read.
    (scratch / "only-a").mkdir()
    do_mount(OURS, ["-o", f"basedir={a}", str(images.c_image), "only-a"], scratch)
    with pytest.raises(OSError):
        tree(scratch / "only-a")


# (Nearly) every id is mapped: through an idmapped mount even root may only open
# files whose owner maps into its namespace when their mode does not let it in.
IDMAP = IdMapping(0, 1_000_000, 2**32 - 1 - 1_000_000)


@pytest.fixture
def userns_process() -> Iterator[int]:
    """A process in a new user namespace with the ids of :data:`IDMAP`."""
    proc = subprocess.Popen(["unshare", "--user", "sleep", "600"])
    try:
        for _ in range(1000):
            if os.readlink(f"/proc/{proc.pid}/ns/user") != os.readlink("/proc/self/ns/user"):
                break
            assert proc.poll() is None
            os.sched_yield()
        else:
            raise AssertionError("unshare --user did not make a user namespace")
        for name in ("uid_map", "gid_map"):
            with open(f"/proc/{proc.pid}/{name}", "w") as f:
                f.write(f"{IDMAP.inside} {IDMAP.outside} {IDMAP.count}\n")
        yield proc.pid
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()


def _check_idmapped(mounted: dict[bytes, Entry], images: Images) -> None:
    def shifted(i: int) -> int:
        # Unmapped ids show as the overflow id.
        return i + IDMAP.outside if i < IDMAP.count else 65534

    for path, entry in images.src_tree.items():
        if path in mounted:
            assert (mounted[path].uid, mounted[path].gid) == (
                shifted(entry.uid),
                shifted(entry.gid),
            ), path
    assert mounted[b"/"].uid >= IDMAP.outside


@pytest.mark.parametrize("how", ["proc-pid", "fd"])
def test_idmap(
    how: str,
    images: Images,
    scratch: Path,
    c_tool: list[str],
    request: pytest.FixtureRequest,
) -> None:
    fds: tuple[int, ...] = ()
    if how == "proc-pid":
        pid = request.getfixturevalue("userns_process")
        path = f"/proc/{pid}/ns/user"
    else:
        fd = create_userns([IDMAP])
        request.addfinalizer(lambda: os.close(fd))
        os.set_inheritable(fd, True)
        fds = (fd,)
        path = f"/proc/self/fd/{fd}"
    opts = f"basedir={images.c_objs},idmap={path}"
    for tool, name in ((c_tool, "c"), (OURS, "ours")):
        (scratch / name).mkdir()
        do_mount(tool, ["-o", opts, str(images.c_image), name], scratch, pass_fds=fds)
    mounted = assert_same_tree(scratch / "c", scratch / "ours")
    _check_idmapped(mounted, images)
    assert_source_content(mounted, images)


@pytest.mark.parametrize("option", ["verity", "digest="])
def test_verity_option(option: str, images: Images, scratch: Path, c_tool: list[str]) -> None:
    """``verity`` (and C's quirk: an empty ``digest=``, no image check) mount with
    overlayfs verity=require in both; the objects have no fs-verity on this kernel,
    so their contents cannot be read, and the metadata agrees."""
    for tool, name in ((c_tool, "c"), (OURS, "ours")):
        (scratch / name).mkdir()
        do_mount(
            tool, ["-o", f"basedir={images.c_objs},{option}", str(images.c_image), name], scratch
        )
        _, _, _, source, options = mount_at(scratch / name)
        assert source == "composefs"
        assert "verity=require" in options.split(",")
    names_c = sorted(os.listdir(scratch / "c"))
    assert names_c == sorted(os.listdir(scratch / "ours"))
    big = next(
        p for p, e in sorted(images.src_tree.items()) if e.kind == "file" and (e.size or 0) > 64
    )
    for name in ("c", "ours"):
        with pytest.raises(OSError) as exc:
            open(os.fsencode(scratch / name) + big, "rb").read()  # noqa: SIM115
        assert exc.value.errno == 5  # EIO: no fs-verity digest to check against


def test_tryverity(images: Images, scratch: Path) -> None:
    """``tryverity``: the objects have no fs-verity here, so ours leaves verity=require
    out and the files read (C sets it anyway, and its reads then fail with EIO)."""
    (scratch / "ours").mkdir()
    opts = f"basedir={images.c_objs},tryverity"
    do_mount(OURS, ["-o", opts, str(images.c_image), "ours"], scratch)
    assert "verity=require" not in mount_at(scratch / "ours")[4].split(",")
    assert_source_content(tree(scratch / "ours"), images)


# -- as mount(8)'s helper ------------------------------------------------------------------

HELPER_SCRIPT = textwrap.dedent(
    """\
    import os, pickle, subprocess, sys
    sys.path.insert(0, sys.argv[1])
    from treecompare import snapshot
    bindir, image, objs, mnt, out = sys.argv[2:]
    subprocess.run(["mount", "--bind", bindir, "/usr/sbin"], check=True)
    st = os.stat("/sbin/mount.composefs")
    result = {"helper": (st.st_dev, st.st_ino)}
    bad = subprocess.run(
        ["mount", "-t", "composefs", "-o", "basedir=" + objs + "-missing", image, mnt],
        capture_output=True,
    )
    result["bad"] = (bad.returncode, bad.stderr)
    ok = subprocess.run(
        ["mount", "-t", "composefs", "-o", "basedir=" + objs, image, mnt], capture_output=True
    )
    result["mount"] = (ok.returncode, ok.stdout, ok.stderr)
    with open("/proc/self/mountinfo") as f:
        result["mountinfo"] = [line.split() for line in f if line.split()[4] == mnt]
    if ok.returncode == 0:
        result["tree"] = snapshot(mnt, xattr_filter=lambda name: True)
        um = subprocess.run(["umount", mnt], capture_output=True)
        result["umount"] = (um.returncode, um.stderr)
        with open("/proc/self/mountinfo") as f:
            result["after"] = [line for line in f if line.split()[4] == mnt]
    with open(out, "wb") as f:
        pickle.dump(result, f)
    """
)


def test_mount_helper(images: Images, scratch: Path, c_tool: list[str]) -> None:
    bindir = scratch / "sbin"
    bindir.mkdir()
    helper = bindir / "mount.composefs"
    helper.write_text(
        f"#!{sys.executable}\n"
        "import sys\n"
        "from composefsd.cli.mountcomposefs import main\n"
        "sys.exit(main())\n"
    )
    helper.chmod(0o755)
    (scratch / "mnt").mkdir()
    (scratch / "c").mkdir()
    script = scratch / "inner.py"
    script.write_text(HELPER_SCRIPT)
    out = scratch / "result.pickle"
    subprocess.run(
        [
            "unshare",
            "-m",
            "--propagation",
            "private",
            sys.executable,
            str(script),
            str(TESTS),
            str(bindir),
            str(images.c_image),
            str(images.c_objs),
            str(scratch / "mnt"),
            str(out),
        ],
        check=True,
        timeout=120,
    )
    with open(out, "rb") as f:
        result = pickle.load(f)
    st = helper.stat()
    assert result["helper"] == (st.st_dev, st.st_ino)
    status, err = result["bad"]
    assert status != 0
    assert b"mount.composefs: Failed to mount composefs " in err
    assert b"No such file or directory" in err
    assert result["mount"] == (0, b"", b"")
    [info] = result["mountinfo"]
    sep = info.index("-")
    assert info[sep + 1 : sep + 3] == ["overlay", "composefs"]
    assert result["umount"] == (0, b"")
    assert result["after"] == []
    # Nothing leaked into this mount namespace, and the tree is the one C mounts.
    assert mounts_below(scratch) == []
    do_mount(c_tool, ["-o", f"basedir={images.c_objs}", str(images.c_image), "c"], scratch)
    reference = tree(scratch / "c")
    assert not diff(result["tree"], reference), "\n".join(diff(result["tree"], reference))
    assert_source_content(result["tree"], images)
