#!/bin/bash
# discard: the device advertises discard; blkdiscard and fstrim make the
# backing file smaller (holes punched) and discarded ranges read as zeroes.
. "$REPO/tests/vm/lib.sh"
require_binaries

make_config vm0 256
create_md
start_daemon
wait_device
B=$(backing_of)
Q=/sys/block/$DEV_NAME/queue
dmax=$(cat "$Q/discard_max_bytes")
log "discard_max_bytes=$dmax discard_granularity=$(cat "$Q/discard_granularity") write_zeroes_max_bytes=$(cat "$Q/write_zeroes_max_bytes" 2>/dev/null)"
[ "$dmax" -gt 0 ] || fail "$DEV does not advertise discard (discard_max_bytes=0)"

mib() { echo $(( $1 / MiB )); }
alloc() { sync; allocated_bytes "$B"; }

# 1. blkdiscard on the raw device.
head -c $((64 * MiB)) /dev/urandom > "$W/pattern"
a0=$(alloc)
write_dev "$W/pattern" 0 "$DEV" $((64 * MiB)) $((64 * MiB)) || fail "writing 64 MiB failed"
a1=$(alloc)
log "backing allocated: $(mib "$a0") MiB empty, $(mib "$a1") MiB after writing 64 MiB"
[ $((a1 - a0)) -ge $((60 * MiB)) ] || fail "writing 64 MiB allocated only $(mib $((a1 - a0))) MiB in the backing file"
must blkdiscard -o $((80 * MiB)) -l $((32 * MiB)) "$DEV"
a2=$(alloc)
log "backing allocated after discarding 32 MiB: $(mib "$a2") MiB"
[ $((a1 - a2)) -ge $((28 * MiB)) ] || fail "blkdiscard of 32 MiB freed only $(( (a1 - a2) / 1024 )) KiB of the backing file ($a1 -> $a2 bytes)"
out=$(cmp -n $((32 * MiB)) <(read_dev "$DEV" $((80 * MiB)) $((32 * MiB))) /dev/zero 2>&1) \
  || fail "discarded range does not read as zeroes: $out"
out=$(cmp -n $((32 * MiB)) -i $((80 * MiB)):0 "$B" /dev/zero 2>&1) || fail "discarded range not zero in the backing file: $out"
out=$(cmp -n $((16 * MiB)) <(read_dev "$DEV" $((64 * MiB)) $((16 * MiB))) "$W/pattern" 2>&1) \
  || fail "data before the discarded range changed: $out"
out=$(cmp -n $((16 * MiB)) -i 0:$((48 * MiB)) <(read_dev "$DEV" $((112 * MiB)) $((16 * MiB))) "$W/pattern" 2>&1) \
  || fail "data after the discarded range changed: $out"

# 2. fstrim on ext4 (made without its own discard pass).
M=$W/mnt
mkdir -p "$M"
must mkfs.ext4 -q -F -E nodiscard "$DEV"
must mount -t ext4 -o nodiscard "$DEV" "$M"
must dd if=/dev/urandom of="$M/big" bs=1M count=48 conv=fsync status=none
must rm "$M/big"
a3=$(alloc)
must fstrim -v "$M"
a4=$(alloc)
log "backing allocated: $(mib "$a3") MiB before fstrim, $(mib "$a4") MiB after"
[ $((a3 - a4)) -ge $((40 * MiB)) ] || fail "fstrim freed only $(mib $((a3 - a4))) MiB of the backing file"
must umount "$M"

# 3. Discard of the whole device leaves (almost) nothing allocated.
must blkdiscard -f "$DEV"
a5=$(alloc)
log "backing allocated after discarding the whole device: $(( a5 / 1024 )) KiB"
[ "$a5" -le $((4 * MiB)) ] || fail "after discarding the whole device $(mib "$a5") MiB stay allocated"
for off in 0 $((100 * MiB)) $((248 * MiB)); do   # samples: reading 256 MiB takes ~20 s under TCG
  out=$(cmp -n $((8 * MiB)) <(read_dev "$DEV" "$off" $((8 * MiB))) /dev/zero 2>&1) || fail "device not zero @$off after full discard: $out"
done

stop_daemon_clean
pass
