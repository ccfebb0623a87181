"""composefsd for tests of service/rslayers.py: ``python tests/rslayersd.py <daemon args>``.

Where the daemon already serves org.composefs.Oci's layer methods (RsOciInterface
delegating to rslayers), it runs unchanged. Until then it registers stand-ins: an
org.composefs.Oci handler whose layer methods call rslayers, and, if the daemon
has no org.composefs.Repository yet, one with just InitRepository and
OpenRepository (the copy flow needs them); with the authorization and heavy lane
the shared design gives these methods.

:class:`LayerClient` is the raw Varlink client (fds both ways) the tests and
benchmarks/bench_layer_copy.py talk to it with.
"""

from __future__ import annotations

import json
import os
import socket
import struct
import sys
from typing import Any

from composefsd.repository import Repository
from composefsd.service import daemon, rslayers
from composefsd.service.codec import Decoder, encode_call
from composefsd.service.context import CallContext, VarlinkReplyError
from composefsd.service.methods import caller_rights
from composefsd.service.rshandles import HandleTable, rs_errors

OCI = "org.composefs.Oci"
REPO = "org.composefs.Repository"


class StandInRepository:
    """org.composefs.Repository's InitRepository and OpenRepository, by path."""

    def __init__(self, handles: HandleTable) -> None:
        self.handles = handles

    def _check(self, path: str, ctx: CallContext) -> None:
        if not self.handles.is_own(path) and caller_rights(ctx.peer) is not None:
            raise VarlinkReplyError("org.varlink.service.PermissionDenied")

    def InitRepository(
        self, path: str, algorithm: str | None, insecure: bool | None, _request: CallContext
    ) -> dict[str, Any]:
        self._check(path, _request)
        with rs_errors(REPO):
            created = not os.path.exists(os.path.join(path, "meta.json"))
            Repository.init(path, algorithm=algorithm or "fsverity-sha512-12")
        return {"created": created}

    def OpenRepository(
        self, path: str | None, user: bool | None, system: bool | None, _request: CallContext
    ) -> dict[str, Any]:
        if path is None:
            raise VarlinkReplyError(f"{REPO}.InvalidSpec", {"message": "path only"})
        self._check(path, _request)
        with rs_errors(REPO):
            entry = self.handles.open(Repository.open(path), _request.peer.uid)
        return {
            "handle": entry.handle,
            "hash_algorithm": entry.repo.hash_algorithm.value,
            "objects_device_id": os.stat(entry.repo.objects_dir).st_dev,
        }


class StandInOci:
    """org.composefs.Oci's layer methods, as RsOciInterface delegates them."""

    def __init__(self, handles: HandleTable) -> None:
        self.handles = handles

    def GetInfo(self, _request: CallContext) -> dict[str, Any]:
        return rslayers.get_info(self.handles, _request)

    def HasLayer(self, handle: int, diff_id: str, _request: CallContext) -> dict[str, Any]:
        return rslayers.has_layer(self.handles, _request, handle, diff_id)

    def GetLayer(
        self, handle: int, params: dict[str, Any], _request: CallContext
    ) -> dict[str, Any]:
        return rslayers.get_layer(self.handles, _request, handle, params)

    def PutLayer(
        self, handle: int, diff_id: str, zerocopy: bool, _request: CallContext
    ) -> dict[str, Any]:
        return rslayers.put_layer(self.handles, _request, handle, diff_id, zerocopy)

    def FinalizeImage(
        self,
        handle: int,
        manifest_json: str,
        config_json: str,
        layers: list[dict[str, Any]],
        name: str | None,
        _request: CallContext,
    ) -> dict[str, Any]:
        return rslayers.finalize_image(
            self.handles, _request, handle, manifest_json, config_json, layers, name
        )


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


def main() -> int:
    original = daemon.build_service

    def build(repo: Repository, *args: Any, **kwargs: Any) -> Any:
        service = original(repo, *args, **kwargs)
        handlers = service.interfaces_handlers
        if hasattr(handlers.get(OCI), "GetLayer"):
            return service
        handles = getattr(handlers.get(REPO), "handles", None) or HandleTable(repo)
        if REPO not in handlers:
            service._set_interface(REPO, StandInRepository(handles))
        service._set_interface(OCI, StandInOci(handles))
        return service

    daemon.build_service = build
    daemon.READ_ONLY_METHODS = daemon.READ_ONLY_METHODS | {f"{OCI}.HasLayer", f"{OCI}.GetInfo"}
    daemon.HEAVY_METHODS = daemon.HEAVY_METHODS | {f"{OCI}.PutLayer", f"{OCI}.FinalizeImage"}
    return daemon.main()


if __name__ == "__main__":
    sys.exit(main())
