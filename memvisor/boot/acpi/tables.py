"""ACPI tables for a hardware-reduced machine with no firmware (ACPI 6.4 chapter 5).

RSDP -> XSDT -> FADT (HW_REDUCED_ACPI, sleep control/status and reset registers in I/O space) -> DSDT,
and the MADT (local APICs and the IOAPIC). The DSDT's AML describes the UARTs, the virtio-mmio slots and
the \\_S5_ sleep type that the poweroff path writes to the sleep control register.
"""

import struct
from dataclasses import dataclass

from memvisor.boot import layout
from memvisor.boot.acpi import aml

OEM_ID = b"MEMVSR"
OEM_TABLE_ID = b"MEMVISOR"
CREATOR_ID = b"MVSR"
# struct acpi_table_header (5.2.6): signature, length, revision, checksum, OEM id, OEM table id,
# OEM revision, creator id, creator revision.
TABLE_HEADER = struct.Struct("<4sIBB6s8sI4sI")


def checksum(data: bytes) -> int:
    """The byte that makes `data` sum to zero modulo 256."""
    return (-sum(data)) & 0xFF


def table(signature: bytes, revision: int, body: bytes) -> bytes:
    """A complete ACPI table: header with a correct length and checksum, then `body`."""
    length = TABLE_HEADER.size + len(body)
    header = TABLE_HEADER.pack(signature, length, revision, 0, OEM_ID, OEM_TABLE_ID, 1, CREATOR_ID, 1)
    raw = bytearray(header + body)
    raw[9] = checksum(bytes(raw))
    return bytes(raw)


# Generic Address Structure (5.2.3.2): space id, bit width, bit offset, access size, address.
GAS = struct.Struct("<BBBBQ")
GAS_SYSTEM_IO = 1
ACCESS_BYTE = 1


def gas_io_byte(port: int) -> bytes:
    return GAS.pack(GAS_SYSTEM_IO, 8, 0, ACCESS_BYTE, port)


# FADT (5.2.9), revision 6: offsets of the fields memvisor sets.
FADT_LENGTH = 276
FADT_REVISION = 6
FADT_MINOR_REVISION = 4
FADT_DSDT = 40
FADT_FLAGS = 112
FADT_RESET_REG = 116
FADT_RESET_VALUE = 128
FADT_MINOR_VERSION = 131
FADT_X_DSDT = 140
FADT_SLEEP_CONTROL_REG = 244
FADT_SLEEP_STATUS_REG = 256
FADT_HYPERVISOR_VENDOR = 268
FADT_IAPC_BOOT_ARCH = 109
FLAG_RESET_REG_SUP = 1 << 10
FLAG_HW_REDUCED_ACPI = 1 << 20
IAPC_VGA_NOT_PRESENT = 1 << 2
IAPC_MSI_NOT_SUPPORTED = 1 << 3
IAPC_PCIE_ASPM_CONTROLS = 1 << 4


def build_fadt(dsdt_addr: int) -> bytes:
    body = bytearray(FADT_LENGTH - TABLE_HEADER.size)

    def put(offset: int, data: bytes) -> None:
        start = offset - TABLE_HEADER.size
        body[start : start + len(data)] = data

    put(FADT_DSDT, struct.pack("<I", dsdt_addr))
    put(
        FADT_IAPC_BOOT_ARCH,
        struct.pack("<H", IAPC_VGA_NOT_PRESENT | IAPC_MSI_NOT_SUPPORTED | IAPC_PCIE_ASPM_CONTROLS),
    )
    put(FADT_FLAGS, struct.pack("<I", FLAG_HW_REDUCED_ACPI | FLAG_RESET_REG_SUP))
    put(FADT_RESET_REG, gas_io_byte(layout.ACPI_RESET_PORT))
    put(FADT_RESET_VALUE, bytes([layout.ACPI_RESET_VALUE]))
    put(FADT_MINOR_VERSION, bytes([FADT_MINOR_REVISION]))
    put(FADT_X_DSDT, struct.pack("<Q", dsdt_addr))
    put(FADT_SLEEP_CONTROL_REG, gas_io_byte(layout.ACPI_SLEEP_CONTROL_PORT))
    put(FADT_SLEEP_STATUS_REG, gas_io_byte(layout.ACPI_SLEEP_STATUS_PORT))
    put(FADT_HYPERVISOR_VENDOR, b"MEMVISOR")
    return table(b"FACP", FADT_REVISION, bytes(body))


# MADT (5.2.12) entries.
MADT_LOCAL_APIC = struct.Struct("<BBBBI")  # type 0, length 8, processor uid, APIC id, flags
MADT_IOAPIC = struct.Struct("<BBBBII")  # type 1, length 12, id, reserved, address, GSI base
MADT_ISO = struct.Struct("<BBBBIH")  # type 2, length 10, bus, source, GSI, flags
MADT_PCAT_COMPAT = 1
LOCAL_APIC_ENABLED = 1


def build_madt(vcpus: int) -> bytes:
    body = struct.pack("<II", layout.LAPIC_ADDR, MADT_PCAT_COMPAT)
    for index in range(vcpus):
        body += MADT_LOCAL_APIC.pack(0, 8, index, index, LOCAL_APIC_ENABLED)
    body += MADT_IOAPIC.pack(1, 12, 0, 0, layout.IOAPIC_ADDR, 0)
    # KVM's PIT raises ISA IRQ 0 on IOAPIC pin 2, as on a PC.
    body += MADT_ISO.pack(2, 10, 0, 0, 2, 0)
    return table(b"APIC", 5, body)


@dataclass(frozen=True)
class VirtioMmioSlot:
    """A virtio-mmio device to describe in the DSDT."""

    base: int
    gsi: int


def build_dsdt(uarts: list[tuple[int, int]], virtio_slots: list[VirtioMmioSlot]) -> bytes:
    """The DSDT: \\_S5_, and under \\_SB_ one device per UART (port, IRQ) and per virtio-mmio slot."""
    devices = []
    for index, (port, irq) in enumerate(uarts):
        devices.append(
            aml.device(
                f"COM{index + 1}",
                aml.name("_HID", aml.eisa_id("PNP0501")),
                aml.name("_UID", aml.integer(index + 1)),
                aml.name("_CRS", aml.resource_template(aml.io_port(port, 8), aml.irq_no_flags(irq))),
            )
        )
    for index, slot in enumerate(virtio_slots):
        devices.append(
            aml.device(
                f"V{index:03d}",
                aml.name("_HID", aml.string("LNRO0005")),
                aml.name("_UID", aml.integer(index)),
                aml.name("_CCA", aml.integer(1)),
                aml.name(
                    "_CRS",
                    aml.resource_template(
                        aml.memory32_fixed(slot.base, layout.VIRTIO_MMIO_SLOT_SIZE),
                        aml.extended_interrupt(slot.gsi, edge=True, active_low=False),
                    ),
                ),
            )
        )
    s5 = aml.name("\\_S5_", aml.package(aml.integer(layout.ACPI_S5_SLEEP_TYPE), aml.integer(0)))
    body = s5 + aml.scope("\\_SB_", *devices)
    return table(b"DSDT", 2, body)


def build_xsdt(pointers: list[int]) -> bytes:
    return table(b"XSDT", 1, b"".join(struct.pack("<Q", p) for p in pointers))


# RSDP (5.2.5.3), revision 2: signature, checksum, OEM id, revision, RSDT address, length, XSDT address,
# extended checksum, reserved.
RSDP = struct.Struct("<8sB6sBIIQB3s")


def build_rsdp(xsdt_addr: int) -> bytes:
    raw = bytearray(RSDP.pack(b"RSD PTR ", 0, OEM_ID, 2, 0, RSDP.size, xsdt_addr, 0, b"\0\0\0"))
    raw[8] = checksum(bytes(raw[:20]))
    raw[32] = checksum(bytes(raw))
    return bytes(raw)


# SRAT (5.2.16) entries.
SRAT_CPU_AFFINITY = struct.Struct("<BBBBIB3sI")  # type 0, length 16, domain[7:0], APIC id, flags, SAPIC EID, domain[31:8], clock domain
SRAT_MEMORY_AFFINITY = struct.Struct("<BBIHQQIIQ")  # type 1, length 40, domain, reserved, base, length, reserved, flags, reserved
SRAT_ENABLED = 1
SRAT_HOTPLUGGABLE = 2


@dataclass(frozen=True)
class NumaMemory:
    """A memory range on a NUMA node (proximity domain) for the SRAT."""

    base: int
    size: int
    node: int
    hotpluggable: bool = False


def build_srat(vcpus: int, nodes: int, memory: list[NumaMemory]) -> bytes:
    """The SRAT: vCPU i on node i % nodes, and each memory range on its node."""
    body = struct.pack("<IQ", 1, 0)
    for index in range(vcpus):
        node = index % nodes
        body += SRAT_CPU_AFFINITY.pack(0, 16, node & 0xFF, index, SRAT_ENABLED, 0, (node >> 8).to_bytes(3, "little"), 0)
    for item in memory:
        flags = SRAT_ENABLED | (SRAT_HOTPLUGGABLE if item.hotpluggable else 0)
        body += SRAT_MEMORY_AFFINITY.pack(1, 40, item.node, 0, item.base, item.size, 0, flags, 0)
    return table(b"SRAT", 3, body)


@dataclass(frozen=True)
class AcpiTables:
    """The tables placed in guest memory: {gpa: bytes}, and where the RSDP is."""

    blobs: dict[int, bytes]
    rsdp_addr: int


def build_acpi_tables(
    vcpus: int,
    uarts: list[tuple[int, int]],
    virtio_slots: list[VirtioMmioSlot],
    base: int = layout.ACPI_TABLES_ADDR,
    *,
    numa_nodes: int = 1,
    numa_memory: list[NumaMemory] | None = None,
) -> AcpiTables:
    """Lay out RSDP, XSDT, FADT, MADT, DSDT (and an SRAT with NUMA nodes) from `base`, 16-byte aligned."""
    blobs: dict[int, bytes] = {}
    cursor = base

    def place(data: bytes) -> int:
        nonlocal cursor
        address = cursor
        blobs[address] = data
        cursor = (cursor + len(data) + 15) & ~15
        return address

    rsdp_addr = place(bytes(RSDP.size))  # filled in last, once the XSDT address is known
    dsdt_addr = place(build_dsdt(uarts, virtio_slots))
    fadt_addr = place(build_fadt(dsdt_addr))
    madt_addr = place(build_madt(vcpus))
    pointers = [fadt_addr, madt_addr]
    if numa_nodes > 1:
        pointers.append(place(build_srat(vcpus, numa_nodes, numa_memory or [])))
    xsdt_addr = place(build_xsdt(pointers))
    blobs[rsdp_addr] = build_rsdp(xsdt_addr)
    if cursor > layout.ACPI_TABLES_END:
        raise ValueError("ACPI tables do not fit below 1 MiB")
    return AcpiTables(blobs, rsdp_addr)
