"""Read-only loop devices for kernels that cannot mount EROFS from a regular file.

File-backed EROFS arrived in 6.12; before that (and on kernels built without
``CONFIG_EROFS_FS_BACKED_BY_FILE``) the image has to be a block device. The
device is configured with ``LO_FLAGS_AUTOCLEAR``, so it goes away by itself once
the EROFS mount on it and our fd are both gone: nothing needs tearing down.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
from typing import Final

from composefsd.kernel.syscalls import KernelError, ioctl_int, ioctl_ptr

__all__ = ["attach_loop"]

_log = logging.getLogger(__name__)

LOOP_CONFIGURE: Final = 0x4C0A
LOOP_CTL_GET_FREE: Final = 0x4C82
LO_FLAGS_READ_ONLY: Final = 1
LO_FLAGS_AUTOCLEAR: Final = 4
LO_FLAGS_DIRECT_IO: Final = 16
_NAME_SIZE: Final = 64
# Another process may take the free device between GET_FREE and CONFIGURE.
_ATTEMPTS: Final = 16


class _LoopInfo64(ctypes.Structure):
    _fields_ = [
        ("lo_device", ctypes.c_uint64),
        ("lo_inode", ctypes.c_uint64),
        ("lo_rdevice", ctypes.c_uint64),
        ("lo_offset", ctypes.c_uint64),
        ("lo_sizelimit", ctypes.c_uint64),
        ("lo_number", ctypes.c_uint32),
        ("lo_encrypt_type", ctypes.c_uint32),
        ("lo_encrypt_key_size", ctypes.c_uint32),
        ("lo_flags", ctypes.c_uint32),
        ("lo_file_name", ctypes.c_char * _NAME_SIZE),
        ("lo_crypt_name", ctypes.c_char * _NAME_SIZE),
        ("lo_encrypt_key", ctypes.c_char * 32),
        ("lo_init", ctypes.c_uint64 * 2),
    ]


class _LoopConfig(ctypes.Structure):
    _fields_ = [
        ("fd", ctypes.c_uint32),
        ("block_size", ctypes.c_uint32),
        ("info", _LoopInfo64),
        ("reserved", ctypes.c_uint64 * 8),
    ]


def attach_loop(image_fd: int, name: str = "") -> int:
    """A read-only, auto-clearing loop device over ``image_fd``; returns its open fd.

    ``name`` is recorded as the backing file name (what ``losetup`` shows).
    """
    config = _LoopConfig()
    config.fd = image_fd
    config.block_size = 4096
    config.info.lo_flags = LO_FLAGS_READ_ONLY | LO_FLAGS_AUTOCLEAR | LO_FLAGS_DIRECT_IO
    config.info.lo_file_name = os.fsencode(name)[: _NAME_SIZE - 1]
    ctl = os.open("/dev/loop-control", os.O_RDWR | os.O_CLOEXEC)
    try:
        for _ in range(_ATTEMPTS):
            number = ioctl_int(ctl, LOOP_CTL_GET_FREE, 0, "ioctl(LOOP_CTL_GET_FREE)")
            path = f"/dev/loop{number}"
            try:
                loop_fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
            except FileNotFoundError:
                # udev has not created the node yet; devtmpfs normally has it.
                continue
            try:
                ioctl_ptr(loop_fd, LOOP_CONFIGURE, config, f"ioctl({path}, LOOP_CONFIGURE)")
            except KernelError as e:
                os.close(loop_fd)
                if e.errno == errno.EBUSY:
                    continue
                if e.errno == errno.EINVAL and config.info.lo_flags & LO_FLAGS_DIRECT_IO:
                    # Direct I/O needs the backing filesystem's support (tmpfs lacks it).
                    config.info.lo_flags &= ~LO_FLAGS_DIRECT_IO
                    continue
                raise
            _log.debug("image fd %d is on %s", image_fd, path)
            return loop_fd
    finally:
        os.close(ctl)
    raise KernelError(errno.EBUSY, "loop device setup (every free device was taken)")
