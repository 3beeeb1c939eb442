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

pkill -f "$DEMO/data/run/vms" 2>/dev/null || true
rm -rf "$DEMO"
mkdir -p "$DEMO"
FERRYD_PID=
FERRYD2_PID=
cleanup() {
  for p in $FERRYD_PID $FERRYD2_PID; do kill "$p" 2>/dev/null && wait "$p" 2>/dev/null; done
  # VMs outlive ferryd by design (re-attached at the next start); the demo's own go too.
  pkill -f "$DEMO/data/run/vms" 2>/dev/null || true
  true
}
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

step "7. Bring an existing qcow2 disk: import it (format detected), export a volume back to qcow2"
truncate -s 128M "$DEMO/guest.raw"
mkfs.ext4 -q -F "$DEMO/guest.raw"
qemu-img convert -f raw -O qcow2 "$DEMO/guest.raw" "$DEMO/guest.qcow2"
run "$BIN/ferry" volume import guest-data "$DEMO/guest.qcow2"
run "$BIN/ferry" volume export web-1 "$DEMO/web-1.qcow2" --format qcow2
run qemu-img compare "$DEMO/disk.raw" "$DEMO/web-1.qcow2"

step "8. Define and start a VM whose disk is the pool volume (QEMU under TCG here; KVM on real hosts)"
eval "$("$BIN/examples/guest_image")"
run "$BIN/ferry" vm define demo-1 --disk guest-data --memory 256M --accel tcg --agent \
  --kernel "$KERNEL" --initrd "$INITRD" \
  --cmdline "console=ttyS0 quiet loglevel=3 panic=0 ferry.agent=1 ferry.mount=/dev/vda ferry.workload=records ferry.rate=20 ferry.size=512"
run "$BIN/ferry" vm start demo-1
SERIAL=$(ls "$DEMO"/data/run/vms/*/serial.log)
for _ in $(seq 600); do grep -q '"event":"record"' "$SERIAL" 2>/dev/null && break; sleep 0.1; done
echo "the guest booted and writes records with fsync to /dev/vda (serial log: $SERIAL)"
run "$BIN/ferry" vm list
run "$BIN/ferry" vm pause demo-1
run "$BIN/ferry" vm resume demo-1

step "9. Application-consistent snapshot of the running VM: freeze, overlay, pool snapshot of exactly its volume, merge"
run "$BIN/ferry" snapshot create --vm demo-1 --name consistent-1
run "$BIN/ferry" vm-snapshot show consistent-1
run "$BIN/ferry" snapshot list

step "10. Stop the VM (guest agent shutdown) and verify every acknowledged record on the volume"
run "$BIN/ferry" vm stop demo-1
run "$BIN/ferry" volume export guest-data "$DEMO/guest-after.raw" --format raw
run "$GUEST_TOOL" verify --image "$DEMO/guest-after.raw"

step "11. A second host: register it as a peer with its peer token (not its admin token)"
run "$BIN/ferryd" init --data-dir "$DEMO/data2" --name demo-host-2 --accel tcg --no-cli-config
"$BIN/ferryd" run --data-dir "$DEMO/data2" --listen 127.0.0.1:0 --nbd-listen 127.0.0.1:0 2>"$DEMO/ferryd2.log" &
FERRYD2_PID=$!
for _ in $(seq 100); do grep -q ' listening on ' "$DEMO/ferryd2.log" 2>/dev/null && break; sleep 0.1; done
URL2=$(sed -n 's/.* listening on //p' "$DEMO/ferryd2.log" | head -n1)
PEER_TOKEN2=$(FERRY_URL=$URL2 FERRY_TOKEN=$(cat "$DEMO/data2/admin.token") "$BIN/ferry" peer token)
run "$BIN/ferry" peer add "$URL2" --peer-token "$PEER_TOKEN2"
run "$BIN/ferry" peer show demo-host-2

step "Done"
echo "ferryd data directory: $DEMO/data"
