#!/usr/bin/env bash
# Builds the Debian package: target/debian/vmsync_<version>_amd64.deb with
# the three binaries, systemd units, man pages, shell completions and
# example configurations (the file list is [package.metadata.deb] in
# Cargo.toml). Needs cargo-deb (scripts/setup.sh installs it).
set -euo pipefail
cd "$(dirname "$0")/.."

cargo build --release --workspace --bins
out=target/package
rm -rf "$out"
mkdir -p "$out/man" "$out/completions"

# Generated from the CLI definitions, so they never disagree with --help.
target/release/vmsyncctl man "$out/man" >/dev/null
target/release/vmsyncd --man >"$out/man/vmsyncd.1"
target/release/vmsync-directory --man >"$out/man/vmsync-directory.1"
target/release/vmsyncctl completions bash >"$out/completions/vmsyncctl"
target/release/vmsyncctl completions zsh >"$out/completions/_vmsyncctl"
target/release/vmsyncctl completions fish >"$out/completions/vmsyncctl.fish"

cargo deb --no-build --strip "$@"
