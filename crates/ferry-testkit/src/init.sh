#!/bin/sh
# /init of Ferry's test guest (busybox sh, PID 1).
# Kernel command line parameters it reads:
#   ferry.agent=1          wait for the guest-agent port and start qemu-ga
#   ferry.mount=/dev/vda   mount this ext4 device at /mnt/data (none: skip)
#   ferry.workload=records|idle
#   ferry.rate=N ferry.count=N ferry.size=BYTES   parameters of `records`
#   ferry.freeze_hook_sleep=S  qemu-ga runs a fsfreeze hook that sleeps S
#                          seconds before each freeze (an application hook
#                          that hangs: the agent is stuck inside the freeze)
# Every step that matters prints one `FERRY {json}` line on the console.
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /run /var/run /tmp /mnt/data /dev/virtio-ports

AGENT=0 MOUNT=none WORKLOAD=idle RATE=10 COUNT= SIZE=512 HOOK_SLEEP=
for arg in $(cat /proc/cmdline); do
  case "$arg" in
    ferry.agent=*) AGENT=${arg#*=} ;;
    ferry.mount=*) MOUNT=${arg#*=} ;;
    ferry.workload=*) WORKLOAD=${arg#*=} ;;
    ferry.rate=*) RATE=${arg#*=} ;;
    ferry.count=*) COUNT=${arg#*=} ;;
    ferry.size=*) SIZE=${arg#*=} ;;
    ferry.freeze_hook_sleep=*) HOOK_SLEEP=${arg#*=} ;;
  esac
done

for m in @MODULES@; do
  insmod /lib/modules/$m.ko || ferry-guest event error step=insmod module=$m
done

# /dev/virtio-ports/<name> links (what udev would make).
i=0
while :; do
  for p in /sys/class/virtio-ports/*; do
    [ -r "$p/name" ] || continue
    n=$(cat "$p/name")
    [ -n "$n" ] && ln -sf "../${p##*/}" "/dev/virtio-ports/$n"
  done
  if [ "$AGENT" != 1 ] || [ -e /dev/virtio-ports/org.qemu.guest_agent.0 ]; then break; fi
  i=$((i + 1))
  if [ $i -ge 100 ]; then ferry-guest event error step=agent-port; break; fi
  sleep 0.05
done

MOUNTED=0
if [ "$MOUNT" != none ]; then
  i=0
  while [ ! -b "$MOUNT" ] && [ $i -lt 100 ]; do sleep 0.05; i=$((i + 1)); done
  if mount -t ext4 "$MOUNT" /mnt/data; then
    MOUNTED=1
    ferry-guest event mount ok=true device="$MOUNT" dir=/mnt/data
  else
    ferry-guest event mount ok=false device="$MOUNT" dir=/mnt/data
  fi
fi

if [ "$AGENT" = 1 ]; then
  HOOK=
  if [ -n "$HOOK_SLEEP" ]; then
    mkdir -p /etc/qemu
    cat > /etc/qemu/fsfreeze-hook <<EOF
#!/bin/sh
if [ "\$1" = freeze ]; then
  ferry-guest event freeze-hook state=sleeping secs=$HOOK_SLEEP > /dev/console
  sleep $HOOK_SLEEP
  ferry-guest event freeze-hook state=done > /dev/console
fi
exit 0
EOF
    chmod 755 /etc/qemu/fsfreeze-hook
    HOOK=--fsfreeze-hook=/etc/qemu/fsfreeze-hook
  fi
  qemu-ga -m virtio-serial -p /dev/virtio-ports/org.qemu.guest_agent.0 \
    -t /run -f /run/qemu-ga.pid -l /run/qemu-ga.log $HOOK &
fi

ferry-guest ready

case "$WORKLOAD" in
  records)
    if [ "$MOUNTED" = 1 ]; then
      [ -e /mnt/data/records ] && ferry-guest verify --file /mnt/data/records --event
      ferry-guest write --file /mnt/data/records --rate "$RATE" --size "$SIZE" ${COUNT:+--count "$COUNT"}
      ferry-guest event workload-exit code=$?
    else
      ferry-guest event workload-exit code=-1 reason=not-mounted
    fi
    ;;
esac

# PID 1 must never exit.
while :; do sleep 3600; done
