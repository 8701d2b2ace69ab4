#!/bin/bash
# package_install: the Debian package (scripts/package.sh) installed with
# dpkg into an empty root, and a two-node resource run from what it
# installed, the way systemd would run it: each node's ExecStart taken from
# the installed vmsyncd@.service with %i filled in, inside a chroot of that
# root (the host's libraries bound in), with NOTIFY_SOCKET served by a
# stand-in for systemd. Checks: the files are where the docs say; the
# example config works after editing; each node sends READY=1 once it has
# linked; ext4 on the primary's device; a daemon SIGKILLed while the file
# system is mounted is restarted from the unit's ExecStart (Restart=) and
# re-attaches (ublk user recovery) with the files intact; SIGTERM after
# unmount stops both cleanly (STOPPING=1); the replicas end identical.
. "$REPO/tests/vm/lib.sh"
require_binaries

DEB=$(ls -t "$REPO"/target/debian/vmsync_*_amd64.deb 2>/dev/null | head -n1)
[ -n "$DEB" ] || fail "no package in $REPO/target/debian: scripts/package.sh builds it"
command -v python3 >/dev/null || fail "python3 (the systemd stand-in) is missing"

# ---- install into an empty root --------------------------------------------
R=$W/root
mkdir -p "$R/var/lib/dpkg/info" "$R/var/lib/dpkg/updates"
: > "$R/var/lib/dpkg/status"
log "+ dpkg --root=$R -i ${DEB##*/}"
# --force-depends: the empty root has no libc6/kmod packages (the host's
# libraries are bound in below).
out=$(dpkg --root="$R" --force-depends -i "$DEB" 2>&1) || fail "dpkg -i failed: $out"
for f in usr/bin/vmsyncd usr/bin/vmsyncctl usr/bin/vmsync-directory \
         lib/systemd/system/vmsyncd@.service lib/systemd/system/vmsync-directory.service \
         usr/share/man/man1/vmsyncd.1.gz usr/share/man/man1/vmsyncctl-promote.1.gz \
         usr/share/bash-completion/completions/vmsyncctl usr/lib/ocf/resource.d/vmsync/vmsync \
         usr/share/doc/vmsync/examples/r0.toml.example; do
  [ -e "$R/$f" ] || fail "the package did not install /$f"
done
zcat "$R/usr/share/man/man1/vmsyncctl-promote.1.gz" | grep -q '^\.TH vmsyncctl-promote' \
  || fail "vmsyncctl-promote.1 is not a man page"

# A system around it: the host's libraries, /dev /proc /sys, tmpfs /run /tmp.
mkdir -p "$R/lib/x86_64-linux-gnu" "$R/lib64" "$R/dev" "$R/proc" "$R/sys" "$R/run" "$R/tmp" \
         "$R/etc/vmsync" "$R/var/lib/vmsync"
must mount --bind /lib/x86_64-linux-gnu "$R/lib/x86_64-linux-gnu"
must mount --bind /lib64 "$R/lib64"
must mount --rbind /dev "$R/dev"
must mount -t proc proc "$R/proc"
must mount --rbind /sys "$R/sys"
must mount -t tmpfs tmpfs "$R/run"
must mount -t tmpfs tmpfs "$R/tmp"
cleanup_root() {
  umount -l "$R/tmp" "$R/run" "$R/sys" "$R/proc" "$R/dev" "$R/lib64" "$R/lib/x86_64-linux-gnu" 2>/dev/null
}
trap cleanup_root EXIT

out=$(chroot "$R" /usr/bin/vmsyncd --version 2>&1) || fail "installed vmsyncd does not run: $out"
log "installed: $out"

# vmsyncctl as an operator on that system runs it.
CTL=$W/vmsyncctl
printf '#!/bin/sh\nexec chroot %s /usr/bin/vmsyncctl "$@"\n' "$R" > "$CTL"
chmod +x "$CTL"
VMSYNCCTL=$CTL

must "$CTL" gen-secret /etc/vmsync/cluster.secret
[ "$(stat -c %a "$R/etc/vmsync/cluster.secret")" = 600 ] || fail "secret is not mode 0600"

# ---- two instances from the example config --------------------------------
MIB_SIZE=128
EXAMPLE=$R/usr/share/doc/vmsync/examples/r0.toml.example
instance_config() { # NAME ID PORT PEER_ID PEER_NAME PEER_PORT
  local name=$1 id=$2 port=$3 pid=$4 pname=$5 pport=$6
  truncate -s "${MIB_SIZE}M" "$R/var/lib/vmsync/$name.img"
  sed -e "s|^size = .*|size = \"${MIB_SIZE}MiB\"|" \
      -e "s|^id = 1$|id = @NODE@|" -e "s|^id = 2$|id = @PEER@|" \
      -e "s|@NODE@|$id|" -e "s|@PEER@|$pid|" \
      -e "s|^name = \"desk\"|name = \"@NAME@\"|" -e "s|^name = \"laptop\"|name = \"@PNAME@\"|" \
      -e "s|@NAME@|$name|" -e "s|@PNAME@|$pname|" \
      -e "s|/var/lib/vmsync/r0\.|/var/lib/vmsync/$name.|" \
      -e "s|^listen = .*|listen = \"127.0.0.1:$port\"|" \
      -e "s|/run/vmsync/r0.sock|/run/vmsync/$name.sock|" \
      -e "s|^address = \"192.168.1.11:7790\"|address = \"127.0.0.1:$pport\"|" \
      "$EXAMPLE" > "$R/etc/vmsync/$name.toml"
}
instance_config desk 1 17801 2 laptop 17802
instance_config laptop 2 17802 1 desk 17801
# Both configs describe the same resource ("r0") from each side.
for n in desk laptop; do
  must "$CTL" --config "/etc/vmsync/$n.toml" create-md
done

UNIT=$R/lib/systemd/system/vmsyncd@.service
grep -q '^Type=notify$' "$UNIT" || fail "vmsyncd@.service is not Type=notify"
exec_start() { # INSTANCE: the unit's ExecStart with %i filled in
  sed -n 's/^ExecStart=//p' "$UNIT" | sed "s/%i/$1/g"
}

declare -A PIDS
# notify_listener NAME: systemd's end of NOTIFY_SOCKET, one line per message.
notify_listener() {
  python3 -c '
import socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
s.bind(sys.argv[1])
with open(sys.argv[2], "a", buffering=1) as log:
    while True:
        log.write(s.recv(4096).decode(errors="replace").replace("\n", " | ") + "\n")
' "$R/run/notify-$1.sock" "$W/notify-$1.log" &
  echo $! >> "$VMTEST_PIDS_FILE"
  for _ in $(seq 1 50); do [ -S "$R/run/notify-$1.sock" ] && return 0; sleep 0.1; done
  fail "notify listener for $1 did not start"
}
start_unit() { # INSTANCE
  local cmd
  cmd=$(exec_start "$1")
  DAEMON_LOG=$W/vmsyncd.$1.log
  DAEMON_LOGS+=("$DAEMON_LOG")
  log "+ [vmsyncd@$1] $cmd"
  # shellcheck disable=SC2086  # ExecStart is split on spaces, as systemd does
  NOTIFY_SOCKET=/run/notify-$1.sock chroot "$R" $cmd >>"$DAEMON_LOG" 2>&1 &
  PIDS[$1]=$!
  echo "${PIDS[$1]}" >> "$VMTEST_PIDS_FILE"
}
wait_notify() { # INSTANCE PATTERN TIMEOUT_S
  local t0
  t0=$(date +%s)
  until grep -q "$2" "$W/notify-$1.log" 2>/dev/null; do
    [ $(($(date +%s) - t0)) -lt "$3" ] || fail "vmsyncd@$1 sent no '$2' in ${3}s: $(tail -n 3 "$W/notify-$1.log" 2>/dev/null | tr '\n' ';')"
    sleep 0.3
  done
}

mkdir -p "$R/run/vmsync"
for n in desk laptop; do
  notify_listener "$n"
  start_unit "$n"
done
for n in desk laptop; do
  wait_notify "$n" 'READY=1' 90
  log "vmsyncd@$n ready: $(grep -m1 'READY=1' "$W/notify-$n.log")"
  js=$(status_json "/etc/vmsync/$n.toml") || fail "status of $n: $js"
  grep -q '"connected": true' <<<"$js" || fail "READY from $n but its peer is not linked: $js"
done

log "+ vmsyncctl promote (desk)"
out=$("$CTL" --config /etc/vmsync/desk.toml promote 2>&1) || fail "promote failed: $out"
CFG=/etc/vmsync/desk.toml SIZE_BYTES=$((MIB_SIZE * MiB)) DAEMON_PID=${PIDS[desk]}
wait_device "$CFG"
wait_notify desk "STATUS=primary .*$DEV" 30

M=$W/mnt
mkdir -p "$M"
must mkfs.ext4 -q -F "$DEV"
must mount -t ext4 "$DEV" "$M"
for i in 1 2 3 4; do
  dd if=/dev/urandom of="$M/file$i" bs=1M count=$((i + 2)) conv=fsync status=none || fail "writing file$i"
done
must sync
sums_of "$M" > "$W/sums"

# A crash while mounted: Restart= runs ExecStart again; the new daemon
# re-attaches to the waiting device and the file system carries on.
log "+ kill -9 vmsyncd@desk (${PIDS[desk]}) with $DEV mounted"
kill -KILL "${PIDS[desk]}"
wait "${PIDS[desk]}" 2>/dev/null
: > "$W/notify-desk.log"
start_unit desk
DAEMON_PID=${PIDS[desk]}
wait_notify desk "READY=1" 90
grep -q "STATUS=primary .*$DEV" "$W/notify-desk.log" \
  || fail "restarted desk is ready but not primary on $DEV: $(cat "$W/notify-desk.log")"
dd if=/dev/urandom of="$M/after-restart" bs=1M count=2 conv=fsync status=none \
  || fail "writing after the restart failed"
sums_of "$M" > "$W/sums"
verify_sums "$M" "$W/sums"
must umount "$M"

# Wait until the secondary holds everything, then stop both as systemd does.
t0=$(date +%s)
until js=$(status_json "$CFG") && grep -q '"state": "up-to-date"' <<<"$js" \
      && ! grep -q '"stale_bytes": [1-9]' <<<"$js"; do
  [ $(($(date +%s) - t0)) -lt 120 ] || fail "laptop did not become up to date: $js"
  sleep 1
done
for n in desk laptop; do
  log "+ systemctl stop vmsyncd@$n (SIGTERM)"
  kill -TERM "${PIDS[$n]}"
  t0=$(date +%s)
  while proc_alive "${PIDS[$n]}"; do
    [ $(($(date +%s) - t0)) -lt 60 ] || fail "vmsyncd@$n did not stop"
    sleep 0.2
  done
  wait "${PIDS[$n]}"; rc=$?
  [ "$rc" -eq 0 ] || fail "vmsyncd@$n exited with $rc on SIGTERM"
  wait_notify "$n" 'STOPPING=1' 10
done
cmp "$R/var/lib/vmsync/desk.img" "$R/var/lib/vmsync/laptop.img" \
  || fail "the replicas differ after a clean stop"
log "replicas identical"
pass
