#!/bin/bash
# Runs inside the test VM, chrooted into the host's root (read-only 9p with
# tmpfs on /tmp, /run, /var/tmp). Started by the initramfs /init with the path
# of a job file written by run.sh. Prepares the scratch disk, then runs every
# scenario in its own process group with its own timeout and prints one
# machine-readable marker per scenario on the console:
#   VMTEST START name
#   VMTEST PASS name | VMTEST FAIL name: reason | VMTEST SKIP name: reason
#   VMTEST TIME name seconds
# and finally "VMTEST DONE". A scenario passes when it exits 0, is skipped
# with exit 77 and fails otherwise; fail() in lib.sh leaves the reason in
# $VMTEST_RESULT_FILE.
set -u

JOB=${1:-}
if [ -n "$JOB" ]; then
  if [ -r "$JOB" ]; then
    # shellcheck disable=SC1090
    . "$JOB"
  else
    echo "VMTEST FATAL guest-run: job file $JOB not readable"
    exit 1
  fi
fi
: "${REPO:=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)}"
: "${SCENARIOS=smoke}"
: "${VMSYNC_BIN_DIR:=$REPO/target/release}"
: "${SCENARIO_TIMEOUT:=600}"
: "${GUEST_TIMEOUT:=1400}"
: "${VMT_ALLOW_KERNEL_WARN:=0}"
export REPO VMSYNC_BIN_DIR SCENARIO_TIMEOUT
export RUST_BACKTRACE=${RUST_BACKTRACE:-1}

up() { local u _; read -r u _ < /proc/uptime; echo "$u"; }
marker() { printf 'VMTEST %s\n' "$*"; }
marker "BOOT up=$(up)s kernel=$(uname -r)"

# Global watchdog: if everything takes too long (a task stuck in D state
# cannot be killed), dump the blocked tasks and power off through sysrq, so
# that the host sees the guest end well before its own hard timeout.
echo 1 > /proc/sys/kernel/sysrq 2>/dev/null
(
  trap - TERM
  sleep "$GUEST_TIMEOUT"
  marker "WATCHDOG guest timeout ${GUEST_TIMEOUT}s: $(cat /tmp/vmtest.current 2>/dev/null)"
  echo w > /proc/sysrq-trigger
  sleep 2
  echo o > /proc/sysrq-trigger
) &
WATCHDOG=$!

# ---- scratch file system -------------------------------------------------
SCRATCH=/tmp/scratch
mkdir -p "$SCRATCH"
sdev=""
for b in /sys/block/vd*; do
  [ -e "$b" ] || continue
  if [ "$(cat "$b/serial" 2>/dev/null)" = vmtest-scratch ]; then sdev=/dev/${b##*/}; fi
done
if [ -n "$sdev" ]; then
  # run.sh formats it on the host (SCRATCH_FMT=ext4); format here otherwise.
  if { [ "${SCRATCH_FMT:-}" = ext4 ] ||
       mkfs.ext4 -q -F -N 65536 -J size=32 -E nodiscard,lazy_itable_init=0,lazy_journal_init=0 -L vmscratch "$sdev"; } \
     && mount -t ext4 "$sdev" "$SCRATCH"; then
    marker "SCRATCH ext4 on $sdev ($(($(cat /sys/block/${sdev#/dev/}/size) / 2048)) MiB) up=$(up)s"
  else
    marker "SCRATCH could not format $sdev, falling back to tmpfs"
    sdev=""
  fi
fi
if [ -z "$sdev" ]; then
  mount -t tmpfs -o size=75% tmpfs "$SCRATCH"
  marker "SCRATCH tmpfs"
fi
export SCRATCH
mkdir -p /run/vmsync

# ---- helpers -------------------------------------------------------------
proc_alive() { # pid: running and not a zombie
  local s
  s=$(awk '{print $3}' "/proc/$1/stat" 2>/dev/null) || return 1
  [ -n "$s" ] && [ "$s" != Z ]
}

kernel_trouble() { # prints kernel log lines that mean a kernel bug
  dmesg 2>/dev/null | grep -E 'BUG:|WARNING:|Oops|general protection|Call Trace|blocked for more than|soft lockup|hard LOCKUP' | head -n 20
}

kill_group() { # PGID: SIGKILL what a scenario left running in its process
  # group (background writers...), except the daemons, which cleanup_after
  # stops with SIGTERM after unmounting.
  local p
  for p in $(awk -v g="$1" '$5 == g {print $1}' /proc/[0-9]*/stat 2>/dev/null); do
    [ "/proc/$p/exe" -ef "$VMSYNC_BIN_DIR/vmsyncd" ] && continue
    echo "cleanup: SIGKILL leftover pid $p ($(tr '\0' ' ' < "/proc/$p/cmdline" 2>/dev/null))"
    kill -KILL "$p" 2>/dev/null
  done
}

cleanup_after() { # leftovers of a scenario: mounts, loop devices, daemons
  local pids p m tries
  # Unmount anything below the scratch dir and anything on a ublk/loop device.
  for tries in 1 2 3; do
    m=$(awk -v s="$SCRATCH/" '$2 ~ "^"s || $1 ~ "^/dev/(ublkb|loop)" {print $2}' /proc/mounts | sort -r)
    [ -n "$m" ] || break
    for p in $m; do
      echo "cleanup: umount $p"
      timeout 30 umount "$p" 2>/dev/null || timeout 10 umount -l "$p" 2>/dev/null
    done
  done
  losetup -D 2>/dev/null
  # Daemons the scenario started (lib.sh records them) and any process still
  # running one of the binaries under test.
  pids=$(cat "$VMTEST_PIDS_FILE" 2>/dev/null)
  # (test -ef, not readlink: every fork costs ~0.1 s under TCG)
  for p in /proc/[0-9]*; do
    if [ "$p/exe" -ef "$VMSYNC_BIN_DIR/vmsyncd" ] || [ "$p/exe" -ef "$VMSYNC_BIN_DIR/vmsyncctl" ]; then
      pids="$pids ${p#/proc/}"
    fi
  done
  for p in $pids; do
    proc_alive "$p" || continue
    echo "cleanup: SIGTERM leftover pid $p ($(tr '\0' ' ' < /proc/$p/cmdline 2>/dev/null))"
    kill -TERM "$p" 2>/dev/null
  done
  for tries in $(seq 1 40); do
    local alive=""
    for p in $pids; do proc_alive "$p" && alive="$alive $p"; done
    [ -n "$alive" ] || break
    sleep 0.5
  done
  for p in $pids; do
    proc_alive "$p" || continue
    echo "cleanup: SIGKILL leftover pid $p"
    kill -KILL "$p" 2>/dev/null
  done
  # Device-mapper devices a scenario made (over loop devices).
  if [ -e /dev/mapper/control ] && command -v dmsetup >/dev/null; then
    DM_DISABLE_UDEV=1 dmsetup remove_all --force >/dev/null 2>&1
    losetup -D 2>/dev/null
  fi
  local left
  left=$(ls /dev/ublkb* /dev/ublkc* 2>/dev/null | tr '\n' ' ')
  [ -z "$left" ] || echo "cleanup: ublk devices still present: $left"
}

# ---- scenarios -----------------------------------------------------------
failed=0
for name in $SCENARIOS; do
  script=$REPO/tests/vm/scenarios/$name.sh
  work=$SCRATCH/$name
  export VMTEST_NAME=$name VMTEST_WORK=$work
  export VMTEST_RESULT_FILE=/tmp/vmtest.$name.result VMTEST_PIDS_FILE=/tmp/vmtest.$name.pids
  rm -rf "$work"; mkdir -p "$work"
  : > "$VMTEST_RESULT_FILE"; : > "$VMTEST_PIDS_FILE"
  echo "$name" > /tmp/vmtest.current
  dmesg -C 2>/dev/null
  marker "START $name up=$(up)s"
  t0=$(date +%s)
  if [ ! -f "$script" ]; then
    marker "FAIL $name: no such scenario $script"
    failed=1
    continue
  fi
  # Own session/process group so a timeout can kill the whole scenario.
  setsid bash "$script" </dev/null &
  pid=$!
  rc=""
  deadline=$((t0 + SCENARIO_TIMEOUT))
  while proc_alive "$pid"; do
    if [ "$(date +%s)" -ge "$deadline" ]; then
      echo "guest-run: $name exceeded ${SCENARIO_TIMEOUT}s, killing it"
      echo "timed out after ${SCENARIO_TIMEOUT}s" > "$VMTEST_RESULT_FILE"
      kill -TERM -- "-$pid" 2>/dev/null
      sleep 5
      kill -KILL -- "-$pid" 2>/dev/null
      for _ in $(seq 1 30); do proc_alive "$pid" || break; sleep 1; done
      if proc_alive "$pid"; then
        # Stuck in the kernel: nothing more can run reliably.
        marker "FAIL $name: timed out after ${SCENARIO_TIMEOUT}s and cannot be killed (D state)"
        echo w > /proc/sysrq-trigger
        dmesg | tail -n 100
        marker "DONE failed=1 (aborted)"
        sleep 2
        echo o > /proc/sysrq-trigger
        sleep 30
      fi
      rc=124
      break
    fi
    sleep 1
  done
  if [ -z "$rc" ]; then wait "$pid"; rc=$?; else wait "$pid" 2>/dev/null; fi
  t1=$(date +%s)
  reason=$(head -n1 "$VMTEST_RESULT_FILE" 2>/dev/null)
  trouble=$(kernel_trouble)
  if [ -n "$trouble" ]; then
    echo "guest-run: kernel log after $name:"
    dmesg | tail -n 80
  fi
  if [ "$rc" -eq 0 ] && [ -n "$trouble" ] && [ "$VMT_ALLOW_KERNEL_WARN" != 1 ]; then
    rc=1; reason="kernel: $(echo "$trouble" | head -n1)"
  fi
  case "$rc" in
    0) marker "PASS $name" ;;
    77) marker "SKIP $name: ${reason:-skipped}" ;;
    *) marker "FAIL $name: ${reason:-exit status $rc}"; failed=1 ;;
  esac
  marker "TIME $name $((t1 - t0))"
  kill_group "$pid"
  cleanup_after
  # Free the scratch space of passed scenarios; keep failures for a shell.
  [ "$rc" -ne 0 ] && [ "$rc" -ne 77 ] || rm -rf "$work"
done
rm -f /tmp/vmtest.current
sync
kill "$WATCHDOG" 2>/dev/null
marker "DONE failed=$failed up=$(up)s"
exit "$failed"
