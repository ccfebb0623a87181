"""The wheel carries what a pip-installed composefsd needs beside its modules: the
systemd units, the boot-mount generator and install-units (under
share/composefsd/systemd), the man pages and composefsctl's completions; and
``composefsd-install-units`` from an installed wheel writes units whose
``ExecStart=`` is the composefsd that installation holds: a venv's bin/, and the
/usr/local/bin that root's ``pip install --break-system-packages`` uses.

The wheel is built as the README says, ``pip wheel . --no-deps`` (with build
isolation: the build's setuptools comes from the package index), from a copy of
the checkout."""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
import sys
import sysconfig
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DATA = "composefsd-0.1.0.data/data/"
SYSTEMD_FILES = sorted(p.name for p in (ROOT / "systemd").iterdir() if p.is_file())
MAN_PAGES = sorted(p.name for p in (ROOT / "man").iterdir() if p.suffix in (".1", ".5", ".8"))


def _copy_checkout(dest: Path) -> Path:
    ignore = shutil.ignore_patterns(
        ".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", ".*_cache"
    )
    shutil.copytree(ROOT, dest, ignore=ignore, symlinks=True)
    return dest


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("wheel")
    source = _copy_checkout(base / "src")
    out = base / "dist"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", ".", "--no-deps", "-q", "-w", str(out)],
        cwd=source,
        check=True,
        capture_output=True,
        timeout=300,
    )
    (found,) = out.glob("composefsd-*.whl")
    return found


def test_wheel_contents(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as z:
        infos = {i.filename: i for i in z.infolist()}
        entry_points = z.read("composefsd-0.1.0.dist-info/entry_points.txt").decode()
    data = {name[len(DATA) :]: info for name, info in infos.items() if name.startswith(DATA)}
    expected = {f"share/composefsd/systemd/{n}" for n in SYSTEMD_FILES}
    expected.add("share/composefsd/polkit/io.composefs.composefsd.policy")
    expected |= {f"share/man/man{p[-1]}/{p}" for p in MAN_PAGES}
    expected |= {
        "share/bash-completion/completions/composefsctl",
        "share/zsh/site-functions/_composefsctl",
    }
    assert set(data) == expected
    for name in ("install-units", "composefs-mount-generator"):
        mode = data[f"share/composefsd/systemd/{name}"].external_attr >> 16
        assert mode & stat.S_IXUSR, name
    # The files are the checkout's, unchanged.
    sources = {f"share/composefsd/systemd/{n}": ROOT / "systemd" / n for n in SYSTEMD_FILES}
    sources |= {f"share/man/man{p[-1]}/{p}": ROOT / "man" / p for p in MAN_PAGES}
    sources["share/bash-completion/completions/composefsctl"] = (
        ROOT / "completion/bash/composefsctl"
    )
    sources["share/zsh/site-functions/_composefsctl"] = ROOT / "completion/zsh/_composefsctl"
    with zipfile.ZipFile(wheel) as z:
        for name, source in sources.items():
            assert z.read(DATA + name) == source.read_bytes(), name
    assert "composefsd-install-units = composefsd.cli.install_units:main" in entry_points


@pytest.fixture(scope="module")
def venv(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A fresh venv with the wheel installed (without its dependencies: what is
    tested here needs none)."""
    path = tmp_path_factory.mktemp("venv") / "v"
    base_python = Path(sysconfig.get_config_var("BINDIR") or "/usr/bin") / "python3"
    python = str(base_python) if base_python.exists() else sys.executable
    subprocess.run([python, "-m", "venv", str(path)], check=True, timeout=300)
    subprocess.run(
        [str(path / "bin" / "pip"), "install", "-q", "--no-deps", "--no-index", str(wheel)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    yield path


def _units_env() -> dict[str, str]:
    # PATH without any composefsd: the path written must come from the installation.
    return {**os.environ, "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}


def test_venv_has_the_data_files(venv: Path) -> None:
    share = venv / "share"
    for page in MAN_PAGES:
        assert (share / "man" / f"man{page[-1]}" / page).is_file(), page
    assert (share / "bash-completion" / "completions" / "composefsctl").is_file()
    assert (share / "zsh" / "site-functions" / "_composefsctl").is_file()
    for name in SYSTEMD_FILES:
        assert (share / "composefsd" / "systemd" / name).is_file(), name


def test_install_units_from_the_venv(venv: Path, tmp_path: Path) -> None:
    root = tmp_path / "root"
    proc = subprocess.run(
        [str(venv / "bin" / "composefsd-install-units"), "--root", str(root)],
        capture_output=True,
        text=True,
        env=_units_env(),
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    composefsd = venv.resolve() / "bin" / "composefsd"
    assert f"(composefsd: {composefsd})" in proc.stdout
    service = (root / "etc/systemd/system/composefsd.service").read_text()
    assert f"\nExecStart={composefsd} $COMPOSEFSD_OPTIONS\n" in service
    # Everything else as in the checkout.
    original = (ROOT / "systemd" / "composefsd.service").read_text()
    assert service == re.sub(
        r"(?m)^(Exec[A-Za-z]*)=/usr/local/bin/composefsd ", rf"\1={composefsd} ", original
    )
    assert "/usr/local/bin/composefsd" not in service
    assert (root / "etc/systemd/system/composefsd.socket").read_bytes() == (
        ROOT / "systemd" / "composefsd.socket"
    ).read_bytes()
    generator = root / "etc/systemd/system-generators/composefs-mount-generator"
    assert generator.stat().st_mode & 0o777 == 0o755
    # Boot mounts run the composefsctl of the same venv (no varlinkctl).
    assert f"\nCOMPOSEFSCTL={composefsd.parent}/composefsctl\n" in generator.read_text()
    assert (root / "etc/composefs/mounts.conf.example").is_file()

    # A --composefsd of one's own wins.
    proc = subprocess.run(
        [
            str(venv / "bin" / "composefsd-install-units"),
            "--root",
            str(tmp_path / "root2"),
            "--composefsd",
            "/opt/cfs/bin/composefsd",
        ],
        capture_output=True,
        text=True,
        env=_units_env(),
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    service = (tmp_path / "root2/etc/systemd/system/composefsd.service").read_text()
    assert "\nExecStart=/opt/cfs/bin/composefsd $COMPOSEFSD_OPTIONS\n" in service

    # The script's own usage errors come through with its exit status.
    proc = subprocess.run(
        [str(venv / "bin" / "composefsd-install-units"), "--bogus"],
        capture_output=True,
        text=True,
        env=_units_env(),
        timeout=60,
    )
    assert proc.returncode == 2
    assert proc.stderr == "install-units: unknown argument --bogus (see --help)\n"


def test_install_units_for_root_pip(wheel: Path, tmp_path: Path) -> None:
    """``pip install`` as root outside a venv (Debian: --break-system-packages)
    puts the scripts in /usr/local/bin and the data in /usr/local/share: the same
    layout under a --root, with the package found on PYTHONPATH."""
    stage = tmp_path / "stage"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "-q",
            "--no-deps",
            "--no-index",
            # Without it pip would first uninstall the composefsd the test runs
            # from (this environment's), since the names match.
            "--ignore-installed",
            "--prefix",
            "/usr/local",
            "--root",
            str(stage),
            str(wheel),
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    # The environment the tests run from still has its own composefsd.
    subprocess.run(
        [sys.executable, "-c", "import importlib.metadata as m; m.distribution('composefsd')"],
        check=True,
    )
    local = stage / "usr" / "local"
    (site,) = {p.parent for p in local.glob("lib/python3*/*-packages/composefsd")}
    env = {**_units_env(), "PYTHONPATH": str(site)}
    root = tmp_path / "root"
    proc = subprocess.run(
        [sys.executable, str(local / "bin" / "composefsd-install-units"), "--root", str(root)],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    service = (root / "etc/systemd/system/composefsd.service").read_text()
    # Staged below --root, so the path is the staged /usr/local/bin/composefsd.
    assert f"\nExecStart={local}/bin/composefsd $COMPOSEFSD_OPTIONS\n" in service
    generator = root / "etc/systemd/system-generators/composefs-mount-generator"
    assert f"\nCOMPOSEFSCTL={local}/bin/composefsctl\n" in generator.read_text()
