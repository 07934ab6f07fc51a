"""scripts/stress-guest-reset's own logic (the lab part runs only in the lab): its arguments and how it reads
memvisor's reset report out of memvisor's stderr."""

import importlib.machinery
import importlib.util
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "stress-guest-reset"

STDERR = """\
memvisor: guest booted
memvisor: the guest reset: triple fault on vCPU 1 (KVM_EXIT_SHUTDOWN); its last exit before it: MMIO write at \
0xd0000050 (len 4) at rip=0xffffffff81612345 rsp=0xffffc90000013e58 cs=0x10 cr0=0x80050033 cr2=0x0 \
cr3=0x10a3e000 (0.4 ms earlier)
memvisor:   vCPU 0: rip=0xffffffff81001234 rsp=0x1
memvisor:   vCPU 1: rip=0xfff0 rsp=0x0
memvisor:   the guest console's last lines before it:
memvisor:   | [   12.5] virtio_mem virtio2: plugged size: 0x40000000
Traceback-free noise
"""


@pytest.fixture(scope="module")
def script() -> ModuleType:
    loader = importlib.machinery.SourceFileLoader("stress_guest_reset", str(SCRIPT))
    spec = importlib.util.spec_from_loader(loader.name, loader)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


def test_the_reset_line_and_its_report_are_found(script: ModuleType) -> None:
    (line,) = script.reset_lines(STDERR)
    assert line.startswith("memvisor: the guest reset: triple fault on vCPU 1 (KVM_EXIT_SHUTDOWN); its last exit")
    assert line.endswith("(0.4 ms earlier)")
    report = script.reset_report(STDERR)
    assert report[0] == line and report[-1].endswith("plugged size: 0x40000000") and len(report) == 5
    assert script.reset_lines("memvisor: the guest rebooted; restarting it\n") == []


def test_arguments_are_checked_with_the_fix_named(script: ModuleType, capsys: pytest.CaptureFixture[str]) -> None:
    args = script.parse_args(["--memory", "2G", "--balloon-low", "768M", "--virtio-mem", "1G", "--inside"])
    assert (args.memory, args.balloon_low, args.virtio_mem) == (2 << 30, 768 << 20, 1 << 30)
    with pytest.raises(SystemExit):
        script.parse_args(["--memory", "1G", "--balloon-low", "1G"])
    assert "--balloon-low must be below --memory" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        script.parse_args(["--memory", "lots"])
    assert "'lots' is not a size: give e.g. 512M or 1G" in capsys.readouterr().err


def test_help_explains_the_loop() -> None:
    text = subprocess.run([sys.executable, str(SCRIPT), "--help"], capture_output=True, text=True, check=True).stdout
    for words in ("KVM_EXIT_SHUTDOWN", "--reboot exit", "checksum", "--end-with-triple-fault", "memvisor lab"):
        assert words in text
