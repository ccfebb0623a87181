#!/usr/bin/env python3
"""Pulling an OCI image from a registry (composefsd.repository.ocipull.pull through
composefsd.service.imageproxy.ImageProxyPool) against ``skopeo copy docker://…
oci:DIR``, which only downloads: issue 14's "Speed" targets.

    python benchmarks/bench_oci_pull.py [--mib 500] [--rounds 2] [--dir DIR]
        [--pool 4] [--parallel N] [--profile FILE]

Builds, deterministically (seeded), image A: five gzip layers (level 6) of about
``--mib`` MB compressed in all (30/25/20/15/10 %), each a realistic mix: many
small text-like files (compressible), a few tiny ones (kept inline in the
splitstream), small and large random binaries (incompressible), directories
and symlinks. Image B shares A's four lower layers and has its own top layer.
Both are pushed to Debian's docker-registry on 127.0.0.1 (tests/registry.py's
``running_registry``), whose storage, the repositories and skopeo's destination
all live under ``--dir`` (one filesystem).

Each round, timed apart:

* ``skopeo copy docker://…/bench:a oci:DIR`` into a fresh directory;
* pull A into a fresh repository (verity disabled: digests computed in
  userspace), then A again (every layer present: manifests only), then B (4 of
  5 layers present). Each pull runs in a child process that does only the pull
  (pool of skopeo proxies, fetch, composefs image, tag), which reports its time,
  its phases, its CPU time and its skopeo proxies', and its peak RSS (ru_maxrss;
  skopeo's own processes are not counted).

Reported, best of ``--rounds``: the times, the ratios against the goals (pull /
copy ≤ 1.2, re-pull / pull ≤ 0.1, pull of B / pull of A ≈ the new layer's share
of A's bytes), and the pulls' peak RSS (goal < 300 MB). ``--profile FILE``
profiles one more pull of A (cProfile in the calling thread and each layer's import thread,
merged; not the layers' reading threads, whose work is hashlib and zlib) and prints
its top functions.
"""

from __future__ import annotations

import argparse
import cProfile
import hashlib
import io
import json
import os
import pstats
import random
import resource
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import zlib
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from _common import REPO
from composefsd.repository import Repository, ocipull
from composefsd.repository.progress import Progress
from composefsd.service.imageproxy import ImageProxyPool, ProxyOptions

sys.path.insert(0, str(REPO / "tests"))
from registry import copy, running_registry  # the tests' registry helper

MEDIA_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
#: Each layer's share of image A's compressed bytes, lowest layer first.
_SHARES = (0.30, 0.25, 0.20, 0.15, 0.10)
_WORDS = 5000
_TEXT_POOL = 8 << 20
#: Shares of a layer's tar bytes: compressible text, small and large binaries.
_KINDS = {"text": 0.45, "small": 0.15, "large": 0.40}


# -- the images ----------------------------------------------------------------------------


class _GzipSink:
    """A file object tarfile writes to: the tar hashed (diff_id), gzipped as
    registries store layers, the gzip hashed (blob digest) and written out."""

    def __init__(self, path: Path) -> None:
        self._out = path.open("wb")
        self._zip = zlib.compressobj(6, zlib.DEFLATED, 31)
        self.tar_sha = hashlib.sha256()
        self.blob_sha = hashlib.sha256()
        self.tar_size = 0
        self.blob_size = 0

    def _emit(self, data: bytes) -> None:
        if data:
            self.blob_sha.update(data)
            self.blob_size += len(data)
            self._out.write(data)

    def write(self, data: bytes) -> int:
        self.tar_sha.update(data)
        self.tar_size += len(data)
        self._emit(self._zip.compress(data))
        return len(data)

    def tell(self) -> int:
        return self.tar_size

    def close(self) -> None:
        self._emit(self._zip.flush())
        self._out.close()


@dataclass(frozen=True, slots=True)
class _Layer:
    path: str
    diff_id: str
    digest: str
    size: int
    tar_size: int
    files: int


def _text_pool(rng: random.Random) -> bytes:
    letters = "abcdefghijklmnopqrstuvwxyz_"
    vocab = ["".join(rng.choices(letters, k=rng.randint(2, 10))) for _ in range(_WORDS)]
    vocab += ["\n", "\n    ", "{", "}", "();", "=", "0", "1", "#", "//"]
    out = io.StringIO()
    length = 0
    while length < _TEXT_POOL:
        line = " ".join(rng.choices(vocab, k=512))
        out.write(line)
        length += len(line)
    return out.getvalue().encode()


def make_layer(path: str, seed: int, target: int) -> _Layer:
    """One layer of about ``target`` compressed bytes, all made from ``seed``."""
    rng = random.Random(seed)
    text = _text_pool(rng)
    sink = _GzipSink(Path(path))
    files = 0
    # Bytes of tar per kind: each file is of the kind furthest behind its share.
    made = dict.fromkeys(_KINDS, 0)
    big = max(1 << 20, min(24 << 20, target // 8))
    with tarfile.open(fileobj=sink, mode="w", format=tarfile.PAX_FORMAT) as tar:  # type: ignore[call-overload]
        for directory in ("usr", "usr/share", f"usr/share/l{seed}"):
            info = tarfile.TarInfo(directory)
            info.type = tarfile.DIRTYPE
            info.mode = 0o755
            tar.addfile(info)
        while sink.blob_size < target:
            if files % 60 == 0:
                directory = f"usr/share/l{seed}/d{files // 60:04d}"
                info = tarfile.TarInfo(directory)
                info.type = tarfile.DIRTYPE
                info.mode = 0o755
                tar.addfile(info)
            name = f"{directory}/f{files:06d}"
            files += 1
            if rng.random() < 0.03:
                info = tarfile.TarInfo(name + ".link")
                info.type = tarfile.SYMTYPE
                info.linkname = f"f{max(0, files - 2):06d}"
                tar.addfile(info)
                continue
            total = sum(made.values()) + 1
            kind = max(_KINDS, key=lambda k: _KINDS[k] - made[k] / total)
            if kind == "text":  # source, configs, docs; one in four tiny (inline)
                if rng.random() < 0.25:
                    size = rng.randint(1, 64)
                else:
                    size = min(int(rng.lognormvariate(8.5, 1.2)) + 65, 1 << 20)
                data = text[(o := rng.randrange(len(text) - size)) : o + size]
            elif kind == "small":
                data = rng.randbytes(rng.randint(4 << 10, 512 << 10))
            else:  # libraries, executables
                data = rng.randbytes(rng.randint(big // 8, big))
            made[kind] += len(data)
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mode = 0o644 if kind == "text" else 0o755
            info.mtime = 1_700_000_000
            tar.addfile(info, io.BytesIO(data))
    sink.close()
    return _Layer(
        path,
        "sha256:" + sink.tar_sha.hexdigest(),
        "sha256:" + sink.blob_sha.hexdigest(),
        sink.blob_size,
        sink.tar_size,
        files,
    )


def _put(blobs: Path, data: bytes) -> dict[str, object]:
    digest = hashlib.sha256(data).hexdigest()
    (blobs / digest).write_bytes(data)
    return {"digest": "sha256:" + digest, "size": len(data)}


def _manifest(blobs: Path, layers: list[_Layer]) -> dict[str, object]:
    config = {
        "architecture": "amd64",
        "os": "linux",
        "config": {"Cmd": ["/bin/sh"]},
        "rootfs": {"type": "layers", "diff_ids": [layer.diff_id for layer in layers]},
    }
    manifest = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            **_put(blobs, json.dumps(config).encode()),
        },
        "layers": [
            {"mediaType": MEDIA_GZIP, "digest": layer.digest, "size": layer.size}
            for layer in layers
        ],
    }
    return {
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        **_put(blobs, json.dumps(manifest).encode()),
    }


def make_layout(root: Path, mib: int) -> tuple[list[_Layer], _Layer]:
    """Images ``a`` and ``b`` in one OCI layout; A's layers and B's own."""
    blobs = root / "blobs" / "sha256"
    blobs.mkdir(parents=True)
    total = mib * 1_000_000
    targets = [int(total * share) for share in _SHARES] + [int(total * _SHARES[-1])]
    raw = root / "raw"
    raw.mkdir()
    with ProcessPoolExecutor(max_workers=min(2, os.cpu_count() or 1)) as pool:
        futures = [
            pool.submit(make_layer, str(raw / f"layer{n}"), 1400 + n, target)
            for n, target in enumerate(targets)
        ]
        made = [f.result() for f in futures]
    for layer in made:
        os.rename(layer.path, blobs / layer.digest.partition(":")[2])
    raw.rmdir()
    a, b = made[:5], made[:4] + made[5:]
    index = {
        "schemaVersion": 2,
        "manifests": [
            {**_manifest(blobs, a), "annotations": {"org.opencontainers.image.ref.name": "a"}},
            {**_manifest(blobs, b), "annotations": {"org.opencontainers.image.ref.name": "b"}},
        ],
    }
    (root / "index.json").write_text(json.dumps(index))
    (root / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    return a, made[5]


# -- one pull, in a child process ------------------------------------------------------------


def _profiled_threads(out: list[cProfile.Profile]) -> None:
    """Profile every layer fetch in its own thread (cProfile sees one thread)."""
    inner = ocipull._fetch_layer

    def fetch_layer(*args: Any, **kwargs: Any) -> Any:
        prof = cProfile.Profile()
        out.append(prof)
        return prof.runcall(inner, *args, **kwargs)

    ocipull._fetch_layer = fetch_layer


def _cpu(who: int) -> float:
    usage = resource.getrusage(who)
    return usage.ru_utime + usage.ru_stime


def child_pull(
    repo_path: str, reference: str, tag: str, pool: int, parallel: int, profile: str | None
) -> None:
    """Pull ``reference`` into the repository; prints a JSON report."""
    repo = Repository.open(repo_path)
    marks: dict[str, float] = {}

    def progress(event: Progress) -> None:
        marks.setdefault(event.phase, time.perf_counter())

    profiles: list[cProfile.Profile] = []
    main_prof = cProfile.Profile() if profile else None
    if profile:
        _profiled_threads(profiles)
    start = time.perf_counter()
    if main_prof is not None:
        main_prof.enable()
    with ImageProxyPool(reference, ProxyOptions(tls_verify=False), creds=None, size=pool) as src:
        opened = time.perf_counter()
        result = ocipull.pull(repo, src, tag=tag, progress=progress, parallel=parallel or None)
    end = time.perf_counter()
    if main_prof is not None:
        main_prof.disable()
        stats = pstats.Stats(main_prof)
        for prof in profiles:
            stats.add(prof)
        stats.dump_stats(profile)  # type: ignore[arg-type]
    report = {
        "seconds": end - start,
        "open": opened - start,
        "fetch": marks.get("image", end) - opened,
        "image": end - marks.get("image", end),
        "rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "cpu": _cpu(resource.RUSAGE_SELF),
        "cpu_skopeo": _cpu(resource.RUSAGE_CHILDREN),
        "skipped": sum(layer.skipped for layer in result.layers),
    }
    print(json.dumps(report))


def run_child(
    repo: Path, reference: str, tag: str, args: argparse.Namespace, profile: Path | None = None
) -> Any:
    argv = [sys.executable, __file__, "--child", str(repo), reference, tag]
    argv += [str(args.pool), str(args.parallel)]
    if profile is not None:
        argv.append(str(profile))
    done = subprocess.run(argv, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"the pull of {reference} failed: {done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# -- the benchmark ---------------------------------------------------------------------------


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        path, ref, tag, pool, parallel, *profile = sys.argv[2:]
        child_pull(path, ref, tag, int(pool), int(parallel), profile[0] if profile else None)
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mib", type=int, default=500, help="image A's compressed MB")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--dir", type=Path, default=Path("/dev/shm"))
    parser.add_argument("--pool", type=int, default=4, help="skopeo proxies per pull")
    parser.add_argument(
        "--parallel", type=int, default=0, help="layers at once (default: pull's own)"
    )
    parser.add_argument("--profile", type=Path, help="profile one more pull of A into FILE")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        work = Path(tmp)
        layout = work / "layout"
        t0 = time.perf_counter()
        a_layers, b_top = make_layout(layout, args.mib)
        made = time.perf_counter() - t0
        compressed = sum(layer.size for layer in a_layers)
        tar_bytes = sum(layer.tar_size for layer in a_layers)
        files = sum(layer.files for layer in a_layers)
        share = b_top.size / compressed
        print(
            f"image A: {len(a_layers)} gzip layers, {compressed / 1e6:.0f} MB compressed, "
            f"{tar_bytes / 1e6:.0f} MB of tar, {files} entries (made in {made:.0f} s); "
            f"B: A's 4 lower layers + its own {b_top.size / 1e6:.0f} MB "
            f"({share:.1%} of A's bytes); on {args.dir}"
        )
        copies, firsts, agains, shareds = [], [], [], []
        with running_registry(work / "registry") as reg:
            ref_a = reg.push(f"oci:{layout}:a", "bench", "a")
            ref_b = reg.push(f"oci:{layout}:b", "bench", "b")
            dest, repo = work / "copy", work / "repo"
            for _ in range(args.rounds):
                shutil.rmtree(dest, ignore_errors=True)
                start = time.perf_counter()
                copy(ref_a, f"oci:{dest}:a", "--src-tls-verify=false")
                copies.append(time.perf_counter() - start)
                shutil.rmtree(dest)
                shutil.rmtree(repo, ignore_errors=True)
                Repository.init(repo, algorithm="fsverity-sha256-12", verity="disabled")
                firsts.append(run_child(repo, ref_a, "a", args))
                agains.append(run_child(repo, ref_a, "a", args))
                shareds.append(run_child(repo, ref_b, "b", args))
            if args.profile is not None:
                shutil.rmtree(repo)
                Repository.init(repo, algorithm="fsverity-sha256-12", verity="disabled")
                run_child(repo, ref_a, "a", args, args.profile)
    t_copy = min(copies)
    first = min(firsts, key=lambda r: r["seconds"])
    again = min(agains, key=lambda r: r["seconds"])
    shared = min(shareds, key=lambda r: r["seconds"])
    t_first, t_again, t_shared = first["seconds"], again["seconds"], shared["seconds"]
    rss = max(r["rss_mib"] for r in firsts + agains + shareds)
    mb = compressed / 1e6

    def verdict(ok: bool) -> str:
        return "met" if ok else "NOT met"

    print(f"skopeo copy docker:// oci:DIR  {t_copy:8.2f} s  {mb / t_copy:6.0f} MB/s")
    print(
        f"pull A (fresh repository)      {t_first:8.2f} s  {mb / t_first:6.0f} MB/s"
        f"  [proxy {first['open']:.2f} s, fetch {first['fetch']:.2f} s, "
        f"image {first['image']:.2f} s; CPU {first['cpu']:.1f} s, "
        f"its skopeo proxies' {first['cpu_skopeo']:.1f} s]"
    )
    print(f"pull A again                   {t_again:8.2f} s  ({again['skipped']} layers present)")
    print(
        f"pull B (4 of 5 layers present) {t_shared:8.2f} s  ({shared['skipped']} layers present)"
        f"  [fetch {shared['fetch']:.2f} s, image {shared['image']:.2f} s]"
    )
    print(f"ratio pull / skopeo copy       {t_first / t_copy:8.2f}  (goal <= 1.2: "
          f"{verdict(t_first / t_copy <= 1.2)})")  # fmt: skip
    print(f"ratio re-pull / pull           {t_again / t_first:8.3f}  (goal <= 0.1: "
          f"{verdict(t_again / t_first <= 0.1)})")  # fmt: skip
    print(
        f"ratio pull B / pull A          {t_shared / t_first:8.3f}  "
        f"(new layer's share {share:.3f}: {t_shared / t_first / share:.2f}x proportional)"
    )
    print(f"peak RSS of a pulling process  {rss:8.0f} MiB  (goal < 300: {verdict(rss < 300)})")
    if args.profile is not None:
        pstats.Stats(str(args.profile)).sort_stats("tottime").print_stats(25)


if __name__ == "__main__":
    main()
