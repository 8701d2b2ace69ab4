#!/bin/bash
# bench_switch: the thesis's own experiment, side by side. A file-system
# workload on a new primary whose blocks are (almost) all stale, against the
# same workload with every block local. NOT part of `run.sh all`; run it with
# benches/switch.sh, which prepares the tarballs and prints the table.
#
# Setup: the directory server, node A (lan_group "home") and node B
# (lan_group "away"), protocol C, a sparse BENCH_SIZE_MIB (4096) device.
# Nothing is mirrored to B (other LAN group); A's WAN push to B is capped
# with `[replication] resync_rate = BENCH_RESYNC_RATE` (64KiB per second),
# so B stays essentially fully stale (0 would mean unlimited). B's
# background sync (`sync_rate`) keeps the product default (0: unlimited,
# always yielding to guest reads) unless BENCH_SYNC_RATE is set.
# On A: mkfs.ext4 (inode tables written up front: no lazy init during the
# runs), mount, extract BENCH_TREE_TAR (a plain tar of a subset of
# /usr/src/linux-source-6.1.tar.xz, >= 20,000 files), sync, umount.
#
# Workload W (the same function both times, timed with date +%s%N, page
# cache dropped right before): mount, read every file of the tree
# (find | xargs cat), untar BENCH_W_TAR (a second, smaller tarball, copied
# to the scratch disk beforehand) into a new directory, sync, umount.
#
# Order: W on A first ("local": every block local), then `vmsyncctl promote`
# on B right away (A holds everything, B almost nothing), the first O_DIRECT
# 4 KiB read on B's device, then W on B ("switched"). Both runs start with a
# cold guest page cache; the host's page cache holds the scratch disk in
# both cases (A's backing is what B fetches from). Optionally
# (BENCH_AFTER_SYNC=1, default) B's own background sync is awaited (at most
# BENCH_SYNC_WAIT s) and W runs a third time on B with everything local
# ("B synced"): the same node, so it also controls for the order.
#
# Prints:
#   BENCH switch local_s=… switched_s=… ratio=… switch_ms=… first_read_ms=… files=… stale_bytes_at_switch=…
#   BENCH switch_phase run=… mount_read_s=… untar_s=… sync_umount_s=… total_s=…
. "$REPO/tests/vm/lib.sh"
require_binaries
VMSYNC_DIRECTORY=$VMSYNC_BIN_DIR/vmsync-directory
[ -x "$VMSYNC_DIRECTORY" ] || fail "$VMSYNC_DIRECTORY missing (cargo build --release --workspace --bins)"

MIB_SIZE=${BENCH_SIZE_MIB:-4096}
RESYNC_RATE=${BENCH_RESYNC_RATE:-64KiB}
SYNC_RATE=${BENCH_SYNC_RATE:-}
AFTER_SYNC=${BENCH_AFTER_SYNC:-1}
SYNC_WAIT=${BENCH_SYNC_WAIT:-600}
SRC_XZ=/usr/src/linux-source-6.1.tar.xz
TREE_TAR=${BENCH_TREE_TAR:-}
W_TAR=${BENCH_W_TAR:-}

# Without tarballs prepared on the host (benches/switch.sh does that), cut
# them from the linux-source tarball here (slow under TCG: xz of 138 MB).
if [ -z "$TREE_TAR" ] || [ ! -r "$TREE_TAR" ] || [ -z "$W_TAR" ] || [ ! -r "$W_TAR" ]; then
  [ -r "$SRC_XZ" ] || skip "$SRC_XZ missing (apt-get install linux-source-6.1; scripts/setup.sh)"
  log "no prepared tarballs: extracting from $SRC_XZ in the guest (slow)"
  mkdir -p "$W/src"
  must tar -xJf "$SRC_XZ" -C "$W/src" linux-source-6.1/Documentation linux-source-6.1/include \
    linux-source-6.1/arch/arm linux-source-6.1/arch/powerpc \
    linux-source-6.1/kernel linux-source-6.1/lib linux-source-6.1/scripts linux-source-6.1/arch/x86
  (cd "$W/src/linux-source-6.1" && tar -cf "$W/tree.tar" Documentation include arch/arm arch/powerpc) || fail "tar tree"
  (cd "$W/src/linux-source-6.1" && tar -cf "$W/w.tar" kernel lib scripts arch/x86) || fail "tar w"
  rm -rf "$W/src"
  TREE_TAR=$W/tree.tar
  W_TAR=$W/w.tar
else
  # The second tarball lives on the scratch disk like the backing files.
  must cp "$W_TAR" "$W/w.tar"
  W_TAR=$W/w.tar
fi
log "tree tarball $TREE_TAR ($(stat -c %s "$TREE_TAR") bytes), workload tarball $W_TAR ($(stat -c %s "$W_TAR") bytes)"

SECRET=$W/secret
head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' > "$SECRET"
PORTS=(0 17991 17992)
DIR_ADDR=127.0.0.1:17990
GROUPS_OF=(none home away)

cat > "$W/directory.toml" <<EOF
[directory]
listen = "$DIR_ADDR"
state_dir = "$W/directory"

[security]
secret_file = "$SECRET"
EOF
log "+ vmsync-directory"
"$VMSYNC_DIRECTORY" --config "$W/directory.toml" > "$W/directory.log" 2>&1 &
DIR_PID=$!
echo "$DIR_PID" >> "$VMTEST_PIDS_FILE"
DAEMON_LOGS+=("$W/directory.log")

node_config() { # ID
  local id=$1 p=$((3 - $1))
  truncate -s "${MIB_SIZE}M" "$W/n$id.img"
  cat > "$W/n$id.toml" <<EOF
[resource]
name = "bench"
size = "${MIB_SIZE}MiB"
protocol = "C"

[node]
id = $id
name = "n$id"
backing = "$W/n$id.img"
metadata = "$W/n$id.meta"
listen = "127.0.0.1:${PORTS[$id]}"
control_socket = "/run/vmsync/bench-n$id.sock"
lan_group = "${GROUPS_OF[$id]}"

[directory]
address = "$DIR_ADDR"
report_interval_ms = 1000

[security]
secret_file = "$SECRET"

[replication]
# The WAN push from the primary to the other LAN group is kept tiny, so the
# node that takes over is essentially fully stale (0 would be unlimited).
resync_rate = "$RESYNC_RATE"
EOF
  [ -z "$SYNC_RATE" ] || echo "sync_rate = \"$SYNC_RATE\"" >> "$W/n$id.toml"
  cat >> "$W/n$id.toml" <<EOF

[[peer]]
id = $p
name = "n$p"
address = "127.0.0.1:${PORTS[$p]}"
lan_group = "${GROUPS_OF[$p]}"
EOF
}

declare -A PIDS
for id in 1 2; do
  node_config "$id"
  create_md "$W/n$id.toml"
  start_daemon "$W/n$id.toml"
  PIDS[$id]=$DAEMON_PID
done
log "node config (n1):"; sed 's/^/    /' "$W/n1.toml"

promote() { # ID [ARGS]: prints vmsyncctl's output, returns its status
  local id=$1; shift
  "$VMSYNCCTL" --config "$W/n$id.toml" promote "$@" 2>&1
}

sync_left() { # ID: bytes node ID still lacks
  status_json "$W/n$1.toml" | tr -d ' \n' | sed -n 's/.*"sync":{[^}]*"stale_bytes":\([0-9]*\).*/\1/p'
}

wait_own_sync() { # ID TIMEOUT: node ID's background sync done (every block local).
  # Not the peer: B's own writes reach A only through the capped WAN push.
  local id=$1 timeout=$2 t0 js
  t0=$(date +%s)
  while :; do
    js=$(status_json "$W/n$id.toml" | tr -d ' \n') || js=""
    grep -q '"sync":{"state":"none","stale_bytes":0' <<<"$js" && return 0
    [ $(($(date +%s) - t0)) -lt "$timeout" ] || { log "status of n$id: $js"; return 1; }
    sleep 5
  done
}

ms_since() { echo $(( ($(date +%s%N) - $1) / 1000000 )); }
secs() { awk -v n="$1" 'BEGIN { printf "%.2f", n / 1e9 }'; }

M=$W/mnt
mkdir -p "$M"

# workload TAG DEV: the timed workload W; sets RUN_NS and prints a phase line.
workload() {
  local tag=$1 dev=$2 t0 t1 t2 t3
  sync
  echo 3 > /proc/sys/vm/drop_caches
  log "workload W ($tag) on $dev"
  t0=$(date +%s%N)
  mount -t ext4 "$dev" "$M" || fail "W($tag): mount failed"
  find "$M/tree" -type f -print0 | xargs -0 cat > /dev/null || fail "W($tag): reading the tree failed"
  t1=$(date +%s%N)
  mkdir "$M/w.$tag" && tar -xf "$W_TAR" -C "$M/w.$tag" || fail "W($tag): untar failed"
  t2=$(date +%s%N)
  sync
  umount "$M" || fail "W($tag): umount failed"
  t3=$(date +%s%N)
  RUN_NS=$((t3 - t0))
  echo "BENCH switch_phase run=$tag mount_read_s=$(secs $((t1 - t0))) untar_s=$(secs $((t2 - t1))) sync_umount_s=$(secs $((t3 - t2))) total_s=$(secs "$RUN_NS")"
}

# ---- A: primary, file system with the tree ----------------------------------
SIZE_BYTES=$((MIB_SIZE * MiB))
out=$(promote 1) || fail "promote n1 failed: $out"
log "$out"
CFG=$W/n1.toml DAEMON_PID=${PIDS[1]}
wait_device "$W/n1.toml"
DEV_A=$DEV
must mkfs.ext4 -q -F -E lazy_itable_init=0,lazy_journal_init=0 "$DEV_A"
must mount -t ext4 "$DEV_A" "$M"
mkdir -p "$M/tree"
t0=$(date +%s%N)
tar -xf "$TREE_TAR" -C "$M/tree" || fail "extracting the tree failed"
must sync
log "tree extracted in $(ms_since "$t0") ms"
FILES=$(find "$M/tree" -type f | wc -l)
TREE_KIB=$(du -sk "$M/tree" | awk '{print $1}')
WFILES=$(tar -tf "$W_TAR" | grep -vc '/$')
log "tree: $FILES files, $TREE_KIB KiB on ext4; workload tarball: $WFILES files"
must umount "$M"
[ "$FILES" -ge 20000 ] || log "note: only $FILES files (< 20000)"

# ---- run 1: every block local (on A) -----------------------------------------
workload local "$DEV_A"
LOCAL_NS=$RUN_NS
log "local run: $(secs "$LOCAL_NS") s; n1's view of n2: $(status_json "$W/n1.toml" | tr -d ' \n' | grep -o '"state":"[^"]*","protocol":"[AC]","stale_bytes":[0-9]*')"

# ---- the switch to B -----------------------------------------------------------
proc_alive "${PIDS[2]}" || fail "n2 died before the switch"
t0=$(date +%s%N)
out=$(promote 2) || fail "promote n2 failed: $out"
t1=$(date +%s%N)
# The device path and the missing bytes come from promote's own answer
# ("primary (term 2), device /dev/ublkbN; M bytes are fetched ..."): a
# status call right now would wait behind the starting background sync.
DEV_B=$(sed -n 's/.*device \(\/dev\/ublkb[0-9]*\).*/\1/p' <<<"$out")
[ -n "$DEV_B" ] && [ -b "$DEV_B" ] || fail "no device on n2 right after promote returned: $out"
t2=$(date +%s%N)
# The device's last 4 KiB block: certainly stale on B (A's slow push starts
# at the front, the background sync with A's hot extents).
dd if="$DEV_B" of=/dev/null bs=4k count=1 skip=$((SIZE_BYTES / 4096 - 1)) iflag=direct status=none || fail "first read on $DEV_B failed"
t3=$(date +%s%N)
SWITCH_MS=$(( (t1 - t0) / 1000000 ))
FIRST_READ_MS=$(( (t3 - t0) / 1000000 ))
DD_MS=$(( (t3 - t2) / 1000000 ))
STALE=$(sed -n 's/.* \([0-9][0-9]*\) bytes are fetched.*/\1/p' <<<"$out")
log "$out"
log "switch: promote ${SWITCH_MS} ms, promote + first read ${FIRST_READ_MS} ms (the dd alone ${DD_MS} ms); n2 lacks ${STALE:-?} of ${SIZE_BYTES} bytes (promote's answer), $(sync_left 2) a moment later (status)"
[ "$DEV_B" = "$DEV_A" ] || wait_gone "$DEV_A" 20 || fail "n1's device still present after the switch"
CFG=$W/n2.toml DAEMON_PID=${PIDS[2]}

# ---- run 2: right after the switch, on B (stale) -------------------------------
workload switched "$DEV_B"
SWITCHED_NS=$RUN_NS
js=$(status_json "$W/n2.toml" | tr -d ' \n')
LEFT_AFTER=$(sed -n 's/.*"sync":{[^}]*"stale_bytes":\([0-9]*\).*/\1/p' <<<"$js")
ONDEMAND=$(sed -n 's/.*"sync":{[^}]*"on_demand_fetches":\([0-9]*\).*/\1/p' <<<"$js")
FETCHED=$(sed -n 's/.*"sync":{[^}]*"fetched_bytes":\([0-9]*\).*/\1/p' <<<"$js")
log "switched run: $(secs "$SWITCHED_NS") s; n2 sync status afterwards: $(grep -o '"sync":{[^}]*}' <<<"$js")"
[ -z "$(kernel_errors)" ] || fail "kernel I/O errors: $(kernel_errors | head -n 3)"
# When B's background sync finished (if it did), seconds after it started.
BG_DONE=$(sed -e 's/\x1b\[[0-9;]*m//g' "${DAEMON_LOGS[2]}" | sed -n 's/.*background sync complete.* seconds=\([0-9.]*\).*/\1/p' | tail -n1)
if [ -n "$BG_DONE" ]; then log "n2's background sync: complete after ${BG_DONE}s"; else log "n2's background sync: not complete yet"; fi
grep -a -E 'WARN|ERROR' "$W"/vmsyncd.*.log | head -n 20

RATIO=$(awk -v s="$SWITCHED_NS" -v l="$LOCAL_NS" 'BEGIN { printf "%.2f", s / l }')
echo "BENCH switch local_s=$(secs "$LOCAL_NS") switched_s=$(secs "$SWITCHED_NS") ratio=$RATIO switch_ms=$SWITCH_MS first_read_ms=$FIRST_READ_MS files=$FILES stale_bytes_at_switch=$STALE size_bytes=$SIZE_BYTES stale_after_run=${LEFT_AFTER:-?} fetched_bytes=${FETCHED:-?} on_demand_fetches=${ONDEMAND:-?} bg_sync_s=${BG_DONE:-running} workload_files=$WFILES tree_kib=$TREE_KIB"

# ---- optional run 3: on B again once its background sync is done --------------
if [ "$AFTER_SYNC" = 1 ]; then
  t0=$(date +%s)
  if wait_own_sync 2 "$SYNC_WAIT"; then
    log "n2's background sync finished after $(($(date +%s) - t0)) s more"
    workload synced "$DEV_B"
    echo "BENCH switch_synced synced_s=$(secs "$RUN_NS") ratio_to_local=$(awk -v s="$RUN_NS" -v l="$LOCAL_NS" 'BEGIN { printf "%.2f", s / l }') switched_to_synced=$(awk -v s="$SWITCHED_NS" -v l="$RUN_NS" 'BEGIN { printf "%.2f", s / l }')"
  else
    log "n2 not synced after ${SYNC_WAIT}s (still lacks $(sync_left 2) bytes): no third run"
  fi
fi

# ---- sanity and teardown --------------------------------------------------------
# Through B's device (fetching whatever is still missing): the file system is clean.
must e2fsck -fn "$DEV_B"
out=$("$VMSYNCCTL" --config "$W/n2.toml" demote 2>&1) || fail "demote failed: $out"
for id in 1 2; do
  DAEMON_PID=${PIDS[$id]}
  stop_daemon
  [ "$DAEMON_RC" -eq 0 ] || fail "n$id exited with $DAEMON_RC"
done
kill -TERM "$DIR_PID" 2>/dev/null
pass
