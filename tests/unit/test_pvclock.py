"""A restore resumes the guest's kvmclock where the guest itself last read it (memvisor/snapshot/pvclock.py)."""

from types import SimpleNamespace
from typing import Any

import pytest

from memvisor.kvm.structs import KVM_CLOCK_TSC_STABLE
from memvisor.memory.guest_memory import GuestMemoryError
from memvisor.snapshot.cpu import MSR_IA32_TSC, MSR_KVM_SYSTEM_TIME_NEW
from memvisor.snapshot.pvclock import PVCLOCK_PAGE, guest_clock_ns, scale_delta
from memvisor.vmm.snapshot import resume_clock

PAGE_GPA = 0x1F000
GHZ_2 = (1 << 32) // 2  # tsc_to_system_mul of a 2 GHz TSC with shift 0: half a ns a tick


def page(version: int = 2, tsc_timestamp: int = 1_000, system_time: int = 50_000_000_000, mul: int = GHZ_2,
         shift: int = 0) -> bytes:  # fmt: skip
    return PVCLOCK_PAGE.pack(version, 0, tsc_timestamp, system_time, mul, shift, 1)


def reader(data: bytes) -> Any:
    def read(gpa: int, length: int) -> bytes:
        if gpa != PAGE_GPA or length != PVCLOCK_PAGE.size:
            raise GuestMemoryError(f"{gpa:#x}+{length:#x} is not the page")
        return data

    return read


def test_the_layout_is_the_32_bytes_of_pvclock_vcpu_time_info() -> None:
    assert PVCLOCK_PAGE.size == 32


def test_scale_delta_follows_linux_for_both_shift_signs() -> None:
    assert scale_delta(2_000, GHZ_2, 0) == 1_000
    assert scale_delta(2_000, 1 << 31, 1) == 2_000  # shift left then half
    assert scale_delta(2_000, 1 << 32, -1) == 1_000  # shift right then one


def test_the_guest_clock_is_system_time_plus_the_scaled_tsc_since_the_page() -> None:
    msr = PAGE_GPA | 1
    assert guest_clock_ns(msr, 1_000 + 2 * 10**9, reader(page())) == 50_000_000_000 + 10**9


@pytest.mark.parametrize(
    ("msr", "tsc", "data"),
    [
        (PAGE_GPA, 5_000, page()),  # kvmclock not enabled (bit 0 clear)
        (PAGE_GPA | 1, 5_000, page(version=3)),  # KVM was updating the page
        (PAGE_GPA | 1, 500, page()),  # the page is newer than the TSC
        (PAGE_GPA | 1, 5_000, page(mul=0)),  # never filled
        (0x7FFF_0000 | 1, 5_000, page()),  # outside guest RAM
    ],
)
def test_no_usable_page_gives_none(msr: int, tsc: int, data: bytes) -> None:
    assert guest_clock_ns(msr, tsc, reader(data)) is None


def _machine_and_state(flags: int, msrs: dict[int, int]) -> tuple[Any, Any]:
    machine = SimpleNamespace(memory=SimpleNamespace(read=reader(page())))
    state = SimpleNamespace(vm=SimpleNamespace(clock=7, clock_flags=flags),
                            cpus=[SimpleNamespace(msr_dict=msrs)])  # fmt: skip
    return machine, state


def test_restore_resumes_at_the_guests_own_reading_unless_kvm_said_its_clock_is_tsc_stable() -> None:
    msrs = {MSR_KVM_SYSTEM_TIME_NEW: PAGE_GPA | 1, MSR_IA32_TSC: 1_000 + 4_000}
    assert resume_clock(*_machine_and_state(0, msrs)) == 50_000_000_000 + 2_000
    assert resume_clock(*_machine_and_state(KVM_CLOCK_TSC_STABLE, msrs)) == 7
    assert resume_clock(*_machine_and_state(0, {MSR_IA32_TSC: 5})) == 7  # kvmclock never set up
    assert resume_clock(*_machine_and_state(0, {**msrs, MSR_KVM_SYSTEM_TIME_NEW: PAGE_GPA})) == 7
