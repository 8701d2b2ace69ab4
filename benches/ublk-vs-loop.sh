#!/usr/bin/env bash
# vmsync over ublk vs the kernel loop driver, both with O_DIRECT on a backing
# file on the same ext4, measured with fio in ONE boot of the test VM
# (tests/vm/run.sh scenario bench_ublk_vs_loop). Prints a table with the
# ratio vmsync/loop; absolute numbers are meaningless under TCG.
#
# Environment: BENCH_RUNTIME (seconds per fio run, 20), BENCH_SIZE_MIB (512),
# BENCH_ENGINE (libaio|io_uring), BENCH_TESTS, BENCH_SCHED (scheduler on both, none), VMSYNC_BIN_DIR, and everything
# tests/vm/run.sh takes. Console log: tests/vm/.build/bench-console.log.
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
export VM_CONSOLE_LOG=${VM_CONSOLE_LOG:-$REPO/tests/vm/.build/bench-console.log}
export SCENARIO_TIMEOUT=${SCENARIO_TIMEOUT:-1200}
export VM_TIMEOUT=${VM_TIMEOUT:-1500}
export BENCH_RUNTIME=${BENCH_RUNTIME:-20} BENCH_SIZE_MIB=${BENCH_SIZE_MIB:-512} BENCH_ENGINE=${BENCH_ENGINE:-libaio}
[ -z "${BENCH_TESTS:-}" ] || export BENCH_TESTS
[ -z "${BENCH_SCHED+x}" ] || export BENCH_SCHED

rc=0
"$REPO/tests/vm/run.sh" -q bench_ublk_vs_loop || rc=$?

echo
echo "vmsync (ublk, direct_io) vs loop (--direct-io=on), fio $BENCH_ENGINE, ${BENCH_RUNTIME}s per run, TCG guest"
tr -d '\r' < "$VM_CONSOLE_LOG" | grep -a -E '^BENCH ' | awk '
  function v(k,   i, kv) { for (i = 3; i <= NF; i++) { split($i, kv, "="); if (kv[1] == k) return kv[2] } return 0 }
  BEGIN { printf "%-14s %11s %12s %11s %12s %11s\n", "test", "loop IOPS", "loop MiB/s", "vmsync IOPS", "vmsync MiB/s", "vmsync/loop"; n = 0 }
  {
    li = v("loop_iops"); lb = v("loop_mibps"); vi = v("vmsync_iops"); vb = v("vmsync_mibps")
    r = (li > 0) ? vi / li : 0
    printf "%-14s %11d %12.1f %11d %12.1f %11.2f\n", $2, li, lb, vi, vb, r; n++
  }
  END { if (n == 0) { print "(no BENCH results)"; exit 1 } }' || rc=1
exit "$rc"
