"""A raw Varlink client with fds both ways, for the tests of org.composefs.Oci's layer
methods (tests/test_rs_layers.py) and benchmarks/bench_layer_copy.py."""

from __future__ import annotations

import json
import socket
import struct
from typing import Any

from composefsd.service.codec import Decoder, encode_call


class LayerClient:
    """A raw Varlink client with fds both ways (fds belong to the message they start),
    for the tests and benchmarks/bench_layer_copy.py."""

    def __init__(self, address: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(60)
        self.sock.connect(address)
        self.decoder = Decoder(max_message_size=1 << 26, max_fds=253)
        self.pending: list[tuple[bytes, list[int]]] = []

    def send(
        self, method: str, params: dict[str, Any] | None = None, *, more: bool = False,
        fds: list[int] | None = None,
    ) -> None:  # fmt: skip
        data = encode_call(method, params, more=more)
        if fds:
            self.sock.sendmsg(
                [data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack(f"{len(fds)}i", *fds))]
            )
        else:
            self.sock.sendall(data)

    def recv(self) -> tuple[dict[str, Any], list[int]]:
        while not self.pending:
            data, anc, _, _ = self.sock.recvmsg(1 << 20, socket.CMSG_SPACE(253 * 4))
            fds: list[int] = []
            for level, kind, raw in anc:
                assert (level, kind) == (socket.SOL_SOCKET, socket.SCM_RIGHTS)
                fds.extend(struct.unpack(f"{len(raw) // 4}i", raw))
            assert data, "the daemon closed the connection"
            self.pending.extend((m.data, m.fds) for m in self.decoder.feed(data, fds))
        data, fds = self.pending.pop(0)
        return json.loads(data), fds

    def call(self, method: str, params: dict[str, Any] | None = None, *,
             more: bool = False, fds: list[int] | None = None) -> tuple[list[dict[str, Any]], list[int]]:  # fmt: skip
        """Every reply of one call, and all the fds that came with them in order."""
        self.send(method, params, more=more, fds=fds)
        replies, got = [], []
        while True:
            reply, reply_fds = self.recv()
            replies.append(reply)
            got.extend(reply_fds)
            if not reply.get("continues"):
                return replies, got

    def one(self, method: str, params: dict[str, Any] | None = None, **kw: Any) -> dict[str, Any]:
        replies, fds = self.call(method, params, **kw)
        assert not fds
        (reply,) = replies
        return reply

    def close(self) -> None:
        self.sock.close()
