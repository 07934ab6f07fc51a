"""What the exit trail costs memvisor's exit path: the vCPU loop timed on fake exits, with and without it.

No KVM needed (runs anywhere):
    .venv/bin/python benchmarks/exit_trail.py [--exits 200000] [--rounds 5]

A fake vCPU over a fake kvm_run page makes `--exits` port writes to an unclaimed port (the cheapest exit
memvisor handles: what remains is the loop itself) and then a triple fault; Machine._vcpu_loop handles them,
once with KVM_CAP_SYNC_REGS "present" (the loop copies kvm_run's head and sync regs into the trail at every
exit) and once without. Prints the best and the median nanoseconds per exit of each over `--rounds` runs, and
their differences (on a loaded machine the best is the steadier number).
This is the Python side only: KVM's own cost of storing the sync regs at every exit (store_regs in
arch/x86/kvm/x86.c) is paid in the kernel and is not part of this number.
"""

import argparse
import collections
import ctypes
import os
import statistics
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

sys.path.insert(0, os.environ.get("MEMVISOR_TREE") or str(Path(__file__).resolve().parents[1]))

from memvisor.kvm import structs  # noqa: E402
from memvisor.vmm import machine as machine_module  # noqa: E402
from memvisor.vmm.console import Console  # noqa: E402
from memvisor.vmm.exit_trail import RunImage  # noqa: E402

PAGE = 4096


class _FakeVcpu:
    def __init__(self, exits: int, sync_regs: bool) -> None:
        self.index = 0
        self.buffer = (ctypes.c_uint8 * PAGE)()
        self.run_address = ctypes.addressof(self.buffer)
        image = RunImage.from_address(self.run_address)
        self.run_struct = image.run
        image.run.exit_reason = structs.KVM_EXIT_IO
        io = image.run.exit.io
        io.direction, io.size, io.port, io.count, io.data_offset = structs.KVM_EXIT_IO_OUT, 1, 0x80, 1, PAGE // 2
        self.left = exits
        self.sync_regs = sync_regs

    def enable_sync_regs(self, classes: int) -> int:
        return classes if self.sync_regs else 0

    def run(self) -> int:
        if self.run_struct.immediate_exit:
            return structs.KVM_EXIT_INTR
        self.left -= 1
        return structs.KVM_EXIT_IO if self.left >= 0 else structs.KVM_EXIT_SHUTDOWN

    def io_data(self, size: int) -> ctypes.Array:  # type: ignore[type-arg]
        return (ctypes.c_uint8 * size).from_address(self.run_address + PAGE // 2)

    def get_regs(self) -> Any:
        raise machine_module.KvmIoctlError(9, "fake vCPU")

    get_sregs = get_regs


def _time_loop(exits: int, sync_regs: bool, console_fd: int) -> float:
    """Nanoseconds per exit of Machine._vcpu_loop over `exits` port writes."""
    machine = machine_module.Machine.__new__(machine_module.Machine)
    machine._done = threading.Condition()
    machine._threads, machine._stopping, machine._pause_requested, machine._parked = [], False, False, 0
    machine._outcome, machine._outcome_listeners, machine._vcpu_states, machine._trails = None, [], {}, {}
    machine.exit_counts = collections.Counter()
    machine.ports = machine_module.PortBus()
    machine.mmio = []
    machine.agent = cast(Any, SimpleNamespace(abort=lambda message: None))
    machine.console = Console(console_fd, lambda message: None)
    vcpu = _FakeVcpu(exits, sync_regs)
    machine.vcpus = cast(Any, [vcpu])
    if sync_regs:  # what start() does, without starting a thread: the loop runs here
        machine._trails[0] = machine_module.ExitTrail(vcpu.run_address, vcpu.enable_sync_regs(7))
    started = time.perf_counter_ns()
    machine._vcpu_loop(cast(Any, vcpu))
    elapsed = time.perf_counter_ns() - started
    outcome = machine.outcome
    assert outcome is not None and outcome.reason is machine_module.StopReason.RESET
    assert ("its last exit before it" in outcome.cause) == sync_regs
    return elapsed / exits


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--exits", type=int, default=200_000, help="fake exits per timed loop")
    parser.add_argument("--rounds", type=int, default=5, help="timed loops of each kind (median reported)")
    args = parser.parse_args()
    fd = os.open(os.devnull, os.O_WRONLY)
    try:
        without, with_trail = [], []
        for _ in range(args.rounds):  # interleaved, so a change in the machine's load hits both alike
            without.append(_time_loop(args.exits, False, fd))
            with_trail.append(_time_loop(args.exits, True, fd))
    finally:
        os.close(fd)
    print(f"exits per loop: {args.exits}, rounds: {args.rounds}; nanoseconds per exit")
    for name, values in (("without the trail", without), ("with the trail", with_trail)):
        runs = ", ".join(f"{value:.0f}" for value in values)
        print(f"{name:18}: best {min(values):.0f}, median {statistics.median(values):.0f} (runs: {runs})")
    for name, pick in (("best", min), ("median", statistics.median)):
        base, trail = pick(without), pick(with_trail)
        print(f"difference ({name}): {trail - base:+.0f} ns per exit ({(trail - base) / base:+.1%})")


if __name__ == "__main__":
    main()
