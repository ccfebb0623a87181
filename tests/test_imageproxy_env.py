"""The machine's HTTP proxy settings reach skopeo, whoever it runs as: a CONNECT
proxy on loopback sees skopeo's request for a registry that does not exist."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator

import pytest

from composefsd.credentials import Credentials
from composefsd.service.imageproxy import ImageProxyError, ProxyOptions, open_image_proxy

NOBODY = Credentials(64123, 64123)


class _ConnectRecorder:
    """Answers every connection with 502 after reading its request line."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.port = self.sock.getsockname()[1]
        self.lines: list[str] = []
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                data = b""
                while b"\r\n\r\n" not in data and len(data) < 65536:
                    piece = conn.recv(4096)
                    if not piece:
                        break
                    data += piece
                self.lines.append(data.split(b"\r\n", 1)[0].decode("latin-1"))
                conn.sendall(b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\n\r\n")

    def close(self) -> None:
        # shutdown, not close alone, wakes the thread blocked in accept().
        self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        self._thread.join(timeout=30)
        assert not self._thread.is_alive()


@pytest.fixture
def recorder(monkeypatch: pytest.MonkeyPatch) -> Iterator[_ConnectRecorder]:
    rec = _ConnectRecorder()
    for name in ("HTTP_PROXY", "http_proxy", "NO_PROXY", "no_proxy", "https_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HTTPS_PROXY", f"http://127.0.0.1:{rec.port}")
    yield rec
    rec.close()


@pytest.mark.parametrize("creds", [None, NOBODY], ids=["daemon", "caller"])
def test_proxy_settings_reach_skopeo(recorder: _ConnectRecorder, creds: Credentials | None) -> None:
    with pytest.raises(ImageProxyError):
        open_image_proxy("docker://registry.example.invalid/os:1", ProxyOptions(), creds=creds)
    assert "CONNECT registry.example.invalid:443 HTTP/1.1" in recorder.lines
