#!/usr/bin/env bash
# Removes test guests that a killed earlier test run left behind: the test
# kit's run directories (${TMPDIR:-/tmp}/ferry-guest-*) whose owning test
# process is gone, and the QEMU still running from them. Guests of live
# test processes are left alone.
set -u
tmp=${TMPDIR:-/tmp}
for d in "$tmp"/ferry-guest-*; do
  [ -d "$d" ] || continue
  owner=$(cat "$d/owner.pid" 2>/dev/null || true)
  if [ -n "$owner" ] && [ -d "/proc/$owner" ]; then
    continue
  fi
  qemu=$(cat "$d/qemu.pid" 2>/dev/null || true)
  if [ -n "$qemu" ] && grep -q qemu "/proc/$qemu/comm" 2>/dev/null; then
    kill -9 "$qemu" 2>/dev/null && echo "reap-test-guests: killed QEMU $qemu left in $d"
  fi
  rm -rf "$d" && echo "reap-test-guests: removed $d"
done
exit 0
