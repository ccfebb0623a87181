"""composefsctl's bash and zsh completions, exercised through the shells themselves:
bash by sourcing the script and calling its function with COMP_WORDS/COMP_CWORD set,
zsh by typing into an interactive zsh on a pseudo-terminal and pressing TAB
(tests/zshcomplete.zsh). Both are written by hand, so every subcommand, every option
and every choice the argparse parser has is checked against what they offer;
method, interface and image names come from a running daemon."""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from composefsd.cli.composefsctl.parser import _parser
from composefsd.service.client import connect
from servicehelpers import Daemon

ROOT = Path(__file__).resolve().parents[1]
BASH = ROOT / "completion" / "bash" / "composefsctl"
ZSH_DIR = ROOT / "completion" / "zsh"
ZSH_DRIVER = Path(__file__).with_name("zshcomplete.zsh")


def _subparsers(p: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in p._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _options(p: argparse.ArgumentParser) -> set[str]:
    return {o for a in p._actions for o in a.option_strings}


def _choices(p: argparse.ArgumentParser) -> dict[str, set[str]]:
    return {
        o: {str(c) for c in a.choices}
        for a in p._actions
        if a.choices is not None and not isinstance(a, argparse._SubParsersAction)
        for o in a.option_strings
    }


PARSER = _parser()
COMMANDS = _subparsers(PARSER)
OCI_COMMANDS = _subparsers(COMMANDS["oci"])
#: (the words before the one completed, that command's parser), every (sub)command.
ALL: list[tuple[list[str], argparse.ArgumentParser]] = [([], PARSER)]
ALL += [([name], p) for name, p in COMMANDS.items() if name != "oci"]
ALL += [(["oci", name], p) for name, p in OCI_COMMANDS.items()]
# "oci" itself, before its subcommand: the common options.
ALL += [(["oci"], COMMANDS["oci"])]


def _bash(words: list[str], env: dict[str, str] | None = None) -> list[str]:
    """COMPREPLY for completing the last of ``words`` (after ``composefsctl``)."""
    line = ["composefsctl", *words]
    script = (
        f"source {shlex.quote(str(BASH))}\n"
        f"COMP_WORDS=({' '.join(shlex.quote(w) for w in line)})\n"
        f"COMP_CWORD={len(line) - 1}\n"
        "_composefsctl\n"
        'printf "%s\\n" "${COMPREPLY[@]}"\n'
    )
    proc = subprocess.run(
        ["bash", "--norc", "--noprofile", "-c", script],
        capture_output=True,
        text=True,
        check=True,
        env=env,
        timeout=60,
    )
    assert proc.stderr == ""
    return [w for w in proc.stdout.splitlines() if w]


def _zsh(words: list[str], env: dict[str, str] | None = None) -> list[str]:
    line = " ".join(["composefsctl", *words])
    proc = subprocess.run(
        ["zsh", "-f", str(ZSH_DRIVER), str(ZSH_DIR), line],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    return [w for w in proc.stdout.splitlines() if w]


def _daemon_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '/usr/bin:/bin')}"
    return env


# -- bash -------------------------------------------------------------------------------------


def test_bash_syntax() -> None:
    subprocess.run(["bash", "-n", str(BASH)], check=True)


def test_bash_subcommands() -> None:
    assert set(_bash([""])) == set(COMMANDS)
    assert set(_bash(["cre"])) == {"create-image"}
    assert set(_bash(["oci", ""])) == set(OCI_COMMANDS)
    # Options before the subcommand, with their values, are skipped over.
    assert set(_bash(["--connect", "/x", "--timeout", "5", "-v", "in"])) == {
        "init",
        "introspect",
        "info",
    }


@pytest.mark.parametrize(
    ("words", "parser"), ALL, ids=lambda v: " ".join(v) if isinstance(v, list) else ""
)
def test_bash_options(words: list[str], parser: argparse.ArgumentParser) -> None:
    assert set(_bash([*words, "-"])) == _options(parser)


@pytest.mark.parametrize(
    ("words", "parser"), ALL, ids=lambda v: " ".join(v) if isinstance(v, list) else ""
)
def test_bash_choices(words: list[str], parser: argparse.ArgumentParser) -> None:
    for option, choices in _choices(parser).items():
        assert set(_bash([*words, option, ""])) == choices, option


def test_bash_values() -> None:
    # An option's value is not taken for a subcommand, a file where one is wanted.
    assert _bash(["--timeout", ""]) == []
    assert set(_bash(["init", "--algorithm", "sha"])) == {
        "sha256",
        "sha512",
    }
    assert set(_bash(["call", "--json", ""])) == {"short", "pretty"}
    # --opt=value, as bash splits it (COMP_WORDBREAKS has "="): --opt, =, value.
    assert set(_bash(["init", "--verity", "=", ""])) == {"required", "try", "disabled"}
    assert set(_bash(["init", "--verity", "=", "t"])) == {"try"}
    assert set(_bash(["init", "--verity", "="])) == {"required", "try", "disabled"}
    assert set(_bash(["--timeout", "=", "5", "in"])) == {"init", "introspect", "info"}
    assert _bash([f"{ROOT}/compl"]) == []  # not a subcommand
    assert _bash(["create-image", f"{ROOT}/complet"]) == [f"{ROOT}/completion"]


def test_bash_from_the_daemon(daemon: Daemon, tree: Path) -> None:
    with connect(daemon.address) as conn:
        conn.call(
            "io.composefs.Repository.CreateImage", {"sourcePath": str(tree), "ref": "compl/v1"}
        )
    env = _daemon_env()
    at = ["--connect", daemon.address]
    methods = _bash([*at, "call", "io.composefs.Repository.D"], env)
    assert methods == ["io.composefs.Repository.Describe"]
    assert "io.composefs.Repository" in _bash([*at, "introspect", "io.c"], env)
    assert "io.composefs.Repository" in _bash([*at, "list-methods", ""], env)
    for command in ("describe", "mount", "verify", "remove-image"):
        assert "compl/v1" in _bash([*at, command, "comp"], env), command
    assert "compl/v1" in _bash(["--connect", "=", daemon.address, "describe", ""], env)
    assert "compl/v1" in _bash([*at, "gc", "--pin", ""], env)
    # No daemon there: nothing, and no error on the terminal.
    assert _bash(["--connect", "/nonexistent/socket", "call", ""], env) == []


# -- zsh --------------------------------------------------------------------------------------


def test_zsh_syntax() -> None:
    assert shutil.which("zsh"), "zsh is missing (run-tests installs it)"
    subprocess.run(["zsh", "-n", str(ZSH_DIR / "_composefsctl")], check=True)


def test_zsh_subcommands() -> None:
    assert set(_zsh([""])) == set(COMMANDS)
    assert set(_zsh(["oci", ""])) == set(OCI_COMMANDS)


@pytest.mark.parametrize(
    ("words", "parser"), ALL, ids=lambda v: " ".join(v) if isinstance(v, list) else ""
)
def test_zsh_options(words: list[str], parser: argparse.ArgumentParser) -> None:
    assert set(_zsh([*words, "-"])) == _options(parser)


TRANSPORTS = {"docker://", "oci:", "oci-archive:", "docker-archive:", "containers-storage:"}


def test_oci_pull_transports() -> None:
    assert set(_bash(["oci", "pull", ""])) == TRANSPORTS
    assert set(_zsh(["oci", "pull", ""])) == TRANSPORTS


def test_zsh_files() -> None:
    assert set(_zsh(["create-image", f"{ROOT}/complet"])) == {"completion"}
    assert set(_zsh(["init", "--verity=t"])) == {"try"}


def test_zsh_choices() -> None:
    for words, parser in ALL:
        for option, choices in _choices(parser).items():
            assert set(_zsh([*words, option, ""])) == choices, (words, option)


def test_zsh_from_the_daemon(daemon: Daemon, tree: Path) -> None:
    with connect(daemon.address) as conn:
        conn.call(
            "io.composefs.Repository.CreateImage", {"sourcePath": str(tree), "ref": "zcompl/v1"}
        )
    env = _daemon_env()
    at = ["--connect", daemon.address]
    assert _zsh([*at, "call", "io.composefs.Repository.D"], env) == [
        "io.composefs.Repository.Describe"
    ]
    assert "zcompl/v1" in _zsh([*at, "describe", "zc"], env)
