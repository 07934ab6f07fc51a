"""Attaching the `--device` virtio devices to a machine: memory regions, virtio-mmio slots, interrupts."""

from memvisor.vmm.device_specs import parse_device_specs
from memvisor.vmm.machine import Machine


def attach_devices(machine: Machine) -> None:
    specs = parse_device_specs(machine.config.extra_devices)
    for spec in specs:
        raise NotImplementedError(spec.type)
