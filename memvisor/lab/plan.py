"""Everything the runner decides before starting QEMU: shares, forwards, memory, the command line.

Pure functions of their arguments (paths are resolved on the host), so all of it is unit tested without QEMU.

What the lab sees (see init.sh): the host's root read-only over 9p, with tmpfs folders on LAB_TMPFS. So
- a folder shared read-write must exist on the host and not be under /proc, /sys or /dev; it is mounted over
  the same path inside the lab, so the user's paths work unchanged (inside a lab tmpfs the mount point is
  created first);
- a forwarded socket's folder must be writable inside the lab: a shared folder or one under a lab tmpfs.
"""

from __future__ import annotations

import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from memvisor.errors import MemvisorError, UsageError
from memvisor.units import format_size

# The folders init.sh covers with a tmpfs inside the lab: empty there, whatever the host holds.
LAB_TMPFS = ("/run", "/tmp", "/var/tmp", "/dev/shm")
# Host folders that are not files: they cannot be shared.
UNSHAREABLE = ("/proc", "/sys", "/dev")
# What the lab itself needs besides the guests it runs: kernel, page cache of the 9p root, Python, pytest.
LAB_OVERHEAD = 1536 << 20
# Keep this much of the host's available memory for the host itself.
HOST_RESERVE = 2 << 30
# Under this the lab's own Python does not fit comfortably.
LAB_MINIMUM = 512 << 20
# How far under the host's limit a capped lab stays.
CAP_MARGIN = 64 << 20
PORT_SOCKET = "lab.sock"
# QEMU's human monitor for the diagnosis of a stuck lab (postmortem.py): private, in the lab's temp folder.
MONITOR_SOCKET = "monitor.sock"


def _under(path: str, folders: tuple[str, ...] | list[str]) -> str | None:
    """The first of `folders` that `path` is, or is inside; None if none."""
    for folder in folders:
        if path == folder or path.startswith(folder.rstrip("/") + "/"):
            return folder
    return None


def resolve_share(folder: Path) -> str:
    """Check a folder to share read-write with the lab; returns its resolved host path."""
    resolved = os.path.realpath(folder)
    if not os.path.isdir(resolved):
        raise UsageError(f"cannot share {folder} with the lab: it is not an existing folder; create it first")
    if resolved == "/":
        raise UsageError("cannot share / read-write with the lab: name the folder that holds your files")
    if _under(resolved, UNSHAREABLE):
        raise UsageError(
            f"cannot share {folder} with the lab: {resolved} is under /proc, /sys or /dev, which hold no files; "
            "put the file in a normal folder"
        )
    return resolved


def share_folder_of(path: Path) -> Path:
    """The folder to share so that the lab can write the file `path` (a console log, a pmem backing file)."""
    return Path(os.path.realpath(path)).parent


def resolve_forward(path: Path, shares: list[str]) -> str:
    """Check a UNIX socket path to forward from the host into the lab; returns its absolute host path."""
    absolute = os.path.abspath(path)
    folder = os.path.realpath(os.path.dirname(absolute))
    absolute = os.path.join(folder, os.path.basename(absolute))
    if not os.path.isdir(folder):
        raise UsageError(f"cannot forward socket {path}: its folder {folder} does not exist; create it first")
    if len(absolute.encode()) > 107:
        raise UsageError(
            f"cannot forward socket {path}: UNIX socket paths are limited to 107 bytes; use a shorter one"
        )
    if os.path.lexists(absolute) and not os.path.isdir(absolute) and not _is_socket(absolute):
        raise UsageError(
            f"cannot forward socket {path}: a file that is not a socket is in the way; remove it"
        )
    if _under(folder, shares) is None and _under(folder, LAB_TMPFS) is None:
        raise UsageError(
            f"cannot forward socket {path}: its folder {folder} is read-only inside the lab; "
            f"share it (--share {folder}) or put the socket under /tmp or /run"
        )
    return absolute


def _is_socket(path: str) -> bool:
    import stat

    try:
        return stat.S_ISSOCK(os.lstat(path).st_mode)
    except OSError:
        return False


def check_cwd(cwd: str, shares: list[str]) -> None:
    """The command's working folder must exist inside the lab: not hidden by a lab tmpfs unless shared."""
    resolved = os.path.realpath(cwd)
    hidden = _under(resolved, LAB_TMPFS)
    if hidden is not None and _under(resolved, shares) is None:
        raise UsageError(
            f"the working folder {cwd} is under {hidden}, which is an empty tmpfs inside the lab: "
            f"share it (--share {resolved}) or run from another folder"
        )


def lab_memory_for(guest_memory: int, available: int | None = None) -> int:
    """Memory for a lab that will run guests of `guest_memory` bytes in total.

    Guest memory plus LAB_OVERHEAD, capped at what the host can give (`available`, default MemAvailable,
    minus HOST_RESERVE) as long as the cap still leaves the lab LAB_MINIMUM of its own.
    """
    wanted = guest_memory + LAB_OVERHEAD
    if available is None:
        available = mem_available()
    cap = available - HOST_RESERVE
    if wanted <= cap:
        return wanted
    # MemAvailable moves: leave a margin so that run_in_lab's own check, moments later, still passes.
    capped = (cap - CAP_MARGIN) & ~((1 << 20) - 1)
    if guest_memory + LAB_MINIMUM <= capped:
        return capped
    raise MemvisorError(
        f"a guest of {format_size(guest_memory)} needs a lab of at least {format_size(guest_memory + LAB_MINIMUM)} "
        f"but the host has {format_size(available)} available (keeping {format_size(HOST_RESERVE)} for itself): "
        "give the guest less memory or free some"
    )


def check_lab_memory(memory: int, available: int) -> None:
    """Refuse a lab larger than the host can give (`available` = MemAvailable) while keeping HOST_RESERVE."""
    if memory < LAB_MINIMUM:
        raise UsageError(
            f"lab memory {format_size(memory)} is too small: give it at least {format_size(LAB_MINIMUM)}"
        )
    allowed = available - HOST_RESERVE
    if memory > allowed:
        raise MemvisorError(
            f"the lab needs {format_size(memory)} but the host has {format_size(available)} available "
            f"(keeping {format_size(HOST_RESERVE)} for itself): ask for less memory or free some"
        )


def mem_available(meminfo: Path = Path("/proc/meminfo")) -> int:
    """MemAvailable from /proc/meminfo, in bytes."""
    for line in meminfo.read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    raise MemvisorError(f"no MemAvailable in {meminfo}: cannot size the lab")


def _qemu_path(path: str) -> str:
    """A path as a value inside a QEMU `-opt a=b,c=d` argument (commas are doubled)."""
    return path.replace(",", ",,")


def _kernel_word(name: str, value: str) -> str:
    if not value or any(ch.isspace() or ch == '"' for ch in value):
        raise UsageError(
            f"{name} {value!r} cannot go on the lab's kernel command line: use a path without spaces"
        )
    return f"mvlab.{name}={value}"


@dataclass(frozen=True)
class LabMachine:
    """The L1 machine: what `qemu_command` needs."""

    kernel: Path
    initrd: Path
    memory: int
    cpus: int
    python: str
    root: str
    port_socket: Path
    console_log: Path
    shares: tuple[str, ...] = ()
    early_shares: tuple[str, ...] = ()  # among `shares`: mounted by init.sh before the agent starts
    qemu: str = "qemu-system-x86_64"
    monitor_socket: Path | None = None
    kvm_amd: tuple[str, ...] = ()  # extra kvm_amd module parameters for the lab kernel, e.g. ("npt=0",)


QEMU_ENV = "MEMVISOR_LAB_QEMU"


def lab_qemu() -> str:
    """The QEMU that runs the lab: $MEMVISOR_LAB_QEMU (a path, to try another QEMU release as the lab's emulator;
    docs/LAB.md), else qemu-system-x86_64 from PATH. Benchmarks inside the lab keep using the system's QEMU."""
    return os.environ.get(QEMU_ENV) or "qemu-system-x86_64"


KVM_AMD_ENV = "MEMVISOR_LAB_KVM_AMD"
_MODULE_PARAMETER = re.compile(r"[a-z][a-z0-9_]*=[A-Za-z0-9_.-]+")


DEFAULT_KVM_AMD = ("npt=0",)


def lab_kvm_amd() -> tuple[str, ...]:
    """The kvm_amd parameters for the lab's kernel, loaded after the lab's own `nested=1`.

    Default `npt=0`: the lab's KVM runs nested guests on shadow paging, not on the nested paging QEMU's TCG
    emulates, because on the emulated nested paging guests triple-faulted while their memory moved and on shadow
    paging they did not (docs/LAB.md, "Shadow paging in the lab"). $MEMVISOR_LAB_KVM_AMD replaces the default:
    comma-separated NAME=VALUE words (`npt=1` brings the emulated nested paging back), or empty for kvm_amd's own
    defaults."""
    raw = os.environ.get(KVM_AMD_ENV)
    if raw is None:
        return DEFAULT_KVM_AMD
    if not raw.strip():
        return ()
    words = tuple(word.strip() for word in raw.split(","))
    for word in words:
        if not _MODULE_PARAMETER.fullmatch(word):
            raise UsageError(
                f"${KVM_AMD_ENV} holds {word!r}, not a kvm_amd parameter: write NAME=VALUE pairs separated by "
                "commas, e.g. MEMVISOR_LAB_KVM_AMD=npt=1"
            )
    return words


def project_python(repo: Path) -> str:
    """The Python that scripts starting a lab run inside it: the checkout's virtualenv (`repo`/.venv, which has
    qemu.qmp and pytest) when there is one, else the one running now. A script run through its #!python3 line
    must not take a Python without the test dependencies into the lab."""
    venv = repo / ".venv" / "bin" / "python"
    return str(venv) if venv.exists() else sys.executable


def early_shares(folders: list[str]) -> list[str]:
    """Of `folders` (the package root, the virtualenv), the shareable ones the lab's tmpfs would hide;
    a folder inside another one listed is covered by it."""
    hidden = sorted({resolve_share(Path(f)) for f in folders if _under(os.path.realpath(f), LAB_TMPFS)})
    return [f for f in hidden if not any(f != other and f.startswith(other + "/") for other in hidden)]


def share_tag(index: int) -> str:
    return f"rw{index}"


def qemu_command(machine: LabMachine) -> list[str]:
    """The qemu-system-x86_64 argv for the lab (docs/LAB.md: TCG, `-cpu max` for nested SVM)."""
    if machine.cpus < 1:
        raise UsageError(f"the lab needs at least one vCPU, got {machine.cpus}")
    append = " ".join(
        [
            "console=ttyS0",
            "panic=-1",
            # The whole boot log goes to the console file: a lab that does not start shows how far it got.
            "loglevel=6",
            # A stuck lab is diagnosed through QEMU's monitor (postmortem.py): sysrq keys on its keyboard,
            # else an NMI, which becomes a panic that prints the CPUs' backtraces.
            "sysrq_always_enabled",
            "unknown_nmi_panic=1",
            "panic_print=0x40",
            "mitigations=off",
            # The lab's kernel patches its own text when KVM loads and when the agent first opens a VM
            # (static keys and calls: INT3 over a live instruction, then IPIs). Under QEMU's multi-threaded
            # TCG a CPU can keep executing the stale INT3 and wedge the boot (caught in CI: CPU 0 looping at
            # asm_exc_int3 inside __schedule with the runqueue lock held, CPU 1 spinning on it). The lab
            # boots on one CPU; the agent brings the others online once that patching is done (inner.py).
            *(["maxcpus=1"] if machine.cpus > 1 else []),
            _kernel_word("python", machine.python),
            _kernel_word("root", machine.root),
            *([_kernel_word("kvm_amd", ",".join(machine.kvm_amd))] if machine.kvm_amd else []),
            *[
                _kernel_word("early", f"{share_tag(machine.shares.index(folder))}:{folder}")
                for folder in machine.early_shares
            ],
        ]
    )
    argv = [
        machine.qemu,
        "-accel",
        "tcg,thread=multi",
        "-cpu",
        "max",
        "-smp",
        str(machine.cpus),
        "-m",
        f"{machine.memory >> 20}M",
        "-display",
        "none",
        "-no-reboot",
        "-nodefaults",
        "-net",
        "none",
        "-serial",
        f"file:{machine.console_log}",
        "-kernel",
        str(machine.kernel),
        "-initrd",
        str(machine.initrd),
        "-append",
        append,
        "-virtfs",
        "local,path=/,mount_tag=hostroot,security_model=none,readonly=on,multidevs=remap",
    ]
    # Shares use mapped-xattr: with security_model=none QEMU 7.2 cannot create a UNIX socket (its mknod
    # follow-up opens the new node and gets ENXIO), and forwarded sockets may live in a shared folder. The
    # cost: files the lab creates there are 0600 (folders 0700) on the host, their lab-side modes in xattrs.
    # Early shares (a checkout under /tmp) are only read, and hold the host's own symlinks (a virtualenv's
    # bin/python), which mapped-xattr would present as files: they pass through, read-only, like the root.
    for index, folder in enumerate(machine.shares):
        model = "none,readonly=on" if folder in machine.early_shares else "mapped-xattr"
        argv += [
            "-virtfs",
            f"local,path={_qemu_path(folder)},mount_tag={share_tag(index)},security_model={model},multidevs=remap",
        ]
    if machine.monitor_socket is not None:
        argv += ["-monitor", f"unix:{_qemu_path(str(machine.monitor_socket))},server=on,wait=off"]
    argv += [
        "-device",
        "virtio-serial-pci",
        "-chardev",
        f"socket,id=mvlab,path={_qemu_path(str(machine.port_socket))},server=on,wait=on",
        "-device",
        "virtserialport,chardev=mvlab,name=memvisor.lab",
    ]
    return argv
