"""A pull through skopeo's proxies in its own process, for the kill and concurrency
tests of test_oci_registry_pull.py:
``python proxypullchild.py REPO REFERENCE TAG [--parallel N]``.

The registry is plain HTTP (tls_verify off). Prints the pool's skopeo pids as one
JSON line on stdout once the pool is open (so a test can find them), then the
result as JSON; logs go to stderr (INFO).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from composefsd.repository import Repository
from composefsd.repository.ocipull import pull
from composefsd.service.imageproxy import ImageProxyPool, ProxyOptions


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("repo")
    parser.add_argument("reference")
    parser.add_argument("tag")
    parser.add_argument("--parallel", type=int, default=1)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    repo = Repository.open(args.repo)
    options = ProxyOptions(tls_verify=False)
    with ImageProxyPool(args.reference, options, creds=None, size=args.parallel) as pool:
        print(json.dumps({"pids": pool.pids}), flush=True)
        result = pull(repo, pool, tag=args.tag, parallel=args.parallel)
    out = {
        "manifest_verity": result.manifest_verity,
        "image_id": result.image_id,
        "layers": {layer.diff_id: layer.skipped for layer in result.layers},
    }
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
