#!/usr/bin/env bash
# Boot tests: composefsd's systemd units and boot mounts in real systemd boots
# (tests/boot/run_boots.py; its --help says what each boot checks). Each boot is
# a throw-away QEMU VM whose PID 1 is this machine's systemd 252, made by
# ../shared/tools/systemd-vm: four boots, about two minutes of VM time.
#
# usage: tests/vm/boot.sh [--only happy|optional|required|baseline ...] [--keep]
# ./run-tests runs it after the main suite (COMPOSEFSD_VM_SUITES=0 leaves it out).
set -euo pipefail
cd "$(dirname "$0")/../.."

sdvm=$(realpath -m "${SYSTEMD_VM:-$(tests/shared-dir)/tools/systemd-vm}")
if [ ! -x "$sdvm" ]; then
    echo "boot.sh: $sdvm not found (set SYSTEMD_VM)" >&2
    exit 1
fi

# What systemd-vm needs on the host (it sets up the guest kernel itself).
need=()
for p in qemu-system-x86 busybox-static kmod; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'ok installed' || need+=("$p")
done
if [ ${#need[@]} -gt 0 ]; then
    if [ "$(id -u)" != 0 ]; then
        echo "boot.sh: missing ${need[*]} (as root: apt-get install ${need[*]})" >&2
        exit 1
    fi
    apt-get update -q >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${need[@]}" >/dev/null
fi

# No varlinkctl: boot mounts and the checks use the package's composefsctl,
# as on Debian 12, whose systemd (252) has none.

# The package, installed in .venv by run-tests; its composefsd runs in the guest.
python=.venv/bin/python
[ -x "$python" ] || python=$(command -v python3)
exec "$python" tests/boot/run_boots.py --systemd-vm "$sdvm" "$@"
