#!/bin/bash
# bench_ublk_vs_loop: fio on /dev/ublkbN (vmsyncd, direct_io = true), on a
# kernel loop device (losetup --direct-io=on) and, when BENCH_RUBLK names the
# binary, on rublk's ublk loop target (`rublk add loop`, direct I/O: the
# reference ublk server), each over its own backing file on the same scratch
# ext4. Prints one line per test:
#   BENCH <test> pass=P loop_iops=N loop_mibps=X vmsync_iops=N vmsync_mibps=X [rublk_iops=N rublk_mibps=X]
#         loop_cpu=U vmsync_cpu=U vmsync_srv=U [rublk_cpu=U rublk_srv=U]
# where *_cpu is the guest's busy CPU time per I/O (all CPUs, /proc/stat)
# and *_srv the server process's own CPU time per I/O (all its threads, the
# exited io_uring workers included), both in microseconds over the measured
# window: under TCG the closest thing to "work per request" the guest can
# report. With rublk there are BENCH_PASSES passes (2; see below).
# benches/ublk-vs-loop.sh turns them into a table. Only the ratios mean
# anything: the guest runs under TCG.
# Knobs: BENCH_RUNTIME (s per run, 20), BENCH_SIZE_MIB (512),
#        BENCH_ENGINE (libaio | io_uring), BENCH_TESTS (all four),
#        BENCH_SCHED (I/O scheduler forced on every device, "none"; "" = defaults),
#        BENCH_QUEUES (ublk hardware queues of vmsync and rublk, 1),
#        BENCH_RUBLK (path of the rublk binary; unset: no rublk column),
#        BENCH_RUBLK_ARGS (extra `rublk add loop` options, e.g. "-d 64 -b 1MiB"),
#        BENCH_PASSES (passes with rublk, 2: vmsync and rublk swap backing
#        files every pass and their order in the run every two; 4 passes
#        hold each combination once),
#        BENCH_PEER=1 (vmsync as a replicated primary: a second vmsyncd on the
#        guest's loopback is its peer, protocol C, links protected; reads
#        are then served by the replication layer, writes wait for the peer),
#        BENCH_UNPROTECTED=1 (with BENCH_PEER: the links unsealed after the
#        handshake, VMSYNC_BENCH_UNPROTECTED_LINKS=1, to see what sealing costs),
#        BENCH_PERF=1 (a whole-guest `perf record -e cpu-clock -a -g` over each
#        measured window; the top of its report goes to the console as
#        "PERF <test> <device>" lines: where the guest's CPU goes per device).
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
PASSES=${BENCH_PASSES:-2}
RUBLK_ID=9
PEER=${BENCH_PEER:-}
PERF=
if [ -n "${BENCH_PERF:-}" ]; then
  command -v perf >/dev/null && PERF=1 || log "BENCH_PERF: no perf in the guest's root; not profiling"
fi
[ "${BENCH_UNPROTECTED:-}" != 1 ] || export VMSYNC_BENCH_UNPROTECTED_LINKS=1

# The backing files, fully allocated (written, not fallocated: reads of
# unwritten extents would cost nothing). Which file a device gets matters
# more than expected: giving vmsync the file rublk had (and rublk vmsync's)
# moved vmsync/rublk for 4 KiB random writes from 0.73-0.87 to 1.01-1.13. So
# with rublk the tests run in passes (BENCH_PASSES, 2; 4 cover every
# combination of file and place in the run, see run_pass), vmsync and rublk
# swapping files from one pass to the next, and benches/ublk-vs-loop.sh
# prints the mean of the passes.
FILE_A=$W/a.img FILE_B=$W/b.img
[ -z "$RUBLK" ] || [ -x "$RUBLK" ] || fail "BENCH_RUBLK=$RUBLK is not executable"
for f in "$FILE_A" "$W/loop.img" ${RUBLK:+"$FILE_B"}; do
  must dd if=/dev/zero of="$f" bs=1M count="$SZ" conv=fsync status=none
done
LOOPDEV=$(losetup --direct-io=on --find --show "$W/loop.img") || fail "losetup failed"
echo "$LOOPDEV" > "$W/loopdev"

# set_scheduler DEV: the same I/O scheduler on every device (the kernel
# picks mq-deadline for ublk, none for loop).
set_scheduler() {
  local q=/sys/block/${1#/dev/}/queue
  [ -z "$SCHED" ] || echo "$SCHED" > "$q/scheduler" || fail "cannot set scheduler $SCHED on $1"
  log "$1: nr_requests=$(cat $q/nr_requests) max_sectors_kb=$(cat $q/max_sectors_kb) lbs=$(cat $q/logical_block_size) rotational=$(cat $q/rotational) scheduler=$(cat $q/scheduler)"
  # Every other queue attribute, on one line, to compare devices by.
  log "$1 queue: $(cd "$q" && grep -s . * 2>/dev/null | tr '\n' ' ')"
}
log "loop: $LOOPDEV (dio=$(cat /sys/block/${LOOPDEV#/dev/}/loop/dio 2>/dev/null))"
set_scheduler "$LOOPDEV"

# server_ticks PID: CPU time of PID (all threads, user + system) so far, in
# USER_HZ ticks; 0 without a PID.
server_ticks() {
  [ -n "$1" ] || { echo 0; return; }
  sed 's/.*) //' /proc/"$1"/stat | awk '{ print $12 + $13 }'
}
# busy_ticks: the guest's busy CPU time so far (user, nice, system, irq,
# softirq; all CPUs), in USER_HZ ticks.
busy_ticks() { awk '/^cpu / { print $2 + $3 + $4 + $7 + $8 }' /proc/stat; }
# switch_counts: the guest's context switches and its rescheduling and
# function-call IPIs so far (all CPUs): how often a request made some
# CPU change task or poke another.
switch_counts() {
  local ctxt ipis
  ctxt=$(awk '/^ctxt / { print $2 }' /proc/stat)
  ipis=$(awk '$1 == "RES:" || $1 == "CAL:" { for (i = 2; i <= NF && $i ~ /^[0-9]+$/; i++) n += $i } END { print n + 0 }' /proc/interrupts)
  echo "$ctxt $ipis"
}
TICK_US=$((1000000 / $(getconf CLK_TCK)))

# fio_run DEV TEST [SERVER_PID] -> "iops kib_per_s guest_us_per_io server_us_per_io
#   switches_per_io ipis_per_io"
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
  rm -f "$W/perf.data"
  (
    sleep 2
    echo "$(busy_ticks) $(server_ticks "$pid") $(switch_counts)" > "$W/cpu.0"
    if [ -n "$PERF" ]; then
      perf record -q -e cpu-clock -a -g -o "$W/perf.data" -- sleep "$RT" >/dev/null 2>&1 || sleep "$RT"
    else
      sleep "$RT"
    fi
    echo "$(busy_ticks) $(server_ticks "$pid") $(switch_counts)" > "$W/cpu.1"
  ) &
  sampler=$!
  out=$(fio --name="$t" --filename="$dev" --direct=1 --ioengine="$ENGINE" --iodepth="$qd" \
        --rw="$rw" --bs="$bs" --size="${SZ}M" --time_based --runtime="$RT" --ramp_time=2 \
        --norandommap --randrepeat=0 --output-format=terse --terse-version=3 2>"$W/fio.err") \
    || fail "fio $t on $dev failed: $(head -c 300 "$W/fio.err")"
  wait "$sampler"
  if [ -s "$W/perf.data" ]; then
    # To the console, not to stdout (the caller parses stdout).
    perf report -i "$W/perf.data" --stdio --no-children --sort comm,dso,sym -g none 2>/dev/null |
      grep -E '^ +[0-9.]+%' | head -n 30 | sed "s|^|PERF $t ${dev##*/} |" >&2
  fi
  local cpu0 cpu1
  cpu0=$(cat "$W/cpu.0") cpu1=$(cat "$W/cpu.1")
  echo "$out" | awk -F';' -v rw="$rw" -v c0="$cpu0" -v c1="$cpu1" -v rt="$RT" -v tick="$TICK_US" '$1 == 3 {
      if ($5 != 0) { print "error " $5; exit }
      if (rw ~ /read/) { iops = $8; kib = $7 } else { iops = $49; kib = $48 }
      split(c0, a, " "); split(c1, b, " ")
      ios = iops * rt
      if (ios <= 0) ios = 1
      printf "%s %s %.1f %.1f %.2f %.2f\n", iops, kib, (b[1] - a[1]) * tick / ios, (b[2] - a[2]) * tick / ios,
        (b[3] - a[3]) / ios, (b[4] - a[4]) / ios }'
}

mibps() { awk -v b="$1" 'BEGIN{printf "%.1f", b/1024}'; }

# run_pass N VMSYNC_FILE [RUBLK_FILE]: both ublk devices up over these
# files, every test on the three devices, both devices down again.
run_pass() {
  local pass=$1 vfile=$2 rfile=${3:-} t res_l res_v res_r li lb lc vi vb vc vs ri rb rc_ rs lx li_ vx vi_ rx ri_ line
  if [ -n "$PEER" ]; then
    start_replicated "$pass" "$vfile"
  else
    make_config "vm$pass" "$SZ" true "$vfile"
    [ "$QUEUES" = 1 ] || echo "ublk_queues = $QUEUES" >> "$CFG"
    create_md
    start_daemon
    wait_device
  fi
  set_scheduler "$DEV"
  RUBLKDEV= RUBLK_PID=
  if [ -n "$rfile" ]; then
    # rublk's own defaults unless BENCH_RUBLK_ARGS says otherwise (its
    # defaults: depth 128, 512 KiB buffers; vmsync's shape is "-d 64 -b 1MiB").
    # shellcheck disable=SC2086
    must "$RUBLK" add loop -n "$RUBLK_ID" -q "$QUEUES" $RUBLK_ARGS --quiet -f "$rfile"
    RUBLKDEV=/dev/ublkb$RUBLK_ID
    for _ in $(seq 1 50); do [ -b "$RUBLKDEV" ] && break; sleep 0.2; done
    [ -b "$RUBLKDEV" ] || fail "rublk did not create $RUBLKDEV"
    # The server rublk leaves running (it forks away from `rublk add`).
    RUBLK_PID=$(pgrep -n -f "$RUBLK add loop -n $RUBLK_ID") || fail "no rublk server process"
    set_scheduler "$RUBLKDEV"
  fi
  log "pass $pass: loop $LOOPDEV, vmsync $DEV on ${vfile##*/}, rublk ${RUBLKDEV:-none} on ${rfile##*/}, queues $QUEUES"
  for t in $TESTS; do
    res_l=$(fio_run "$LOOPDEV" "$t")
    res_r=
    # Which of vmsync and rublk runs first changes from pass to pass, the
    # files every other pass, so four passes hold each combination of
    # file and place once (1: A first, 2: B second, 3: A second, 4: B
    # first): neither gets the better file or place every time.
    if [ -n "$RUBLKDEV" ] && { [ $((pass % 4)) = 2 ] || [ $((pass % 4)) = 3 ]; }; then
      res_r=$(fio_run "$RUBLKDEV" "$t" "$RUBLK_PID")
      res_v=$(fio_run "$DEV" "$t" "$DAEMON_PID")
    else
      res_v=$(fio_run "$DEV" "$t" "$DAEMON_PID")
      [ -z "$RUBLKDEV" ] || res_r=$(fio_run "$RUBLKDEV" "$t" "$RUBLK_PID")
    fi
    case "$res_l $res_v $res_r" in *error*|"") fail "fio $t: loop=[$res_l] vmsync=[$res_v] rublk=[$res_r]" ;; esac
    proc_alive "$DAEMON_PID" || fail "vmsyncd died during $t"
    # Where each server's CPU went (threads alive now, ticks since start).
    for p in "$DAEMON_PID" $RUBLK_PID; do
      for task in /proc/"$p"/task/*; do
        log "threads after $t: $p $(cat "$task/comm") $(sed 's/.*) //' "$task/stat" | awk '{ print $12 + $13 }') ticks"
      done
    done
    read -r li lb lc _ lx li_ <<<"$res_l"
    read -r vi vb vc vs vx vi_ <<<"$res_v"
    line="BENCH $t pass=$pass loop_iops=$li loop_mibps=$(mibps "$lb") vmsync_iops=$vi vmsync_mibps=$(mibps "$vb")"
    line="$line loop_cpu=$lc vmsync_cpu=$vc vmsync_srv=$vs loop_ctxsw=$lx vmsync_ctxsw=$vx loop_ipi=$li_ vmsync_ipi=$vi_"
    if [ -n "$res_r" ]; then
      read -r ri rb rc_ rs rx ri_ <<<"$res_r"
      line="$line rublk_iops=$ri rublk_mibps=$(mibps "$rb") rublk_cpu=$rc_ rublk_srv=$rs rublk_ctxsw=$rx rublk_ipi=$ri_"
    fi
    echo "$line"
  done
  [ -z "$RUBLKDEV" ] || { must "$RUBLK" del -n "$RUBLK_ID"; wait_gone "$RUBLKDEV" 20 || fail "$RUBLKDEV still present"; }
  stop_daemon_clean
  if [ -n "$PEER" ]; then
    DAEMON_PID=$PEER_PID
    stop_daemon
  fi
}

# start_replicated PASS FILE: vmsync as the primary of resource "bench"
# over FILE with one peer (its backing on $W, sparse); returns once the
# device is up and the peer up to date. Sets DEV, DAEMON_PID (primary),
# PEER_PID, CFG.
start_replicated() {
  local pass=$1 vfile=$2 id p js t0
  head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' > "$W/secret"
  truncate -s "${SZ}M" "$W/peer$pass.img"
  for id in 1 2; do
    p=$((3 - id))
    {
      printf '[resource]\nname = "bench%s"\nsize = "%sMiB"\nprotocol = "C"\n\n' "$pass" "$SZ"
      printf '[node]\nid = %s\nname = "n%s"\nmetadata = "%s"\ndirect_io = true\n' "$id" "$id" "$W/n$id.$pass.meta"
      if [ "$id" = 1 ]; then printf 'backing = "%s"\n' "$vfile"; else printf 'backing = "%s"\n' "$W/peer$pass.img"; fi
      [ "$QUEUES" = 1 ] || printf 'ublk_queues = %s\n' "$QUEUES"
      printf 'listen = "127.0.0.1:%s"\ncontrol_socket = "/run/vmsync/bench%s-%s.sock"\nlan_group = "home"\n\n' "$((17890 + id))" "$pass" "$id"
      printf '[security]\nsecret_file = "%s"\n\n' "$W/secret"
      printf '[[peer]]\nid = %s\nname = "n%s"\naddress = "127.0.0.1:%s"\nlan_group = "home"\n' "$p" "$p" "$((17890 + p))"
    } > "$W/n$id.$pass.toml"
    create_md "$W/n$id.$pass.toml"
  done
  start_daemon "$W/n2.$pass.toml"
  PEER_PID=$DAEMON_PID
  start_daemon "$W/n1.$pass.toml"
  CFG=$W/n1.$pass.toml SIZE_BYTES=$((SZ * MiB))
  t0=$(date +%s)
  until "$VMSYNCCTL" --config "$CFG" status --json 2>/dev/null | grep -q '"state": "secondary"'; do
    [ $(($(date +%s) - t0)) -lt 60 ] || fail "the bench nodes did not link"
    sleep 1
  done
  must "$VMSYNCCTL" --config "$CFG" promote
  wait_device "$CFG"
  t0=$(date +%s)
  while :; do
    js=$(status_json "$CFG") || js=""
    grep -q '"state": "up-to-date"' <<<"$js" && ! grep -q '"stale_bytes": [1-9]' <<<"$js" && break
    [ $(($(date +%s) - t0)) -lt 600 ] || fail "the peer did not get up to date: $js"
    sleep 2
  done
  log "replicated primary $DEV up, peer up to date after $(($(date +%s) - t0))s"
}

if [ -n "$RUBLK" ]; then
  for pass in $(seq 1 "$PASSES"); do
    if [ $((pass % 2)) = 1 ]; then
      run_pass "$pass" "$FILE_A" "$FILE_B"
    else
      run_pass "$pass" "$FILE_B" "$FILE_A"
    fi
  done
else
  run_pass 1 "$FILE_A"
fi
must losetup -d "$LOOPDEV"
pass
