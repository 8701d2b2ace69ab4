#!/bin/bash
# crash_torture: three nodes on the guest's loopback, protocol C. For
# VMT_TORTURE_ROUNDS rounds (default 5): a writer puts self-checking 4 KiB
# records on the primary's /dev/ublkbN (O_DIRECT, fsync after every four)
# and logs every record the device acknowledged; a random node (the
# primary included) is SIGKILLed at a random moment; if it was the primary,
# a random survivor is promoted; the killed node is restarted. Then every
# acknowledged record must read back from the (new) primary's device, and
# at the end, once resynced, the three backings are byte-identical.
#
# One guest holds all three nodes, so when the primary is killed the node
# promoted next re-attaches the ublk device the dead one left (they share
# the resource name): the writer's held I/O goes on there. Across machines
# that I/O would fail instead; either way nothing acknowledged may be lost.
. "$REPO/tests/vm/lib.sh"
require_binaries
ROUNDS=${VMT_TORTURE_ROUNDS:-5}
MIB_SIZE=64
SLOTS=$((MIB_SIZE * MiB / 4096))
RECORDS=$REPO/tests/vm/tools/records.py
command -v python3 >/dev/null || skip "python3 not installed (scripts/setup.sh installs it)"
SECRET=$W/secret
head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' > "$SECRET"
PORTS=(0 17891 17892 17893)

node_config() { # ID
  local id=$1 p
  truncate -s "${MIB_SIZE}M" "$W/n$id.img"
  {
    printf '[resource]\nname = "tort"\nsize = "%sMiB"\nprotocol = "C"\n\n' "$MIB_SIZE"
    printf '[node]\nid = %s\nname = "n%s"\nbacking = "%s"\nmetadata = "%s"\n' "$id" "$id" "$W/n$id.img" "$W/n$id.meta"
    printf 'listen = "127.0.0.1:%s"\ncontrol_socket = "/run/vmsync/tort%s.sock"\nlan_group = "home"\n\n' "${PORTS[$id]}" "$id"
    printf '[security]\nsecret_file = "%s"\n' "$SECRET"
    for p in 1 2 3; do
      [ "$p" = "$id" ] && continue
      printf '\n[[peer]]\nid = %s\nname = "n%s"\naddress = "127.0.0.1:%s"\nlan_group = "home"\n' "$p" "$p" "${PORTS[$p]}"
    done
  } > "$W/n$id.toml"
}

declare -A PIDS
start_node() { # ID
  start_daemon "$W/n$1.toml"
  PIDS[$1]=$DAEMON_PID
}

# wait_synced ID TIMEOUT: node ID is primary, every peer up to date, nothing stale.
wait_synced() {
  local id=$1 timeout=$2 t0 js
  t0=$(date +%s)
  while :; do
    js=$(status_json "$W/n$id.toml") || js=""
    if [ "$(grep -c '"state": "up-to-date"' <<<"$js")" -eq 2 ] && ! grep -q '"stale_bytes": [1-9]' <<<"$js"; then
      return 0
    fi
    [ $(($(date +%s) - t0)) -lt "$timeout" ] || { log "status of n$id: $js"; return 1; }
    sleep 1
  done
}

# wait_linked ID: every peer of node ID connected.
wait_linked() {
  local id=$1 t0 js
  t0=$(date +%s)
  while :; do
    js=$(status_json "$W/n$id.toml") || js=""
    [ "$(grep -c '"connected": true' <<<"$js")" -eq 2 ] && return 0
    [ $(($(date +%s) - t0)) -lt 60 ] || { log "status of n$id: $js"; return 1; }
    sleep 0.5
  done
}

promote() { # ID: retried while the killed primary still counts as connected
  local id=$1 out t0
  t0=$(date +%s)
  until out=$("$VMSYNCCTL" --config "$W/n$id.toml" promote 2>&1); do
    [ $(($(date +%s) - t0)) -lt 30 ] || fail "promote n$id: $out"
    sleep 0.5
  done
  log "promote n$id: $out"
}

device_of() { # ID
  local js dev t0
  t0=$(date +%s)
  while :; do
    js=$(status_json "$W/n$1.toml") && dev=$(json_get device <<<"$js") || dev=""
    [ -n "$dev" ] && [ -b "$dev" ] && { echo "$dev"; return 0; }
    [ $(($(date +%s) - t0)) -lt 60 ] || return 1
    sleep 0.5
  done
}

for id in 1 2 3; do
  node_config "$id"
  create_md "$W/n$id.toml"
  start_node "$id"
done
for id in 1 2 3; do wait_linked "$id" || fail "n$id did not link"; done
P=1
promote "$P"
DEV=$(device_of "$P") || fail "no device on n$P"
wait_synced "$P" 120 || fail "initial sync did not finish"

ACK=$W/acked
: > "$ACK"
NEXT=0
WPID=""
start_writer() {
  rm -f "$W/stop"
  python3 "$RECORDS" write "$DEV" "$ACK" "$NEXT" "$SLOTS" "$W/stop" 2>>"$W/writer.err" &
  WPID=$!
  echo "$WPID" >> "$VMTEST_PIDS_FILE"
}
stop_writer() { # the writer's exit status in WRC
  touch "$W/stop"
  local t0
  t0=$(date +%s)
  while proc_alive "$WPID"; do
    [ $(($(date +%s) - t0)) -lt 90 ] || fail "the writer did not stop (I/O stuck?)"
    sleep 0.3
  done
  wait "$WPID"; WRC=$?
  NEXT=$(( $(tail -n1 "$ACK" 2>/dev/null || echo -4) + 1000 ))
}
acked() { wc -l < "$ACK"; }

for round in $(seq 1 "$ROUNDS"); do
  before=$(acked)
  start_writer
  # A random moment, once the writer is going.
  t0=$(date +%s)
  while [ "$(acked)" -lt $((before + 8)) ]; do
    proc_alive "$WPID" || fail "round $round: the writer died: $(tail -n2 "$W/writer.err")"
    [ $(($(date +%s) - t0)) -lt 60 ] || fail "round $round: the writer made no progress"
    sleep 0.2
  done
  sleep "$((RANDOM % 3)).$((RANDOM % 10))"
  victim=$((1 + RANDOM % 3))
  log "round $round: $(($(acked) - before)) records acknowledged so far; SIGKILL n$victim (primary n$P)"
  kill -KILL "${PIDS[$victim]}"
  wait "${PIDS[$victim]}" 2>/dev/null
  if [ "$victim" = "$P" ]; then
    others=()
    for id in 1 2 3; do [ "$id" = "$victim" ] || others+=("$id"); done
    P=${others[$((RANDOM % 2))]}
    promote "$P"
    DEV=$(device_of "$P") || fail "round $round: no device on n$P after promote"
    log "round $round: n$P is primary with $DEV"
  fi
  start_node "$victim"
  stop_writer
  [ "$WRC" -eq 0 ] || fail "round $round: the writer failed (rc=$WRC): $(tail -n2 "$W/writer.err")"
  log "round $round: $(($(acked) - before)) records acknowledged in the round"
  wait_synced "$P" 180 || fail "round $round: peers of n$P did not resync"
  out=$(python3 "$RECORDS" check "$DEV" "$ACK" "$SLOTS") || fail "round $round: $out"
  log "round $round: $out"
done

# Every replica equal, with nothing in flight.
wait_synced "$P" 120 || fail "final resync did not finish"
for id in 1 2 3; do
  [ "$id" = "$P" ] && continue
  cmp "$W/n$P.img" "$W/n$id.img" >/dev/null || fail "n$id's backing differs from the primary n$P's: $(cmp "$W/n$P.img" "$W/n$id.img" 2>&1 | head -n1)"
done
log "$(acked) acknowledged records over $ROUNDS rounds all read back; the three backings are identical"
pass
