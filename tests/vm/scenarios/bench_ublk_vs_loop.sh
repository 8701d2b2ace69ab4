#!/bin/bash
# bench_ublk_vs_loop: fio on /dev/ublkbN (vmsyncd, direct_io = true), on a
# kernel loop device (losetup --direct-io=on) and, when BENCH_RUBLK names the
# binary, on rublk's ublk loop target (`rublk add loop`, direct I/O: the
# reference ublk server), each over its own backing file on the same scratch
# ext4. Prints one line per test:
#   BENCH <test> loop_iops=N loop_mibps=X vmsync_iops=N vmsync_mibps=X [rublk_iops=N rublk_mibps=X]
#         loop_cpu=U vmsync_cpu=U vmsync_srv=U [rublk_cpu=U rublk_srv=U]
# where *_cpu is the guest's busy CPU time per I/O (all CPUs, /proc/stat) and
# *_srv the server process's own CPU time per I/O (all its threads), both in microseconds over the measured window: under TCG the
# closest thing to "work per request" the guest can report.
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
  # The server rublk leaves running (it forks away from `rublk add`).
  RUBLK_PID=$(pgrep -n -f "$RUBLK add loop -n $RUBLK_ID") || fail "no rublk server process"
fi
log "loop: $LOOPDEV (dio=$(cat /sys/block/${LOOPDEV#/dev/}/loop/dio 2>/dev/null)), vmsync: $DEV, rublk: ${RUBLKDEV:-none}, queues $QUEUES"
for d in "$LOOPDEV" "$DEV" $RUBLKDEV; do
  q=/sys/block/${d#/dev/}/queue
  # Same I/O scheduler on both (the kernel picks mq-deadline for ublk, none for loop).
  [ -z "$SCHED" ] || echo "$SCHED" > "$q/scheduler" || fail "cannot set scheduler $SCHED on $d"
  log "$d: nr_requests=$(cat $q/nr_requests) max_sectors_kb=$(cat $q/max_sectors_kb) lbs=$(cat $q/logical_block_size) rotational=$(cat $q/rotational) scheduler=$(cat $q/scheduler)"
done

# server_ticks PID: CPU time of PID (all threads, user + system) so far, in
# USER_HZ ticks; 0 without a PID.
server_ticks() {
  [ -n "$1" ] || { echo 0; return; }
  sed 's/.*) //' /proc/"$1"/stat | awk '{ print $12 + $13 }'
}
# busy_ticks: the guest's busy CPU time so far (user, nice, system, irq,
# softirq; all CPUs), in USER_HZ ticks.
busy_ticks() { awk '/^cpu / { print $2 + $3 + $4 + $7 + $8 }' /proc/stat; }
TICK_US=$((1000000 / $(getconf CLK_TCK)))

# fio_run DEV TEST [SERVER_PID] -> "iops kib_per_s guest_us_per_io server_us_per_io"
# CPU is sampled over fio's measured window (after its 2 s ramp) by a
# background sampler.
fio_run() {
  local dev=$1 t=$2 pid=${3:-} rw bs qd out sampler
  case $t in
    randread_4k) rw=randread bs=4k qd=32 ;;
    randwrite_4k) rw=randwrite bs=4k qd=32 ;;
    seqread_1m) rw=read bs=1M qd=8 ;;
    seqwrite_1m) rw=write bs=1M qd=8 ;;
    *) fail "unknown bench test $t" ;;
  esac
  (
    sleep 2
    echo "$(busy_ticks) $(server_ticks "$pid")" > "$W/cpu.0"
    sleep "$RT"
    echo "$(busy_ticks) $(server_ticks "$pid")" > "$W/cpu.1"
  ) &
  sampler=$!
  out=$(fio --name="$t" --filename="$dev" --direct=1 --ioengine="$ENGINE" --iodepth="$qd" \
        --rw="$rw" --bs="$bs" --size="${SZ}M" --time_based --runtime="$RT" --ramp_time=2 \
        --norandommap --randrepeat=0 --output-format=terse --terse-version=3 2>"$W/fio.err") \
    || fail "fio $t on $dev failed: $(head -c 300 "$W/fio.err")"
  wait "$sampler"
  local cpu0 cpu1
  cpu0=$(cat "$W/cpu.0") cpu1=$(cat "$W/cpu.1")
  echo "$out" | awk -F';' -v rw="$rw" -v c0="$cpu0" -v c1="$cpu1" -v rt="$RT" -v tick="$TICK_US" '$1 == 3 {
      if ($5 != 0) { print "error " $5; exit }
      if (rw ~ /read/) { iops = $8; kib = $7 } else { iops = $49; kib = $48 }
      split(c0, a, " "); split(c1, b, " ")
      ios = iops * rt
      if (ios <= 0) ios = 1
      printf "%s %s %.1f %.1f\n", iops, kib, (b[1] - a[1]) * tick / ios, (b[2] - a[2]) * tick / ios }'
}

mibps() { awk -v b="$1" 'BEGIN{printf "%.1f", b/1024}'; }
for t in $TESTS; do
  res_l=$(fio_run "$LOOPDEV" "$t")
  res_v=$(fio_run "$DEV" "$t" "$DAEMON_PID")
  res_r=
  [ -z "$RUBLKDEV" ] || res_r=$(fio_run "$RUBLKDEV" "$t" "$RUBLK_PID")
  for p in "$DAEMON_PID" ${RUBLK_PID:-}; do
    for task in /proc/"$p"/task/*; do
      echo "THREADS $t $p $(cat "$task/comm") $(sed 's/.*) //' "$task/stat" | awk '{ print $12 + $13 }')"
    done
  done
  case "$res_l $res_v $res_r" in *error*|"") fail "fio $t: loop=[$res_l] vmsync=[$res_v] rublk=[$res_r]" ;; esac
  proc_alive "$DAEMON_PID" || fail "vmsyncd died during $t"
  read -r li lb lc _ <<<"$res_l"
  read -r vi vb vc vs <<<"$res_v"
  line="BENCH $t loop_iops=$li loop_mibps=$(mibps "$lb") vmsync_iops=$vi vmsync_mibps=$(mibps "$vb")"
  line="$line loop_cpu=$lc vmsync_cpu=$vc vmsync_srv=$vs"
  if [ -n "$res_r" ]; then
    read -r ri rb rc_ rs <<<"$res_r"
    line="$line rublk_iops=$ri rublk_mibps=$(mibps "$rb") rublk_cpu=$rc_ rublk_srv=$rs"
  fi
  echo "$line"
done

must losetup -d "$LOOPDEV"
[ -z "$RUBLKDEV" ] || must "$RUBLK" del -n "$RUBLK_ID"
stop_daemon_clean
pass
