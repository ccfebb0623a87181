#!/usr/bin/env python3
"""Copying an image's layers between repositories through the daemon
(org.composefs.Oci GetLayer -> PutLayer, then FinalizeImage, as cfsctl's ``copy``
does) against ``cp -a`` of the source's ``objects/``, which copies every object
and checks nothing.

    python benchmarks/bench_layer_copy.py [--mib 300] [--layers 3] [--rounds 3]
        [--dir /var/tmp] [--other-fs /dev/shm]

Builds, deterministically (seeded), ``--layers`` layer tars of about ``--mib`` MB
in all (random files of 1 KiB to 4 MiB, some under 64 bytes kept inline, a
directory tree), imports them into a source repository under ``--dir`` and
starts composefsd on a repository of its own there.
Each round, into a fresh destination repository, timed apart:

* **same filesystem** (``--dir``): GetLayer + PutLayer of every layer and
  FinalizeImage; objects are reflinked or hard-linked (the counters are printed),
  against ``cp -a objects`` into the same directory;
* **other filesystem** (``--other-fs``, default /dev/shm; skipped if it is the
  same filesystem or missing): the same, where every object must be copied (and
  hashed as it is written), against ``cp -a`` to that filesystem.

Prints the best of ``--rounds`` and the ratios ours / cp -a. Everything is
removed at the end.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import random
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from _common import best_of, start_daemon
from composefsd.repository import Repository
from composefsd.repository.ocilayer import import_layer
from layerclient import LayerClient

OCI = "org.composefs.Oci."


def make_layer(seed: int, target: int) -> bytes:
    """A layer tar of about ``target`` bytes of random files."""
    rng = random.Random(seed)
    out = io.BytesIO()
    total = 0
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for d in ["usr", "usr/lib", f"usr/lib/bench{seed}"] + [
            f"usr/lib/bench{seed}/d{i:02d}" for i in range(50)
        ]:
            info = tarfile.TarInfo(d)
            info.type = tarfile.DIRTYPE
            info.mode = 0o755
            tar.addfile(info)
        i = 0
        while total < target:
            size = rng.choice((rng.randrange(1, 64), rng.randrange(1024, 65536),
                               rng.randrange(65536, 4 << 20)))  # fmt: skip
            info = tarfile.TarInfo(f"usr/lib/bench{seed}/d{i % 50:02d}/f{i:06d}")
            info.size = size
            info.mtime = 0
            tar.addfile(info, io.BytesIO(rng.randbytes(size)))
            total += size
            i += 1
    return out.getvalue()


def image_json(diff_ids: list[str]) -> tuple[str, str]:
    rootfs = {"type": "layers", "diff_ids": diff_ids}
    config = json.dumps({"architecture": "amd64", "os": "linux", "rootfs": rootfs}, sort_keys=True)
    layers = [
        {"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": d, "size": 0}
        for d in diff_ids
    ]
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {
                "mediaType": "application/vnd.oci.image.config.v1+json",
                "digest": "sha256:" + hashlib.sha256(config.encode()).hexdigest(),
                "size": len(config),
            },
            "layers": layers,
        },
        sort_keys=True,
    )
    return manifest, config


def start(own: Path) -> tuple[subprocess.Popen[bytes], str]:
    sock = own.parent / "bench.sock"
    return start_daemon(own, sock, own.parent / "run"), str(sock)


class Copier:
    def __init__(self, client: LayerClient, src_handle: int, diff_ids: list[str]) -> None:
        self.client = client
        self.src = src_handle
        self.diff_ids = diff_ids
        self.manifest, self.config = image_json(diff_ids)
        self.counts: dict[str, int] = {}

    def open(self, path: Path) -> int:
        c = self.client
        c.one("org.composefs.Repository.InitRepository",
              {"path": str(path), "algorithm": "fsverity-sha256-12", "insecure": True})  # fmt: skip
        reply = c.one("org.composefs.Repository.OpenRepository", {"path": str(path)})
        handle: int = reply["parameters"]["handle"]
        return handle

    def copy(self, dst: Path) -> None:
        c = self.client
        handle = self.open(dst)
        layers = []
        self.counts = {}
        for diff_id in self.diff_ids:
            params = {"diff_id": diff_id, "consumer_has_cap_dac_override": True}
            replies, fds = c.call(
                OCI + "GetLayer", {"handle": self.src, "params": params}, more=True
            )
            dir_count = replies[0]["parameters"]["dir_count"]
            try:
                put = {"handle": handle, "diff_id": diff_id, "zerocopy": False}
                reply = c.one(OCI + "PutLayer", put, fds=fds[: 1 + dir_count])
            finally:
                for fd in fds:
                    os.close(fd)
            got: dict[str, Any] = reply["parameters"]
            for key, value in got.items():
                if key.startswith("objects_"):
                    self.counts[key] = self.counts.get(key, 0) + value
            layers.append({"diff_id": diff_id, "layer_verity": got["layer_verity"]})
        reply = c.one(OCI + "FinalizeImage", {"handle": handle, "manifest_json": self.manifest,
                                              "config_json": self.config, "layers": layers,
                                              "name": "bench"})  # fmt: skip
        assert "error" not in reply, reply


def fresh(base: Path, name: str) -> Path:
    path = base / name
    shutil.rmtree(path, ignore_errors=True)
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mib", type=int, default=300)
    ap.add_argument("--layers", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--dir", default="/var/tmp")
    ap.add_argument("--other-fs", default="/dev/shm")
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench-layer-copy-", dir=args.dir))
    other = None
    if os.path.isdir(args.other_fs) and os.stat(args.other_fs).st_dev != os.stat(work).st_dev:
        other = Path(tempfile.mkdtemp(prefix="bench-layer-copy-", dir=args.other_fs))
    proc = None
    try:
        src = work / "src"
        repo = Repository.init(src, algorithm="fsverity-sha256-12")
        diff_ids = []
        for i in range(args.layers):
            data = make_layer(i, (args.mib << 20) // args.layers)
            diff_id = "sha256:" + hashlib.sha256(data).hexdigest()
            import_layer(repo, io.BytesIO(data), diff_id)
            diff_ids.append(diff_id)
            del data
        size = sum(f.stat().st_size for f in (src / "objects").rglob("*") if f.is_file())
        print(f"source: {args.layers} layers, objects {size / 1e6:.0f} MB")
        proc, sock = start(work / "own")
        client = LayerClient(sock)
        src_handle = client.one("org.composefs.Repository.OpenRepository", {"path": str(src)})[
            "parameters"
        ]["handle"]
        copier = Copier(client, src_handle, diff_ids)
        places = [("same filesystem", work)] + ([("other filesystem", other)] if other else [])
        for label, base in places:
            n = 0

            def ours(base: Path = base) -> None:
                nonlocal n
                n += 1
                copier.copy(fresh(base, f"dst{n}"))

            def cp(base: Path = base) -> None:
                dst = fresh(base, "cp")
                dst.mkdir()
                subprocess.run(["cp", "-a", str(src / "objects"), str(dst / "objects")], check=True)

            t_ours = best_of(args.rounds, ours)
            counts = dict(copier.counts)
            t_cp = best_of(args.rounds, cp)
            for i in range(1, n + 1):
                shutil.rmtree(base / f"dst{i}", ignore_errors=True)
            print(f"{label} ({base}):")
            print(f"  GetLayer+PutLayer+FinalizeImage  {t_ours:7.3f} s   {counts}")
            print(f"  cp -a objects                    {t_cp:7.3f} s")
            print(f"  ratio ours / cp -a               {t_ours / t_cp:7.2f}")
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait()
        shutil.rmtree(work, ignore_errors=True)
        if other is not None:
            shutil.rmtree(other, ignore_errors=True)


if __name__ == "__main__":
    main()
