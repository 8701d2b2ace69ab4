#!/bin/bash
# smoke: the guest has what every other scenario needs.
. "$REPO/tests/vm/lib.sh"

log "kernel $(uname -r), $(nproc) CPUs, $(awk '/MemTotal/ {print int($2/1024)}' /proc/meminfo) MiB"
[ -d /sys/module/ublk_drv ] || fail "ublk_drv is not loaded"
[ -c /dev/ublk-control ] || fail "/dev/ublk-control missing"
[ -d /sys/module/loop ] || [ -e /dev/loop-control ] || fail "loop driver missing"
grep -q ' /tmp/scratch ' /proc/mounts || fail "scratch file system not mounted"
log "scratch: $(grep ' /tmp/scratch ' /proc/mounts)"
log "host root: $(grep hostroot /proc/mounts)"

# O_DIRECT and hole punching on the scratch file system (backing files live there).
f=$W/odirect.test
dd if=/dev/zero of="$f" bs=1M count=4 oflag=direct status=none || fail "O_DIRECT write on scratch fails"
fallocate -p -o 1M -l 2M "$f" || fail "hole punch on scratch fails"
rm -f "$f"
# Informational: does tmpfs take O_DIRECT in this kernel?
if dd if=/dev/zero of=/tmp/odirect.test bs=4k count=1 oflag=direct status=none 2>/dev/null; then
  log "tmpfs accepts O_DIRECT"
else
  log "tmpfs rejects O_DIRECT"
fi
rm -f /tmp/odirect.test

for t in mkfs.ext4 e2fsck blkdiscard fstrim losetup fio sha256sum cmp timeout setsid; do
  command -v "$t" >/dev/null || fail "$t missing in the chroot"
done

require_binaries
for b in "$VMSYNCD" "$VMSYNCCTL"; do
  out=$("$b" --help 2>&1) || fail "$b --help failed: $(echo "$out" | head -n 3)"
done
log "binaries: $(ls -l "$VMSYNCD" "$VMSYNCCTL" | awk '{print $5, $6, $7, $8, $9}' | tr '\n' ';')"
pass
