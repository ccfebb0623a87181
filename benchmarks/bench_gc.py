#!/usr/bin/env python3
"""Time GC on a repository shaped like bootc's: many objects, OCI images as streams.

    python benchmarks/bench_gc.py [--objects 100000] [--images 20] [--work DIR] [--keep]

Builds a sha256 repository with OBJECTS objects and IMAGES OCI images the way
composefs-rs lays them out: per image a manifest, a config and layer
splitstreams (``streams/oci-*``), a tag ``streams/refs/oci/<tag>``, and the
image's EROFS image (``images/<hex>``, named by the config's
``composefs.image.v1``). Layers share a base layer, as images of one
distribution do; a fifth of the objects is garbage no stream references. The
streams are written by :func:`composefsd.splitstream.write_splitstream`, byte for
byte what composefs-rs writes.

Then, on the page-cached repository, each timed 3 times (best and median shown):

* ``walk``: a plain walk of ``objects/`` that stats every file (what any GC's
  sweep must at least do): the reference;
* ``unlink``: removing exactly the garbage files, by their known paths, from a
  fresh copy: what the filesystem charges for the removals alone (a second
  reference for the real collection);
* ``reach``: :func:`composefsd.repository.streams.reachable` alone (reading every
  stream's references);
* ``gc --dry-run``: the whole collection, removing nothing;
* ``gc``: a real collection, each round on a fresh copy of the repository (the
  copy, and the ``sync`` after it, are not timed).

Prints the times side by side with the walk and their ratios; the goal is that
GC takes under 10 s. Other load on the machine skews single runs: the load
average is printed.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import stat
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from composefsd.image.tree import Node, new_directory
from composefsd.image.writer import write_image
from composefsd.objectlayout import object_payload, object_relpath
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
    write_splitstream,
)

ROUNDS = 3
OBJECT_SIZE = 256
LAYERS_PER_IMAGE = 3  # the shared base, and two of the image's own
LAYER, CONFIG, MANIFEST = CONTENT_TYPE_OCI_LAYER, CONTENT_TYPE_OCI_CONFIG, CONTENT_TYPE_OCI_MANIFEST


def make_stream(
    content_type: int,
    object_refs: list[bytes],
    named_refs: list[tuple[str, bytes]],
    object_size: int,
) -> bytes:
    """A sha256 splitstream whose content is the objects ``object_refs`` (raw
    digests, each ``object_size`` bytes) one after another, with ``named_refs``
    (name, raw digest of a stream object)."""
    return write_splitstream(
        32,
        content_type,
        [(digest.hex(), object_size) for digest in object_refs],
        named_refs=[(name, digest.hex()) for name, digest in named_refs],
    )


def _digest(rng: random.Random) -> bytes:
    return rng.randbytes(32)


def _put_object(repo: Path, digest: bytes, data: bytes) -> None:
    path = repo / "objects" / object_relpath(digest.hex())
    path.parent.mkdir(exist_ok=True)
    path.write_bytes(data)


def _link(path: Path, digest: bytes, depth: int = 1) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.symlink_to("../" * depth + "objects/" + object_relpath(digest.hex()))


def build(path: Path, n_objects: int, n_images: int) -> tuple[int, list[str]]:
    """The benchmark repository; returns how many objects are live, and the paths
    (relative to ``objects/``) of the garbage."""
    rng = random.Random(20261207)
    Repository.init(path)
    objects = [_digest(rng) for _ in range(n_objects)]
    for digest in objects:
        _put_object(path, digest, rng.randbytes(OBJECT_SIZE))
    # Layers: one base shared by all images, two more per image, over 4/5 of the objects.
    n_layers = 1 + (LAYERS_PER_IMAGE - 1) * n_images
    per_layer = n_objects * 4 // 5 // n_layers
    used = objects[: per_layer * n_layers]
    layers: list[tuple[str, bytes, list[bytes]]] = []  # diff_id, stream object, objects
    for i in range(n_layers):
        refs = used[i * per_layer : (i + 1) * per_layer]
        diff_id = "sha256:" + _digest(rng).hex()
        data = make_stream(LAYER, refs, [], OBJECT_SIZE)
        sid = _digest(rng)
        _put_object(path, sid, data)
        _link(path / "streams" / (OCI_LAYER_PREFIX + diff_id), sid)
        layers.append((diff_id, sid, refs))
    live = len(used) + n_layers
    for i in range(n_images):
        mine = [layers[0], layers[1 + 2 * i], layers[2 + 2 * i]]
        # The image: a flat tree of every file of its layers.
        root = new_directory()
        assert root.children is not None
        for k, digest in enumerate(d for _id, _s, refs in mine for d in refs):
            root.children[b"f%06d" % k] = Node(
                mode=stat.S_IFREG | 0o644, size=OBJECT_SIZE, payload=object_payload(digest)
            )
        image = _digest(rng)
        _put_object(path, image, write_image(root, min_version=1))
        _link(path / "images" / image.hex(), image)
        config_json, manifest_json = _digest(rng), _digest(rng)
        for digest in (config_json, manifest_json):
            _put_object(path, digest, json.dumps({"image": i}).encode() * 8)
        config_named = [(diff_id, sid) for diff_id, sid, _refs in mine]
        config_named.append(("composefs.image.v1", image))
        config = _digest(rng)
        config_id = "sha256:" + _digest(rng).hex()
        _put_object(path, config, make_stream(CONFIG, [config_json], config_named, 300))
        _link(path / "streams" / (OCI_CONFIG_PREFIX + config_id), config)
        manifest_named = [(f"config:{config_id}", config)]
        manifest_named += [(diff_id, sid) for diff_id, sid, _refs in mine]
        manifest = _digest(rng)
        manifest_id = "sha256:" + _digest(rng).hex()
        _put_object(path, manifest, make_stream(MANIFEST, [manifest_json], manifest_named, 300))
        _link(path / "streams" / (OCI_MANIFEST_PREFIX + manifest_id), manifest)
        tag = path / "streams" / "refs" / OCI_REF_PREFIX / f"image{i}"
        tag.parent.mkdir(parents=True, exist_ok=True)
        tag.symlink_to(f"../../{OCI_MANIFEST_PREFIX}{manifest_id}")
        live += 5  # the image, two JSON objects, the config and manifest streams
    return live, [object_relpath(d.hex()) for d in objects[len(used) :]]


def walk(path: Path) -> int:
    """Stat every file below objects/XX/: the least a sweep does."""
    count = 0
    with os.scandir(path / "objects") as top:
        for entry in top:
            if entry.is_dir(follow_symlinks=False):
                with os.scandir(entry.path) as inner:
                    for obj in inner:
                        obj.stat(follow_symlinks=False)
                        count += 1
    return count


def timed(fn: Callable[[], object], prepare: Callable[[], object] | None = None) -> list[float]:
    out = []
    for _ in range(ROUNDS):
        if prepare is not None:
            prepare()
        start = time.monotonic()
        fn()
        out.append(time.monotonic() - start)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--objects", type=int, default=100_000)
    parser.add_argument("--images", type=int, default=20)
    parser.add_argument(
        "--work", type=Path, default=None, help="where to build (default: /var/tmp)"
    )
    parser.add_argument("--keep", action="store_true", help="keep the repositories")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-gc-", dir=args.work or "/var/tmp"))
    base, copy = work / "repo", work / "copy"
    try:
        start = time.monotonic()
        live, garbage = build(base, args.objects, args.images)
        total = walk(base)
        print(
            f"built {base}: {total} objects ({live} live), {args.images} OCI images "
            f"in {time.monotonic() - start:.1f} s"
        )
        repo = Repository.open(base)
        reach = reachable(repo)
        assert len(reach.objects) == live, (len(reach.objects), live)
        dry = repo.gc(dry_run=True)
        assert dry.objects_removed == total - live, (dry, total, live)

        def fresh_copy() -> None:
            shutil.rmtree(copy, ignore_errors=True)
            subprocess.run(["cp", "-a", str(base), str(copy)], check=True)
            # The copy's writeback must not slow the timed run down.
            subprocess.run(["sync"], check=True)
            walk(copy)  # into the page cache, like the original

        def unlink_garbage() -> None:
            for rel in garbage:
                os.unlink(copy / "objects" / rel)

        def real_gc() -> None:
            result = Repository.open(copy).gc()
            assert result.objects_removed == total - live, result

        results = {
            "walk objects/ (reference)": timed(lambda: walk(base)),
            "unlink the garbage (ref.)": timed(unlink_garbage, fresh_copy),
            "reach (streams only)": timed(lambda: reachable(repo)),
            "gc --dry-run": timed(lambda: repo.gc(dry_run=True)),
            "gc (on a fresh copy)": timed(real_gc, fresh_copy),
        }
        print(f"load average: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
        ref = min(results["walk objects/ (reference)"])
        print(f"{'':28} {'best':>8} {'median':>8} {'best/walk':>10}")
        for name, times in results.items():
            best = min(times)
            print(f"{name:28} {best:7.2f}s {statistics.median(times):7.2f}s {best / ref:9.1f}x")
        worst = max(max(results["gc --dry-run"]), max(results["gc (on a fresh copy)"]))
        print(f"slowest GC run: {worst:.2f} s (goal: < 10 s): {'ok' if worst < 10 else 'SLOW'}")
        return 0 if worst < 10 else 1
    finally:
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
