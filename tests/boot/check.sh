#!/bin/bash
# check.sh MODE DATA COMPOSEFSCTL: the check command of a boot test, run by
# systemd-vm inside the guest after multi-user.target (see run_boots.py).
#
#   MODE        baseline | happy | optional
#   DATA        the host's test directory (the guest sees the host's files):
#               DATA/units      the units to show, on one line
#               DATA/expect     "WHERE NAME IMAGE" per mount that must be there, with
#                               DATA/NAME.manifest made on the host from its source
#               DATA/absent     WHERE per mount that must not be there
#   COMPOSEFSCTL  the composefsctl installed with the guest's composefsd, the
#               Varlink client here as in the boot-mount units (no varlinkctl:
#               the guest's systemd is this machine's, Debian 12's 252)
#
# Bash, a few C tools and composefsctl: a Python process costs seconds under
# TCG, so the calls are few. It
# checks what it can cheaply (mounts, content, the Varlink answers) and leaves
# raw data in /sdvm/out/ for run_boots.py to check the rest (unit timestamps,
# the journal, Python processes): exec-trace.txt, units.txt, mountinfo.txt,
# NAME.manifest, ro-tmp.json, info.txt, verify.json, mounts-before.json,
# composefsd-ns-{mnt,net,uts}.txt, systemd.txt, reload.txt, ping.json, pull.json,
# registry.log, polkit-*.json, caller-*.json, own-*.json, restart.txt,
# mounts-after.json, check-times.txt.
set -u
mode=$1 data=$2 ctl=$3
O=/sdvm/out
S=unix:/run/composefs/io.composefs.Repository
I=io.composefs.Repository
here=$(dirname "$0")
fails=0

# A call of METHOD with PARAMETERS through the daemon's socket, one JSON line.
call() {
    "$ctl" --connect "$S" --timeout 0 call --json short "$@"
}

ok() { echo "ok   $*"; }
fail() {
    echo "FAIL $*"
    fails=$((fails + 1))
}
stamp() {
    local up _
    read -r up _ </proc/uptime
    echo "$up $*" >>"$O/check-times.txt"
}

# First, before this script starts anything else: every exec since the kernel
# started (trace_event=sched:sched_process_exec on the kernel command line).
stamp start
cat /sys/kernel/tracing/trace >"$O/exec-trace.txt" 2>&1 || fail "cannot read the exec trace"
[ "$mode" = baseline ] && exit $((fails > 0))

# One systemctl call for every unit and property (each call costs seconds here).
read -r units <"$data/units"
# shellcheck disable=SC2086 # a list of unit names
systemctl show -p Id,LoadState,ActiveState,SubState,Result,UnitFileState,TriggeredBy,WantedBy,RequiredBy,MainPID,InactiveExitTimestampMonotonic,ActiveEnterTimestampMonotonic,ExecMainStartTimestampMonotonic \
    -- $units >"$O/units.txt" 2>&1 || fail "systemctl show $units"
cat /proc/self/mountinfo >"$O/mountinfo.txt"
stamp units

mounted() { # WHERE: is something mounted exactly there (field 5 of mountinfo)?
    local _id _parent _dev _root point _rest
    while read -r _id _parent _dev _root point _rest; do
        [ "$point" = "$1" ] && return 0
    done <"$O/mountinfo.txt"
    return 1
}

while read -r where name _; do
    if ! mounted "$where"; then
        fail "$where is not mounted"
        continue
    fi
    if ! sh "$here/manifest.sh" "$where" >"$O/$name.manifest" 2>&1; then
        fail "cannot list $where"
    elif cmp -s "$data/$name.manifest" "$O/$name.manifest"; then
        ok "$where is mounted and matches the source of $name ($(wc -l <"$O/$name.manifest") manifest lines)"
    else
        fail "$where differs from the source of $name:"
        diff "$data/$name.manifest" "$O/$name.manifest" | head -20
    fi
done <"$data/expect"
if [ -s "$data/absent" ]; then
    while read -r where; do
        if mounted "$where"; then fail "$where is mounted"; else ok "$where is not mounted"; fi
    done <"$data/absent"
fi
stamp content

if [ "$mode" = optional ]; then
    # Boot mounts run before local-fs.target, when /tmp may still be on a
    # read-only root: composefsd must not need it. Mount the first image again,
    # elsewhere, with a read-only /tmp (not through its unit: a failed restart of
    # a required unit would send the guest to emergency mode).
    read -r _ _ image _ <"$data/expect"
    where=/run/ro-tmp-test
    mkdir -p "$where"
    mount --bind /tmp /tmp && mount -o remount,bind,ro /tmp
    if call "$I.Mount" "{\"image\":\"$image\",\"where\":\"$where\"}" >"$O/ro-tmp.json" 2>&1 &&
        [ -e "$where/hello.txt" ]; then
        ok "with a read-only /tmp, composefsd still mounts $image"
    else
        fail "with a read-only /tmp, composefsd cannot mount $image: $(cat "$O/ro-tmp.json")"
    fi
    call "$I.Unmount" "{\"where\":\"$where\"}" >/dev/null 2>&1
    umount /tmp
    stamp ro-tmp
fi
[ "$mode" = happy ] || exit $((fails > 0))

# The socket answers GetInfo.
if "$ctl" --connect "$S" info >"$O/info.txt" 2>&1 && grep -q "$I" "$O/info.txt"; then
    ok "composefsctl info answers ($(grep -m1 -i product "$O/info.txt" | tr -s ' '))"
else
    fail "composefsctl info: $(cat "$O/info.txt")"
fi
read -r _ _ image <"$data/expect"
if call "$I.Verify" "{\"image\":\"$image\"}" >"$O/verify.json" 2>&1 &&
    grep -q '"ok" *: *true' "$O/verify.json"; then
    ok "Verify of $image: ok"
else
    fail "Verify of $image: $(cat "$O/verify.json")"
fi
call "$I.ListMounts" '{}' >"$O/mounts-before.json" 2>&1 || fail "ListMounts: $(cat "$O/mounts-before.json")"
stamp varlink

# The unit's hardening: the host's mount namespace (its mounts are everyone's)
# and network namespace (skopeo pulls from registries), a hostname namespace of
# its own, umask 0077.
pid=$(systemctl show -p MainPID --value composefsd.service)
for ns in mnt net uts; do
    readlink "/proc/$pid/ns/$ns" >"$O/composefsd-ns-$ns.txt" 2>&1
    readlink "/proc/1/ns/$ns" >>"$O/composefsd-ns-$ns.txt" 2>&1
done
if cmp -s <(sed -n 1p "$O/composefsd-ns-mnt.txt") <(sed -n 2p "$O/composefsd-ns-mnt.txt"); then
    ok "composefsd (pid $pid) runs in the host's mount namespace"
else
    fail "composefsd (pid $pid) has a mount namespace of its own: $(tr '\n' ' ' <"$O/composefsd-ns-mnt.txt")"
fi
if [ "$(sort -u "$O/composefsd-ns-net.txt" | wc -l)" = 1 ]; then
    ok "composefsd runs in the host's network namespace (for skopeo's pulls)"
else
    fail "composefsd has a network namespace of its own: $(tr '\n' ' ' <"$O/composefsd-ns-net.txt")"
fi
if [ "$(sort -u "$O/composefsd-ns-uts.txt" | wc -l)" = 2 ]; then
    ok "composefsd has a uts namespace of its own"
else
    fail "composefsd shares the host's uts namespace: $(tr '\n' ' ' <"$O/composefsd-ns-uts.txt")"
fi
umask_line=$(grep '^Umask:' "/proc/$pid/status")
if [ "$umask_line" = "Umask:	0077" ]; then ok "composefsd runs with umask 0077"; else fail "composefsd: $umask_line"; fi
stamp hardening

# systemd integration: the watchdog is on, io.systemd.service answers,
# "systemctl reload" goes through Reload (the daemon keeps its pid), and the
# socket unit registered the interfaces in /run/varlink/registry.
systemctl show -p WatchdogUSec,WatchdogTimestampMonotonic,StatusText,MainPID composefsd.service >"$O/systemd.txt" 2>&1
if grep -q '^WatchdogUSec=3min$' "$O/systemd.txt" && ! grep -q '^WatchdogTimestampMonotonic=0$' "$O/systemd.txt"; then
    ok "the watchdog is on (3min) and composefsd has sent keep-alives"
else
    fail "watchdog: $(tr '\n' ' ' <"$O/systemd.txt")"
fi
if grep -q '^StatusText=serving ' "$O/systemd.txt"; then
    ok "STATUS: $(grep '^StatusText=' "$O/systemd.txt" | cut -d= -f2-)"
else
    fail "no STATUS= line: $(tr '\n' ' ' <"$O/systemd.txt")"
fi
if call io.systemd.service.Ping '{}' >"$O/ping.json" 2>&1; then
    ok "composefsctl call io.systemd.service.Ping: $(tr -d '\n' <"$O/ping.json")"
else
    fail "io.systemd.service.Ping: $(cat "$O/ping.json")"
fi
mkdir -p /etc/composefs
printf 'log-level = debug\n' >/etc/composefs/composefsd.conf
if systemctl reload composefsd.service >"$O/reload.txt" 2>&1 &&
    [ "$(systemctl show -p MainPID --value composefsd.service)" = "$pid" ] &&
    [ "$(systemctl show -p ActiveState --value composefsd.service)" = active ]; then
    ok "systemctl reload composefsd.service (same pid $pid, active)"
else
    fail "systemctl reload composefsd.service: $(cat "$O/reload.txt")"
fi
printf 'log-level = loud\n' >/etc/composefs/composefsd.conf
if systemctl reload composefsd.service >>"$O/reload.txt" 2>&1; then
    fail "systemctl reload with a bad composefsd.conf succeeded"
else
    ok "systemctl reload with a bad composefsd.conf fails (the daemon stays: $(systemctl show -p ActiveState --value composefsd.service))"
fi
rm -f /etc/composefs/composefsd.conf
for name in io.composefs.Repository io.composefs.Oci org.composefs.Repository org.composefs.Oci; do
    if [ "$(readlink "/run/varlink/registry/$name")" = /run/composefs/io.composefs.Repository ]; then
        ok "/run/varlink/registry/$name links to the socket"
    else
        fail "/run/varlink/registry/$name: $(ls -l /run/varlink/registry 2>&1 | tr '\n' ' ')"
    fi
done
if [ -e /run/varlink/registry/io.systemd.service ] || [ -e /run/varlink/registry/org.varlink.service ]; then
    fail "io.systemd.service or org.varlink.service is registered"
fi
stamp systemd

# OCI Pull from a registry (docker://) under the unit: skopeo, composefsd's
# child, reaches the registry on 127.0.0.1 (a network namespace of the
# service's own would have a loopback of its own, with nothing listening).
docker-registry serve "$data/registry.yml" >"$O/registry.log" 2>&1 &
reg_pid=$!
for _ in $(seq 100); do
    (exec 3<>/dev/tcp/127.0.0.1/47123) 2>/dev/null && break
    sleep 0.2
done
if call io.composefs.Oci.Pull \
    '{"reference":"docker://127.0.0.1:47123/test/pulled:v1","tlsVerify":false,"tag":"pulled"}' \
    >"$O/pull.json" 2>&1 && grep -q '"imageId"' "$O/pull.json"; then
    ok "OCI Pull from a registry on 127.0.0.1 works under the unit"
else
    fail "OCI Pull from a registry under the unit: $(cat "$O/pull.json") $(cat "$O/registry.log")"
fi
kill "$reg_pid" 2>/dev/null
stamp pull

# polkit under the unit: uid 4712 (in no group of composefsd's) may tag, by a
# polkit rule (run_boots.py puts it in /etc/polkit-1/rules.d): composefsd asks
# polkitd over the system bus, which it reaches under the unit's settings.
# Removing an image is not in the rule: polkit refuses it.
as_plain() { # METHOD PARAMETERS
    setpriv --reuid=4712 --regid=4712 --clear-groups \
        /usr/bin/python3 "$here/varlink_call.py" /run/composefs/io.composefs.Repository "$1" "$2"
}
as_plain io.composefs.Oci.Tag '{"image":"pulled","tag":"polkit-tag"}' >"$O/polkit-tag.json" 2>&1
if grep -q '^{' "$O/polkit-tag.json" && ! grep -q '"error"' "$O/polkit-tag.json"; then
    ok "uid 4712's Tag, allowed by a polkit rule, works under the unit"
else
    fail "uid 4712's Tag through polkit: $(cat "$O/polkit-tag.json")"
fi
as_plain "$I.RemoveImage" '{"image":"nope/polkit"}' >"$O/polkit-remove.json" 2>&1
if grep -q '"error": *"org.varlink.service.PermissionDenied"' "$O/polkit-remove.json"; then
    ok "uid 4712's RemoveImage, which no polkit rule allows, is refused"
else
    fail "uid 4712's RemoveImage: $(cat "$O/polkit-remove.json")"
fi
stamp polkit

# A caller other than root (uid 4711, in composefsd --group cfsboot, which may
# use the socket) gets, under the unit's system call filter, exactly the files
# it could open itself: a root-only file of its tree refuses the CreateImage.
tree=/run/caller-tree
mkdir -p "$tree/sub"
printf 'mine\n' >"$tree/mine"
head -c 20000 /dev/zero | tr '\0' c >"$tree/sub/data"
chown -R 4711:4711 "$tree"
printf 'root only\n' >"$tree/sub/secret"
chmod 600 "$tree/sub/secret"
as_caller() {
    setpriv --reuid=4711 --regid=4711 --clear-groups \
        /usr/bin/python3 "$here/varlink_call.py" /run/composefs/io.composefs.Repository \
        "$I.CreateImage" "{\"sourcePath\":\"$tree\"}"
}
as_caller >"$O/caller-denied.json" 2>&1
if grep -q "\"error\": *\"$I.SourceError\"" "$O/caller-denied.json" &&
    grep -q "cannot read $tree/sub/secret: Permission denied" "$O/caller-denied.json"; then
    ok "uid 4711's CreateImage cannot read the root-only $tree/sub/secret"
else
    fail "uid 4711's CreateImage of a tree with a root-only file: $(cat "$O/caller-denied.json")"
fi
rm "$tree/sub/secret"
as_caller >"$O/caller-image.json" 2>&1
if grep -q '"digest"' "$O/caller-image.json"; then
    ok "uid 4711's CreateImage of its own tree works under the unit"
else
    fail "uid 4711's CreateImage of its own tree: $(cat "$O/caller-image.json")"
fi
stamp caller

# MountDumpfile under the unit's system call filter, capabilities and namespace
# restrictions (setgroups, setfsuid, capset; setns into a caller's mount
# namespace: CAP_SYS_CHROOT, RestrictNamespaces=mnt). tests/ownmount_client.py
# (standard library) calls with the fds and attaches the returned mount in
# unshare -Urm, then reads each file: the caller's own object, root's 0600 one
# and uid 4712's 0600 one. Once as uid 4712 (in no group of composefsd's: the
# method is open to anyone who can connect) from composefsd's mount namespace,
# once as root with no capability but CAP_SETFCAP (which its unshare -Urm needs
# to map uid 0) from a mount namespace of its own (unshare -m, as a hardened
# root service with ProtectSystem=: the overlay is created in that namespace,
# and still without root's DAC overrides). composefsd names a
# caller's namespace with PIDFD_GET_MNT_NAMESPACE, which needs ptrace access:
# root with all capabilities, more than the unit leaves composefsd, cannot be
# named without CAP_SYS_PTRACE, so its files of another namespace are refused
# (EINVAL: overlayfs takes no layer of another namespace), the third call.
own=/run/own
mkdir -p "$own/objects/o" "$own/mnt-user" "$own/mnt-root"
printf 'own image file\n' >"$own/objects/o/mine"
printf 'root secret\n' >"$own/objects/o/secret"
printf 'user secret\n' >"$own/objects/o/theirs"
printf '%s\n' '/ 0 40755 2 0 0 0 0.0 - - -' \
    '/mine 15 100644 1 0 0 0 0.0 o/mine - -' \
    '/secret 12 100644 1 0 0 0 0.0 o/secret - -' \
    '/theirs 12 100644 1 0 0 0 0.0 o/theirs - -' >"$own/own.dump"
chown -R 4712:4712 "$own/objects" "$own/own.dump" "$own/mnt-user"
chown 0:0 "$own/objects/o/secret"
chmod 600 "$own/objects/o/secret" "$own/objects/o/theirs"
own_spec() { # WHERE
    echo "{\"dumpfile\":\"$own/own.dump\",\"objects\":[\"$own/objects\"],\"files\":[\"mine\",\"secret\",\"theirs\"],\"where\":\"$1\"}"
}
own_check() { # WHO FILE: the caller's own object read through the mount
    if grep -q '"mine": {[^}]*"content": "own image file\\n"' "$2"; then
        ok "MountDumpfile as $1 under the unit: mounted, its object read ($(grep -o '"idmapped": "[a-z]*"' "$2"))"
    else
        fail "MountDumpfile as $1 under the unit: $(cat "$2")"
    fi
}
setpriv --reuid=4712 --regid=4712 --clear-groups \
    /usr/bin/python3 "$here/../ownmount_client.py" call "${S#unix:}" "$(own_spec "$own/mnt-user")" \
    >"$O/own-user.json" 2>&1
own_check "uid 4712" "$O/own-user.json"
unshare -m setpriv --bounding-set=-all,+setfcap --inh-caps=-all \
    /usr/bin/python3 "$here/../ownmount_client.py" call "${S#unix:}" "$(own_spec "$own/mnt-root")" \
    >"$O/own-root-ns.json" 2>&1
own_check "root with CAP_SETFCAP alone in a mount namespace of its own" "$O/own-root-ns.json"
unshare -m /usr/bin/python3 "$here/../ownmount_client.py" call "${S#unix:}" "$(own_spec "$own/mnt-root")" \
    >"$O/own-root-caps.json" 2>&1
if grep -q '"errnoName": "EINVAL"' "$O/own-root-caps.json"; then
    ok "MountDumpfile as root with all capabilities in another mount namespace: refused (EINVAL)"
else
    fail "MountDumpfile as root with all capabilities in another mount namespace: $(cat "$O/own-root-caps.json")"
fi
stamp ownmount

# A restarted daemon still knows the boot mounts.
if systemctl restart composefsd.service; then
    ok "systemctl restart composefsd.service"
else
    fail "systemctl restart composefsd.service"
fi
stamp restart
systemctl show -p MainPID,ActiveState,NRestarts,InactiveExitTimestampMonotonic,ActiveEnterTimestampMonotonic \
    composefsd.service >"$O/restart.txt" 2>&1
call "$I.ListMounts" '{}' >"$O/mounts-after.json" 2>&1 || fail "ListMounts after the restart: $(cat "$O/mounts-after.json")"
while read -r where _; do
    if grep -q "\"where\" *: *\"$where\"" "$O/mounts-after.json"; then
        ok "after the restart, ListMounts still lists $where"
    else
        fail "after the restart, ListMounts lacks $where: $(cat "$O/mounts-after.json")"
    fi
done <"$data/expect"
stamp end
exit $((fails > 0))
