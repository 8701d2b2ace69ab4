#!/bin/bash
# standalone_direct: a standalone node serves reads, writes and flushes
# straight from its backing (the direct queue, one io_uring operation per
# request) and sends everything else through the device's own methods (the
# queue's slow lane). What a user relies on, on both paths:
#  1. the daemon says its queue serves directly, with metrics on (every
#     request served directly is counted all the same: the counts equal
#     the kernel's own for the device);
#  2. fio, 32 requests in flight of 4 KiB to 1 MiB, random writes then
#     verified reads: every block reads back as written, and the backing
#     holds exactly the device's bytes;
#  3. write-zeroes and discard (slow lane): the ranges read as zeroes, the
#     data around them is untouched; FUA writes and flushes succeed;
#  4. the backing starts failing (dm-error under the node): reads and
#     writes fail with an I/O error and the daemon stays up; with the disk
#     back, the data from before reads back intact and writes work again;
#  5. on a kernel with ublk zero copy (6.16+) the queue uses it, and an
#     O_DIRECT user whose memory is not sector-aligned (ublk asks only for
#     4 bytes) still reads and writes correctly through the O_DIRECT
#     backing (the backing file refuses the request's own pages, so the
#     slow lane copies the data through an aligned buffer);
#  6. kill -9 and a restart with `ublk_zero_copy = false`: the daemon
#     re-attaches to the same device, which keeps its data path and its
#     data; a device made afresh then copies.
. "$REPO/tests/vm/lib.sh"
require_binaries
command -v dmsetup >/dev/null || skip "dmsetup not installed (scripts/setup.sh installs it)"
command -v fio >/dev/null || skip "fio not installed (scripts/setup.sh installs it)"
[ -e /dev/mapper/control ] || modprobe dm_mod 2>/dev/null || true
[ -e /dev/mapper/control ] || skip "no device-mapper in this kernel"
export DM_DISABLE_UDEV=1   # no udev in the guest: libdevmapper makes the nodes itself
MIB_SIZE=96
SECTORS=$((MIB_SIZE * MiB / 512))

truncate -s "${MIB_SIZE}M" "$W/sd.raw"
LOOP=$(losetup -f --show "$W/sd.raw") || fail "losetup"
must dmsetup create vmt_sd --table "0 $SECTORS linear $LOOP 0"
BACKING=/dev/mapper/vmt_sd
[ -b "$BACKING" ] || fail "$BACKING did not appear"
dm_table() { # linear|error
  local t="0 $SECTORS linear $LOOP 0"
  [ "$1" = linear ] || t="0 $SECTORS error"
  log "+ dmsetup suspend/load/resume vmt_sd: $1"
  dmsetup suspend vmt_sd && dmsetup load vmt_sd --table "$t" && dmsetup resume vmt_sd \
    || fail "switching vmt_sd to $1"
}
cleanup_dm() { dmsetup remove vmt_sd 2>/dev/null; losetup -d "$LOOP" 2>/dev/null; }

make_config sd "$MIB_SIZE" true "$BACKING"
METRICS=127.0.0.1:19187
printf '\n[metrics]\nlisten = "%s"\n' "$METRICS" >> "$CFG"
create_md
start_daemon
wait_device
grep -q "serving reads, writes and flushes straight from the backing file" "$DAEMON_LOG" \
  || fail "the standalone node's queue does not serve directly: $(tail -n 5 "$DAEMON_LOG")"
# Zero copy needs UBLK_F_AUTO_BUF_REG (Linux 6.16).
kver=$(uname -r)
if kernel_has_zero_copy; then
  grep -q "straight from the backing file, zero copy" "$DAEMON_LOG" \
    || fail "kernel $kver has ublk zero copy but the queue does not use it: $(grep -m1 'straight from' "$DAEMON_LOG")"
  log "kernel $kver: the queue serves with zero copy"
else
  grep -q "zero copy" "$DAEMON_LOG" && fail "kernel $kver has no ublk zero copy, yet the daemon says it uses it"
  log "kernel $kver: the queue copies (no zero copy before 6.16)"
fi

# 2. Many requests in flight, sizes mixed, every block verified.
log "+ fio: random writes of 4 KiB-1 MiB at depth 32 over 64 MiB, then verified reads"
out=$(fio --name=direct --filename="$DEV" --direct=1 --ioengine=libaio --iodepth=32 \
      --rw=randwrite --bsrange=4k-1m --size=64M --verify=crc32c --do_verify=1 \
      --verify_fatal=1 --randrepeat=0 --output-format=terse --terse-version=3 2>&1) \
  || fail "fio with verification failed: $(echo "$out" | tail -n 5)"
cmp <(read_dev "$DEV" 0 $((MIB_SIZE * MiB))) <(read_dev "$BACKING" 0 $((MIB_SIZE * MiB))) \
  || fail "the backing does not hold the device's bytes after fio"
log "fio verified; backing equals device"
# metric OP: vmsync's count of guest requests of kind OP.
metric() {
  python3 -c "import urllib.request; print(urllib.request.urlopen('http://$METRICS/metrics').read().decode())" \
    | awk -v op="$1" '$1 == "vmsync_requests_total{op=\"" op "\"}" { print $2 }'
}
read -r k_reads _ _ _ k_writes _ < "/sys/block/$DEV_NAME/stat"
m_reads=$(metric read) m_writes=$(metric write)
log "requests: the kernel sent $k_reads reads and $k_writes writes; vmsync counted $m_reads and $m_writes"
[ "$k_writes" -gt 0 ] && [ "$m_reads" = "$k_reads" ] && [ "$m_writes" = "$k_writes" ] \
  || fail "vmsync's request counts ($m_reads reads, $m_writes writes) are not the kernel's ($k_reads, $k_writes)"

# 3. Write-zeroes and discard between known data, FUA writes and flushes.
head -c $((8 * MiB)) /dev/urandom > "$W/pattern"
write_dev "$W/pattern" 0 "$DEV" $((64 * MiB)) $((8 * MiB))
must blkdiscard -z -o $((66 * MiB)) -l $((2 * MiB)) "$DEV"
must blkdiscard -o $((69 * MiB)) -l $((1 * MiB)) "$DEV"
cmp <(read_dev "$DEV" $((66 * MiB)) $((2 * MiB))) <(head -c $((2 * MiB)) /dev/zero) \
  || fail "a write-zeroes range does not read as zeroes"
cmp <(read_dev "$DEV" $((69 * MiB)) $((1 * MiB))) <(head -c $((1 * MiB)) /dev/zero) \
  || fail "a discarded range does not read as zeroes"
cmp <(read_dev "$DEV" $((64 * MiB)) $((2 * MiB))) <(head -c $((2 * MiB)) "$W/pattern") \
  || fail "data before the zeroed range changed"
cmp <(read_dev "$DEV" $((70 * MiB)) $((2 * MiB))) <(tail -c $((2 * MiB)) "$W/pattern") \
  || fail "data after the discarded range changed"
must dd if="$W/pattern" of="$DEV" bs=64k count=16 seek=$((80 * 16)) oflag=direct,dsync conv=notrunc,fsync status=none
cmp <(read_dev "$BACKING" $((80 * MiB)) $((1 * MiB))) <(head -c $((1 * MiB)) "$W/pattern") \
  || fail "FUA writes are not on the backing"
log "write-zeroes, discard, FUA and flush behave"

# 5. O_DIRECT with memory aligned to 8 bytes only (a valid ublk request).
log "+ O_DIRECT write and read of 64 KiB from memory 8 bytes past a page"
python3 - "$DEV" "$W/unaligned" <<'PY' || fail "an O_DIRECT request with 8-byte-aligned memory failed"
import mmap, os, sys
dev, out = sys.argv[1], sys.argv[2]
data = os.urandom(65536)
fd = os.open(dev, os.O_RDWR | os.O_DIRECT)
page = mmap.mmap(-1, 65536 + 4096)
view = memoryview(page)[8:8 + 65536]
view[:] = data
assert os.pwritev(fd, [view], 84 << 20) == 65536
view[:] = bytes(65536)
assert os.preadv(fd, [view], 84 << 20) == 65536
assert bytes(view) == data, "read back differs"
open(out, "wb").write(data)
os.close(fd)
PY
cmp <(read_dev "$BACKING" $((84 * MiB)) 65536) "$W/unaligned" \
  || fail "the backing does not hold an O_DIRECT write from unaligned memory"
log "unaligned O_DIRECT memory: written, read back, on the backing"

# 4. The backing fails under the running node, then comes back.
dm_table error
read_dev "$DEV" $((64 * MiB)) 4096 >/dev/null 2>"$W/read.err" \
  && fail "a read from a failing backing succeeded"
log "read on the failing backing: $(head -c 200 "$W/read.err")"
head -c 4096 /dev/urandom > "$W/lost"
write_dev "$W/lost" 0 "$DEV" $((90 * MiB)) 4096 4096 2>"$W/write.err" \
  && fail "a write to a failing backing succeeded"
log "write on the failing backing: $(head -c 200 "$W/write.err")"
proc_alive "$DAEMON_PID" || fail "vmsyncd died when its backing failed"
# The failed direct operations were run again through the device, which
# logs each request it fails.
grep -q "request failed" "$DAEMON_LOG" || fail "no failed request in the daemon's log: $(tail -n 5 "$DAEMON_LOG")"
status_json >/dev/null || fail "vmsyncd stopped answering when its backing failed"
dm_table linear
cmp <(read_dev "$DEV" $((70 * MiB)) $((2 * MiB))) <(tail -c $((2 * MiB)) "$W/pattern") \
  || fail "data written before the failure does not read back"
write_dev "$W/lost" 0 "$DEV" $((90 * MiB)) 4096 4096 || fail "a write after the backing came back failed"
cmp <(read_dev "$DEV" $((90 * MiB)) 4096) "$W/lost" || fail "a write after the backing came back reads back wrong"
log "failing backing: errors returned, daemon up, data intact after"

# 6. A device keeps the data path it was made with: killed and restarted
#    with zero copy turned off, the daemon re-attaches to the same device,
#    which serves as before; a device made afresh then copies.
old_dev=$DEV
crash_daemon
[ -b "$old_dev" ] || fail "$old_dev disappeared after kill -9 (no user recovery?)"
sed -i 's/^\[node\]$/[node]\nublk_zero_copy = false/' "$CFG"
start_daemon
wait_device "$CFG" 120
[ "$DEV" = "$old_dev" ] || fail "restarted vmsyncd serves $DEV, not the recovered $old_dev"
if kernel_has_zero_copy; then
  grep -q "straight from the backing file, zero copy" "$DAEMON_LOG" \
    || fail "the re-attached device no longer serves with zero copy: $(grep -m1 'straight from' "$DAEMON_LOG")"
fi
cmp <(read_dev "$DEV" $((64 * MiB)) $((2 * MiB))) <(head -c $((2 * MiB)) "$W/pattern") \
  || fail "data does not read back after re-attaching"
write_dev "$W/lost" 0 "$DEV" $((91 * MiB)) 4096 4096 || fail "a write after re-attaching failed"
cmp <(read_dev "$BACKING" $((91 * MiB)) 4096) "$W/lost" || fail "a write after re-attaching is not on the backing"
stop_daemon_clean
start_daemon
wait_device
grep -q "straight from the backing file" "$DAEMON_LOG" || fail "the new device is not served directly"
grep -q "zero copy" "$DAEMON_LOG" && fail "a device made with ublk_zero_copy = false uses zero copy"
cmp <(read_dev "$DEV" $((91 * MiB)) 4096) "$W/lost" || fail "data does not read back from the new device"
log "re-attached device kept its data path; a new one with ublk_zero_copy = false copies"

stop_daemon_clean
cleanup_dm
pass
