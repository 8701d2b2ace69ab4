#!/usr/bin/env bash
# Installs everything vmsync needs on a fresh Debian bookworm machine, builds
# it, and runs the demo (a vmsync disk with a file system, in the test VM).
# Idempotent: safe to run again. --no-demo skips the demo (CI).
set -euo pipefail
cd "$(dirname "$0")/.."

run_demo=1
for arg in "$@"; do
  case "$arg" in
    --no-demo) run_demo=0 ;;
    *) echo "usage: scripts/setup.sh [--no-demo]" >&2; exit 2 ;;
  esac
done

SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"

# linux-source-6.1: /usr/src/linux-source-6.1.tar.xz, the file tree of benches/switch.sh.
# python3: records.py of the torture scenarios and the systemd stand-in of package_install;
# dmsetup: device-mapper faults in the VM; dpkg-dev: cargo-deb's dpkg-shlibdeps;
# rsync: the WAN benchmark's baseline (benches/wan_profile.rs).
PKGS=(libclang-dev clang pkg-config qemu-system-x86 busybox-static e2fsprogs fio xz-utils cpio gzip iproute2 ethtool util-linux kmod linux-source-6.1 dmsetup python3 dpkg-dev rsync)

need_pkgs=()
for p in "${PKGS[@]}"; do
  dpkg -s "$p" >/dev/null 2>&1 || need_pkgs+=("$p")
done
# Debian's 6.12 kernel (bookworm-security / backports) has CONFIG_BLK_DEV_UBLK=m; 6.1 does not.
if ! ls /boot/vmlinuz-6.12.* >/dev/null 2>&1; then
  need_kernel=1
else
  need_kernel=0
fi

if [ ${#need_pkgs[@]} -gt 0 ] || [ "$need_kernel" -eq 1 ]; then
  $SUDO apt-get update -q
  if [ ${#need_pkgs[@]} -gt 0 ]; then
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends "${need_pkgs[@]}"
  fi
  if [ "$need_kernel" -eq 1 ]; then
    kpkg=$(apt-cache search --names-only '^linux-image-6\.12\..*-amd64-unsigned$' | awk '{print $1}' | grep -v -e '-cloud-' -e '-rt-' | sort -V | tail -n1)
    if [ -z "$kpkg" ]; then
      echo "setup: no linux-image-6.12.*-amd64-unsigned package found in apt sources" >&2
      exit 1
    fi
    # Only the kernel image and its modules are needed; the VM boots it directly.
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends "$kpkg"
  fi
fi

# A newer Debian kernel (6.16+, from Debian 13's backports), unpacked under
# tests/vm/.build only, for the VM tests of ublk zero copy; the host's
# packages and apt configuration are left as they are.
tests/vm/fetch-kernel.sh >/dev/null

# Toolchain components the test command uses.
if command -v rustup >/dev/null 2>&1; then
  rustup component add rustfmt clippy >/dev/null 2>&1 || true
fi

# cargo-deb builds the Debian package (scripts/package.sh).
if ! command -v cargo-deb >/dev/null 2>&1; then
  cargo install cargo-deb --locked --version '^3'
fi

cargo build --release --workspace --bins

if [ "$run_demo" -eq 1 ]; then
  # The main job: a vmsync disk served over real ublk inside the test VM,
  # with an ext4 file system on it (see tests/vm/scenarios/demo.sh).
  tests/vm/run.sh demo
fi
