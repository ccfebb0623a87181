"""A fetch in its own process, for the kill, concurrency and memory tests of
test_oci_pull.py: ``python pullchild.py REPO LAYOUT TAG [options]``.

``--pause DIGEST:N:SIGNAL_FD:WAIT_FD``: after N bytes of blob DIGEST, write one
byte to SIGNAL_FD, then wait until one byte can be read from WAIT_FD (a test
that kills the process never writes it). Prints the result as JSON on stdout;
``--rss`` adds ru_maxrss (KiB) before and after; logs go to stderr (INFO).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import resource
import sys
from collections.abc import Iterator
from typing import BinaryIO

from composefsd.repository import Repository
from composefsd.repository.ocilayout import OciLayoutSource
from composefsd.repository.ocipull import fetch_image


class _Pausing:
    def __init__(self, raw: BinaryIO, after: int, signal_fd: int, wait_fd: int) -> None:
        self._raw = raw
        self._left = after
        self._signal_fd = signal_fd
        self._wait_fd = wait_fd

    def read(self, n: int = -1) -> bytes:
        if self._left == 0:
            os.write(self._signal_fd, b"P")
            os.read(self._wait_fd, 1)
            self._left = -1
        if self._left > 0:
            n = self._left if n < 0 else min(n, self._left)
            data = self._raw.read(n)
            self._left -= len(data)
            return data
        return self._raw.read(n)


class PausingSource(OciLayoutSource):
    """The layout's image, pausing once in one blob (see the module's notes)."""

    def __init__(self, fd: int, tag: str, pause: tuple[str, int, int, int]) -> None:
        super().__init__(fd, tag)
        self._pause = pause

    @contextlib.contextmanager
    def open_blob(self, digest: str, size: int) -> Iterator[BinaryIO]:
        with super().open_blob(digest, size) as raw:
            want, after, signal_fd, wait_fd = self._pause
            if digest == want:
                yield _Pausing(raw, after, signal_fd, wait_fd)  # type: ignore[misc]
            else:
                yield raw


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("repo")
    parser.add_argument("layout")
    parser.add_argument("tag")
    parser.add_argument("--pause")
    parser.add_argument("--parallel", type=int, default=1)
    parser.add_argument("--rss", action="store_true")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    repo = Repository.open(args.repo)
    fd = os.open(args.layout, os.O_RDONLY | os.O_DIRECTORY)
    source: OciLayoutSource
    if args.pause:
        digest, after, signal_fd, wait_fd = args.pause.rsplit(":", 3)
        source = PausingSource(fd, args.tag, (digest, int(after), int(signal_fd), int(wait_fd)))
    else:
        source = OciLayoutSource(fd, args.tag)
    os.close(fd)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with source:
        result = fetch_image(repo, source, parallel=args.parallel)
    out: dict[str, object] = {
        "manifest_verity": result.manifest_verity,
        "layers": {layer.diff_id: layer.skipped for layer in result.layers},
    }
    if args.rss:
        out["rss_before"] = before
        out["rss_after"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    json.dump(out, sys.stdout)


if __name__ == "__main__":
    main()
