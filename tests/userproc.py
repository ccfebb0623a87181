"""Running this project's Python code as a throw-away test user (tests/users.py).

The interpreter pytest runs in may live where such a user cannot go (a
virtualenv pointing into /root, mode 0700), so the user's processes run the
system's ``/usr/bin/python3`` with ``src/`` and the ``varlink`` package on
``PYTHONPATH``; :func:`python_env` makes that environment (the ``varlink``
package through a symlink in a public directory, nothing else of the
virtualenv). Fake servers and other helpers run there with the standard library
only.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import varlink

REPO = Path(__file__).resolve().parent.parent
#: The interpreter test users run.
PYTHON = "/usr/bin/python3"


def python_env(public: Path) -> dict[str, str]:
    """The environment for :data:`PYTHON` run as a test user: ``src/`` and the
    ``varlink`` package (linked into ``public``, a directory they may enter) on
    ``PYTHONPATH``; no XDG_RUNTIME_DIR, no LISTEN_*/NOTIFY_SOCKET of ours."""
    assert os.access(PYTHON, os.X_OK), f"{PYTHON} is missing"
    assert sys.version_info[:2] >= (3, 11)
    lib = public / "pylib"
    lib.mkdir(exist_ok=True)
    lib.chmod(0o755)
    link = lib / "varlink"
    if not link.is_symlink():
        link.symlink_to(Path(varlink.__file__).resolve().parent)
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("LISTEN_", "NOTIFY_", "XDG_", "COMPOSEFSD_", "PYTHON"))
    }
    env.pop("JOURNAL_STREAM", None)
    env["PYTHONPATH"] = f"{REPO / 'src'}:{lib}"
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    return env
