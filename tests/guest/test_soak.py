"""A guest keeps running through many rounds of resizing while it writes memory (issues 12 and 13).

Each round: the balloon inflates by 256M and deflates, then virtio-mem plugs 1G and unplugs
it (requested-size 0 -> 1G -> 0, as benchmarks/memory_vs_qemu.py does), while one memory writer per vCPU
fills and frees a tmpfs file in a loop. After every round the guest must still be the same boot (its
uptime grows, memvisor kept running, the console shows one start) with its writers alive: a reset, which
memvisor would otherwise answer by silently booting the guest again, fails the test with memvisor's reset
evidence (the cause and each vCPU's registers, memory/vmm/session.py) from its stderr. In the lab, a reset
whose page walk finds the guest's tables intact is issue 13's open one and is reported as an xfail naming it
(tests/guest/conftest.py, `known_lab_reset`; MEMVISOR_STRICT_RESETS=1 makes it a failure again).

Rounds: MEMVISOR_SOAK_ROUNDS (default 1); vCPU counts: MEMVISOR_SOAK_VCPUS (default 2, the harder case: about
6 minutes in the lab, for CI). `MEMVISOR_SOAK_ROUNDS=200 MEMVISOR_SOAK_VCPUS=1,2 memvisor lab -- pytest
tests/guest/test_soak.py` is the stress setting.
"""

import os
import time
from pathlib import Path

import pytest

from tests.guest.vm import GuestVM, wait_until

MiB = 1 << 20
GiB = 1 << 30
RAM = 1 * GiB
BALLOON_TARGET = RAM - 256 * MiB
PLUG = 1 * GiB  # what benchmarks/memory_vs_qemu.py plugged when the guest reset
ROUNDS = int(os.environ.get("MEMVISOR_SOAK_ROUNDS", "1"))
VCPU_COUNTS = [int(count) for count in os.environ.get("MEMVISOR_SOAK_VCPUS", "2").split(",")]
# One writer per vCPU: fill 64M of tmpfs (fresh pages, some of them just deflated or plugged), free it, again;
# the pause leaves the guest's own balloon and virtio-mem work some CPU.
WRITER = ("while :; do dd if=/dev/zero of=/dev/shm/fill$N bs=1M count=64 2>/dev/null; rm -f /dev/shm/fill$N; "
          "sleep 0.2; done")  # fmt: skip
DEVICES = ["virtio-balloon,id=balloon0", f"virtio-mem,id=vm0,max-size={2 * PLUG // MiB}M,requested-size=0"]
STEP_TIMEOUT = 180


def start_writers(vm: GuestVM, count: int) -> None:
    for index in range(count):
        vm.check(f"N={index} setsid sh -c '{WRITER}' </dev/null >/dev/null 2>&1 & echo started")


def writers_alive(vm: GuestVM) -> int:
    """How many writer loops run (the pattern's [w] keeps this very command out of the count)."""
    return int(vm.check("grep -l '[w]hile :; do dd' /proc/[0-9]*/cmdline 2>/dev/null | wc -l").strip())


def uptime(vm: GuestVM) -> float:
    return float(vm.check("cut -d' ' -f1 /proc/uptime", timeout=60))


def assert_same_boot(vm: GuestVM, before: float, what: str) -> float:
    now = uptime(vm)
    stderr = vm.stderr_text()
    assert vm.process.poll() is None, f"memvisor ended during {what}: {stderr}"
    assert now > before and "guest reset" not in stderr and "rebooted" not in stderr, (
        f"the guest was reset during {what} (uptime {before:.1f} -> {now:.1f} s): {stderr}"
    )
    return now


@pytest.mark.timeout(600 + ROUNDS * 300)
@pytest.mark.parametrize("vcpus", VCPU_COUNTS)
def test_resize_rounds_while_the_guest_writes_memory(tmp_path: Path, vcpus: int) -> None:
    with GuestVM(tmp_path, memory=f"{RAM // MiB}M", vcpus=vcpus, devices=DEVICES) as vm:
        start_writers(vm, vcpus)
        up = uptime(vm)
        started = time.monotonic()
        for round_ in range(1, ROUNDS + 1):
            step = time.monotonic()
            vm.cmd("balloon", value=BALLOON_TARGET)
            wait_until(lambda: vm.cmd("query-balloon")["actual"] <= BALLOON_TARGET + 4 * MiB, STEP_TIMEOUT,
                       interval=0.5, what=f"round {round_}: the balloon inflate")  # fmt: skip
            vm.cmd("balloon", value=RAM)
            wait_until(lambda: vm.cmd("query-balloon")["actual"] >= RAM - 4 * MiB, STEP_TIMEOUT,
                       interval=0.5, what=f"round {round_}: the balloon deflate")  # fmt: skip
            up = assert_same_boot(vm, up, f"round {round_}'s balloon inflate and deflate")
            balloon, step = time.monotonic() - step, time.monotonic()
            vm.cmd("qom-set", path="vm0", property="requested-size", value=PLUG)
            wait_until(lambda: vm.cmd("qom-get", path="vm0", property="size") == PLUG, STEP_TIMEOUT,
                       interval=0.5, what=f"round {round_}: the virtio-mem plug")  # fmt: skip
            vm.cmd("qom-set", path="vm0", property="requested-size", value=0)
            wait_until(lambda: vm.cmd("qom-get", path="vm0", property="size") == 0, STEP_TIMEOUT,
                       interval=0.5, what=f"round {round_}: the virtio-mem unplug")  # fmt: skip
            up = assert_same_boot(vm, up, f"round {round_}'s virtio-mem plug and unplug")
            print(f"[soak] {vcpus} vCPUs: round {round_}/{ROUNDS} done at {time.monotonic() - started:.0f} s "
                  f"(balloon {balloon:.0f} s, virtio-mem {time.monotonic() - step:.0f} s)", flush=True)  # fmt: skip
        assert writers_alive(vm) >= vcpus, vm.check("ps 2>&1 | tail -20")
        assert vm.console_text().count("memvisor-init: started") == 1
