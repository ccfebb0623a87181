#!/usr/bin/env bash
# The fs-verity suite, tests/test_verity.py (issue 6), on a kernel that has fs-verity.
#
# If this machine's kernel can enable fs-verity (on $VERITY_SCRATCH, else the
# temporary directory or /var/tmp) and we are root, the module runs here. Otherwise
# it runs inside ../shared/tools/verity-vm: a throw-away VM booting Debian's 6.12
# kernel (fs-verity, erofs, overlayfs verity=) that shares this filesystem and
# provides $VERITY_SCRATCH, an ext4 made with -O verity. The first use downloads
# the kernel from the Debian mirror (verity-vm --setup).
#
# Extra arguments go to pytest (tests/vm/verity.sh -k service). Inside, the module
# fails instead of skipping when fs-verity is missing (COMPOSEFSD_REQUIRE_VERITY=1).
# Outside CI, a machine that can run neither gets a warning and exit 0; in CI
# (CI=true) that is a failure. Called by ./run-tests after the main suite.
set -euo pipefail
cd "$(dirname "$0")/../.."

say() { echo "verity.sh: $*" >&2; }
in_ci() { [ "${CI:-}" = true ] || [ "${CI:-}" = 1 ]; }
cannot_run() {
    if in_ci; then
        say "FAILED: $* (CI must run the fs-verity suite)"
        exit 1
    fi
    say "not run: $*"
    exit 0
}

py=.venv/bin/python
[ -x "$py" ] || { say "no $py: run ./run-tests once to create the virtualenv"; exit 1; }

if [ -z "${COMPOSEFS_REFERENCE_BIN:-}" ]; then
    COMPOSEFS_REFERENCE_BIN=$("$(tests/shared-dir)/tools/reference-tools" | tail -n 1)
fi
export COMPOSEFS_REFERENCE_BIN
export COMPOSEFSD_REQUIRE_VERITY=1
# The VM sees the project through a copy-on-write overlay: no cache worth keeping.
pytest=("$py" -m pytest -p no:cacheprovider -ra tests/test_verity.py "$@")

# Can this kernel do it? The same probe as the module's.
if [ "$(id -u)" = 0 ] && "$py" - <<'EOF'
import os, sys, tempfile
from composefsd.kernel.verity import VerityError, enable_verity

scratch = os.environ.get("VERITY_SCRATCH")
for directory in [scratch] if scratch else [tempfile.gettempdir(), "/var/tmp"]:
    fd, path = tempfile.mkstemp(prefix=".verity-probe-", dir=directory)
    try:
        os.write(fd, b"probe")
        os.close(fd)
        fd = os.open(path, os.O_RDONLY)
        try:
            enable_verity(fd)
            sys.exit(0)
        except VerityError:
            pass
        finally:
            os.close(fd)
    finally:
        os.unlink(path)
sys.exit(1)
EOF
then
    say "this kernel ($(uname -r)) has fs-verity: running tests/test_verity.py here"
    exec "${pytest[@]}"
fi

vm=$(tests/shared-dir)/tools/verity-vm
[ -x "$vm" ] || cannot_run "this kernel has no fs-verity and $vm is missing"
"$vm" --setup >&2 || cannot_run "this kernel has no fs-verity and '$vm --setup' failed"

say "this kernel ($(uname -r)) has no fs-verity: running tests/test_verity.py in $vm"
start=$(date +%s.%N)
# Through a pipe: QEMU reopens its stdout by path, which with a plain file as stdout
# would write over what is already there.
set +e
"$vm" "${pytest[@]}" 2>&1 | cat
status=${PIPESTATUS[0]}
set -e
end=$(date +%s.%N)
say "$(awk -v s="$start" -v e="$end" 'BEGIN { printf "VM part took %.1f s (wall clock)", e - s }'), exit status $status"
if [ "$status" = 125 ]; then
    say "the VM itself failed (verity-vm exit 125)"
fi
exit "$status"
