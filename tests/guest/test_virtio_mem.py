"""Issue 5, scenario 6: virtio-mem grows and shrinks a real Linux guest, on the NUMA node it was given.

One 512M guest with two NUMA nodes and a 2G virtio-mem device on node 1 serves every assertion: plugging 1G
(guest MemTotal, `size`, the MEMORY_DEVICE_SIZE_CHANGE event, `info memory-devices` in QEMU's text, node 1's
MemTotal), then touching that memory and unplugging down to 256M (the host gets the touched memory back and the
guest carries on). Sizes are multiples of 4M: Linux 6.1 plugs and unplugs in 4 MiB sub-blocks.
"""

import re
import sys
import time
from pathlib import Path

import pytest

from tests.guest.vm import GuestVM, wait_until

pytestmark = pytest.mark.guest

MiB = 1 << 20
GiB = 1 << 30
BOOT_MEMORY = 512 * MiB
MAX_SIZE = 2 * GiB
DEVICE = f"virtio-mem,id=vm0,max-size={MAX_SIZE // MiB}M,requested-size=0,node=1"
TOUCH = 900 * MiB  # written into a tmpfs bound to node 1, i.e. into the device's memory
NODE1_MEMINFO = "/sys/devices/system/node/node1/meminfo"


def report(message: str) -> None:
    """Measured numbers go to the test log (pytest -s or the lab's output) for the final report."""
    print(f"[virtio-mem] {message}", file=sys.stderr)


def node1_total(vm: GuestVM) -> int:
    """MemTotal of the guest's node 1; 0 while the node is offline (Linux onlines a memory-only node on hot-add)."""
    text = vm.check(f"cat {NODE1_MEMINFO} 2>/dev/null || echo 'Node 1 MemTotal: 0 kB'")
    match = re.search(r"Node 1 MemTotal:\s+(\d+) kB", text)
    assert match, text
    return int(match.group(1)) * 1024


def lab_mem_available() -> int:
    """MemAvailable of the machine memvisor runs on (inside the lab: the lab's own kernel)."""
    match = re.search(r"MemAvailable:\s+(\d+) kB", Path("/proc/meminfo").read_text())
    assert match
    return int(match.group(1)) * 1024


def size_events(vm: GuestVM, timeout: float, until_size: int) -> list[dict]:  # type: ignore[type-arg]
    """MEMORY_DEVICE_SIZE_CHANGE events until one reports `until_size` (they are throttled to one a second)."""
    seen: list[dict] = []  # type: ignore[type-arg]
    deadline = time.monotonic() + timeout
    while not seen or seen[-1]["data"]["size"] != until_size:
        left = deadline - time.monotonic()
        assert left > 0, f"no MEMORY_DEVICE_SIZE_CHANGE with size {until_size} within {timeout} s: {seen}"
        event = vm.qmp.pull_event(wait=left)
        if event is not None and event["event"] == "MEMORY_DEVICE_SIZE_CHANGE":
            seen.append(event)
    return seen


def expected_info(memaddr: int, requested: int, size: int) -> list[str]:
    """`info memory-devices` for vm0 as QEMU 7.2 prints it (hmp-cmds.c hmp_info_memory_devices)."""
    return [
        'Memory device [virtio-mem]: "vm0"',
        f"  memaddr: 0x{memaddr:x}",
        "  node: 1",
        f"  requested-size: {requested}",
        f"  size: {size}",
        f"  max-size: {MAX_SIZE}",
        "  block-size: 2097152",
        "  memdev: /objects/vm0-mem",
    ]


# Writing 900M into fresh guest memory costs one host page fault per 4 KiB page: about 250 s in the lab.
@pytest.mark.alone  # it reads the lab's MemAvailable, which another test's guests move
@pytest.mark.timeout(1200)
def test_virtio_mem_grows_and_shrinks_on_its_numa_node(tmp_path: Path) -> None:
    with GuestVM(tmp_path, memory="512M", devices=[DEVICE], extra=["--numa-nodes", "2"]) as vm:
        boot_total = vm.meminfo()["MemTotal"]
        swiotlb = vm.check("dmesg | grep -i 'software io tlb' || true").strip()
        report(f"boot MemTotal {boot_total // MiB} MiB; {swiotlb}")
        # The SRAT's hotpluggable range above 4G makes Linux keep a 64M swiotlb too (as under QEMU).
        assert BOOT_MEMORY - 160 * MiB < boot_total <= BOOT_MEMORY
        assert vm.cmd("qom-get", path="vm0", property="size") == 0
        assert node1_total(vm) == 0  # a memory-only node with nothing plugged: not online yet
        (device,) = vm.cmd("query-memory-devices")
        memaddr = device["data"]["memaddr"]
        assert memaddr % (128 * MiB) == 0 and memaddr >= 4 * GiB
        host_before_plug = vm.host_memory("vm0")
        vm.qmp.clear_events()

        # --- plug 1G ----------------------------------------------------------------------------------------
        started = time.monotonic()
        vm.cmd("qom-set", path="vm0", property="requested-size", value=GiB)
        wait_until(lambda: vm.cmd("qom-get", path="vm0", property="size") == GiB, timeout=180, interval=0.2,
                   what="vm0 size to reach 1G")  # fmt: skip
        plug_seconds = time.monotonic() - started
        wait_until(lambda: vm.meminfo()["MemTotal"] >= boot_total + GiB, timeout=60, what="MemTotal +1G")
        grown_total = vm.meminfo()["MemTotal"]
        report(
            f"plug 0 -> 1G: {plug_seconds:.2f} s; MemTotal {boot_total // MiB} -> {grown_total // MiB} MiB"
        )
        assert grown_total - boot_total == GiB  # every plugged byte is online, nothing else changed

        events = size_events(vm, timeout=30, until_size=GiB)
        assert all(
            e["data"]["id"] == "vm0" and e["data"]["qom-path"] == "/machine/peripheral/vm0" for e in events
        )
        sizes = [e["data"]["size"] for e in events]
        assert sizes == sorted(sizes) and all(0 < s <= GiB for s in sizes), sizes
        report(f"MEMORY_DEVICE_SIZE_CHANGE sizes while plugging: {[s // MiB for s in sizes]} MiB")

        text = vm.cmd("human-monitor-command", command_line="info memory-devices")
        assert text.endswith("\r\n")
        assert text.split("\r\n")[:-1] == expected_info(memaddr, GiB, GiB)

        node1 = node1_total(vm)
        report(f"node 1 MemTotal with 1G plugged: {node1 // MiB} MiB")
        assert node1 == GiB

        # --- touch the plugged memory, free it, unplug to 256M --------------------------------------------
        vm.check("mkdir -p /mnt/t && mount -t tmpfs -o size=1G,mpol=bind:1 tmpfs /mnt/t")
        vm.check(f"dd if=/dev/zero of=/mnt/t/fill bs=1M count={TOUCH // MiB} 2>&1", timeout=300)
        host_touched = vm.host_memory("vm0")
        report(f"host memory of vm0: {host_before_plug // MiB} MiB before plugging, "
               f"{host_touched // MiB} MiB after the guest wrote {TOUCH // MiB} MiB")  # fmt: skip
        assert host_touched >= host_before_plug + TOUCH * 0.9
        vm.check("rm /mnt/t/fill && umount /mnt/t")
        lab_before = lab_mem_available()

        started = time.monotonic()
        vm.cmd("qom-set", path="vm0", property="requested-size", value=256 * MiB)
        wait_until(lambda: vm.cmd("qom-get", path="vm0", property="size") == 256 * MiB, timeout=300, interval=0.5,
                   what="vm0 size to fall to 256M")  # fmt: skip
        unplug_seconds = time.monotonic() - started
        host_after = vm.host_memory("vm0")
        lab_after = lab_mem_available()
        report(f"unplug 1G -> 256M: {unplug_seconds:.2f} s; host memory of vm0 {host_touched // MiB} -> "
               f"{host_after // MiB} MiB; lab MemAvailable +{(lab_after - lab_before) // MiB} MiB")  # fmt: skip
        assert host_touched - host_after >= 600 * MiB
        assert host_after <= 256 * MiB  # at most what is still plugged
        assert lab_after - lab_before >= 500 * MiB  # the lab's kernel really got the pages back

        size_events(vm, timeout=30, until_size=256 * MiB)

        # --- the guest carries on with 512M + 256M --------------------------------------------------------
        wait_until(
            lambda: vm.meminfo()["MemTotal"] == boot_total + 256 * MiB, timeout=60, what="MemTotal +256M"
        )
        assert node1_total(vm) == 256 * MiB
        assert vm.check("echo alive") == "alive\n"
        # it can still allocate and touch memory
        vm.check("dd if=/dev/zero of=/dev/null bs=200M count=1 2>&1")
        text = vm.cmd("human-monitor-command", command_line="info memory-devices")
        assert text.split("\r\n")[:-1] == expected_info(memaddr, 256 * MiB, 256 * MiB)


def test_unplug_migrates_memory_in_use_without_losing_it(tmp_path: Path) -> None:
    """Without NUMA, hot-added memory is the guest's preferred home for movable pages (ZONE_MOVABLE), so
    unplugging means migrating what lives there: the data survives and the host keeps no more than is plugged."""
    with GuestVM(tmp_path, memory="512M", devices=["virtio-mem,id=vm0,max-size=2G,requested-size=0"]) as vm:
        boot_total = vm.meminfo()["MemTotal"]
        vm.cmd("qom-set", path="vm0", property="requested-size", value=512 * MiB)
        wait_until(lambda: vm.meminfo()["MemTotal"] == boot_total + 512 * MiB, timeout=120, what="+512M")
        vm.check("mkdir -p /mnt/t && mount -t tmpfs -o size=400M tmpfs /mnt/t")
        vm.check("dd if=/dev/urandom of=/mnt/t/data bs=1M count=200 2>&1", timeout=300)
        written = vm.check("sha256sum /mnt/t/data").split()[0]
        in_device = vm.host_memory("vm0")
        assert in_device >= 150 * MiB  # the file went (mostly) into the plugged memory

        started = time.monotonic()
        vm.cmd("qom-set", path="vm0", property="requested-size", value=128 * MiB)
        wait_until(lambda: vm.cmd("qom-get", path="vm0", property="size") == 128 * MiB, timeout=300, interval=0.5,
                   what="vm0 size to fall to 128M")  # fmt: skip
        seconds = time.monotonic() - started
        held = vm.host_memory("vm0")
        report(f"unplug 512M -> 128M with 200M of tmpfs data in it: {seconds:.2f} s; "
               f"host memory of vm0 {in_device // MiB} -> {held // MiB} MiB")  # fmt: skip
        assert held <= 128 * MiB
        wait_until(lambda: vm.meminfo()["MemTotal"] == boot_total + 128 * MiB, timeout=60, what="+128M")
        assert vm.check("sha256sum /mnt/t/data").split()[0] == written
