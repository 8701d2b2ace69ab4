#!/bin/bash
# superseded_primary: a killed primary whose peer was promoted meanwhile
# must not resume its device. n1 (primary, /dev/ublkbN) is SIGKILLed under a
# writer of self-checking records, whose I/O the kernel then holds; n2 is
# promoted (on a block socket, so it does not re-attach n1's device, as a
# second machine would not). Restarted, n1 sees that n2 is primary: the
# held I/O fails with EIO, /dev/ublkbN is removed, n1 stays secondary and is
# resynced. Handed back to n1 (demote n2, promote n1), every acknowledged
# record reads back.
. "$REPO/tests/vm/lib.sh"
require_binaries
command -v python3 >/dev/null || skip "python3 not installed (scripts/setup.sh installs it)"
MIB_SIZE=32
SLOTS=$((MIB_SIZE * MiB / 4096))
RECORDS=$REPO/tests/vm/tools/records.py
SECRET=$W/secret
head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' > "$SECRET"
PORTS=(0 18091 18092)

node_config() { # ID OTHER [BLOCK_SOCKET]
  truncate -s "${MIB_SIZE}M" "$W/n$1.img"
  {
    printf '[resource]\nname = "sup"\nsize = "%sMiB"\nprotocol = "C"\n\n' "$MIB_SIZE"
    printf '[node]\nid = %s\nname = "n%s"\nbacking = "%s"\nmetadata = "%s"\n' "$1" "$1" "$W/n$1.img" "$W/n$1.meta"
    printf 'listen = "127.0.0.1:%s"\ncontrol_socket = "/run/vmsync/sup%s.sock"\nlan_group = "home"\n' "${PORTS[$1]}" "$1"
    [ -z "${3:-}" ] || printf 'block_socket = "%s"\n' "$3"
    printf '\n[security]\nsecret_file = "%s"\n' "$SECRET"
    printf '\n[[peer]]\nid = %s\nname = "n%s"\naddress = "127.0.0.1:%s"\nlan_group = "home"\n' "$2" "$2" "${PORTS[$2]}"
  } > "$W/n$1.toml"
}
declare -A PIDS LOGS
start_node() { start_daemon "$W/n$1.toml"; PIDS[$1]=$DAEMON_PID; LOGS[$1]=$DAEMON_LOG; }
field() { status_json "$W/n$1.toml" | python3 -c "import json,sys; s=json.load(sys.stdin); print($2)" 2>/dev/null; }
wait_until() { # TIMEOUT WHAT CMD...
  local timeout=$1 what=$2 t0
  shift 2
  t0=$(date +%s)
  until "$@"; do
    [ $(($(date +%s) - t0)) -lt "$timeout" ] || fail "$what (after ${timeout}s)"
    sleep 0.5
  done
}
is() { [ "$("${@:2}")" = "$1" ]; }
ctl() { local id=$1; shift; "$VMSYNCCTL" --config "$W/n$id.toml" "$@" 2>&1; }

node_config 1 2
node_config 2 1 "$W/n2.blk"
for id in 1 2; do create_md "$W/n$id.toml"; start_node "$id"; done
wait_until 60 "n1 did not link" is True field 1 "s['peers'][0]['connected']"
out=$(ctl 1 promote) || fail "promote n1: $out"
DEV=$(field 1 "s['device']")
[ -b "$DEV" ] || fail "no device on n1"
wait_until 120 "initial sync" is up-to-date field 1 "s['peers'][0]['state']"

ACK=$W/acked
: > "$ACK"
python3 "$RECORDS" write "$DEV" "$ACK" 0 "$SLOTS" "$W/stop" 2>"$W/writer.err" &
WPID=$!
echo "$WPID" >> "$VMTEST_PIDS_FILE"
acked_at_least() { [ "$(wc -l < "$ACK")" -ge "$1" ]; }
wait_until 60 "the writer made no progress" acked_at_least 40
log "+ kill -9 n1 (primary) with $(wc -l < "$ACK") records acknowledged"
kill -KILL "${PIDS[1]}"; wait "${PIDS[1]}" 2>/dev/null
sleep 1
[ -b "$DEV" ] || fail "$DEV vanished with its daemon (no user recovery?)"
proc_alive "$WPID" || fail "the writer ended while the kernel should hold its I/O: $(cat "$W/writer.err")"
acked_at_kill=$(wc -l < "$ACK")
out=$(ctl 2 promote) || fail "promote n2: $out"
log "promote n2: $out"

start_node 1
t0=$(date +%s)
while proc_alive "$WPID"; do
  [ $(($(date +%s) - t0)) -lt 60 ] || fail "the writer's held I/O was not failed after n1's restart"
  sleep 0.3
done
wait "$WPID"; WRC=$?
[ "$WRC" -eq 3 ] && grep -q "Input/output error" "$W/writer.err" || fail "the writer did not get EIO (rc=$WRC): $(cat "$W/writer.err")"
[ "$(wc -l < "$ACK")" -eq "$acked_at_kill" ] || fail "writes were acknowledged after n1 was killed"
log "writer: $(tail -n1 "$W/writer.err")"
wait_gone "$DEV" 20 || fail "$DEV still present on the superseded n1"
grep -q "waiting for recovery, but peer n2 (id 2) is primary" "${LOGS[1]}" || fail "n1's log does not say why it did not resume"
[ "$(field 1 "s['role']")" = secondary ] || fail "n1 is $(field 1 "s['role']")"
wait_until 120 "n1 was not resynced" is up-to-date field 2 "s['peers'][0]['state']"

out=$(ctl 2 demote) || fail "demote n2: $out"
out=$(ctl 1 promote) || fail "promote n1 again: $out"
DEV=$(field 1 "s['device']")
[ -b "$DEV" ] || fail "no device on n1 after promote"
out=$(python3 "$RECORDS" check "$DEV" "$ACK" "$SLOTS") || fail "$out"
log "$out"
cmp "$W/n1.img" "$W/n2.img" >/dev/null || fail "backings differ"
pass
