#!/bin/bash
# raw_equals_backing: O_DIRECT writes to the raw device land at the same
# offsets of the backing file, untouched ranges stay zero, and the data
# survives a restart. Runs with direct_io = false and = true; with
# direct_io = true the Prometheus endpoint is on and must count exactly the
# bytes written through /dev/ublkbN.
. "$REPO/tests/vm/lib.sh"
require_binaries

head -c $((16 * MiB)) /dev/urandom > "$W/pattern"
head -c $((64 * 1024)) /dev/urandom > "$W/small"

check_range() { # WHAT SRC SRC_OFF TARGET OFF LEN
  local out
  out=$(cmp -n "$6" -i "$3:$5" "$2" "$4" 2>&1) || fail "$1: $4 @$5+$6 differs from $2 @$3: $out"
}
check_dev_range() { # WHAT SRC SRC_OFF OFF LEN  (reads $DEV with O_DIRECT)
  local out
  out=$(cmp -n "$5" -i "$3:0" "$2" <(read_dev "$DEV" "$4" "$5") 2>&1) \
    || fail "$1: $DEV @$4+$5 differs from $2 @$3: $out"
}

for direct in false true; do
  rm -f "$W/vm0.img" "$W/vm0.meta"
  make_config vm0 256 "$direct"
  if [ "$direct" = true ]; then
    printf '\n[metrics]\nlisten = "127.0.0.1:9942"\n' >> "$CFG"
  fi
  create_md
  start_daemon
  wait_device
  B=$(backing_of)
  lbs=$(cat "/sys/block/$DEV_NAME/queue/logical_block_size")
  log "direct_io=$direct, logical block size $lbs"

  # (pattern offset, device offset, length): aligned, 4K-aligned, straddling
  # a 4 MiB extent boundary, the very end of the device.
  ranges="0:0:$((4 * MiB))
$((4 * MiB)):$((37 * MiB + 12288)):$((4 * MiB))
$((8 * MiB)):$((126 * MiB)):$((4 * MiB))
$((12 * MiB)):$((252 * MiB)):$((4 * MiB))"
  for r in $ranges; do
    IFS=: read -r po doff len <<<"$r"
    write_dev "$W/pattern" "$po" "$DEV" "$doff" "$len" || fail "O_DIRECT write @$doff+$len failed"
  done
  # Sixteen single logical blocks at scattered offsets.
  smalls=""
  for k in $(seq 0 15); do
    off=$((200 * MiB + k * 7 * lbs + k * 65536))
    smalls="$smalls $((k * lbs)):$off:$lbs"
    write_dev "$W/small" $((k * lbs)) "$DEV" "$off" "$lbs" "$lbs" || fail "$lbs-byte O_DIRECT write @$off failed"
  done

  # Read back through the device before stopping.
  for r in $ranges; do
    IFS=: read -r po doff len <<<"$r"
    check_dev_range "device read-back" "$W/pattern" "$po" "$doff" "$len"
  done
  for r in $smalls; do
    IFS=: read -r so doff len <<<"$r"
    check_dev_range "device read-back" "$W/small" "$so" "$doff" "$len"
  done
  check_dev_range "unwritten range" /dev/zero 0 $((4 * MiB)) $((33 * MiB))
  if [ "$direct" = true ]; then
    metrics=$(curl -sf http://127.0.0.1:9942/metrics) || fail "no answer at the metrics endpoint"
    written=$(printf '%s\n' "$metrics" | sed -n 's/^vmsync_request_bytes_total{op="write"} //p')
    want=$((16 * MiB + 16 * lbs))
    [ "$written" = "$want" ] || fail "metrics count $written bytes written, the test wrote $want"
    writes=$(printf '%s\n' "$metrics" | sed -n 's/^vmsync_request_duration_seconds_count{op="write"} //p')
    [ "${writes:-0}" -ge 20 ] || fail "metrics count ${writes:-none} timed writes, the test issued at least 20"
    log "metrics: $written bytes in $writes writes through $DEV, as written"
  fi

  stop_daemon_clean
  [ "$(stat -c %s "$B")" -eq $((256 * MiB)) ] || fail "backing file size changed to $(stat -c %s "$B")"
  for r in $ranges; do
    IFS=: read -r po doff len <<<"$r"
    check_range "backing" "$W/pattern" "$po" "$B" "$doff" "$len"
  done
  for r in $smalls; do
    IFS=: read -r so doff len <<<"$r"
    check_range "backing" "$W/small" "$so" "$B" "$doff" "$len"
  done
  check_range "backing gap" /dev/zero 0 "$B" $((4 * MiB)) $((33 * MiB))
  check_range "backing gap" /dev/zero 0 "$B" $((130 * MiB)) $((70 * MiB))
  log "backing file matches (direct_io=$direct)"

  # The data survives a restart.
  start_daemon
  wait_device
  for r in $ranges; do
    IFS=: read -r po doff len <<<"$r"
    check_dev_range "after restart" "$W/pattern" "$po" "$doff" "$len"
  done
  stop_daemon_clean
done
pass
