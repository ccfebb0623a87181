#!/bin/sh
# manifest.sh DIR: what a tree holds, one line per entry, the same on the host
# (the source of an image) and in the VM (the mounted image), so that the two
# can be compared with diff: type, path, mode, owner, size, mtime and symlink
# target of every entry (directories without a size, which differs between file
# systems), then the sha256 of every regular file. No link counts: images are
# made without --preserve-hardlinks, so a hard link becomes a copy.
# POSIX sh and GNU findutils/coreutils only: no Python in the guest.
set -eu
cd "$1"
export LC_ALL=C
{
    find . -type d -printf 'd %p %m %U:%G - %T@\n'
    find . ! -type d -printf '%y %p %m %U:%G %s %T@ %l\n'
} | sort
find . -type f -print0 | sort -z | xargs -0 -r sha256sum
