"""Issue 5, scenario 7: virtio-pmem gives a real Linux guest a host file as persistent memory, with DAX.

The backing files live in the test's tmp_path (inside the lab, a tmpfs of the lab), and the host-side checks
(e2fsck, debugfs from e2fsprogs) run in this same process space once the VM has exited.
"""

import hashlib
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.guest.vm import GuestVM

pytestmark = pytest.mark.guest

MiB = 1 << 20
PMEM_SIZE = 256 * MiB
FILE_SIZE = 64 * MiB
MOUNT = "/mnt/p"


def report(message: str) -> None:
    print(f"[virtio-pmem] {message}", file=sys.stderr)


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        while chunk := file.read(4 * MiB):
            digest.update(chunk)
    return digest.hexdigest()


def flush_counters(vm: GuestVM) -> dict[str, int]:
    (device,) = vm.cmd("x-query-pmem")
    assert device["id"] == "pm0"
    return device["counters"]  # type: ignore[no-any-return]


def cached_after_reading(vm: GuestVM, path: str) -> int:
    """How much the guest's Cached grows while it reads `path` once (caches dropped first)."""
    vm.check("sync && echo 3 > /proc/sys/vm/drop_caches")
    before = vm.meminfo()["Cached"]
    vm.check(f"cat {path} > /dev/null", timeout=300)
    return vm.meminfo()["Cached"] - before


def host_run(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=120)


def test_pmem_ext4_dax_flushes_and_persists(tmp_path: Path) -> None:
    image = tmp_path / "pmem.img"
    with image.open("wb") as file:
        file.truncate(PMEM_SIZE)
    device = f"virtio-pmem,id=pm0,file={image}"
    with GuestVM(tmp_path, memory="512M", devices=[device]) as vm:
        assert vm.check("cat /sys/block/pmem0/size").strip() == str(PMEM_SIZE // 512)
        vm.check("test -b /dev/pmem0")
        vm.check("mkfs.ext4 -q -F -b 4096 /dev/pmem0 2>&1", timeout=300)
        vm.check(f"mkdir -p {MOUNT} && mount -o dax /dev/pmem0 {MOUNT}")
        options = vm.check(f"grep ' {MOUNT} ' /proc/mounts")
        assert "dax" in options, options

        # --- write 64M and sync: the guest's flushes reach the host as fsyncs ------------------------------
        before = flush_counters(vm)
        started = time.monotonic()
        vm.check(f"dd if=/dev/urandom of={MOUNT}/f bs=1M count={FILE_SIZE // MiB} 2>&1 && sync", timeout=300)
        write_seconds = time.monotonic() - started
        after = flush_counters(vm)
        report(f"64M write + sync under DAX: {write_seconds:.2f} s; counters before {before}, after {after}")
        assert after["flush-requests"] > before["flush-requests"]
        assert after["flushes-ok"] > before["flushes-ok"] and after["flush-errors"] == 0
        assert after["bad-requests"] == 0
        guest_sum = vm.check(f"sha256sum {MOUNT}/f").split()[0]

        # --- page cache: with DAX the guest caches nothing, without DAX it caches the whole file -------------
        dax_cached = cached_after_reading(vm, f"{MOUNT}/f")
        vm.check(f"umount {MOUNT} && mount /dev/pmem0 {MOUNT}")
        options = vm.check(f"grep ' {MOUNT} ' /proc/mounts")
        assert "dax" not in options, options
        plain_cached = cached_after_reading(vm, f"{MOUNT}/f")
        report(f"Cached growth reading 64M: {plain_cached // 1024} KiB, with DAX {dax_cached // 1024} KiB")
        assert FILE_SIZE - 4 * MiB <= plain_cached <= FILE_SIZE + 16 * MiB
        assert dax_cached < 16 * MiB
        vm.check(f"umount {MOUNT}")
        total_flushes = flush_counters(vm)

    report(f"counters at the end: {total_flushes}")
    # --- the host file holds the filesystem and the file --------------------------------------------------
    fsck = host_run("e2fsck", "-fn", str(image))
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr
    stat = host_run("debugfs", "-R", "stat /f", str(image))
    assert stat.returncode == 0, stat.stderr
    size = re.search(r"Size: (\d+)", stat.stdout)
    assert size and int(size.group(1)) == FILE_SIZE, stat.stdout
    dumped = tmp_path / "f.out"
    dump = host_run("debugfs", "-R", f"dump /f {dumped}", str(image))
    assert dump.returncode == 0, dump.stderr
    assert sha256(dumped) == guest_sum  # every byte the guest wrote is in the host file


def test_pmem_readonly_leaves_the_host_file_unchanged(tmp_path: Path) -> None:
    image = tmp_path / "pmem-ro.img"
    image.write_bytes(bytes(range(256)) * (PMEM_SIZE // 256))
    before = sha256(image)
    device = f"virtio-pmem,id=pm0,file={image},readonly=on"
    with GuestVM(tmp_path, memory="256M", devices=[device]) as vm:
        read_back = "dd if=/dev/pmem0 bs=4096 count=16 iflag=direct 2>/dev/null | sha256sum"
        original = vm.check(read_back).split()[0]
        started = time.monotonic()
        write = vm.exec("dd if=/dev/urandom of=/dev/pmem0 bs=4096 count=16 oflag=direct conv=fsync 2>&1")
        report(f"64K write to read-only pmem: status {write.status} in {time.monotonic() - started:.2f} s")
        again = vm.check(read_back).split()[0]
        assert again == original  # the guest's writes were dropped: it reads the file's bytes back
        assert vm.check("echo alive") == "alive\n"
        assert sha256(image) == before
    assert sha256(image) == before
