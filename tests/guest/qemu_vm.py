"""The same guest under QEMU 7.2 (Debian's qemu-system-x86_64), for comparisons with memvisor: the building
blocks the memory benchmark and scripts/stress-guest-reset share.

    initrd = initrd_with_virtio_pci(image, work / "initrd.img")
    machine = QemuMachine(kernel=image.kernel, initrd=initrd, cmdline=qemu_cmdline(), memory=1 << 30,
                          work=work, devices=balloon_device(hint=True) + virtio_mem_device(1 << 30))
    with QemuGuest(machine, wanted=[BALLOON_BOUND, VIRTIO_MEM_BOUND]) as guest:
        guest.check("free -m")
        guest.cmd("balloon", value=512 << 20)

The guest image has no virtio_pci module (memvisor puts its devices on virtio-mmio), so QEMU's guest gets the
image's initrd with the virtio_pci modules appended as a second cpio archive, and /init insmods them first (the
kernel command line names them: `mvinsmod=`, memvisor's command line less `pci=off` plus that). The guest agent
talks over a virtio-console on PCI (a UNIX socket here), as it does under memvisor (virtio-console on mmio).
It used to talk over the second UART: in the lab (QEMU 7.2 under L1's KVM under QEMU TCG) that channel lost
its interrupts, so a command over a few bytes long could wait minutes or for ever (2026-12-02: no answer to the
virtio_pci insmod in 300 s with 2 vCPUs, on the in-kernel and on the split irqchip; 177 s to bind the balloon
with 1 vCPU), which stopped every QEMU comparison in the lab.
"""

from __future__ import annotations

import base64
import contextlib
import io
import re
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qemu.qmp.legacy import QEMUMonitorProtocol

from memvisor.control.ready import wait_for_qmp
from memvisor.guest import cpio
from memvisor.guest.image import GuestImage
from memvisor.vmm.config import BASE_CMDLINE

MiB = 1 << 20
PCI_MODULES = ("virtio_pci_legacy_dev", "virtio_pci_modern_dev", "virtio_pci")  # load order
MODULE_DIR = "usr/lib/memvisor"  # exists in the guest image's first archive
BALLOON_BOUND = "/sys/bus/virtio/drivers/virtio_balloon/virtio*"
VIRTIO_MEM_BOUND = "/sys/bus/virtio/drivers/virtio_mem/virtio*"
PMEM_BOUND = "/dev/pmem0"
VCPU_HEAD = re.compile(r"^CPU#(\d+)", re.MULTILINE)
VCPU_IP = re.compile(r"^[RE]IP=([0-9a-f]+) [RE]FL=\S+ \[[^\]]*\] CPL=(\d)\b.*\bHLT=(\d)", re.MULTILINE)


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def initrd_with_virtio_pci(image: GuestImage, out: Path) -> Path:
    """The guest image's initrd plus a second newc archive holding the virtio_pci modules (QEMU's transport)."""
    release = image.kernel_release
    packages = Path.home() / ".cache" / "memvisor" / "packages"
    found = sorted(packages.glob(f"linux-image-{release}_*/lib/modules/{release}/kernel/drivers/virtio"))
    if not found:
        raise SystemExit(f"no unpacked linux-image-{release} under {packages}: run `memvisor image build` first")
    extra = io.BytesIO()
    cpio.write_newc(extra, [cpio.file_from_path(f"{MODULE_DIR}/{name}.ko", found[0] / f"{name}.ko")
                            for name in PCI_MODULES])  # fmt: skip
    out.write_bytes(image.initrd.read_bytes() + extra.getvalue())
    return out


def qemu_cmdline(append: str = "") -> str:
    """memvisor's kernel command line for QEMU's guest: the same words, less `pci=off` (its devices are on PCI),
    plus the virtio_pci modules for /init to insmod before anything looks for a device (memvisor/guest/init.sh)."""
    words = [word for word in BASE_CMDLINE.split() if word != "pci=off"]
    words.append("mvinsmod=" + ",".join(f"/{MODULE_DIR}/{name}.ko" for name in PCI_MODULES))
    return " ".join(words + append.split())


# --- the command line -----------------------------------------------------------------------------------------------


def balloon_device(*, hint: bool = False, reporting: bool = False, deflate_on_oom: bool | None = None,
                   ident: str = "balloon0") -> list[str]:  # fmt: skip
    """-device virtio-balloon-pci with memvisor's property names (QEMU's are the same); None leaves a default.
    QEMU runs free page hinting in an iothread, which it must be given."""
    spec = f"virtio-balloon-pci,id={ident}"
    if deflate_on_oom is not None:
        spec += f",deflate-on-oom={'on' if deflate_on_oom else 'off'}"
    spec += f",free-page-hint=on,iothread={ident}-hints" if hint else ""
    spec += ",free-page-reporting=on" if reporting else ""
    return (["-object", f"iothread,id={ident}-hints"] if hint else []) + ["-device", spec]


def virtio_mem_device(max_size: int, *, ident: str = "vm0", block_size: int = 2 * MiB,
                      unplugged_inaccessible: bool | None = None, backend_options: str = "",
                      device_options: str = "") -> list[str]:  # fmt: skip
    """A memfd backend of `max_size` and a virtio-mem-pci device on it, nothing plugged (requested-size=0);
    `backend_options` and `device_options` (",hugetlb=on,...", ",prealloc=on") go after each one's own."""
    if max_size <= 0 or max_size % block_size:
        raise ValueError(f"virtio-mem max-size {max_size} is not a positive multiple of the block size {block_size}")
    spec = f"virtio-mem-pci,id={ident},memdev={ident}-mem,block-size={block_size >> 20}M,requested-size=0"
    if unplugged_inaccessible is not None:
        spec += f",unplugged-inaccessible={'on' if unplugged_inaccessible else 'off'}"
    return ["-object", f"memory-backend-memfd,id={ident}-mem,size={max_size >> 20}M{backend_options}",
            "-device", spec + device_options]  # fmt: skip


def pmem_device(file: Path, size: int, *, ident: str = "pm0") -> list[str]:
    return ["-object", f"memory-backend-file,id={ident}-mem,mem-path={file},size={size >> 20}M,share=on",
            "-device", f"virtio-pmem-pci,memdev={ident}-mem,id={ident}"]  # fmt: skip


@dataclass
class QemuMachine:
    """What QEMU is asked to run: a pc machine on a memfd, the kernel and initrd, the console in a file, the
    agent on a virtio-console (a UNIX socket), QMP on a UNIX socket, then `devices` (-object/-device words)."""

    kernel: Path
    initrd: Path
    cmdline: str
    memory: int
    work: Path
    vcpus: int = 1
    maxmem: int | None = None  # the memory hotplug space for virtio-mem/pmem; None: memory + their backends
    devices: list[str] = field(default_factory=list)
    no_reboot: bool = False  # a guest reset ends QEMU (SHUTDOWN event, reason guest-reset), as memvisor's --reboot exit
    accel: str = "kvm"  # "tcg" runs anywhere (slowly), to check the command line without KVM
    binary: str = "qemu-system-x86_64"
    name: str = "qemu"  # prefix of the files in `work`
    sockets: Path | None = None  # where the UNIX sockets go (default: `work`; a 9p share is no place for them)
    incoming: str | None = None  # `-incoming URI` (unix:PATH, defer): wait for a migration stream, no boot
    ram_options: str = ""  # after guest RAM's `memory-backend-memfd,id=ram,size=...`, e.g. ",hugetlb=on,hugetlbsize=2M"

    @property
    def qmp_socket(self) -> Path:
        return (self.sockets or self.work) / f"{self.name}-qmp.sock"

    @property
    def agent_socket(self) -> Path:
        return (self.sockets or self.work) / f"{self.name}-agent.sock"

    @property
    def console(self) -> Path:
        return self.work / f"{self.name}-console.log"

    @property
    def stderr(self) -> Path:
        return self.work / f"{self.name}-stderr.log"

    @property
    def vcpus_log(self) -> Path:
        return self.work / f"{self.name}-vcpus.log"

    def hotplug_size(self) -> int:
        """The backends' sizes in `devices` (the memory virtio-mem and pmem devices place above RAM)."""
        total = 0
        for word in self.devices:
            if word.startswith("memory-backend-"):
                size = next(p.split("=", 1)[1] for p in word.split(",") if p.startswith("size="))
                shift = {"K": 10, "M": 20, "G": 30}.get(size[-1], 0)
                total += int(size[:-1] if shift else size) << shift
        return total

    def argv(self) -> list[str]:
        if self.vcpus < 1:
            raise ValueError(f"vcpus {self.vcpus}: give at least 1")
        if self.accel not in ("kvm", "tcg"):
            raise ValueError(f"accel {self.accel!r}: give kvm or tcg")
        memory = f"{self.memory >> 20}M"
        maxmem = self.maxmem if self.maxmem is not None else self.memory + self.hotplug_size()
        size = memory if maxmem <= self.memory else f"{memory},maxmem={maxmem >> 20}M"
        argv = [
            self.binary, "-accel", self.accel, "-cpu", "host" if self.accel == "kvm" else "max",
            "-smp", str(self.vcpus), "-nodefaults", "-no-user-config", "-display", "none",
            "-m", size, "-object", f"memory-backend-memfd,id=ram,size={memory}{self.ram_options}",
            "-machine", "pc,memory-backend=ram",
            "-kernel", str(self.kernel), "-initrd", str(self.initrd), "-append", self.cmdline,
            "-serial", f"file:{self.console}",
            "-chardev", f"socket,id=agent,path={self.agent_socket},server=on,wait=off",
            "-device", "virtio-serial-pci,id=agent-serial", "-device", "virtconsole,chardev=agent,id=agent-port",
            "-qmp", f"unix:{self.qmp_socket},server=on,wait=off",
            *self.devices,
        ]  # fmt: skip
        if self.no_reboot:
            argv.append("-no-reboot")
        if self.incoming is not None:
            argv += ["-incoming", self.incoming]
        return argv


# --- talking to it ----------------------------------------------------------------------------------------------------


def connect_qmp(path: Path, process: subprocess.Popen[bytes], timeout: float) -> QEMUMonitorProtocol:
    """The shared wait (memvisor/control/ready.py): refused or missing while the VMM starts is "not yet"."""

    def connect(where: str) -> QEMUMonitorProtocol:
        qmp = QEMUMonitorProtocol(where)
        qmp.connect(negotiate=True)
        return qmp

    return wait_for_qmp(str(path), connect, timeout=timeout, process=process, what=f"{path.name}")


class AgentSocket:
    """The guest agent's line protocol (memvisor/guest/agent.sh) over QEMU's virtio-console, a UNIX socket."""

    def __init__(self, path: Path, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.sock = socket.socket(socket.AF_UNIX)
                self.sock.connect(str(path))
                break
            except OSError:
                self.sock.close()
                if time.monotonic() > deadline:
                    raise RuntimeError(f"QEMU's agent socket {path} never accepted within {timeout:.0f} s") from None
                time.sleep(0.1)
        self.buffer = b""
        self.ids = 0
        # READY may have gone out before we connected (QEMU drops bytes with no client): ping until it answers.
        line = b"(nothing)"
        while True:
            self.ids += 1
            self.sock.sendall(f"PING p{self.ids}\n".encode())
            try:
                line = self._line(time.monotonic() + 3)
                if line == b"MVAGENT READY" or line.endswith(b"PONG"):
                    return
            except TimeoutError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"QEMU's guest agent never answered a PING within {timeout:.0f} s; "
                                   f"last line from it: {line[-200:]!r}")  # fmt: skip

    def _line(self, deadline: float) -> bytes:
        while b"\n" not in self.buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"no whole line from QEMU's agent in time; partial: {self.buffer[-200:]!r}")
            self.sock.settimeout(remaining)
            try:
                data = self.sock.recv(65536)
            except TimeoutError:  # socket.timeout says only "timed out"
                raise TimeoutError(f"no whole line from QEMU's agent in time; partial: {self.buffer[-200:]!r}") from None
            if not data:
                raise RuntimeError("QEMU's agent socket closed")
            self.buffer += data
        line, self.buffer = self.buffer.split(b"\n", 1)
        return line.rstrip(b"\r")

    def exec(self, command: str, timeout: float) -> tuple[int, str]:
        self.ids += 1
        ident = f"c{self.ids}".encode()
        # The leading newline ends any partial line the UART kept from before the agent opened it (a PING cut
        # short): otherwise the agent reads it glued to this request and answers that instead.
        self.sock.sendall(b"\nRUN " + ident + b" " + base64.b64encode(command.encode()) + b"\n")
        deadline = time.monotonic() + timeout
        output = []
        while True:
            try:
                line = self._line(deadline)
            except TimeoutError as error:
                raise TimeoutError(f"QEMU's guest agent did not finish {command!r} within {timeout:.0f} s ({error})") from None
            parts = line.split(b" ", 2)
            if len(parts) < 2 or parts[0] != ident:
                continue  # a late PONG
            if parts[1] in (b"O", b"E") and len(parts) == 3:
                output.append(base64.b64decode(parts[2]))
            elif parts[1] == b"X":
                return int(parts[2]), b"".join(output).decode(errors="replace")

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()


def wait_for_virtio_devices(exec: Callable[[str, float], tuple[int, str]], wanted: list[str], timeout: float = 300
                            ) -> None:  # fmt: skip
    """Wait until every path of `wanted` (e.g. BALLOON_BOUND) exists in the guest: /init loaded virtio_pci
    (`mvinsmod=`) before the agent started, and the virtio drivers bind as the PCI probe finds their devices. On a
    timeout say what the guest shows."""
    probe = " && ".join(f"ls {path} >/dev/null 2>&1" for path in wanted) or "true"
    deadline = time.monotonic() + timeout
    while exec(probe, 120)[0] != 0:
        if time.monotonic() > deadline:
            shown = exec("lsmod; ls /sys/bus/virtio/devices /sys/bus/virtio/drivers /dev; dmesg | tail -40", 120)[1]
            raise RuntimeError(f"timed out after {timeout:.0f} s waiting for QEMU's guest to bind its virtio-pci "
                               f"devices ({', '.join(wanted)}); the guest shows:\n{shown}")  # fmt: skip
        time.sleep(0.5)


def vcpu_positions(registers: str) -> list[str]:
    """HMP `info registers -a` as one word per vCPU: 'cpu0 ip=0xffffffff81234567 cpl=0 running' (or 'halted')."""
    heads = list(VCPU_HEAD.finditer(registers))
    found = []
    for index, head in enumerate(heads):
        end = heads[index + 1].start() if index + 1 < len(heads) else len(registers)
        match = VCPU_IP.search(registers, head.end(), end)
        if match:
            ip, cpl, halted = match.groups()
            found.append(f"cpu{head.group(1)} ip={int(ip, 16):#x} cpl={cpl} {'halted' if halted == '1' else 'running'}")
    return found


def vcpu_verdict(samples: list[list[str]]) -> str:
    """What samples of vcpu_positions say: a guest whose vCPUs sit halted is idle (waiting for an interrupt that
    does not come: a device, a timer, the agent's UART), one that runs kernel code at ever other addresses is
    busy (a probe or a loop starving the agent)."""
    words = [word for sample in samples for word in sample]
    if not words:
        return "no vCPU registers read"
    if all(word.endswith(" halted") for word in words):
        return "every vCPU halted in every sample: the guest is idle, waiting for an interrupt"
    running = [word.split()[1] for word in words if word.endswith(" running")]
    return (f"vCPUs running in {len(running)} of {len(words)} readings at {len(set(running))} different addresses: "
            "the guest is busy")  # fmt: skip


class QemuGuest:
    """A running QEMU guest with its QMP connection and agent, booted and its virtio-pci devices bound; the
    surface of tests/guest/vm.py's GuestVM that scripts use (cmd, check, process, stderr_path, close)."""

    name = "qemu"

    def __init__(self, machine: QemuMachine, *, wanted: list[str], boot_timeout: float = 300) -> None:
        self.machine = machine
        self.stderr_path = machine.stderr
        self.console = machine.console
        self.events: list[dict[str, Any]] = []  # every QMP event seen, in order
        self._stderr = machine.stderr.open("wb")
        self.process = subprocess.Popen(machine.argv(), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                        stderr=self._stderr)  # fmt: skip
        self.qmp: QEMUMonitorProtocol | None = None
        self.agent: AgentSocket | None = None
        try:
            self.qmp = connect_qmp(machine.qmp_socket, self.process, 60)
            self.agent = AgentSocket(machine.agent_socket, boot_timeout)
            wait_for_virtio_devices(self.exec, wanted, boot_timeout)
        except BaseException as error:
            if isinstance(error, Exception):
                self.keep_vcpu_samples()
            self.close()
            raise

    def cmd(self, name: str, **arguments: Any) -> Any:
        """Run a QMP command (arguments with '-' written as '_') and return its "return" value."""
        if self.qmp is None:
            raise RuntimeError("QEMU's QMP is not connected")
        args = {key.replace("_", "-"): value for key, value in arguments.items()}
        try:
            reply = self.qmp.cmd_obj({"execute": name, "arguments": args} if args else {"execute": name})
        finally:
            self.take_events(0)
        if "error" in reply:
            raise RuntimeError(f"qemu: {name} {args}: {reply['error']}")
        return reply["return"]

    def take_events(self, wait: float) -> list[dict[str, Any]]:
        """Move the QMP events QEMU sent into `events` (waiting up to `wait` s for the first); the new ones."""
        if self.qmp is None:
            return []
        new: list[dict[str, Any]] = []
        with contextlib.suppress(Exception):  # a closed connection has nothing more to give
            # A float: qemu.qmp's legacy client waits forever for any other truthy `wait` (an int included).
            new = self.qmp.get_events(wait=float(wait)) if wait > 0 else self.qmp.get_events(wait=False)
        self.events += new
        return new

    def vcpu_samples(self, count: int = 5, gap: float = 1.0) -> list[str]:
        """Where the vCPUs are, `count` times `gap` s apart (QMP query-status, HMP info registers -a), and what
        that says (vcpu_verdict): the guest's side of a wait that timed out."""
        lines, samples = [], []
        for index in range(count):
            if index:
                time.sleep(gap)
            status = self.cmd("query-status").get("status", "?")
            positions = vcpu_positions(self.cmd("human-monitor-command", command_line="info registers -a"))
            samples.append(positions)
            lines.append(f"sample {index + 1}: {status}; {', '.join(positions) or 'no registers'}")
        return [*lines, vcpu_verdict(samples)]

    def keep_vcpu_samples(self) -> None:
        """After a failed start: the vCPU samples into `work`/NAME-vcpus.log and on stderr (best effort)."""
        if self.qmp is None or self.process.poll() is not None:
            return
        try:
            lines = self.vcpu_samples()
        except Exception as error:  # QEMU went away or QMP broke: nothing to add
            lines = [f"cannot read the vCPUs: {error}"]
        self.machine.vcpus_log.write_text("\n".join(lines) + "\n")
        log("\n".join(f"{self.name}: vCPUs: {line}" for line in lines))

    def exec(self, command: str, timeout: float = 300) -> tuple[int, str]:
        if self.agent is None:
            raise RuntimeError("QEMU's guest agent is not connected")
        return self.agent.exec(command, timeout)

    def check(self, command: str, timeout: float = 120) -> str:
        status, output = self.exec(command, timeout)
        if status != 0:
            raise RuntimeError(f"qemu: {command!r} exited {status}: {output[-500:]}")
        return output

    def close(self) -> None:
        """Quit QEMU (kill it if it does not end within 30 s); safe on a guest that failed half-way up."""
        if self.agent is not None:
            self.agent.close()
        if self.qmp is not None:
            if self.process.poll() is None:
                with contextlib.suppress(Exception):
                    self.qmp.cmd_obj({"execute": "quit"})
                self.take_events(0)
            else:  # it ended by itself (-no-reboot: a guest reset): what it said last may still be unread
                while self.take_events(1.0):
                    pass
            with contextlib.suppress(Exception):
                self.qmp.close()
        try:
            self.process.wait(timeout=30 if self.qmp is not None else 0.1)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self._stderr.close()

    def __enter__(self) -> QemuGuest:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
