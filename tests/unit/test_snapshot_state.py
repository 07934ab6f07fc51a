"""State types as data: encode -> JSON -> decode gives the same state; untrusted states are refused by field."""

import ctypes
import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from memvisor.kvm import structs
from memvisor.snapshot.codec import StateError, decode, encode
from memvisor.snapshot.cpu import (
    MSR_IA32_TSC,
    MSR_IA32_TSC_DEADLINE,
    MSR_KVM_SYSTEM_TIME_NEW,
    VcpuState,
    VmState,
    clock_msrs,
    restore_vcpu,
    restore_vcpu_clock,
)


def _size(cls: type[ctypes.Structure]) -> int:
    return ctypes.sizeof(cls)


def vcpu_state(index: int = 0, **changes: Any) -> VcpuState:
    fields: dict[str, Any] = dict(
        index=index,
        mp_state=structs.KVM_MP_STATE_RUNNABLE,
        regs=bytes(_size(structs.KvmRegs)),
        sregs=bytes(_size(structs.KvmSregs)),
        xsave=bytes(structs.XSAVE_REGION_SIZE),
        fpu=bytes(_size(structs.KvmFpu)),
        xcrs=bytes(_size(structs.KvmXcrs)),
        debugregs=bytes(_size(structs.KvmDebugregs)),
        lapic=bytes(1024),
        events=bytes(_size(structs.KvmVcpuEvents)),
        msrs=((MSR_IA32_TSC, 1234), (MSR_IA32_TSC_DEADLINE, 5678)),
        tsc_khz=2_000_000,
        cpuid=bytes(40 * 3),
    )
    fields.update(changes)
    return VcpuState(**fields)


def vm_state(**changes: Any) -> VmState:
    fields: dict[str, Any] = dict(
        clock=10**9, clock_flags=structs.KVM_CLOCK_TSC_STABLE, clock_realtime=0,
        pic_master=bytes(512), pic_slave=bytes(512), ioapic=bytes(512), pit=bytes(_size(structs.KvmPitState2)),
    )  # fmt: skip
    fields.update(changes)
    return VmState(**fields)


def _through_json(value: Any) -> Any:
    return json.loads(json.dumps(encode(value)))


@settings(max_examples=40, deadline=None)
@given(
    regs=st.binary(min_size=_size(structs.KvmRegs), max_size=_size(structs.KvmRegs)),
    lapic=st.binary(min_size=1024, max_size=1024),
    msrs=st.dictionaries(st.integers(0, 2**32 - 1), st.integers(0, 2**64 - 1), max_size=20),
    mp_state=st.sampled_from(structs.X86_MP_STATES),
)
def test_vcpu_state_survives_encode_decode_and_encodes_the_same_again(
    regs: bytes, lapic: bytes, msrs: dict[int, int], mp_state: int
) -> None:
    state = vcpu_state(regs=regs, lapic=lapic, msrs=tuple(sorted(msrs.items())), mp_state=mp_state)
    again = decode(VcpuState, _through_json(state))
    assert again == state
    assert encode(again) == encode(state)


def test_vm_state_round_trip() -> None:
    state = vm_state(pic_master=bytes(range(256)) * 2)
    assert decode(VmState, _through_json(state)) == state


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"lapic": "AAAA"}, "state.lapic"),
        ({"mp_state": 99}, "state.mp_state"),
        ({"regs": 5}, "state.regs"),
        ({"regs": "!!not base64"}, "state.regs"),
        ({"tsc_khz": True}, "state.tsc_khz"),
        ({"msrs": [[16, 1], [16, 2]]}, "state.msrs"),
        ({"msrs": [[16, -1]]}, "state.msrs[0]"),
        ({"msrs": [[16]]}, "state.msrs[0]"),
        ({"cpuid": "AAAA"}, "state.cpuid"),
        ({"xsave": "AAAA"}, "state.xsave"),
    ],
)
def test_untrusted_vcpu_state_is_refused_naming_the_field(change: dict[str, Any], field: str) -> None:
    raw = _through_json(vcpu_state())
    raw.update(change)
    with pytest.raises(StateError) as caught:
        decode(VcpuState, raw)
    assert str(caught.value).startswith(field), str(caught.value)


def test_missing_and_unknown_fields_are_refused() -> None:
    raw = _through_json(vm_state())
    del raw["pit"]
    with pytest.raises(StateError, match=r"^state\.pit: missing"):
        decode(VmState, raw)
    raw = _through_json(vm_state())
    raw["extra"] = 1
    with pytest.raises(StateError, match=r"^state\.extra: unknown field"):
        decode(VmState, raw)
    with pytest.raises(StateError, match="expected an object"):
        decode(VmState, [1, 2])


def test_the_clock_msrs_are_the_tsc_then_tsc_deadline_and_only_those() -> None:
    msrs = {MSR_IA32_TSC_DEADLINE: 9, MSR_KVM_SYSTEM_TIME_NEW: 8, MSR_IA32_TSC: 7, 0x174: 1}
    assert clock_msrs(msrs) == [(MSR_IA32_TSC, 7), (MSR_IA32_TSC_DEADLINE, 9)]
    assert clock_msrs({0x174: 1}) == []


class RecordingVcpu:
    """A vCPU that records the setters restore_vcpu calls, in order."""

    index = 0

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.msr_order: list[int] = []

    def __getattr__(self, name: str) -> Any:
        if name.startswith("set_"):
            return lambda *args: self.calls.append(name)
        raise AttributeError(name)

    def get_tsc_khz(self) -> int:
        return 2_000_000

    refuse: frozenset[int] = frozenset()

    def write_msrs(self, msrs: list[tuple[int, int]]) -> int:
        """Like KVM: writes in order and stops at the first MSR it refuses."""
        self.calls.append("write_msrs")
        for done, (index, _) in enumerate(msrs):
            if index in self.refuse:
                return done
            self.msr_order.append(index)
        return len(msrs)


def test_restore_order_cpuid_first_lapic_before_msrs_events_and_mp_state_last() -> None:
    vcpu = RecordingVcpu()
    state = vcpu_state(msrs=((MSR_IA32_TSC, 1234), (0x174, 1), (MSR_IA32_TSC_DEADLINE, 5678)))
    restore_vcpu(vcpu, state)  # type: ignore[arg-type]
    calls = vcpu.calls
    assert calls[0] == "set_cpuid2"
    assert calls.index("set_sregs") < calls.index("set_lapic") < calls.index("write_msrs")
    assert calls.index("set_xsave") < calls.index("write_msrs")
    assert calls.index("write_msrs") < calls.index("set_vcpu_events") < calls.index("set_mp_state")
    assert calls[-1] == "set_mp_state"
    assert vcpu.msr_order == [0x174]  # the clock MSRs wait for restore_vcpu_clock
    restore_vcpu_clock(vcpu, state)  # type: ignore[arg-type]
    assert vcpu.msr_order == [0x174, MSR_IA32_TSC, MSR_IA32_TSC_DEADLINE]


def test_restore_refuses_a_state_for_another_vcpu() -> None:
    with pytest.raises(StateError, match="index"):
        restore_vcpu(RecordingVcpu(), vcpu_state(index=1))  # type: ignore[arg-type]


def test_a_refused_optional_msr_is_skipped_and_a_critical_one_fails() -> None:
    vcpu = RecordingVcpu()
    vcpu.refuse = frozenset({0x1A0})
    state = vcpu_state(msrs=((MSR_IA32_TSC, 1), (0x1A0, 1), (0x277, 6), (MSR_IA32_TSC_DEADLINE, 2)))
    restore_vcpu(vcpu, state)  # type: ignore[arg-type]
    restore_vcpu_clock(vcpu, state)  # type: ignore[arg-type]
    assert vcpu.msr_order == [0x277, MSR_IA32_TSC, MSR_IA32_TSC_DEADLINE]
    vcpu = RecordingVcpu()
    vcpu.refuse = frozenset({MSR_IA32_TSC_DEADLINE})
    with pytest.raises(StateError, match=r"vcpus\[0\]\.msrs: KVM refused MSR 0x6e0"):
        restore_vcpu_clock(vcpu, vcpu_state())  # type: ignore[arg-type]
