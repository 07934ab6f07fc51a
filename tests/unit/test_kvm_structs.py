"""memvisor.kvm's ctypes structures and ioctl numbers against the kernel's own UAPI header.

A small C program, compiled with gcc against <linux/kvm.h>, prints sizeof and offsetof of every field that
memvisor mirrors, every ioctl number and every KVM_* constant memvisor defines; the test compares them with
what ctypes computes. Skipped when gcc or the header is missing. A few well-known offsets are also checked
without the compiler, so the module still says something on a machine without headers.
"""

import ctypes
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from memvisor.kvm import ioctls, structs

KVM_HEADER = Path("/usr/include/linux/kvm.h")

# Python structure -> C type, and for its fields whose C path differs, the C path.
STRUCTS: dict[type[ctypes.Structure], str] = {
    structs.KvmUserspaceMemoryRegion: "struct kvm_userspace_memory_region",
    structs.KvmRegs: "struct kvm_regs",
    structs.KvmSegment: "struct kvm_segment",
    structs.KvmDtable: "struct kvm_dtable",
    structs.KvmSregs: "struct kvm_sregs",
    structs.KvmFpu: "struct kvm_fpu",
    structs.KvmCpuidEntry2: "struct kvm_cpuid_entry2",
    structs.KvmCpuid2: "struct kvm_cpuid2",
    structs.KvmMsrEntry: "struct kvm_msr_entry",
    structs.kvm_msrs_type(4): "struct kvm_msrs",
    structs.KvmLapicState: "struct kvm_lapic_state",
    structs.KvmPitConfig: "struct kvm_pit_config",
    structs.KvmIrqLevel: "struct kvm_irq_level",
    structs.KvmIrqfd: "struct kvm_irqfd",
    structs.KvmIoeventfd: "struct kvm_ioeventfd",
    structs.KvmDirtyLog: "struct kvm_dirty_log",
    structs.KvmClearDirtyLog: "struct kvm_clear_dirty_log",
    structs.KvmEnableCap: "struct kvm_enable_cap",
    structs.KvmRun: "struct kvm_run",
    structs.KvmMpState: "struct kvm_mp_state",
    structs.KvmXsave: "struct kvm_xsave",
    structs.KvmXcr: "struct kvm_xcr",
    structs.KvmXcrs: "struct kvm_xcrs",
    structs.KvmDebugregs: "struct kvm_debugregs",
    structs.KvmVcpuEvents: "struct kvm_vcpu_events",
    structs.KvmSyncRegs: "struct kvm_sync_regs",
    structs.KvmClockData: "struct kvm_clock_data",
    structs.KvmIrqchip: "struct kvm_irqchip",
    structs.KvmPitChannelState: "struct kvm_pit_channel_state",
    structs.KvmPitState2: "struct kvm_pit_state2",
    structs.kvm_msr_list_type(4): "struct kvm_msr_list",
}
# C flexible array members: Python gives them a fixed count, so only their offset can be compared.
FLEXIBLE = {("struct kvm_cpuid2", "entries"), ("struct kvm_msrs", "entries"), ("struct kvm_msr_list", "indices")}
# The kvm_run exit union is anonymous in C; two of its members sit inside one-field structs.
RENAMES = {
    "exit.hardware_exit_reason": "hw.hardware_exit_reason",
    "exit.fail_entry_reason": "fail_entry.hardware_entry_failure_reason",
}


def _leaves(
    cls: type[ctypes.Structure | ctypes.Union], prefix: str = "", base: int = 0
) -> Iterator[tuple[str, int, int]]:
    """(dotted path, offset, size) of every field, descending into nested structures and unions."""
    for entry in cls._fields_:
        name, ftype = entry[0], entry[1]
        descriptor = getattr(cls, name)
        path, offset = prefix + name, base + descriptor.offset
        yield path, offset, ctypes.sizeof(ftype)
        if isinstance(ftype, type) and issubclass(ftype, ctypes.Structure | ctypes.Union):
            yield from _leaves(ftype, path + ".", offset)


def _c_path(path: str) -> str:
    path = RENAMES.get(path, path)
    return path.removeprefix("exit.")


def _field_checks() -> list[tuple[str, str, int]]:
    """(key, C expression, Python value) for sizes and offsets."""
    checks = []
    for cls, ctype in STRUCTS.items():
        if ctype == "struct kvm_run":
            # memvisor mirrors the head of kvm_run, up to the end of the exit union.
            checks.append((f"sizeof {ctype} head", f"offsetof({ctype}, kvm_valid_regs)", ctypes.sizeof(cls)))
        elif ctype not in {c for (c, _) in FLEXIBLE}:
            checks.append((f"sizeof {ctype}", f"sizeof({ctype})", ctypes.sizeof(cls)))
        for path, offset, size in _leaves(cls):
            if path == "exit":
                continue  # the anonymous union itself has no name in C; its members are checked
            cpath = _c_path(path)
            checks.append((f"offsetof {ctype}.{path}", f"offsetof({ctype}, {cpath})", offset))
            if (ctype, path) not in FLEXIBLE:
                checks.append((f"sizeof {ctype}.{path}", f"sizeof((({ctype} *)0)->{cpath})", size))
    # kvm_run's tail (kvm_valid_regs, kvm_dirty_regs, the sync regs union `s`), mirrored on its own at
    # RUN_SYNC_OFFSET: every field's offset is checked inside struct kvm_run itself.
    run, tail = "struct kvm_run", structs.KvmRunSync
    checks.append((f"sizeof {run}", f"sizeof({run})", structs.RUN_SYNC_OFFSET + ctypes.sizeof(tail)))
    for path, offset, size in _leaves(tail, base=structs.RUN_SYNC_OFFSET):
        checks.append((f"offsetof {run}.{path}", f"offsetof({run}, {path})", offset))
        checks.append((f"sizeof {run}.{path}", f"sizeof((({run} *)0)->{path})", size))
    # Flexible-array structures: their fixed head is what the ioctl size encodes.
    checks.append(
        ("sizeof struct kvm_cpuid2 head", "sizeof(struct kvm_cpuid2)", structs.KvmCpuid2.entries.offset)
    )
    msrs = structs.kvm_msrs_type(1)
    checks.append(("sizeof struct kvm_msrs head", "sizeof(struct kvm_msrs)", msrs.entries.offset))  # type: ignore[attr-defined]
    checks.append(("sizeof struct kvm_msr_list head", "sizeof(struct kvm_msr_list)", 4))
    return checks


def _constant_checks() -> list[tuple[str, str, int]]:
    """Every KVM_* integer constant in memvisor.kvm.structs and .ioctls against the header's macro."""
    checks = []
    for module in (structs, ioctls):
        for name, value in vars(module).items():
            if name.startswith("KVM_") and isinstance(value, int) and not isinstance(value, bool):
                checks.append((f"constant {name}", name, value))
    return checks


def _c_program(checks: list[tuple[str, str, int]]) -> str:
    lines = ["#include <stddef.h>", "#include <stdio.h>", "#include <linux/kvm.h>", "int main(void) {"]
    for key, expression, _ in checks:
        if key.startswith("constant "):
            lines.append(
                f"#ifdef {expression}\n"
                f'  printf("%s=%llu\\n", "{key}", (unsigned long long)({expression}));\n'
                f"#else\n"
                f'  printf("%s=undefined\\n", "{key}");\n'
                f"#endif"
            )
        else:
            lines.append(f'  printf("%s=%llu\\n", "{key}", (unsigned long long)({expression}));')
    lines += ["  return 0;", "}"]
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def kernel_values(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """What the kernel's header says, keyed like the checks."""
    gcc = shutil.which("gcc")
    if gcc is None or not KVM_HEADER.exists():
        pytest.skip("gcc or <linux/kvm.h> is missing (apt-get install gcc linux-libc-dev)")
    folder = tmp_path_factory.mktemp("kvmh")
    source, binary = folder / "probe.c", folder / "probe"
    source.write_text(_c_program(_field_checks() + _constant_checks()))
    subprocess.run([gcc, "-o", str(binary), str(source)], check=True, capture_output=True, text=True)
    output = subprocess.run([str(binary)], check=True, capture_output=True, text=True).stdout
    return dict(line.split("=", 1) for line in output.splitlines())


def test_every_size_and_offset_matches_the_kernel_header(kernel_values: dict[str, str]) -> None:
    checks = _field_checks()
    assert len(checks) > 150  # every structure and its fields took part
    mismatches = [
        f"{key}: memvisor {value:#x}, kernel {int(kernel_values[key]):#x}"
        for key, _, value in checks
        if int(kernel_values[key]) != value
    ]
    assert mismatches == []


def test_every_constant_and_ioctl_number_matches_the_kernel_header(kernel_values: dict[str, str]) -> None:
    checks = _constant_checks()
    names = {expression for _, expression, _ in checks}
    assert {"KVM_RUN", "KVM_SET_SREGS", "KVM_SET_USER_MEMORY_REGION", "KVM_EXIT_MMIO"} <= names
    mismatches = [
        f"{expression}: memvisor {value:#x}, kernel {kernel_values[key]}"
        for key, expression, value in checks
        if kernel_values[key] == "undefined" or int(kernel_values[key]) != value
    ]
    assert mismatches == []


def test_well_known_layout_without_a_compiler() -> None:
    """Offsets every VMM author knows by heart (linux/kvm.h on x86_64)."""
    assert structs.KvmRun.exit.offset == 0x20
    assert structs.KvmRun.exit.offset + structs.KvmRunExitUnion.io.offset == 0x20
    assert structs.KvmRun.exit.offset + structs.KvmRunMmio.is_write.offset == 0x34
    assert ctypes.sizeof(structs.KvmRunExitUnion) == 256
    assert ctypes.sizeof(structs.KvmSregs) == 0x138
    assert ctypes.sizeof(structs.KvmFpu) == 0x1A0
    assert ctypes.sizeof(structs.KvmRegs) == 18 * 8
    assert ctypes.sizeof(structs.KvmSegment) == 24
    assert ctypes.sizeof(structs.KvmCpuidEntry2) == 40
    assert ctypes.sizeof(structs.KvmUserspaceMemoryRegion) == 32
    assert ctypes.sizeof(structs.KvmIoeventfd) == 64
    assert ctypes.sizeof(structs.KvmIrqfd) == 32
    assert ctypes.sizeof(structs.KvmLapicState) == 1024
    assert structs.RUN_SYNC_OFFSET == 0x120  # kvm_valid_regs, right after the 256-byte exit union
    assert structs.RUN_SYNC_OFFSET + structs.KvmRunSync.s.offset == 0x130  # the sync regs themselves
    assert ctypes.sizeof(structs.KvmRunSyncUnion) == 2048
    assert ctypes.sizeof(structs.KvmSyncRegs) == 0x90 + 0x138 + 0x40  # kvm_regs, kvm_sregs, kvm_vcpu_events


def test_ioctl_encoding_follows_asm_generic() -> None:
    """_IOC(dir, type, nr, size) = dir << 30 | size << 16 | type << 8 | nr, decoded back from the numbers."""

    def decode(number: int) -> tuple[int, int, int, int]:
        return number >> 30, (number >> 16) & 0x3FFF, (number >> 8) & 0xFF, number & 0xFF

    assert decode(ioctls.KVM_RUN) == (0, 0, 0xAE, 0x80)
    assert decode(ioctls.KVM_SET_SREGS) == (1, ctypes.sizeof(structs.KvmSregs), 0xAE, 0x84)
    assert decode(ioctls.KVM_GET_SREGS) == (2, ctypes.sizeof(structs.KvmSregs), 0xAE, 0x83)
    assert decode(ioctls.KVM_GET_SUPPORTED_CPUID) == (3, 8, 0xAE, 0x05)
    # The numbers everyone has seen in strace output.
    assert ioctls.KVM_RUN == 0xAE80
    assert ioctls.KVM_CREATE_VM == 0xAE01
    assert ioctls.KVM_SET_USER_MEMORY_REGION == 0x4020AE46


def test_msrs_type_holds_the_requested_entries() -> None:
    for count in (1, 11):
        msrs = structs.kvm_msrs_type(count)()
        assert len(msrs.entries) == count  # type: ignore[attr-defined]
        assert ctypes.sizeof(msrs) == 8 + 16 * count


def test_ioctl_failure_is_an_os_error_with_errno() -> None:
    import errno
    import os

    read_end, write_end = os.pipe()
    try:
        with pytest.raises(ioctls.KvmIoctlError) as caught:
            ioctls.ioctl(read_end, ioctls.KVM_GET_API_VERSION)
        assert caught.value.errno in (errno.ENOTTY, errno.EINVAL)
        assert "KVM ioctl 0xae00 failed" in str(caught.value)
    finally:
        os.close(read_end)
        os.close(write_end)
