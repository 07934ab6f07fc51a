#!/bin/sh
# PID 1 of the lab's L1 guest (busybox sh from the lab initramfs).
#
# It turns a bare kernel into "the host's own files, read-only, with a working /dev/kvm":
#   1. mounts /proc, /sys, /dev;
#   2. loads kvm_amd with nested=1 (QEMU TCG's `-cpu max` offers SVM with nested paging), then the virtio
#      drivers: virtio_pci first, or 9pnet_virtio finds no channel (docs/LAB.md); then veth;
#   3. mounts the host's root (9p tag `hostroot`, read-only) at /host, with /proc, /sys, /dev and
#      tmpfs folders for the places programs expect to write (/run, /tmp, /var/tmp, /dev/shm);
#   4. runs `python -m memvisor.lab.inner` chrooted into /host: the host's own Python and checkout.
#      The inner agent talks to the host runner over the virtio-serial port `memvisor.lab`.
# Whatever happens, the guest powers off at the end; QEMU runs with -no-reboot, so that ends it.
# Parameters come from the kernel command line: mvlab.python=PATH mvlab.root=DIR [mvlab.cache=loose|none]
# [mvlab.kvm_amd=NAME=VALUE,...].

export PATH=/bin:/sbin:/usr/bin:/usr/sbin

say() { echo "mvlab: $*" >/dev/console; }
die() { say "$*"; sync; poweroff -f; sleep 10; exit 1; }

# The value of NAME=VALUE on the kernel command line (dotted names never reach our environment).
param() {
    for word in $(cat /proc/cmdline); do
        case "$word" in "$1="*) echo "${word#*=}"; return 0 ;; esac
    done
    return 1
}

mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null

PYTHON=$(param mvlab.python) || die "no mvlab.python= on the kernel command line"
ROOT=$(param mvlab.root) || die "no mvlab.root= on the kernel command line"
CACHE=$(param mvlab.cache) || CACHE=loose
# Extra kvm_amd parameters ($MEMVISOR_LAB_KVM_AMD on the host): mvlab.kvm_amd=npt=0,avic=0.
KVM_AMD=$(param mvlab.kvm_amd | tr , ' ') || KVM_AMD=""

# shellcheck disable=SC2086 # one word per parameter
modprobe kvm_amd nested=1 $KVM_AMD || say "kvm_amd did not load: /dev/kvm will be missing in the lab"
modprobe virtio_pci || die "virtio_pci did not load"
for module in 9pnet_virtio 9p virtio_console; do
    modprobe "$module" || die "$module did not load"
done
# veth, for the guest tests that migrate between two network namespaces (tests/guest/netns.py): loaded here,
# from this initramfs, since the chroot's /lib/modules is the host's and holds no module of this kernel.
modprobe veth || say "veth did not load: the guest tests' network namespaces will have no veth pair"

mkdir -p /host
mount -t 9p -o "trans=virtio,version=9p2000.L,ro,msize=262144,cache=$CACHE" hostroot /host ||
    die "cannot mount the host's root (9p tag hostroot)"
mount -t proc proc /host/proc || die "cannot mount /proc in the host root"
mount -t sysfs sysfs /host/sys || die "cannot mount /sys in the host root"
mount -t devtmpfs devtmpfs /host/dev || die "cannot mount /dev in the host root"
mkdir -p /host/dev/pts /host/dev/shm
mount -t devpts -o newinstance,ptmxmode=0666 devpts /host/dev/pts
mount -t tmpfs -o mode=0755 tmpfs /host/run || die "cannot mount a tmpfs on /run"
for dir in /host/tmp /host/var/tmp /host/dev/shm; do
    mount -t tmpfs -o mode=1777 tmpfs "$dir" || die "cannot mount a tmpfs on $dir"
done

# Shares the agent itself lives in (a checkout under /tmp, hidden by the tmpfs above): mvlab.early=TAG:PATH.
for word in $(cat /proc/cmdline); do
    case "$word" in
        mvlab.early=*)
            share=${word#mvlab.early=}
            mkdir -p "/host${share#*:}"
            mount -t 9p -o trans=virtio,version=9p2000.L,ro,msize=262144,cache=loose "${share%%:*}" "/host${share#*:}" ||
                die "cannot mount the share ${share%%:*} at ${share#*:}"
            ;;
    esac
done

# Python from the host, with the lab's own package importable and nothing written to the read-only root.
# -S: the agent needs only the standard library and the package under $ROOT; skipping site (and a
# virtualenv's .pth hooks) saves many file reads over 9p.
cd /
read -r uptime _ </proc/uptime
say "starting the agent at uptime $uptime s"
PYTHONPATH="$ROOT" PYTHONDONTWRITEBYTECODE=1 MEMVISOR_IN_LAB=1 HOME=/root \
    chroot /host "$PYTHON" -S -m memvisor.lab.inner </dev/null >/dev/console 2>&1
status=$?
[ "$status" = 0 ] || say "the lab agent exited with status $status"
sync
poweroff -f
sleep 10
