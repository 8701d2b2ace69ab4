#!/usr/bin/env bash
# vmsync over ublk vs the kernel loop driver and vs rublk's ublk loop target
# (the reference ublk server, installed here from crates.io on first use),
# all with O_DIRECT on backing files on the same ext4, measured with fio in
# ONE boot of the test VM (tests/vm/run.sh scenario bench_ublk_vs_loop).
# Prints a table with the ratios vmsync/rublk and vmsync/loop; absolute
# numbers are meaningless under TCG.
#
# Environment: BENCH_RUNTIME (seconds per fio run, 20), BENCH_SIZE_MIB (512),
# BENCH_ENGINE (libaio|io_uring), BENCH_TESTS, BENCH_SCHED (scheduler on all,
# none), BENCH_QUEUES (ublk queues of vmsync and rublk, 1), BENCH_RUBLK
# (a rublk binary to use; "none": skip rublk), BENCH_RUBLK_ARGS (extra
# `rublk add loop` options; default none: rublk as a user starts it, depth
# 128 and 512 KiB buffers; "-d 64 -b 1MiB" gives it vmsync's shape),
# BENCH_PASSES (passes with rublk, 2: vmsync and rublk swap backing files
# every pass and which runs first every two; 4 hold each combination once),
# BENCH_PEER=1 (vmsync as a replicated primary with one peer on the guest's
# loopback, protocol C: the replication layer's path, not the standalone's),
# VMSYNC_BIN_DIR, and everything
# tests/vm/run.sh takes: with `eval "$(tests/vm/fetch-kernel.sh)"; export
# VM_KERNEL_ROOT VM_KVER` the guest boots a 6.16+ kernel, where vmsync
# serves with ublk zero copy (rublk stays in its default, copying mode). Console log: tests/vm/.build/bench-console.log.
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
export VM_CONSOLE_LOG=${VM_CONSOLE_LOG:-$REPO/tests/vm/.build/bench-console.log}
export SCENARIO_TIMEOUT=${SCENARIO_TIMEOUT:-1200}
export VM_TIMEOUT=${VM_TIMEOUT:-1500}
export BENCH_RUNTIME=${BENCH_RUNTIME:-20} BENCH_SIZE_MIB=${BENCH_SIZE_MIB:-512} BENCH_ENGINE=${BENCH_ENGINE:-libaio}
[ -z "${BENCH_TESTS:-}" ] || export BENCH_TESTS
[ -z "${BENCH_SCHED+x}" ] || export BENCH_SCHED
export BENCH_QUEUES=${BENCH_QUEUES:-1}
export BENCH_PASSES=${BENCH_PASSES:-2}
export BENCH_RUBLK_ARGS=${BENCH_RUBLK_ARGS:-}

# rublk 0.2.15 (the version the performance issue names), built once into
# target/rublk. The guest sees the host's root, so it runs this binary.
RUBLK_VERSION=0.2.15
if [ "${BENCH_RUBLK:-}" = none ]; then
  unset BENCH_RUBLK
elif [ -z "${BENCH_RUBLK:-}" ]; then
  BENCH_RUBLK=$REPO/target/rublk/bin/rublk
  if ! "$BENCH_RUBLK" --version 2>/dev/null | grep -q "$RUBLK_VERSION"; then
    echo "installing rublk $RUBLK_VERSION into $REPO/target/rublk (once)..." >&2
    cargo install --quiet --locked rublk --version "$RUBLK_VERSION" --root "$REPO/target/rublk" >&2
  fi
  export BENCH_RUBLK
fi

rc=0
"$REPO/tests/vm/run.sh" -q bench_ublk_vs_loop || rc=$?

echo
echo "vmsync (ublk, direct_io${BENCH_PEER:+, replicated primary with 1 peer}) vs rublk $RUBLK_VERSION (add loop${BENCH_RUBLK_ARGS:+ $BENCH_RUBLK_ARGS}, direct I/O) vs loop (--direct-io=on), $BENCH_QUEUES ublk queue(s), fio $BENCH_ENGINE, ${BENCH_RUNTIME}s per run, TCG guest"
results=$(tr -d '\r' < "$VM_CONSOLE_LOG" | grep -a -E '^BENCH ' || true)
[ -n "$results" ] || { echo "(no BENCH results)"; exit 1; }
# Each figure is the mean over the passes (with rublk: BENCH_PASSES, vmsync
# and rublk swapping backing files and which runs first, see the scenario).
means() {
  awk '
    { t = $2; if (!(t in seen)) { seen[t] = 1; order[++n] = t }
      passes[t]++
      for (i = 3; i <= NF; i++) { split($i, kv, "="); if (kv[1] != "pass") sum[t, kv[1]] += kv[2] } }
    END { for (j = 1; j <= n; j++) { t = order[j]; line = "BENCH " t " passes=" passes[t]
            for (key in sum) { split(key, k, SUBSEP); if (k[1] == t) line = line " " k[2] "=" sum[key] / passes[t] }
            print line } }'
}
mean_results=$(echo "$results" | means)
echo "$mean_results" | awk '
  function v(k,   i, kv) { for (i = 3; i <= NF; i++) { split($i, kv, "="); if (kv[1] == k) return kv[2] } return 0 }
  BEGIN { printf "%-14s %7s %10s %10s %10s %10s %10s %10s %13s %12s\n", "test", "passes", "loop IOPS", "loop MiB/s", "rublk IOPS", "rublk MiB/s", "vmsync IOPS", "vmsync MiB/s", "vmsync/rublk", "vmsync/loop" }
  {
    li = v("loop_iops"); lb = v("loop_mibps"); vi = v("vmsync_iops"); vb = v("vmsync_mibps"); ri = v("rublk_iops"); rb = v("rublk_mibps")
    r = (li > 0) ? vi / li : 0
    rr = (ri > 0) ? sprintf("%.2f", vi / ri) : "-"
    printf "%-14s %7d %10d %10.1f %10d %10.1f %10d %10.1f %13s %12.2f\n", $2, v("passes"), li, lb, ri, rb, vi, vb, rr, r
  }'
# CPU per request, the figure a TCG guest measures best: the whole guest
# (fio, kernel, server) and the ublk server process alone.
echo
echo "CPU time per I/O in the guest (µs): all CPUs busy time, and the ublk server's own threads"
echo "$mean_results" | awk '
  function v(k,   i, kv) { for (i = 3; i <= NF; i++) { split($i, kv, "="); if (kv[1] == k) return kv[2] } return "-" }
  function ratio(a, b) { return (a != "-" && b != "-" && b > 0) ? sprintf("%.2f", a / b) : "-" }
  function us(a) { return (a == "-") ? a : sprintf("%.1f", a) }
  BEGIN { printf "%-14s %10s %10s %11s %11s %11s %13s %13s\n", "test", "loop all", "rublk all", "vmsync all", "rublk srv", "vmsync srv", "all v/rublk", "srv v/rublk" }
  {
    lc = v("loop_cpu"); rc = v("rublk_cpu"); vc = v("vmsync_cpu"); rs = v("rublk_srv"); vs = v("vmsync_srv")
    printf "%-14s %10s %10s %11s %11s %11s %13s %13s\n", $2, us(lc), us(rc), us(vc), us(rs), us(vs), ratio(vc, rc), ratio(vs, rs)
  }'
echo
echo "Each pass (vmsync/rublk IOPS):"
echo "$results" | awk '
  function v(k,   i, kv) { for (i = 3; i <= NF; i++) { split($i, kv, "="); if (kv[1] == k) return kv[2] } return 0 }
  { ri = v("rublk_iops"); printf "  %-14s pass %s: %s\n", $2, v("pass"), (ri > 0) ? sprintf("%.2f", v("vmsync_iops") / ri) : "-" }'
exit "$rc"
