#!/usr/bin/env bash
# Ferry's demo: the embedded default (one ferryd with a local pool and an
# SQLite journal in a data directory it creates) doing every capability that
# exists so far, each step printed with its result. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${CARGO_TARGET_DIR:-target}/release
DEMO=${FERRY_DEMO_DIR:-$PWD/.ferry-demo}
step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
run() { printf '$ %s\n' "$*"; "$@"; }

rm -rf "$DEMO"
mkdir -p "$DEMO"
FERRYD_PID=
cleanup() { [ -n "$FERRYD_PID" ] && kill "$FERRYD_PID" 2>/dev/null && wait "$FERRYD_PID" 2>/dev/null; true; }
trap cleanup EXIT

step "1. Create a host data directory (pool + journal + admin token)"
run "$BIN/ferryd" init --data-dir "$DEMO/data" --name demo-host --accel tcg --no-cli-config

step "2. Start ferryd"
"$BIN/ferryd" run --data-dir "$DEMO/data" --listen 127.0.0.1:0 --nbd-listen 127.0.0.1:0 2>"$DEMO/ferryd.log" &
FERRYD_PID=$!
for _ in $(seq 100); do
  grep -q ' listening on ' "$DEMO/ferryd.log" 2>/dev/null && break
  sleep 0.1
done
FERRY_URL=$(sed -n 's/.* listening on //p' "$DEMO/ferryd.log" | head -n1)
[ -n "$FERRY_URL" ] || { cat "$DEMO/ferryd.log"; echo "ferryd did not start"; exit 1; }
export FERRY_URL FERRY_TOKEN=$(cat "$DEMO/data/admin.token") FERRY_CONFIG=/nonexistent
echo "ferryd listens on $FERRY_URL (log: $DEMO/ferryd.log)"
run "$BIN/ferry" host info
run "$BIN/ferry" pool info

step "3. Import a disk image (an ext4 file system with files) as a volume, with progress"
truncate -s 256M "$DEMO/disk.raw"
mkfs.ext4 -q -F -d "$PWD/crates" "$DEMO/disk.raw"
run "$BIN/ferry" volume import web-1 "$DEMO/disk.raw"
run "$BIN/ferry" volume create db-1 1G
run "$BIN/ferry" volume create scratch 10G
run "$BIN/ferry" volume list

step "4. One atomic group snapshot of exactly two volumes (scratch untouched)"
run "$BIN/ferry" snapshot create nightly --volume web-1 --volume db-1
run "$BIN/ferry" snapshot list

step "5. Clone a snapshot: a writable volume sharing its chunks"
run "$BIN/ferry" volume clone nightly@web-1 web-1-test
run "$BIN/ferry" volume list
run "$BIN/ferry" pool info

step "6. The import operation: journaled steps, progress tree, log"
OP=$("$BIN/ferry" op list --json | sed -n 's/.*"id": "\(.*\)".*/\1/p' | head -n1)
run "$BIN/ferry" op show "$OP"

step "7. A VM disk on the pool: export a volume over NBD, boot the test guest on it (QEMU, TCG)"
truncate -s 128M "$DEMO/guest.raw"
mkfs.ext4 -q -F "$DEMO/guest.raw"
run "$BIN/ferry" volume import guest-data "$DEMO/guest.raw"
run "$BIN/ferry" export create --volume guest-data
run "$BIN/examples/guest_on_volume" "$DEMO/data/run/nbd.sock" guest-data 3

step "8. Snapshot the guest's volume and read it back over NBD, read-only"
run "$BIN/ferry" snapshot create after-boot --volume guest-data
run "$BIN/ferry" export create --snapshot after-boot
run nbdinfo --map "nbd+unix:///after-boot?socket=$DEMO/data/run/nbd.sock"
run "$BIN/ferry" export list

step "Done"
echo "ferryd data directory: $DEMO/data"
