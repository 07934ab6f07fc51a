"""VmmControl: the QMP layer's MachineControl over the VMM's Machine, without KVM.

A StubMachine stands for memvisor.vmm.machine.Machine (the attributes VmmControl uses), carrying the real
device models (balloon, virtio-mem, virtio-pmem) driven by the test drivers; Machine's own pause/resume is
tested on a Machine shell whose vCPUs are fakes that "run" until kicked.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import os
import shutil
import signal
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import pytest
from qemu.qmp import QMPClient

from memvisor.control.machine_api import MachineError, RunState, VirtioMemInfo, VirtioPmemInfo
from memvisor.devices.balloon import BalloonDevice
from memvisor.devices.balloon.testing import BalloonDriver, balloon_memory
from memvisor.devices.mem import VirtioMemDevice
from memvisor.devices.mem.protocol import RESPONSE, VIRTIO_MEM_REQ_PLUG, VIRTIO_MEM_RESP_ACK, MemRequest
from memvisor.devices.pmem import VirtioPmemDevice
from memvisor.errors import MemvisorError
from memvisor.kvm import structs
from memvisor.memory.guest_memory import GuestMemory, MemoryRegion
from memvisor.virtio.testing import VirtioDriver, attach
from memvisor.vmm import machine as machine_module
from memvisor.vmm.agent import AgentTimeout, ExecResult
from memvisor.vmm.control import EventThrottle, VmmControl, start_control_server
from memvisor.vmm.machine import Machine, Outcome, StopReason

MiB = 1 << 20
GiB = 1 << 30
MEM_GPA = 4 * GiB
PMEM_GPA = 6 * GiB

Event = tuple[str, Any]


# --- a stand-in machine --------------------------------------------------------------------------------------


class StubAgent:
    """The guest agent's host side as VmmControl uses it; `answer` decides what exec does."""

    def __init__(self) -> None:
        self.ready = True
        self.powered_off = 0
        self.commands: list[tuple[str, float | None]] = []
        self.answer: ExecResult | BaseException = ExecResult(0, b"out\n", b"")
        self.delay = 0.0

    def exec(self, command: str, timeout: float | None = None) -> ExecResult:
        self.commands.append((command, timeout))
        time.sleep(self.delay)
        if isinstance(self.answer, BaseException):
            raise self.answer
        return self.answer

    def poweroff(self) -> None:
        self.powered_off += 1


@dataclass
class StubAttached:
    id: str
    device: Any
    region: MemoryRegion | None = None
    spec: Any = None


@dataclass
class StubMachine:
    """The part of Machine that VmmControl touches, with real device models and real guest memory."""

    memory: GuestMemory
    devices: list[StubAttached]
    vcpus: int = 2
    numa_nodes: int = 1
    reboot: str = "restart"
    agent: StubAgent = field(default_factory=StubAgent)
    outcome: Outcome | None = None
    paused: bool = False
    pause_calls: int = 0
    started: bool = True
    exit_counts: dict[str, int] = field(default_factory=dict)
    device_events: Any = None  # MEMVISOR_IOEVENTFD's fast path: off

    def __post_init__(self) -> None:
        self.config = SimpleNamespace(memory=512 * MiB, vcpus=self.vcpus, numa_nodes=self.numa_nodes,
                                      reboot=self.reboot)
        self._listeners: list[Any] = []
        self._release = threading.Event()
        self._threads = [
            threading.Thread(target=self._release.wait, name=f"vcpu{i}", daemon=True) for i in range(self.vcpus)
        ]
        if self.started:
            for thread in self._threads:
                thread.start()

    def vcpu_threads(self) -> list[threading.Thread]:
        return list(self._threads) if self.started else []

    def add_outcome_listener(self, listener: Any) -> None:
        self._listeners.append(listener)

    def pause(self, timeout: float = 5.0) -> bool:
        self.pause_calls += 1
        self.paused = True
        return True

    def resume(self) -> None:
        self.paused = False

    def _finish(self, outcome: Outcome) -> None:
        if self.outcome is None:
            self.outcome = outcome
            for listener in self._listeners:
                listener(outcome)

    def request_reset(self) -> None:
        self._finish(Outcome(StopReason.RESET, "the guest rebooted"))

    def request_poweroff(self) -> None:
        self._finish(Outcome(StopReason.POWEROFF))

    def stop(self, message: str = "stopped by request") -> None:
        self._finish(Outcome(StopReason.QUIT, message))

    def close(self) -> None:
        self._release.set()


class MemDriver:
    """Just enough of Linux's virtio_mem driver: plug blocks by request."""

    def __init__(self, device: VirtioMemDevice, memory: GuestMemory) -> None:
        self.driver: VirtioDriver = attach(device, memory)

    def plug(self, addr: int, blocks: int) -> int:
        queue = self.driver.queues[0]
        queue.add_buffer([MemRequest(VIRTIO_MEM_REQ_PLUG, addr, blocks).encode()], [RESPONSE.size])
        queue.kick()
        [(_, _, data)] = queue.get_used()
        return int(RESPONSE.unpack(data)[0])


@dataclass
class Rig:
    machine: StubMachine
    control: VmmControl
    events: list[Event]
    balloon: BalloonDevice
    balloon_driver: BalloonDriver
    mem: VirtioMemDevice
    mem_driver: MemDriver


def _make_machine(tmp: Path, **options: Any) -> tuple[StubMachine, BalloonDevice, VirtioMemDevice]:
    memory = balloon_memory()  # "rings" (driver buffers) and "ram" regions
    balloon = BalloonDevice(512 * MiB, stats=False)
    mem_region = MemoryRegion.memfd(MEM_GPA, 256 * MiB, "mem-vm0")
    memory.add(mem_region)
    mem = VirtioMemDevice(mem_region, block_size=2 * MiB)
    pmem_file = tmp / "pm.img"
    pmem_file.write_bytes(b"\1" * (2 * MiB))
    pmem_region = MemoryRegion.file(PMEM_GPA, pmem_file, 2 * MiB, readonly=True, name="pmem-pm0")
    memory.add(pmem_region)
    devices = [
        StubAttached("balloon0", balloon),
        StubAttached("vm0", mem, mem_region),
        StubAttached("pm0", VirtioPmemDevice(pmem_region, readonly=True), pmem_region),
    ]
    return StubMachine(memory, devices, **options), balloon, mem


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    machine, balloon, mem = _make_machine(tmp_path)
    control = VmmControl()
    control.attach(cast(Machine, machine))
    events: list[Event] = []
    control.set_event_sink(lambda name, data: events.append((name, data)))
    balloon_driver = BalloonDriver(balloon, machine.memory)
    mem_driver = MemDriver(mem, machine.memory)
    yield Rig(machine, control, events, balloon, balloon_driver, mem, mem_driver)
    control.detach()
    machine.close()
    balloon.close()
    machine.memory.close()


# --- run state ------------------------------------------------------------------------------------------------


def test_stop_and_cont_change_state_and_emit_once(rig: Rig) -> None:
    control = rig.control
    assert control.run_state() is RunState.RUNNING
    control.stop()
    control.stop()  # already paused: no second pause, no second STOP
    assert control.run_state() is RunState.PAUSED and rig.machine.pause_calls == 1
    control.cont()
    control.cont()
    assert control.run_state() is RunState.RUNNING
    assert rig.events == [("STOP", None), ("RESUME", None)]


def test_prelaunch_until_the_vcpus_start(tmp_path: Path) -> None:
    machine, balloon, _ = _make_machine(tmp_path, started=False)
    control = VmmControl()
    control.attach(cast(Machine, machine))
    assert control.run_state() is RunState.PRELAUNCH
    assert [cpu.thread_id for cpu in control.vcpus()] == [0, 0]
    balloon.close()
    machine.memory.close()


def test_quit_stops_the_machine_and_reports_a_host_shutdown(rig: Rig) -> None:
    rig.control.quit()
    outcome = rig.machine.outcome
    assert outcome is not None and outcome.reason is StopReason.QUIT
    assert rig.events == [("SHUTDOWN", {"guest": False, "reason": "host-qmp-quit"})]
    assert rig.control.run_state() is RunState.SHUTDOWN
    with pytest.raises(MachineError, match="Resetting the Virtual Machine is required"):
        rig.control.cont()


def test_system_reset_restarts_with_a_reset_event(rig: Rig) -> None:
    rig.control.reset()
    outcome = rig.machine.outcome
    assert outcome is not None and outcome.reason is StopReason.RESET
    assert rig.events == [("RESET", {"guest": False, "reason": "host-qmp-system-reset"})]


@pytest.mark.parametrize(
    ("end", "reboot", "expected", "state"),
    [
        ("request_poweroff", "restart", ("SHUTDOWN", {"guest": True, "reason": "guest-shutdown"}), "shutdown"),
        ("request_reset", "exit", ("SHUTDOWN", {"guest": True, "reason": "guest-reset"}), "shutdown"),
        ("request_reset", "restart", ("RESET", {"guest": True, "reason": "guest-reset"}), "prelaunch"),
        ("panic", "restart", ("SHUTDOWN", {"guest": True, "reason": "guest-panic"}), "guest-panicked"),
        ("error", "restart", ("SHUTDOWN", {"guest": False, "reason": "host-error"}), "internal-error"),
        ("signal", "restart", ("SHUTDOWN", {"guest": False, "reason": "host-signal"}), "shutdown"),
    ],
)
def test_how_the_guest_ended_becomes_qemus_event(
    tmp_path: Path, end: str, reboot: str, expected: Event, state: str
) -> None:
    machine, balloon, _ = _make_machine(tmp_path, reboot=reboot)
    control = VmmControl()
    control.attach(cast(Machine, machine))
    events: list[Event] = []
    control.set_event_sink(lambda name, data: events.append((name, data)))
    if end == "panic":
        machine._finish(Outcome(StopReason.PANIC, "Kernel panic"))
    elif end == "error":
        machine._finish(Outcome(StopReason.ERROR, "vCPU 0: EFAULT"))
    elif end == "signal":
        machine.stop("stopped by signal 15")
    else:
        getattr(machine, end)()
    assert events == [expected]
    assert control.run_state() == state
    control.detach()
    machine.close()
    balloon.close()
    machine.memory.close()


def test_a_detached_machine_ending_is_not_reported(rig: Rig) -> None:
    rig.control.detach()
    rig.machine.request_poweroff()
    assert rig.events == []
    assert rig.control.run_state() is RunState.SHUTDOWN


# --- powerdown and the guest agent ----------------------------------------------------------------------------


def test_powerdown_asks_the_guest_agent(rig: Rig) -> None:
    rig.control.powerdown()
    assert rig.machine.agent.powered_off == 1
    assert rig.events == [("POWERDOWN", None)]


def test_powerdown_before_the_agent_is_up_is_refused(rig: Rig) -> None:
    rig.machine.agent.ready = False
    with pytest.raises(MachineError, match="not ready for a clean powerdown"):
        rig.control.powerdown()
    assert rig.machine.agent.powered_off == 0


def test_guest_exec_returns_the_agents_result(rig: Rig) -> None:
    rig.machine.agent.answer = ExecResult(3, b"MemTotal: 1 kB\n", b"warn\n")
    result = rig.control.guest_exec("cat /proc/meminfo", 7.5)
    assert (result.exitcode, result.stdout, result.stderr) == (3, b"MemTotal: 1 kB\n", b"warn\n")
    assert rig.machine.agent.commands == [("cat /proc/meminfo", 7.5)]


def test_guest_exec_timeout_is_a_clear_machine_error(rig: Rig) -> None:
    rig.machine.agent.answer = AgentTimeout("the guest command did not finish within 2 s: raise --timeout")
    with pytest.raises(MachineError, match="did not finish within 2 s: raise the timeout argument"):
        rig.control.guest_exec("sleep 10", 2)
    rig.machine.agent.ready = False
    with pytest.raises(MachineError, match="did not start the guest agent within 2 s"):
        rig.control.guest_exec("true", 2)


def test_guest_exec_on_a_stopped_machine_is_a_machine_error(rig: Rig) -> None:
    rig.machine.agent.answer = MemvisorError("the guest powered off")
    with pytest.raises(MachineError, match="the guest powered off"):
        rig.control.guest_exec("poweroff", 5)


# --- cpus and memory ------------------------------------------------------------------------------------------


def test_vcpus_carry_their_threads_native_ids(rig: Rig) -> None:
    cpus = rig.control.vcpus()
    assert [cpu.cpu_index for cpu in cpus] == [0, 1]
    assert [cpu.thread_id for cpu in cpus] == [t.native_id for t in rig.machine.vcpu_threads()]
    assert all(cpu.thread_id > 0 for cpu in cpus)


def test_vcpus_name_node_0_once_a_memory_device_makes_memory_hotplug_on(rig: Rig, tmp_path: Path) -> None:
    # QEMU 7.2: a memory device needs maxmem, maxmem makes one implicit NUMA node, and then every vCPU has one.
    assert [cpu.props.get("node-id") for cpu in rig.control.vcpus()] == [0, 0]
    machine, balloon, _ = _make_machine(tmp_path)
    machine.devices[:] = [attached for attached in machine.devices if attached.id == "balloon0"]
    control = VmmControl()
    control.attach(cast(Machine, machine))
    assert all("node-id" not in cpu.props for cpu in control.vcpus())
    control.detach()
    machine.close()
    balloon.close()


def test_vcpus_name_their_numa_node(tmp_path: Path) -> None:
    machine, balloon, _ = _make_machine(tmp_path, vcpus=3, numa_nodes=2)
    control = VmmControl()
    control.attach(cast(Machine, machine))
    assert [cpu.props["node-id"] for cpu in control.vcpus()] == [0, 1, 0]
    machine.close()
    balloon.close()
    machine.memory.close()


def test_balloon_is_the_real_device_and_its_changes_are_events(rig: Rig) -> None:
    balloon = rig.control.balloon()
    assert balloon is not None and balloon.id == "balloon0"
    balloon.set_target_bytes(384 * MiB)
    assert rig.balloon_driver.config()[0] == 128 * MiB // 4096  # num_pages the guest must give back
    rig.balloon_driver.set_actual(128 * MiB // 4096)
    assert balloon.actual_bytes() == 384 * MiB
    assert rig.events == [("BALLOON_CHANGE", {"actual": 384 * MiB})]


def test_memory_devices_describe_virtio_mem_and_pmem(rig: Rig) -> None:
    devices = rig.control.memory_devices()
    assert devices == [
        VirtioMemInfo("vm0", MEM_GPA, 0, 0, 0, 256 * MiB, 2 * MiB),
        VirtioPmemInfo("pm0", PMEM_GPA, 2 * MiB),
    ]


def test_requested_size_and_the_size_change_event(rig: Rig) -> None:
    rig.control.set_requested_size("vm0", 8 * MiB)
    assert rig.mem.requested_size == 8 * MiB
    assert rig.events == []  # nothing plugged yet
    assert rig.mem_driver.plug(MEM_GPA, 4) == VIRTIO_MEM_RESP_ACK
    assert rig.events == [
        ("MEMORY_DEVICE_SIZE_CHANGE", {"id": "vm0", "size": 8 * MiB, "qom-path": "/machine/peripheral/vm0"})
    ]
    [info, _] = rig.control.memory_devices()
    assert isinstance(info, VirtioMemInfo) and info.size == 8 * MiB


def test_requested_size_of_an_unknown_or_wrong_device(rig: Rig) -> None:
    for name in ("nope", "pm0", "balloon0"):
        with pytest.raises(MachineError, match=f"Device '{name}' not found") as err:
            rig.control.set_requested_size(name, 2 * MiB)
        assert err.value.error_class == "DeviceNotFound"
    with pytest.raises(MemvisorError, match="requested"):  # mapped to QMP once, by the server
        rig.control.set_requested_size("vm0", 3 * MiB)  # not a multiple of the block size


def test_host_memory_counts_allocated_blocks_per_region(rig: Rig) -> None:
    before = rig.control.host_memory()
    assert list(before) == ["ram", "vm0", "pm0"]
    region = rig.machine.memory.region_at(MEM_GPA)
    assert region.fd is not None
    os.pwrite(region.fd, b"x" * (4 * MiB), 0)  # the host backs 4 MiB (unplugged memory is not the guest's to touch)
    after = rig.control.host_memory()
    assert after["vm0"] - before["vm0"] == 4 * MiB
    assert after["ram"] == before["ram"]


# --- event throttling -----------------------------------------------------------------------------------------


def _wait_for(condition: Any, timeout: float = 3.0) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def _size_change(device_id: str, size: int) -> tuple[str, dict[str, Any]]:
    return "MEMORY_DEVICE_SIZE_CHANGE", {"id": device_id, "size": size, "qom-path": f"/machine/peripheral/{device_id}"}


def test_throttle_sends_the_first_at_once_and_the_latest_after_the_period() -> None:
    seen: list[Event] = []
    throttle = EventThrottle(lambda name, data: seen.append((name, data)), period=0.2)
    for actual in range(1, 11):
        throttle("BALLOON_CHANGE", {"actual": actual})
    assert seen == [("BALLOON_CHANGE", {"actual": 1})]
    assert _wait_for(lambda: len(seen) == 2)
    assert seen[1] == ("BALLOON_CHANGE", {"actual": 10})
    time.sleep(0.5)  # the period after the held-back event passes with nothing new
    assert len(seen) == 2
    throttle("BALLOON_CHANGE", {"actual": 11})
    assert seen[-1] == ("BALLOON_CHANGE", {"actual": 11})  # a quiet period: at once again
    throttle.close()


def test_throttle_keeps_sources_apart_and_lets_other_events_through() -> None:
    seen: list[Event] = []
    throttle = EventThrottle(lambda name, data: seen.append((name, data)), period=0.2)
    throttle(*_size_change("vm0", 2 * MiB))
    throttle(*_size_change("vm0", 4 * MiB))
    throttle(*_size_change("vm1", 2 * MiB))  # another device: its own period
    throttle("STOP", None)
    throttle("SHUTDOWN", {"guest": False, "reason": "host-qmp-quit"})
    assert seen == [
        _size_change("vm0", 2 * MiB),
        _size_change("vm1", 2 * MiB),
        ("STOP", None),
        ("SHUTDOWN", {"guest": False, "reason": "host-qmp-quit"}),
    ]
    assert _wait_for(lambda: len(seen) == 5)
    assert seen[4] == _size_change("vm0", 4 * MiB)
    throttle.close()


def test_throttle_close_drops_what_is_held_back() -> None:
    seen: list[Event] = []
    throttle = EventThrottle(lambda name, data: seen.append((name, data)), period=0.1)
    throttle("BALLOON_CHANGE", {"actual": 1})
    throttle("BALLOON_CHANGE", {"actual": 2})
    throttle.close()
    time.sleep(0.3)
    assert seen == [("BALLOON_CHANGE", {"actual": 1})]


def test_control_throttles_balloon_changes_from_the_device(rig: Rig) -> None:
    balloon = rig.control.balloon()
    assert balloon is not None
    balloon.set_target_bytes(500 * MiB)
    for mib in range(1, 13):  # the Linux driver reports its progress in 1 MiB steps
        rig.balloon_driver.set_actual(mib * MiB // 4096)
    assert rig.events == [("BALLOON_CHANGE", {"actual": 511 * MiB})]
    assert _wait_for(lambda: len(rig.events) == 2, timeout=3)
    assert rig.events[1] == ("BALLOON_CHANGE", {"actual": 500 * MiB})


# --- detaching ------------------------------------------------------------------------------------------------


def test_calls_after_detach_are_refused(rig: Rig) -> None:
    rig.control.detach()
    for call in (rig.control.stop, rig.control.quit, rig.control.memory_devices, rig.control.host_memory):
        with pytest.raises(MachineError, match="not running"):
            call()


def test_detach_waits_for_a_call_in_flight(rig: Rig) -> None:
    entered, release = threading.Event(), threading.Event()
    answer = ExecResult(0, b"from the call in flight\n", b"")

    def exec_in_flight(command: str, timeout: float | None = None) -> ExecResult:
        entered.set()
        assert release.wait(5)
        return answer

    rig.machine.agent.exec = exec_in_flight  # type: ignore[method-assign]
    results: list[Any] = []
    worker = threading.Thread(target=lambda: results.append(rig.control.guest_exec("true", 5)))
    worker.start()
    assert entered.wait(5)  # the call is in flight now, inside the machine
    detacher = threading.Thread(target=rig.control.detach)
    detacher.start()
    detacher.join(timeout=0.2)
    assert detacher.is_alive(), "detach returned while a call was still using the machine"
    release.set()
    detacher.join(timeout=5)
    worker.join(timeout=5)
    assert not detacher.is_alive() and [result.stdout for result in results] == [answer.stdout]


def test_commands_during_a_reboot_wait_for_the_next_machine(rig: Rig, tmp_path: Path) -> None:
    rig.control.reset()
    assert rig.control.run_state() is RunState.PRELAUNCH
    answers: list[Any] = []
    worker = threading.Thread(target=lambda: answers.append(rig.control.vcpus()))
    worker.start()
    worker.join(timeout=0.2)
    assert worker.is_alive() and answers == []  # waiting, not touching the old machine
    rig.control.detach()
    (tmp_path / "next").mkdir()
    machine, balloon, _ = _make_machine(tmp_path / "next", vcpus=3)  # told apart from the old one (2 vCPUs)
    rig.control.attach(cast(Machine, machine))
    worker.join(timeout=5)
    assert [cpu.cpu_index for cpu in answers[0]] == [0, 1, 2]  # the next machine answered
    assert rig.control.run_state() is RunState.RUNNING
    rig.control.detach()
    machine.close()
    balloon.close()
    machine.memory.close()


def test_closing_releases_commands_waiting_for_a_reboot(rig: Rig) -> None:
    rig.control.reset()
    errors: list[BaseException] = []

    def call() -> None:
        try:
            rig.control.vcpus()
        except MachineError as err:
            errors.append(err)

    worker = threading.Thread(target=call)
    worker.start()
    worker.join(timeout=0.2)
    assert worker.is_alive() and errors == []  # waiting for the next machine, not refused
    rig.control.close()
    worker.join(timeout=5)
    assert len(errors) == 1 and "shut down" in str(errors[0])
    assert rig.control.run_state() is RunState.SHUTDOWN


# --- through the QMP socket -----------------------------------------------------------------------------------


async def _session(path: str, machine: StubMachine) -> dict[str, Any]:
    client = QMPClient("vmm-control")
    seen: dict[str, Any] = {}
    with client.listener() as listener:
        await client.connect(path)
        seen["status"] = await client.execute("query-status")
        await client.execute("stop")
        seen["paused"] = await client.execute("query-status")
        seen["cpus"] = await client.execute("query-cpus-fast")
        seen["host"] = await client.execute("x-query-host-memory")
        seen["exec"] = await client.execute("x-guest-exec", {"command": "cat /proc/meminfo"})
        seen["quit"] = await client.execute("quit")
        names = []
        async for event in listener:
            names.append((event["event"], event.get("data")))
            if event["event"] == "SHUTDOWN":
                break
        seen["events"] = names
    await client.disconnect()
    return seen


def test_served_over_qmp(tmp_path: Path) -> None:
    machine, balloon, _ = _make_machine(tmp_path)
    directory = tempfile.mkdtemp(prefix="vmmctl-", dir="/tmp")  # short: UNIX socket paths are limited
    path = Path(directory) / "q.sock"
    server = start_control_server(cast(Machine, machine), path)
    try:
        seen = asyncio.run(asyncio.wait_for(_session(str(path), machine), 10))
    finally:
        server.stop()
        machine.close()
        balloon.close()
        machine.memory.close()
        shutil.rmtree(directory, ignore_errors=True)
    assert seen["status"]["status"] == "running" and seen["paused"]["status"] == "paused"
    assert [cpu["thread-id"] for cpu in seen["cpus"]] == [t.native_id for t in machine.vcpu_threads()]
    assert {region["name"] for region in seen["host"]["regions"]} == {"ram", "vm0", "pm0"}
    assert seen["exec"]["exitcode"] == 0
    assert seen["quit"] == {}
    assert seen["events"] == [("STOP", None), ("SHUTDOWN", {"guest": False, "reason": "host-qmp-quit"})]
    assert machine.outcome is not None and machine.outcome.reason is StopReason.QUIT
    assert not path.exists()


# --- Machine.pause / resume with fake vCPUs -------------------------------------------------------------------


class FakeVcpu:
    """Runs "guest code" (sleeps 1 ms, exits as HLT) until immediate_exit is set, then exits with INTR."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.run_struct = SimpleNamespace(immediate_exit=0, exit=None)
        self.runs = 0
        self.kvmclock_signals = 0

    def enable_sync_regs(self, classes: int) -> int:
        return 0  # no KVM_CAP_SYNC_REGS: the machine keeps no exit trail

    def kvmclock_ctrl(self) -> bool:
        """Machine.pause tells KVM each parked vCPU was stopped (KVM_KVMCLOCK_CTRL)."""
        self.kvmclock_signals += 1
        return True

    def run(self) -> int:
        self.runs += 1
        if self.run_struct.immediate_exit:
            return structs.KVM_EXIT_INTR
        time.sleep(0.0005)
        return structs.KVM_EXIT_HLT


def _machine_shell(vcpus: int) -> Machine:
    """A Machine without KVM: the attributes the vCPU loop, pause and ending use, and fake vCPUs."""
    machine = Machine.__new__(Machine)
    machine._done = threading.Condition()
    machine._threads = []
    machine._stopping = False
    machine._pause_requested = False
    machine._held = False
    machine._parked = 0
    machine._outcome = None
    machine._outcome_listeners = []
    machine._trails, machine._before_first_run = {}, []
    machine.exit_counts = collections.Counter()
    machine.ports = machine_module.PortBus()
    machine.mmio = []
    machine.agent = cast(Any, SimpleNamespace(abort=lambda message: None))
    machine.vcpus = cast(Any, [FakeVcpu(i) for i in range(vcpus)])
    return machine


@pytest.fixture
def shell() -> Iterator[Machine]:
    previous = signal.getsignal(machine_module.KICK_SIGNAL)
    machine = _machine_shell(2)
    machine.start()
    yield machine
    machine.stop("test over")
    machine.wait(timeout=5)
    signal.signal(machine_module.KICK_SIGNAL, previous)


def _runs(machine: Machine) -> list[int]:
    return [cast(FakeVcpu, vcpu).runs for vcpu in machine.vcpus]


def test_machine_pause_parks_every_vcpu_and_resume_releases_them(shell: Machine) -> None:
    for _ in range(3):  # pause and resume again: no kick may be lost
        assert shell.pause(timeout=2)
        assert shell.paused and shell._parked == 2
        assert all(vcpu.kvmclock_signals for vcpu in shell.vcpus)  # type: ignore[attr-defined]
        frozen = _runs(shell)
        time.sleep(0.05)
        assert _runs(shell) == frozen  # parked vCPUs do not enter KVM_RUN
        shell.resume()
        time.sleep(0.05)
        assert not shell.paused
        assert all(after > before for after, before in zip(_runs(shell), frozen, strict=True))


def test_a_migration_throttle_parks_the_vcpus_yet_the_machine_reads_running(shell: Machine) -> None:
    """Auto-converge-like throttling holds the vCPUs part of the time, but the guest is not paused: query-status
    says running (as QEMU's during a throttled migration); a `stop` in a held slice still stops it for good."""
    from memvisor.control.commands import Context, execute
    from memvisor.migration.throttle import Throttle

    shell.devices = []
    control = VmmControl()
    control.attach(shell)
    throttle = Throttle(shell, period=0.05)
    for number in range(4, 12):  # eight passes that did not converge: held 90 % of each 50 ms
        throttle.after_pass(number, converged=False)
    try:
        assert _wait_for(lambda: shell._parked == 2)  # inside a held slice
        assert control.run_state() is RunState.RUNNING
        assert execute(Context(control, lambda name, data: None), "query-status", {})["status"] == "running"
        control.stop()  # the user stops the guest during a held slice
        throttle.stop()
        frozen = _runs(shell)
        time.sleep(0.05)
        assert control.run_state() is RunState.PAUSED and _runs(shell) == frozen
        control.cont()
        assert _wait_for(lambda: _runs(shell) != frozen)
    finally:
        throttle.stop()
        control.detach()


def test_machine_stop_while_paused_ends_the_vcpu_threads(shell: Machine) -> None:
    ended: list[Outcome] = []
    shell.add_outcome_listener(ended.append)
    assert shell.pause(timeout=2)
    shell.stop("quit")
    outcome = shell.wait(timeout=5)
    assert outcome is not None and outcome.reason is StopReason.QUIT
    assert ended == [outcome]
    assert not any(thread.is_alive() for thread in shell.vcpu_threads())


def test_machine_paused_before_start_parks_at_once() -> None:
    previous = signal.getsignal(machine_module.KICK_SIGNAL)
    machine = _machine_shell(1)
    try:
        assert machine.pause(timeout=1)  # no threads yet
        machine.start()
        assert _wait_for(lambda: machine._parked == 1)  # the vCPU thread ran, and parked at once
        assert _runs(machine) == [0]
        machine.resume()
        deadline = time.monotonic() + 2
        while _runs(machine) == [0] and time.monotonic() < deadline:
            time.sleep(0.01)
        assert _runs(machine)[0] > 0
    finally:
        machine.stop("test over")
        machine.wait(timeout=5)
        with contextlib.suppress(Exception):
            signal.signal(machine_module.KICK_SIGNAL, previous)



def test_eventfd_counts_come_from_the_fast_path_when_it_is_on(rig: Rig) -> None:
    assert rig.control.eventfd_counts() is None  # off: MEMVISOR_IOEVENTFD unset
    rig.machine.device_events = SimpleNamespace(notifies=7, interrupts=9)
    assert rig.control.eventfd_counts() == {"notifies": 7, "interrupts": 9}
