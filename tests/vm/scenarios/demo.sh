#!/bin/bash
# demo: the main job. A vmsync disk served over real ublk, with an ext4 file
# system on it: create metadata, start the daemon, show its status, make a
# file system, write and read back files, stop cleanly.
. "$REPO/tests/vm/lib.sh"
require_binaries

make_config demo 256 true
create_md
start_daemon
wait_device
log "vmsyncctl status:"
"$VMSYNCCTL" --config "$CFG" status | sed 's/^/    /'
M=$W/mnt
mkdir -p "$M"
must mkfs.ext4 -q -F "$DEV"
must mount -t ext4 "$DEV" "$M"
for i in 1 2 3; do
  dd if=/dev/urandom of="$M/file$i" bs=1M count=$((4 * i)) conv=fsync status=none || fail "writing file$i"
done
sums_of "$M" > "$W/sums"
log "files on $DEV:"
ls -l "$M" | sed 's/^/    /'
df -h "$M" | sed 's/^/    /'
must umount "$M"
must mount -t ext4 "$DEV" "$M"
verify_sums "$M" "$W/sums" || fail "checksums changed after remount"
must umount "$M"
stop_daemon_clean
log "demo done: vmsync served $DEV, ext4 files verified after remount, clean stop"
pass
