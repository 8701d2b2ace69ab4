#!/usr/bin/env bash
# The thesis's machine-switch experiment, side by side, in ONE boot of the
# test VM (tests/vm/run.sh scenario bench_switch): a file-system workload on
# a new primary whose blocks are all stale (right after `vmsyncctl promote`)
# against the same workload with every block local. Prints a table with the
# ratio switched/local; absolute numbers are meaningless under TCG.
#
# Prepares two plain tarballs on the host from /usr/src/linux-source-6.1.tar.xz
# (package linux-source-6.1, installed by scripts/setup.sh), cached in
# tests/vm/.build/switch-tree/:
#   tree.tar  Documentation include arch/arm arch/powerpc  (~21.5k files, ~118 MiB)
#   w.tar     kernel lib scripts arch/x86                  (~3k files, ~33 MiB)
# Override with BENCH_TREE_DIRS / BENCH_W_DIRS (paths inside the source tree).
#
# Environment: BENCH_SIZE_MIB (device size, 4096), BENCH_RESYNC_RATE (A's WAN
# push, 64KiB), BENCH_SYNC_RATE (B's background sync, product default),
# BENCH_AFTER_SYNC (1: a third run on B once synced), BENCH_SYNC_WAIT (600),
# VM_MEM (3072), VM_SCRATCH_SIZE (16G, sparse), and everything tests/vm/run.sh
# takes. Console log: tests/vm/.build/bench-switch-console.log.
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
export VM_CONSOLE_LOG=${VM_CONSOLE_LOG:-$REPO/tests/vm/.build/bench-switch-console.log}
export SCENARIO_TIMEOUT=${SCENARIO_TIMEOUT:-2400}
export VM_TIMEOUT=${VM_TIMEOUT:-2700}
export VM_MEM=${VM_MEM:-3072}
export VM_SCRATCH_SIZE=${VM_SCRATCH_SIZE:-16G}
export BENCH_SIZE_MIB=${BENCH_SIZE_MIB:-4096}
for v in BENCH_RESYNC_RATE BENCH_SYNC_RATE BENCH_AFTER_SYNC BENCH_SYNC_WAIT; do
  [ -z "${!v+x}" ] || export "${v?}"
done

SRC=/usr/src/linux-source-6.1.tar.xz
[ -r "$SRC" ] || { echo "switch.sh: $SRC missing: apt-get install linux-source-6.1 (scripts/setup.sh)" >&2; exit 2; }
TREE_DIRS=${BENCH_TREE_DIRS:-Documentation include arch/arm arch/powerpc}
W_DIRS=${BENCH_W_DIRS:-kernel lib scripts arch/x86}
CACHE=$REPO/tests/vm/.build/switch-tree
key=$(printf '%s|%s|%s' "$(stat -c '%s %Y' "$SRC")" "$TREE_DIRS" "$W_DIRS" | sha256sum | cut -c1-16)
if [ "$(cat "$CACHE/key" 2>/dev/null)" != "$key" ]; then
  echo "switch.sh: preparing tarballs from $SRC in $CACHE" >&2
  rm -rf "$CACHE"; mkdir -p "$CACHE/src"
  members=()
  for d in $TREE_DIRS $W_DIRS; do members+=("linux-source-6.1/$d"); done
  tar -xJf "$SRC" -C "$CACHE/src" "${members[@]}"
  # shellcheck disable=SC2086
  (cd "$CACHE/src/linux-source-6.1" && tar -cf "$CACHE/tree.tar" $TREE_DIRS && tar -cf "$CACHE/w.tar" $W_DIRS)
  rm -rf "$CACHE/src"
  chmod 644 "$CACHE"/*.tar
  echo "$key" > "$CACHE/key"
fi
export BENCH_TREE_TAR=$CACHE/tree.tar BENCH_W_TAR=$CACHE/w.tar
echo "switch.sh: tree.tar $(tar -tf "$BENCH_TREE_TAR" | grep -vc '/$') files, w.tar $(tar -tf "$BENCH_W_TAR" | grep -vc '/$') files" >&2

rc=0
"$REPO/tests/vm/run.sh" -q bench_switch || rc=$?

log=$(tr -d '\r' < "$VM_CONSOLE_LOG")
echo
echo "Machine switch (thesis experiment): workload W = mount, read every file of the tree, untar w.tar, sync, umount"
echo "device ${BENCH_SIZE_MIB} MiB, protocol C, A=home B=away (nothing mirrored to B), TCG guest: only ratios count"
grep -a -E '^BENCH switch_phase ' <<<"$log" | awk '
  function v(k,   i, kv) { for (i = 3; i <= NF; i++) { split($i, kv, "="); if (kv[1] == k) return kv[2] } return "" }
  BEGIN { printf "%-10s %14s %9s %15s %9s\n", "run", "mount+read s", "untar s", "sync+umount s", "total s" }
  { printf "%-10s %14s %9s %15s %9s\n", v("run"), v("mount_read_s"), v("untar_s"), v("sync_umount_s"), v("total_s") }'
grep -a -E '^BENCH switch ' <<<"$log" | awk '
  function v(k,   i, kv) { for (i = 3; i <= NF; i++) { split($i, kv, "="); if (kv[1] == k) return kv[2] } return "" }
  { n++
    printf "\nfiles in the tree         %s (%s KiB); workload tarball %s files\n", v("files"), v("tree_kib"), v("workload_files")
    printf "stale on B at the switch  %s of %s bytes\n", v("stale_bytes_at_switch"), v("size_bytes")
    printf "promote (switch time)     %s ms\n", v("switch_ms")
    printf "promote + first read      %s ms\n", v("first_read_ms")
    printf "W local (A)               %s s\n", v("local_s")
    printf "W switched (B, stale)     %s s\n", v("switched_s")
    printf "ratio switched/local      %s   (thesis: 339.2 s / 216.8 s = 1.56)\n", v("ratio") }
  END { if (n == 0) { print "(no BENCH switch result)"; exit 1 } }' || rc=1
grep -a -E '^BENCH switch_synced ' <<<"$log" | awk '
  function v(k,   i, kv) { for (i = 2; i <= NF; i++) { split($i, kv, "="); if (kv[1] == k) return kv[2] } return "" }
  { printf "W on B once synced        %s s (synced/local %s, switched/synced %s)\n", v("synced_s"), v("ratio_to_local"), v("switched_to_synced") }' || true
exit "$rc"
