"""FakeMachine: a `MachineControl` with realistic behaviour and no VM, for tests and for trying the CLI.

It keeps state the way the real machine would: stop/cont/quit change the run state and emit STOP, RESUME and
SHUTDOWN; the balloon moves `actual` to its target at once and emits BALLOON_CHANGE; setting a virtio-mem
`requested-size` "plugs" instantly and emits MEMORY_DEVICE_SIZE_CHANGE; guest exec runs the command on the host
with /bin/sh (the fake's stand-in for the guest agent), honouring the timeout.
"""

from __future__ import annotations

import dataclasses
import subprocess
import threading
import time
from typing import Any

from memvisor.control import events
from memvisor.control.machine_api import (
    BalloonControl,
    EventData,
    EventSink,
    ExecResult,
    HintState,
    HintStatus,
    MachineError,
    MemoryDeviceInfo,
    RunState,
    VcpuInfo,
    VirtioMemInfo,
    VirtioPmemInfo,
    guest_stats_dict,
)

GiB = 1 << 30
MiB = 1 << 20


class FakeBalloon:
    """A balloon whose guest obeys at once; `stats` can be set by tests (virtio tag -> value)."""

    def __init__(self, machine: FakeMachine, ram: int) -> None:
        self.id = "balloon0"
        self._machine = machine
        self._ram = ram
        self._actual = ram
        self._interval = 0
        self.stats: dict[int, int] = {}
        self.last_update = 0
        self.hinting_enabled = True
        self._hints: list[HintStatus] = []
        self._next_cmd_id = 0x80000000  # ids below are reserved (virtio 1.2 section 5.5.6.8)

    def set_target_bytes(self, target: int) -> None:
        changed = target != self._actual
        self._actual = target
        if changed:
            self._machine.emit(*events.balloon_change(target))

    def actual_bytes(self) -> int:
        return self._actual

    def guest_stats(self) -> dict[str, Any]:
        return guest_stats_dict(self.stats, self.last_update)

    def stats_polling_interval(self) -> int:
        return self._interval

    def set_stats_polling_interval(self, seconds: int) -> None:
        self._interval = seconds

    def hint_start(self) -> HintStatus:
        if not self.hinting_enabled:
            raise MachineError("free page hinting is off: start the balloon with free-page-hint=on")
        status = HintStatus(self._next_cmd_id, HintState.RUNNING, 0, 0)
        self._next_cmd_id += 1
        self._hints.append(status)
        return status

    def hint_stop(self) -> HintStatus:
        if not self._hints:
            raise MachineError("no free page hinting cycle to stop: start one with x-balloon-hint-start")
        last = self._hints[-1]
        pages = 1234
        stopped = dataclasses.replace(last, state=HintState.STOPPED, pages=pages, bytes=pages * 4096)
        self._hints[-1] = stopped
        return stopped

    def hint_status(self) -> list[HintStatus]:
        return list(self._hints)

    def hinted_ranges(self) -> list[tuple[int, int]]:
        return [(16 * MiB, 4 * MiB)] if self._hints else []


class FakeMachine:
    """A stand-in VM: 1 GiB (default) boot RAM, optional balloon, virtio-mem and virtio-pmem devices."""

    def __init__(
        self,
        ram: int = GiB,
        vcpus: int = 1,
        balloon: bool = True,
        virtio_mem: tuple[str, int, int] | None = ("vm0", 4 * GiB, 2 * MiB),
        pmem: tuple[str, int] | None = ("pm0", 256 * MiB),
    ) -> None:
        self._lock = threading.Lock()
        self._state = RunState.RUNNING
        self._ram = ram
        self._vcpus = [
            VcpuInfo(
                i,
                1000 + i,
                f"/machine/unattached/device[{i}]",
                {"socket-id": 0, "core-id": i, "thread-id": 0, "node-id": 0},
            )
            for i in range(vcpus)
        ]
        self._sink: EventSink | None = None
        self._balloon = FakeBalloon(self, ram) if balloon else None
        self._mem: dict[str, VirtioMemInfo] = {}
        self._pmem: dict[str, VirtioPmemInfo] = {}
        next_addr = 4 * GiB
        if virtio_mem is not None:
            name, max_size, block = virtio_mem
            self._mem[name] = VirtioMemInfo(name, next_addr, 0, 0, 0, max_size, block)
            next_addr += max_size
        if pmem is not None:
            name, size = pmem
            self._pmem[name] = VirtioPmemInfo(name, next_addr, size)
        self.calls: list[str] = []  # names of the calls made, for tests
        self.exec_delay = 0.0  # seconds guest_exec sleeps first (to test slow commands)
        self.agent_connected = True

    # events
    def set_event_sink(self, sink: EventSink | None) -> None:
        self._sink = sink

    def emit(self, name: str, data: EventData) -> None:
        sink = self._sink
        if sink is not None:
            sink(name, data)

    # run state
    def run_state(self) -> RunState:
        return self._state

    def _set_state(self, state: RunState) -> RunState:
        with self._lock:
            old, self._state = self._state, state
        return old

    def stop(self) -> None:
        self.calls.append("stop")
        if self._state is RunState.RUNNING:
            self._set_state(RunState.PAUSED)
            self.emit(*events.stop())

    def cont(self) -> None:
        self.calls.append("cont")
        if self._state in (RunState.SHUTDOWN, RunState.INTERNAL_ERROR, RunState.GUEST_PANICKED):
            raise MachineError("Resetting the Virtual Machine is required")
        if self._state is not RunState.RUNNING:
            self._set_state(RunState.RUNNING)
            self.emit(*events.resume())

    def powerdown(self) -> None:
        self.calls.append("powerdown")
        self.emit(*events.powerdown())
        # The fake guest honours the power button at once.
        self._set_state(RunState.SHUTDOWN)
        self.emit(*events.shutdown(True, "guest-shutdown"))

    def reset(self) -> None:
        self.calls.append("reset")
        self.emit(*events.reset(False, "host-qmp-system-reset"))

    def quit(self) -> None:
        self.calls.append("quit")
        self._set_state(RunState.SHUTDOWN)
        self.emit(*events.shutdown(False, "host-qmp-quit"))

    # cpus and memory
    def vcpus(self) -> list[VcpuInfo]:
        return list(self._vcpus)

    def boot_memory_bytes(self) -> int:
        return self._ram

    def balloon(self) -> BalloonControl | None:
        return self._balloon

    @property
    def fake_balloon(self) -> FakeBalloon:
        assert self._balloon is not None
        return self._balloon

    def memory_devices(self) -> list[MemoryDeviceInfo]:
        return [*self._mem.values(), *self._pmem.values()]

    def set_requested_size(self, device_id: str, size: int) -> None:
        self.calls.append("set_requested_size")
        device = self._mem.get(device_id)
        if device is None:
            raise MachineError(f"Device '{device_id}' not found", "DeviceNotFound")
        self._mem[device_id] = dataclasses.replace(device, requested_size=size, size=size)
        if size != device.size:
            self.emit(*events.memory_device_size_change(device_id, size))

    # guest agent
    def guest_exec(self, command: str, timeout: float) -> ExecResult:
        self.calls.append("guest_exec")
        if not self.agent_connected:
            raise MachineError("the guest agent is not connected: boot a memvisor guest image with its agent")
        if self.exec_delay:
            time.sleep(self.exec_delay)
        try:
            done = subprocess.run(
                ["/bin/sh", "-c", command], capture_output=True, timeout=timeout, check=False
            )
        except subprocess.TimeoutExpired as err:
            raise MachineError(f"guest command did not finish within {timeout:g} s") from err
        return ExecResult(done.returncode, done.stdout, done.stderr)

    def exit_counts(self) -> dict[str, int]:
        return {}  # the fake machine runs no vCPU

    eventfd_counts_reply: dict[str, int] | None = None  # what eventfd_counts answers (None: the fast path is off)

    def eventfd_counts(self) -> dict[str, int] | None:
        return self.eventfd_counts_reply

    def host_memory(self) -> dict[str, int]:
        # The fake host holds what the balloon leaves the guest, what is plugged, and half of each pmem file.
        held = {"ram": self._balloon.actual_bytes() if self._balloon else self._ram}
        for mem in self._mem.values():
            held[mem.id] = mem.size
        for pmem in self._pmem.values():
            held[pmem.id] = pmem.size // 2
        return held
