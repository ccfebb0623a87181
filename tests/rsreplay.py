"""Replay of cfsctl's recorded Varlink transcript (``varlink/transcript.jsonl`` of the
composefs-rs golden data) against composefsd: the one home of that replay.

:class:`Replay` sends every recorded request verbatim (raw ones byte for byte) on
the connection its ``conn`` names, in order, to a composefsd serving its own
temporary repository, with the recording's placeholders made real: ``$REPO`` (a
copy of ``repos/repo-sha256``), ``$VL`` (an empty scratch directory), ``$LAYOUT``
(a copy of ``inputs/oci/layout``). Each entry's :class:`Outcome` says whether
its replies matched the recorded ones after normalisation (:func:`normalise`:
placeholders back, ``objects_device_id`` and the order of the lists cfsctl
returns in directory order), or why it was not compared.

What the entries need beyond "same replies" is declared per method or per
``seq`` in the tables below, which the helpers of each interface extend:

* :data:`EXPECTED`: entries where composefsd deliberately answers otherwise than
  cfsctl (the malformed calls, answered per the Varlink specification instead
  of closing the connection): the replies composefsd must send.
* :data:`MESSAGES_DIFFER`: entries whose error ``message`` text is not cfsctl's
  (name and parameter names are still compared); every other message is.
* :data:`SHAPE_ONLY`: entries whose values vary between runs of cfsctl itself
  (NOTES.md, "Varying"): only the reply's field names and value types compare.
* :data:`FDS_TO_SEND`: method -> the fds a call sends (PutLayer's pipe and
  directories), :data:`CHECK_FDS`: method -> a check of the fds received.
* :data:`COMPARE`: method -> a comparison of its own, replacing the default.

An entry whose interface the daemon does not serve (by its GetInfo) is not
sent: its outcome is "not served" (and :meth:`Replay.uncompared` lists it), so
that on a branch with some interfaces missing the rest still replays, and once
all are served nothing may be left uncompared.
"""

from __future__ import annotations

import array
import hashlib
import json
import os
import select
import shutil
import socket
import stat
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from rsgolden import RS, unpack_repo

VARLINK = RS / "varlink"
TRANSCRIPT = VARLINK / "transcript.jsonl"
LAYOUT = RS / "inputs" / "oci" / "layout"
#: Seconds a reply may take before the replay gives up on the connection (not a
#: timing assertion: only a hung daemon reaches it).
REPLY_TIMEOUT = 120.0
_MAX_FDS = 253

JSON = Any


@dataclass(frozen=True)
class Entry:
    """One recorded call."""

    seq: int
    conn: int
    #: The request as recorded (None for a raw one).
    request: dict[str, Any] | None
    #: The bytes a raw entry sent (None for a JSON one).
    raw: str | None
    replies: list[dict[str, Any]]
    fds_sent: int
    fds_received: int
    note: str | None
    #: How cfsctl's connection ended when it sent no reply.
    connection: str | None
    doc: dict[str, Any]

    @property
    def method(self) -> str | None:
        """The method called (of a raw entry too, when its bytes are JSON)."""
        req = self.request
        if req is None:
            try:
                req = json.loads(self.raw or "")
            except ValueError:
                return None
        method = req.get("method") if isinstance(req, dict) else None
        return method if isinstance(method, str) else None

    @property
    def interface(self) -> str | None:
        method = self.method
        return method.rsplit(".", 1)[0] if method and "." in method else None

    @property
    def oneway(self) -> bool:
        text = self.raw if self.raw is not None else json.dumps(self.request)
        try:
            doc = json.loads(text)
        except ValueError:
            return False
        return isinstance(doc, dict) and doc.get("oneway") is True


@cache
def entries() -> tuple[Entry, ...]:
    """Every entry of the transcript, in order."""
    out = []
    for line in TRANSCRIPT.read_text().splitlines():
        doc = json.loads(line)
        req = doc["request"]
        raw = req.get("raw") if set(req) == {"raw"} else None
        out.append(
            Entry(
                seq=doc["seq"],
                conn=doc["conn"],
                request=None if raw is not None else req,
                raw=raw,
                replies=doc["replies"],
                fds_sent=doc.get("fds_sent", 0),
                fds_received=doc.get("fds_received", 0),
                note=doc.get("note"),
                connection=doc.get("connection"),
                doc=doc,
            )
        )
    return tuple(out)


def recorded_interfaces() -> set[str]:
    """The interfaces cfsctl's GetInfo named."""
    (info,) = [e for e in entries() if e.method == "org.varlink.service.GetInfo" and e.replies]
    return set(info.replies[0]["parameters"]["interfaces"])


# -- what composefsd answers where it deliberately differs --------------------------------

_IP = "org.varlink.service.InvalidParameter"


def _error(name: str, **parameters: Any) -> list[dict[str, Any]]:
    return [{"error": name, "parameters": parameters}]


#: seq -> the replies composefsd sends where cfsctl closed the connection on a
#: malformed call (README: composefsd follows the Varlink specification and
#: systemd). None: composefsd closes the connection too, without a reply.
EXPECTED: dict[int, list[dict[str, Any]] | None] = {
    # wrong parameter type
    70: _error(_IP, parameter="handle"),
    # missing parameter
    71: _error(_IP, parameter="handle"),
    # unknown enum value
    75: _error(_IP, parameter="xattrs"),
    76: _error(
        "org.varlink.service.MethodNotFound", method="org.composefs.Repository.NoSuchMethod"
    ),
    77: _error("org.varlink.service.InterfaceNotFound", interface="org.example.Nope"),
    # "parameters":{} for a parameterless method (what varlinkctl sends): answered
    # like the call without it; compared as GetInfo (seq 1) is.
    81: [],
    # not JSON: there is nothing to reply to; the connection is closed.
    82: None,
}

#: seq -> why the error message differs from cfsctl's (names still compare).
MESSAGES_DIFFER: dict[int, str] = {}

#: seq -> why only the shape of the replies compares.
SHAPE_ONLY: dict[int, str] = {
    47: "cfsctl's own runs differ: the objects the repeated pulls left (NOTES.md, Varying)",
}


@dataclass
class Result:
    """What composefsd answered to one entry."""

    replies: list[dict[str, Any]]
    fds: list[int]
    #: "EOF" when the daemon closed the connection without (more) replies.
    closed: str | None = None


@dataclass
class Outcome:
    entry: Entry
    #: None: compared and equal; else what differs.
    problem: str | None = None
    #: Set when the entry was not sent, with why.
    skipped: str | None = None


class Client:
    """One raw Varlink connection: NUL-terminated JSON, fds as SCM_RIGHTS."""

    def __init__(self, address: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(address)
        self.sock.settimeout(REPLY_TIMEOUT)
        self.buf = b""
        self.eof = False

    def send(self, payload: bytes, fds: list[int] | tuple[int, ...] = ()) -> None:
        if fds:
            self.sock.sendmsg(
                [payload], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))]
            )
        else:
            self.sock.sendall(payload)

    def receive(self) -> tuple[dict[str, Any] | None, list[int]]:
        """One message (None at EOF) and the fds that came meanwhile."""
        fds: list[int] = []
        while b"\0" not in self.buf:
            if self.eof:
                return None, fds
            try:
                data, anc, _flags, _addr = self.sock.recvmsg(
                    1 << 20, socket.CMSG_SPACE(_MAX_FDS * 4)
                )
            except ConnectionResetError:
                data, anc = b"", []
            for level, kind, cdata in anc:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    got = array.array("i")
                    got.frombytes(cdata[: len(cdata) - len(cdata) % got.itemsize])
                    fds.extend(got)
            if not data:
                self.eof = True
                continue
            self.buf += data
        msg, self.buf = self.buf.split(b"\0", 1)
        return json.loads(msg), fds

    def call(
        self, payload: bytes, fds: list[int] | tuple[int, ...] = (), *, oneway: bool = False
    ) -> Result:
        """Send one message and read its replies up to the last (``continues`` false)."""
        self.send(payload + b"\0", fds)
        result = Result([], [])
        if oneway:
            return result
        while True:
            msg, got = self.receive()
            result.fds.extend(got)
            if msg is None:
                result.closed = "EOF"
                return result
            result.replies.append(msg)
            if not msg.get("continues"):
                return result

    def close(self) -> None:
        self.sock.close()


# -- normalisation --------------------------------------------------------------------------


def _sorted_images(params: dict[str, Any]) -> None:
    images = params.get("images")
    if isinstance(images, list):
        images.sort(key=lambda i: json.dumps(i, sort_keys=True))


#: method -> what to make order-independent in each reply's parameters (cfsctl lists
#: in directory order).
UNORDERED: dict[str, Callable[[dict[str, Any]], None]] = {
    "org.composefs.Repository.ListImageRefs": _sorted_images,
    "org.composefs.Oci.ListImages": _sorted_images,
}


def _frames_by_layer(replies: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Pull's progress frames grouped by layer, each layer's in their order: layers
    are fetched several at once, so their frames interleave differently from run to
    run (NOTES.md, Varying); what stays is each layer's sequence (started, progress,
    done, or skipped) and the messages before and after."""

    def layer(reply: dict[str, Any]) -> str:
        params = reply.get("parameters")
        if isinstance(params, dict) and len(params) == 1:
            (value,) = params.values()
            if isinstance(value, dict) and isinstance(value.get("id"), str):
                return str(value["id"])
        return ""

    out: list[dict[str, Any]] = []
    i = 0
    while i < len(replies):
        if not layer(replies[i]):
            out.append(replies[i])
            i += 1
            continue
        j = i
        while j < len(replies) and layer(replies[j]):
            j += 1
        run = replies[i:j]
        out += sorted(run, key=layer)  # stable: each layer's own order kept
        i = j
    return out


#: method -> what to make order-independent in the list of its replies.
UNORDERED_REPLIES: dict[str, Callable[[list[dict[str, Any]]], list[dict[str, Any]]]] = {
    "org.composefs.Oci.Pull": _frames_by_layer,
}


def _device_id(params: dict[str, Any]) -> None:
    if isinstance(params.get("objects_device_id"), int):
        params["objects_device_id"] = "<st_dev>"


def _final(replies: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``replies`` without ``"continues": false``, which cfsctl always sends and
    composefsd leaves out (the specification's default), and without empty
    ``parameters``, which composefsd sends and cfsctl leaves out."""
    return [
        {
            k: v
            for k, v in r.items()
            if not (k == "continues" and v is False) and not (k == "parameters" and v == {})
        }
        for r in replies
    ]


def normalise(entry: Entry, replies: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``replies`` with what varies between machines and runs made equal."""
    out = _final(json.loads(json.dumps(replies)))
    for reply in out:
        params = reply.get("parameters")
        if not isinstance(params, dict):
            continue
        _device_id(params)
        fix = UNORDERED.get(entry.method or "")
        if fix is not None:
            fix(params)
    reorder = UNORDERED_REPLIES.get(entry.method or "")
    return reorder(out) if reorder is not None else out


def shape(value: Any) -> Any:
    """The field names and value types of ``value`` (for :data:`SHAPE_ONLY`)."""
    if isinstance(value, dict):
        return {k: shape(v) for k, v in value.items()}
    if isinstance(value, list):
        return [shape(v) for v in value[:1]]
    return type(value).__name__


def _messages_only_named(replies: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = json.loads(json.dumps(replies))
    for reply in out:
        params = reply.get("parameters")
        if "error" in reply and isinstance(params, dict) and "message" in params:
            params["message"] = "<message>"
    return out


# -- the replay -------------------------------------------------------------------------------


@dataclass
class Places:
    """The real paths behind the transcript's placeholders."""

    repo: Path
    vl: Path
    layout: Path

    def pairs(self) -> list[tuple[str, str]]:
        return [("$REPO", str(self.repo)), ("$LAYOUT", str(self.layout)), ("$VL", str(self.vl))]

    def real(self, text: str) -> str:
        for name, path in self.pairs():
            text = text.replace(name, path)
        return text

    def shown(self, text: str) -> str:
        # Longest first: $REPO lives under $VL in the recording, not here, but
        # a test may put them so.
        for name, path in sorted(self.pairs(), key=lambda p: -len(p[1])):
            text = text.replace(path, name)
        return text


def make_places(root: Path) -> Places:
    """Fresh ``$REPO``, ``$VL`` and ``$LAYOUT`` under ``root``."""
    vl = root / "vl"
    vl.mkdir()
    repo = unpack_repo("sha256", root / "repo-unpacked")
    layout = root / "layout"
    shutil.copytree(LAYOUT, layout, symlinks=True)
    return Places(repo=repo, vl=vl, layout=layout)


def received_fd_inspection(fd: int) -> dict[str, Any]:
    """What the recording notes of a received mount fd: where it leads and its
    top-level entries."""
    return {
        "readlink": os.readlink(f"/proc/self/fd/{fd}"),
        "top_level_entries": sorted(os.listdir(f"/proc/self/fd/{fd}")),
    }


def check_mount_fds(replay: Replay, entry: Entry, result: Result) -> str | None:
    """Mount and OciMount: the fd is a detached mount showing the recorded tree."""
    if len(result.fds) != entry.fds_received:
        return f"{len(result.fds)} fds received, cfsctl sent {entry.fds_received}"
    got = [received_fd_inspection(fd) for fd in result.fds]
    want = entry.doc.get("received_fd_inspection")
    if want is not None and got != want:
        return f"mount fds show {got}, cfsctl's showed {want}"
    for fd in result.fds:
        if not stat.S_ISDIR(os.fstat(fd).st_mode):
            return f"fd {fd} is not a directory"
    return None


def read_pipe(fd: int) -> bytes | None:
    """Everything the pipe ``fd`` yields up to EOF; None if its writer hangs for
    :data:`REPLY_TIMEOUT` (a hung daemon, not a timing assertion)."""
    out = bytearray()
    while True:
        ready, _, _ = select.select([fd], [], [], REPLY_TIMEOUT)
        if not ready:
            return None
        chunk = os.read(fd, 1 << 16)
        if not chunk:
            return bytes(out)
        out += chunk


def check_get_layer_fds(replay: Replay, entry: Entry, result: Result) -> str | None:
    """GetLayer: the recorded fd layout (the splitdirfdstream pipe, its directory
    fds leading where cfsctl's led, the lifetime fds), and the stream's bytes
    cfsctl's."""
    layout = entry.doc.get("fd_layout")
    if len(result.fds) != entry.fds_received:
        return f"{len(result.fds)} fds received, cfsctl sent {entry.fds_received}"
    if layout is None:
        # An error reply: no fds, as cfsctl's.
        return None
    pipe, dirs = result.fds[0], result.fds[1 : 1 + layout["dir_fds"]]
    if not stat.S_ISFIFO(os.fstat(pipe).st_mode):
        return "fds[0] is not a pipe"
    targets = [replay.places.shown(os.readlink(f"/proc/self/fd/{fd}")) for fd in dirs]
    if targets != layout["dir_fd_targets"]:
        return f"directory fds lead to {targets}, cfsctl's to {layout['dir_fd_targets']}"
    data = read_pipe(pipe)
    if data is None:
        return "the splitdirfdstream pipe was never closed"
    want = entry.doc["pipe_bytes"]
    if len(data) != want["size"] or hashlib.sha256(data).hexdigest() != want["sha256"]:
        return f"the splitdirfdstream has {len(data)} bytes, not cfsctl's {want['size']}"
    return None


#: method -> the check of the fds its reply brought (default: only their count).
CHECK_FDS: dict[str, Callable[[Replay, Entry, Result], str | None]] = {
    "org.composefs.Repository.Mount": check_mount_fds,
    "org.composefs.Oci.OciMount": check_mount_fds,
    "org.composefs.Oci.GetLayer": check_get_layer_fds,
}


def put_layer_fds(replay: Replay, entry: Entry) -> list[int]:
    """PutLayer's fds as the recording sent them: a pipe with the splitdirfdstream
    cfsctl's GetLayer gave (``getlayer-single-l1.splitdirfdstream``), then the
    directory fds it refers to (GetLayer's recorded ``dir_fd_targets``)."""
    (get_layer,) = [e for e in entries() if e.doc.get("fd_layout")]
    layout = get_layer.doc["fd_layout"]
    stream = (VARLINK / get_layer.doc["pipe_bytes"]["file"]).read_bytes()
    fds = [pipe_with(stream)]
    for target in layout["dir_fd_targets"]:
        fds.append(os.open(replay.places.real(target), os.O_RDONLY | os.O_CLOEXEC))
    assert len(fds) == entry.fds_sent
    return fds


#: method -> the fds to send with the call (the caller closes them after sending).
FDS_TO_SEND: dict[str, Callable[[Replay, Entry], list[int]]] = {
    "org.composefs.Oci.PutLayer": put_layer_fds,
}

#: method -> a comparison replacing the default one (None: equal; else the difference).
COMPARE: dict[str, Callable[[Replay, Entry, Result], str | None]] = {}


def compare_get_info(replay: Replay, entry: Entry, result: Result) -> str | None:
    """GetInfo: the same fields and types; vendor, product and version are
    composefsd's own; the interfaces include every one cfsctl serves."""
    if result.closed is not None or len(result.replies) != 1:
        return f"expected one reply, got {result.replies} ({result.closed})"
    (reply,) = _final(result.replies)
    (want,) = _final(next(e for e in entries() if e.seq == 1).replies)
    if shape(reply) != shape(want):
        return f"GetInfo reply {reply} has not the shape of cfsctl's {want}"
    params = reply["parameters"]
    if params["product"] != "composefsd":
        return f"product {params['product']!r}"
    missing = recorded_interfaces() - set(params["interfaces"])
    if missing and not replay.partial:
        return f"interfaces {sorted(missing)} missing from {params['interfaces']}"
    return None


COMPARE["org.varlink.service.GetInfo"] = compare_get_info


class Replay:
    """Replays the transcript against the composefsd at ``address`` (module notes)."""

    def __init__(self, address: str, places: Places) -> None:
        self.address = address
        self.places = places
        self.conns: dict[int, Client] = {}
        self.outcomes: list[Outcome] = []
        self.served = self._served()
        #: Whether some interface cfsctl serves is not served here (yet).
        self.partial = bool(recorded_interfaces() - self.served)

    def _served(self) -> set[str]:
        client = Client(self.address)
        try:
            result = client.call(b'{"method":"org.varlink.service.GetInfo"}')
        finally:
            client.close()
        return set(result.replies[0]["parameters"]["interfaces"])

    def conn(self, number: int) -> Client:
        if number not in self.conns:
            self.conns[number] = Client(self.address)
        return self.conns[number]

    def close(self) -> None:
        for client in self.conns.values():
            client.close()

    def payload(self, entry: Entry) -> bytes:
        """The bytes to send: the recorded ones with the placeholders made real."""
        if entry.raw is not None:
            return self.places.real(entry.raw).encode()
        # Replace inside the JSON text, where the paths are JSON-escaped.
        text = json.dumps(entry.request, separators=(",", ":"))
        for name, path in self.places.pairs():
            text = text.replace(name, json.dumps(path)[1:-1])
        return text.encode()

    def run(self) -> list[Outcome]:
        for entry in entries():
            self.outcomes.append(self.replay(entry))
        return self.outcomes

    def replay(self, entry: Entry) -> Outcome:
        iface = entry.interface
        if iface is not None and iface in recorded_interfaces() and iface not in self.served:
            return Outcome(entry, skipped=f"{iface} is not served by this composefsd (yet)")
        sender = FDS_TO_SEND.get(entry.method or "")
        fds = sender(self, entry) if sender is not None else []
        if entry.fds_sent and sender is None:
            return Outcome(entry, skipped=f"no FDS_TO_SEND for {entry.method}")
        client = self.conn(entry.conn)
        try:
            result = client.call(self.payload(entry), fds, oneway=entry.oneway)
        finally:
            for fd in fds:
                os.close(fd)
        try:
            return Outcome(entry, problem=self.compare(entry, client, result))
        finally:
            for fd in result.fds:
                os.close(fd)

    def compare(self, entry: Entry, client: Client, result: Result) -> str | None:
        if entry.oneway:
            return self._oneway(client)
        if entry.seq in EXPECTED:
            return self._expected(entry, result, EXPECTED[entry.seq])
        custom = COMPARE.get(entry.method or "")
        if custom is not None:
            return custom(self, entry, result)
        return self.default(entry, result)

    @staticmethod
    def _oneway(client: Client) -> str | None:
        """No reply to a oneway call: the next reply on its connection is the next
        call's (deterministic, unlike waiting for silence)."""
        probe = client.call(b'{"method":"org.varlink.service.GetInfo"}')
        if probe.closed is not None or len(probe.replies) != 1:
            return f"after the oneway call: {probe.replies} ({probe.closed})"
        if "interfaces" not in probe.replies[0].get("parameters", {}):
            return f"the oneway call was answered: {probe.replies[0]}"
        return None

    def _expected(
        self, entry: Entry, result: Result, want: list[dict[str, Any]] | None
    ) -> str | None:
        if want is None:
            if result.replies or result.closed is None:
                return f"expected the connection closed without a reply, got {result.replies}"
            return None
        if not want:
            # Answered as the same call without the oddity: by its method's comparison.
            custom = COMPARE.get(entry.method or "")
            return custom(self, entry, result) if custom is not None else None
        if _final(result.replies) != want:
            return f"expected {want}, got {result.replies} ({result.closed})"
        return None

    def default(self, entry: Entry, result: Result) -> str | None:
        """The default comparison (module notes)."""
        if result.closed is not None and entry.replies:
            return f"connection closed after {result.replies}; cfsctl replied {entry.replies}"
        got = json.loads(self.places.shown(json.dumps(normalise(entry, result.replies))))
        want = normalise(entry, entry.replies)
        if entry.seq in SHAPE_ONLY:
            got, want = [shape(r) for r in got], [shape(r) for r in want]
        elif entry.seq in MESSAGES_DIFFER:
            got, want = _messages_only_named(got), _messages_only_named(want)
        if got != want:
            return f"replies differ:\n  composefsd: {got}\n  cfsctl:     {want}"
        check = CHECK_FDS.get(entry.method or "")
        if check is not None:
            return check(self, entry, result)
        if len(result.fds) != entry.fds_received:
            return f"{len(result.fds)} fds received, cfsctl sent {entry.fds_received}"
        return None

    def uncompared(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.skipped is not None]


def pipe_with(data: bytes) -> int:
    """The read end of a pipe that yields ``data`` (written by a thread: it may not
    fit the pipe's buffer), then EOF."""
    r, w = os.pipe()

    def feed() -> None:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(w, view) :]
        except OSError:
            pass  # the reader went away
        finally:
            os.close(w)

    threading.Thread(target=feed, daemon=True).start()
    return r


def by_seq(outcomes: list[Outcome]) -> dict[int, Outcome]:
    return {o.entry.seq: o for o in outcomes}


def seqs() -> Iterator[int]:
    return (e.seq for e in entries())


__all__ = [
    "CHECK_FDS",
    "COMPARE",
    "EXPECTED",
    "FDS_TO_SEND",
    "MESSAGES_DIFFER",
    "SHAPE_ONLY",
    "UNORDERED",
    "Client",
    "Entry",
    "Outcome",
    "Places",
    "Replay",
    "Result",
    "by_seq",
    "entries",
    "make_places",
    "normalise",
    "pipe_with",
    "received_fd_inspection",
    "recorded_interfaces",
    "seqs",
    "shape",
]
