#!/bin/bash
# crash_recovery: kill -9 vmsyncd while ext4 on its device is busy; a new
# vmsyncd with the same config re-attaches to the same device (ublk user
# recovery). The writer sees no I/O error, the fs stays clean (e2fsck -fn),
# and every file whose fsync returned has the recorded checksum.
. "$REPO/tests/vm/lib.sh"
require_binaries
CYCLES=${VMT_CRASH_CYCLES:-2}

make_config vm0 256
create_md
start_daemon
wait_device
M=$W/mnt
mkdir -p "$M"
must mkfs.ext4 -q -F "$DEV"
must mount -t ext4 "$DEV" "$M"
mkdir -p "$M/d"

REC=$W/written.log    # on the scratch fs, not on the device under test
: > "$REC"
rm -f "$W/stop" "$W/writer.err"
writer() {
  local i=0 n sum rc
  while [ ! -e "$W/stop" ]; do
    i=$((i + 1))
    n=$((1 + RANDOM % 16))                 # 64 KiB .. 1 MiB
    head -c $((n * 65536)) /dev/urandom > "$W/w.tmp"
    sum=$(sha256sum < "$W/w.tmp" | cut -d' ' -f1)
    dd if="$W/w.tmp" of="$M/d/f$i" bs=64K conv=fsync status=none
    rc=$?
    if [ "$rc" -ne 0 ]; then echo "dd of f$i failed with status $rc" > "$W/writer.err"; exit 1; fi
    echo "$sum  d/f$i" >> "$REC"           # only after fsync returned
  done
  exit 0
}
writer &
WPID=$!
recs() { wc -l < "$REC"; }
wait_progress() { # N_MORE TIMEOUT_S WHAT
  local want=$(( $(recs) + $1 )) t0
  t0=$(date +%s)
  while [ "$(recs)" -lt "$want" ]; do
    proc_alive "$WPID" || fail "writer died $3: $(cat "$W/writer.err" 2>/dev/null)"
    [ $(($(date +%s) - t0)) -lt "$2" ] || fail "writer made no progress for ${2}s $3 ($(recs) files)"
    sleep 0.5
  done
}

wait_progress 5 120 "before the first crash"
for c in $(seq 1 "$CYCLES"); do
  sleep 3
  before=$(recs)
  old_dev=$DEV
  crash_daemon
  [ -b "$old_dev" ] || fail "$old_dev disappeared after kill -9 (no user recovery?)"
  sleep 2
  during=$(recs)
  log "crash $c: $before files before kill, $during while no daemon ran"
  start_daemon
  wait_device "$CFG" 120
  [ "$DEV" = "$old_dev" ] || fail "restarted vmsyncd serves $DEV, not the recovered $old_dev"
  js=$(status_json)
  log "after recovery $c: last_shutdown='$(json_get last_shutdown <<<"$js")' recovered_extents='$(json_get recovered_extents <<<"$js")' metadata='$(json_get metadata <<<"$js")'"
  wait_progress 5 120 "after recovery $c"
  mounted_rw "$M" || fail "$M is no longer mounted read-write after recovery $c"
  log "crash $c: writer at $(recs) files after recovery"
done

touch "$W/stop"
wait "$WPID"; wrc=$?
[ "$wrc" -eq 0 ] || fail "writer exited with status $wrc: $(cat "$W/writer.err" 2>/dev/null)"
errs=$(kernel_errors)
[ -z "$errs" ] || fail "kernel reported I/O errors: $(echo "$errs" | head -n 3 | tr '\n' ';')"
mounted_rw "$M" || fail "$M is no longer mounted read-write"

must sync
must umount "$M"
log "+ e2fsck -fn $DEV"
out=$(e2fsck -fn "$DEV" 2>&1) || fail "e2fsck -fn found problems (rc=$?): $(echo "$out" | tail -n 8 | tr '\n' ';')"
must mount -t ext4 "$DEV" "$M"
verify_sums "$M" "$REC"
must umount "$M"
stop_daemon_clean
pass
