#!/bin/bash
# machine_switch: the directory server and two nodes in different LAN groups
# (so nothing is mirrored from A to B; B is pushed to slowly). ext4 with
# files on A's /dev/ublkbN. Promoting B while A's device is mounted is
# refused with A's reason; after unmounting, `promote` on B exposes B's
# device at once, the file system mounts there right away and every file's
# checksum matches while most blocks are still fetched on demand. The
# background sync finishes, the backing files become identical, and the
# switch back to A works the same way.
. "$REPO/tests/vm/lib.sh"
require_binaries
VMSYNC_DIRECTORY=$VMSYNC_BIN_DIR/vmsync-directory
[ -x "$VMSYNC_DIRECTORY" ] || fail "$VMSYNC_DIRECTORY missing (cargo build --release --workspace)"

MIB_SIZE=128
SECRET=$W/secret
head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' > "$SECRET"
PORTS=(0 17891 17892)
DIR_ADDR=127.0.0.1:17890
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
name = "switch"
size = "${MIB_SIZE}MiB"
protocol = "C"

[node]
id = $id
name = "n$id"
backing = "$W/n$id.img"
metadata = "$W/n$id.meta"
listen = "127.0.0.1:${PORTS[$id]}"
control_socket = "/run/vmsync/n$id.sock"
lan_group = "${GROUPS_OF[$id]}"

[directory]
address = "$DIR_ADDR"
report_interval_ms = 1000

[security]
secret_file = "$SECRET"

[replication]
# Keep the WAN push slow (wan_rate: resync_rate is for LAN peers), so B
# really is stale when it takes over, and B's background pull too, so its
# reads really are fetched on demand.
resync_rate = "1MiB"
wan_rate = "512KiB"
sync_rate = "2MiB"

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

promote() { # ID [ARGS]: prints vmsyncctl's output, returns its status
  local id=$1; shift
  "$VMSYNCCTL" --config "$W/n$id.toml" promote "$@" 2>&1
}

sync_left() { # ID: bytes node ID still lacks
  status_json "$W/n$1.toml" | tr -d ' \n' | sed -n 's/.*"sync":{[^}]*"stale_bytes":\([0-9]*\).*/\1/p'
}

wait_synced() { # ID TIMEOUT: background sync done and the peer up to date
  local id=$1 timeout=$2 t0 js
  t0=$(date +%s)
  while :; do
    js=$(status_json "$W/n$id.toml" | tr -d ' \n') || js=""
    if grep -q '"sync":{"state":"none","stale_bytes":0' <<<"$js" \
       && grep -q '"state":"up-to-date","protocol":"C","stale_bytes":0' <<<"$js"; then
      return 0
    fi
    [ $(($(date +%s) - t0)) -lt "$timeout" ] || { log "status of n$id: $js"; return 1; }
    sleep 1
  done
}

SIZE_BYTES=$((MIB_SIZE * MiB))
out=$(promote 1) || fail "promote n1 failed: $out"
log "$out"
CFG=$W/n1.toml DAEMON_PID=${PIDS[1]}
wait_device "$W/n1.toml"
DEV_A=$DEV

M=$W/mnt
mkdir -p "$M"
must mkfs.ext4 -q -F "$DEV_A"
must mount -t ext4 "$DEV_A" "$M"
for i in 1 2 3 4 5 6; do
  dd if=/dev/urandom of="$M/file$i" bs=1M count=$((i * 2)) conv=fsync status=none || fail "writing file$i"
done
mkdir -p "$M/dir"
for j in $(seq 1 40); do head -c $((j * 3000)) /dev/urandom > "$M/dir/s$j"; done
sums_of "$M" > "$W/sums" || fail "sha256sum failed"
must sync

# The VM still runs on A: the switch must be refused, and say why.
if out=$(promote 2); then
  fail "promote n2 succeeded while n1's device is mounted: $out"
fi
log "refused as expected: $out"
case "$out" in
  *"refuses to demote"*) ;;
  *) fail "the refusal does not say that n1 refuses to demote: $out" ;;
esac
[ "$(json_get role <<<"$(status_json "$W/n1.toml")")" = primary ] || fail "n1 is no longer primary after a refused switch"

must umount "$M"
t0=$(date +%s%N)
out=$(promote 2) || fail "promote n2 failed: $out"
t1=$(date +%s%N)
log "$out"
log "switch time (promote command): $(( (t1 - t0) / 1000000 )) ms"
# (Both nodes run in this guest: B's device may reuse A's minor and path.)
js=$(status_json "$W/n1.toml")
[ "$(json_get role <<<"$js")" = secondary ] || fail "n1 is not secondary after the switch: $js"
[ -z "$(json_get device <<<"$js")" ] || fail "n1 still names a device after the switch: $js"
CFG=$W/n2.toml DAEMON_PID=${PIDS[2]}
# The device exists when promote returns: mount it at once.
DEV=${out##*device }; DEV=${DEV%%;*}
[ -b "$DEV" ] || fail "promote did not name a block device: $out"
must mount -t ext4 "$DEV" "$M"
left=$(sync_left 2)
log "n2 lacks $left bytes right after the mount"
[ "${left:-0}" -gt $((SIZE_BYTES / 4)) ] || fail "n2 was not stale at the switch ($left bytes missing): the test proves nothing"
verify_sums "$M" "$W/sums"
echo "written on B" > "$M/from-b"
sums_of "$M" > "$W/sums2" || fail "sha256sum failed"
must sync
must umount "$M"
wait_synced 2 600 || fail "n2's background sync or n1's resync did not finish"
[ -z "$(kernel_errors)" ] || fail "kernel I/O errors: $(kernel_errors | head -n 3)"

# The replicas are byte-identical; fsck-clean with the same files.
[ "$(sha256sum < "$W/n1.img")" = "$(sha256sum < "$W/n2.img")" ] || fail "backing files differ after the sync"
log "backings identical"

# And back to A.
out=$(promote 1) || fail "promote n1 (back) failed: $out"
log "$out"
CFG=$W/n1.toml DAEMON_PID=${PIDS[1]}
wait_device "$W/n1.toml"
must mount -t ext4 "$DEV" "$M"
verify_sums "$M" "$W/sums2"
must umount "$M"
# Mounting wrote to A: those blocks reach B only by A's lazy WAN push, which
# a demote does not wait for (it would report B as lacking them). Let the
# push finish, as a user who wants both copies current would.
wait_synced 1 600 || fail "n1's WAN push to n2 did not finish"
out=$("$VMSYNCCTL" --config "$W/n1.toml" demote 2>&1) || fail "demote failed: $out"
log "demote: $out"
case "$out" in
  *"every peer holds every write"*) ;;
  *) fail "demote after the push finished says a peer lacks writes: $out" ;;
esac
for id in 1 2; do
  DAEMON_PID=${PIDS[$id]}
  stop_daemon
  [ "$DAEMON_RC" -eq 0 ] || fail "n$id exited with $DAEMON_RC"
done
[ "$(sha256sum < "$W/n1.img")" = "$(sha256sum < "$W/n2.img")" ] || fail "backing files differ at the end"
must e2fsck -fn "$W/n2.img"
kill -TERM "$DIR_PID" 2>/dev/null
pass
