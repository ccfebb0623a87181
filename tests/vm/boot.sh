#!/usr/bin/env bash
# Boot tests: composefsd's systemd units and boot mounts in real systemd boots
# (tests/boot/run_boots.py; its --help says what each boot checks). Each boot is
# a throw-away QEMU VM whose PID 1 is this machine's systemd 252, made by
# ../shared/tools/systemd-vm (on a trixie-backports kernel, below): four
# boots, about two minutes of VM time.
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

# The guest kernel: MountDumpfile (checked in the happy boot) needs overlay
# layers by fd from detached mounts (6.15+), and systemd-vm's default, trixie's
# 6.12, has not. So, unless SDVM_KROOT names one, a trixie-backports kernel,
# downloaded once (never installed: extracted under the cache, as verity-vm
# does with trixie's) from the mirror the host's apt uses.
if [ -z "${SDVM_KROOT:-}" ]; then
    cache=${COMPOSEFSD_BOOT_CACHE:-$HOME/.cache/composefsd-boot-kernel}
    if ! compgen -G "$cache/kroot/boot/vmlinuz-*" >/dev/null; then
        mkdir -p "$cache/apt/lists/partial" "$cache/apt/cache/archives/partial" "$cache/debs"
        apt_priv=(-o "Dir::Etc::sourcelist=$cache/apt/sources.list" -o Dir::Etc::sourceparts=/dev/null
            -o "Dir::State::Lists=$cache/apt/lists" -o "Dir::Cache=$cache/apt/cache")
        mirror=$(apt-get indextargets --format '$(REPO_URI) $(RELEASE)' |
            awk '$2 !~ /-(security|updates|backports)$/ {print $1; exit}')
        echo "deb ${mirror%/} trixie-backports main" >"$cache/apt/sources.list"
        apt-get "${apt_priv[@]}" update -qq
        # The newest that ships its kernel and modules itself (later ones split
        # them into linux-binary-* and linux-modules-* packages).
        pkg=
        for cand in $(apt-cache "${apt_priv[@]}" pkgnames linux-image- |
            grep -E '^linux-image-[0-9]+\.[0-9]+\.[0-9]+\+deb13-amd64$' | sort -rV); do
            size=$(apt-cache "${apt_priv[@]}" show "$cand" | sed -n 's/^Size: //p' | head -1)
            if [ "${size:-0}" -gt 50000000 ]; then
                pkg=$cand
                break
            fi
        done
        [ -n "$pkg" ] || { echo "boot.sh: no kernel package found in trixie-backports" >&2; exit 1; }
        echo "boot.sh: downloading $pkg (trixie-backports) for the guest" >&2
        (cd "$cache/debs" && apt-get "${apt_priv[@]}" download "$pkg" 2>&1 | grep -v unsandboxed >&2 || true)
        rm -rf "$cache/kroot.tmp"
        dpkg -x "$(ls -t "$cache/debs/${pkg}"_*.deb | head -1)" "$cache/kroot.tmp"
        kver=$(ls "$cache/kroot.tmp/usr/lib/modules")
        depmod -a -b "$cache/kroot.tmp/usr" "$kver"
        mv "$cache/kroot.tmp" "$cache/kroot"
    fi
    export SDVM_KROOT=$cache/kroot
fi

# No varlinkctl: boot mounts and the checks use the package's composefsctl,
# as on Debian 12, whose systemd (252) has none.

# The package, installed in .venv by run-tests; its composefsd runs in the guest.
python=.venv/bin/python
[ -x "$python" ] || python=$(command -v python3)
exec "$python" tests/boot/run_boots.py --systemd-vm "$sdvm" "$@"
