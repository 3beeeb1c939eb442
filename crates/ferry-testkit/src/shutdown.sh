#!/bin/sh
# /sbin/shutdown for busybox: qemu-ga runs `shutdown -P|-H|-r +0 "message"`.
mode=poweroff
for a in "$@"; do
  case "$a" in
    -r) mode=reboot ;;
    -H) mode=halt ;;
  esac
done
ferry-guest event shutdown mode=$mode
killall ferry-guest 2>/dev/null
i=0
while pidof ferry-guest >/dev/null && [ $i -lt 40 ]; do sleep 0.05; i=$((i + 1)); done
sync
umount /mnt/data 2>/dev/null || mount -o remount,ro /mnt/data 2>/dev/null
sync
case $mode in
  reboot) reboot -f ;;
  halt) halt -f ;;
  *) poweroff -f ;;
esac
