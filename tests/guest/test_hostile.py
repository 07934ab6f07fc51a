"""Issue 12: a hostile guest cannot make the host hold memory.

Unplugged virtio-mem memory (item 2): a Linux guest never touches it through its driver, so the misbehaving
guest here is one that does not load the driver (`module_blacklist=virtio_mem`) and stores into the device's
region with busybox `devmem` (an mmap of /dev/mem: the region is no System RAM and, without the driver, claimed
by nobody, so the Debian kernel's STRICT_DEVMEM allows it). memvisor keeps unplugged blocks PROT_NONE: the first
store stops the VM with a message saying why, and the device's memfd (read through a descriptor the test opens
in the memvisor process, so it can be measured after memvisor exits) holds no more than before.
The control run turns unplugged-inaccessible off and shows the same stores do cost the host memory.

Balloon pages in plugged virtio-mem memory (item 3) go back to the host.
"""

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.guest.vm import GuestVM, wait_until

MiB = 1 << 20
REGION_GPA = 1 << 32  # device memory starts at 4 GiB for a 512M guest (memvisor/vmm/devices.py)
STORES = 1024
STRIDE = 256 << 10  # one store per 256 KiB: 1024 stores touch 1024 distinct pages (4 MiB) over 256 MiB


def report(message: str) -> None:
    print(f"[hostile] {message}", file=sys.stderr)


def open_memfd(pid: int, name: str) -> int:
    """A descriptor of memvisor's memfd `memvisor-<name>`, opened through /proc so it outlives the process."""
    fd_dir = Path(f"/proc/{pid}/fd")
    for entry in fd_dir.iterdir():
        try:
            target = os.readlink(entry)
        except OSError:
            continue
        if target.startswith(f"/memfd:memvisor-{name} "):
            return os.open(entry, os.O_RDONLY)
    raise AssertionError(f"memvisor has no memfd memvisor-{name}")


def allocated(fd: int) -> int:
    return os.fstat(fd).st_blocks * 512


def store_loop() -> str:
    return (f"i=0; while [ $i -lt {STORES} ]; do "
            f"devmem $(({REGION_GPA:#x} + i * {STRIDE})) 32 0x5a5a5a5a || exit 1; i=$((i + 1)); done; echo stored")


def attack(tmp_path: Path, inaccessible: bool) -> tuple[int, int, str, int | None]:
    """(memfd bytes before, after, memvisor's stderr, its exit status or None while it runs)."""
    device = f"virtio-mem,id=vm0,max-size=512M,requested-size=0,unplugged-inaccessible={'on' if inaccessible else 'off'}"
    with GuestVM(tmp_path, memory="512M", devices=[device], extra=["--append", "module_blacklist=virtio_mem"]) as vm:
        assert vm.exec("test -e /sys/bus/virtio/drivers/virtio_mem").status != 0, "virtio_mem must not be loaded"
        fd = open_memfd(vm.process.pid, "mem-vm0")
        try:
            before = allocated(fd)
            try:
                result = vm.exec(store_loop(), timeout=600)
                report(f"inaccessible={inaccessible}: guest loop exited {result.status}: {result.stdout.strip()}"
                       f"{result.stderr.strip()}")
            except Exception as err:  # the VM was stopped under the agent
                report(f"inaccessible={inaccessible}: guest command failed: {err}")
            try:
                status: int | None = vm.process.wait(timeout=60 if inaccessible else 1)
            except subprocess.TimeoutExpired:
                status = None
            after = allocated(fd)
        finally:
            os.close(fd)
        stderr = vm.stderr_text()
    report(f"inaccessible={inaccessible}: memfd {before} -> {after} bytes, memvisor status {status}")
    return before, after, stderr, status


@pytest.mark.timeout(900)
def test_stores_into_unplugged_virtio_mem_stop_the_vm_and_cost_the_host_nothing(tmp_path: Path) -> None:
    before, after, stderr, status = attack(tmp_path, inaccessible=True)
    assert status == 125, f"memvisor should stop the VM: status {status}, {stderr}"
    assert re.search(r"unplugged\s+virtio-mem block", stderr), stderr
    assert "Traceback" not in stderr
    assert after - before < 1 * MiB


@pytest.mark.timeout(900)
def test_control_without_unplugged_inaccessible_the_same_stores_cost_host_memory(tmp_path: Path) -> None:
    before, after, _, status = attack(tmp_path, inaccessible=False)
    assert status is None  # the guest carries on
    assert after - before >= STORES * 4096


FILL = 600 * MiB
BALLOON_TARGET = 64 * MiB


@pytest.mark.timeout(1200)
def test_balloon_pages_in_plugged_virtio_mem_go_back_to_the_host(tmp_path: Path) -> None:
    """Item 3: plug 1G, fill and free it, inflate: the host gets the virtio-mem memory back.

    With one NUMA node, Linux's movable allocations (tmpfs pages, balloon pages) take ZONE_NORMAL first, which is
    the memory virtio-mem onlined above 4 GiB; the 512M of boot RAM is ZONE_DMA32.
    """
    devices = ["virtio-mem,id=vm0,max-size=2G,requested-size=0", "virtio-balloon,id=balloon0"]
    with GuestVM(tmp_path, memory="512M", devices=devices) as vm:
        vm.cmd("qom-set", path="vm0", property="requested-size", value=1 << 30)
        wait_until(lambda: vm.cmd("qom-get", path="vm0", property="size") == 1 << 30, timeout=300, interval=0.5,
                   what="vm0 to plug 1G")
        vm.check("mkdir -p /mnt/fill && mount -t tmpfs -o size=1G tmpfs /mnt/fill")
        vm.check(f"dd if=/dev/zero of=/mnt/fill/f bs=1M count={FILL // MiB} 2>&1", timeout=600)
        touched = vm.host_memory("vm0")
        vm.check("rm /mnt/fill/f && umount /mnt/fill")
        report(f"balloon: host memory of vm0 after the guest wrote {FILL // MiB} MiB: {touched // MiB} MiB")
        assert touched >= FILL * 0.8, "the fill should land in virtio-mem memory (ZONE_NORMAL)"
        started = time.monotonic()
        vm.cmd("balloon", value=BALLOON_TARGET)
        wait_until(lambda: int(vm.cmd("query-balloon")["actual"]) <= BALLOON_TARGET + MiB, timeout=600,
                   interval=1, what="the balloon to inflate")
        after = vm.host_memory("vm0")
        report(f"balloon: inflated to {BALLOON_TARGET // MiB} MiB in {time.monotonic() - started:.1f} s; host "
               f"memory of vm0 {touched // MiB} -> {after // MiB} MiB")
        assert touched - after >= 300 * MiB  # most of the 448 MiB balloon came from virtio-mem memory
        vm.cmd("balloon", value=512 * MiB)
        wait_until(lambda: int(vm.cmd("query-balloon")["actual"]) == 512 * MiB, timeout=600, interval=1,
                   what="the balloon to deflate")
        vm.check("mount -t tmpfs -o size=1G tmpfs /mnt/fill && dd if=/dev/zero of=/mnt/fill/f bs=1M count=64 2>&1")
