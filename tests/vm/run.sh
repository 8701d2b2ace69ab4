#!/usr/bin/env bash
# Boots the vmsync test VM once and runs the named scenarios inside it.
#
#   tests/vm/run.sh [-q] [--shell] SCENARIO...     (or "all")
#
# Scenarios are tests/vm/scenarios/NAME.sh; they run in the given order in
# one boot. The serial console is copied to $VM_CONSOLE_LOG and parsed for
# "VMTEST PASS|FAIL|SKIP name" markers. Exit status: 0 when every scenario
# passed or was skipped, 1 when one failed or gave no result (guest crash,
# hang, timeout), 2 on usage/setup errors.
#
# Environment (defaults in brackets):
#   VMSYNC_BIN_DIR    binaries under test [<repo>/target/release]
#   VM_TIMEOUT        hard limit for the whole qemu run, seconds [1500]
#   SCENARIO_TIMEOUT  per-scenario limit inside the guest, seconds [600]
#   VM_CONSOLE_LOG    console log [tests/vm/.build/last-console.log]
#   VM_MEM / VM_SMP   guest memory MiB / vCPUs [2048 / 2]
#   VM_SCRATCH_SIZE   sparse scratch disk (ext4 in the guest) [4G]
#   VM_DISK_CACHE     qemu cache mode of the scratch disk [writeback]
#   VM_APPEND         extra kernel command line
#   VM_KVER, VM_KERNEL_ROOT  another guest kernel (see build-initramfs.sh;
#                     `eval "$(tests/vm/fetch-kernel.sh)"` sets both for a
#                     kernel with ublk zero copy)
#   VMT_* BENCH_* RUST_LOG   passed through to the guest scenarios
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
BUILD=${VM_BUILD_DIR:-$HERE/.build}
ALL_SCENARIOS="smoke fs_basic standalone_direct raw_equals_backing crash_recovery discard replicated_fs machine_switch crash_torture failing_disk superseded_primary resize online_resize package_install"

usage() { sed -n '2,25p' "$0" | sed 's/^# \{0,1\}//'; exit 2; }
QUIET=0; SHELL_AFTER=0
scen=()
while [ $# -gt 0 ]; do
  case "$1" in
    -q|--quiet) QUIET=1 ;;
    --shell) SHELL_AFTER=1 ;;
    -h|--help) usage ;;
    all) scen+=($ALL_SCENARIOS) ;;
    -*) echo "run.sh: unknown option $1" >&2; usage ;;
    *) scen+=("$1") ;;
  esac
  shift
done
[ ${#scen[@]} -gt 0 ] || [ "$SHELL_AFTER" = 1 ] || usage
for s in "${scen[@]}"; do
  [ -f "$HERE/scenarios/$s.sh" ] || { echo "run.sh: no scenario $HERE/scenarios/$s.sh" >&2; exit 2; }
done

VM_TIMEOUT=${VM_TIMEOUT:-1500}
SCENARIO_TIMEOUT=${SCENARIO_TIMEOUT:-600}
VMSYNC_BIN_DIR=${VMSYNC_BIN_DIR:-$REPO/target/release}
VMSYNC_BIN_DIR=$(cd "$VMSYNC_BIN_DIR" 2>/dev/null && pwd || echo "$VMSYNC_BIN_DIR")
LOG=${VM_CONSOLE_LOG:-$BUILD/last-console.log}
mkdir -p "$BUILD" "$(dirname "$LOG")"

for b in vmsyncd vmsyncctl; do
  [ -x "$VMSYNC_BIN_DIR/$b" ] || echo "run.sh: warning: $VMSYNC_BIN_DIR/$b missing (cargo build --release?)" >&2
done
command -v qemu-system-x86_64 >/dev/null || { echo "run.sh: qemu-system-x86_64 missing; run scripts/setup.sh" >&2; exit 2; }

"$HERE/build-initramfs.sh" >/dev/null
# shellcheck disable=SC1091
. "$BUILD/vm.env"

# Per-run directory, visible to the guest through the read-only 9p share:
# the guest mounts tmpfs over /tmp, so the job file must not live there.
RUN_DIR=$(mktemp -d "$BUILD/run.XXXXXX")
cleanup() { rm -rf "$RUN_DIR"; }
trap cleanup EXIT
JOB=$RUN_DIR/job.env
{
  printf 'REPO=%q\n' "$REPO"
  printf 'SCENARIOS=%q\n' "${scen[*]:-}"
  printf 'VMSYNC_BIN_DIR=%q\n' "$VMSYNC_BIN_DIR"
  printf 'SCENARIO_TIMEOUT=%q\n' "$SCENARIO_TIMEOUT"
  printf 'GUEST_TIMEOUT=%q\n' "$((VM_TIMEOUT > 120 ? VM_TIMEOUT - 60 : VM_TIMEOUT))"
  while IFS='=' read -r k _; do
    case "$k" in
      VMT_*|BENCH_*|RUST_LOG) printf 'export %s=%q\n' "$k" "${!k}" ;;
    esac
  done < <(env)
} > "$JOB"
chmod 644 "$JOB"

SCRATCH_IMG=$RUN_DIR/scratch.img
truncate -s "${VM_SCRATCH_SIZE:-4G}" "$SCRATCH_IMG"
# Formatting here takes well under a second; in the TCG guest it takes ~5 s.
# Few inodes and no lazy init: no ext4lazyinit writes during benchmarks.
SCRATCH_FMT=none
if command -v mkfs.ext4 >/dev/null &&
   mkfs.ext4 -q -F -N 65536 -J size=32 -E nodiscard,lazy_itable_init=0,lazy_journal_init=0 -L vmscratch "$SCRATCH_IMG"; then
  SCRATCH_FMT=ext4
fi
echo "SCRATCH_FMT=$SCRATCH_FMT" >> "$JOB"

APPEND="console=ttyS0 quiet panic=-1 vmtest_repo=$REPO vmtest_job=$JOB vmtest_shell=$SHELL_AFTER ${VM_APPEND:-}"
QEMU=(qemu-system-x86_64
  -accel tcg,thread=multi -smp "${VM_SMP:-2}" -m "${VM_MEM:-2048}"
  -nographic -no-reboot
  -kernel "$KERNEL" -initrd "$INITRD" -append "$APPEND"
  -virtfs local,path=/,mount_tag=hostroot,security_model=none,readonly=on,multidevs=remap
  -drive "file=$SCRATCH_IMG,format=raw,if=none,id=scratch,cache=${VM_DISK_CACHE:-writeback},discard=unmap"
  -device virtio-blk-pci,drive=scratch,serial=vmtest-scratch
)

echo "run.sh: kernel $KVER, scenarios: ${scen[*]:-none}, log: $LOG" >&2
# Multi-threaded TCG (qemu 7.2) now and then oopses the guest kernel while it
# live-patches its own code ("Oops: int3" early in boot). A guest that never
# reached the test runner is booted again, up to VM_BOOT_RETRIES times.
BOOT_RETRIES=${VM_BOOT_RETRIES:-2}
# The same oops can strike later in a run: then the scenarios without a
# result run again in a fresh boot, up to VM_CRASH_RETRIES times. Only for
# that emulator fault ("Oops: int3"); any other guest crash stays a failure.
CRASH_RETRIES=${VM_CRASH_RETRIES:-1}
rm -f "$LOG".bootfail.* "$LOG".crash.*
start=$(date +%s)
attempt=0
crashes=0
reset_scratch() {
  truncate -s 0 "$SCRATCH_IMG"; truncate -s "${VM_SCRATCH_SIZE:-4G}" "$SCRATCH_IMG"
  [ "$SCRATCH_FMT" != ext4 ] || mkfs.ext4 -q -F -N 65536 -J size=32 -E nodiscard,lazy_itable_init=0,lazy_journal_init=0 -L vmscratch "$SCRATCH_IMG"
}
# Whether the console log $1 holds a result for scenario $2.
has_result() { tr -d '\r' < "$1" | grep -a -q -E "VMTEST (PASS|FAIL|SKIP) $2(: .*)?\$"; }
while :; do
while :; do
  attempt=$((attempt + 1))
  set +e
  if [ "$SHELL_AFTER" = 1 ]; then
    timeout -k 10 "$VM_TIMEOUT" "${QEMU[@]}" 2>&1 | tee "$LOG"
    qrc=${PIPESTATUS[0]}
  elif [ "$QUIET" = 1 ]; then
    timeout -k 10 "$VM_TIMEOUT" "${QEMU[@]}" </dev/null 2>&1 | tee "$LOG" | grep --line-buffered -a -E 'VMTEST|BENCH|Oops|Kernel panic'
    qrc=${PIPESTATUS[0]}
  else
    timeout -k 10 "$VM_TIMEOUT" "${QEMU[@]}" </dev/null 2>&1 | tee "$LOG"
    qrc=${PIPESTATUS[0]}
  fi
  set -e
  grep -a -q 'VMTEST BOOT' "$LOG" && break
  grep -a -q 'VMTEST FATAL' "$LOG" && break   # deterministic setup error: no retry
  [ "$attempt" -le "$BOOT_RETRIES" ] || break
  cp "$LOG" "$LOG.bootfail.$attempt"
  echo "run.sh: guest died before the test runner started (attempt $attempt, log $LOG.bootfail.$attempt: $(tr -d '\r' < "$LOG" | grep -a -m1 -o -E '(Oops|Kernel panic|BUG):.*' || echo "no kernel message")); booting again" >&2
  reset_scratch
done
  grep -a -q 'VMTEST DONE' "$LOG" && break
  grep -a -q 'VMTEST BOOT' "$LOG" || break
  grep -a -q 'Oops: int3' "$LOG" || break
  [ "$crashes" -lt "$CRASH_RETRIES" ] || break
  crashes=$((crashes + 1))
  cp "$LOG" "$LOG.crash.$crashes"
  remaining=()
  for s in "${scen[@]}"; do
    done_before=0
    for l in "$LOG".crash.*; do has_result "$l" "$s" && done_before=1; done
    [ "$done_before" = 1 ] || remaining+=("$s")
  done
  [ ${#remaining[@]} -gt 0 ] || break
  echo "run.sh: the guest kernel oopsed on int3 (TCG live-patching, not vmsync) during the run (log $LOG.crash.$crashes); booting again for: ${remaining[*]}" >&2
  # (Scenario names are plain words: single quotes suffice.)
  sed -i "s|^SCENARIOS=.*|SCENARIOS='${remaining[*]}'|" "$JOB"
  reset_scratch
done
elapsed=$(( $(date +%s) - start ))

# ---- results --------------------------------------------------------------
clean=$(tr -d '\r' < "$LOG")
# Results of boots cut short by the emulator's oops count too.
all_results=$(for f in "$LOG".crash.* "$LOG"; do [ ! -e "$f" ] || cat "$f"; done | tr -d '\r')
fails=0
echo
echo "==== vmtest summary (${elapsed}s wall, qemu exit $qrc) ===="
for s in "${scen[@]}"; do
  line=$(grep -a -o -E "VMTEST (PASS|FAIL|SKIP) $s(: .*)?\$" <<<"$all_results" | head -n1 || true)
  t=$(grep -a -o -E "VMTEST TIME $s [0-9]+" <<<"$all_results" | head -n1 | awk '{print $4}' || true)
  case "$line" in
    "VMTEST PASS $s"*) printf '  PASS  %-22s %5ss\n' "$s" "${t:-?}" ;;
    "VMTEST SKIP $s"*) printf '  SKIP  %-22s %5ss  %s\n' "$s" "${t:-?}" "${line#*: }" ;;
    "VMTEST FAIL $s"*) printf '  FAIL  %-22s %5ss  %s\n' "$s" "${t:-?}" "${line#*: }"; fails=$((fails + 1)) ;;
    *) printf '  NONE  %-22s        no result (guest crashed, hung or timed out)\n' "$s"; fails=$((fails + 1)) ;;
  esac
done
boot=$(grep -a -o -E 'VMTEST BOOT up=[0-9.]+' <<<"$clean" | head -n1 | sed 's/.*up=//' || true)
[ -z "$boot" ] || echo "  guest reached the test runner ${boot}s after kernel start"
grep -a -E 'VMTEST (FATAL|WATCHDOG)' <<<"$clean" | sed 's/^/  /' || true
bootfails=$(find "$(dirname "$LOG")" -maxdepth 1 -name "$(basename "$LOG").bootfail.*" | wc -l)
[ "$bootfails" -eq 0 ] || echo "  $bootfails boot(s) crashed before the test runner started (see $LOG.bootfail.*)"
[ "$crashes" -eq 0 ] || echo "  the guest kernel oopsed on int3 (TCG) $crashes time(s) mid-run; the scenarios without a result ran again (see $LOG.crash.*)"
kmsg=$(grep -a -m1 -o -E '(Oops|Kernel panic - not syncing|BUG):.*' <<<"$clean" || true)
[ -z "$kmsg" ] || echo "  guest kernel: $kmsg"
if ! grep -a -q 'VMTEST DONE' <<<"$clean"; then
  echo "  no 'VMTEST DONE' marker: the guest did not finish (crash, hang or timeout)"
  [ "$qrc" -ne 124 ] || echo "  qemu killed after VM_TIMEOUT=${VM_TIMEOUT}s"
  fails=$((fails + 1))
fi
echo "  console log: $LOG"
[ "$fails" -eq 0 ]
