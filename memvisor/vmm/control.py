"""The QMP control socket of a running machine: `MachineControl` over the VMM's `Machine`.

    server = start_control_server(machine, Path("/run/vm.qmp"))   # serving once this returns
    ...                                                            # the guest reboots: a new Machine
    server.detach(); server.attach(new_machine)                   # same socket, same clients
    server.stop()

`VmmControl` is the glue between the QMP layer (memvisor/control/, which only knows the MachineControl
protocol) and one Machine at a time:
- run state and pause: `stop`/`cont` park and release the vCPU threads (Machine.pause/resume) and emit STOP and
  RESUME; when the machine ends, an outcome listener emits SHUTDOWN (or RESET, when the session restarts the
  guest) with QEMU's `guest`/`reason` data;
- devices: the balloon through control.adapters.BalloonAdapter, virtio-mem/virtio-pmem through
  virtio_mem_info/virtio_pmem_info; the devices' own hooks give BALLOON_CHANGE and MEMORY_DEVICE_SIZE_CHANGE;
- the guest agent on COM2 runs `x-guest-exec` and powers the guest off for `system_powerdown`;
- events the guest can trigger at will are rate-limited as QEMU does (`EventThrottle`).

Every call that touches the machine holds a use count, and `detach()` waits for the calls in flight before
the session closes the machine (unmaps guest memory), so a late QMP command can never touch freed memory: it
gets a MachineError instead.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from memvisor.control import events as ev
from memvisor.control.adapters import (
    BalloonAdapter,
    DeviceEvents,
    set_mem_requested_size,
    virtio_mem_info,
    virtio_pmem_info,
)
from memvisor.control.machine_api import (
    BalloonControl,
    EventData,
    EventSink,
    ExecResult,
    MachineError,
    MemoryDeviceInfo,
    RunState,
    VcpuInfo,
)
from memvisor.control.server import QmpServer
from memvisor.devices.balloon import BalloonDevice
from memvisor.devices.mem import VirtioMemDevice
from memvisor.devices.pmem import VirtioPmemDevice
from memvisor.errors import MemvisorError
from memvisor.vmm.agent import AgentTimeout
from memvisor.vmm.machine import Machine, Outcome, StopReason

THROTTLE_PERIOD = 1.0  # seconds; QEMU monitor/monitor.c monitor_qapi_event_conf: 1000 ms for these events
# throttled event -> the data member that tells its sources apart (None: one source)
THROTTLED_EVENTS: dict[str, str | None] = {"BALLOON_CHANGE": None, "MEMORY_DEVICE_SIZE_CHANGE": "qom-path"}
PAUSE_TIMEOUT = 5.0  # seconds `stop` waits for every vCPU to park
DETACH_TIMEOUT = 10.0  # seconds `detach` waits for control calls in flight
RESTART_WAIT = 60.0  # seconds a command waits for a rebooting guest's new machine

# QAPI ShutdownCause values for the ways a machine ends (guest, reason)
_GUEST_SHUTDOWN = (True, "guest-shutdown")
_GUEST_RESET = (True, "guest-reset")
_GUEST_PANIC = (True, "guest-panic")
_HOST_QUIT = (False, "host-qmp-quit")
_HOST_RESET = (False, "host-qmp-system-reset")
_HOST_SIGNAL = (False, "host-signal")
_HOST_ERROR = (False, "host-error")


class _Window:
    """One throttled (event, source): its timer, and the latest data held back while the timer runs."""

    def __init__(self, timer: threading.Timer) -> None:
        self.timer = timer
        self.pending: EventData = None
        self.has_pending = False


class EventThrottle:
    """An EventSink that rate-limits guest-triggerable events the way QEMU's monitor does.

    The balloon driver moves `actual` in 1 MiB steps, so an unthrottled BALLOON_CHANGE floods clients (128
    events for 512M -> 384M). QEMU sends the first event of a (name, source) at once, then at most one per
    `period`: the latest data held back during a period goes out when it ends. Other events pass at once.
    """

    def __init__(self, sink: EventSink, period: float = THROTTLE_PERIOD) -> None:
        self._sink = sink
        self._period = period
        self._lock = threading.Lock()
        self._windows: dict[tuple[str, str], _Window] = {}
        self._closed = False

    def __call__(self, name: str, data: EventData) -> None:
        if name not in THROTTLED_EVENTS:
            self._sink(name, data)
            return
        member = THROTTLED_EVENTS[name]
        key = (name, str((data or {}).get(member, "")) if member else "")
        with self._lock:
            window = self._windows.get(key)
            if window is not None:
                window.pending, window.has_pending = data, True
                return
            if not self._closed:
                self._windows[key] = self._open(key)
        self._sink(name, data)

    def _open(self, key: tuple[str, str]) -> _Window:
        timer = threading.Timer(self._period, self._expire, args=(key,))
        timer.daemon = True
        timer.start()
        return _Window(timer)

    def _expire(self, key: tuple[str, str]) -> None:
        with self._lock:
            window = self._windows.pop(key, None)
            if window is None or not window.has_pending or self._closed:
                return
            data = window.pending
            self._windows[key] = self._open(key)  # what goes out now starts a new period
        self._sink(key[0], data)

    def close(self) -> None:
        """Drop what is held back and stop the timers."""
        with self._lock:
            self._closed = True
            for window in self._windows.values():
                window.timer.cancel()
            self._windows.clear()


class VmmControl:
    """`MachineControl` for the VMM's Machine; `attach` a machine before use, `detach` it before closing it."""

    def __init__(self, event_period: float = THROTTLE_PERIOD) -> None:
        self._event_period = event_period
        self._throttle: EventThrottle | None = None
        self._lock = threading.Condition()
        self._machine: Machine | None = None
        self._active = 0  # calls in flight on the attached machine
        self._state_lock = threading.Lock()  # serialises stop/cont so each state change emits one event
        self._events = DeviceEvents()
        self._balloon: BalloonAdapter | None = None
        self._host_cause: tuple[bool, str] | None = None  # why the host is ending the machine (quit, reset)
        self._restarting = False  # the machine reset and the session is building the next one

    # --- attaching machines (the session's thread) --------------------------------------------------------------

    def attach(self, machine: Machine) -> None:
        """Serve `machine` (built, not necessarily started): hook its devices' events and its end."""
        self._balloon = None
        for attached in machine.devices:
            device = attached.device
            if isinstance(device, BalloonDevice) and self._balloon is None:
                device.add_change_listener(self._events.balloon_changed)
                self._balloon = BalloonAdapter(device, attached.id, dirty_log=machine)  # hints track writes
            elif isinstance(device, VirtioMemDevice):
                device.on_size_change = self._events.mem_size_changed(attached.id)
        machine.add_outcome_listener(lambda outcome: self._on_outcome(machine, outcome))
        with self._lock:
            self._machine = machine
            self._host_cause = None
            self._restarting = False
            self._lock.notify_all()

    def detach(self, timeout: float = DETACH_TIMEOUT) -> None:
        """Stop serving the machine; wait up to `timeout` s for the calls in flight to return."""
        live = getattr(self, "_live", None)
        if live is not None and live.running:  # the machine is going: its migration ends before its memory does
            live.cancel()
            live.wait(timeout)
        with self._lock:
            self._machine = None
            self._lock.wait_for(lambda: self._active == 0, timeout)
        self._balloon = None

    def close(self) -> None:
        """No machine will come any more: commands waiting for a restart give up."""
        self.detach()
        with self._lock:
            self._restarting = False
            self._lock.notify_all()

    @contextlib.contextmanager
    def _use(self, restart_wait: float = RESTART_WAIT) -> Iterator[Machine]:
        """The attached machine, kept from being closed until the block ends; waits through a reboot."""
        with self._lock:
            self._lock.wait_for(lambda: not self._restarting, restart_wait)
            machine = self._machine
            if self._restarting:
                raise MachineError("the guest is still restarting: try again")
            if machine is None:
                raise MachineError("the guest is not running (it shut down): nothing to control")
            self._active += 1
        try:
            yield machine
        finally:
            with self._lock:
                self._active -= 1
                self._lock.notify_all()

    # --- events -------------------------------------------------------------------------------------------------

    def set_event_sink(self, sink: EventSink | None) -> None:
        if self._throttle is not None:
            self._throttle.close()
        self._throttle = EventThrottle(sink, self._event_period) if sink is not None else None
        self._events.sink = self._throttle

    def _emit(self, name: str, data: EventData) -> None:
        sink = self._events.sink
        if sink is not None:
            sink(name, data)

    def _on_outcome(self, machine: Machine, outcome: Outcome) -> None:
        """`machine` ended (called once, on the thread that ended it): SHUTDOWN, or RESET if it restarts."""
        if machine is not self._machine:
            return  # detached already: its end is no news to the clients
        cause = self._host_cause
        if outcome.reason is StopReason.POWEROFF:
            cause = _GUEST_SHUTDOWN
        elif outcome.reason is StopReason.PANIC:
            cause = _GUEST_PANIC
        elif outcome.reason is StopReason.ERROR:
            cause = _HOST_ERROR
        elif outcome.reason is StopReason.RESET:
            cause = cause or _GUEST_RESET
            if machine.config.reboot == "restart":
                with self._lock:
                    self._restarting = True  # commands now wait for the next machine
                self._emit(*ev.reset(*cause))
                return
        else:
            cause = cause or _HOST_SIGNAL
        self._emit(*ev.shutdown(*cause))

    # --- run state ----------------------------------------------------------------------------------------------

    def run_state(self) -> RunState:
        machine = self._machine
        if self._restarting:
            return RunState.PRELAUNCH  # the next machine is being built
        if machine is None:
            return RunState.SHUTDOWN
        outcome = machine.outcome
        if outcome is not None:
            if outcome.reason is StopReason.PANIC:
                return RunState.GUEST_PANICKED
            if outcome.reason is StopReason.ERROR:
                return RunState.INTERNAL_ERROR
            return RunState.SHUTDOWN
        if machine.paused:
            live = getattr(self, "_live", None)
            if live is not None and live.status == "completed" and not self._postmigrate_left:
                return RunState.POSTMIGRATE
            return RunState.PAUSED
        return RunState.RUNNING if machine.vcpu_threads() else RunState.PRELAUNCH

    def stop(self) -> None:
        """Park every vCPU (QEMU `stop`); emits STOP when the machine was running."""
        with self._use() as machine, self._state_lock:
            if machine.outcome is not None or machine.paused:
                return
            machine.pause(PAUSE_TIMEOUT)  # a vCPU busy in a device parks at its next exit
            self._emit(*ev.stop())

    # --- snapshots (memvisor/vmm/migration.py, memvisor/vmm/snapshot.py) -----------------------------------------

    def migrate(self, uri: str) -> None:
        """Save the machine to `file:PATH` in a worker thread (QEMU `migrate`); pauses it first, emitting STOP."""
        from memvisor.migration.transport import is_stream_uri
        from memvisor.vmm.migration import parse_file_uri

        if is_stream_uri(uri):
            self._migrate_live(uri)
            return
        path = parse_file_uri(uri)
        was_running = self.run_state() is RunState.RUNNING
        self.stop()
        self._migration_job().start(lambda progress: self._save_snapshot(path, progress, was_running))

    def _save_snapshot(self, path: Path, progress: Any, was_running: bool) -> Any:
        """The save; a failure leaves the guest as it was before `migrate` (running again if it ran)."""
        from memvisor.vmm.snapshot import save_snapshot

        try:
            with self._use() as machine:
                return save_snapshot(machine, path, progress)
        except BaseException:
            if was_running:
                with contextlib.suppress(MachineError):
                    self.cont()
            raise

    # --- live migration (memvisor/migration/) ----------------------------------------------------------------

    def live_job(self) -> Any:
        """The live migration job (made on first use; it keeps the parameters between migrations)."""
        if getattr(self, "_live", None) is None:
            from memvisor.migration.job import LiveMigrationJob

            self._live = LiveMigrationJob(lambda: self._events.sink)
        return self._live

    def _migrate_live(self, uri: str) -> None:
        from memvisor.migration.job import balloon_hooks

        job = self.live_job()
        with self._use() as machine:
            if machine.outcome is not None or not machine.vcpu_threads():
                raise MachineError("the guest is not running: there is nothing to migrate")
            was_running = not machine.paused
            hooks = balloon_hooks(self._balloon)
            self._postmigrate_left = False
            job.start(machine, uri, hooks, was_running, self.cont)
        self._migration = job

    def migrate_cancel(self) -> None:
        if getattr(self, "_live", None) is not None:
            self._live.cancel()

    _postmigrate_left = True  # False from a completed live migration until `cont`

    def _migration_job(self) -> Any:
        if getattr(self, "_migration", None) is None:
            from memvisor.vmm.migration import MigrationJob

            self._migration = MigrationJob(lambda: self._events.sink)
        return self._migration

    def migration_info(self) -> dict[str, Any]:
        return dict(self._migration_job().info())

    incoming: Any = None  # an IncomingSlot while `memvisor run --incoming defer` waits (memvisor/vmm/migration.py)

    def migrate_incoming(self, uri: str) -> None:
        import time

        deadline = time.monotonic() + 10.0  # a client may be quicker than the session's setting of the slot
        while self.incoming is None and time.monotonic() < deadline:
            machine = self._machine
            if machine is None or machine.vcpu_threads():
                break  # started (or gone): no incoming will ever be waited for
            time.sleep(0.05)
        slot = self.incoming
        if slot is None:
            raise MachineError("migrate-incoming is only for a machine started with --incoming defer")
        slot.migrate_incoming(uri)

    def cont(self) -> None:
        """Release the vCPUs (QEMU `cont`); emits RESUME when the machine was paused."""
        with self._use() as machine, self._state_lock:
            if machine.outcome is not None:
                raise MachineError("Resetting the Virtual Machine is required")
            if not machine.paused:
                return
            self._postmigrate_left = True
            machine.resume()
            self._emit(*ev.resume())

    def powerdown(self) -> None:
        """Ask the guest to power itself off, as QEMU's ACPI power button would.

        memvisor's machine is hardware-reduced ACPI without a Generic Event Device, so there is no power button
        to press: the guest agent on COM2 is asked to run `poweroff` instead. Like the button, this only asks;
        the guest powers off (and SHUTDOWN follows) when it gets there.
        """
        with self._use() as machine:
            if not machine.agent.ready:
                raise MachineError(
                    "the guest is not ready for a clean powerdown yet (its agent has not started): "
                    "retry once it has booted, or use quit"
                )
            self._emit(*ev.powerdown())
            machine.agent.poweroff()

    def reset(self) -> None:
        """Reset the machine; the session boots the guest again (or ends, with --reboot exit)."""
        with self._use() as machine:
            self._host_cause = _HOST_RESET
            machine.request_reset()

    def quit(self) -> None:
        """End the machine now; memvisor exits with status 0 (the QMP reply went out first)."""
        with self._use() as machine:
            self._host_cause = _HOST_QUIT
            machine.stop("quit by a QMP client")

    # --- cpus and memory ----------------------------------------------------------------------------------------

    def vcpus(self) -> list[VcpuInfo]:
        """One entry per vCPU; thread-id is the host thread id of its vCPU thread (0 before it started)."""
        with self._use() as machine:
            threads = machine.vcpu_threads()
            nodes = machine.config.numa_nodes
            # QEMU 7.2 makes one implicit NUMA node as soon as memory hotplug is on (a memory device needs
            # maxmem), and then names every vCPU's node: so node-id appears with a virtio-mem or virtio-pmem
            # device even on one node.
            hotplug = any(isinstance(a.device, (VirtioMemDevice, VirtioPmemDevice)) for a in machine.devices)
            infos = []
            for index in range(machine.config.vcpus):
                native = threads[index].native_id if index < len(threads) else None
                props = {"socket-id": index, "core-id": 0, "thread-id": 0}
                if nodes > 1 or hotplug:
                    props["node-id"] = index % nodes  # the SRAT puts vCPU i on node i % nodes
                infos.append(VcpuInfo(index, native or 0, props=props))
            return infos

    def boot_memory_bytes(self) -> int:
        with self._use() as machine:
            return machine.config.memory

    def balloon(self) -> BalloonControl | None:
        with self._use():
            return self._balloon

    def memory_devices(self) -> list[MemoryDeviceInfo]:
        with self._use() as machine:
            infos: list[MemoryDeviceInfo] = []
            for attached in machine.devices:
                if isinstance(attached.device, VirtioMemDevice):
                    infos.append(virtio_mem_info(attached.device, attached.id))
                elif isinstance(attached.device, VirtioPmemDevice):
                    infos.append(virtio_pmem_info(attached.device, attached.id))
            return infos

    def set_requested_size(self, device_id: str, size: int) -> None:
        with self._use() as machine:
            for attached in machine.devices:
                if isinstance(attached.device, VirtioMemDevice) and attached.id == device_id:
                    set_mem_requested_size(attached.device, size)
                    return
        raise MachineError(f"Device '{device_id}' not found", "DeviceNotFound")

    def host_memory(self) -> dict[str, int]:
        """Bytes the host holds per RAM region (ram0, ram1 above 4 GiB) and per device region (by device id)."""
        with self._use() as machine:
            memory = machine.memory
            held = {r.name: memory.allocated_bytes(r) for r in memory.regions if r.name.startswith("ram")}
            for attached in machine.devices:
                if attached.region is not None:
                    held[attached.id] = memory.allocated_bytes(attached.region)
            return held

    def exit_counts(self) -> dict[str, int]:
        with self._use() as machine:
            return dict(machine.exit_counts)

    def eventfd_counts(self) -> dict[str, int] | None:
        with self._use() as machine:
            events = machine.device_events
            return None if events is None else {"notifies": events.notifies, "interrupts": events.interrupts}

    # --- guest agent --------------------------------------------------------------------------------------------

    def guest_exec(self, command: str, timeout: float) -> ExecResult:
        """Run `command` with /bin/sh -c in the guest (waiting for the agent to start, within `timeout`)."""
        with self._use() as machine:
            try:
                result = machine.agent.exec(command, timeout)
            except AgentTimeout as err:
                what = "finish" if machine.agent.ready else "start the guest agent"
                raise MachineError(
                    f"the guest did not {what} within {timeout:g} s: raise the timeout argument"
                ) from err
            except MemvisorError as err:
                raise MachineError(str(err)) from err
        return ExecResult(result.status, result.stdout, result.stderr)


class VmmControlServer:
    """The QMP server of a memvisor run and the VmmControl it serves; outlives guest reboots."""

    def __init__(self, path: Path) -> None:
        self.control = VmmControl()
        self.server = QmpServer(path, self.control)

    def attach(self, machine: Machine) -> None:
        """Serve `machine` from now on (the previous one must have been detached)."""
        self.control.attach(machine)

    def detach(self) -> None:
        """Stop touching the current machine (before it is closed); clients stay connected."""
        self.control.detach()

    def stop(self) -> None:
        """Detach for good and close the socket and every connection."""
        self.control.close()
        self.server.stop()


def start_control_server(machine: Machine, path: Path) -> VmmControlServer:
    """Serve `machine` over QMP on UNIX socket `path`; accepting connections once this returns."""
    server = VmmControlServer(path)
    server.attach(machine)
    server.server.start()
    return server
