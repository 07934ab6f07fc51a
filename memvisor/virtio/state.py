"""The state of a split virtqueue and of the virtio-mmio transport as data (memvisor.snapshot.codec types).

`save_transport(transport)` reads a quiesced transport (no vCPU in its window, no device thread running);
`restore_transport(transport, state)` checks the state against the freshly built transport (same device, same
queue count and maximum sizes, rings inside guest RAM) and only then writes it, so a refused state leaves the
transport as it was built. A device whose driver had set DRIVER_OK is activated again with the restored queues.
"""

from __future__ import annotations

from dataclasses import dataclass

from memvisor.snapshot.codec import StateError, require
from memvisor.virtio.device import STATUS_DRIVER_OK
from memvisor.virtio.mmio import VirtioMmioTransport
from memvisor.virtio.queue import SplitVirtqueue, VirtqueueError


@dataclass(frozen=True)
class QueueState:
    index: int
    max_size: int
    size: int
    ready: bool
    desc_addr: int
    driver_addr: int
    device_addr: int
    last_avail_idx: int
    next_used_idx: int
    signalled_used: int
    event_idx: bool
    indirect_desc: bool
    in_flight: tuple[tuple[int, int], ...]  # (head, count) popped and not yet returned

    def validate(self) -> None:
        require(self.max_size > 0 and self.max_size & (self.max_size - 1) == 0, "max_size", "is not a power of two")
        require(1 <= self.size <= self.max_size and self.size & (self.size - 1) == 0, "size",
                f"{self.size} is not a power of two from 1 to {self.max_size}")  # fmt: skip
        for name in ("desc_addr", "driver_addr", "device_addr"):
            require(0 <= getattr(self, name) < 1 << 64, name, "does not fit 64 bits")
        for name in ("last_avail_idx", "next_used_idx", "signalled_used"):
            require(0 <= getattr(self, name) <= 0xFFFF, name, "does not fit 16 bits")
        for position, (head, count) in enumerate(self.in_flight):
            require(0 <= head < self.size and count > 0, f"in_flight[{position}]", f"head {head} is not in the queue")


@dataclass(frozen=True)
class TransportState:
    device_id: int
    status: int
    needs_reset: bool
    device_features_sel: int
    driver_features_sel: int
    driver_features: int
    queue_sel: int
    shm_sel: int
    interrupt_status: int
    config_generation: int
    queues: tuple[QueueState, ...]

    def validate(self) -> None:
        require(0 <= self.status <= 0xFF, "status", "does not fit 8 bits")
        require(0 <= self.driver_features < 1 << 64, "driver_features", "does not fit 64 bits")
        require(0 <= self.interrupt_status <= 3, "interrupt_status", f"{self.interrupt_status} is not 0 to 3")
        for name in ("device_features_sel", "driver_features_sel", "queue_sel", "shm_sel", "config_generation"):
            require(0 <= getattr(self, name) < 1 << 32, name, "does not fit 32 bits")
        for position, queue in enumerate(self.queues):
            require(queue.index == position, f"queues[{position}].index", f"{queue.index} is out of order")


def save_queue(queue: SplitVirtqueue) -> QueueState:
    return QueueState(
        index=queue.index,
        max_size=queue.max_size,
        size=queue.size,
        ready=queue.ready,
        desc_addr=queue.desc_addr,
        driver_addr=queue.driver_addr,
        device_addr=queue.device_addr,
        last_avail_idx=queue.last_avail_idx,
        next_used_idx=queue.next_used_idx,
        signalled_used=queue.signalled_used,
        event_idx=queue.event_idx,
        indirect_desc=queue.indirect_desc,
        in_flight=tuple(sorted(queue.in_flight.items())),
    )


def check_queue(queue: SplitVirtqueue, state: QueueState, where: str) -> None:
    """Refuse a state that does not fit this queue; rings of a ready queue must lie inside guest RAM."""
    if state.max_size != queue.max_size:
        raise StateError(f"{where}.max_size: {state.max_size} differs from this device's {queue.max_size}")
    if state.ready:
        probe = SplitVirtqueue(queue.index, queue.max_size, queue.memory)
        probe.size, probe.desc_addr = state.size, state.desc_addr
        probe.driver_addr, probe.device_addr = state.driver_addr, state.device_addr
        try:
            probe.check_layout()
        except VirtqueueError as error:
            raise StateError(f"{where}: {error}") from None


def restore_queue(queue: SplitVirtqueue, state: QueueState) -> None:
    queue.reset()
    queue.size = state.size
    queue.desc_addr, queue.driver_addr, queue.device_addr = state.desc_addr, state.driver_addr, state.device_addr
    queue.last_avail_idx, queue.next_used_idx = state.last_avail_idx, state.next_used_idx
    queue.signalled_used = state.signalled_used
    queue.event_idx, queue.indirect_desc = state.event_idx, state.indirect_desc
    queue.in_flight.update(dict(state.in_flight))
    if state.ready:
        queue.enable()


def save_transport(transport: VirtioMmioTransport) -> TransportState:
    with transport.lock:
        return TransportState(
            device_id=transport.device.device_id,
            status=transport.driver_status,
            needs_reset=transport.needs_reset,
            device_features_sel=transport.device_features_sel,
            driver_features_sel=transport.driver_features_sel,
            driver_features=transport.driver_features,
            queue_sel=transport.queue_sel,
            shm_sel=transport.shm_sel,
            interrupt_status=transport.interrupt_status,
            config_generation=transport.config_generation,
            queues=tuple(save_queue(queue) for queue in transport.queues),
        )


def restore_transport(transport: VirtioMmioTransport, state: TransportState, where: str) -> None:
    """Check `state` against `transport`, then load it; a DRIVER_OK device is activated with its queues."""
    if state.device_id != transport.device.device_id:
        raise StateError(f"{where}.device_id: {state.device_id} is not this slot's device {transport.device.device_id}")
    if len(state.queues) != len(transport.queues):
        raise StateError(f"{where}.queues: {len(state.queues)} queues, this device has {len(transport.queues)}")
    if state.driver_features & ~transport.offered_features():
        raise StateError(f"{where}.driver_features: {state.driver_features:#x} has features this device does not offer")
    for queue, queue_state in zip(transport.queues, state.queues, strict=True):
        check_queue(queue, queue_state, f"{where}.queues[{queue.index}]")
    with transport.lock:
        for queue, queue_state in zip(transport.queues, state.queues, strict=True):
            restore_queue(queue, queue_state)
        transport.load_status(state.status, state.needs_reset)
        transport.device_features_sel = state.device_features_sel
        transport.driver_features_sel = state.driver_features_sel
        transport.driver_features = state.driver_features
        transport.queue_sel = state.queue_sel
        transport.shm_sel = state.shm_sel
        transport.interrupt_status = state.interrupt_status
        transport.config_generation = state.config_generation
        if state.status & STATUS_DRIVER_OK and not state.needs_reset:
            transport.device.activate(transport.memory, transport.queues, state.driver_features)
