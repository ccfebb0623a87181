"""cfsctl's recorded Varlink transcript replayed against composefsd (tests/rsreplay.py):
every entry answered as cfsctl answered it, the malformed ones as the Varlink
specification wants; and composefsd's org.composefs IDL is cfsctl's, type for type."""

from __future__ import annotations

import importlib.util
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import rsreplay
from rsreplay import Outcome, Replay
from servicehelpers import running_daemon

SERVICE_DIR = Path(__file__).resolve().parent.parent / "src" / "composefsd" / "service"


@pytest.fixture(scope="module")
def replayed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Replay]:
    root = tmp_path_factory.mktemp("rs-replay")
    places = rsreplay.make_places(root)
    with running_daemon(root / "own-repo") as daemon:
        replay = Replay(daemon.address, places)
        try:
            replay.run()
            yield replay
        finally:
            replay.close()


def _outcome(replay: Replay, seq: int) -> Outcome:
    return rsreplay.by_seq(replay.outcomes)[seq]


@pytest.mark.parametrize("seq", list(rsreplay.seqs()))
def test_transcript_entry(replayed: Replay, seq: int) -> None:
    outcome = _outcome(replayed, seq)
    if outcome.skipped is not None:
        pytest.skip(f"seq {seq} ({outcome.entry.method}): {outcome.skipped}")
    assert outcome.problem is None, (
        f"seq {seq} {outcome.entry.method} ({outcome.entry.note}): {outcome.problem}"
    )


#: The handler module of each composefs-rs interface: once it is on the branch,
#: the interface must be served and every entry compared.
HANDLERS = {
    "org.composefs.Repository": "composefsd.service.rsrepository",
    "org.composefs.Oci": "composefsd.service.rsoci",
}


def test_every_entry_compared_once_all_interfaces_served(replayed: Replay) -> None:
    present = {i for i, module in HANDLERS.items() if importlib.util.find_spec(module)}
    assert present <= replayed.served, f"handlers of {present - replayed.served} not registered"
    if replayed.partial:
        missing = sorted(rsreplay.recorded_interfaces() - replayed.served)
        assert not set(missing) & present
        pytest.skip(f"this branch does not have the handlers of {missing} yet")
    left = [f"{o.entry.seq} {o.entry.method}: {o.skipped}" for o in replayed.uncompared()]
    assert left == []
    assert len(replayed.outcomes) == len(rsreplay.entries()) == 82


def test_malformed_entries_are_the_recorded_ones() -> None:
    """EXPECTED covers exactly the calls cfsctl answered by closing the connection."""
    closed = {e.seq for e in rsreplay.entries() if e.connection and "closed" in e.connection}
    assert closed == set(rsreplay.EXPECTED)


# -- the IDL -------------------------------------------------------------------------------

_TYPE_TOKEN = re.compile(r"\s+")


def _strip_comments(text: str) -> str:
    return "\n".join(line.split("#", 1)[0] for line in text.splitlines())


def _enum_commas(text: str) -> str:
    """zlink writes enums without commas, ``(Opened Created Upgraded)``; the grammar
    (and our IDL) has them."""

    def fix(m: re.Match[str]) -> str:
        names = m.group(1).split()
        return "(" + ", ".join(names) + ")"

    return re.sub(r"\(\s*((?:[A-Za-z_][A-Za-z0-9_]*\s+)+[A-Za-z_][A-Za-z0-9_]*)\s*\)", fix, text)


def _split_top(text: str) -> list[str]:
    """``text`` split at commas outside parentheses."""
    out, depth, cur = [], 0, ""
    for ch in text:
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
        if ch == "," and depth == 0:
            out.append(cur)
            cur = ""
        else:
            cur += ch
    if cur.strip():
        out.append(cur)
    return out


def _type(text: str) -> Any:
    """A type as a comparable value: structs as dicts, enums as tuples of names."""
    text = text.strip()
    if text.startswith("?"):
        return ("?", _type(text[1:]))
    if text.startswith("[]"):
        return ("[]", _type(text[2:]))
    if text.startswith("[string]"):
        return ("[string]", _type(text[8:]))
    if text.startswith("("):
        assert text.endswith(")"), text
        return _fields(text[1:-1])
    return text


def _fields(text: str) -> Any:
    parts = [p.strip() for p in _split_top(text) if p.strip()]
    if parts and all(":" not in p for p in parts):
        return ("enum", tuple(parts))
    out = {}
    for part in parts:
        name, _, typ = part.partition(":")
        out[name.strip()] = _type(typ)
    return out


def _declarations(text: str) -> dict[str, Any]:
    """method/error/type name -> its signature, of an interface description."""
    body = _enum_commas(_strip_comments(text))
    body = _TYPE_TOKEN.sub(" ", body)
    out: dict[str, Any] = {}
    pattern = re.compile(r"\b(method|error|type)\s+([A-Za-z0-9_]+)\s*")
    positions = [(m.start(), m) for m in pattern.finditer(body)]
    for i, (_start, m) in enumerate(positions):
        end = positions[i + 1][0] if i + 1 < len(positions) else len(body)
        sig = body[m.end() : end].strip()
        kind, name = m.group(1), m.group(2)
        if kind == "method":
            inp, _, outp = sig.partition("->")
            out[f"method {name}"] = (_type(inp), _type(outp))
        else:
            out[f"{kind} {name}"] = _type(sig)
    return out


@pytest.mark.parametrize("interface", ["org.composefs.Repository", "org.composefs.Oci"])
def test_idl_types_are_cfsctls(interface: str) -> None:
    recorded = (rsreplay.VARLINK / f"{interface}.varlink").read_text()
    ours = (SERVICE_DIR / f"{interface}.varlink").read_text()
    assert _declarations(ours) == _declarations(recorded)


def test_idl_parser_sees_every_declaration() -> None:
    """The comparison above compares something: every method and error of
    methods.txt is among the parsed declarations."""
    text = (rsreplay.VARLINK / "methods.txt").read_text()
    for interface in ("org.composefs.Repository", "org.composefs.Oci"):
        parsed = _declarations((rsreplay.VARLINK / f"{interface}.varlink").read_text())
        section = text.split(f"## {interface}\n", 1)[1].split("\n## ", 1)[0]
        names = {" ".join(line.split("(")[0].split()[:2]) for line in section.splitlines() if line}
        assert names and names <= set(parsed)
        assert _declarations("method A(x: (one, two)) -> (y: ?[]string)") == {
            "method A": ({"x": ("enum", ("one", "two"))}, {"y": ("?", ("[]", "string"))})
        }


# -- the harness's own pieces ------------------------------------------------------------------


def test_layer_fd_helpers_agree_with_the_recording(tmp_path: Path) -> None:
    """PutLayer's fds as the harness makes them are the layout GetLayer's check
    wants (so the two cannot drift apart before the Oci helpers use them)."""
    places = rsreplay.make_places(tmp_path)
    replay = Replay.__new__(Replay)
    replay.places = places
    by = {e.seq: e for e in rsreplay.entries()}
    put, get = by[55], by[51]
    fds = rsreplay.put_layer_fds(replay, put)
    lifetime = [os.open("/dev/null", os.O_RDONLY) for _ in range(2)]
    try:
        result = rsreplay.Result(replies=[], fds=fds + lifetime)
        assert rsreplay.check_get_layer_fds(replay, get, result) is None
    finally:
        for fd in fds + lifetime:
            os.close(fd)
    # And a wrong stream is noticed.
    fds = rsreplay.put_layer_fds(replay, put)
    os.close(fds[0])
    fds[0] = rsreplay.pipe_with(b"other")
    lifetime = [os.open("/dev/null", os.O_RDONLY) for _ in range(2)]
    try:
        result = rsreplay.Result(replies=[], fds=fds + lifetime)
        assert "5 bytes" in (rsreplay.check_get_layer_fds(replay, get, result) or "")
    finally:
        for fd in fds + lifetime:
            os.close(fd)
