#!/usr/bin/env bash
# Fetches a Debian kernel new enough for ublk zero copy (UBLK_F_AUTO_BUF_REG,
# Linux 6.16+) and unpacks it, without installing it, for the test VM:
#
#   tests/vm/fetch-kernel.sh          prints the unpacked root and version:
#                                     VM_KERNEL_ROOT=... VM_KVER=...
#
# The guest's default kernel is Debian 12's 6.12 (bookworm-security), which
# has ublk but not zero copy; Debian 13's backports carry 6.16 and later.
# The package comes from the Debian mirror this machine's apt already uses
# (same host, suite trixie-backports, checked against the archive keyring),
# through a private apt state under tests/vm/.build: the host's apt
# configuration and installed packages are left alone.
#
# Environment: VM_BUILD_DIR (tests/vm/.build), VM_ZC_SUITE (trixie-backports).
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
BUILD=${VM_BUILD_DIR:-$HERE/.build}
SUITE=${VM_ZC_SUITE:-trixie-backports}
APT=$BUILD/apt-$SUITE
die() { echo "fetch-kernel: $*" >&2; exit 1; }

# The Debian mirror apt is configured with (deb822 or one-line format).
mirror=$(
  { cat /etc/apt/sources.list.d/*.sources 2>/dev/null || true; } | awk '/^URIs:/ {print $2}'
  { cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null || true; } | awk '$1 == "deb" {for (i = 2; i <= NF; i++) if ($i ~ /^[a-z]+:\/\//) {print $i; break}}'
) 
mirror=$(grep -v -e security -e '^$' <<<"$mirror" | head -n1 || true)
[ -n "$mirror" ] || die "no Debian mirror found in the apt sources"
keyring=/usr/share/keyrings/debian-archive-keyring.gpg
[ -r "$keyring" ] || die "$keyring missing (apt-get install debian-archive-keyring)"

mkdir -p "$APT/lists/partial" "$APT/archives/partial" "$BUILD/kernels"
echo "deb [signed-by=$keyring] $mirror $SUITE main" > "$APT/sources.list"
opts=(-o "Dir::Etc::sourcelist=$APT/sources.list" -o Dir::Etc::sourceparts=- \
      -o "Dir::State::Lists=$APT/lists" -o "Dir::Cache=$APT" -o "Dir::Cache::archives=$APT/archives" \
      -o APT::Get::List-Cleanup=0 -q)
# A day-old package list is fresh enough.
if [ -z "$(find "$APT/lists" -name '*Packages*' -mtime -1 2>/dev/null)" ]; then
  apt-get "${opts[@]}" update >&2 || die "apt-get update of $SUITE failed"
fi

# The newest generic amd64 image of 6.16 or later whose parts are all in
# the suite: Debian's newer images are a small package that depends on
# linux-base-, linux-binary- and linux-modules-<version> (older ones hold
# everything themselves).
parts_of() {
  apt-cache "${opts[@]}" show "$1" 2>/dev/null | awk -F': ' '/^Depends:/ {print $2; exit}' \
    | tr ',' '\n' | awk -v v="$2" '{ for (b in p) delete p[b]; p["linux-base-" v]; p["linux-binary-" v]; p["linux-modules-" v]; if ($1 in p) print $1 }' || true
}
pkg='' kver='' parts=()
while read -r candidate; do
  v=${candidate#linux-image-}
  mapfile -t wanted < <(parts_of "$candidate" "$v")
  complete=1
  for part in "${wanted[@]}"; do
    apt-cache "${opts[@]}" show "$part" >/dev/null 2>&1 || { complete=0; break; }
  done
  if [ "$complete" = 1 ]; then pkg=$candidate kver=$v parts=("${wanted[@]}"); break; fi
done < <(apt-cache "${opts[@]}" search --names-only '^linux-image-[0-9]+\.[0-9]+\.[0-9]+\+deb[0-9]+-amd64$' \
           | awk '{print $1}' | sort -rV \
           | awk -F'[-.]' '{ if ($3 > 6 || ($3 == 6 && $4 >= 16)) print }')
[ -n "$pkg" ] || die "no complete linux-image 6.16+ for amd64 in $SUITE"
root=$BUILD/kernels/$kver
if [ ! -r "$root/boot/vmlinuz-$kver" ] || [ ! -r "$root/lib/modules/$kver/modules.dep" ]; then
  echo "fetch-kernel: fetching $pkg ${parts[*]}" >&2
  rm -f "$APT/archives/"*.deb
  (cd "$APT/archives" && apt-get "${opts[@]}" download "$pkg" "${parts[@]}" >&2) \
    || die "download of $pkg failed"
  rm -rf "$root.tmp" && mkdir -p "$root.tmp"
  for deb in "$APT/archives/"*.deb; do dpkg-deb -x "$deb" "$root.tmp"; done
  # Newer packages put everything under /usr/lib/modules/<version>/
  # (vmlinuz too); lay it out the classic way the VM scripts read.
  if [ ! -e "$root.tmp/lib" ] && [ -d "$root.tmp/usr/lib/modules" ]; then ln -s usr/lib "$root.tmp/lib"; fi
  if [ ! -r "$root.tmp/boot/vmlinuz-$kver" ] && [ -r "$root.tmp/lib/modules/$kver/vmlinuz" ]; then
    mkdir -p "$root.tmp/boot" && ln -s "../lib/modules/$kver/vmlinuz" "$root.tmp/boot/vmlinuz-$kver"
  fi
  [ -r "$root.tmp/boot/vmlinuz-$kver" ] || die "$pkg has no vmlinuz for $kver"
  # Debian makes modules.dep with depmod at install time: make it here.
  depmod -b "$root.tmp" "$kver"
  rm -rf "$root" && mv "$root.tmp" "$root"
  rm -f "$APT/archives/"*.deb
fi
echo "VM_KERNEL_ROOT=$root VM_KVER=$kver"
