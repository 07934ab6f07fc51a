"""Device, virtqueue and transport state: save, restore into a fresh device, save again gives equal state,
for the states a driver can reach; a state whose rings lie outside RAM is refused naming the field."""

import dataclasses
import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from memvisor.devices.console.device import RECEIVEQ, TRANSMITQ, VirtioConsoleDevice
from memvisor.devices.console.state import ConsoleState, restore_console, save_console
from memvisor.devices.i8042 import I8042
from memvisor.devices.legacy_state import (
    I8042State,
    RtcState,
    SerialState,
    restore_i8042,
    restore_rtc,
    restore_serial,
    save_i8042,
    save_rtc,
    save_serial,
)
from memvisor.devices.rtc import CmosRtc
from memvisor.devices.serial import Serial16550
from memvisor.snapshot.codec import StateError, decode, encode
from memvisor.virtio.mmio import VirtioMmioTransport
from memvisor.virtio.state import TransportState, restore_transport, save_transport
from memvisor.virtio.testing import attach


def _json(value: Any) -> Any:
    return json.loads(json.dumps(encode(value)))


def _fresh_console(memory: Any) -> tuple[VirtioConsoleDevice, VirtioMmioTransport, list[bytes]]:
    out: list[bytes] = []
    device = VirtioConsoleDevice(out.append)
    return device, VirtioMmioTransport(device, memory, lambda: None), out


@settings(max_examples=30, deadline=None)
@given(
    steps=st.lists(
        st.one_of(
            st.tuples(st.just("send"), st.binary(min_size=1, max_size=300)),
            st.tuples(st.just("post"), st.integers(1, 3)),
            st.tuples(st.just("transmit"), st.binary(min_size=1, max_size=100)),
        ),
        max_size=12,
    ),
    driver_ok=st.booleans(),
)
def test_console_save_restore_save_gives_equal_state(steps: list[tuple[str, Any]], driver_ok: bool) -> None:
    out: list[bytes] = []
    driver = attach(VirtioConsoleDevice(out.append), driver_ok=driver_ok)
    device = driver.transport.device
    assert isinstance(device, VirtioConsoleDevice)
    for kind, value in steps:
        if kind == "send":
            device.send(value)
        elif driver_ok and kind == "post":
            for _ in range(value):
                driver.queues[RECEIVEQ].add_buffer([], [64])
            driver.queues[RECEIVEQ].kick()
        elif driver_ok and kind == "transmit":
            driver.queues[TRANSMITQ].add_buffer([value], [])
            driver.queues[TRANSMITQ].kick()
    transport_state = decode(TransportState, _json(save_transport(driver.transport)))
    console_state = decode(ConsoleState, _json(save_console(device)))

    fresh, transport, _ = _fresh_console(driver.memory)
    restore_console(fresh, console_state)
    restore_transport(transport, transport_state, "transport")
    assert save_transport(transport) == transport_state
    assert save_console(fresh) == console_state
    assert transport.active == driver.transport.active


def test_restored_console_keeps_working_with_the_same_driver() -> None:
    out: list[bytes] = []
    driver = attach(VirtioConsoleDevice(out.append))
    driver.queues[RECEIVEQ].add_buffer([], [64])
    driver.queues[RECEIVEQ].kick()
    state = save_transport(driver.transport)
    console_state = save_console(driver.transport.device)  # type: ignore[arg-type]
    fresh, transport, fresh_out = _fresh_console(driver.memory)
    restore_console(fresh, console_state)
    restore_transport(transport, state, "transport")
    driver.transport = transport  # the guest's driver now talks to the restored device
    fresh.send(b"hello")
    assert [data for _, _, data in driver.queues[RECEIVEQ].get_used()] == [b"hello"]
    driver.queues[TRANSMITQ].add_buffer([b"from guest"], [])
    driver.queues[TRANSMITQ].kick()
    assert fresh_out == [b"from guest"]


def _console_state() -> tuple[Any, TransportState]:
    driver = attach(VirtioConsoleDevice(lambda data: None))
    return driver, save_transport(driver.transport)


def test_queue_rings_outside_ram_are_refused_naming_the_field_and_nothing_changes() -> None:
    driver, state = _console_state()
    queues = list(state.queues)
    queues[1] = dataclasses.replace(queues[1], device_addr=1 << 40)
    bad = dataclasses.replace(state, queues=tuple(queues))
    _, transport, _ = _fresh_console(driver.memory)
    before = save_transport(transport)
    with pytest.raises(StateError, match=r"^transport\.queues\[1\]: queue 1: used ring .* outside guest RAM"):
        restore_transport(transport, bad, "transport")
    assert save_transport(transport) == before  # never half-restored


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"device_id": 2}, r"transport\.device_id"),
        ({"driver_features": 1 << 60}, r"transport\.driver_features"),
    ],
)
def test_transport_state_of_another_device_is_refused(change: dict[str, Any], message: str) -> None:
    driver, state = _console_state()
    _, transport, _ = _fresh_console(driver.memory)
    with pytest.raises(StateError, match=message):
        restore_transport(transport, dataclasses.replace(state, **change), "transport")


@pytest.mark.parametrize(
    ("field", "value", "path"),
    [
        ("size", 3, "state.queues[0].size"),
        ("last_avail_idx", 70000, "state.queues[0].last_avail_idx"),
        ("in_flight", [[500, 1]], "state.queues[0].in_flight[0]"),
    ],
)
def test_untrusted_queue_fields_are_refused(field: str, value: Any, path: str) -> None:
    _, state = _console_state()
    raw = _json(state)
    raw["queues"][0][field] = value
    with pytest.raises(StateError) as caught:
        decode(TransportState, raw)
    assert str(caught.value).startswith(path), str(caught.value)


def test_a_queue_count_that_differs_is_refused() -> None:
    driver, state = _console_state()
    _, transport, _ = _fresh_console(driver.memory)
    with pytest.raises(StateError, match=r"transport\.queues: 1 queues"):
        restore_transport(transport, dataclasses.replace(state, queues=state.queues[:1]), "transport")


@settings(max_examples=30, deadline=None)
@given(writes=st.lists(st.tuples(st.integers(0, 7), st.integers(0, 255)), max_size=30),
       feed=st.binary(max_size=20))  # fmt: skip
def test_serial_save_restore_save(writes: list[tuple[int, int]], feed: bytes) -> None:
    uart = Serial16550(lambda data: None, lambda level: None)
    uart.feed(feed)
    for offset, value in writes:
        uart.write(offset, value)
    state = decode(SerialState, _json(save_serial(uart)))
    fresh = Serial16550(lambda data: None, lambda level: None)
    restore_serial(fresh, state)
    assert save_serial(fresh) == state
    assert [fresh.read(o) for o in (1, 3, 4, 5, 7)] == [uart.read(o) for o in (1, 3, 4, 5, 7)]


def test_rtc_and_i8042_save_restore_save() -> None:
    rtc = CmosRtc()
    rtc.write(0, 0x0B)
    rtc.write(1, 0x06)
    rtc.write(0, 0x40)
    rtc.write(1, 0x99)
    state = decode(RtcState, _json(save_rtc(rtc)))
    fresh = CmosRtc()
    restore_rtc(fresh, state)
    assert save_rtc(fresh) == state
    kbd = I8042(lambda: None)
    kbd.write(4, 0x60)
    kbd.write(0, 0x11)
    kbd.write(4, 0x20)
    kstate = decode(I8042State, _json(save_i8042(kbd)))
    fresh_kbd = I8042(lambda: None)
    restore_i8042(fresh_kbd, kstate)
    assert save_i8042(fresh_kbd) == kstate
    assert fresh_kbd.read(0) == 0x11


def test_untrusted_legacy_states_are_refused() -> None:
    raw = _json(save_rtc(CmosRtc()))
    raw["cmos"] = "AAAA"
    with pytest.raises(StateError, match=r"^state\.cmos: is 3 bytes"):
        decode(RtcState, raw)
    raw = _json(save_serial(Serial16550(lambda d: None, lambda level: None)))
    raw["ier"] = 300
    with pytest.raises(StateError, match=r"^state\.ier"):
        decode(SerialState, raw)


def test_a_uart_s_state_record_keeps_the_stream_layout() -> None:
    """The UART reads and loads its snapshot record itself (one record, no copy field by field); what a
    snapshot or migration stream holds for it stays as before, field for field and in order."""
    uart = Serial16550(lambda data: None, lambda level: None)
    uart.feed(b"hi")
    uart.write(1, 3)
    state = save_serial(uart)
    assert isinstance(state, SerialState)
    assert list(_json(state).items()) == [("ier", 3), ("lcr", 3), ("mcr", 8), ("scr", 0), ("fcr", 0),
                                          ("divisor", 12), ("thri_pending", True), ("line", 1), ("rx", "aGk=")]  # fmt: skip
