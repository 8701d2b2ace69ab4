#!/bin/bash
# fs_basic: ext4 on /dev/ublkbN keeps its files across unmount/mount and
# across a clean daemon stop/start; SIGTERM is refused while mounted.
. "$REPO/tests/vm/lib.sh"
require_binaries

make_config vm0 256
create_md
start_daemon
wait_device
log "status: $(status_json)"

M=$W/mnt
mkdir -p "$M"
must mkfs.ext4 -q -F "$DEV"
must mount -t ext4 "$DEV" "$M"

# ~40 MiB of random data in files of 1..8 MiB, plus small files in a subdirectory.
i=0
for mib in 1 2 3 4 5 6 7 8 4; do
  i=$((i + 1))
  dd if=/dev/urandom of="$M/file$i" bs=1M count="$mib" status=none || fail "writing file$i failed"
done
mkdir -p "$M/small"
head -c $((2 * MiB)) /dev/urandom > "$W/small.src"
for j in $(seq 0 39); do
  dd if="$W/small.src" of="$M/small/s$j" bs=512 skip=$((j * 97)) count=$((1 + j * 3)) status=none \
    || fail "writing small/s$j failed"
done
sums_of "$M" > "$W/sums" || fail "sha256sum failed"
log "$(wc -l < "$W/sums") files, $(du -sm "$M" | cut -f1) MiB written"
must sync

# SIGTERM while mounted must be refused: the daemon stays up and the fs works.
log "+ kill -TERM vmsyncd while $DEV is mounted (must be refused)"
kill -TERM "$DAEMON_PID"
sleep 3
proc_alive "$DAEMON_PID" || { wait "$DAEMON_PID"; fail "vmsyncd exited (rc=$?) on SIGTERM while its device was mounted"; }
echo extra > "$M/after-sigterm" && sync || fail "I/O after the refused SIGTERM failed"
sums_of "$M" > "$W/sums"

must umount "$M"
must mount -t ext4 "$DEV" "$M"
verify_sums "$M" "$W/sums"
must umount "$M"
log "+ e2fsck -fn $DEV"
out=$(e2fsck -fn "$DEV" 2>&1) || fail "e2fsck after clean unmount: $(echo "$out" | tail -n 5 | tr '\n' ';')"

stop_daemon_clean
[ -s "$(backing_of)" ] || fail "backing file vanished"

# Restart: same data.
start_daemon
wait_device
js=$(status_json)
log "status after restart: $js"
ls=$(json_get last_shutdown <<<"$js")
log "after a clean stop: last_shutdown='$ls' metadata='$(json_get metadata <<<"$js")'"
[ -z "$ls" ] || [ "$ls" = clean ] || fail "status reports last_shutdown='$ls' after a clean stop"
must mount -t ext4 "$DEV" "$M"
verify_sums "$M" "$W/sums"
must umount "$M"
out=$(e2fsck -fn "$DEV" 2>&1) || fail "e2fsck after restart: $(echo "$out" | tail -n 5 | tr '\n' ';')"
stop_daemon_clean
pass
