# Helpers for the VM scenarios (tests/vm/scenarios/*.sh). Sourced by bash
# inside the guest; guest-run.sh exports REPO, SCRATCH, VMSYNC_BIN_DIR,
# VMTEST_NAME, VMTEST_WORK, VMTEST_RESULT_FILE and VMTEST_PIDS_FILE.
#
# Conventions: a scenario exits 0 to pass, calls fail "reason" (exit 1) or
# skip "reason" (exit 77). Daemon state lives in globals (no $(...) around
# start_daemon / wait_device): CFG, DEV, DEV_NAME, DAEMON_PID, DAEMON_LOG,
# DAEMON_RC, SIZE_BYTES.
set -u

: "${REPO:?REPO not set}"
: "${VMTEST_NAME:=manual}"
: "${VMTEST_WORK:=${SCRATCH:-/tmp/scratch}/$VMTEST_NAME}"
: "${VMTEST_RESULT_FILE:=/tmp/vmtest.$VMTEST_NAME.result}"
: "${VMTEST_PIDS_FILE:=/tmp/vmtest.$VMTEST_NAME.pids}"
: "${VMSYNC_BIN_DIR:=$REPO/target/release}"
VMSYNCD=$VMSYNC_BIN_DIR/vmsyncd
VMSYNCCTL=$VMSYNC_BIN_DIR/vmsyncctl
W=$VMTEST_WORK
mkdir -p "$W" /run/vmsync
export RUST_LOG=${RUST_LOG:-info}

CFG="" DEV="" DEV_NAME="" DAEMON_PID="" DAEMON_LOG="" DAEMON_RC="" SIZE_BYTES=""
DAEMON_LOGS=()
MiB=$((1024 * 1024))

# ---- reporting -------------------------------------------------------------
log() { # (read, not cut: each fork costs ~0.1 s under TCG)
  local up _
  read -r up _ < /proc/uptime
  printf '[%s %ss] %s\n' "$VMTEST_NAME" "$up" "$*"
}

diagnostics() {
  local l
  for l in "${DAEMON_LOGS[@]}"; do
    [ -f "$l" ] || continue
    echo "----- $l (last 150 lines) -----"
    tail -n 150 "$l"
  done
  echo "----- kernel log (last 60 lines) -----"
  dmesg 2>/dev/null | tail -n 60
  echo "----- ublk devices / mounts -----"
  ls -l /dev/ublk* 2>/dev/null
  grep -E 'ublk|loop' /proc/mounts
  echo "-----"
}

fail() {
  printf '%s\n' "$*" > "$VMTEST_RESULT_FILE"
  log "FAIL: $*"
  diagnostics
  exit 1
}

skip() {
  printf '%s\n' "$*" > "$VMTEST_RESULT_FILE"
  log "SKIP: $*"
  exit 77
}

pass() { log "ok"; exit 0; }

# run CMD...: log and run; fail the scenario when it fails.
must() {
  log "+ $*"
  "$@" || fail "command failed (rc=$?): $*"
}

require_binaries() {
  local b
  for b in "$VMSYNCD" "$VMSYNCCTL"; do
    [ -x "$b" ] || fail "$b not found or not executable (cargo build --release; VMSYNC_BIN_DIR=$VMSYNC_BIN_DIR)"
  done
}

# ---- JSON (no jq needed) -----------------------------------------------------
# json_get KEY < json: first scalar value of "KEY" anywhere in the document;
# strings unquoted, null printed as nothing.
json_get() {
  tr -d '\n' | grep -o "\"$1\"[[:space:]]*:[[:space:]]*\(\"[^\"]*\"\|[-+0-9.eE]\+\|true\|false\|null\)" \
    | head -n1 | sed -e "s/^\"$1\"[[:space:]]*:[[:space:]]*//" -e 's/^"\(.*\)"$/\1/' -e 's/^null$//'
}

# ---- processes ----------------------------------------------------------------
proc_alive() { # pid: exists and is not a zombie
  local s
  s=$(awk '{print $3}' "/proc/$1/stat" 2>/dev/null) || return 1
  [ -n "$s" ] && [ "$s" != Z ]
}

# ---- configuration ------------------------------------------------------------
# make_config NAME SIZE_MIB [DIRECT_IO(true|false|"")] [BACKING]
# Writes $W/NAME.toml, creates the backing file (truncate, unless BACKING is
# given and exists), sets CFG and SIZE_BYTES.
make_config() {
  local name=$1 mib=$2 direct=${3:-} backing=${4:-$W/$1.img}
  CFG=$W/$name.toml
  SIZE_BYTES=$((mib * MiB))
  [ -e "$backing" ] || truncate -s "${mib}M" "$backing" || fail "cannot create $backing"
  {
    echo '[resource]'
    echo "name = \"$name\""
    echo "size = \"${mib}MiB\""
    echo
    echo '[node]'
    echo 'id = 1'
    echo 'name = "guest"'
    echo "backing = \"$backing\""
    echo "metadata = \"$W/$name.meta\""
    echo "control_socket = \"/run/vmsync/$name.sock\""
    [ -z "$direct" ] || echo "direct_io = $direct"
  } > "$CFG"
  log "config $CFG:"; sed 's/^/    /' "$CFG"
}

backing_of() { sed -n 's/^backing = "\(.*\)"$/\1/p' "${1:-$CFG}"; }

create_md() {
  local cfg=${1:-$CFG} out
  log "+ vmsyncctl create-md --config $cfg"
  out=$("$VMSYNCCTL" create-md --config "$cfg" 2>&1) || fail "create-md failed (rc=$?): $out"
  [ -z "$out" ] || printf '%s\n' "$out" | sed 's/^/    /'
}

# kernel_has_zero_copy: true on a kernel whose ublk has zero copy
# (UBLK_F_AUTO_BUF_REG, Linux 6.16), which the daemon then uses.
kernel_has_zero_copy() {
  local k
  k=$(uname -r)
  printf '6.16\n%s\n' "${k%%[-+]*}" | sort -V -C
}

# ---- daemon -------------------------------------------------------------------
# start_daemon [CFG]: vmsyncd --config CFG in the background; sets DAEMON_PID.
start_daemon() {
  local cfg=${1:-$CFG}
  DAEMON_LOG=$W/vmsyncd.$((${#DAEMON_LOGS[@]} + 1)).log
  DAEMON_LOGS+=("$DAEMON_LOG")
  log "+ vmsyncd --config $cfg  (log $DAEMON_LOG)"
  "$VMSYNCD" --config "$cfg" >"$DAEMON_LOG" 2>&1 &
  DAEMON_PID=$!
  echo "$DAEMON_PID" >> "$VMTEST_PIDS_FILE"
}

status_json() { "$VMSYNCCTL" --config "${1:-$CFG}" status --json 2>&1; }

# wait_device [CFG] [TIMEOUT_S]: polls status --json until "device" is set and
# is a block device of the configured size; sets DEV, DEV_NAME.
wait_device() {
  local cfg=${1:-$CFG} timeout=${2:-90} js="" dev="" t0 sz
  t0=$(date +%s)
  while :; do
    if ! proc_alive "$DAEMON_PID"; then
      wait "$DAEMON_PID"; DAEMON_RC=$?
      fail "vmsyncd exited (rc=$DAEMON_RC) before its device appeared; last status: $js"
    fi
    js=$(status_json "$cfg") && dev=$(json_get device <<<"$js") || dev=""
    if [ -n "$dev" ] && [ -b "$dev" ]; then break; fi
    [ $(($(date +%s) - t0)) -lt "$timeout" ] || fail "no device after ${timeout}s; last status: $js"
    sleep 0.5
  done
  DEV=$dev DEV_NAME=${dev##*/}
  sz=$(( $(cat "/sys/block/$DEV_NAME/size") * 512 ))
  if [ -n "$SIZE_BYTES" ] && [ "$sz" -ne "$SIZE_BYTES" ]; then
    fail "$DEV has $sz bytes, expected $SIZE_BYTES"
  fi
  log "device $DEV up after $(($(date +%s) - t0))s ($sz bytes)"
}

# stop_daemon [TIMEOUT_S]: SIGTERM and wait for the exit; sets DAEMON_RC.
# Fails when the daemon does not exit in time.
stop_daemon() {
  local timeout=${1:-60} t0
  t0=$(date +%s)
  log "+ kill -TERM vmsyncd ($DAEMON_PID)"
  kill -TERM "$DAEMON_PID" 2>/dev/null
  while proc_alive "$DAEMON_PID"; do
    [ $(($(date +%s) - t0)) -lt "$timeout" ] || fail "vmsyncd did not exit ${timeout}s after SIGTERM"
    sleep 0.2
  done
  wait "$DAEMON_PID"; DAEMON_RC=$?
  log "vmsyncd exited rc=$DAEMON_RC after $(($(date +%s) - t0))s"
}

# stop_daemon_clean: SIGTERM, exit status 0, device node gone, status fails.
stop_daemon_clean() {
  local dev=$DEV out
  stop_daemon "$@"
  [ "$DAEMON_RC" -eq 0 ] || fail "vmsyncd exited with status $DAEMON_RC after SIGTERM"
  wait_gone "$dev" 20 || fail "$dev still present after vmsyncd exited"
  if out=$(status_json "$CFG"); then
    fail "vmsyncctl status succeeded with the daemon stopped: $out"
  fi
}

# crash_daemon: SIGKILL, reap.
crash_daemon() {
  log "+ kill -9 vmsyncd ($DAEMON_PID)"
  kill -KILL "$DAEMON_PID"
  wait "$DAEMON_PID" 2>/dev/null; DAEMON_RC=$?
  log "vmsyncd killed (rc=$DAEMON_RC)"
}

wait_gone() { # PATH TIMEOUT_S
  local i
  for i in $(seq 1 $(( ${2:-20} * 5 ))); do
    [ -e "$1" ] || return 0
    sleep 0.2
  done
  return 1
}

# ---- two-node resources (configs $W/n1.toml and $W/n2.toml) -----------------
# peer_in_state ID STATE [ANY_STALE]: node ID's peer is in STATE, with no
# stale bytes unless ANY_STALE is given.
peer_in_state() {
  local js
  js=$(status_json "$W/n$1.toml" | tr -d ' \n') || return 1
  grep -q "\"state\":\"$2\"" <<<"$js" && { [ -n "${3:-}" ] || ! grep -q '"stale_bytes":[1-9]' <<<"$js"; }
}

# wait_peer_state ID TIMEOUT_S [STATE [ANY_STALE]]: polls peer_in_state
# (STATE up-to-date by default); after TIMEOUT_S logs the status, returns 1.
wait_peer_state() {
  local t0
  t0=$(date +%s)
  until peer_in_state "$1" "${3:-up-to-date}" "${4:-}"; do
    [ $(($(date +%s) - t0)) -lt "$2" ] || { log "status of n$1: $(status_json "$W/n$1.toml")"; return 1; }
    sleep 1
  done
}

# ---- data helpers ---------------------------------------------------------------
allocated_bytes() { echo $(( $(stat -c '%b * %B' "$1") )); }

# sums_of DIR > FILE: sha256 of every regular file under DIR, relative names.
sums_of() {
  (cd "$1" && find . -type f ! -path './lost+found/*' -print0 | LC_ALL=C sort -z | xargs -0r sha256sum)
}

verify_sums() { # DIR SUMFILE
  local out
  out=$(cd "$1" && sha256sum --quiet -c "$2" 2>&1) || fail "checksum mismatch in $1: $(echo "$out" | head -n 5 | tr '\n' ';')"
  log "verified $(wc -l < "$2") checksums in $1"
}

# read_dev DEV OFFSET LEN: O_DIRECT read of a byte range to stdout.
read_dev() {
  dd if="$1" bs=1M iflag=direct,skip_bytes,count_bytes skip="$2" count="$3" status=none
}

# write_dev SRC SRC_OFF DEV OFF LEN [BS]: O_DIRECT write of a byte range.
write_dev() {
  dd if="$1" of="$3" bs="${6:-1M}" iflag=skip_bytes,count_bytes skip="$2" count="$5" \
    oflag=direct,seek_bytes seek="$4" conv=notrunc status=none
}

# kernel_errors: I/O or file system errors in the kernel log.
kernel_errors() {
  dmesg 2>/dev/null | grep -E 'I/O error|EXT4-fs error|EXT4-fs warning|Buffer I/O|blk_update_request|Remounting filesystem read-only|critical medium error' || true
}

mounted_rw() { # MOUNTPOINT
  awk -v m="$1" '$2 == m {split($4, o, ","); print o[1]}' /proc/mounts | grep -qx rw
}
