"""scripts/stress-guest-reset's own logic (the lab part runs only in the lab): its arguments and how it reads
memvisor's reset report out of memvisor's stderr."""

import os
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from tests.unit.scripts import load_script

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
    return load_script("stress-guest-reset", "stress_guest_reset")


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


# --- leaving mechanisms out, and the page walk against memvisor's discard log ---------------------------------------

WALK_REPORT = """\
memvisor: the guest reset: triple fault on vCPU 1 (KVM_EXIT_SHUTDOWN); its last exit before it: HLT at rip=0x1
memvisor:   vCPU 0: rip=0xfff0
memvisor:   page walk at monotonic 5000000000 ns from cr3=0x1ee02000 (4-level paging), the tables as they read now:
memvisor:   rip 0xffffffffb65f6a07: NOT PRESENT at the PD
memvisor:       PML4 table 0x1ee02000 [511] = 0x1ee05067 present
memvisor:       PDPT table 0x1ee05000 [510] = 0x1ee06063 present
memvisor:       PD table 0x1ee06000 [435] = 0x0 NOT PRESENT, table page ALL ZEROS (host page: allocated)
memvisor:   rsp 0xff6b6b5080123e18: maps to gpa 0x3123e18; that page reads ALL ZEROS (host page: hole)
memvisor:       PML4 table 0x1ee02000 [478] = 0x2a01067 present
memvisor:       PDPT table 0x2a01000 [1] = 0x3000063 present (1G page)
memvisor:   page walk: table pages that read ALL ZEROS: 0x1ee06000
"""


def test_mechanisms_can_be_left_out(script: ModuleType, capsys: pytest.CaptureFixture[str]) -> None:
    args = script.parse_args(["--virtio-mem", "1G", "--no-virtio-mem"])
    assert args.virtio_mem == 0
    with pytest.raises(SystemExit):
        script.parse_args(["--no-balloon"])
    assert "--no-balloon without --virtio-mem or --hinting leaves nothing to move" in capsys.readouterr().err
    assert script.parse_args(["--no-balloon", "--virtio-mem", "1G"]).no_balloon


def test_rounds_without_the_balloon_leave_its_device_and_steps_out(
    script: ModuleType, fake_vm: type[FakeGuestVM], tmp_path: Path, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("MEMVISOR_DISCARD_LOG", "")
    args = script.parse_args(["--inside", "--rounds", "2", "--virtio-mem", "1G", "--no-balloon", "--logs", str(tmp_path)])
    assert script.run(args) == 0
    (vm,) = fake_vm.made
    assert [d.split(",")[0] for d in vm.devices] == ["virtio-mem"]
    out = capsys.readouterr().out
    assert "no balloon steps" in out and "inflate" not in out.split("medians:")[1]
    assert os.environ["MEMVISOR_DISCARD_LOG"] == str(tmp_path / "discards.log")  # what memvisor was started with


def _discards(*entries: tuple[int, str, str, int, int]) -> list:
    return [f"{at} {who} {op} gpa={first:#x}-{end:#x} len={end - first:#x} region=ram0 offset={first:#x}"
            for at, who, op, first, end in entries]  # fmt: skip


def test_a_zeroed_table_page_discarded_by_memvisor_is_named_with_its_path_and_time(script: ModuleType) -> None:
    report = WALK_REPORT.splitlines()
    log = _discards((4_480_000_000, "balloon-inflate", "punch", 0x1EE00000, 0x1EE08000),
                    (4_500_000_000, "mem-unplug", "prot-none", 0x1EE06000, 0x1EE07000),
                    (6_000_000_000, "mem-reset", "punch", 0x1EE06000, 0x1EE07000))  # after the walk: not counted
    lines = script.correlate(report, script.parse_discards("\n".join(log) + "\n123 cut sho"))
    assert lines[0] == ("zeroed PD table page 0x1ee06000 (rip 0xffffffffb65f6a07, host page: allocated): DISCARDED by memvisor 1 time(s) "
                        "(balloon-inflate); the last: balloon-inflate (punch) 0.520 s before the page walk: gpa "
                        "0x1ee00000-0x1ee08000, region ram0 offset 0x1ee00000; NOT given back to the guest since")  # fmt: skip
    assert lines[1].startswith("zeroed PD table page 0x1ee06000 (rip 0xffffffffb65f6a07, host page: allocated): made "
                           "inaccessible 1 time(s)")
    assert "zeroed page page 0x3123000 (rsp 0xff6b6b5080123e18, host page: hole): never discarded by memvisor (of 3" in lines[2]
    assert any(line.startswith("PML4 table page 0x1ee02000 (rip 0xffffffffb65f6a07): DISCARDED") for line in lines)
    assert lines[-1].startswith("verdict: a page of the walks that reads all zeros WAS DISCARDED by memvisor and not "
                                "given back since (suspect a")  # fmt: skip
    log.insert(1, "4490000000 balloon-deflate give-back gpa=0x1ee06000-0x1ee07000 len=0x1000 region=ram0 offset=0x1ee06000")
    lines = script.correlate(report, script.parse_discards("\n".join(log)))
    assert lines[0].endswith("; given back to the guest since by balloon-deflate (give-back) 0.510 s before the page "
                             "walk: gpa 0x1ee06000-0x1ee07000, region ram0 offset 0x1ee06000")  # fmt: skip
    assert lines[-1].startswith("verdict: the pages that read all zeros were discarded by memvisor but given back")


def test_a_zeroed_table_page_memvisor_never_discarded_points_elsewhere(script: ModuleType) -> None:
    report = WALK_REPORT.splitlines()
    lines = script.correlate(report, script.parse_discards("\n".join(_discards(
        (1, "balloon-inflate", "punch", 0x40000000, 0x40001000))), ))  # fmt: skip
    assert lines[0] == ("zeroed PD table page 0x1ee06000 (rip 0xffffffffb65f6a07, host page: allocated): never "
                        "discarded by memvisor (of 1 logged operations)")  # fmt: skip
    assert lines[-1].startswith("verdict: the pages that read all zeros were NOT discarded by memvisor")
    calm = [line for line in report if "ALL ZEROS" not in line]
    assert script.correlate(calm, [])[-1] == ("verdict: no page of the walks reads all zeros; the last rip now: NOT "
                                              "PRESENT at the PD")  # fmt: skip
    assert script.correlate(report[:2], [])[-1].startswith("verdict: memvisor's reset report has no page walk")
    assert script.correlate(report, None) == ["verdict: no discard log to match the page walk against"]


def test_after_a_reset_the_script_prints_the_match(
    script: ModuleType, fake_vm: type[FakeGuestVM], tmp_path: Path, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("MEMVISOR_DISCARD_LOG", "")

    def reset(self: FakeGuestVM) -> None:
        self.stderr_path.write_text(WALK_REPORT)
        Path(os.environ["MEMVISOR_DISCARD_LOG"]).write_text(
            "\n".join(_discards((4_000_000_000, "mem-unplug", "punch", 0x1EE06000, 0x1EE07000))) + "\n")
        self.process.returncode = 0
        raise ConnectionResetError("memvisor closed the QMP connection")

    monkeypatch.setattr(FakeGuestVM, "_reset", reset)
    fake_vm.reset_at = 3
    args = script.parse_args(["--inside", "--rounds", "5", "--logs", str(tmp_path)])
    assert script.run(args) == 1
    out = capsys.readouterr().out
    assert ("stress-guest-reset: page walk vs discards: zeroed PD table page 0x1ee06000 (rip 0xffffffffb65f6a07, host "
            "page: allocated): DISCARDED by memvisor 1 time(s) (mem-unplug); the last: mem-unplug (punch) 1.000 s before") in out
    assert "stress-guest-reset: page walk vs discards: verdict: a page of the walks that reads all zeros WAS" in out


def test_a_discard_log_elsewhere_is_used_and_copied_into_the_logs(
    script: ModuleType, fake_vm: type[FakeGuestVM], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MEMVISOR_DISCARD_LOG", "/somewhere/else.log")
    elsewhere = tmp_path / "run" / "discards-here.log"
    elsewhere.parent.mkdir()
    logs = tmp_path / "logs"
    args = script.parse_args(["--inside", "--rounds", "1", "--logs", str(logs), "--discard-log", str(elsewhere)])

    def balloon_discards(self: FakeGuestVM, name: str, **arguments: object) -> object:
        if name == "balloon":
            Path(os.environ["MEMVISOR_DISCARD_LOG"]).write_text("1 balloon-inflate punch gpa=0x0-0x1000 len=0x1000 "
                                                                "region=ram0 offset=0x0\n")  # fmt: skip
        return original(self, name, **arguments)

    original = FakeGuestVM.cmd
    monkeypatch.setattr(FakeGuestVM, "cmd", balloon_discards)
    assert script.run(args) == 0
    assert os.environ["MEMVISOR_DISCARD_LOG"] == str(elsewhere)
    assert (logs / "discards.log").read_text() == elsewhere.read_text() != ""


# --- the same loop under QEMU (--vmm qemu) ---------------------------------------------------------------------------


def test_qemu_is_refused_memvisors_own_options_with_the_fix_named(
    script: ModuleType, capsys: pytest.CaptureFixture[str]
) -> None:
    assert script.parse_args(["--vmm", "qemu", "--kvm-trace", "--end-with-triple-fault"]).vmm == "qemu"
    assert script.parse_args([]).vmm == "memvisor"
    with pytest.raises(SystemExit):
        script.parse_args(["--vmm", "qemu", "--discard-log", "/run/d.log"])
    assert "--discard-log is memvisor's" in (err := capsys.readouterr().err) and "leave --discard-log out" in err
    with pytest.raises(SystemExit):
        script.parse_args(["--qemu-accel", "tcg"])
    assert "--qemu-accel is for --vmm qemu" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        script.parse_args(["--vmm", "bhyve"])
    assert "invalid choice: 'bhyve'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        script.parse_args(["--vmm", "qemu", "--memory", "1025M"])
    assert "must be multiples of 2M" in capsys.readouterr().err


def _after(argv: list[str], flag: str) -> list[str]:
    return [argv[i + 1] for i, word in enumerate(argv[:-1]) if word == flag]


def test_qemu_gets_the_guest_and_devices_memvisor_gets(script: ModuleType, tmp_path: Path) -> None:
    args = script.parse_args(["--vmm", "qemu", "--memory", "2G", "--vcpus", "2", "--hinting", "--virtio-mem", "1G",
                              "--append", "no5lvl", "--end-with-triple-fault"])  # fmt: skip
    machine = script.qemu_machine(args, Path("/img/vmlinuz"), Path("/run/initrd-pci.img"), tmp_path, tmp_path / "s")
    argv = machine.argv()
    assert argv[:5] == ["qemu-system-x86_64", "-accel", "kvm", "-cpu", "host"] and argv[-1] == "-no-reboot"
    assert _after(argv, "-smp") == ["2"] and _after(argv, "-m") == ["2048M,maxmem=3072M"]
    assert _after(argv, "-kernel") == ["/img/vmlinuz"] and _after(argv, "-initrd") == ["/run/initrd-pci.img"]
    (cmdline,) = _after(argv, "-append")
    assert "pci=off" not in cmdline and cmdline.endswith("no5lvl reboot=t")  # the last reboot= wins
    assert _after(argv, "-device") == [
        "virtio-serial-pci,id=agent-serial", "virtconsole,chardev=agent,id=agent-port",  # the guest agent's channel
        "virtio-balloon-pci,id=balloon0,deflate-on-oom=off,free-page-hint=on,iothread=balloon0-hints",
        "virtio-mem-pci,id=vm0,memdev=vm0-mem,block-size=2M,requested-size=0,unplugged-inaccessible=on",
    ]
    assert "memory-backend-memfd,id=vm0-mem,size=1024M" in _after(argv, "-object")
    assert _after(argv, "-qmp") == [f"unix:{tmp_path}/s/qemu-qmp.sock,server=on,wait=off"]  # sockets off --logs
    plain = script.qemu_machine(script.parse_args(["--vmm", "qemu", "--qemu-accel", "tcg"]), Path("/k"), Path("/i"),
                                tmp_path, tmp_path)  # fmt: skip
    assert _after(plain.argv(), "-device") [2:] == ["virtio-balloon-pci,id=balloon0,deflate-on-oom=off"]
    assert _after(plain.argv(), "-m") == ["1024M"] and plain.argv()[1:5] == ["-accel", "tcg", "-cpu", "max"]
    virtio_mem_only = script.parse_args(["--vmm", "qemu", "--no-balloon", "--virtio-mem", "512M"])
    assert [d.split(",")[0] for d in _after(script.qemu_machine(virtio_mem_only, Path("/k"), Path("/i"), tmp_path,
                                                                tmp_path).argv(), "-device")] [2:] == ["virtio-mem-pci"]  # fmt: skip


def test_qemus_reset_events_become_reset_lines(script: ModuleType) -> None:
    stamp = {"seconds": 1796085122, "microseconds": 774597}
    events = [
        {"event": "BALLOON_CHANGE", "data": {"actual": 1}, "timestamp": stamp},
        {"event": "SHUTDOWN", "data": {"guest": False, "reason": "host-qmp-quit"}, "timestamp": stamp},
        {"event": "SHUTDOWN", "data": {"guest": True, "reason": "guest-reset"}, "timestamp": stamp},
        {"event": "RESET", "data": {"guest": True, "reason": "guest-reset"}, "timestamp": stamp},
    ]
    lines = script.qemu_reset_lines(events)
    assert lines[0] == ("qemu: the guest reset: QMP event SHUTDOWN (guest true, reason guest-reset) at "
                        "1796085122.774597; a triple fault (KVM_EXIT_SHUTDOWN) or a reboot the guest asked for")  # fmt: skip
    assert lines[1].startswith("qemu: the guest reset: QMP event RESET") and len(lines) == 2
    assert script.console_tail("a\x1b[31mb\nc\n" * 30) == ["a?[31mb", "c"] * 10


class FakeQemuGuest(FakeGuestVM):
    """QemuGuest's surface over a pretend QEMU: as FakeGuestVM, plus QMP events, a console, the migration that
    stands for a hinting cycle, and a reset that is a SHUTDOWN event (-no-reboot) instead of memvisor's stderr."""

    def __init__(self, workdir: Path, *, memory: str, vcpus: int, devices: list[str], extra: list[str]) -> None:
        super().__init__(workdir, memory=memory, vcpus=vcpus, devices=devices, extra=extra)
        self.stderr_path = workdir / "qemu-stderr.log"
        self.stderr_path.write_text("")
        self.console = workdir / "qemu-console.log"
        self.console.write_text("[    1.0] booted\n")
        self.events: list[dict[str, Any]] = []
        self.migration = "none"
        self.commands: list[str] = []

    def _reset(self) -> None:
        self.events.append({"event": "SHUTDOWN", "data": {"guest": True, "reason": "guest-reset"},
                            "timestamp": {"seconds": 5, "microseconds": 1}})  # fmt: skip
        self.console.write_text("[    1.0] booted\n[   60.1] virtio_mem virtio2: plugged\n")
        self.process.returncode = 0
        raise RuntimeError("QEMU's agent socket closed")

    def cmd(self, name: str, **arguments: object) -> object:
        self.commands.append(name)
        if name.startswith("x-"):
            raise AssertionError(f"{name} is memvisor's: QEMU has no such command")
        answer = super().cmd(name, **arguments)
        if name == "migrate":
            self.migration = "active"
        elif name == "migrate_cancel":
            self.migration = "cancelled"
        elif name == "query-migrate":
            return {"status": self.migration}
        return answer


def _run_under(script: ModuleType, vmm: str, argv: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
               capsys: pytest.CaptureFixture[str], reset_at: int | None = None) -> tuple[int, str, FakeGuestVM]:  # fmt: skip
    import tests.guest.vm

    monkeypatch.setenv("MEMVISOR_DISCARD_LOG", "")
    monkeypatch.setattr(script.time, "sleep", lambda seconds: None)
    made: list[FakeGuestVM] = []
    privates: list[Path] = []

    def guest_vm(workdir: Path, **kwargs: Any) -> FakeGuestVM:
        made.append(FakeGuestVM(workdir, **kwargs))
        return made[-1]

    def boot_qemu(args: Any, logs: Path, private: Path) -> FakeQemuGuest:
        assert private.is_dir() and private != logs
        privates.append(private)
        made.append(FakeQemuGuest(logs, memory=f"{args.memory >> 20}M", vcpus=args.vcpus, devices=[], extra=[]))
        return made[-1]  # type: ignore[return-value]

    monkeypatch.setattr(tests.guest.vm, "GuestVM", guest_vm)
    monkeypatch.setattr(script, "boot_qemu", boot_qemu)
    FakeGuestVM.reset_at = reset_at
    logs = tmp_path / vmm
    status = script.run(script.parse_args(["--inside", "--vmm", vmm, "--logs", str(logs), *argv]))
    FakeGuestVM.reset_at = None
    assert not any(private.exists() for private in privates)  # QEMU's sockets and initrd are cleaned up
    return status, capsys.readouterr().out.replace(str(logs), "LOGS"), made[-1]


def test_both_vmms_print_the_same_rounds_and_summary(
    script: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["--rounds", "2", "--hinting", "--virtio-mem", "1G"]
    outputs = {}
    for vmm in ("memvisor", "qemu"):
        status, out, vm = _run_under(script, vmm, argv, tmp_path, monkeypatch, capsys)
        assert status == 0, out
        outputs[vmm] = [re.sub(r"\d+\.\d+ s|in \d+ s", "T", line) for line in out.splitlines()
                        if re.search(r": round \d|rounds in", line)]  # fmt: skip
    assert outputs["memvisor"] == outputs["qemu"] and len(outputs["qemu"]) == 3
    assert outputs["qemu"][-1].startswith("stress-guest-reset: 2 rounds T; resets 0 (0 not asked for); writer passes 7")
    assert "discards go to" not in out and "under qemu" in out
    assert isinstance(vm, FakeQemuGuest)
    hint = ["migrate-set-parameters", "migrate", "query-migrate", "migrate_cancel", "query-migrate"]
    assert vm.commands[2:7] == hint and vm.commands.count("migrate-set-parameters") == 1  # after the inflate


def test_a_qemu_reset_is_reported_from_its_shutdown_event(
    script: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    status, out, _ = _run_under(script, "qemu", ["--rounds", "5"], tmp_path, monkeypatch, capsys, reset_at=6)
    assert status == 1
    assert "qemu went away during round 2" in out and "resets 1 (1 not asked for)" in out
    assert ("stress-guest-reset: qemu: the guest reset: QMP event SHUTDOWN (guest true, reason guest-reset) at "
            "5.000001") in out  # fmt: skip
    assert "stress-guest-reset: qemu:   | [   60.1] virtio_mem virtio2: plugged" in out
    assert "page walk vs discards" not in out


def test_a_vmm_gone_without_a_reset_report_fails(
    script: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def vanish(self: FakeGuestVM) -> None:
        self.process.returncode = -9
        raise ConnectionResetError("gone")

    monkeypatch.setattr(FakeQemuGuest, "_reset", vanish)
    status, out, _ = _run_under(script, "qemu", ["--rounds", "5"], tmp_path, monkeypatch, capsys, reset_at=2)
    assert status == 1 and "resets 0 (0 not asked for)" in out
    assert "qemu exited with status -9, no reset event (QMP events seen: none)" in out
    assert "failure: qemu went away without a reset report" in out


def test_qemus_deliberate_triple_fault_is_checked_by_its_event(
    script: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    status, out, vm = _run_under(script, "qemu", ["--rounds", "1", "--end-with-triple-fault"], tmp_path,
                                 monkeypatch, capsys)  # fmt: skip
    assert status == 0, out
    assert "resets 1 (0 not asked for)" in out and "was seen (SHUTDOWN, reason guest-reset): OK" in out


def test_a_qemu_that_does_not_boot_shows_its_own_words(
    script: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def boot_qemu(args: Any, logs: Path, private: Path) -> None:
        (logs / "qemu-stderr.log").write_text("qemu-system-x86_64: failed to initialize kvm: Permission denied\n")
        (logs / "qemu-vcpus.log").write_text("every vCPU halted in every sample: the guest is idle\n")
        raise RuntimeError("the VMM exited with status 1 before it answered")

    monkeypatch.setattr(script, "boot_qemu", boot_qemu)
    status = script.run(script.parse_args(["--inside", "--vmm", "qemu", "--logs", str(tmp_path)]))
    out = capsys.readouterr().out
    assert status == 1 and "the guest did not boot: the VMM exited with status 1" in out
    assert "qemu-stderr.log | qemu-system-x86_64: failed to initialize kvm: Permission denied" in out
    assert "qemu-vcpus.log | every vCPU halted in every sample: the guest is idle" in out


def test_an_unwritable_logs_folder_is_a_clear_error(script: ModuleType, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    (tmp_path / "file").write_text("")  # a folder cannot be made under a file, as under the lab's read-only /work
    status = script.run(script.parse_args(["--inside", "--logs", str(tmp_path / "file" / "logs")]))
    err = capsys.readouterr().err
    assert status == 2 and "cannot make the logs folder" in err and "give --logs a folder under /tmp" in err


def test_the_lab_runs_the_projects_python(script: ModuleType, monkeypatch: pytest.MonkeyPatch) -> None:
    ran: list[list[str]] = []
    monkeypatch.setattr(script.subprocess, "call", lambda command, cwd: ran.append(command) or 0)
    assert script.through_lab(script.parse_args(["--rounds", "2"]), ["--rounds", "2"]) == 0
    from memvisor.lab.plan import project_python

    python = project_python(script.REPO)
    assert ran[0][0] == python and ran[0][ran[0].index("--") + 3] == python  # the lab and the loop inside it
    if (script.REPO / ".venv" / "bin" / "python").exists():
        assert python.endswith(".venv/bin/python")
