"""Boot time, exits to Python and VMM memory: memvisor against QEMU on the same kernel, initramfs and memory.

Run inside the lab (or on a host with hardware KVM):
    memvisor lab --memory 4G -- .venv/bin/python benchmarks/boot_vs_qemu.py --runs 5

Boot time is wall time from spawning the VMM process to the guest's /init printing its first line on the
console ("memvisor-init: started"), for both VMMs, same kernel, initramfs, command line and memory.
QEMU 7.2 boots through its firmware (SeaBIOS); memvisor boots the bzImage directly in 64-bit mode.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MARKER = b"memvisor-init: started"
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from memvisor.guest.image import find_guest_image  # noqa: E402
from memvisor.vmm.config import BASE_CMDLINE  # noqa: E402


def _rss_parts(pid: int) -> dict[str, int]:
    parts = {}
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith(("RssAnon:", "RssFile:", "RssShmem:")):
                name, value, _ = line.split()
                parts[name.rstrip(":")] = int(value) * 1024
    return parts


def _wait_for_marker(console: Path, process: subprocess.Popen[bytes], timeout: float) -> float:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if console.exists() and MARKER in console.read_bytes():
            return time.monotonic()
        if process.poll() is not None:
            raise RuntimeError(f"the VMM exited with {process.returncode} before /init ran")
        time.sleep(0.01)
    raise RuntimeError("timed out waiting for /init")


def boot_once(argv: list[str], console: Path, settle: float = 3.0) -> tuple[float, dict[str, int]]:
    """Seconds from spawn to /init, and the VMM's RSS parts a few seconds after."""
    started = time.monotonic()
    process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
    try:
        reached = _wait_for_marker(console, process, 180)
        time.sleep(settle)
        rss = _rss_parts(process.pid)
    finally:
        process.kill()
        process.wait()
    return reached - started, rss


def memvisor_argv(kernel: Path, initrd: Path, memory_mib: int, console: Path) -> list[str]:
    return [sys.executable, "-m", "memvisor", "run", "--lab", "off", "--memory", f"{memory_mib}M",
            "--kernel", str(kernel), "--initrd", str(initrd), "--console", str(console)]  # fmt: skip


def qemu_argv(kernel: Path, initrd: Path, memory_mib: int, console: Path) -> list[str]:
    return [
        "qemu-system-x86_64", "-enable-kvm", "-cpu", "host", "-smp", "1", "-nodefaults", "-no-user-config",
        "-display", "none", "-m", f"{memory_mib}M",
        "-object", f"memory-backend-memfd,id=ram,size={memory_mib}M", "-machine", "pc,memory-backend=ram",
        "-kernel", str(kernel), "-initrd", str(initrd), "-append", BASE_CMDLINE,
        "-serial", f"file:{console}", "-serial", "null",
    ]  # fmt: skip


def count_exits_to_init(kernel: Path, initrd: Path, memory_mib: int) -> int:
    """Exits that reached Python before /init's first line (in-process, with the machine's counters)."""
    from memvisor.vmm.config import MachineConfig
    from memvisor.vmm.machine import Machine

    read_fd, write_fd = os.pipe()
    os.set_blocking(read_fd, False)
    machine = Machine(MachineConfig(memory=memory_mib << 20, vcpus=1, kernel=kernel, initrd=initrd), write_fd)
    machine.load()
    machine.start()
    seen = b""
    deadline = time.monotonic() + 180
    try:
        while MARKER not in seen and time.monotonic() < deadline:
            try:
                seen = (seen + os.read(read_fd, 65536))[-4096:]
            except BlockingIOError:
                time.sleep(0.005)
        return sum(machine.exit_counts.values())
    finally:
        machine.stop()
        machine.wait(5)
        machine.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--memory", type=int, default=1024, help="guest memory in MiB")
    parser.add_argument("--json", type=Path, help="also write the raw numbers here")
    args = parser.parse_args()
    image = find_guest_image("default")
    if image is None:
        sys.exit("no guest image: run `memvisor image build` on the host first")
    results: dict[str, dict[str, list[float]]] = {"memvisor": {"boot": [], "vmm_rss": []}, "qemu": {"boot": [], "vmm_rss": []}}
    with tempfile.TemporaryDirectory() as tmp:
        for run in range(args.runs):
            for name, make in (("memvisor", memvisor_argv), ("qemu", qemu_argv)):
                console = Path(tmp) / f"{name}-{run}.log"
                seconds, rss = boot_once(make(image.kernel, image.initrd, args.memory, console), console)
                own = rss.get("RssAnon", 0) + rss.get("RssFile", 0)  # guest RAM is RssShmem (memfd) for both
                results[name]["boot"].append(seconds)
                results[name]["vmm_rss"].append(own / (1 << 20))
                print(f"run {run + 1}: {name:8s} /init after {seconds:6.2f} s, VMM RSS {own / (1 << 20):6.1f} MiB", flush=True)
    exits = count_exits_to_init(image.kernel, image.initrd, args.memory)
    mv, qm = results["memvisor"], results["qemu"]
    boot_ratio = statistics.median(mv["boot"]) / statistics.median(qm["boot"])
    print()
    print(f"| what (median of {args.runs}, {args.memory} MiB, 1 vCPU) | memvisor | QEMU 7.2 | ratio |")
    print("|---|---|---|---|")
    print(f"| spawn to /init (s) | {statistics.median(mv['boot']):.2f} | {statistics.median(qm['boot']):.2f} | {boot_ratio:.2f} |")
    print(f"| VMM memory, RSS less guest RAM (MiB) | {statistics.median(mv['vmm_rss']):.1f} | "
          f"{statistics.median(qm['vmm_rss']):.1f} | {statistics.median(mv['vmm_rss']) / statistics.median(qm['vmm_rss']):.2f} |")  # fmt: skip
    print(f"| exits reaching Python before /init | {exits} | - | - |")
    if args.json:
        args.json.write_text(json.dumps({"results": results, "exits_to_init": exits}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
