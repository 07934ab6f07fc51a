"""One `memvisor run` on this host's KVM: build the machine, boot it, serve it, end it.

Exit statuses: with --exec, the command's own status; otherwise 0 when the guest powers off (or reboots
with --reboot exit, or `quit` arrives); 125 for memvisor's failures and guest panics.
"""

import argparse
import contextlib
import faulthandler
import os
import signal
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING

from memvisor.errors import MemvisorError
from memvisor.vmm.config import MachineConfig
from memvisor.vmm.machine import Machine, Outcome, StopReason, open_console

if TYPE_CHECKING:
    from memvisor.vmm.control import VmmControlServer

BOOT_TIMEOUT = 300.0
DUMP_SIGNAL = signal.SIGUSR2
POWEROFF_TIMEOUT = 30.0


def _tail(path: Path | None, lines: int = 5) -> str:
    if path is None:
        return ""
    try:
        text = path.read_bytes().decode(errors="replace").strip().splitlines()
    except OSError:
        return ""
    shown = " | ".join(line.strip() for line in text[-lines:] if line.strip())
    return f" (console {path}: ... {shown})" if shown else f" (console log: {path})"


def build_machine(config: MachineConfig, console_fd: int, incoming: Path | None = None, *, boot: bool = True) -> Machine:
    """Build and load the machine: boot it from its kernel, or restore the snapshot `incoming` into it (or, with
    `boot` False and no `incoming`, neither: --incoming defer loads it later)."""
    from memvisor.vmm.devices import attach_devices

    machine = Machine(config, console_fd)
    try:
        attach_devices(machine)
        if incoming is None:
            if boot:
                machine.load()
        else:
            from memvisor.vmm.snapshot import restore_snapshot

            restore_snapshot(machine, incoming)
    except BaseException:
        machine.close()
        raise
    return machine


def _console_target(config: MachineConfig, exec_mode: bool) -> Path | None:
    if config.console_path is not None:
        return config.console_path
    if exec_mode:
        import tempfile

        return Path(tempfile.gettempdir()) / f"memvisor-console-{os.getpid()}.log"
    return None


def run_session(config: MachineConfig, args: argparse.Namespace) -> int:
    """Serve the machine until it ends; SIGTERM/SIGINT stop it, say so and exit 128 + the signal number."""
    interrupted: list[int] = []
    try:
        status = _serve(config, args, interrupted)
    except MemvisorError:
        if not interrupted:
            raise
        status = 0  # the error is only the signal's consequence (a command cut short)
    if interrupted:
        what = f"running `{args.command}` in the guest" if args.command is not None else "running the guest"
        print(f"memvisor: {signal.Signals(interrupted[0]).name} while {what}: stopped the guest",
              file=sys.stderr)  # fmt: skip
        return 128 + interrupted[0]
    return status


def _serve(config: MachineConfig, args: argparse.Namespace, interrupted: list[int]) -> int:
    console_path = _console_target(config, args.command is not None)
    console_fd = open_console(console_path)
    stop_requested = threading.Event()
    current: list[Machine] = []

    def on_signal(signum: int, frame: object) -> None:
        interrupted.append(signum)
        stop_requested.set()
        for machine in current:
            machine.stop(f"stopped by {signal.Signals(signum).name}")

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    # SIGUSR2: every thread's Python stack to stderr (a hung memvisor explains itself; SIGUSR1 kicks vCPUs).
    faulthandler.register(DUMP_SIGNAL, all_threads=True, chain=False)
    server: VmmControlServer | None = None
    deferred = getattr(args, "incoming", None) == "defer"
    if deferred and args.qmp is None:
        raise MemvisorError("--incoming defer waits for QMP migrate-incoming: give --qmp SOCK too")
    live_uri = _live_uri(getattr(args, "incoming", None))  # tcp:/unix: (memvisor/migration/incoming.py)
    incoming = None if deferred or live_uri else _incoming_path(getattr(args, "incoming", None))
    try:
        while True:
            machine = build_machine(config, console_fd, incoming, boot=not (deferred or live_uri))
            restoring = incoming is not None
            incoming = None  # a reboot after a restore boots afresh
            current[:] = [machine]
            try:
                if args.qmp is not None and server is None:
                    from memvisor.vmm.control import start_control_server

                    server = start_control_server(machine, args.qmp)
                elif server is not None:
                    server.attach(machine)  # a rebooted guest keeps its QMP socket and clients
                restored = restoring
                if live_uri is not None:
                    from memvisor.migration.incoming import receive_live

                    restored = receive_live(machine, live_uri, stop_requested.is_set)
                    live_uri = None
                if deferred and server is not None:
                    deferred = False
                    restored = _wait_for_incoming(machine, server)
                machine.start()
                if restored:
                    from memvisor.vmm.snapshot import correct_guest_clock

                    correct_guest_clock(machine)
                if args.command is not None:
                    return _exec_and_poweroff(machine, args.command, args.timeout, console_path)
                _forward_stdin(machine)
                outcome = machine.wait()
                assert outcome is not None
                if outcome.reason is StopReason.RESET and config.reboot == "restart" and not stop_requested.is_set():
                    print("memvisor: the guest rebooted; restarting it", file=sys.stderr)
                    continue
                return _status_of(outcome, console_path)
            finally:
                machine.stop("memvisor is ending")
                machine.wait(timeout=5)
                _report_reset(machine, console_fd)
                if server is not None:
                    server.detach()  # after the machine's last event, before its memory goes
                machine.close()
    finally:
        if server is not None:
            server.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if console_fd > 2:
            os.close(console_fd)
        if console_path is not None and config.console_path is None and sys.exc_info()[0] is None:
            with contextlib.suppress(OSError):
                console_path.unlink()  # our own temporary log: kept only when an error names it


def _report_reset(machine: Machine, console_fd: int) -> None:
    """A reset or an error leaves evidence: its cause and each vCPU's registers, on stderr and in the console."""
    outcome = machine.outcome
    if outcome is None or outcome.reason not in (StopReason.RESET, StopReason.ERROR):
        return
    what = f"the guest reset: {outcome.cause}" if outcome.reason is StopReason.RESET else outcome.message
    lines = [f"memvisor: {what}", *(f"memvisor:   {state}" for state in machine.vcpu_states())]
    lines += [f"memvisor:   {line}" for line in outcome.page_walk]  # a triple fault: the tables as they read now
    text = "\n".join(lines) + "\n"
    tail = ""
    if outcome.console_tail:  # a triple fault: what the guest printed last (the console file has it already)
        tail = "memvisor:   the guest console's last lines before it:\n"
        tail += "".join(f"memvisor:   | {line}\n" for line in outcome.console_tail)
    sys.stderr.write(text + tail)
    sys.stderr.flush()
    if console_fd > 2:
        with contextlib.suppress(OSError):
            os.write(console_fd, b"\r\n" + text.encode())


def _wait_for_incoming(machine: Machine, server: "VmmControlServer") -> bool:
    """--incoming defer: wait for QMP migrate-incoming to restore the machine (or for the machine to end)."""
    from memvisor.vmm.migration import IncomingSlot

    def load(path: Path) -> None:
        from memvisor.vmm.snapshot import restore_snapshot  # heavy: imported once the command is here

        restore_snapshot(machine, path)

    from memvisor.migration.incoming import deferred_listen

    slot = IncomingSlot(load, deferred_listen(machine, lambda: machine.outcome is not None))
    server.control.incoming = slot
    try:
        loaded = slot.wait(lambda: machine.outcome is not None)
    finally:
        server.control.incoming = None
    if slot.error is not None:
        raise MemvisorError(f"the incoming migration failed: {slot.error}")
    return loaded


def _live_uri(uri: str | None) -> str | None:
    """--incoming tcp:HOST:PORT or unix:PATH (a live migration), else None."""
    return uri if uri is not None and uri.startswith(("tcp:", "unix:")) else None


def _incoming_path(uri: str | None) -> Path | None:
    """The snapshot of `--incoming file:PATH`, None without --incoming."""
    if uri is None:
        return None
    if not uri.startswith("file:") or len(uri) == len("file:"):
        raise MemvisorError(f"--incoming {uri}: give --incoming file:PATH, tcp:HOST:PORT, unix:PATH or defer")
    return Path(uri[len("file:") :])


def _status_of(outcome: Outcome, console_path: Path | None) -> int:
    if outcome.reason in (StopReason.POWEROFF, StopReason.QUIT, StopReason.RESET):
        return 0
    if outcome.reason is StopReason.PANIC:
        raise MemvisorError(f"guest kernel panic: {outcome.message}{_tail(console_path)}")
    raise MemvisorError(f"the guest stopped: {outcome.message}{_tail(console_path)}")


def _exec_and_poweroff(machine: Machine, command: str, timeout: float | None, console_path: Path | None) -> int:
    try:
        machine.agent.wait_ready(BOOT_TIMEOUT)
        result = machine.agent.exec(command, timeout)
    except MemvisorError as error:
        outcome = machine.wait(timeout=0)
        if outcome is not None and outcome.reason in (StopReason.POWEROFF, StopReason.RESET):
            # The command itself powered the guest off or rebooted it: not a failure, but no status either.
            verb = "powered off" if outcome.reason is StopReason.POWEROFF else "rebooted"
            print(f"memvisor: the guest {verb} before the command finished", file=sys.stderr)
            return 0
        raise MemvisorError(f"{error}{_tail(console_path)}") from None
    sys.stdout.buffer.write(result.stdout)
    sys.stdout.buffer.flush()
    sys.stderr.buffer.write(result.stderr)
    sys.stderr.buffer.flush()
    machine.agent.poweroff()
    if machine.wait(POWEROFF_TIMEOUT) is None:
        machine.stop("the guest did not power off in time")
    return result.status


def _forward_stdin(machine: Machine) -> None:
    """Console input: what the user types goes to the guest's COM1 (a daemon thread)."""
    if sys.stdin is None or sys.stdin.closed:
        return

    def pump() -> None:
        try:
            fd = sys.stdin.fileno()
            while True:
                data = os.read(fd, 4096)
                if not data:
                    return
                machine.com1.feed(data.replace(b"\n", b"\r"))
        except (OSError, ValueError):
            return

    threading.Thread(target=pump, name="stdin", daemon=True).start()
