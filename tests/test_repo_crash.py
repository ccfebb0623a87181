"""kill -9 of CreateImage at random moments leaves a repository fsck calls clean, with
no half-visible image.

Each trial runs ``composefsctl create-image --progress`` in a subprocess on a tree
of which a part was rewritten (so that there are new objects to write), picks a
phase of the run (interpreter start, scan, import, image, sync, publish), waits
until the progress output shows that phase has begun, waits a random part of how
long that phase took in an uninterrupted run, and kills the process with SIGKILL.
After every trial fsck must be clean and every image link must verify
completely. The choices are seeded, so a failure can be replayed.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from composefsd.objectlayout import is_hex_digest
from composefsd.repository import Repository
from composefsd.repository import images as images_mod
from composefsd.repository.images import SYMLINK_TMP_PREFIX
from composefsd.repository.verify import verify_image
from trees import random_files

SEED = 0xC0FFEE
TRIALS = 30
MIN_KILLED = 20
#: CreateImage's progress phases in order; None: from the start (interpreter,
#: imports, opening the repository) until the first progress line.
PHASES: list[str | None] = [None, "scan", "import", "image", "sync", "publish"]
SIZES = [0, 10, 64, 65, 100, 3000, 4096, 20000, 100_000, 400_000]


def _make_tree(root: Path, rng: random.Random) -> list[Path]:
    files = random_files(root, seed=rng, files=240, dirs=12, sizes=SIZES, link=None)
    for i in range(2):
        path = root / f"big{i}"
        path.write_bytes(rng.randbytes(3 << 20))
        files.append(path)
    (root / "d0" / "link").symlink_to("../big0")
    return files


def _rewrite_some(files: list[Path], rng: random.Random) -> None:
    for path in rng.sample(files, len(files) // 4):
        path.write_bytes(rng.randbytes(rng.choice(SIZES[4:])))


def _check(repo_path: Path) -> int:
    """fsck clean and every image link verifies; returns the number of images.

    A writer killed between making a temporary link in ``images/`` and renaming it
    to ``images/<hex>`` or to a ref leaves that temporary (``.symlink-*``, its
    target relative to where it was going): not an image, so it is not verified;
    fsck reports it as a non-fatal leftover and GC removes it. Anything else that
    is not an image must not be there."""
    repo = Repository.open(repo_path)
    report = repo.fsck()
    assert report.ok, [str(p) for p in report.problems]
    images: list[str] = []
    for entry in os.scandir(repo_path / "images"):
        if entry.name == "refs":
            continue
        if is_hex_digest(entry.name, repo.hash_algorithm):
            assert entry.is_symlink(), entry.name
            images.append(entry.name)
        else:
            assert entry.name.startswith(SYMLINK_TMP_PREFIX) and entry.is_symlink(), entry.name
    for digest in images:
        vr = verify_image(repo, digest)
        assert vr.ok, vr
    return len(images)


def test_check_passes_over_a_killed_writers_temporary_link(tmp_path: Path) -> None:
    """A kill between the temporary link and its rename (a ref's temporary in
    ``images/`` points to ``../../<hex>``) leaves a repository that checks out; a
    stray non-image entry does not."""
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "file").write_bytes(b"x" * 5000)
    repo = Repository.init(tmp_path / "repo")
    digest = repo.create_image(tree, ref="a/b").digest
    (repo.images_dir / f"{SYMLINK_TMP_PREFIX}killed000000").symlink_to(f"../../{digest}")
    assert _check(repo.path) == 1
    (repo.images_dir / "stray").symlink_to(f"../../{digest}")
    with pytest.raises(AssertionError, match="stray"):
        _check(repo.path)


def test_only_a_moved_ref_goes_through_a_temporary_link(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A new ref is made in place (as composefs-rs makes one), so that a killed
    CreateImage with a new ref can leave no temporary behind; moving a ref to
    another image replaces it atomically through one."""
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "file").write_bytes(b"x" * 5000)
    repo = Repository.init(tmp_path / "repo")
    temporaries: list[str] = []
    real = images_mod.replace_symlink

    def recording(target: str, link: Path, tmp_dir: Path) -> None:
        temporaries.append(link.name)
        real(target, link, tmp_dir)

    monkeypatch.setattr(images_mod, "replace_symlink", recording)
    first = repo.create_image(tree, ref="a/b").digest
    repo.create_image(tree, ref="a/b")  # the same image: nothing to replace
    assert temporaries == []
    (tree / "file").write_bytes(b"y" * 5000)
    second = repo.create_image(tree, ref="a/b").digest
    assert second != first and temporaries == ["b"]
    assert repo.resolve_image("a/b") == second


def _timed_run(cmd: list[str]) -> tuple[str, dict[str | None, float]]:
    """Run ``cmd`` to the end; (stdout, how long each phase lasted in seconds)."""
    start = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stderr is not None and proc.stdout is not None
    seen: dict[str | None, float] = {None: start}
    for line in proc.stderr:
        phase = line.split(b":", 1)[0].decode()
        seen.setdefault(phase, time.monotonic())
    out = proc.stdout.read().decode()
    assert proc.wait() == 0
    end = time.monotonic()
    assert list(seen) == PHASES, seen
    times = [seen[p] for p in PHASES] + [end]
    return out.strip(), {p: times[i + 1] - times[i] for i, p in enumerate(PHASES)}


def _run_and_kill(cmd: list[str], phase: str | None, delay: float) -> bool:
    """Run ``cmd``, kill it ``delay`` s after ``phase`` shows; True if it was killed."""
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    try:
        assert proc.stderr is not None
        if phase is not None:
            prefix = (phase + ":").encode()
            while True:
                line = proc.stderr.readline()
                if not line or line.startswith(prefix):
                    break
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finally:
        # Anything it started (hash workers) goes too.
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()
        _out, err = proc.communicate()
    if proc.returncode == -signal.SIGKILL:
        return True
    assert proc.returncode == 0, err.decode()
    return False


def test_kill_create_image_at_random_moments(tmp_path: Path) -> None:
    rng = random.Random(SEED)
    tree = tmp_path / "tree"
    files = _make_tree(tree, rng)
    repo_path = tmp_path / "repo"
    Repository.init(repo_path)
    base = [sys.executable, "-m", "composefsd.cli.composefsctl", "--repo", str(repo_path)]

    # One image stored before the crashes, which must survive all of them; its run
    # also tells how long each phase lasts here.
    first, lasted = _timed_run([*base, "create-image", "--progress", str(tree), "--ref", "before"])

    killed = 0
    landed: dict[str | None, int] = {}
    for trial in range(TRIALS):
        _rewrite_some(files, rng)
        phase = PHASES[trial % len(PHASES)]
        delay = rng.uniform(0, lasted[phase])
        cmd = [*base, "create-image", "--progress", str(tree), "--ref", f"trial/{trial}"]
        if _run_and_kill(cmd, phase, delay):
            killed += 1
            landed[phase] = landed.get(phase, 0) + 1
        _check(repo_path)
        repo = Repository.open(repo_path)
        assert repo.resolve_image("before") == first
    assert killed >= MIN_KILLED, (killed, landed)
    # Kills landed in every phase, not just the long ones.
    assert set(landed) == set(PHASES), landed

    # The repository still works: a full run, then GC, then everything checks out.
    final = subprocess.run(
        [*base, "create-image", str(tree), "--ref", "after"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    subprocess.run([*base, "gc"], check=True, capture_output=True)
    assert _check(repo_path) >= 2
    # GC took the killed writers' temporaries with it.
    assert not [e for e in os.listdir(repo_path / "images") if e.startswith(SYMLINK_TMP_PREFIX)]
    repo = Repository.open(repo_path)
    assert repo.resolve_image("after") == final
    assert verify_image(repo, first).ok
