#!/usr/bin/env bash
# Runs the whole vmsync test suite:
#   1. host tests: `cargo test` over the workspace (unit, property and
#      multi-process integration tests on loopback; no ublk needed);
#   2. VM tests: the real /dev/ublkbN inside a qemu guest with Debian's 6.12
#      kernel (tests/vm/run.sh), using the release binaries built here; then
#      some of them again in a guest with a 6.16+ kernel, where the queues
#      serve with ublk zero copy (tests/vm/fetch-kernel.sh).
# Prints one closing line "N passed, N failed" over both.
set -uo pipefail
cd "$(dirname "$0")/.."

log_dir=${VMSYNC_TEST_LOGS:-target/test-logs}
mkdir -p "$log_dir"
status=0

echo "== cargo fmt / clippy"
cargo fmt --all -- --check || status=1
cargo clippy --release --workspace --all-targets -- -D warnings || status=1

echo "== host tests (cargo test)"
# The integration tests run the binaries (vmsync-directory too, which
# `cargo test` does not build as a binary): build them all first.
cargo build --release --workspace --bins || status=1
cargo test --release --workspace 2>&1 | tee "$log_dir/cargo-test.log"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1
host_passed=$(grep -Eo '^test result: .* ([0-9]+) passed' "$log_dir/cargo-test.log" | grep -Eo '[0-9]+ passed' | awk '{s+=$1} END {print s+0}')
host_failed=$(grep -Eo '^test result: .*; ([0-9]+) failed' "$log_dir/cargo-test.log" | grep -Eo '[0-9]+ failed' | awk '{s+=$1} END {print s+0}')

vm_passed=0
vm_failed=0
# Run again on the zero-copy kernel (Linux 6.16+): a standalone node's
# direct queue and a replicated primary's queue, each through faults, and
# growing a primary's device online (UBLK_U_CMD_UPDATE_SIZE, also 6.16+;
# on 6.12 the scenario checks the refusal).
ZERO_COPY_SCENARIOS="standalone_direct fs_basic crash_recovery replicated_fs machine_switch failing_disk online_resize"
if [ "${VMSYNC_SKIP_VM:-0}" != 1 ]; then
  echo "== VM tests (real ublk in a qemu guest)"
  cargo build --release --workspace --bins
  # The package_install scenario installs the Debian package built here.
  scripts/package.sh >"$log_dir/package.log" 2>&1 || { echo "scripts/package.sh failed: see $log_dir/package.log"; status=1; }
  VM_CONSOLE_LOG="$log_dir/vm-console.log" tests/vm/run.sh all 2>&1 | tee "$log_dir/vm-tests.log"
  [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
  # run.sh ends with one summary line per scenario: "  PASS  name  time".
  vm_passed=$(grep -cE '^  PASS  ' "$log_dir/vm-tests.log" || true)
  vm_failed=$(grep -cE '^  (FAIL|NONE)  ' "$log_dir/vm-tests.log" || true)
  if [ "$vm_passed" -eq 0 ] && [ "$vm_failed" -eq 0 ]; then
    echo "VM tests produced no result"; vm_failed=1; status=1
  fi

  # The same product on a kernel with ublk zero copy (Linux 6.16+), where
  # the queues serve without the driver's copy.
  echo "== VM tests on a kernel with ublk zero copy"
  if zc_kernel=$(tests/vm/fetch-kernel.sh); then
    eval "$zc_kernel"
    VM_KERNEL_ROOT=$VM_KERNEL_ROOT VM_KVER=$VM_KVER VM_CONSOLE_LOG="$log_dir/vm-zc-console.log" \
      tests/vm/run.sh $ZERO_COPY_SCENARIOS 2>&1 | tee "$log_dir/vm-zc-tests.log"
    [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
    zc_passed=$(grep -cE '^  PASS  ' "$log_dir/vm-zc-tests.log" || true)
    zc_failed=$(grep -cE '^  (FAIL|NONE)  ' "$log_dir/vm-zc-tests.log" || true)
    if [ "$zc_passed" -eq 0 ] && [ "$zc_failed" -eq 0 ]; then
      echo "zero-copy VM tests produced no result"; zc_failed=1; status=1
    fi
  else
    echo "cannot fetch a kernel with ublk zero copy (tests/vm/fetch-kernel.sh)"; zc_passed=0; zc_failed=1; status=1
  fi
  vm_passed=$((vm_passed + zc_passed))
  vm_failed=$((vm_failed + zc_failed))
fi

echo "== summary: host $host_passed passed / $host_failed failed; VM $vm_passed passed / $vm_failed failed"
[ "$host_failed" -eq 0 ] && [ "$vm_failed" -eq 0 ] || status=1
echo "$((host_passed + vm_passed)) passed, $((host_failed + vm_failed)) failed"
exit $status
