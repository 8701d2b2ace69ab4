#!/bin/bash
# online_resize: two nodes, ext4 mounted on the primary's /dev/ublkbN with a
# writer running. Both backing files grow (n2's new area full of garbage),
# the configs get the new size, and `vmsyncctl resize` runs on the running
# daemons: the secondary first, then the primary. Each daemon restarts
# itself under its device (same pid); the guest's device grows while
# mounted (the writer sees no error), the file system grows into it
# online (resize2fs), the new area resyncs to n2, and at the end the two
# backing files are byte-identical with every file intact.
# Then a standalone disk grows online under a mounted file system too.
# On a kernel without UBLK_U_CMD_UPDATE_SIZE (before 6.16) the primary's
# resize is refused, saying why, and its device keeps its size.
. "$REPO/tests/vm/lib.sh"
require_binaries

OLD_MIB=64
NEW_MIB=128
SECRET=$W/secret
head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' > "$SECRET"
PORTS=(0 17993 17994)

node_config() { # ID MIB
  local id=$1 mib=$2 p=$((3 - $1))
  cat > "$W/n$id.toml" <<EOT
[resource]
name = "live-grow"
size = "${mib}MiB"
protocol = "C"

[node]
id = $id
name = "n$id"
backing = "$W/n$id.img"
metadata = "$W/n$id.meta"
listen = "127.0.0.1:${PORTS[$id]}"
control_socket = "/run/vmsync/live-n$id.sock"

[security]
secret_file = "$SECRET"

[replication]
ping_timeout_ms = 2000

[[peer]]
id = $p
name = "n$p"
address = "127.0.0.1:${PORTS[$p]}"
EOT
}

size_of() { json_get size <<<"$(status_json "$W/n$1.toml")"; }

declare -A PIDS
for id in 1 2; do
  truncate -s "${OLD_MIB}M" "$W/n$id.img"
  node_config "$id" "$OLD_MIB"
  create_md "$W/n$id.toml"
  start_daemon "$W/n$id.toml"
  PIDS[$id]=$DAEMON_PID
done
wait_peer_state 1 60 secondary || fail "nodes did not link"
out=$("$VMSYNCCTL" --config "$W/n1.toml" promote 2>&1) || fail "promote failed: $out"
CFG=$W/n1.toml SIZE_BYTES=$((OLD_MIB * MiB)) DAEMON_PID=${PIDS[1]}
wait_device "$W/n1.toml"
wait_peer_state 1 120 || fail "initial sync did not finish"

M=$W/mnt
mkdir -p "$M"
must mkfs.ext4 -q -F "$DEV"
must mount -t ext4 "$DEV" "$M"
for i in 1 2 3; do
  dd if=/dev/urandom of="$M/file$i" bs=1M count=$((i * 3)) conv=fsync status=none || fail "writing file$i"
done

# Grow the backing stores: n1's new area reads as zeros, n2's as garbage.
must truncate -s "${NEW_MIB}M" "$W/n1.img"
head -c $(((NEW_MIB - OLD_MIB) * MiB)) /dev/urandom >> "$W/n2.img" || fail "growing n2.img"

# Refused, changing nothing: a config that also changes something else.
node_config 2 "$NEW_MIB"
sed -i 's/^name = "n2"$/name = "n2-renamed"/' "$W/n2.toml"
out=$("$VMSYNCCTL" --config "$W/n2.toml" resize 2>&1) && fail "resize with another change succeeded: $out"
case "$out" in *"more than [resource] size"*"nothing changed"*) log "refused: $out" ;; *) fail "unclear refusal: $out" ;; esac
[ "$(size_of 2)" = $((OLD_MIB * MiB)) ] || fail "n2's size changed after a refused resize"

# The secondary grows online, and stays mirrored while the primary has
# not grown yet (a larger secondary replicates the primary's size).
node_config 2 "$NEW_MIB"
out=$("$VMSYNCCTL" --config "$W/n2.toml" resize 2>&1) || fail "resize n2 failed: $out"
log "n2: $out"
case "$out" in *"n2 serves $((NEW_MIB * MiB)) bytes"*) ;; *) fail "resize n2 did not report the new size: $out" ;; esac
proc_alive "${PIDS[2]}" || fail "n2's daemon is gone: it must restart in place"
wait_peer_state 1 60 || fail "the grown n2 is not mirrored by the smaller primary"

# A writer on the mounted file system across the primary's restart: its
# I/O is held by the kernel meanwhile, never failed.
( n=0
  longest=0
  while [ ! -e "$W/writer.stop" ] || [ "$n" -lt 3 ]; do
    t0=$(date +%s%N)
    dd if=/dev/urandom of="$M/during" bs=64k count=64 seek=$((n % 8 * 64)) oflag=direct \
       conv=fsync,notrunc status=none || { echo "failed at round $n" > "$W/writer.rc"; exit; }
    t=$((($(date +%s%N) - t0) / 1000000))
    echo "round $n: $t ms, ended $(date +%s.%N)" >> "$W/writer.rounds"
    [ "$t" -le "$longest" ] || longest=$t
    n=$((n + 1))
  done
  echo "ok: $n rounds of 4 MiB, the longest $longest ms" > "$W/writer.rc" ) &
writer=$!
stop_writer() {
  touch "$W/writer.stop"
  wait "$writer"
  cat "$W/writer.rounds"
  case "$(cat "$W/writer.rc")" in ok*) log "writer $(cat "$W/writer.rc")" ;; *) fail "the writer failed: $(cat "$W/writer.rc")" ;; esac
}
node_config 1 "$NEW_MIB"
if ! out=$("$VMSYNCCTL" --config "$W/n1.toml" resize 2>&1); then
  kernel_has_zero_copy && fail "resize of the primary failed on $(uname -r): $out"
  case "$out" in *"UBLK_U_CMD_UPDATE_SIZE"*"nothing changed"*) log "refused: $out" ;; *) fail "unclear refusal: $out" ;; esac
  stop_writer
  sz=$(( $(cat "/sys/block/$DEV_NAME/size") * 512 ))
  [ "$sz" -eq $((OLD_MIB * MiB)) ] || fail "$DEV changed size after a refused resize: $sz"
  must umount "$M"
  pass
fi
log "n1: $out"
date +%s.%N
case "$out" in *"n1 serves $((NEW_MIB * MiB)) bytes on $DEV"*) ;; *) fail "resize n1 did not report the new size: $out" ;; esac
proc_alive "${PIDS[1]}" || fail "n1's daemon is gone: it must restart in place"
stop_writer
sz=$(( $(cat "/sys/block/$DEV_NAME/size") * 512 ))
[ "$sz" -eq $((NEW_MIB * MiB)) ] || fail "$DEV has $sz bytes after the resize"
mounted_rw "$M" || fail "the file system is no longer mounted read-write"
# The restarted primary resyncs n2 from its bitmap (the new area, and the
# extents either side wrote lately), not in full.
if grep -h "full sync" "${DAEMON_LOGS[0]}" | grep -v "peer holds no data yet"; then
  fail "n1 resynced n2 in full after the resize"
fi

must resize2fs "$DEV"
blocks=$(df -k --output=size "$M" | tail -n 1)
[ "$blocks" -gt $((OLD_MIB * 1024)) ] || fail "the file system did not grow: ${blocks} KiB"
dd if=/dev/urandom of="$M/big" bs=1M count=70 conv=fsync status=none || fail "writing into the new area"
sums_of "$M" > "$W/sums" || fail "sha256sum failed"
must umount "$M"
wait_peer_state 1 300 || fail "n2 did not catch up after the resize"
out=$("$VMSYNCCTL" --config "$W/n1.toml" demote 2>&1) || fail "demote failed: $out"
wait_gone "$DEV" 20 || fail "$DEV still present after demote"
for id in 1 2; do
  DAEMON_PID=${PIDS[$id]}
  stop_daemon
  [ "$DAEMON_RC" -eq 0 ] || fail "n$id exited with $DAEMON_RC"
done

[ "$(sha256sum < "$W/n1.img")" = "$(sha256sum < "$W/n2.img")" ] || fail "backing files differ after the online resize"
must e2fsck -fn "$W/n2.img"
mkdir -p "$W/ro"
must mount -t ext4 -o loop,ro "$W/n2.img" "$W/ro"
verify_sums "$W/ro" "$W/sums" || fail "files on n2 differ"
must umount "$W/ro"

# A standalone disk (the direct queue, straight to its file) grows online
# the same way, under a mounted file system.
make_config solo 32 true
create_md
start_daemon
wait_device
must mkfs.ext4 -q -F "$DEV"
must mount -t ext4 "$DEV" "$M"
dd if=/dev/urandom of="$M/solo" bs=1M count=8 conv=fsync status=none || fail "writing on the standalone disk"
must truncate -s 96M "$W/solo.img"
sed -i 's/^size = "32MiB"$/size = "96MiB"/' "$CFG"
out=$("$VMSYNCCTL" --config "$CFG" resize --assume-clean 2>&1) || fail "resize of the standalone disk failed: $out"
log "solo: $out"
proc_alive "$DAEMON_PID" || fail "the standalone daemon is gone"
sz=$(( $(cat "/sys/block/$DEV_NAME/size") * 512 ))
[ "$sz" -eq $((96 * MiB)) ] || fail "$DEV has $sz bytes after the standalone resize"
must resize2fs "$DEV"
dd if=/dev/urandom of="$M/solo2" bs=1M count=60 conv=fsync status=none || fail "writing into the standalone's new area"
sums_of "$M" > "$W/solo.sums" || fail "sha256sum failed"
must umount "$M"
must mount -t ext4 "$DEV" "$M"
verify_sums "$M" "$W/solo.sums" || fail "files on the grown standalone disk differ"
must umount "$M"
stop_daemon_clean
must e2fsck -fn "$W/solo.img"
pass
