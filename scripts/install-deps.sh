#!/usr/bin/env bash
# Installs the system packages Ferry needs at run and test time.
# Idempotent: skips what is already present and says what it installs.
set -euo pipefail

# qemu-system-x86 and qemu-utils go together: installing the first alone
# replaces a newer preinstalled qemu-utils and leaves the pair mismatched.
PACKAGES=(
  qemu-system-x86 qemu-utils qemu-guest-agent
  linux-image-cloud-amd64 busybox-static cpio
  e2fsprogs fdisk gdisk libnbd-bin fio nbdkit
  iproute2 openssl
  restic
  syslinux syslinux-common mtools dosfstools
  chromium chromium-driver
)

# ferry-backup: the S3 tests start a local S3 server, moto, from PyPI.
if ! command -v moto_server >/dev/null 2>&1; then
  echo "install-deps: installing moto[server] with pip"
  python3 -m pip install -q 'moto[server]' 2>/dev/null \
    || python3 -m pip install -q --break-system-packages 'moto[server]'
  # Under pyenv, a new console script needs its shim.
  if command -v pyenv >/dev/null 2>&1; then pyenv rehash; fi
fi

missing=()
for p in "${PACKAGES[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed'; then
    missing+=("$p")
  fi
done
# qemu-system-x86 and qemu-utils must come from the same release.
if [[ " ${missing[*]} " == *" qemu-system-x86 "* && " ${missing[*]} " != *" qemu-utils "* ]]; then
  missing+=(qemu-utils)
fi

# QEMU 10 beside the system's 7.2 (for the tests 7.2 under TCG cannot
# pass); after the packages, since it borrows their BIOS files.
install_qemu_new() {
  bash "$(dirname "$0")/install-qemu-new.sh"
}

if [ ${#missing[@]} -eq 0 ]; then
  echo "install-deps: all system packages present"
  install_qemu_new
  exit 0
fi

if [ ! -f /etc/debian_version ] || [ "$(id -u)" != 0 ]; then
  echo "install-deps: missing system packages: ${missing[*]}" >&2
  echo "install-deps: install them with your package manager (Debian: apt-get install ${missing[*]}) as root, then run this again" >&2
  exit 1
fi

echo "install-deps: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
# Pin qemu-utils to the qemu-system-x86 release (a newer qemu-utils breaks
# the older qemu-system-common); this may downgrade a preinstalled one.
args=()
for p in "${missing[@]}"; do
  if [ "$p" = qemu-utils ]; then
    v=$(apt-cache policy qemu-system-x86 | awk '/Installed:/{i=$2} /Candidate:/{c=$2} END{print (i!="(none)")?i:c}')
    args+=("qemu-utils=$v")
  else
    args+=("$p")
  fi
done
apt-get install -y -qq --no-install-recommends --allow-downgrades "${args[@]}" >/dev/null
echo "install-deps: installed ${missing[*]}"
install_qemu_new
