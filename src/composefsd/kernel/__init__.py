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
none of them, so that importing a leaf does not load the mount stack: import names
from the module that defines them.
"""
