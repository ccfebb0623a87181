#!/usr/bin/env python3
"""Reading splitstream references for GC: composefsd.splitstream and
composefsd.repository.streams on large, synthetic OCI layer streams.

    python benchmarks/bench_splitstream.py [--images 20] [--files 5000] [--rounds 5] [--dir DIR]

Builds a sha512 repository with ``--images`` OCI images (tag → manifest stream →
config stream → one layer stream each), every layer stream written by our writer
as composefs-rs writes one for a tar: a 512-byte header per file, file data of at
most 64 bytes inline, larger files as object references (``--files`` per layer;
three in four files are objects), and MBs of inline data. Two profiles of object
sizes: typical files (1 KiB .. 1 MiB, about 2 GB referenced per layer) and a
worst case for this measure (65 B .. 4 KiB). The objects themselves are not
written: reading references never opens them. Reported, best of ``--rounds``,
in MB/s of *referenced content* (the layers' declared stream sizes: objects plus
inline data), the goal being at least 200 MB/s, and in object refs per second:

* read_refs on the mapped stream file (what GC does per stream);
* reachable() over the whole repository (refs, links, every stream parsed);

and beside them, in the same run, references for the same bytes:

* reading the stream files whole (os.read), the floor of any parser;
* ``zstd -d`` of the stream sections (what decoding chunks would add), and our
  own full chunk decode (iter_chunks), to show why GC does not decode.
"""

from __future__ import annotations

import argparse
import mmap
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import best_of
from composefsd.image.tree import RECOMMENDED_INLINE_CONTENT_MAX
from composefsd.kernel.verity import Algorithm
from composefsd.repository import Repository
from composefsd.repository.oci import OCI_REF_PREFIX
from composefsd.repository.streams import reachable
from composefsd.splitstream import (
    CONTENT_TYPE_OCI_CONFIG,
    CONTENT_TYPE_OCI_LAYER,
    CONTENT_TYPE_OCI_MANIFEST,
    OCI_CONFIG_PREFIX,
    OCI_LAYER_PREFIX,
    OCI_MANIFEST_PREFIX,
    SplitStreamWriter,
    iter_chunks,
    parse,
    read_refs,
)


def fake_digest(rng: random.Random, size: int) -> str:
    return rng.randbytes(size).hex()


#: Object sizes of a layer: typical files, and a worst case for MB/s of referenced
#: content (every object just over the inline limit or a few KiB).
PROFILES = {
    "typical (1 KiB..1 MiB files)": (1 << 10, 1 << 20),
    "small (65 B..4 KiB files)": (65, 4096),
}


def layer_stream(rng: random.Random, files: int, size: int, sizes: tuple[int, int]) -> bytes:
    """A layer as composefs-rs splits a tar: header, then data inline or as an object."""
    writer = SplitStreamWriter(size, CONTENT_TYPE_OCI_LAYER)
    for i in range(files):
        header = f"usr/lib/file-{i:06d}".encode().ljust(100, b"\0") + bytes(412)
        writer.write_inline(header)
        if i % 4 == 0:
            data = rng.randbytes(rng.randint(1, RECOMMENDED_INLINE_CONTENT_MAX))
            writer.write_inline(data + bytes(-len(data) % 512))
        else:
            length = rng.randint(*sizes)
            writer.write_object(fake_digest(rng, size), length)
            writer.write_inline(bytes(-length % 512))
    writer.write_inline(bytes(1024))
    return writer.finish()


def build(
    root: Path, images: int, files: int, sizes: tuple[int, int]
) -> tuple[Repository, list[str], int]:
    repo = Repository.init(root, algorithm="sha512")
    size = Algorithm.SHA512.digest_size
    rng = random.Random(13)
    streams = repo.path / "streams"
    (streams / "refs" / OCI_REF_PREFIX).mkdir(parents=True)
    paths: list[str] = []
    referenced = 0

    def link(store_digest: str, content_id: str) -> None:
        (streams / content_id).symlink_to(f"../objects/{store_digest[:2]}/{store_digest[2:]}")

    with repo.object_store() as store:
        for n in range(images):
            data = layer_stream(rng, files, size, sizes)
            referenced += parse(data, size).stream_size
            layer = store.store_bytes(data).digest
            diff_id = f"sha256:{rng.randbytes(32).hex()}"
            link(layer, OCI_LAYER_PREFIX + diff_id)
            paths.append(str(repo.object_path(layer)))
            config = SplitStreamWriter(size, CONTENT_TYPE_OCI_CONFIG)
            config.add_named_ref(diff_id, layer)
            config.add_named_ref("composefs.image.v1", fake_digest(rng, size))
            config.write_object(fake_digest(rng, size), 600)
            config_obj = store.store_bytes(config.finish()).digest
            config_digest = f"sha256:{rng.randbytes(32).hex()}"
            link(config_obj, OCI_CONFIG_PREFIX + config_digest)
            manifest = SplitStreamWriter(size, CONTENT_TYPE_OCI_MANIFEST)
            manifest.add_named_ref(f"config:{config_digest}", config_obj)
            manifest.add_named_ref(diff_id, layer)
            manifest.write_object(fake_digest(rng, size), 800)
            manifest_obj = store.store_bytes(manifest.finish()).digest
            manifest_digest = f"sha256:{rng.randbytes(32).hex()}"
            link(manifest_obj, OCI_MANIFEST_PREFIX + manifest_digest)
            (streams / "refs" / OCI_REF_PREFIX / f"image-{n}").symlink_to(
                f"../../{OCI_MANIFEST_PREFIX}{manifest_digest}"
            )
    return repo, paths, referenced


def read_refs_all(paths: list[str], size: int) -> int:
    count = 0
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            with mmap.mmap(fd, 0, prot=mmap.PROT_READ) as data:
                count += len(read_refs(data, size).object_refs)
        finally:
            os.close(fd)
    return count


def read_whole(paths: list[str]) -> int:
    total = 0
    for path in paths:
        with open(path, "rb", buffering=0) as fh:
            total += len(fh.read())
    return total


def decode_all(paths: list[str], size: int) -> int:
    chunks = 0
    for path in paths:
        data = Path(path).read_bytes()
        for _chunk in iter_chunks(data, parse(data, size)):
            chunks += 1
    return chunks


def sections(paths: list[str], size: int, directory: Path) -> list[Path]:
    out = []
    for i, path in enumerate(paths):
        data = Path(path).read_bytes()
        parsed = parse(data, size)
        section = directory / f"section-{i}.zst"
        section.write_bytes(data[parsed.stream_start : parsed.stream_end])
        out.append(section)
    return out


def zstd_d(files: list[Path]) -> None:
    for section in files:
        subprocess.run(
            ["zstd", "-d", "-q", "-c", str(section)], check=True, stdout=subprocess.DEVNULL
        )


def run(args: argparse.Namespace, profile: str, root: Path) -> float:
    size = Algorithm.SHA512.digest_size
    t0 = time.perf_counter()
    repo, paths, referenced = build(root, args.images, args.files, PROFILES[profile])
    build_time = time.perf_counter() - t0
    file_bytes = sum(os.path.getsize(p) for p in paths)
    refs = read_refs_all(paths, size)
    mb = referenced / 1e6
    print(f"{profile}:")
    print(
        f"  {args.images} layer streams, {refs} object refs, {file_bytes / 1e6:.1f} MB of "
        f"stream files, {mb:.0f} MB referenced (built in {build_time:.1f} s)"
    )
    read_whole(paths)  # warm the page cache
    results: dict[str, float] = {
        "read_refs (mmap), layer streams": best_of(args.rounds, lambda: read_refs_all(paths, size)),
        "reachable(), whole repository": best_of(args.rounds, lambda: reachable(repo)),
        "reference: read the stream files": best_of(args.rounds, lambda: read_whole(paths)),
    }
    if shutil.which("zstd"):
        zst = sections(paths, size, root)
        results["reference: zstd -d of the stream sections"] = best_of(
            args.rounds, lambda: zstd_d(zst)
        )
    results["full chunk decode (iter_chunks)"] = best_of(
        max(1, args.rounds // 2), lambda: decode_all(paths, size)
    )
    base = results["read_refs (mmap), layer streams"]
    for name, dt in results.items():
        print(
            f"    {name:<42} {dt * 1000:8.1f} ms {mb / dt:9.0f} MB/s {refs / dt / 1e6:7.2f} Mrefs/s"
            f"  /read_refs {dt / base:6.2f}"
        )
    return mb / base


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=20)
    ap.add_argument("--files", type=int, default=5000)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--dir", default="/var/tmp")
    args = ap.parse_args()
    top = Path(tempfile.mkdtemp(prefix="bench-splitstream-", dir=args.dir))
    try:
        print("load average at start: {:.2f} {:.2f} {:.2f}".format(*os.getloadavg()))
        rates = {p: run(args, p, top / str(i)) for i, p in enumerate(PROFILES)}
        worst = min(rates.values())
        verdict = "ok" if worst >= 200 else "BELOW GOAL"
        print(
            f"read_refs, slowest profile: {worst:.0f} MB/s of referenced content "
            f"(goal >= 200): {verdict}"
        )
        print("load average at end: {:.2f} {:.2f} {:.2f}".format(*os.getloadavg()))
    finally:
        shutil.rmtree(top)
    return 0


if __name__ == "__main__":
    sys.exit(main())
