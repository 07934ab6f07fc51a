"""Issue 5, scenarios 1-4: virtio-balloon with a real Linux guest and its own driver (Debian 6.1).

Two small guests serve all the tests (boots are slow in the lab), but each test starts from the same known
state, so the order does not matter: a guest that died or stopped answering is booted again, and a live one
gets an empty balloon, an empty test tmpfs, statistics polling off and a cleared kernel log (`_known_state`).
No threshold depends on what an earlier test left behind: host memory is checked in absolute terms (after
writing N MiB the host holds at least N MiB), not as a gain over a start the host may already have backed.
- `plain_vm`: a balloon without deflate-on-oom and without free page reporting (inflate/deflate, statistics,
  and the control case of deflate-on-oom: the OOM killer acts);
- `reporting_vm`: free-page-reporting=on and deflate-on-oom=on.

Memory is touched through files on a tmpfs of the guest's whole size (/tmp is only half of it), which hold
it until removed, and through busybox awk holding 1 MiB strings, which the OOM killer can free by killing awk.
"Host memory" is what the host really holds for the guest, read from outside memvisor: the blocks of its RAM
memfds through /proc/PID/fd (tests/guest/vm.py), so a bug in memvisor's own accounting cannot fool a test.
Data survives the balloon: a file of random bytes is checksummed before inflating, inflated and deflated. Every wait is a poll
with a generous timeout; the measured times are printed (pytest -s) for the record, the benchmark owns them.
"""

import re
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.guest.balloon_wait import balloon_actual, move_balloon, stall_report
from tests.guest.vm import GuestVM, wait_until

MiB = 1 << 20
RAM = 1024 * MiB
BALLOON = "/machine/peripheral/balloon0"
TMPFS = "/mnt/balloon-test"
# Holds `n` MiB of anonymous memory in one awk process, 1 MiB at a time (one big malloc of more than the
# guest has is refused outright by the overcommit heuristic, and would never reach the OOM killer).
HOLD_ANON = 'awk \'BEGIN {{ s = "x"; while (length(s) < 1048576) s = s s; for (i = 0; i < {n}; i++) a[i] = s i; print "held" }}\''

pytestmark = pytest.mark.guest


def _boot(workdir: Path, device: str) -> GuestVM:
    start = time.monotonic()
    vm = GuestVM(workdir, memory="1G", devices=[device])
    print(f"\n[balloon] {device}: booted in {time.monotonic() - start:.1f} s")
    vm.check(f"mkdir -p {TMPFS} && mount -t tmpfs -o size=100% tmpfs {TMPFS}")
    return vm


class Guests:
    """The module's guests by device string, booted on first use and again when one no longer answers."""

    def __init__(self, factory: pytest.TempPathFactory) -> None:
        self.factory = factory
        self.vms: dict[str, GuestVM] = {}

    def get(self, device: str) -> GuestVM:
        vm = self.vms.get(device)
        if vm is not None and not _answers(vm):
            print(f"\n[balloon] {device}: the guest no longer answers, booting a new one")
            vm.close()
            vm = None
        if vm is None:
            vm = self.vms[device] = _boot(self.factory.mktemp("balloon"), device)
        _known_state(vm)
        return vm

    def close(self) -> None:
        for vm in self.vms.values():
            vm.close()


def _answers(vm: GuestVM) -> bool:
    if vm.process.poll() is not None:
        return False
    try:
        return vm.exec("true", timeout=60).status == 0
    except Exception:
        return False


@pytest.fixture(scope="module")
def guests(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Guests]:
    pool = Guests(tmp_path_factory)
    try:
        yield pool
    finally:
        pool.close()


@pytest.fixture
def plain_vm(guests: Guests) -> GuestVM:
    return guests.get("virtio-balloon,id=balloon0")


@pytest.fixture
def reporting_vm(guests: Guests) -> GuestVM:
    return guests.get("virtio-balloon,id=balloon0,deflate-on-oom=on,free-page-reporting=on")


def _empty_balloon(vm: GuestVM) -> None:
    """A full-size guest with nothing left on the test tmpfs."""
    vm.check(f"rm -f {TMPFS}/*")
    vm.cmd("balloon", value=RAM)
    try:
        wait_until(lambda: balloon_actual(vm) == RAM, timeout=400, interval=0.5, what="an empty balloon")
    except AssertionError as error:
        raise AssertionError(f"{error}\n{stall_report(vm, [(0.0, balloon_actual(vm))])}") from None


def _known_state(vm: GuestVM) -> None:
    """What every test starts from, whatever ran before it."""
    _empty_balloon(vm)
    vm.cmd("qom-set", path=BALLOON, property="guest-stats-polling-interval", value=0)
    vm.check("dmesg -c > /dev/null")
    assert vm.meminfo()["MemTotal"] > RAM - 128 * MiB, "the guest has not got all its memory back"


def _touch_file(vm: GuestVM, mib: int) -> int:
    """Write `mib` MiB to a tmpfs file in the guest (it holds them until removed); return what the host holds
    for the guest's RAM afterwards, which is at least those `mib` MiB whatever the host held before."""
    before = vm.host_memory()
    start = time.monotonic()
    vm.check(f"dd if=/dev/zero of={TMPFS}/f bs=1M count={mib}", timeout=600)
    held = vm.host_memory()
    print(f"[balloon] touched {mib} MiB in {time.monotonic() - start:.1f} s: host memory "
          f"{before // MiB} -> {held // MiB} MiB")  # fmt: skip
    return held


def _checksum(vm: GuestVM, path: str) -> str:
    return vm.check(f"sha256sum {path}").split()[0]


def _leave_free(vm: GuestVM, free: int) -> int:
    """Inflate the balloon until about `free` bytes of guest memory are free; return the target it was given."""
    target = (RAM - (vm.meminfo()["MemFree"] - free)) // MiB * MiB
    move_balloon(vm, target, f"inflate to {target // MiB} MiB leaving {free // MiB} MiB free")
    return target


def _oom_kills(vm: GuestVM) -> list[str]:
    return re.findall(r"Killed process \d+ \((\S+)\)", vm.check("dmesg"))


# --- scenario 1: inflate and deflate --------------------------------------------------------------------------


def test_inflate_gives_memory_to_the_host_and_deflate_gives_it_back(plain_vm: GuestVM) -> None:
    vm = plain_vm
    # Data that must survive: 64 MiB of random bytes, kept across inflate and deflate.
    vm.check(f"dd if=/dev/urandom of={TMPFS}/keep bs=1M count=64 2>/dev/null")
    kept = _checksum(vm, f"{TMPFS}/keep")
    # Touch 600M more and free it: the host keeps holding it (no free page reporting here).
    held = _touch_file(vm, 600)
    assert held >= 664 * MiB, f"after the guest wrote 664 MiB the host holds only {held // MiB} MiB for it"
    vm.check(f"rm {TMPFS}/f")
    total_before = vm.meminfo()["MemTotal"]
    host_before = vm.host_memory()

    seconds = move_balloon(vm, 512 * MiB, "inflate 1G -> 512M").seconds
    ballooned = RAM - balloon_actual(vm)
    total_inflated = vm.meminfo()["MemTotal"]
    host_inflated = vm.host_memory()
    print(f"[balloon] inflate: {ballooned / MiB / seconds:.1f} MiB/s; MemTotal {total_before // MiB} -> "
          f"{total_inflated // MiB} MiB; host memory {host_before // MiB} -> {host_inflated // MiB} MiB")  # fmt: skip
    assert abs(ballooned - 512 * MiB) <= 512 * MiB // 100
    # Without deflate-on-oom the driver takes the balloon's pages out of MemTotal, one for one.
    assert abs((total_before - total_inflated) - ballooned) <= 4 * MiB
    assert host_before - host_inflated >= 0.9 * ballooned, (
        f"the guest gave up {ballooned // MiB} MiB but the host holds only "
        f"{(host_before - host_inflated) // MiB} MiB less"
    )
    assert _checksum(vm, f"{TMPFS}/keep") == kept, "the guest's file changed while the balloon was inflated"
    # The guest can still use the memory it kept: write and read back 128 MiB more.
    vm.check(f"dd if=/dev/urandom of={TMPFS}/more bs=1M count=128 2>/dev/null")
    more = _checksum(vm, f"{TMPFS}/more")

    move_balloon(vm, RAM, "deflate 512M -> 1G")
    assert balloon_actual(vm) == RAM
    assert vm.meminfo()["MemTotal"] == total_before
    assert _checksum(vm, f"{TMPFS}/keep") == kept, "the guest's file changed across inflate and deflate"
    assert _checksum(vm, f"{TMPFS}/more") == more


# --- scenario 2: statistics -----------------------------------------------------------------------------------


def test_guest_stats_are_polled_and_agree_with_the_guest(plain_vm: GuestVM) -> None:
    vm = plain_vm
    interval = 2

    def stats() -> dict[str, object]:
        value = vm.cmd("qom-get", path=BALLOON, property="guest-stats")
        assert isinstance(value, dict)
        return value

    def age(value: dict[str, object]) -> float:
        return time.time() - float(value["last-update"])  # type: ignore[arg-type]

    def updated_since(moment: float) -> bool:
        return float(stats()["last-update"]) >= int(moment)  # type: ignore[arg-type]

    def set_interval(seconds: int) -> None:
        vm.cmd("qom-set", path=BALLOON, property="guest-stats-polling-interval", value=seconds)
        assert vm.cmd("qom-get", path=BALLOON, property="guest-stats-polling-interval") == seconds

    try:
        # Turning polling on asks the guest at once, long before the first interval has passed (as QEMU does).
        turned_on = time.time()
        set_interval(60)
        wait_until(lambda: updated_since(turned_on), timeout=30, interval=0.5,
                   what="fresh stats right after turning polling on")  # fmt: skip
        print(f"[balloon] stats: first update {time.time() - turned_on:.1f} s after turning polling on")
        # Then every interval: updates keep coming without anyone asking.
        set_interval(interval)
        since = time.time()
        wait_until(lambda: updated_since(since + 2 * interval), timeout=10 * interval, interval=0.5,
                   what=f"stats updates every {interval} s")  # fmt: skip

        # The guest's numbers move a little between the two reads: a few tries.
        for _attempt in range(5):
            value = stats()
            meminfo = vm.meminfo()
            numbers = value["stats"]
            assert isinstance(numbers, dict)
            free, mem_free = numbers["stat-free-memory"], meminfo["MemFree"]
            print(f"[balloon] stats {age(value):.1f} s old: free {free // MiB} MiB, guest MemFree "
                  f"{mem_free // MiB} MiB, total {numbers['stat-total-memory'] // MiB} MiB")  # fmt: skip
            if abs(free - mem_free) <= 0.05 * mem_free:
                break
            time.sleep(interval)
        else:
            pytest.fail(f"stat-free-memory {free} never came within 5 % of the guest's MemFree {mem_free}")
        assert abs(numbers["stat-total-memory"] - meminfo["MemTotal"]) <= 0.01 * meminfo["MemTotal"]
        assert age(value) <= 3 * interval + 2
    finally:
        vm.cmd("qom-set", path=BALLOON, property="guest-stats-polling-interval", value=0)


# --- scenario 3: deflate-on-OOM ----------------------------------------------------------------------------------


def test_deflate_on_oom_lets_the_guest_allocate_without_killing(reporting_vm: GuestVM) -> None:
    vm = reporting_vm
    target = _leave_free(vm, 100 * MiB)
    free_before = vm.meminfo()["MemFree"]
    assert free_before <= 150 * MiB  # with deflate-on-oom the balloon shows as used memory, not in MemTotal

    start = time.monotonic()
    result = vm.exec(HOLD_ANON.format(n=300), timeout=400)
    seconds = time.monotonic() - start
    actual = balloon_actual(vm)
    print(f"[balloon] deflate-on-oom: 300 MiB held in {seconds:.1f} s with {free_before // MiB} MiB free; "
          f"balloon {target // MiB} -> {actual // MiB} MiB")  # fmt: skip
    assert result.status == 0 and result.stdout == "held\n", (result.status, result.stderr)
    assert actual >= target + 150 * MiB, "the balloon did not deflate to make room"
    assert _oom_kills(vm) == []


def test_without_deflate_on_oom_the_oom_killer_acts(plain_vm: GuestVM) -> None:
    vm = plain_vm
    target = _leave_free(vm, 100 * MiB)

    result = vm.exec(HOLD_ANON.format(n=300), timeout=400)
    killed = _oom_kills(vm)
    print(f"[balloon] no deflate-on-oom: the allocator exited {result.status}; OOM-killed: {killed}")
    assert result.status == 137 and set(killed) == {"awk"}, (result.status, result.stderr, killed)
    assert abs(balloon_actual(vm) - target) <= target // 100  # the balloon stayed inflated
    assert vm.check("echo alive") == "alive\n"  # the agent survived


# --- scenario 4: free page reporting ------------------------------------------------------------------------------


def test_free_page_reporting_returns_freed_memory_without_a_host_command(reporting_vm: GuestVM) -> None:
    vm = reporting_vm
    peak = _touch_file(vm, 400)
    assert peak >= 400 * MiB, f"after the guest wrote 400 MiB the host holds only {peak // MiB} MiB for it"
    vm.check(f"rm {TMPFS}/f")
    start = time.monotonic()
    wait_until(lambda: peak - vm.host_memory() >= 300 * MiB, timeout=180, interval=0.5,
               what="the host to get 300 MiB back by free page reporting")  # fmt: skip
    print(f"[balloon] free page reporting: host memory {peak // MiB} -> {vm.host_memory() // MiB} MiB "
          f"within {time.monotonic() - start:.1f} s of the free")  # fmt: skip
    assert balloon_actual(vm) == RAM  # reporting is not ballooning
