#!/usr/bin/env python3
"""Building the composefs image of an OCI image from its layer streams
(composefsd.repository.ocibuild) against writing the image of the finished tree.

    python benchmarks/bench_oci_build.py [--files 50000] [--layers 3] [--rounds 3] [--dir DIR]

Makes ``--layers`` synthetic layer tars of ``--files`` entries each (directories
of 100; files of 1..200 bytes, so that most are inline in the splitstream and
the rest objects; each later layer replaces a tenth of the files before it and
whites out another tenth), imports them into a repository on ``--dir`` (tmpfs
by default) and times, best of ``--rounds``:

* ``build``: the layer streams read and applied (``build_tree``);
* ``write``: the finished tree written as the repository's EROFS format;
* ``compute-id``: the whole ``cfsctl oci compute-id`` (build, default transform,
  write, digest).

Reported: each time and the entries per second of ``build`` (the part this
module adds: compute-id is build, the transform, write and the digest).
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import random
import shutil
import tarfile
import tempfile
from pathlib import Path

from _common import best_of
from composefsd.image.formats import write_format
from composefsd.repository import Repository
from composefsd.repository.oci import open_image, write_config_stream, write_manifest_stream
from composefsd.repository.ocibuild import build_tree, compute_id
from composefsd.repository.ocilayer import import_layer


def make_layer(files: int, index: int) -> bytes:
    rng = random.Random(index)
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        if index == 0:
            usr = tarfile.TarInfo("usr")
            usr.type = tarfile.DIRTYPE
            tar.addfile(usr)
        for i in range(files):
            directory = f"usr/d{i // 100:04d}"
            if i % 100 == 0:
                info = tarfile.TarInfo(directory)
                info.type = tarfile.DIRTYPE
                info.mode = 0o755
                tar.addfile(info)
            name = f"{directory}/f{i:06d}"
            if index and i % 10 == 1:
                tar.addfile(tarfile.TarInfo(f"{directory}/.wh.f{i:06d}"))
                continue
            if index and i % 10 != 0:
                continue
            size = rng.randint(1, 200)
            info = tarfile.TarInfo(name)
            info.size = size
            info.mtime = 1_700_000_000 + i
            data = (f"{index}:{i}:".encode() + rng.randbytes(size))[:size]
            tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--files", type=int, default=50000)
    parser.add_argument("--layers", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--dir", type=Path, default=Path("/dev/shm"))
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench-oci-build-", dir=args.dir))
    try:
        repo = Repository.init(work / "repo", verity="disabled")
        layers = [make_layer(args.files, i) for i in range(args.layers)]
        diff_ids = ["sha256:" + hashlib.sha256(t).hexdigest() for t in layers]
        refs = [
            (d, import_layer(repo, io.BytesIO(t), d)) for d, t in zip(diff_ids, layers, strict=True)
        ]
        config = json.dumps({"rootfs": {"type": "layers", "diff_ids": diff_ids}}).encode()
        config_digest = "sha256:" + hashlib.sha256(config).hexdigest()
        manifest = json.dumps(
            {
                "schemaVersion": 2,
                "config": {
                    "mediaType": "application/vnd.oci.image.config.v1+json",
                    "digest": config_digest,
                    "size": len(config),
                },
                "layers": [],
            }
        ).encode()
        with repo.object_store() as store:
            verity = write_config_stream(repo, store, config, refs)
            write_manifest_stream(repo, store, manifest, config_digest, verity, refs)
            image = open_image(repo, store, "sha256:" + hashlib.sha256(manifest).hexdigest())
            root = build_tree(repo, store, image)
            entries = args.files * args.layers
            t_build = best_of(args.rounds, lambda: build_tree(repo, store, image))
            t_write = best_of(args.rounds, lambda: write_format(root, repo.erofs_version))
            t_id = best_of(args.rounds, lambda: compute_id(repo, store, image))
        print(f"layers: {args.layers} x {args.files} entries, {sum(map(len, layers)) >> 20} MiB")
        print(f"build:      {t_build:7.3f} s  ({entries / t_build:,.0f} entries/s)")
        print(f"write:      {t_write:7.3f} s")
        print(f"compute-id: {t_id:7.3f} s  (build share {t_build / t_id:.0%})")
    finally:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
