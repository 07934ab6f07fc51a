"""Classifying /dev/kvm: missing, software (kvm_pvm), hardware."""

import os
from pathlib import Path

import pytest

from memvisor.lab.detect import kvm_status


@pytest.fixture
def device(tmp_path: Path) -> Path:
    node = tmp_path / "kvm"
    node.write_bytes(b"")
    return node


def test_missing_device(tmp_path: Path) -> None:
    status = kvm_status(tmp_path / "kvm", tmp_path, environ={})
    assert status.kind == "missing"
    assert "does not exist" in status.reason and "--lab on" in status.reason


@pytest.mark.may_skip
@pytest.mark.skipif(os.geteuid() == 0, reason="root opens any file")
def test_device_that_cannot_be_opened(device: Path, tmp_path: Path) -> None:
    device.chmod(0)
    assert kvm_status(device, tmp_path, environ={}).kind == "missing"


def test_kvm_pvm_is_software(device: Path, tmp_path: Path) -> None:
    (tmp_path / "modules" / "kvm_pvm").mkdir(parents=True)
    status = kvm_status(device, tmp_path / "modules", environ={})
    assert status.kind == "software"
    assert not status.hardware
    assert "kvm_pvm" in status.reason and "instruction-emulation speed" in status.reason


def test_vendor_module_is_hardware(device: Path, tmp_path: Path) -> None:
    (tmp_path / "modules" / "kvm_intel").mkdir(parents=True)
    status = kvm_status(device, tmp_path / "modules", environ={})
    assert status.hardware and "kvm_intel" in status.reason


def test_inside_the_lab_is_hardware(device: Path, tmp_path: Path) -> None:
    (tmp_path / "modules" / "kvm_pvm").mkdir(parents=True)
    status = kvm_status(device, tmp_path / "modules", environ={"MEMVISOR_IN_LAB": "1"})
    assert status.kind == "hardware" and "lab" in status.reason


def _expected_here() -> str:
    """This machine's kind, worked out independently of kvm_status's code path."""
    try:
        os.close(os.open("/dev/kvm", os.O_RDWR))
    except OSError:
        return "missing"
    if os.environ.get("MEMVISOR_IN_LAB") == "1":
        return "hardware"
    return "software" if Path("/sys/module/kvm_pvm").exists() else "hardware"


def test_this_machine() -> None:
    # docs/LAB.md: the project's machines load kvm_pvm (software); the lab and real hosts are hardware.
    status = kvm_status()
    assert status.kind == _expected_here(), status.reason
    assert status.hardware == (status.kind == "hardware")
