"""memvisor's ACPI tables read back by an independent decoder: ACPICA's disassembler `iasl -d`.

The DSDT's AML is disassembled to ASL and the devices are found in that text; the FADT, MADT and XSDT go
through iasl's data-table decoder, which flags wrong checksums and lengths. Skipped without acpica-tools.
"""

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from memvisor.boot import layout
from memvisor.boot.acpi.tables import VirtioMmioSlot, build_acpi_tables

IASL = shutil.which("iasl")
pytestmark = pytest.mark.skipif(IASL is None, reason="iasl is missing (apt-get install acpica-tools)")
SLOTS = 4


def _tables(vcpus: int = 2) -> dict[bytes, bytes]:
    slots = [VirtioMmioSlot(*layout.virtio_mmio_slot(index)) for index in range(SLOTS)]
    uarts = [(layout.COM1_PORT, layout.COM1_GSI), (layout.COM2_PORT, layout.COM2_GSI)]
    built = build_acpi_tables(vcpus, uarts, slots)
    return {blob[:4]: blob for blob in built.blobs.values() if not blob.startswith(b"RSD PTR ")}


def _disassemble(tmp_path: Path, signature: bytes, raw: bytes) -> str:
    """Run `iasl -d` on one table; return the .dsl text after checking iasl itself was content."""
    name = signature.decode().lower()
    source = tmp_path / f"{name}.dat"
    source.write_bytes(raw)
    result = subprocess.run(
        [str(IASL), "-d", str(source)], cwd=tmp_path, capture_output=True, text=True, timeout=60
    )
    messages = result.stdout + result.stderr
    assert result.returncode == 0, messages
    assert not re.search(r"\b(Error|Warning)\b", messages), messages
    text = (tmp_path / f"{name}.dsl").read_text()
    assert "Incorrect checksum" not in text and "Invalid" not in text, text
    return text


def _device_blocks(dsl: str) -> dict[str, str]:
    """Device (NAME) { ... } bodies by name, found by matching braces in the disassembly."""
    blocks = {}
    for match in re.finditer(r"Device \((\w+)\)\s*\{", dsl):
        depth, position = 1, match.end()
        while depth:
            depth += {"{": 1, "}": -1}.get(dsl[position], 0)
            position += 1
        blocks[match.group(1)] = dsl[match.end() : position - 1]
    return blocks


@pytest.fixture(scope="module")
def dsdt_text(tmp_path_factory: pytest.TempPathFactory) -> str:
    return _disassemble(tmp_path_factory.mktemp("dsdt"), b"DSDT", _tables()[b"DSDT"])


def test_dsdt_definition_block(dsdt_text: str) -> None:
    assert 'DefinitionBlock ("", "DSDT", 2, "MEMVSR", "MEMVISOR", 0x00000001)' in dsdt_text
    assert "Scope (\\_SB)" in dsdt_text


def test_dsdt_s5(dsdt_text: str) -> None:
    match = re.search(r"Name \(\\_S5, Package \(0x02\)[^{]*\{\s*([^,\s]+),\s*([^\s}]+)\s*\}", dsdt_text)
    assert match is not None, dsdt_text
    assert int(match.group(1), 16) == layout.ACPI_S5_SLEEP_TYPE == 5
    assert match.group(2) == "Zero"


@pytest.mark.parametrize(
    ("name", "port", "irq", "uid"), [("COM1", 0x3F8, 4, "One"), ("COM2", 0x2F8, 3, "0x02")]
)
def test_dsdt_uarts(dsdt_text: str, name: str, port: int, irq: int, uid: str) -> None:
    body = _device_blocks(dsdt_text)[name]
    assert 'EisaId ("PNP0501")' in body
    assert f"Name (_UID, {uid})" in body
    io = re.search(r"IO \(Decode16,\s*(0x\w+),\s*// Range Minimum\s*(0x\w+),\s*// Range Maximum\s*"
                   r"(0x\w+),\s*// Alignment\s*(0x\w+),\s*// Length", body)  # fmt: skip
    assert io is not None, body
    assert [int(value, 16) for value in io.groups()] == [port, port, 1, 8]
    assert f"0x{port:04X}" in body
    irqs = re.search(r"IRQNoFlags \(\)\s*\{(\d+)\}", body)
    assert irqs is not None and int(irqs.group(1)) == irq


def test_dsdt_virtio_mmio_slots(dsdt_text: str) -> None:
    blocks = _device_blocks(dsdt_text)
    virtio = {name: body for name, body in blocks.items() if '"LNRO0005"' in body}
    assert len(virtio) == SLOTS
    seen = set()
    for body in virtio.values():
        memory = re.search(r"Memory32Fixed \(ReadWrite,\s*(0x\w+),\s*// Address Base\s*(0x\w+),", body)
        assert memory is not None, body
        base, length = (int(value, 16) for value in memory.groups())
        assert length == 0x1000
        interrupt = re.search(
            r"Interrupt \(ResourceConsumer, Edge, ActiveHigh, Exclusive[^)]*\)\s*\{\s*(0x\w+),", body
        )
        assert interrupt is not None, body
        gsi = int(interrupt.group(1), 16)
        seen.add((base, gsi))
        assert "Name (_CCA, One)" in body
    assert seen == {layout.virtio_mmio_slot(index) for index in range(SLOTS)}
    uids = sorted(re.search(r"Name \(_UID, (\w+)\)", body).group(1) for body in virtio.values())  # type: ignore[union-attr]
    assert len(set(uids)) == SLOTS


@pytest.mark.parametrize("vcpus", [1, 8])
def test_madt_decodes(tmp_path: Path, vcpus: int) -> None:
    text = _disassemble(tmp_path, b"APIC", _tables(vcpus)[b"APIC"])
    assert text.count("[Processor Local APIC]") == vcpus
    assert text.count("Processor Enabled : 1") == vcpus
    assert re.search(r"\[I/O APIC\].*?Address : FEC00000", text, re.S)
    assert re.search(r"\[Interrupt Source Override\].*?Source : 00.*?Interrupt : 00000002", text, re.S)
    assert "Local Apic Address : FEE00000" in text


def test_fadt_decodes(tmp_path: Path) -> None:
    text = _disassemble(tmp_path, b"FACP", _tables()[b"FACP"])
    assert re.search(r"Hardware Reduced \(V5\) : 1", text)
    assert re.search(r"Reset Register Supported \(V2\) : 1", text)
    for register, port in (
        ("Sleep Control Register", layout.ACPI_SLEEP_CONTROL_PORT),
        ("Sleep Status Register", layout.ACPI_SLEEP_STATUS_PORT),
        ("Reset Register", layout.ACPI_RESET_PORT),
    ):
        block = re.search(rf"{register} : \[Generic Address Structure\](.*?)Address : (\w+)", text, re.S)
        assert block is not None, register
        assert "[SystemIO]" in block.group(1)
        assert int(block.group(2), 16) == port
    assert re.search(r"FADT Minor Revision : 04", text)


def test_xsdt_decodes(tmp_path: Path) -> None:
    text = _disassemble(tmp_path, b"XSDT", _tables()[b"XSDT"])
    assert len(re.findall(r"ACPI Table Address\s+\d : ", text)) == 2
