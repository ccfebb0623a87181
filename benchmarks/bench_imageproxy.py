#!/usr/bin/env python3
"""Streaming an image through skopeo's proxy (composefsd.service.imageproxy)
against reading the same bytes without it.

    python benchmarks/bench_imageproxy.py [--mib 256] [--rounds 3] [--dir DIR]

Writes an OCI layout with one uncompressed layer of ``--mib`` MiB of random
bytes (streamed to disk, never held in memory), then, best of ``--rounds``:

* ``oci:`` — every blob of the image through the proxy (sha256 of each
  computed, as a puller would) against reading and hashing the blob files;
* ``docker://`` — the same image from Debian's docker-registry on 127.0.0.1
  through the proxy against ``skopeo copy docker://… oci:DIR`` (which downloads
  and writes the image, and is what the pull target of issue 14 is measured by).

Also reported: this process's peak RSS (ru_maxrss) after all the streaming, which
stays far below the layer's size because blobs are streamed in 1 MiB pieces.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from _common import REPO, best_of
from composefsd.service.imageproxy import ImageProxySource, ProxyOptions, open_image_proxy

sys.path.insert(0, str(REPO / "tests"))
from registry import running_registry  # the tests' registry helper

_CHUNK = 1 << 20


def _hash_file(path: Path) -> tuple[str, int]:
    h = hashlib.sha256()
    size = 0
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
            size += len(chunk)
    return "sha256:" + h.hexdigest(), size


def _put(blobs: Path, src: Path) -> tuple[str, int]:
    digest, size = _hash_file(src)
    src.rename(blobs / digest.split(":")[1])
    return digest, size


def write_big_layout(layout: Path, mib: int) -> None:
    blobs = layout / "blobs" / "sha256"
    blobs.mkdir(parents=True)
    data = layout / "data"
    with data.open("wb") as f:
        for _ in range(mib):
            f.write(os.urandom(_CHUNK))
    tar_path = layout / "layer.tar"
    with tarfile.open(tar_path, "w", format=tarfile.PAX_FORMAT) as tar:
        tar.add(data, "big", recursive=False)
    data.unlink()
    layer, layer_size = _put(blobs, tar_path)
    config_path = layout / "config.json"
    config_path.write_text(
        json.dumps(
            {
                "architecture": "amd64",
                "os": "linux",
                "rootfs": {"type": "layers", "diff_ids": [layer]},
            }
        )
    )
    config, config_size = _put(blobs, config_path)
    manifest_path = layout / "manifest.json"
    manifest_path.write_text(
        json.dumps(
            {
                "schemaVersion": 2,
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "config": {
                    "mediaType": "application/vnd.oci.image.config.v1+json",
                    "digest": config,
                    "size": config_size,
                },
                "layers": [
                    {
                        "mediaType": "application/vnd.oci.image.layer.v1.tar",
                        "digest": layer,
                        "size": layer_size,
                    }
                ],
            }
        )
    )
    manifest, manifest_size = _put(blobs, manifest_path)
    (layout / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')
    (layout / "index.json").write_text(
        json.dumps(
            {
                "schemaVersion": 2,
                "manifests": [
                    {
                        "mediaType": "application/vnd.oci.image.manifest.v1+json",
                        "digest": manifest,
                        "size": manifest_size,
                        "annotations": {"org.opencontainers.image.ref.name": "big"},
                    }
                ],
            }
        )
    )


def pull_through_proxy(reference: str, options: ProxyOptions) -> int:
    """Every blob of the image, hashed and checked; returns the bytes streamed."""
    total = 0
    source: ImageProxySource
    with open_image_proxy(reference, options, creds=None) as source:
        _, manifest = source.fetch_manifest()
        doc = json.loads(manifest)
        source.fetch_config(doc["config"]["digest"], doc["config"]["size"])
        for layer in doc["layers"]:
            h = hashlib.sha256()
            with source.open_blob(layer["digest"], layer["size"]) as stream:
                while chunk := stream.read(_CHUNK):
                    h.update(chunk)
                    total += len(chunk)
            assert "sha256:" + h.hexdigest() == layer["digest"]
    return total


def read_layout_blobs(layout: Path) -> int:
    return sum(_hash_file(p)[1] for p in (layout / "blobs" / "sha256").iterdir())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mib", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--dir", type=Path, default=Path("/var/tmp"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        work = Path(tmp)
        layout = work / "layout"
        write_big_layout(layout, args.mib)
        mb = read_layout_blobs(layout) / 1e6
        t_proxy = best_of(
            args.rounds, lambda: pull_through_proxy(f"oci:{layout}:big", ProxyOptions())
        )
        t_read = best_of(args.rounds, lambda: read_layout_blobs(layout))
        print(f"image: {mb:.1f} MB (one uncompressed layer), on {args.dir}")
        print(f"oci: through the proxy:      {t_proxy:.3f} s ({mb / t_proxy:.0f} MB/s)")
        print(f"oci: reading the blob files: {t_read:.3f} s ({mb / t_read:.0f} MB/s)")
        print(f"ratio proxy / read: {t_proxy / t_read:.2f}")

        with running_registry(work / "registry") as reg:
            ref = reg.push(f"oci:{layout}:big", "big", "big")
            plain = ProxyOptions(tls_verify=False)
            t_pull = best_of(args.rounds, lambda: pull_through_proxy(ref, plain))
            dest = work / "copy"

            def skopeo_copy() -> None:
                shutil.rmtree(dest, ignore_errors=True)
                subprocess.run(
                    [
                        "skopeo", "--insecure-policy", "copy", "-q", "--src-tls-verify=false",
                        ref, f"oci:{dest}:big",
                    ],
                    check=True,
                )  # fmt: skip

            t_copy = best_of(args.rounds, skopeo_copy)
        print(f"docker:// through the proxy:       {t_pull:.3f} s ({mb / t_pull:.0f} MB/s)")
        print(f"docker:// skopeo copy to oci:DIR:  {t_copy:.3f} s ({mb / t_copy:.0f} MB/s)")
        print(f"ratio proxy / skopeo copy: {t_pull / t_copy:.2f}")
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(f"peak RSS of this process: {rss:.0f} MiB")


if __name__ == "__main__":
    main()
