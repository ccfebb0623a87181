"""Everything that talks to the kernel below the system-call wrappers of the
standard library: ioctls, ctypes and raw syscalls, and the composefs mounts built
on them.

This package is the only place in composefsd that uses ctypes, ``fcntl.ioctl`` or
raw syscalls. Its leaf modules import nothing else of composefsd, so that every
layer may call them:

* :mod:`~composefsd.kernel.verity`: the fs-verity ioctls, the hash algorithms as
  the kernel numbers them, and the errors the kernel answers with;
* :mod:`~composefsd.kernel.files`: FICLONE and pipe sizes;
* :mod:`~composefsd.kernel.syscalls`: the new mount API, umount2, unshare, ioctls
  through ctypes; :mod:`~composefsd.kernel.loop` (loop devices),
  :mod:`~composefsd.kernel.userns` (user namespaces for idmapped mounts),
  :mod:`~composefsd.kernel.memory` (the C library's heap) and
  :mod:`~composefsd.kernel.mountinfo` (the active composefs mounts).

Above the repository layer, :mod:`~composefsd.kernel.mount` mounts images and
:mod:`~composefsd.kernel.repomount` mounts a repository's images. This file imports
none of them up front, so that importing a leaf does not load the mount stack; the
names the daemon and composefsctl use are still reachable here, loaded from their
defining module on first use.
"""

from __future__ import annotations

import importlib

# name -> the module (in this package) that defines it
_EXPORTS = {
    "ComposefsMount": "mountinfo",
    "DetachedMount": "mount",
    "IdMapping": "userns",
    "ImageVerityError": "mount",
    "KernelError": "syscalls",
    "LayerMode": "mount",
    "MountError": "mount",
    "MountOptions": "mount",
    "attach": "mount",
    "create_userns": "userns",
    "list_mounts": "mount",
    "mount_image": "mount",
    "parse_mapping": "userns",
    "probe_layer_mode": "mount",
    "unmount": "mount",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str) -> object:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value: object = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value
