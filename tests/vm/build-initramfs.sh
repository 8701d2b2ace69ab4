#!/usr/bin/env bash
# Builds the initramfs of the vmsync VM test bed (see tests/vm/README.md).
#
# Output (cached under tests/vm/.build/, rebuilt when the kernel, its modules,
# busybox, init.sh or this script change):
#   tests/vm/.build/initramfs-<kver>.cpio.gz   gzip'd cpio (newc)
#   tests/vm/.build/vm.env                     KVER=, KERNEL=, INITRD= (sourced by run.sh)
#
# Environment:
#   VM_KVER      kernel version to use (default: newest /boot/vmlinuz-6.12.*)
#   VM_KERNEL_ROOT  directory holding boot/vmlinuz-<kver> and lib/modules/<kver>
#                (default: /; fetch-kernel.sh unpacks a newer kernel elsewhere)
#   VM_BUILD_DIR cache directory (default: tests/vm/.build)
#   VM_FORCE=1   rebuild even if the cache looks fresh
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
BUILD=${VM_BUILD_DIR:-$HERE/.build}
mkdir -p "$BUILD"

die() { echo "build-initramfs: $*" >&2; exit 1; }

# Newest installed 6.12 kernel (Debian's 6.12 has CONFIG_BLK_DEV_UBLK=m; 6.1 does not).
if [ -n "${VM_KVER:-}" ]; then
  KVER=$VM_KVER
else
  KVER=$(ls /boot/vmlinuz-6.12.* 2>/dev/null | sed 's|^/boot/vmlinuz-||' | sort -V | tail -n1 || true)
  [ -n "$KVER" ] || die "no /boot/vmlinuz-6.12.* found; run scripts/setup.sh"
fi
KROOT=${VM_KERNEL_ROOT:-}
KERNEL=$KROOT/boot/vmlinuz-$KVER
MODDIR=$KROOT/lib/modules/$KVER
[ -r "$KERNEL" ] || die "$KERNEL not readable"
[ -r "$MODDIR/modules.dep" ] || die "$MODDIR/modules.dep missing"
BUSYBOX=$(command -v busybox || true)
[ -n "$BUSYBOX" ] || die "busybox not found (apt-get install busybox-static)"
file -L "$BUSYBOX" 2>/dev/null | grep -q 'statically linked' || ldd "$BUSYBOX" 2>&1 | grep -q 'not a dynamic' \
  || die "$BUSYBOX is not static (apt-get install busybox-static)"

# Modules wanted, in load order. Dependencies from modules.dep are inserted
# before each module; built-in ones are skipped.
WANT=(crc32c_generic libcrc32c netfs 9pnet 9pnet_virtio 9p ublk_drv crc16 mbcache jbd2 ext4 loop virtio_blk dm_mod)

INITRD=$BUILD/initramfs-$KVER.cpio.gz
STAMP=$BUILD/initramfs-$KVER.stamp
key=$(
  {
    echo "kver=$KVER"
    stat -c '%n %s %Y' "$KERNEL" "$MODDIR/modules.dep" "$BUSYBOX"
    sha256sum "${BASH_SOURCE[0]}" "$HERE/init.sh"
    echo "${WANT[*]}"
  } | sha256sum | cut -d' ' -f1
)
if [ "${VM_FORCE:-0}" != 1 ] && [ -s "$INITRD" ] && [ "$(cat "$STAMP" 2>/dev/null)" = "$key" ]; then
  :
else
  echo "build-initramfs: building $INITRD for $KVER" >&2
  declare -A builtin=() seen=()
  while read -r m; do
    m=${m##*/}; m=${m%.ko}; builtin[${m//-/_}]=1
  done < "$MODDIR/modules.builtin"
  declare -A path=()
  while IFS=: read -r p deps; do
    n=${p##*/}; n=${n%%.ko*}; path[${n//-/_}]="$p:$deps"
  done < "$MODDIR/modules.dep"

  order=()
  add_mod() { # name-with-underscores
    local n=$1 entry p deps d dn
    [ -n "${seen[$n]:-}" ] && return 0
    seen[$n]=1
    if [ -n "${builtin[$n]:-}" ]; then echo "build-initramfs: $n is built in" >&2; return 0; fi
    entry=${path[$n]:-}
    [ -n "$entry" ] || die "module $n not found in $MODDIR/modules.dep"
    p=${entry%%:*}; deps=${entry#*:}
    # modules.dep lists deps so that the last one must be loaded first.
    local -a dl=()
    for d in $deps; do dl=("$d" "${dl[@]}"); done
    for d in "${dl[@]}"; do
      dn=${d##*/}; dn=${dn%%.ko*}; add_mod "${dn//-/_}"
    done
    order+=("$n:$p")
  }
  for m in "${WANT[@]}"; do
    m=${m//-/_}
    # Newer kernels dropped or renamed some helpers (libcrc32c, crc16...):
    # what a kernel does not have, nothing of it needs.
    if [ -z "${builtin[$m]:-}" ] && [ -z "${path[$m]:-}" ]; then
      echo "build-initramfs: no module $m in $KVER; skipped" >&2
      continue
    fi
    add_mod "$m"
  done

  stage=$(mktemp -d "$BUILD/stage.XXXXXX")
  trap 'rm -rf "$stage"' EXIT
  mkdir -p "$stage"/{bin,sbin,dev,proc,sys,host,tmp,lib/modules,etc}
  cp "$BUSYBOX" "$stage/bin/busybox"
  ln -s busybox "$stage/bin/sh"
  install -m 0755 "$HERE/init.sh" "$stage/init"
  : > "$stage/etc/modules.order"
  for e in "${order[@]}"; do
    n=${e%%:*}; p=$MODDIR/${e#*:}
    case $p in
      *.ko.xz)  xz -dc "$p"  > "$stage/lib/modules/$n.ko" ;;
      *.ko.zst) zstd -dcq "$p" > "$stage/lib/modules/$n.ko" ;;
      *.ko.gz)  gzip -dc "$p" > "$stage/lib/modules/$n.ko" ;;
      *.ko)     cp "$p" "$stage/lib/modules/$n.ko" ;;
      *) die "unknown module format: $p" ;;
    esac
    echo "$n" >> "$stage/etc/modules.order"
  done
  echo "$KVER" > "$stage/etc/kver"
  # /dev/console must exist before /init runs or the kernel gives init no stdio.
  if [ "$(id -u)" -eq 0 ]; then
    mknod -m 600 "$stage/dev/console" c 5 1
    mknod -m 666 "$stage/dev/null" c 1 3
  fi
  (cd "$stage" && find . -print0 | LC_ALL=C sort -z | cpio --null -o -H newc --quiet) | gzip -6 > "$INITRD.tmp"
  mv "$INITRD.tmp" "$INITRD"
  echo "$key" > "$STAMP"
  echo "build-initramfs: modules: $(tr '\n' ' ' < "$stage/etc/modules.order")" >&2
fi

{
  echo "KVER=$KVER"
  echo "KERNEL=$KERNEL"
  echo "INITRD=$INITRD"
} > "$BUILD/vm.env"
echo "$INITRD"
