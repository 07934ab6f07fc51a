"""Attaching the `--device` virtio devices to a machine: memory regions, virtio-mmio slots, interrupts.

Device memory lives above guest RAM (from 4 GiB, or from the end of RAM above 4 GiB), each region
aligned to 128 MiB (virtio-mem hot-adds whole 128 MiB Linux memory blocks; pmem needs 2 MiB, and a section
boundary keeps its ZONE_DEVICE pages simple). virtio-mem maps its whole region into one KVM memslot:
unplugged blocks hold no host memory (they were discarded) and are PROT_NONE, so a guest touching one stops
the VM instead of making the host back it (memvisor/devices/mem/device.py).

Each device model is imported where it is built: a guest without `--device` starts without them (in the lab,
Python imports run at emulation speed and are most of the start-up).
"""

import os
from dataclasses import dataclass, field, replace
from pathlib import Path

from memvisor.boot import layout
from memvisor.errors import UsageError
from memvisor.memory.guest_memory import MemoryRegion
from memvisor.units import format_size
from memvisor.virtio.device import VirtioDevice
from memvisor.virtio.mmio import VirtioMmioTransport
from memvisor.vmm.device_specs import DeviceSpec, parse_device_specs
from memvisor.vmm.machine import Machine

DEVICE_REGION_ALIGN = 128 << 20
PMEM_ALIGN = 2 << 20


@dataclass
class AttachedDevice:
    """A device on the machine: its spec, model, transport and (for mem/pmem) memory region."""

    spec: DeviceSpec
    device: VirtioDevice
    transport: VirtioMmioTransport
    base: int
    gsi: int
    region: MemoryRegion | None = None
    extra: dict[str, object] = field(default_factory=dict)

    @property
    def id(self) -> str:
        return self.spec.id


def _align_up(value: int, alignment: int) -> int:
    return (value + alignment - 1) // alignment * alignment


def device_memory_start(memory_size: int) -> int:
    """The first address for device memory: above every RAM range, 128 MiB aligned, at least 4 GiB."""
    ram_end = max(gpa + size for gpa, size in layout.ram_ranges(memory_size))
    return _align_up(max(ram_end, layout.FOUR_GIB), DEVICE_REGION_ALIGN)


def _is_ram(region: MemoryRegion) -> bool:
    """Boot RAM: what the dirty log covers, so the only memory free page hints may name."""
    return region.name.startswith("ram")


def _pmem_region(spec: DeviceSpec, gpa: int) -> MemoryRegion:
    path = Path(spec.properties["file"])
    readonly = bool(spec.properties["readonly"])
    if not path.is_file():
        raise UsageError(f"virtio-pmem {spec.id}: file {path} does not exist: create it, e.g. truncate -s 256M {path}")
    size = int(spec.properties["size"]) or path.stat().st_size
    if size == 0 or size % PMEM_ALIGN:
        raise UsageError(
            f"virtio-pmem {spec.id}: size {format_size(size)} is not a positive multiple of 2M: "
            f"resize the file (truncate -s 256M {path}) or give size="
        )
    if readonly and size > path.stat().st_size:
        raise UsageError(f"virtio-pmem {spec.id}: read-only file {path} is smaller than size={format_size(size)}")
    if not readonly and not os.access(path, os.W_OK):
        raise UsageError(f"virtio-pmem {spec.id}: file {path} is not writable: fix its permissions or add readonly=on")
    return MemoryRegion.file(gpa, path, size, readonly=readonly, name=f"pmem-{spec.id}")


def _make_device(machine: Machine, spec: DeviceSpec, next_gpa: int) -> tuple[VirtioDevice, MemoryRegion | None]:
    props = spec.properties
    if spec.type == "virtio-balloon":
        from memvisor.devices.balloon import BalloonDevice

        interval = int(props["guest-stats-polling-interval"])
        return BalloonDevice(
            machine.config.memory,
            stats=True,
            stats_polling_interval=interval,
            stats_timer=True,
            deflate_on_oom=bool(props["deflate-on-oom"]),
            free_page_hint=bool(props["free-page-hint"]),
            free_page_reporting=bool(props["free-page-reporting"]),
            hint_filter=_is_ram,
        ), None
    if spec.type == "virtio-mem":
        max_size = int(props["max-size"])
        block = int(props["block-size"])
        if max_size == 0 or max_size % DEVICE_REGION_ALIGN:
            raise UsageError(f"virtio-mem {spec.id}: max-size {format_size(max_size)} is not a multiple of 128M: round it, e.g. 2G")
        if int(props["node"]) >= machine.config.numa_nodes:
            raise UsageError(
                f"virtio-mem {spec.id}: node={props['node']} does not exist: give --numa-nodes {int(props['node']) + 1} or more"
            )
        from memvisor.devices.mem import VirtioMemDevice

        # The machine's backing, without reserving or preallocating: blocks are allocated when plugged, and on
        # hugetlbfs always preallocated then (a plugged block whose page the pool cannot give is refused, BUSY,
        # instead of a SIGBUS when the guest touches it).
        backend = replace(machine.config.memory_backend, prealloc=False)
        region = MemoryRegion.memfd(next_gpa, max_size, f"mem-{spec.id}", backend, reserve=False)
        device = VirtioMemDevice(
            region,
            block_size=block,
            requested_size=int(props["requested-size"]),
            node_id=int(props["node"]) if machine.config.numa_nodes > 1 else None,
            prealloc=bool(props["prealloc"]) or backend.kind == "hugetlb",
            unplugged_inaccessible=bool(props["unplugged-inaccessible"]),
        )
        return device, region
    if spec.type == "virtio-pmem":
        from memvisor.devices.pmem import VirtioPmemDevice

        region = _pmem_region(spec, next_gpa)
        return VirtioPmemDevice(region, readonly=bool(props["readonly"])), region
    raise UsageError(f"unknown device type {spec.type}")


def attach_devices(machine: Machine) -> list[AttachedDevice]:
    """Create every `--device` of the machine's config and put it on the machine; returns them in order."""
    attached: list[AttachedDevice] = []
    next_gpa = device_memory_start(machine.config.memory)
    for spec in parse_device_specs(machine.config.extra_devices):
        device, region = _make_device(machine, spec, next_gpa)
        if region is not None:
            readonly = region.readonly
            machine.add_memory_region(region, readonly=readonly)
            next_gpa = _align_up(region.gpa + region.size, DEVICE_REGION_ALIGN)
        base, gsi = machine.allocate_virtio_slot()
        transport = VirtioMmioTransport(device, machine.memory, machine.virtio_interrupt(gsi))
        machine.add_virtio_window(base, transport)
        attached.append(AttachedDevice(spec, device, transport, base, gsi, region))
    machine.devices = attached
    return attached
