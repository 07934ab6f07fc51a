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


class FakeProcess:
    def __init__(self) -> None:
        self.returncode: int | None = None

    def poll(self) -> int | None:
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        if self.returncode is None:
            raise subprocess.TimeoutExpired("memvisor", timeout or 0)
        return self.returncode


class FakeGuestVM:
    """GuestVM's surface as the script uses it, over a pretend memvisor: the balloon and virtio-mem arrive at once;
    `reset_at` (a QMP command count) makes memvisor print a triple fault's report and exit, as --reboot exit does."""

    reset_at: int | None = None
    made: list["FakeGuestVM"] = []

    def __init__(self, workdir: Path, *, memory: str, vcpus: int, devices: list[str], extra: list[str]) -> None:
        self.devices, self.extra = devices, extra
        self.process = FakeProcess()
        self.stderr_path = workdir / "memvisor.stderr"
        self.stderr_path.write_text("")
        self.actual, self.size, self.calls, self.guest_commands = int(memory[:-1]) << 20, 0, 0, []
        FakeGuestVM.made.append(self)

    def _reset(self) -> None:
        self.stderr_path.write_text(STDERR)
        self.process.returncode = 0
        raise ConnectionResetError("memvisor closed the QMP connection")

    def cmd(self, name: str, **arguments: object) -> object:
        self.calls += 1
        if self.process.returncode is not None or self.calls == self.reset_at:
            self._reset()
        if name == "balloon":
            self.actual = int(arguments["value"])  # type: ignore[call-overload]
        elif name == "query-balloon":
            return {"actual": self.actual}
        elif name == "qom-set":
            self.size = int(arguments["value"])  # type: ignore[call-overload]
        elif name == "qom-get":
            return self.size
        return {}

    def check(self, command: str, timeout: float = 120) -> str:
        self.guest_commands.append(command)
        if "sysrq-trigger" in command:
            self._reset()
        return "7 0" if "status" in command else ""

    def close(self) -> None:
        pass


@pytest.fixture
def fake_vm(monkeypatch: pytest.MonkeyPatch) -> type[FakeGuestVM]:
    import tests.guest.vm

    FakeGuestVM.reset_at, FakeGuestVM.made = None, []
    monkeypatch.setattr(tests.guest.vm, "GuestVM", FakeGuestVM)
    return FakeGuestVM


def test_rounds_without_a_reset_pass(script: ModuleType, fake_vm: type[FakeGuestVM], tmp_path: Path,
                                     capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    args = script.parse_args(["--inside", "--rounds", "3", "--virtio-mem", "1G", "--logs", str(tmp_path)])
    assert script.run(args) == 0
    out = capsys.readouterr().out
    assert "round 3:" in out and "3 rounds in" in out and "resets 0 (0 not asked for)" in out
    assert "writer passes 7, checksum mismatches 0" in out and "plug" in out
    (vm,) = fake_vm.made
    assert vm.extra == ["--reboot", "exit"] and vm.devices[1].startswith("virtio-mem,id=vm0,max-size=1024M")
    assert any("md5sum" in command for command in vm.guest_commands)


def test_a_reset_in_a_round_is_reported_with_memvisors_lines(
    script: ModuleType, fake_vm: type[FakeGuestVM], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fake_vm.reset_at = 6  # in the second round (4 QMP commands a round: balloon, query, balloon, query)
    args = script.parse_args(["--inside", "--rounds", "5", "--logs", str(tmp_path)])
    assert script.run(args) == 1
    out = capsys.readouterr().out
    assert "memvisor went away during round 2" in out
    assert "stress-guest-reset: memvisor: the guest reset: triple fault on vCPU 1 (KVM_EXIT_SHUTDOWN); its last" in out
    assert "stress-guest-reset: memvisor:   | [   12.5] virtio_mem" in out
    assert "1 rounds in" in out and "resets 1 (1 not asked for)" in out


def test_the_deliberate_triple_fault_checks_the_diagnostic(
    script: ModuleType, fake_vm: type[FakeGuestVM], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = script.parse_args(["--inside", "--rounds", "1", "--end-with-triple-fault", "--logs", str(tmp_path)])
    assert script.run(args) == 0
    out = capsys.readouterr().out
    assert "resets 1 (0 not asked for)" in out and "diagnostic names a kernel address: OK" in out
    assert fake_vm.made[0].extra == ["--reboot", "exit", "--append", "reboot=t"]
