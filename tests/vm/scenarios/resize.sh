#!/bin/bash
# resize: two nodes, ext4 on the primary's /dev/ublkbN. Both daemons are
# stopped, both backing files grown (n2's new area full of garbage, as a
# reused disk would be), the configs given the new size and `vmsyncctl
# resize` run on each. Restarted and promoted, the device has the new size,
# the file system grows into it (resize2fs) with every file intact, and
# afterwards the two backing files are byte-identical: the new area was
# resynced, the garbage is gone.
. "$REPO/tests/vm/lib.sh"
require_binaries

OLD_MIB=64
NEW_MIB=128
SECRET=$W/secret
head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' > "$SECRET"
PORTS=(0 17991 17992)

node_config() { # ID MIB
  local id=$1 mib=$2 p=$((3 - $1))
  cat > "$W/n$id.toml" <<EOT
[resource]
name = "grow"
size = "${mib}MiB"
protocol = "C"

[node]
id = $id
name = "n$id"
backing = "$W/n$id.img"
metadata = "$W/n$id.meta"
listen = "127.0.0.1:${PORTS[$id]}"
control_socket = "/run/vmsync/n$id.sock"

[security]
secret_file = "$SECRET"

[[peer]]
id = $p
name = "n$p"
address = "127.0.0.1:${PORTS[$p]}"
EOT
}

declare -A PIDS
start_all() {
  for id in 1 2; do
    start_daemon "$W/n$id.toml"
    PIDS[$id]=$DAEMON_PID
  done
}
stop_all() {
  for id in 1 2; do
    DAEMON_PID=${PIDS[$id]}
    stop_daemon
    [ "$DAEMON_RC" -eq 0 ] || fail "n$id exited with $DAEMON_RC"
  done
}
promote_n1() { # SIZE_BYTES
  local out
  out=$("$VMSYNCCTL" --config "$W/n1.toml" promote 2>&1) || fail "promote failed: $out"
  CFG=$W/n1.toml SIZE_BYTES=$1 DAEMON_PID=${PIDS[1]}
  wait_device "$W/n1.toml"
}
demote_n1() {
  local out
  out=$("$VMSYNCCTL" --config "$W/n1.toml" demote 2>&1) || fail "demote failed: $out"
  case "$out" in
    *"every peer holds every write"*) log "demote: $out" ;;
    *) fail "demote did not hand every write over: $out" ;;
  esac
  wait_gone "$DEV" 20 || fail "$DEV still present after demote"
}

for id in 1 2; do
  truncate -s "${OLD_MIB}M" "$W/n$id.img"
  node_config "$id" "$OLD_MIB"
  create_md "$W/n$id.toml"
done
start_all
wait_peer_state 1 60 secondary || fail "nodes did not link"
promote_n1 $((OLD_MIB * MiB))
wait_peer_state 1 120 || fail "initial sync did not finish"

M=$W/mnt
mkdir -p "$M"
must mkfs.ext4 -q -F "$DEV"
must mount -t ext4 "$DEV" "$M"
for i in 1 2 3 4; do
  dd if=/dev/urandom of="$M/file$i" bs=1M count=$((i * 3)) conv=fsync status=none || fail "writing file$i"
done
sums_of "$M" > "$W/sums" || fail "sha256sum failed"
must umount "$M"
demote_n1
stop_all

# Grow: n1's new area reads as zeros, n2's as garbage.
must truncate -s "${NEW_MIB}M" "$W/n1.img"
head -c $(((NEW_MIB - OLD_MIB) * MiB)) /dev/urandom >> "$W/n2.img" || fail "growing n2.img"
for id in 1 2; do
  node_config "$id" "$NEW_MIB"
  out=$("$VMSYNCCTL" --config "$W/n$id.toml" resize 2>&1) || fail "resize n$id failed: $out"
  log "n$id: $out"
  case "$out" in
    *"grown from $((OLD_MIB * MiB)) to $((NEW_MIB * MiB)) bytes"*) ;;
    *) fail "resize n$id did not say what it did: $out" ;;
  esac
done

start_all
# Secondaries: the new area stays stale until one of them is primary.
wait_peer_state 1 60 secondary any || fail "nodes did not link after the resize"
stale=$(status_json "$W/n1.toml" | tr -d ' \n' | sed -n 's/.*"peers":\[{[^}]*"stale_bytes":\([0-9]*\).*/\1/p')
[ "$stale" = $(((NEW_MIB - OLD_MIB) * MiB)) ] || fail "n1 does not show the new area stale for n2: $stale"
promote_n1 $((NEW_MIB * MiB))
must e2fsck -f -p "$DEV"
must resize2fs "$DEV"
must mount -t ext4 "$DEV" "$M"
verify_sums "$M" "$W/sums" || fail "files changed by the resize"
blocks=$(df -k --output=size "$M" | tail -n 1)
[ "$blocks" -gt $((OLD_MIB * 1024)) ] || fail "the file system did not grow: ${blocks} KiB"
dd if=/dev/urandom of="$M/big" bs=1M count=80 conv=fsync status=none || fail "writing into the new area"
sums_of "$M" > "$W/sums2" || fail "sha256sum failed"
must umount "$M"
wait_peer_state 1 300 || fail "the new area did not resync"
demote_n1
stop_all

[ "$(sha256sum < "$W/n1.img")" = "$(sha256sum < "$W/n2.img")" ] || fail "backing files differ after the resize"
must e2fsck -fn "$W/n2.img"
mkdir -p "$W/ro"
must mount -t ext4 -o loop,ro "$W/n2.img" "$W/ro"
verify_sums "$W/ro" "$W/sums2" || fail "files on n2 differ"
must umount "$W/ro"
pass
