"""`memvisor run`: boot a guest, directly on KVM or through the lab when KVM here is not hardware.

    memvisor run --memory 1G --vcpus 2 --exec 'nproc'     boot, run one command, print its output, power off
    memvisor run --memory 1G --qmp /tmp/vm.sock           stay in the foreground until poweroff or `quit`
"""

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from memvisor.errors import UsageError
from memvisor.memory.backend import parse_memory_backend
from memvisor.units import parse_size
from memvisor.vmm.config import MAX_VCPUS, MachineConfig

LAB_HEADROOM = 1536 << 20
BOOT_TIMEOUT = 300.0
# Beyond the guest's boot and the command: memvisor's start inside the lab and the guest's poweroff.
LAB_MARGIN = 90.0
# What the inner `memvisor run` inherits: the locale and user, and memvisor's own experimental switches.
LAB_ENVIRONMENT = ("LANG", "TERM", "HOME", "USER", "MEMVISOR_IOEVENTFD", "MEMVISOR_DISCARD_LOG")


def add_run_command(subparsers: Any) -> None:
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "run",
        help="boot a guest (directly on KVM, or inside the lab when KVM here is not hardware)",
        description=(
            "Boot a Linux guest from the built Debian image (or --kernel/--initrd). With --exec, run one shell "
            "command in the guest, print its stdout and stderr, power off and exit with its status; the console "
            "then goes to a log file. Without --exec, stay in the foreground with the console on the terminal "
            "until the guest powers off or a `quit` arrives on the control socket. memvisor's own failures exit "
            "with status 125."
        ),
        epilog="examples:\n  memvisor run --memory 1G --vcpus 2 --exec 'nproc'\n"
        "  memvisor run --memory 2G --qmp /tmp/vm0.sock --device virtio-balloon,id=balloon0",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--memory", "-m", default="512M", help="guest RAM, e.g. 512M or 4G (default 512M; at least 128M)")
    parser.add_argument("--memory-backend", default="4k", metavar="4k|thp|hugetlb[,prealloc=on]",
                        help="host pages behind guest RAM and virtio-mem: 4k (default), thp (memfd with transparent "
                        "huge pages; shmem_enabled must allow them) or hugetlb (2 MiB hugetlbfs pages from the "
                        "pool in /proc/sys/vm/nr_hugepages); prealloc=on allocates all of boot RAM at start")  # fmt: skip
    parser.add_argument("--vcpus", "--smp", type=int, default=1, help=f"number of vCPUs, 1 to {MAX_VCPUS} (default 1)")
    parser.add_argument("--kernel", type=Path,
                        help="a kernel to boot instead of the built Debian one: a bzImage (it decompresses itself "
                             "in the guest) or an uncompressed x86_64 vmlinux ELF (loaded as is and entered at "
                             "startup_64: no decompression in the guest, no KASLR). The built image boots its "
                             "vmlinux")  # fmt: skip
    parser.add_argument("--initrd", type=Path, help="an initramfs to use instead of the built one")
    parser.add_argument("--flavour", choices=["default", "cloud"], default="default",
                        help="Debian kernel flavour: default (-amd64) or cloud (-cloud-amd64)")  # fmt: skip
    parser.add_argument("--append", default="", help="extra kernel command-line words")
    parser.add_argument("--exec", dest="command", metavar="CMD", help="run CMD with /bin/sh -c in the guest, then power off")
    parser.add_argument("--timeout", type=float, default=None, help="with --exec: seconds to wait for CMD")
    parser.add_argument("--console", metavar="FILE|-", help="where the guest console goes ('-' for the terminal)")
    parser.add_argument("--qmp", metavar="SOCK", type=Path, help="open the QMP control socket at SOCK")
    parser.add_argument("--device", action="append", default=[], metavar="SPEC",
                        help="add a device, e.g. virtio-balloon,id=balloon0 (repeatable)")  # fmt: skip
    parser.add_argument("--incoming", metavar="file:PATH|tcp:HOST:PORT|unix:PATH|defer",
                        help="restore the snapshot at PATH (saved by QMP migrate) instead of booting, receive a live "
                        "migration on tcp:/unix:, or with defer wait for QMP migrate-incoming to name it; give the same "
                        "--memory, --vcpus and --device as the source")  # fmt: skip
    parser.add_argument("--numa-nodes", type=int, default=1, help="number of NUMA nodes (ACPI SRAT)")
    parser.add_argument("--reboot", choices=["restart", "exit"], default="restart",
                        help="what a guest reboot does: restart the guest (default) or end memvisor")  # fmt: skip
    parser.add_argument("--lab", choices=["auto", "on", "off"], default="auto",
                        help="run inside the lab (QEMU TCG with nested SVM): auto when KVM here is not hardware")  # fmt: skip
    parser.set_defaults(func=run_main)


def _machine_config(args: argparse.Namespace) -> MachineConfig:
    from memvisor.vmm.ioeventfd import requested

    requested()  # a wrong MEMVISOR_IOEVENTFD is refused before the image or the lab is made
    memory = parse_size(args.memory, "--memory")
    backend = parse_memory_backend(args.memory_backend)
    if not 1 <= args.vcpus <= MAX_VCPUS:
        raise UsageError(f"--vcpus {args.vcpus} is out of range: give 1 to {MAX_VCPUS}")
    from memvisor.vmm.device_specs import parse_device_specs

    parse_device_specs(args.device)  # validated before anything boots
    if (args.kernel is None) != (args.initrd is None) and args.kernel is None:
        raise UsageError("--initrd needs --kernel too (or neither, to use the built image)")
    kernel, initrd = args.kernel, args.initrd
    _check_before_image(memory, args)
    if kernel is None:
        from memvisor.guest.image import ensure_guest_image

        image = ensure_guest_image(args.flavour, progress=lambda line: print(f"memvisor: {line}", file=sys.stderr))
        kernel, initrd = image.boot_kernel, image.initrd
    console = None if args.console in (None, "-") else Path(args.console)
    config = MachineConfig(
        memory=memory,
        vcpus=args.vcpus,
        kernel=kernel,
        initrd=initrd,
        append=args.append,
        reboot=args.reboot,
        console_path=console,
        extra_devices=list(args.device),
        numa_nodes=args.numa_nodes,
        memory_backend=backend,
    )
    config.validate()
    return config


def _check_before_image(memory: int, args: argparse.Namespace) -> None:
    """Check the sizes the image does not change before a first run downloads and builds it."""
    probe = MachineConfig(memory=memory, vcpus=args.vcpus, kernel=Path("/"), initrd=None, numa_nodes=args.numa_nodes,
                          memory_backend=parse_memory_backend(args.memory_backend))
    probe.validate_resources()


def _use_lab(choice: str) -> bool:
    if choice == "off":
        return False
    if choice == "on":
        return os.environ.get("MEMVISOR_IN_LAB") != "1"
    from memvisor.lab.detect import kvm_status

    status = kvm_status()
    if status.kind != "hardware":
        print(f"memvisor: {status.reason}", file=sys.stderr)
        return True
    return False


def _run_through_lab(args: argparse.Namespace, argv: list[str], config: MachineConfig) -> int:
    """Run this same command inside the lab, with the files it names shared and the QMP socket forwarded."""
    from memvisor.lab.plan import lab_memory_for
    from memvisor.lab.runner import run_in_lab

    inner = [sys.executable, "-m", "memvisor", "run", *argv, "--lab", "off",
             "--kernel", str(config.kernel), "--initrd", str(config.initrd)]  # fmt: skip
    shares: list[Path] = []
    if config.console_path is not None:
        shares.append(config.console_path.resolve().parent)
    from memvisor.vmm.device_specs import files_named

    shares += [path.resolve().parent for path in files_named(args.device)]
    if args.incoming and args.incoming.startswith("file:"):
        shares.append(Path(args.incoming[len("file:") :]).resolve().parent)
    discard_log = os.environ.get("MEMVISOR_DISCARD_LOG")
    if discard_log:  # the inner memvisor appends to it: its folder must be the host's, shared
        shares.append(Path(discard_log).resolve().parent)
    forwards = [args.qmp.resolve()] if args.qmp else []
    if args.qmp:
        inner += ["--qmp", str(args.qmp.resolve())]
    return run_in_lab(
        inner,
        memory=lab_memory_for(config.memory),
        cwd=os.getcwd(),
        env={key: value for key, value in os.environ.items() if key in LAB_ENVIRONMENT},
        shares=shares,
        forwards=forwards,
        stdin=args.command is None and sys.stdin.isatty(),
        timeout=_lab_deadline(args),
    )


def _lab_deadline(args: argparse.Namespace) -> float | None:
    """With --exec and --timeout, the lab's own deadline: the guest's boot, the command, its poweroff and a
    margin; past it the lab is diagnosed and stopped. Otherwise none (the lab's heartbeat still guards)."""
    if args.command is None or args.timeout is None:
        return None
    return BOOT_TIMEOUT + args.timeout + LAB_MARGIN


def run_main(args: argparse.Namespace, argv: list[str]) -> int:
    config = _machine_config(args)
    if _use_lab(args.lab):
        return _run_through_lab(args, _strip_lab_args(argv), config)
    from memvisor.vmm.session import run_session

    return run_session(config, args)


def _strip_lab_args(argv: list[str]) -> list[str]:
    """The user's `run` arguments without --lab/--kernel/--initrd/--qmp (the inner command sets those)."""
    out: list[str] = []
    skip = False
    for word in argv:
        if skip:
            skip = False
            continue
        name = word.split("=", 1)[0]
        if name in ("--lab", "--kernel", "--initrd", "--qmp"):
            skip = "=" not in word
            continue
        out.append(word)
    return out
