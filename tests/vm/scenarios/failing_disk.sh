#!/bin/bash
# failing_disk: backing devices that start failing (device-mapper, as DRBD's
# on-io-error=detach is tested). Three nodes, protocol C, O_DIRECT; n1 and
# n2 store their replica on dm devices (dm-linear over a loop device), n3 on
# a file.
#  1. n2's table is switched to dm-error under a running writer: every write
#     on the primary n1 keeps succeeding, n2's disk state goes `failed` (with
#     an error line naming the device and the operation), n1 shows n2
#     `failed` and collects the writes in its bitmap. Switched back and n2's
#     daemon restarted, n2 is resynced and the backings end identical.
#  2. Then n1's own table fails: the writer's write fails with EIO, n1's disk
#     state is `failed`; demote n1 and promote n2: every acknowledged record
#     is there. n1, repaired and restarted, is resynced; backings identical.
. "$REPO/tests/vm/lib.sh"
require_binaries
command -v dmsetup >/dev/null || skip "dmsetup not installed (scripts/setup.sh installs it)"
command -v python3 >/dev/null || skip "python3 not installed (scripts/setup.sh installs it)"
[ -e /dev/mapper/control ] || modprobe dm_mod 2>/dev/null || insmod_failed=1
[ -e /dev/mapper/control ] || skip "no device-mapper in this kernel (dm_mod not in the initramfs?)"
export DM_DISABLE_UDEV=1   # no udev in the guest: libdevmapper makes the nodes itself
MIB_SIZE=32
SECTORS=$((MIB_SIZE * MiB / 512))
SLOTS=$((MIB_SIZE * MiB / 4096))
RECORDS=$REPO/tests/vm/tools/records.py
SECRET=$W/secret
head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' > "$SECRET"
PORTS=(0 17991 17992 17993)

declare -A LOOP RAW BACKING PIDS
for id in 1 2; do
  RAW[$id]=$W/n$id.raw
  truncate -s "${MIB_SIZE}M" "${RAW[$id]}"
  LOOP[$id]=$(losetup -f --show "${RAW[$id]}") || fail "losetup for n$id"
  must dmsetup create "vmt_n$id" --table "0 $SECTORS linear ${LOOP[$id]} 0"
  BACKING[$id]=/dev/mapper/vmt_n$id
  [ -b "${BACKING[$id]}" ] || fail "${BACKING[$id]} did not appear"
done
RAW[3]=$W/n3.img
truncate -s "${MIB_SIZE}M" "${RAW[3]}"
BACKING[3]=${RAW[3]}

dm_table() { # ID linear|error
  local t
  case $2 in
    linear) t="0 $SECTORS linear ${LOOP[$1]} 0" ;;
    error) t="0 $SECTORS error" ;;
  esac
  log "+ dmsetup suspend/load/resume vmt_n$1: $2"
  dmsetup suspend "vmt_n$1" && dmsetup load "vmt_n$1" --table "$t" && dmsetup resume "vmt_n$1" \
    || fail "switching vmt_n$1 to $2"
}

node_config() { # ID
  local id=$1 p
  {
    printf '[resource]\nname = "fdisk"\nsize = "%sMiB"\nprotocol = "C"\n\n' "$MIB_SIZE"
    printf '[node]\nid = %s\nname = "n%s"\nbacking = "%s"\nmetadata = "%s"\ndirect_io = true\n' "$id" "$id" "${BACKING[$id]}" "$W/n$id.meta"
    printf 'listen = "127.0.0.1:%s"\ncontrol_socket = "/run/vmsync/fdisk%s.sock"\nlan_group = "home"\n\n' "${PORTS[$id]}" "$id"
    printf '[security]\nsecret_file = "%s"\n' "$SECRET"
    for p in 1 2 3; do
      [ "$p" = "$id" ] && continue
      printf '\n[[peer]]\nid = %s\nname = "n%s"\naddress = "127.0.0.1:%s"\nlan_group = "home"\n' "$p" "$p" "${PORTS[$p]}"
    done
  } > "$W/n$id.toml"
}

start_node() { start_daemon "$W/n$1.toml"; PIDS[$1]=$DAEMON_PID; LOGS[$1]=$DAEMON_LOG; }
declare -A LOGS
stop_node() { # ID: SIGTERM, must exit 0
  DAEMON_PID=${PIDS[$1]}
  stop_daemon
  [ "$DAEMON_RC" -eq 0 ] || fail "n$1 exited with $DAEMON_RC on SIGTERM"
}

# field ID EXPR: a value from node ID's status, EXPR in Python over `s`.
field() {
  status_json "$W/n$1.toml" | python3 -c "import json,sys; s=json.load(sys.stdin); print($2)" 2>/dev/null
}
peer_state() { field "$1" "[p['state'] for p in s['peers'] if p['id']==$2][0]"; }
wait_until() { # TIMEOUT WHAT CMD...: until CMD succeeds
  local timeout=$1 what=$2 t0
  shift 2
  t0=$(date +%s)
  until "$@"; do
    [ $(($(date +%s) - t0)) -lt "$timeout" ] || fail "$what (after ${timeout}s)"
    sleep 0.5
  done
}
is() { [ "$("${@:2}")" = "$1" ]; }   # is VALUE CMD...
synced() { # ID: primary with every peer up to date, nothing stale
  local js
  js=$(status_json "$W/n$1.toml") || return 1
  [ "$(grep -c '"state": "up-to-date"' <<<"$js")" -eq 2 ] && ! grep -q '"stale_bytes": [1-9]' <<<"$js"
}
linked() { [ "$(status_json "$W/n$1.toml" | grep -c '"connected": true')" -eq 2 ]; }
identical() { # every backing equal
  cmp "${RAW[1]}" "${RAW[2]}" >/dev/null && cmp "${RAW[1]}" "${RAW[3]}" >/dev/null
}

for id in 1 2 3; do
  node_config "$id"
  create_md "$W/n$id.toml"
  start_node "$id"
done
for id in 1 2 3; do wait_until 60 "n$id did not link" linked "$id"; done
out=$("$VMSYNCCTL" --config "$W/n1.toml" promote 2>&1) || fail "promote n1: $out"
DEV=$(field 1 "s['device']")
[ -b "$DEV" ] || fail "no device on n1: $DEV"
wait_until 120 "initial sync" synced 1

ACK=$W/acked
: > "$ACK"
WPID=""
start_writer() { # FIRST_SEQ
  rm -f "$W/stop"
  python3 "$RECORDS" write "$DEV" "$ACK" "$1" "$SLOTS" "$W/stop" 2>>"$W/writer.err" &
  WPID=$!
  echo "$WPID" >> "$VMTEST_PIDS_FILE"
}
wait_acked() { # N: N more records acknowledged, writer alive
  local want=$(( $(wc -l < "$ACK") + $1 )) t0
  t0=$(date +%s)
  while [ "$(wc -l < "$ACK")" -lt "$want" ]; do
    proc_alive "$WPID" || fail "the writer died: $(tail -n2 "$W/writer.err")"
    [ $(($(date +%s) - t0)) -lt 60 ] || fail "the writer made no progress"
    sleep 0.2
  done
}
writer_exit() { # waits; WRC
  local t0
  t0=$(date +%s)
  while proc_alive "$WPID"; do
    [ $(($(date +%s) - t0)) -lt 60 ] || fail "the writer did not end"
    sleep 0.2
  done
  wait "$WPID"; WRC=$?
}

# ---- 1. a peer's disk fails ---------------------------------------------
start_writer 0
wait_acked 40
dm_table 2 error
wait_until 60 "n2's disk state did not go failed: $(field 2 "s['disk']")" is failed field 2 "s['disk']"
wait_until 60 "n1 does not show n2 failed: $(peer_state 1 2)" is failed peer_state 1 2
grep -q "backing device failed: .*${BACKING[2]}" "${LOGS[2]}" || fail "no error line naming ${BACKING[2]} in n2's log"
log "n2: $(grep -m1 -o 'backing device failed: [^;]*' "${LOGS[2]}")"
wait_acked 80   # the guest's writes go on
touch "$W/stop"; writer_exit
[ "$WRC" -eq 0 ] || fail "the writer failed while a peer's disk failed: $(tail -n2 "$W/writer.err")"
stale=$(field 1 "[p['stale_bytes'] for p in s['peers'] if p['id']==2][0]")
[ "${stale:-0}" -gt 0 ] || fail "n1 marked nothing for the failed n2"
[ "$(peer_state 1 3)" = up-to-date ] || fail "n3 is $(peer_state 1 3)"
out=$(python3 "$RECORDS" check "$DEV" "$ACK" "$SLOTS") || fail "on n1: $out"
log "n1 after n2 failed ($stale bytes marked for n2): $out"

dm_table 2 linear
stop_node 2
start_node 2
wait_until 120 "n2 was not resynced after its restart: $(peer_state 1 2)" synced 1
[ "$(field 2 "s['disk']")" = up-to-date ] || fail "n2's disk is $(field 2 "s['disk']") after the resync"
identical || fail "backings differ after n2's resync"
log "n2 re-attached and resynced; the three backings are identical"

# ---- 2. the primary's disk fails ----------------------------------------
start_writer 100000
wait_acked 40
dm_table 1 error
writer_exit
[ "$WRC" -eq 3 ] || fail "the writer did not get an I/O error from the failed primary (rc=$WRC)"
grep -q "Input/output error" "$W/writer.err" || fail "the writer's error is not EIO: $(tail -n1 "$W/writer.err")"
log "writer: $(tail -n1 "$W/writer.err")"
[ "$(field 1 "s['disk']")" = failed ] || fail "n1's disk state is $(field 1 "s['disk']"), not failed"
grep -q "backing device failed: .*${BACKING[1]}" "${LOGS[1]}" || fail "no error line naming ${BACKING[1]} in n1's log"
out=$("$VMSYNCCTL" --config "$W/n1.toml" demote 2>&1) || fail "demote of the failed n1: $out"
case "$out" in *"every peer holds every write"*) log "demote n1: $out" ;; *) fail "demote n1: $out" ;; esac
out=$("$VMSYNCCTL" --config "$W/n2.toml" promote 2>&1) || fail "promote n2: $out"
DEV=$(field 2 "s['device']")
[ -b "$DEV" ] || fail "no device on n2: $DEV"
out=$(python3 "$RECORDS" check "$DEV" "$ACK" "$SLOTS") || fail "on n2 after failover: $out"
log "n2 after failover: $out"

dm_table 1 linear
stop_node 1
start_node 1
wait_until 180 "n1 was not resynced after its restart" synced 2
identical || fail "backings differ after n1's resync"
log "n1 re-attached and resynced; the three backings are identical"
pass
