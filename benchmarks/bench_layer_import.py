#!/usr/bin/env python3
"""Importing an OCI layer tar (composefsd.repository.ocilayer.import_layer) against
``tar -x`` of the same tar, both into a tmpfs.

    python benchmarks/bench_layer_import.py [--files 4000] [--mib 200] [--rounds 3] [--dir DIR]

Builds one synthetic layer tar: ``--files`` regular files (one in four of at
most 64 bytes, kept inline in the splitstream; the others 65 B .. 1 MiB, scaled
so that the tar holds about ``--mib`` MiB), in directories of 100. Each round
imports it into a fresh repository (verity disabled: tmpfs has no fs-verity; the
digests are computed in userspace as on this project's insecure repositories)
and, in the same run, extracts it with ``tar -x`` into a fresh directory. Reported:
best of ``--rounds`` for each, MB/s of tar, and the ratio import / tar -x.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import random
import shutil
import subprocess
import tarfile
import tempfile
from pathlib import Path

from _common import best_of
from composefsd.repository import Repository
from composefsd.repository.ocilayer import import_layer


def make_tar(files: int, mib: int) -> bytes:
    rng = random.Random(14)
    sizes = [rng.randint(1, 64) if i % 4 == 0 else rng.randint(65, 1 << 20) for i in range(files)]
    scale = (mib << 20) / max(1, sum(s for s in sizes if s > 64))
    sizes = [s if s <= 64 else max(65, int(s * scale)) for s in sizes]
    pool = rng.randbytes(1 << 20)
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for i, size in enumerate(sizes):
            if i % 100 == 0:
                info = tarfile.TarInfo(f"d{i // 100:04d}")
                info.type = tarfile.DIRTYPE
                info.mode = 0o755
                tar.addfile(info)
            info = tarfile.TarInfo(f"d{i // 100:04d}/f{i:06d}")
            info.size = size
            # Distinct contents: a counter in front of a slice of the pool.
            data = (i.to_bytes(8, "big") + (pool * (size // len(pool) + 1)))[:size]
            tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--files", type=int, default=4000)
    parser.add_argument("--mib", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--dir", type=Path, default=Path("/dev/shm"))
    args = parser.parse_args()

    data = make_tar(args.files, args.mib)
    diff_id = "sha256:" + hashlib.sha256(data).hexdigest()
    work = Path(tempfile.mkdtemp(prefix="bench-layer-", dir=args.dir))
    try:
        tar_path = work / "layer.tar"
        tar_path.write_bytes(data)
        n = 0

        def do_import() -> None:
            nonlocal n
            n += 1
            repo = Repository.init(work / f"repo{n}", verity="disabled")
            with open(tar_path, "rb") as fh:
                import_layer(repo, fh, diff_id)
            shutil.rmtree(work / f"repo{n}")

        def do_tar() -> None:
            nonlocal n
            n += 1
            dest = work / f"x{n}"
            dest.mkdir()
            subprocess.run(["tar", "-x", "-f", str(tar_path), "-C", str(dest)], check=True)
            shutil.rmtree(dest)

        t_import = best_of(args.rounds, do_import)
        t_tar = best_of(args.rounds, do_tar)
        mb = len(data) / 1e6
        print(f"layer tar: {mb:.1f} MB, {args.files} files, on {args.dir}")
        print(f"import_layer: {t_import:.3f} s ({mb / t_import:.0f} MB/s)")
        print(f"tar -x:       {t_tar:.3f} s ({mb / t_tar:.0f} MB/s)")
        print(f"ratio import / tar -x: {t_import / t_tar:.2f}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
