"""composefsctl's generic Varlink commands (call, introspect, list-methods, info),
compared with what varlinkctl 257 prints for the same calls on the same daemon:
replies, --more streams, error replies (parameters on stdout, exit status 1),
--oneway, --collect, --graceful, parameters from stdin, and the usage errors of
bad method names and parameters."""

from __future__ import annotations

import io
import json
import subprocess
from pathlib import Path

import pytest

from composefsd.cli import composefsctl
from composefsd.cli.composefsctl import EXIT_UNREACHABLE, generic
from composefsd.cli.composefsctl.generic import method_names
from ctlrun import run_ctl
from servicehelpers import Daemon

IFACE = "io.composefs.Repository"


@pytest.fixture(autouse=True)
def _no_ambient_daemon(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("COMPOSEFSD_SOCKET", raising=False)
    monkeypatch.delenv("COMPOSEFSD_REPOSITORY", raising=False)
    monkeypatch.setattr(composefsctl, "default_address", lambda: str(tmp_path / "no-daemon"))


def _vctl(varlinkctl: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([varlinkctl, *args], capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def imaged(daemon: Daemon, tree: Path) -> Daemon:
    """The module's daemon with one image, ref call/v1."""
    from composefsd.service.client import connect

    with connect(daemon.address) as conn:
        conn.call(f"{IFACE}.CreateImage", {"sourcePath": str(tree), "ref": "call/v1"})
    return daemon


def test_info_as_varlinkctl(
    capsys: pytest.CaptureFixture[str], daemon: Daemon, varlinkctl: str
) -> None:
    status, out, err = run_ctl(capsys, "--connect", daemon.address, "info")
    assert (status, err) == (0, "")
    assert out == _vctl(varlinkctl, "info", daemon.address).stdout
    status, out, _ = run_ctl(capsys, "info", "--json", "--connect", daemon.address)
    doc = json.loads(out)
    assert doc["product"] == "composefsd" and IFACE in doc["interfaces"]


def test_introspect_lists_interfaces_as_varlinkctl(
    capsys: pytest.CaptureFixture[str], daemon: Daemon, varlinkctl: str
) -> None:
    status, out, err = run_ctl(capsys, "--connect", daemon.address, "introspect")
    assert (status, err) == (0, "")
    assert out == _vctl(varlinkctl, "list-interfaces", daemon.address).stdout
    assert f"{IFACE}\n" in out and "org.varlink.service\n" in out


def test_introspect_interfaces(capsys: pytest.CaptureFixture[str], daemon: Daemon) -> None:
    from composefsd.service.client import connect

    with connect(daemon.address) as conn:
        repo_idl = conn.get_interface_description(IFACE)
        service_idl = conn.get_interface_description("org.varlink.service")
    status, out, err = run_ctl(
        capsys, "--connect", daemon.address, "introspect", IFACE, "org.varlink.service"
    )
    assert (status, err) == (0, "")
    assert out == repo_idl.rstrip("\n") + "\n\n" + service_idl.rstrip("\n") + "\n"
    assert "method Describe(" in out

    status, out, err = run_ctl(capsys, "--connect", daemon.address, "introspect", "no.such.Iface")
    assert status == 1 and out == ""
    assert "org.varlink.service.InterfaceNotFound" in err
    status, _, err = run_ctl(capsys, "--connect", daemon.address, "introspect", "bad name")
    assert status == 2 and "not an interface name: 'bad name'" in err


def test_list_methods_as_varlinkctl(
    capsys: pytest.CaptureFixture[str], daemon: Daemon, varlinkctl: str
) -> None:
    for extra in ([], [IFACE]):
        status, out, err = run_ctl(capsys, "--connect", daemon.address, "list-methods", *extra)
        assert (status, err) == (0, "")
        assert out == _vctl(varlinkctl, "list-methods", daemon.address, *extra).stdout
    assert f"{IFACE}.Describe\n" in out


def test_output_is_ascii() -> None:
    out = io.StringIO()
    generic._print({"ref": "rtl\u202etxt", "n": 1}, out, pretty=False)
    assert out.getvalue() == '{"ref":"rtl\\u202etxt","n":1}\n'


def test_method_names() -> None:
    idl = "interface a.b\n# method Not(x: int) -> ()\nmethod One() -> ()\n  method Two(\n) -> ()\n"
    assert method_names(idl) == ["One", "Two"]


def test_call_as_varlinkctl(
    capsys: pytest.CaptureFixture[str], imaged: Daemon, varlinkctl: str
) -> None:
    for method, params in (("Describe", "{}"), ("ListImages", "{}"), ("ListMounts", "{}")):
        status, out, err = run_ctl(
            capsys, "--connect", imaged.address, "call", f"{IFACE}.{method}", params
        )
        assert (status, err) == (0, "")
        vout = _vctl(varlinkctl, "call", imaged.address, f"{IFACE}.{method}", params).stdout
        assert json.loads(out) == json.loads(vout)
        # Not a terminal: one line, as varlinkctl's.
        assert out.count("\n") == 1
    # No parameters: {}.
    status, out, _ = run_ctl(capsys, "--connect", imaged.address, "call", f"{IFACE}.Describe")
    assert status == 0 and json.loads(out)["images"] >= 1
    status, out, _ = run_ctl(
        capsys, "--connect", imaged.address, "call", "--json=pretty", f"{IFACE}.Describe"
    )
    assert status == 0 and out.startswith("{\n    ") and json.loads(out)["images"] >= 1
    status, out, _ = run_ctl(capsys, "--connect", imaged.address, "call", "-q", f"{IFACE}.Describe")
    assert (status, out) == (0, "")


def test_call_more_as_varlinkctl(
    capsys: pytest.CaptureFixture[str], imaged: Daemon, varlinkctl: str
) -> None:
    params = json.dumps({"image": "call/v1"})
    v = _vctl(varlinkctl, "call", "-E", imaged.address, f"{IFACE}.Verify", params)
    assert v.returncode == 0, v.stderr
    # varlinkctl writes a JSON text sequence (RFC 7464: each reply after an RS);
    # composefsctl writes JSON lines.
    vout = v.stdout.replace("\x1e", "")
    for flag in ("--more", "-E"):
        status, out, err = run_ctl(
            capsys, "--connect", imaged.address, "call", flag, f"{IFACE}.Verify", params
        )
        assert (status, err) == (0, "")
        assert [json.loads(line) for line in out.splitlines()] == [
            json.loads(line) for line in vout.splitlines()
        ]
    last = json.loads(out.splitlines()[-1])
    assert last["ok"] is True
    status, out, _ = run_ctl(
        capsys,
        "--connect",
        imaged.address,
        "call",
        "--more",
        "--collect",
        f"{IFACE}.Verify",
        params,
    )
    assert status == 0 and json.loads(out) == [json.loads(line) for line in vout.splitlines()]


def test_call_error_as_varlinkctl(
    capsys: pytest.CaptureFixture[str], daemon: Daemon, varlinkctl: str
) -> None:
    cases = [
        (f"{IFACE}.Mount", {"image": "nope", "where": "/nonexistent"}, f"{IFACE}.NoSuchImage"),
        (f"{IFACE}.Describe", {"bogus": 1}, "org.varlink.service.InvalidParameter"),
        (f"{IFACE}.Nope", {}, "org.varlink.service.MethodNotFound"),
        ("no.such.Iface.Call", {}, "org.varlink.service.InterfaceNotFound"),
    ]
    for method, params, error in cases:
        text = json.dumps(params)
        status, out, err = run_ctl(capsys, "--connect", daemon.address, "call", method, text)
        v = _vctl(varlinkctl, "call", daemon.address, method, text)
        assert (status, v.returncode) == (1, 1)
        assert json.loads(out) == json.loads(v.stdout)
        assert err == f"composefsctl: error: method call {method}() failed: {error}\n"
        assert error in v.stderr
        # --graceful makes that error a success.
        status, out, err = run_ctl(
            capsys, "--connect", daemon.address, "call", "--graceful", error, method, text
        )
        assert (status, err) == (0, "") and json.loads(out) == json.loads(v.stdout)


def test_call_parameters_from_stdin(
    capsys: pytest.CaptureFixture[str], daemon: Daemon, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("sys.stdin", io.StringIO('{"image": "nope",\n "where": "/x"}\n'))
    status, out, err = run_ctl(capsys, "--connect", daemon.address, "call", f"{IFACE}.Mount", "-")
    assert status == 1 and json.loads(out) == {"image": "nope"}
    assert "NoSuchImage" in err


def test_call_oneway(capsys: pytest.CaptureFixture[str], daemon: Daemon) -> None:
    status, out, err = run_ctl(
        capsys, "--connect", daemon.address, "call", "--oneway", f"{IFACE}.Describe"
    )
    assert (status, out, err) == (0, "", "")
    # The daemon took the call without replying and goes on serving.
    status, out, _ = run_ctl(capsys, "--connect", daemon.address, "call", f"{IFACE}.Describe")
    assert status == 0 and "path" in json.loads(out)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["x"], "not a qualified method name: 'x'"),
        (["a.B"], "not a qualified method name: 'a.B'"),
        (["io.composefs.Repository.describe"], "not a qualified method name"),
        (["io..x.Y"], "not a qualified method name"),
        ([f"{IFACE}.Describe", "{"], "the parameters (the command line) are not JSON"),
        ([f"{IFACE}.Describe", "[]"], "must be a JSON object, not list"),
        ([f"{IFACE}.Describe", "1"], "must be a JSON object, not int"),
        ([f"{IFACE}.Describe", "[" * 100000], "are nested too deeply"),
        ([f"{IFACE}.Describe", '{"a": NaN}'], "not JSON: NaN is not a JSON value"),
        ([f"{IFACE}.Describe", '{"a": -Infinity}'], "not JSON: -Infinity is not a JSON value"),
        (["--oneway", "--more", f"{IFACE}.Describe"], "--oneway excludes"),
        (["--collect", f"{IFACE}.Describe"], "--collect goes with --more"),
    ],
)
def test_call_usage_errors(
    capsys: pytest.CaptureFixture[str], daemon: Daemon, argv: list[str], message: str
) -> None:
    status, out, err = run_ctl(capsys, "--connect", daemon.address, "call", *argv)
    assert status == 2 and out == ""
    assert message in err


def test_generic_commands_need_the_daemon(capsys: pytest.CaptureFixture[str]) -> None:
    for argv in (["call", f"{IFACE}.Describe"], ["introspect"], ["info"], ["list-methods"]):
        status, out, err = run_ctl(capsys, *argv)
        assert status == EXIT_UNREACHABLE and out == ""
        assert "works through composefsd only" in err
        status, _, err = run_ctl(capsys, "--direct", *argv)
        assert status == 2
