"""tests/guest/qemu_vm.py without KVM: QEMU's command line for given options, the agent's line protocol over a
socket, the wait for the virtio-pci devices, the QMP events of a QEMU that ended by itself, and where the vCPUs of
a QEMU that did not come up are."""

import base64
import socket
import subprocess
import threading
from pathlib import Path
from typing import Any

import pytest

from tests.guest import qemu_vm
from tests.guest.qemu_vm import (
    AgentSocket,
    QemuGuest,
    QemuMachine,
    balloon_device,
    pmem_device,
    qemu_cmdline,
    vcpu_positions,
    vcpu_verdict,
    virtio_mem_device,
    wait_for_virtio_devices,
)

MiB, GiB = 1 << 20, 1 << 30


AGENT_DEVICES = ["virtio-serial-pci,id=agent-serial", "virtconsole,chardev=agent,id=agent-port"]


def _after(argv: list[str], flag: str) -> list[str]:
    """Every value given to `flag` in `argv`, in order."""
    return [argv[i + 1] for i, word in enumerate(argv[:-1]) if word == flag]


def test_the_command_line_is_memvisors_without_pci_off() -> None:
    line = qemu_cmdline("no5lvl reboot=t")
    assert "pci=off" not in line.split()
    assert line.startswith("console=ttyS0 8250.nr_uarts=2 quiet io_delay=none") and line.endswith("no5lvl reboot=t")
    assert qemu_cmdline() == line.removesuffix(" no5lvl reboot=t")
    # /init insmods virtio_pci first (memvisor/guest/init.sh), in load order, from the appended archive
    insmod = [word for word in line.split() if word.startswith("mvinsmod=")]
    assert insmod == ["mvinsmod=/usr/lib/memvisor/virtio_pci_legacy_dev.ko,/usr/lib/memvisor/virtio_pci_modern_dev.ko,"
                      "/usr/lib/memvisor/virtio_pci.ko"]  # fmt: skip


def test_devices_take_memvisors_properties() -> None:
    assert balloon_device() == ["-device", "virtio-balloon-pci,id=balloon0"]
    assert balloon_device(hint=True, deflate_on_oom=False) == [
        "-object", "iothread,id=balloon0-hints",
        "-device", "virtio-balloon-pci,id=balloon0,deflate-on-oom=off,free-page-hint=on,iothread=balloon0-hints",
    ]  # fmt: skip
    assert balloon_device(reporting=True, deflate_on_oom=True)[-1].endswith("deflate-on-oom=on,free-page-reporting=on")
    assert virtio_mem_device(GiB, unplugged_inaccessible=True) == [
        "-object", "memory-backend-memfd,id=vm0-mem,size=1024M",
        "-device", "virtio-mem-pci,id=vm0,memdev=vm0-mem,block-size=2M,requested-size=0,unplugged-inaccessible=on",
    ]  # fmt: skip
    with pytest.raises(ValueError, match="not a positive multiple of the block size"):
        virtio_mem_device(3 * MiB)
    assert pmem_device(Path("/x/pm.img"), 256 * MiB)[1] == "memory-backend-file,id=pm0-mem,mem-path=/x/pm.img,size=256M,share=on"


def test_a_machine_with_hotplugged_memory_gets_maxmem_and_sockets_apart(tmp_path: Path) -> None:
    machine = QemuMachine(kernel=Path("/k"), initrd=Path("/i"), cmdline="console=ttyS0", memory=2 * GiB,
                          work=tmp_path / "logs", sockets=tmp_path / "run", vcpus=2, no_reboot=True,
                          devices=balloon_device() + virtio_mem_device(GiB))  # fmt: skip
    argv = machine.argv()
    assert argv[:5] == ["qemu-system-x86_64", "-accel", "kvm", "-cpu", "host"]
    assert _after(argv, "-smp") == ["2"] and _after(argv, "-m") == ["2048M,maxmem=3072M"]
    assert _after(argv, "-machine") == ["pc,memory-backend=ram"]
    assert _after(argv, "-object")[0] == "memory-backend-memfd,id=ram,size=2048M"
    assert _after(argv, "-serial") == [f"file:{tmp_path}/logs/qemu-console.log"]  # the agent is on a virtio-console
    assert _after(argv, "-qmp") == [f"unix:{tmp_path}/run/qemu-qmp.sock,server=on,wait=off"]
    assert f"path={tmp_path}/run/qemu-agent.sock" in _after(argv, "-chardev")[0]
    assert _after(argv, "-device") == [*AGENT_DEVICES, "virtio-balloon-pci,id=balloon0", virtio_mem_device(GiB)[-1]]
    assert argv[-1] == "-no-reboot" and argv.count("-no-reboot") == 1
    assert (machine.stderr, machine.console) == (tmp_path / "logs/qemu-stderr.log", tmp_path / "logs/qemu-console.log")


def test_a_plain_machine_has_no_maxmem_and_tcg_uses_cpu_max(tmp_path: Path) -> None:
    machine = QemuMachine(kernel=Path("/k"), initrd=Path("/i"), cmdline="c", memory=GiB, work=tmp_path, accel="tcg")
    argv = machine.argv()
    assert argv[1:5] == ["-accel", "tcg", "-cpu", "max"] and _after(argv, "-m") == ["1024M"]
    assert "-no-reboot" not in argv and _after(argv, "-smp") == ["1"]
    assert _after(argv, "-qmp") == [f"unix:{tmp_path}/qemu-qmp.sock,server=on,wait=off"]
    machine.maxmem = 4 * GiB
    assert _after(machine.argv(), "-m") == ["1024M,maxmem=4096M"]
    machine.accel = "hvf"
    with pytest.raises(ValueError, match="give kvm or tcg"):
        machine.argv()


def test_a_migration_destination_waits_with_incoming_last(tmp_path: Path) -> None:
    machine = QemuMachine(kernel=Path("/k"), initrd=Path("/i"), cmdline="c", memory=GiB, work=tmp_path,
                          devices=balloon_device(hint=True), no_reboot=True)  # fmt: skip
    source = machine.argv()
    assert "-incoming" not in source
    machine.incoming = f"unix:{tmp_path}/mig.sock"
    assert machine.argv() == [*source, "-incoming", f"unix:{tmp_path}/mig.sock"]


def test_the_memory_benchmark_gives_qemu_what_it_gave_before(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """benchmarks/memory_vs_qemu.py's QEMU command line, now built here: the same guest and devices as before."""
    from benchmarks import memory_vs_qemu

    seen: list[list[str]] = []

    class Started(Exception):
        pass

    def popen(argv: list[str], **kwargs: Any) -> None:
        seen.append(argv)
        raise Started

    monkeypatch.setattr(memory_vs_qemu.subprocess, "Popen", popen)
    with pytest.raises(Started):
        memory_vs_qemu.QemuVm(tmp_path, Path("/k"), Path("/i"), reporting=False, pmem=tmp_path / "pmem.img")
    (argv,) = seen
    assert _after(argv, "-m") == ["1024M,maxmem=4096M"] and _after(argv, "-smp") == ["1"]
    assert _after(argv, "-device") == [
        *AGENT_DEVICES,
        "virtio-balloon-pci,id=balloon0",
        "virtio-mem-pci,id=vm0,memdev=vm0-mem,block-size=2M,requested-size=0",
        "virtio-pmem-pci,memdev=pm0-mem,id=pm0",
    ]
    assert "memory-backend-memfd,id=vm0-mem,size=2048M" in _after(argv, "-object")
    assert _after(argv, "-qmp") == [f"unix:{tmp_path}/qemu-qmp.sock,server=on,wait=off"]  # manual_manager_check's
    with pytest.raises(Started):
        memory_vs_qemu.QemuVm(tmp_path, Path("/k"), Path("/i"), reporting=True, pmem=None)
    assert _after(seen[1], "-device") == [*AGENT_DEVICES, "virtio-balloon-pci,id=balloon0,free-page-reporting=on"]


# --- the agent over a socket ------------------------------------------------------------------------------------------


def _agent(server: socket.socket, answers: dict[str, tuple[int, bytes]]) -> None:
    """A pretend guest agent (memvisor/guest/agent.sh's protocol): PONG to pings, RUN answered from `answers`."""
    conn, _ = server.accept()
    buffer = b""
    with conn:
        while True:
            data = conn.recv(4096)
            if not data:
                return
            buffer += data
            while b"\n" in buffer:
                line, buffer = buffer.split(b"\n", 1)
                words = line.split()
                if words[:1] == [b"PING"]:
                    conn.sendall(words[1] + b" PONG\n")
                elif words[:1] == [b"RUN"]:
                    status, out = answers[base64.b64decode(words[2]).decode()]
                    conn.sendall(b"p9 PONG\n" + words[1] + b" O " + base64.b64encode(out) + b"\n"
                                 + words[1] + b" X " + str(status).encode() + b"\n")  # fmt: skip


def test_the_agent_runs_commands_and_skips_stray_lines(tmp_path: Path) -> None:
    path = tmp_path / "agent.sock"
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(path))
    server.listen(1)
    thread = threading.Thread(target=_agent, args=(server, {"cat /proc/uptime": (0, b"12.5 3.0\n"),
                                                            "false": (1, b"")}), daemon=True)  # fmt: skip
    thread.start()
    agent = AgentSocket(path, timeout=10)
    assert agent.exec("cat /proc/uptime", 10) == (0, "12.5 3.0\n")
    assert agent.exec("false", 10) == (1, "")
    agent.close()
    thread.join(5)
    server.close()


def test_an_agent_socket_nobody_listens_on_is_named(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match=r"agent socket .*nothing.sock never accepted within 0 s"):
        AgentSocket(tmp_path / "nothing.sock", timeout=0.2)


def test_devices_that_never_bind_end_the_wait_with_what_the_guest_shows(monkeypatch: pytest.MonkeyPatch) -> None:
    commands: list[str] = []

    def exec(command: str, timeout: float) -> tuple[int, str]:
        commands.append(command)
        if command.startswith("ls "):
            return 2, ""
        return 0, "virtio_pci 28672 0\nvirtio_mem: probe failed" if command.startswith("lsmod") else ""

    monkeypatch.setattr(qemu_vm.time, "sleep", lambda seconds: None)
    with pytest.raises(RuntimeError, match=r"(?s)bind its virtio-pci devices \(/sys/bus/virtio/drivers/virtio_mem.*"
                                           r"probe failed"):  # fmt: skip
        wait_for_virtio_devices(exec, [qemu_vm.VIRTIO_MEM_BOUND], timeout=0)
    assert commands[0] == "ls /sys/bus/virtio/drivers/virtio_mem/virtio* >/dev/null 2>&1"


# --- the QMP events of a QEMU that ended -----------------------------------------------------------------------------


class FakeQmp:
    """qemu.qmp's legacy client as QemuGuest uses it, with its trap: get_events(wait) waits forever unless `wait` is
    a float (or False)."""

    def __init__(self, pending: list[dict[str, Any]]) -> None:
        self.pending = pending
        self.closed = False

    def get_events(self, wait: bool | float = False) -> list[dict[str, Any]]:
        assert wait is False or isinstance(wait, float), f"get_events(wait={wait!r}) would wait forever"
        events, self.pending = self.pending[:1], self.pending[1:]
        return events

    def cmd_obj(self, message: dict[str, Any]) -> dict[str, Any]:
        raise AssertionError(f"QEMU has exited: nobody to send {message} to")

    def close(self) -> None:
        self.closed = True


def test_closing_a_qemu_that_ended_by_itself_keeps_its_last_events(tmp_path: Path) -> None:
    guest = QemuGuest.__new__(QemuGuest)  # a running one needs QEMU and KVM: only its close() here
    shutdown = {"event": "SHUTDOWN", "data": {"guest": True, "reason": "guest-reset"}}
    fake = FakeQmp([{"event": "BALLOON_CHANGE"}, shutdown])
    guest.qmp, guest.agent, guest.events = fake, None, []  # type: ignore[assignment]
    guest.process = subprocess.Popen(["true"])
    guest.process.wait()
    guest._stderr = (tmp_path / "stderr").open("wb")
    guest.close()
    assert guest.events == [{"event": "BALLOON_CHANGE"}, shutdown] and fake.closed


# --- where the vCPUs of a QEMU that did not come up are --------------------------------------------------------------

# HMP `info registers -a` as QEMU 7.2 prints it (cut): a 64-bit vCPU in the kernel, one in real mode, halted.
REGISTERS = """
CPU#0
RAX=0000000000000000 RBX=ffff8f4b40a3c000 RCX=0000000000000001 RDX=0000000000000000
RIP=ffffffffa32592eb RFL=00000246 [---Z-P-] CPL=0 II=0 A20=1 SMM=0 HLT=0
ES =0000 0000000000000000 00000000 00000000
CPU#1
EAX=00000000 EBX=00000000 ECX=0000b79d EDX=00000000
EIP=0000b7b9 EFL=00000246 [---Z-P-] CPL=0 II=0 A20=1 SMM=0 HLT=1
CS =f000 000f0000 0000ffff 00009b00
"""


def test_vcpu_positions_read_hmps_registers() -> None:
    assert vcpu_positions(REGISTERS) == ["cpu0 ip=0xffffffffa32592eb cpl=0 running", "cpu1 ip=0xb7b9 cpl=0 halted"]
    assert vcpu_positions("") == []


def test_the_verdict_tells_an_idle_guest_from_a_busy_one() -> None:
    halted = ["cpu0 ip=0xffffffff81000000 cpl=0 halted"]
    assert "idle" in vcpu_verdict([halted, halted])
    busy = vcpu_verdict([["cpu0 ip=0xffffffff81000010 cpl=0 running"], ["cpu0 ip=0xffffffff81000020 cpl=0 running"]])
    assert "running in 2 of 2 readings at 2 different addresses" in busy and "busy" in busy
    assert vcpu_verdict([[], []]) == "no vCPU registers read"


class SamplingQmp:
    """A QMP peer that answers query-status and HMP info registers."""

    def __init__(self) -> None:
        self.asked: list[dict[str, Any]] = []

    def cmd_obj(self, message: dict[str, Any]) -> dict[str, Any]:
        self.asked.append(message)
        if message["execute"] == "query-status":
            return {"return": {"status": "running", "running": True}}
        assert message == {"execute": "human-monitor-command", "arguments": {"command-line": "info registers -a"}}
        return {"return": REGISTERS}

    def get_events(self, wait: bool | float = False) -> list[dict[str, Any]]:
        return []


def test_a_failed_start_keeps_the_vcpu_samples(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                               capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    monkeypatch.setattr(qemu_vm.time, "sleep", lambda seconds: None)
    guest = QemuGuest.__new__(QemuGuest)  # a running one needs QEMU: its QMP side only
    guest.machine = QemuMachine(kernel=Path("k"), initrd=Path("i"), cmdline="", memory=GiB, work=tmp_path)
    guest.qmp, guest.events = SamplingQmp(), []  # type: ignore[assignment]
    guest.process = subprocess.Popen(["sleep", "30"])
    try:
        guest.keep_vcpu_samples()
    finally:
        guest.process.kill()
        guest.process.wait()
    kept = (tmp_path / "qemu-vcpus.log").read_text().splitlines()
    assert kept[0] == "sample 1: running; cpu0 ip=0xffffffffa32592eb cpl=0 running, cpu1 ip=0xb7b9 cpl=0 halted"
    assert len(kept) == 6 and "running in 5 of 10 readings at 1 different addresses" in kept[-1]
    assert "qemu: vCPUs: sample 5: running" in capsys.readouterr().err
