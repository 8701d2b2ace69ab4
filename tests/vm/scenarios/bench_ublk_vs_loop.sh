#!/bin/bash
# bench_ublk_vs_loop: fio on /dev/ublkbN (vmsyncd, direct_io = true), on a
# kernel loop device (losetup --direct-io=on) and, when BENCH_RUBLK names the
# binary, on rublk's ublk loop target (`rublk add loop`, direct I/O: the
# reference ublk server), each over its own backing file on the same scratch
# ext4. Prints one line per test:
#   BENCH <test> loop_iops=N loop_mibps=X vmsync_iops=N vmsync_mibps=X [rublk_iops=N rublk_mibps=X]
# benches/ublk-vs-loop.sh turns them into a table. Only the ratios mean
# anything: the guest runs under TCG.
# Knobs: BENCH_RUNTIME (s per run, 20), BENCH_SIZE_MIB (512),
#        BENCH_ENGINE (libaio | io_uring), BENCH_TESTS (all four),
#        BENCH_SCHED (I/O scheduler forced on every device, "none"; "" = defaults),
#        BENCH_QUEUES (ublk hardware queues of vmsync and rublk, 1),
#        BENCH_RUBLK (path of the rublk binary; unset: no rublk column),
#        BENCH_RUBLK_ARGS (extra `rublk add loop` options, e.g. "-d 64 -b 1MiB").
. "$REPO/tests/vm/lib.sh"
require_binaries
RT=${BENCH_RUNTIME:-20}
SZ=${BENCH_SIZE_MIB:-512}
ENGINE=${BENCH_ENGINE:-libaio}
TESTS=${BENCH_TESTS:-randread_4k randwrite_4k seqread_1m seqwrite_1m}
SCHED=${BENCH_SCHED-none}   # "" keeps each device's default scheduler
QUEUES=${BENCH_QUEUES:-1}
RUBLK=${BENCH_RUBLK:-}
RUBLK_ARGS=${BENCH_RUBLK_ARGS:-}
RUBLK_ID=9

# Both backing files fully allocated (written, not fallocated: reads of
# unwritten extents would cost nothing).
for f in "$W/vm0.img" "$W/loop.img" ${RUBLK:+"$W/rublk.img"}; do
  must dd if=/dev/zero of="$f" bs=1M count="$SZ" conv=fsync status=none
done
make_config vm0 "$SZ" true "$W/vm0.img"
[ "$QUEUES" = 1 ] || echo "ublk_queues = $QUEUES" >> "$CFG"
create_md
start_daemon
wait_device
LOOPDEV=$(losetup --direct-io=on --find --show "$W/loop.img") || fail "losetup failed"
echo "$LOOPDEV" > "$W/loopdev"
RUBLKDEV=
if [ -n "$RUBLK" ]; then
  [ -x "$RUBLK" ] || fail "BENCH_RUBLK=$RUBLK is not executable"
  # rublk's own defaults unless BENCH_RUBLK_ARGS says otherwise (its
  # defaults: depth 128, 512 KiB buffers; vmsync's shape is "-d 64 -b 1MiB").
  # shellcheck disable=SC2086
  must "$RUBLK" add loop -n "$RUBLK_ID" -q "$QUEUES" $RUBLK_ARGS --quiet -f "$W/rublk.img"
  RUBLKDEV=/dev/ublkb$RUBLK_ID
  for _ in $(seq 1 50); do [ -b "$RUBLKDEV" ] && break; sleep 0.2; done
  [ -b "$RUBLKDEV" ] || fail "rublk did not create $RUBLKDEV"
fi
log "loop: $LOOPDEV (dio=$(cat /sys/block/${LOOPDEV#/dev/}/loop/dio 2>/dev/null)), vmsync: $DEV, rublk: ${RUBLKDEV:-none}, queues $QUEUES"
for d in "$LOOPDEV" "$DEV" $RUBLKDEV; do
  q=/sys/block/${d#/dev/}/queue
  # Same I/O scheduler on both (the kernel picks mq-deadline for ublk, none for loop).
  [ -z "$SCHED" ] || echo "$SCHED" > "$q/scheduler" || fail "cannot set scheduler $SCHED on $d"
  log "$d: nr_requests=$(cat $q/nr_requests) max_sectors_kb=$(cat $q/max_sectors_kb) lbs=$(cat $q/logical_block_size) rotational=$(cat $q/rotational) scheduler=$(cat $q/scheduler)"
done

# fio_run DEV TEST -> "iops kib_per_s"
fio_run() {
  local dev=$1 t=$2 rw bs qd out
  case $t in
    randread_4k) rw=randread bs=4k qd=32 ;;
    randwrite_4k) rw=randwrite bs=4k qd=32 ;;
    seqread_1m) rw=read bs=1M qd=8 ;;
    seqwrite_1m) rw=write bs=1M qd=8 ;;
    *) fail "unknown bench test $t" ;;
  esac
  out=$(fio --name="$t" --filename="$dev" --direct=1 --ioengine="$ENGINE" --iodepth="$qd" \
        --rw="$rw" --bs="$bs" --size="${SZ}M" --time_based --runtime="$RT" --ramp_time=2 \
        --norandommap --randrepeat=0 --output-format=terse --terse-version=3 2>"$W/fio.err") \
    || fail "fio $t on $dev failed: $(head -c 300 "$W/fio.err")"
  echo "$out" | awk -F';' -v rw="$rw" '$1 == 3 {
      if ($5 != 0) { print "error " $5; exit }
      if (rw ~ /read/) print $8, $7; else print $49, $48 }'
}

mibps() { awk -v b="$1" 'BEGIN{printf "%.1f", b/1024}'; }
for t in $TESTS; do
  res_l=$(fio_run "$LOOPDEV" "$t")
  res_v=$(fio_run "$DEV" "$t")
  res_r=
  [ -z "$RUBLKDEV" ] || res_r=$(fio_run "$RUBLKDEV" "$t")
  case "$res_l $res_v $res_r" in *error*|"") fail "fio $t: loop=[$res_l] vmsync=[$res_v] rublk=[$res_r]" ;; esac
  proc_alive "$DAEMON_PID" || fail "vmsyncd died during $t"
  read -r li lb <<<"$res_l"
  read -r vi vb <<<"$res_v"
  line="BENCH $t loop_iops=$li loop_mibps=$(mibps "$lb") vmsync_iops=$vi vmsync_mibps=$(mibps "$vb")"
  if [ -n "$res_r" ]; then
    read -r ri rb <<<"$res_r"
    line="$line rublk_iops=$ri rublk_mibps=$(mibps "$rb")"
  fi
  echo "$line"
done

must losetup -d "$LOOPDEV"
[ -z "$RUBLKDEV" ] || must "$RUBLK" del -n "$RUBLK_ID"
stop_daemon_clean
pass
