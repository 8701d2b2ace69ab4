#!/bin/bash
# replicated_fs: three nodes on the guest's loopback; ext4 on the primary's
# /dev/ublkbN with a file workload; afterwards every peer's backing image is
# fsck-clean, byte-identical to the primary's, and holds the same files.
. "$REPO/tests/vm/lib.sh"
require_binaries

MIB_SIZE=128
SECRET=$W/secret
head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' > "$SECRET"
PORTS=(0 17791 17792 17793)

node_config() { # ID PROTOCOL
  local id=$1 proto=$2 p
  truncate -s "${MIB_SIZE}M" "$W/n$id.img"
  {
    echo '[resource]'
    echo 'name = "rvm"'
    echo "size = \"${MIB_SIZE}MiB\""
    echo "protocol = \"$proto\""
    echo
    echo '[node]'
    echo "id = $id"
    echo "name = \"n$id\""
    echo "backing = \"$W/n$id.img\""
    echo "metadata = \"$W/n$id.meta\""
    echo "listen = \"127.0.0.1:${PORTS[$id]}\""
    echo "control_socket = \"/run/vmsync/n$id.sock\""
    echo 'lan_group = "home"'
    echo
    echo '[security]'
    echo "secret_file = \"$SECRET\""
    for p in 1 2 3; do
      [ "$p" = "$id" ] && continue
      echo
      echo '[[peer]]'
      echo "id = $p"
      echo "name = \"n$p\""
      echo "address = \"127.0.0.1:${PORTS[$p]}\""
      echo 'lan_group = "home"'
    done
  } > "$W/n$id.toml"
}

declare -A PIDS
for id in 1 2 3; do
  node_config "$id" C
  create_md "$W/n$id.toml"
  start_daemon "$W/n$id.toml"
  PIDS[$id]=$DAEMON_PID
done

wait_peers() { # ID STATE TIMEOUT: every peer of node ID reports STATE
  local id=$1 want=$2 timeout=$3 t0 js
  t0=$(date +%s)
  while :; do
    js=$(status_json "$W/n$id.toml") || js=""
    if [ -n "$js" ] && [ "$(grep -c "\"state\": \"$want\"" <<<"$js")" -eq 2 ] \
       && ! grep -q '"stale_bytes": [1-9]' <<<"$js"; then
      return 0
    fi
    [ $(($(date +%s) - t0)) -lt "$timeout" ] || { log "status of n$id: $js"; return 1; }
    sleep 1
  done
}

wait_peers 1 secondary 60 || fail "nodes did not link"
log "+ vmsyncctl promote (n1)"
out=$("$VMSYNCCTL" --config "$W/n1.toml" promote 2>&1) || fail "promote failed: $out"
log "$out"
CFG=$W/n1.toml SIZE_BYTES=$((MIB_SIZE * MiB)) DAEMON_PID=${PIDS[1]}
wait_device "$W/n1.toml"
wait_peers 1 up-to-date 300 || fail "initial sync did not finish"
if kernel_has_zero_copy; then
  # The primary reads the blocks it holds straight into the requests' pages.
  grep -q "zero copy: reads the device lets through" "$W/vmsyncd.1.log" \
    || fail "kernel $(uname -r) has ublk zero copy, but the primary's queue does not use it"
  log "kernel $(uname -r): the primary's queue uses zero copy"
fi

M=$W/mnt
mkdir -p "$M"
must mkfs.ext4 -q -F "$DEV"
must mount -t ext4 "$DEV" "$M"
for i in 1 2 3 4 5 6; do
  dd if=/dev/urandom of="$M/file$i" bs=1M count=$((i + 1)) conv=fsync status=none || fail "writing file$i"
done
mkdir -p "$M/dir"
for j in $(seq 1 30); do head -c $((j * 1500)) /dev/urandom > "$M/dir/s$j"; done
rm "$M/file3"
sums_of "$M" > "$W/sums" || fail "sha256sum failed"
must sync
must umount "$M"
# Writes of 16 KiB and more went to both peers as one record sealed once.
js=$(status_json "$W/n1.toml") || fail "no status from n1"
shared=$(echo "$js" | grep -o '"shared_record_bytes": *[0-9]*' | grep -vc ': *0$' || true)
[ "$shared" = 2 ] || fail "not both peers got shared records: $js"
log "both peers got writes as shared records"
# The first large flushes go zero-copy (io_uring); on loopback the kernel
# copies at delivery, so "auto" then turns it off: some, not all.
zero_copy=$(echo "$js" | grep -o '"zero_copy_bytes": *[0-9]*' | grep -vc ': *0$' || true)
[ "$zero_copy" = 2 ] || fail "not both links sent zero-copy on this kernel: $js"
log "both links sent zero-copy"

log "+ vmsyncctl demote (n1)"
out=$("$VMSYNCCTL" --config "$W/n1.toml" demote 2>&1) || fail "demote failed: $out"
case "$out" in
  *"every peer holds every write"*) log "demote: $out" ;;
  *) fail "demote did not hand every write over: $out" ;;
esac
wait_gone "$DEV" 20 || fail "$DEV still present after demote"
for id in 1 2 3; do
  DAEMON_PID=${PIDS[$id]}
  stop_daemon
  [ "$DAEMON_RC" -eq 0 ] || fail "n$id exited with $DAEMON_RC"
done

h1=$(sha256sum < "$W/n1.img")
for id in 2 3; do
  [ "$(sha256sum < "$W/n$id.img")" = "$h1" ] || fail "n$id's image differs from the primary's"
  must e2fsck -fn "$W/n$id.img"
  mkdir -p "$W/ro$id"
  must mount -t ext4 -o loop,ro "$W/n$id.img" "$W/ro$id"
  verify_sums "$W/ro$id" "$W/sums" || fail "files on n$id differ"
  must umount "$W/ro$id"
done
log "peers n2 and n3 hold the same bytes and files as the primary"
pass
