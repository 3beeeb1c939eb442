#!/usr/bin/env bash
# Unpacks a second, newer QEMU beside Debian's 7.2 — QEMU 10 from
# bookworm-backports — into /opt/ferry/qemu-10 (override with
# FERRY_QEMU_NEW_DIR). It is not installed as a package: the system QEMU
# stays 7.2, the version the rest of the suite runs against. The tests that
# QEMU 7.2 under TCG cannot pass (a pre-copy live migration of a writing
# guest damages the destination's memory) run against this one, found by
# `ferry_testkit::newer_qemu()`.
# Idempotent; uses its own apt lists, so the system's apt sources and state
# are untouched.
set -euo pipefail

DEST=${FERRY_QEMU_NEW_DIR:-/opt/ferry/qemu-10}
SUITE=bookworm-backports
PKGS=(qemu-system-x86 qemu-system-common qemu-system-data)

if [ -x "$DEST/qemu-system-x86_64" ] && "$DEST/qemu-system-x86_64" --version 2>/dev/null | grep -q 'version 10\.'; then
  echo "install-qemu-new: $("$DEST/qemu-system-x86_64" --version | head -1) present in $DEST"
  exit 0
fi
if [ ! -f /etc/debian_version ] || [ "$(id -u)" != 0 ]; then
  echo "install-qemu-new: needs root on Debian to fetch QEMU 10 from $SUITE into $DEST" >&2
  exit 1
fi

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
mkdir -p "$tmp/lists/partial" "$tmp/cache/archives/partial" "$tmp/debs"
cat > "$tmp/bpo.sources" <<SRC
Types: deb
URIs: http://deb.debian.org/debian
Suites: $SUITE
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
mkdir -p "$tmp/parts"
cp "$tmp/bpo.sources" "$tmp/parts/"
apt_opts=(
  -o Dir::Etc::sourcelist=/dev/null
  -o Dir::Etc::sourceparts="$tmp/parts"
  -o Dir::State::Lists="$tmp/lists"
  -o Dir::Cache="$tmp/cache"
  -o APT::Sandbox::User=root
)
echo "install-qemu-new: fetching ${PKGS[*]} from $SUITE"
apt-get "${apt_opts[@]}" update -qq
(cd "$tmp/debs" && apt-get "${apt_opts[@]}" download -qq "${PKGS[@]/%//$SUITE}")

rm -rf "$DEST.new"
mkdir -p "$DEST.new/root"
for d in "$tmp"/debs/*.deb; do dpkg-deb -x "$d" "$DEST.new/root"; done
# Firmware: QEMU 10's own data files, plus the BIOS and option ROMs the
# system QEMU uses (seabios, ipxe: not part of the qemu packages).
cp -a "$DEST.new/root/usr/share/qemu" "$DEST.new/share"
for f in /usr/share/qemu/*; do
  b=$(basename "$f")
  [ -e "$DEST.new/share/$b" ] || ln -s "$(readlink -f "$f")" "$DEST.new/share/$b"
done
cat > "$DEST.new/qemu-system-x86_64" <<WRAP
#!/bin/sh
# QEMU 10 unpacked by scripts/install-qemu-new.sh; its own modules and data.
QEMU_MODULE_DIR="$DEST/root/usr/lib/x86_64-linux-gnu/qemu" exec "$DEST/root/usr/bin/qemu-system-x86_64" -L "$DEST/share" "\$@"
WRAP
chmod +x "$DEST.new/qemu-system-x86_64"
rm -rf "$DEST"
mv "$DEST.new" "$DEST"
# The wrapper names $DEST, so check it from there.
"$DEST/qemu-system-x86_64" --version | head -1
