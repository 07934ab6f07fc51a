"""Config space atomicity, feature negotiation and reset under a hostile or racing driver (issue 12 items 4, 6, 7, 9)."""

from __future__ import annotations

import threading

from memvisor.devices.balloon import BalloonDevice
from memvisor.devices.balloon.constants import QueueRole
from memvisor.devices.balloon.testing import TOTAL_RAM, BalloonDriver, balloon_memory, stats_buffer
from memvisor.devices.mem import VirtioMemDevice
from memvisor.memory.guest_memory import MemoryRegion
from memvisor.virtio import mmio
from memvisor.virtio.mmio import VirtioMmioTransport
from memvisor.virtio.testing import attach, test_memory

MiB = 1 << 20
GiB = 1 << 30
VMEM_GPA = 1 << 34
OFF_REQUESTED = 48


def _reg(transport: VirtioMmioTransport, offset: int) -> int:
    return int.from_bytes(transport.read(offset, 4), "little")


def test_a_64_bit_config_read_in_two_halves_is_never_torn() -> None:
    """Linux's vm_get reads a u64 as two u32 between two ConfigGeneration reads (virtio 1.2 section 4.2.2.1).

    The driver (a vCPU) reads the generation and the low half, the host changes requested_size from 4G to
    4G-2M, the driver reads the high half and the generation again while the host is still signalling the
    change: the generation must already tell it to retry, or it accepts low(4G) | high(4G-2M) = 0.
    """
    memory = test_memory()
    region = MemoryRegion.memfd(VMEM_GPA, 8 * GiB, "vmem")
    memory.add(region)
    device = VirtioMemDevice(region, requested_size=4 * GiB)
    transport = attach(device, memory).transport
    before = _reg(transport, mmio.CONFIG_GENERATION)
    low = _reg(transport, mmio.CONFIG + OFF_REQUESTED)
    seen: list[int] = []

    def vcpu_finishes_the_read() -> None:
        seen.append(_reg(transport, mmio.CONFIG + OFF_REQUESTED + 4))
        seen.append(_reg(transport, mmio.CONFIG_GENERATION))

    signal = device.signal_config_change
    vcpu = threading.Thread(target=vcpu_finishes_the_read)

    def racing_signal() -> None:
        vcpu.start()
        vcpu.join(0.5)  # the vCPU runs while the host is between the change and the signal
        signal()

    device.signal_config_change = racing_signal  # type: ignore[method-assign]
    device.set_requested_size(4 * GiB - 2 * MiB)
    vcpu.join(5)
    high, after = seen
    value = high << 32 | low
    assert after != before or value in (4 * GiB, 4 * GiB - 2 * MiB), f"torn read accepted: {value:#x}"
    memory.close()


def test_the_older_stats_buffer_comes_back_with_an_interrupt() -> None:
    """A driver that queues a second stats buffer gets the first one back, and hears about it (item 9)."""
    memory = balloon_memory()
    driver = BalloonDriver(BalloonDevice(TOTAL_RAM), memory)
    queue = driver.queues[QueueRole.STATS]
    irqs = driver.virtio.irq_count
    queue.add_buffer([stats_buffer([(4, 1)])], [])
    queue.kick()
    assert len(queue.get_used()) == 1  # the older buffer
    assert driver.virtio.irq_count > irqs
    memory.close()
