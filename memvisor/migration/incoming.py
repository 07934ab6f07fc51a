"""The destination of a live migration: receive the stream into a machine built and never started.

    state = receive_migration(machine, conn)   # then machine.start()

Everything from the socket is untrusted: the stream's header and each record are checked (stream.py), CONFIG
must match this machine's command line (refused with an ACK naming the difference, before any RAM moves),
each page range must lie inside one migrated RAM region and inside plugged memory, PLUGGED and STATE go
through the snapshot state types and their validation (memvisor/snapshot/codec.py, vmm/snapshot.py). Any
failure raises StreamError (or StateError) naming the record and field; the caller ends memvisor with 125.
"""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from memvisor.errors import MemvisorError
from memvisor.migration import stream
from memvisor.migration.stream import PAGE_SIZE, StreamError
from memvisor.migration.transport import accept, listen, parse_uri

if TYPE_CHECKING:
    from memvisor.memory.guest_memory import MemoryRegion
    from memvisor.vmm.machine import Machine
    from memvisor.vmm.snapshot import MachineState

Progress = Callable[[int], None]  # bytes received so far


def check_config(config: dict[str, Any], machine: Machine) -> None:
    """CONFIG against this machine; StreamError naming the option to give."""
    from memvisor.migration.source import machine_config

    mine = machine_config(machine)
    hints = {"memory": lambda v: f"--memory {int(v) >> 20}M", "vcpus": lambda v: f"--vcpus {v}",
             "numa_nodes": lambda v: f"--numa-nodes {v}",
             "devices": lambda v: " ".join(f"--device {d}" for d in v) or "no --device",
             "regions": lambda v: "the same --memory and devices", "page_size": lambda v: f"{v}-byte pages"}  # fmt: skip
    for key in ("memory", "vcpus", "numa_nodes", "devices", "regions", "page_size"):
        if key not in config:
            raise StreamError(f"CONFIG.{key}: missing")
        theirs = config[key]
        if theirs != mine[key]:
            try:
                fix = hints[key](theirs)
            except (TypeError, ValueError):
                fix = "the source's configuration"
            raise StreamError(f"CONFIG.{key}: the source has {theirs!r}, this command line {mine[key]!r}: "
                              f"start the destination with {fix}")  # fmt: skip


def write_pages(region: MemoryRegion, offset: int, data: memoryview, gpa: int) -> None:
    """Put `data` at `offset` of `region`: pwrite(2) to its memfd where it has one of 4 KiB pages, else through
    the mapping. Into memory never touched (all of it, on a fresh destination) pwrite is about 3x faster than a
    store through the mapping, which faults in every page on its own (dev host, 1 GiB in 1 MiB writes: 0.53 s
    against 1.54 s); hugetlbfs files cannot be written with pwrite. The mapping is MAP_SHARED of that file at
    offset 0: the guest sees the same pages."""
    if region.fd is None or region.page_size != PAGE_SIZE:
        region.view[offset : offset + len(data)] = data
        return
    done = 0
    try:
        while done < len(data):
            done += os.pwrite(region.fd, data[done:], offset + done)
    except OSError as error:
        raise StreamError(f"PAGES: cannot write {gpa:#x}+{len(data):#x}: {error.strerror}") from None


class Receiver:
    """Applies records to the machine's memory and devices."""

    def __init__(self, machine: Machine, progress: Progress | None = None) -> None:
        from memvisor.vmm.snapshot import saved_regions

        self.machine = machine
        self.regions = saved_regions(machine)
        self.progress = progress
        self.received = 0

    def _region(self, record: stream.Record, gpa: int, count: int) -> tuple[MemoryRegion, int]:
        length = count * PAGE_SIZE
        for region in self.regions:
            if region.gpa <= gpa and gpa + length <= region.gpa + region.size:
                offset = gpa - region.gpa
                accessible = region.accessible
                if record.type == stream.PAGES and accessible is not None and not accessible(offset, length):
                    raise StreamError(f"{record.name}.gpa: {gpa:#x}+{length:#x} lies in unplugged virtio-mem memory "
                                      f"of {region.name!r} (no PLUGGED record made it accessible)")  # fmt: skip
                return region, offset
        raise StreamError(f"{record.name}.gpa: {gpa:#x}+{length:#x} is not inside one migrated RAM region")

    def pages(self, record: stream.Record) -> None:
        gpa, count, data = stream.parse_range(record)
        region, offset = self._region(record, gpa, count)
        if record.type == stream.PAGES:
            write_pages(region, offset, data, gpa)
        else:
            try:
                region.discard(offset, count * PAGE_SIZE, "migration-zero")
            except OSError as error:
                raise StreamError(f"ZERO: cannot clear {gpa:#x}+{count * PAGE_SIZE:#x}: {error.strerror}") from None

    def plugged(self, record: stream.Record) -> None:
        from memvisor.devices.mem.device import VirtioMemDevice
        from memvisor.devices.mem.state import MemState, check_mem, restore_mem
        from memvisor.snapshot.codec import decode

        value = stream.parse_json(record)
        entries = value.get("devices")
        if not isinstance(entries, list):
            raise StreamError("PLUGGED.devices: not a list")
        devices = {a.id: a.device for a in self.machine.devices if isinstance(a.device, VirtioMemDevice)}
        for position, entry in enumerate(entries):
            where = f"PLUGGED.devices[{position}]"
            if not isinstance(entry, dict) or not isinstance(entry.get("id"), str):
                raise StreamError(f"{where}.id: missing or not a string")
            device = devices.get(entry["id"])
            if device is None:
                raise StreamError(f"{where}.id: {entry['id']!r} is not a virtio-mem device of this machine")
            state = decode(MemState, entry.get("state"), f"{where}.state")
            check_mem(device, state, f"{where}.state")
            restore_mem(device, state)

    def state(self, record: stream.Record) -> MachineState:
        from memvisor.snapshot.codec import decode
        from memvisor.vmm.snapshot import MachineState, _check_devices, check_fits

        state = decode(MachineState, stream.parse_json(record), "machine")
        check_fits(state, self.machine)
        _check_devices(self.machine, state)
        return state


def _ack(conn: socket.socket, error: str | None = None) -> None:
    reply = {"ok": True} if error is None else {"ok": False, "error": error}
    conn.sendall(stream.json_record(stream.ACK, reply))


def receive_migration(machine: Machine, conn: socket.socket, progress: Progress | None = None) -> MachineState:
    """Receive a whole migration into `machine` (built, never started); the state is loaded, vCPUs created.

    Raises StreamError/StateError (MemvisorError) for a bad or broken stream, OSError for the socket."""
    from memvisor.snapshot.codec import StateError
    from memvisor.vmm.snapshot import _load_state

    if machine.vcpus:
        raise StreamError("an incoming migration needs a machine whose vCPUs were not created yet")
    stream.read_stream_header(conn)
    config = stream.parse_json(stream.read_record(conn, (stream.CONFIG,)))
    try:
        check_config(config, machine)
    except StreamError as error:
        _ack(conn, str(error))
        raise
    _ack(conn)
    receiver = Receiver(machine, progress)
    body = (stream.PLUGGED, stream.PAGES, stream.ZERO, stream.PASS, stream.STATE)
    while True:
        record = stream.read_record(conn, body)
        receiver.received += len(record.payload) + stream.RECORD_HEADER.size
        if record.type in (stream.PAGES, stream.ZERO):
            receiver.pages(record)
        elif record.type == stream.PLUGGED:
            try:
                receiver.plugged(record)
            except StateError as error:
                raise StreamError(str(error)) from None
        elif record.type == stream.PASS:
            stream.parse_pass(record)
        else:
            try:
                state = receiver.state(record)
            except StateError as error:
                raise StreamError(str(error)) from None
            stream.read_record(conn, (stream.END,))
            _load_state(machine, state)
            _ack(conn)
            return state
        if progress is not None:
            progress(receiver.received)


class IncomingListener:
    """`--incoming tcp:...|unix:...` and migrate-incoming: the port is opened here (MemvisorError naming the URI
    when it cannot be: the caller's answer), then `receive` takes one connection into a machine."""

    def __init__(self, uri: str) -> None:
        self.uri = uri
        self.endpoint = parse_uri(uri)
        try:
            self._sock: socket.socket | None = listen(self.endpoint)
        except OSError as error:
            raise MemvisorError(f"cannot listen on {uri}: {error.strerror or error}: free it or give another URI") from None

    def close(self) -> None:
        """Stop listening (a unix socket's file goes too); a no-op the second time."""
        sock, self._sock = self._sock, None
        if sock is None:
            return
        sock.close()
        if self.endpoint.kind == "unix":
            with contextlib.suppress(OSError):
                os.unlink(str(self.endpoint.address))

    def receive(self, machine: Machine, give_up: Callable[[], bool]) -> bool:
        """Take one connection and receive into `machine`; True when loaded, False when `give_up()` ended the
        wait. A broken or refused stream raises MemvisorError (exit 125). The port closes either way."""
        if self._sock is None:
            raise MemvisorError(f"{self.uri}: the incoming port was closed already")
        try:
            conn = accept(self._sock, give_up)
        finally:
            self.close()
        if conn is None:
            return False
        try:
            with conn:
                receive_migration(machine, conn)
        except StreamError as error:
            raise MemvisorError(f"the incoming migration failed: {error}") from None
        except OSError as error:
            raise MemvisorError(f"the incoming migration failed: the connection broke ({error.strerror or error})") from None
        except MemvisorError:
            raise
        except Exception as error:  # e.g. KVM refusing a state that passed every check: still one line, exit 125
            raise MemvisorError(f"the incoming migration failed: {type(error).__name__}: {error}") from None
        return True


def receive_live(machine: Machine, uri: str, give_up: Callable[[], bool]) -> bool:
    """`--incoming tcp:...|unix:...`: listen, take one connection, receive into `machine` (IncomingListener)."""
    return IncomingListener(uri).receive(machine, give_up)


def deferred_listen(machine: Machine, give_up: Callable[[], bool]) -> Callable[[str], Callable[[], bool]]:
    """`--incoming defer` + migrate-incoming tcp:/unix: (memvisor.vmm.migration.IncomingSlot): a call opens the
    port before migrate-incoming answers (raising if it cannot) and returns the receive, for a thread."""

    def open_port(uri: str) -> Callable[[], bool]:
        listener = IncomingListener(uri)
        return lambda: listener.receive(machine, give_up)

    return open_port
