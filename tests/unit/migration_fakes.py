"""Fake machines for the live migration unit tests (memvisor/migration/): real memfd-backed guest memory, a
real virtio-mem device, the real dirty tracker over a fake KVM VM, and `migrate()`, a whole pre-copy over a
socketpair. The machine state parts need KVM and are stood in for (`fake_machine_state`)."""

from __future__ import annotations

import contextlib
import socket
import threading
from types import SimpleNamespace
from typing import Any

import pytest

from memvisor.memory.guest_memory import GuestMemory, MemoryRegion
from memvisor.migration import incoming, stream
from memvisor.migration.source import MigrationParameters, MigrationStats, PreCopy, SourceHooks
from memvisor.migration.stream import PAGE_SIZE, StreamError
from memvisor.vmm.dirty_tracker import DirtyTracker

from .kvm_fakes import FakeVm, ManualFakeVm

MiB = 1 << 20
RAM = 4 * MiB
PAGES = RAM // PAGE_SIZE


VMEM_GPA, VMEM_SIZE, VMEM_BLOCK = 128 * MiB, 128 * MiB, 2 * MiB


class FakeMachine:
    """What the source and the destination touch: config, memory, devices, the dirty tracker, vCPUs.

    With `vmem`, a virtio-mem device (id "vmem0") over a region at VMEM_GPA, in its own memslot."""

    def __init__(self, memory: int = RAM, *, vmem: bool = False, manual_dirty_log: bool = False) -> None:
        from memvisor.devices.mem import VirtioMemDevice

        self.config = SimpleNamespace(memory=memory, vcpus=1, numa_nodes=1,
                                      extra_devices=["virtio-mem,id=vmem0"] if vmem else [])  # fmt: skip
        self.memory = GuestMemory([MemoryRegion.memfd(0, memory, "ram0")])
        self.devices: list[Any] = []
        slots = [(0, memory)]
        if vmem:
            region = MemoryRegion.memfd(VMEM_GPA, VMEM_SIZE, "vmem0")
            self.memory.add(region)
            self.devices.append(SimpleNamespace(id="vmem0", device=VirtioMemDevice(
                region, block_size=VMEM_BLOCK, requested_size=VMEM_SIZE)))  # fmt: skip
            slots.append((VMEM_GPA, VMEM_SIZE))
        self.vm = ManualFakeVm(slots) if manual_dirty_log else FakeVm(slots)
        for index, region in enumerate(self.memory.regions):
            self.vm.slots[index] = type(self.vm.slots[0])(index, region.gpa, region.size, region.host_addr, 0)
        self.dirty_tracker = DirtyTracker(self.vm, lambda slot: True)
        self.memory.on_write = self.dirty_tracker.mark
        self.vcpus: list[Any] = []
        self.loaded: Any = None

    def guest_write(self, pfn: int, data: bytes) -> None:
        """A write by the guest: through the mapping, logged by (fake) KVM."""
        gpa = pfn * PAGE_SIZE
        region = next(r for r in self.memory.regions if r.gpa <= gpa < r.gpa + r.size)
        region.view[gpa - region.gpa : gpa - region.gpa + len(data)] = data
        if self.dirty_tracker.active:  # KVM logs only while logging is on
            self.vm.write(gpa)

    def page(self, pfn: int) -> bytes:
        return self.memory.read(pfn * PAGE_SIZE, PAGE_SIZE)


def fake_machine_state(monkeypatch: pytest.MonkeyPatch) -> None:
    """The machine state parts need KVM: a small stand-in state goes through the stream instead (the tests'
    `no_kvm_state` fixture)."""
    import memvisor.snapshot.codec as codec
    import memvisor.vmm.snapshot as snapshot

    monkeypatch.setattr(snapshot, "quiesced", lambda machine: contextlib.nullcontext())
    monkeypatch.setattr(snapshot, "capture_machine", lambda machine: {"fake-state": len(machine.vcpus)})
    real_encode = codec.encode  # virtio-mem's PLUGGED state goes through the real codec
    monkeypatch.setattr(codec, "encode", lambda value: value if isinstance(value, dict) else real_encode(value))
    monkeypatch.setattr(incoming.Receiver, "state", lambda self, record: stream.parse_json(record))
    monkeypatch.setattr(snapshot, "_load_state", lambda machine, state: setattr(machine, "loaded", state))


def migrate(src: FakeMachine, dst: FakeMachine, hooks: SourceHooks | None = None,
            params: MigrationParameters | None = None, between_passes: Any = None) -> MigrationStats:  # fmt: skip
    a, b = socket.socketpair()
    stats = MigrationStats()
    precopy = PreCopy(src, a, hooks or SourceHooks(), params or MigrationParameters(max_bandwidth=0), stats, threading.Event())  # type: ignore[arg-type]
    if between_passes is not None:
        precopy.on_pass = between_passes
    errors: list[BaseException] = []

    def run() -> None:
        try:
            precopy.run()
        except BaseException as error:  # noqa: BLE001 - reported to the test
            errors.append(error)
        finally:
            a.close()

    thread = threading.Thread(target=run)
    thread.start()
    try:
        incoming.receive_migration(dst, b)  # type: ignore[arg-type]
    except StreamError:
        thread.join(10)
        if errors and not isinstance(errors[0], OSError):
            raise errors[0] from None  # the source's own failure, not the destination's follow-on
        raise
    finally:
        b.close()
        thread.join(10)
    if errors:
        raise errors[0]
    return stats
