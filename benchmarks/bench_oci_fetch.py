#!/usr/bin/env python3
"""Fetching an OCI image from an ``oci:`` layout (composefsd.repository.ocipull
.fetch_image with ocilayout.OciLayoutSource) against copying the same image with
``skopeo copy oci:A oci:B`` (which only moves the blobs; a plain copy of the
blobs when skopeo is not on PATH).

    python benchmarks/bench_oci_fetch.py [--layers 5] [--mib 200] [--rounds 3] [--dir DIR]

Builds one layout: ``--layers`` gzip layers (level 1) of files, about ``--mib``
MiB of tar in all, half of each file random and half zeros (so gzip has work on
both). Reported, best of ``--rounds``: the first fetch into a fresh repository
(verity disabled: digests computed in userspace), a second fetch of the same
image (every layer reused), the copy; the ratios fetch / copy and re-fetch /
fetch; and this process's peak RSS.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import json
import random
import resource
import shutil
import subprocess
import tarfile
import tempfile
from pathlib import Path

from _common import best_of
from composefsd.repository import Repository
from composefsd.repository.ocilayout import OciLayoutSource
from composefsd.repository.ocipull import fetch_image

MEDIA_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"


def _put(blobs: Path, data: bytes) -> dict[str, object]:
    digest = hashlib.sha256(data).hexdigest()
    (blobs / digest).write_bytes(data)
    return {"digest": "sha256:" + digest, "size": len(data)}


def make_layout(root: Path, layers: int, mib: int) -> None:
    rng = random.Random(14)
    blobs = root / "blobs" / "sha256"
    blobs.mkdir(parents=True)
    pool = rng.randbytes(1 << 20)
    descs, diff_ids = [], []
    per_layer = (mib << 20) // layers
    for n in range(layers):
        out = io.BytesIO()
        with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
            left, i = per_layer, 0
            while left > 0:
                size = min(left, rng.randint(1 << 10, 1 << 20))
                info = tarfile.TarInfo(f"l{n}/f{i:06d}")
                info.size = size
                half = size // 2
                start = rng.randrange(len(pool) - half) if half < len(pool) else 0
                data = pool[start : start + half] + bytes(size - half)
                tar.addfile(info, io.BytesIO(data))
                left -= size
                i += 1
        tar_bytes = out.getvalue()
        diff_ids.append("sha256:" + hashlib.sha256(tar_bytes).hexdigest())
        descs.append({"mediaType": MEDIA_GZIP, **_put(blobs, gzip.compress(tar_bytes, 1, mtime=0))})
    config = {
        "architecture": "amd64",
        "os": "linux",
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
    }
    manifest = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            **_put(blobs, json.dumps(config).encode()),
        },
        "layers": descs,
    }
    entry = {
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        **_put(blobs, json.dumps(manifest).encode()),
        "annotations": {"org.opencontainers.image.ref.name": "bench"},
    }
    (root / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [entry]}))
    (root / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=5)
    parser.add_argument("--mib", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--dir", type=Path, default=Path("/dev/shm"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        work = Path(tmp)
        layout = work / "layout"
        make_layout(layout, args.layers, args.mib)
        skopeo = shutil.which("skopeo")
        repo_path = work / "repo"

        def fresh_fetch() -> None:
            shutil.rmtree(repo_path, ignore_errors=True)
            repo = Repository.init(repo_path, algorithm="fsverity-sha256-12", verity="disabled")
            with OciLayoutSource.open(layout, "bench") as source:
                fetch_image(repo, source)

        def refetch() -> None:
            with OciLayoutSource.open(layout, "bench") as source:
                fetch_image(Repository.open(repo_path), source)

        def copy() -> None:
            dest = work / "copy"
            shutil.rmtree(dest, ignore_errors=True)
            if skopeo:
                subprocess.run(
                    [skopeo, "copy", "-q", f"oci:{layout}:bench", f"oci:{dest}:bench"], check=True
                )
            else:
                shutil.copytree(layout, dest)

        first = best_of(args.rounds, fresh_fetch)
        again = best_of(args.rounds, refetch)
        baseline = best_of(args.rounds, copy)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    what = "skopeo copy oci: oci:" if skopeo else "copy of the blobs"
    print(f"image: {args.layers} gzip layers, {args.mib} MiB of tar")
    print(f"fetch            {first:8.3f} s  {args.mib / first:8.1f} MiB/s")
    print(f"re-fetch         {again:8.3f} s")
    print(f"{what:<16} {baseline:8.3f} s")
    print(f"ratio fetch / copy      {first / baseline:6.2f}")
    print(f"ratio re-fetch / fetch  {again / first:6.3f}")
    print(f"peak RSS         {rss:8.1f} MiB")


if __name__ == "__main__":
    main()
