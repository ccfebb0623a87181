"""Everything that talks to the kernel through ctypes: the new mount API, loop
devices, user namespaces, and the composefs mount logic built on them.

This package is the only place in composefsd that uses ctypes or raw syscalls
(:mod:`~composefsd.kernel.syscalls`, :mod:`~composefsd.kernel.loop`,
:mod:`~composefsd.kernel.userns`, and :mod:`~composefsd.kernel.memory` for the C
library's heap). :mod:`~composefsd.kernel.mount` mounts images;
:mod:`~composefsd.kernel.mountinfo` finds the active composefs mounts.
"""

from composefsd.kernel.mount import (
    DetachedMount,
    ImageVerityError,
    LayerMode,
    MountError,
    MountOptions,
    attach,
    list_mounts,
    mount_image,
    probe_layer_mode,
    unmount,
)
from composefsd.kernel.mountinfo import ComposefsMount
from composefsd.kernel.syscalls import KernelError
from composefsd.kernel.userns import IdMapping, create_userns, parse_mapping

__all__ = [
    "ComposefsMount",
    "DetachedMount",
    "IdMapping",
    "ImageVerityError",
    "KernelError",
    "LayerMode",
    "MountError",
    "MountOptions",
    "attach",
    "create_userns",
    "list_mounts",
    "mount_image",
    "parse_mapping",
    "probe_layer_mode",
    "unmount",
]
