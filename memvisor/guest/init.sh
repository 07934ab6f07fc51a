#!/bin/sh
# memvisor guest /init (busybox sh, PID 1). Built into the initramfs by memvisor/guest/image.py, which
# replaces the module list placeholders with the modules of the image, in load order.
# It mounts the basics, loads the virtio and nvdimm drivers, then runs the guest agent (agent.sh: /dev/hvc0 or /dev/ttyS1),
# protected from the OOM killer; when the agent ends, the guest powers off.
export PATH=/sbin:/bin:/usr/sbin:/usr/bin
export HOME=/root

mount -t proc proc /proc
read -r uptime _ < /proc/uptime
echo "memvisor-init: started at uptime $uptime"   # the boot benchmark's marker: userspace has begun
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
mkdir -p /dev/pts /dev/shm
mount -t devpts devpts /dev/pts
mount -t tmpfs -o mode=1777 tmpfs /tmp
mount -t tmpfs -o mode=755 tmpfs /run
hostname memvisor

for module in @MODULES@; do
    modprobe "$module" || echo "memvisor-init: modprobe $module failed" >&2
done
# Modules from outside the image's module tree, named on the kernel command line as
# mvinsmod=/path/a.ko,/path/b.ko (the kernel hands unknown name=value words to init's environment), load after
# the image's own (they may need virtio's core): QEMU's guest gets virtio_pci this way (appended by
# tests/guest/qemu_vm.py), and then waits up to 30 s for the virtio-console its agent talks on.
if [ -n "${mvinsmod:-}" ]; then
    saved_ifs=$IFS
    IFS=,
    for path in $mvinsmod; do
        insmod "$path" || echo "memvisor-init: insmod $path failed" >&2
    done
    IFS=$saved_ifs
    tries=0
    while [ ! -c /dev/hvc0 ] && [ "$tries" -lt 300 ]; do
        sleep 0.1
        tries=$((tries + 1))
    done
fi
# Optional ones (pvpanic, CPU-specific crc32c) may find no device or CPU feature: no complaint.
for module in @OPTIONAL_MODULES@; do
    modprobe -q "$module" 2>/dev/null
done

# Children inherit the score: the agent is never chosen by the OOM killer; it sets 0 for each command.
echo -1000 > /proc/self/oom_score_adj
echo "memvisor-init: starting the agent (on /dev/hvc0, or /dev/ttyS1 without a virtio-console)"
/bin/sh /usr/lib/memvisor/agent.sh
echo "memvisor-init: the agent exited with status $?, powering off"
sync
poweroff -f
