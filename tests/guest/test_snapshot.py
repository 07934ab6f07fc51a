"""Snapshot and restore of a running Debian guest: `stop`, `migrate file:`, then `memvisor run --incoming`.

The guest is sleeping in `sleep 5` when it is saved; after the restore it must wake on time (its timers
survive: the TSC before TSC_DEADLINE, the LAPIC before the MSRs, the VM clock before any vCPU runs), its
processes and files are there, the agent answers, and a second snapshot of the restored guest works.
"""

import contextlib
import os
import re
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.guest.conftest import memvisor
from tests.guest.vm import GuestVM, wait_until

# The restored guest's `sleep 5` must end 5 s later by its own clock. In the lab the guest's kvm-clock runs over
# a TSC its kernel finds unstable (L1 is QEMU TCG) and its timers run up to about 1.6 s late when the lab is
# loaded (a `sleep 5` took 6.6 s with no snapshot at all), so the lab's bound is 8 s; on hardware KVM it is 7 s.
# Before the restore resumed kvmclock from the guest's own pvclock page (memvisor/snapshot/pvclock.py) the
# restored clock jumped about 10 s here and the sleep measured 7.1 and 9.2 s (docs/LAB.md).
SLEEP_BOUND = 8.0 if os.environ.get("MEMVISOR_IN_LAB") == "1" else 7.0
SLEEPER = (
    "(s=$(cut -d' ' -f1 /proc/uptime); sleep 5; e=$(cut -d' ' -f1 /proc/uptime); echo \"$s $e\" > /tmp/woke)"
    " >/dev/null 2>&1 </dev/null &"
)


def _save(vm: GuestVM, path: Path) -> dict:  # type: ignore[type-arg]
    info = _save_ends(vm, path)
    assert info["status"] == "completed", info
    return info


def _save_ends(vm: GuestVM, path: Path) -> dict:  # type: ignore[type-arg]
    """`stop`, `migrate` to file:PATH, and query-migrate's answer once the save completed or failed."""
    vm.cmd("stop")
    vm.cmd("migrate", uri=f"file:{path}")

    def finished() -> dict | None:  # type: ignore[type-arg]
        info = vm.cmd("query-migrate")
        return info if info.get("status") in ("completed", "failed") else None

    info = wait_until(finished, timeout=300, interval=0.5, what="the snapshot to finish")
    assert info is not None
    return info


@pytest.mark.alone  # its bound on the restored sleep: scripts/guest-tests runs it with no other guest busy
def test_restored_guest_wakes_from_sleep_on_time_and_snapshots_again(tmp_path: Path) -> None:
    snap = tmp_path / "vm.snap"
    first = tmp_path / "first"
    first.mkdir()
    booted_at = time.monotonic()
    with GuestVM(first, memory="1G") as vm:
        cold_boot = time.monotonic() - booted_at
        vm.check("echo kept > /tmp/marker")
        vm.check(SLEEPER)
        meminfo = vm.meminfo()
        time.sleep(1)
        info = _save(vm, snap)
        assert vm.cmd("query-status")["status"] == "paused"
        # The original carries on after `cont` as if nothing happened.
        vm.cmd("cont")
        assert vm.check("cat /tmp/marker").strip() == "kept"
    time.sleep(10)  # the snapshot sits on disk a while: the restored guest's wall clock must catch up
    allocated = snap.stat().st_blocks * 512
    used = meminfo["MemTotal"] - meminfo["MemFree"]
    whole = (1 << 30) - meminfo["MemFree"]  # with what the kernel reserved at boot (image, struct pages)
    print(f"snapshot: {snap.stat().st_size} bytes, {allocated >> 20} MiB allocated, guest uses {used >> 20} MiB "
          f"(MemTotal - MemFree; MemTotal {meminfo['MemTotal'] >> 20} MiB), {whole >> 20} MiB (1G - MemFree), "
          f"{meminfo['Cached'] >> 20} MiB of it page cache; took {info['total-time']} ms")
    assert snap.stat().st_size > 1 << 30  # the file spans guest RAM ...
    assert allocated < 600 << 20  # ... but only what the guest uses is written (holes for the rest)

    second = tmp_path / "second"
    second.mkdir()
    restored_at = time.monotonic()
    with GuestVM(second, memory="1G", extra=["--incoming", f"file:{snap}"]) as vm:
        restore = time.monotonic() - restored_at
        print(f"cold boot to agent answering {cold_boot:.1f} s, restore to agent answering {restore:.1f} s "
              f"({restore / cold_boot:.2f}x)")
        assert vm.check("cat /tmp/marker").strip() == "kept"
        woke = wait_until(lambda: vm.exec("cat /tmp/woke").stdout.split(), timeout=60, interval=0.5,
                          what="the guest's sleep 5 to end")  # fmt: skip
        waited = time.monotonic() - restored_at
        start, end = (float(v) for v in woke)
        print(f"the restored guest's sleep 5 took {end - start:.2f} s by its own clock (bound {SLEEP_BOUND} s)")
        # By the guest's own clock the sleep took 5 s (not much more: no timer was lost) ...
        assert 5.0 <= end - start < SLEEP_BOUND, (woke, f"bound {SLEEP_BOUND} s")
        # ... and it ended soon after the restore, not after some timeout.
        assert waited < 45, waited
        # The wall clock was corrected after the restore (the snapshot sat on disk meanwhile).
        guest_now = wait_until(lambda: (abs(int(vm.check("date +%s")) - time.time()) < 5) or None,
                               timeout=60, interval=1, what="the guest's wall clock to be corrected")  # fmt: skip
        assert guest_now
        console = vm.console_text()
        assert "soft lockup" not in console and "BUG:" not in console, console[-2000:]
        # A second snapshot of the restored guest works.
        again = tmp_path / "again.snap"
        _save(vm, again)
        vm.cmd("cont")
        assert vm.check("echo alive").strip() == "alive"


def test_restore_refuses_a_snapshot_of_another_memory_size(tmp_path: Path) -> None:
    snap = tmp_path / "vm.snap"
    with GuestVM(tmp_path, memory="512M") as vm:
        _save(vm, snap)
    result = memvisor("run", "--lab", "off", "--memory", "1G", "--incoming", f"file:{snap}",
                      "--console", str(tmp_path / "c2.log"), timeout=120)  # fmt: skip
    assert result.returncode == 125
    assert "--memory 512M" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_kvm_vcpu_and_vm_state_save_restore_save_gives_equal_state() -> None:
    """On real KVM, no guest booted: a vCPU set up for boot, saved, restored into a new VM, saved again."""
    import dataclasses

    from memvisor.boot import cpu
    from memvisor.kvm.system import Kvm
    from memvisor.memory.guest_memory import MemoryRegion
    from memvisor.snapshot.cpu import (
        MSR_IA32_TSC,
        capture_vcpu,
        capture_vm,
        restore_vcpu,
        restore_vcpu_clock,
        restore_vm,
        savable_msrs,
    )

    kvm = Kvm()
    made = []

    def new_vm():  # type: ignore[no-untyped-def]
        vm = kvm.create_vm()
        vm.set_tss_addr(0xFFFBD000)
        vm.create_irqchip()
        vm.create_pit2()
        region = MemoryRegion.memfd(0, 64 << 20)
        vm.set_memory_slot(0, 0, region.size, region.host_addr)
        made.append((vm, region))
        return vm

    first = new_vm()
    vcpu = first.create_vcpu(0)
    cpu.setup_vcpu(vcpu, kvm.supported_cpuid(), 1, 0x100000)
    msrs = savable_msrs(kvm, vcpu)
    assert MSR_IA32_TSC in msrs and len(msrs) > 20, [hex(m) for m in msrs]
    saved, saved_vm = capture_vcpu(vcpu, msrs), capture_vm(first)

    second = new_vm()
    restore_vm(second, saved_vm)
    copy = second.create_vcpu(0)
    restore_vcpu(copy, saved)
    restore_vcpu_clock(copy, saved)  # what Machine.start does right before the vCPU threads
    again, again_vm = capture_vcpu(copy, msrs), capture_vm(second)

    before, after = saved.msr_dict, again.msr_dict
    # Clocks run on between the two reads: the TSC and Hyper-V's VP_RUNTIME and TIME_REF_COUNT (100 ns units).
    running = {MSR_IA32_TSC: saved.tsc_khz * 1000, 0x40000010: 10**7, 0x40000020: 10**7}
    for index, per_second in running.items():
        if index in before:
            assert 0 <= after[index] - before[index] < 10 * per_second, hex(index)  # carried over, within 10 s
    differing_msrs = {hex(i): (v, after.get(i)) for i, v in before.items() if i not in running and after.get(i) != v}
    assert differing_msrs == {}
    plain = dataclasses.replace(saved, msrs=()), dataclasses.replace(again, msrs=())
    assert plain[0] == plain[1]
    assert (again_vm.pic_master, again_vm.pic_slave, again_vm.ioapic) == (
        saved_vm.pic_master, saved_vm.pic_slave, saved_vm.ioapic)  # fmt: skip
    assert again_vm.clock >= saved_vm.clock
    for vm, region in made:
        vm.close()
        region.close()
    vcpu.close()
    copy.close()
    kvm.close()


def _first_present_page_offset(path: Path) -> int:
    """The file offset of the first guest page the snapshot holds."""
    import os

    import numpy as np

    from memvisor.snapshot import fileformat

    fd = os.open(path, os.O_RDONLY)
    try:
        _, image = fileformat.read_header_and_state(fd)
        region = image.regions[0]
        bitmap = os.pread(fd, fileformat.bitmap_bytes(region.size), region.bitmap_offset)
    finally:
        os.close(fd)
    page = int(np.flatnonzero(np.unpackbits(np.frombuffer(bitmap, np.uint8), bitorder="little"))[0])
    return region.data_offset + page * fileformat.PAGE_SIZE


def test_incoming_defer_then_migrate_incoming_and_a_corrupted_file_exits_125(tmp_path: Path) -> None:
    import base64
    import subprocess
    import sys

    from qemu.qmp.legacy import QEMUMonitorProtocol

    from tests.guest.vm import REPO

    snap = tmp_path / "vm.snap"
    first = tmp_path / "first"
    first.mkdir()
    with GuestVM(first, memory="512M") as vm:
        vm.check("echo deferred > /tmp/marker")
        _save(vm, snap)
    # A flipped byte in a data page: memvisor refuses it with one line and exit 125, running nothing.
    bad = tmp_path / "bad.snap"
    data = bytearray(snap.read_bytes())
    data[_first_present_page_offset(snap) + 5] ^= 0x40
    bad.write_bytes(bytes(data))
    result = memvisor("run", "--lab", "off", "--memory", "512M", "--incoming", f"file:{bad}",
                      "--console", str(tmp_path / "bad.log"), timeout=120)  # fmt: skip
    assert result.returncode == 125, result.stderr
    assert "corrupted" in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr

    second = tmp_path / "second"
    second.mkdir()
    sock = second / "qmp.sock"
    process = subprocess.Popen(
        [sys.executable, "-m", "memvisor", "run", "--lab", "off", "--memory", "512M", "--qmp", str(sock),
         "--console", str(second / "console.log"), "--incoming", "defer"],
        cwd=REPO, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        wait_until(sock.exists, timeout=120, interval=0.2, what="the QMP socket")
        qmp = QEMUMonitorProtocol(str(sock))
        qmp.connect(negotiate=True)
        assert qmp.cmd_obj({"execute": "query-status"})["return"]["status"] == "prelaunch"
        reply = qmp.cmd_obj({"execute": "migrate-incoming", "arguments": {"uri": f"file:{snap}"}})
        assert reply == {"return": {}}, reply
        out = qmp.cmd_obj({"execute": "x-guest-exec", "arguments": {"command": "cat /tmp/marker", "timeout": 60}})
        assert base64.b64decode(out["return"]["out-data"]).decode().strip() == "deferred"
        qmp.cmd_obj({"execute": "quit"})
        qmp.close()
        assert process.wait(60) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


MiB = 1 << 20


def test_restored_devices_work_balloon_virtio_mem_and_pmem(tmp_path: Path) -> None:
    """A guest with an inflated balloon, plugged virtio-mem holding data and a pmem file is saved, restored,
    and each device still works: the data is intact, the balloon deflates and inflates, virtio-mem resizes."""
    pmem = tmp_path / "pmem.img"
    with pmem.open("wb") as file:
        file.truncate(64 * MiB)
    devices = ["virtio-balloon,id=balloon0", "virtio-mem,id=vm0,max-size=1G,requested-size=0",
               f"virtio-pmem,id=pm0,file={pmem}"]  # fmt: skip
    snap = tmp_path / "vm.snap"
    first = tmp_path / "first"
    first.mkdir()
    with GuestVM(first, memory="1G", devices=devices) as vm:
        boot_total = vm.meminfo()["MemTotal"]
        vm.cmd("qom-set", path="vm0", property="requested-size", value=256 * MiB)
        wait_until(lambda: vm.meminfo()["MemTotal"] == boot_total + 256 * MiB, timeout=120, what="+256M")
        vm.check("mkdir -p /mnt/t && mount -t tmpfs -o size=400M tmpfs /mnt/t")
        vm.check("dd if=/dev/urandom of=/mnt/t/data bs=1M count=150 2>&1", timeout=300)
        data_sum = vm.check("sha256sum /mnt/t/data").split()[0]
        vm.check("dd if=/dev/urandom of=/dev/pmem0 bs=1M count=8 2>&1 && sync", timeout=120)
        pmem_sum = vm.check("head -c 8388608 /dev/pmem0 | sha256sum").split()[0]
        vm.cmd("balloon", value=768 * MiB)
        wait_until(lambda: vm.cmd("query-balloon")["actual"] <= 770 * MiB, timeout=120, what="balloon 768M")
        info = _save(vm, snap)
    print(f"snapshot with devices: {snap.stat().st_blocks * 512 >> 20} MiB allocated, ram {info['ram']}")

    second = tmp_path / "second"
    second.mkdir()
    with GuestVM(second, memory="1G", devices=devices, extra=["--incoming", f"file:{snap}"]) as vm:
        assert vm.check("sha256sum /mnt/t/data").split()[0] == data_sum
        assert vm.check("head -c 8388608 /dev/pmem0 | sha256sum").split()[0] == pmem_sum
        assert vm.cmd("query-balloon")["actual"] <= 770 * MiB
        assert vm.cmd("qom-get", path="vm0", property="size") == 256 * MiB
        # pmem flushes reach the host from the restored guest.
        before = vm.cmd("x-query-pmem")[0]["counters"]["flushes-ok"]
        vm.check("dd if=/dev/zero of=/dev/pmem0 bs=4096 count=1 seek=4096 conv=fsync 2>&1")  # fsync: a flush
        assert vm.cmd("x-query-pmem")[0]["counters"]["flushes-ok"] > before
        # The balloon deflates and inflates again.
        vm.cmd("balloon", value=1024 * MiB)
        wait_until(lambda: vm.cmd("query-balloon")["actual"] >= 1020 * MiB, timeout=120, what="balloon deflated")
        vm.cmd("balloon", value=900 * MiB)
        wait_until(lambda: vm.cmd("query-balloon")["actual"] <= 902 * MiB, timeout=120, what="balloon 900M")
        # virtio-mem resizes with its plugged data intact.
        vm.cmd("qom-set", path="vm0", property="requested-size", value=512 * MiB)
        wait_until(lambda: vm.cmd("qom-get", path="vm0", property="size") == 512 * MiB, timeout=120,
                   what="vm0 to 512M")  # fmt: skip
        assert vm.check("sha256sum /mnt/t/data").split()[0] == data_sum


# In CI since 2026-12-02: its one earlier failure (s5) was issue 13's reset of the lab's emulated nested paging.
def test_a_hinted_snapshot_leaves_out_freed_memory_and_restores_every_used_page(tmp_path: Path) -> None:
    """`memvisor snapshot --hints` with a balloon that offers free page hinting asks the guest for hints first:
    memory the guest filled and freed (still holding data, no free page reporting) stays out of the file, and
    every page the guest uses comes back (a file's checksum, the agent, a process)."""
    devices = ["virtio-balloon,id=balloon0,free-page-hint=on"]
    plain, hinted = tmp_path / "plain.snap", tmp_path / "hinted.snap"
    first = tmp_path / "first"
    first.mkdir()
    with GuestVM(first, memory="1G", devices=devices) as vm:
        vm.check("mkdir -p /mnt/t && mount -t tmpfs -o size=600M tmpfs /mnt/t")
        vm.check("dd if=/dev/urandom of=/mnt/t/kept bs=1M count=40 2>&1", timeout=300)
        kept = vm.check("sha256sum /mnt/t/kept").split()[0]
        vm.check("dd if=/dev/urandom of=/mnt/t/freed bs=1M count=300 2>&1 && rm /mnt/t/freed", timeout=600)
        meminfo = vm.meminfo()
        memvisor("snapshot", str(vm.socket), str(plain), timeout=300, check=True)
        vm.cmd("cont")
        result = memvisor("snapshot", "--hints", str(vm.socket), str(hinted), timeout=300, check=True)
        vm.cmd("cont")
        assert vm.check("echo alive").strip() == "alive"
    plain_mib, hinted_mib = plain.stat().st_blocks * 512 / MiB, hinted.stat().st_blocks * 512 / MiB
    used, whole = (meminfo["MemTotal"] - meminfo["MemFree"]) / MiB, ((1 << 30) - meminfo["MemFree"]) / MiB
    print(f"snapshot without hints {plain_mib:.0f} MiB allocated, with hints {hinted_mib:.0f} MiB; the guest uses "
          f"{used:.0f} MiB (MemTotal - MemFree), {whole:.0f} MiB (1G - MemFree); {result.stdout.strip()}")  # fmt: skip
    assert plain_mib > 300  # the freed 300M still held random data: without hints it is saved
    assert hinted_mib < plain_mib - 200  # the hinted free blocks (4 MiB each) were left out
    assert hinted_mib < 1.2 * whole

    second = tmp_path / "second"
    second.mkdir()
    with GuestVM(second, memory="1G", devices=devices, extra=["--incoming", f"file:{hinted}"]) as vm:
        assert vm.check("sha256sum /mnt/t/kept").split()[0] == kept
        vm.check("dd if=/dev/urandom of=/mnt/t/new bs=1M count=100 2>&1 && sha256sum /mnt/t/new", timeout=300)
        console = vm.console_text()
        assert "BUG:" not in console and "Bad page" not in console, console[-2000:]


def _migration_statuses(vm: GuestVM, last: str) -> list[str]:
    """The statuses of the MIGRATION events received until one says `last` (events received earlier and not
    yet read are included: read them before a `migrate` to see only its own)."""
    seen: list[str] = []

    def arrived() -> list[str] | None:
        vm.cmd("query-status")  # the client reads what memvisor sent before this reply: the events too
        seen.extend(event["data"]["status"] for event in vm.events("MIGRATION"))
        return seen if last in seen else None

    statuses = wait_until(arrived, timeout=30, interval=0.2, what=f"a MIGRATION event with status {last!r}")
    assert statuses is not None
    return statuses


@contextlib.contextmanager
def _small_filesystem(mount: Path, size: str) -> Iterator[Path]:
    """A tmpfs of `size` mounted at `mount` (made here), unmounted afterwards. Guest tests run as root in the
    lab, so it can be made there; elsewhere the test skips (and in the lab a skip fails: it must run there)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs for the disk-full save needs root (the lab runs guest tests as root)")
    mount.mkdir()
    try:
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(mount)],
                              capture_output=True, text=True, check=False)  # fmt: skip
    except OSError as error:
        pytest.skip(f"cannot run mount(8) for a small tmpfs: {error}")
    if done.returncode != 0:
        pytest.skip(f"cannot mount a {size} tmpfs at {mount}: {done.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], capture_output=True, check=False)


def test_a_snapshot_to_a_full_disk_fails_on_qmp_and_the_guest_carries_on(tmp_path: Path) -> None:
    """Issue 8: `migrate` to a filesystem too small for the snapshot ends "failed" with error-desc naming the
    lack of space (memvisor.snapshot.writer's wording), leaves nothing in the destination directory, and the
    guest is unharmed: paused as `stop` left it, it runs again after `cont` with its data intact, and a
    snapshot to a place with room then completes."""
    small = tmp_path / "small"
    first = tmp_path / "guest"
    first.mkdir()
    with _small_filesystem(small, "16M"), GuestVM(first, memory="512M") as vm:
        assert os.statvfs(small).f_blocks * os.statvfs(small).f_frsize <= 16 * MiB  # the tmpfs is there
        vm.check("mkdir -p /mnt/t && mount -t tmpfs -o size=100M tmpfs /mnt/t")
        vm.check("dd if=/dev/urandom of=/mnt/t/data bs=1M count=64 2>&1", timeout=300)
        checksum = vm.check("sha256sum /mnt/t/data").split()[0]

        snap = small / "vm.snap"
        info = _save_ends(vm, snap)
        assert info["status"] == "failed", info
        error = info.get("error-desc", "")
        pattern = (rf"not enough space for snapshot {re.escape(str(snap))}: it needs about (\d+\.\d) MiB, "
                   rf"{re.escape(str(small))} has (\d+\.\d) MiB free")  # fmt: skip
        found = re.search(pattern, error)
        assert found, info
        assert float(found[1]) >= 64 and float(found[2]) <= 16, error  # the random 64 MiB alone do not fit
        assert "save to another filesystem" in error and "the guest was not changed" in error, error
        assert os.listdir(small) == []  # no snapshot and no .vm.snap.*.partial left behind
        assert _migration_statuses(vm, "failed") == ["setup", "active", "failed"]

        # The guest carries on: paused as `stop` left it, running after `cont`, its agent and data intact.
        assert vm.cmd("query-status")["status"] == "paused"
        vm.cmd("cont")
        assert vm.cmd("query-status")["status"] == "running"
        assert vm.check("echo alive").strip() == "alive"
        assert vm.check("sha256sum /mnt/t/data").split()[0] == checksum

        # A snapshot to a place with room then completes, holding the data the full disk could not.
        roomy = tmp_path / "roomy.snap"
        vm.events("MIGRATION")  # drop anything older than this save's events
        info = _save(vm, roomy)
        assert _migration_statuses(vm, "completed") == ["setup", "active", "completed"]
        assert info["x-file-allocated"] >= 64 * MiB and roomy.stat().st_blocks * 512 >= 64 * MiB, info
        assert [name for name in os.listdir(tmp_path) if name.endswith(".partial")] == []
        vm.cmd("cont")
        assert vm.check("sha256sum /mnt/t/data").split()[0] == checksum
