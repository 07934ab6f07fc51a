"""Boot time, exits to Python and VMM memory: memvisor against QEMU on the same kernel, initramfs and memory.

Run inside the lab (or on a host with hardware KVM), after compiling memvisor's bytecode on the host (the lab
sees the checkout read-only, so a module without a fresh .pyc is compiled from source at every start):
    python -m compileall -q memvisor
    memvisor lab --memory 4G -- env PYTHONUNBUFFERED=1 .venv/bin/python benchmarks/boot_vs_qemu.py --runs 5

Boot time is wall time from spawning the VMM process to the guest's /init printing its first line on the
console ("memvisor-init: started at uptime X"), for both VMMs, same kernel, initramfs, command line and
memory; X, the guest's own uptime at that moment, is reported too: the difference is the VMM's start-up,
firmware and kernel decompression. QEMU 7.2 `-machine pc` boots through its firmware (SeaBIOS); `--microvm`
adds QEMU's `-machine microvm` (qboot); memvisor enters the kernel directly in 64-bit mode.

Each VMM boots both forms of the same kernel (`--kernels`): the bzImage Debian ships (the kernel decompresses
itself in the guest) and the guest image's vmlinux (uncompressed; memvisor loads its segments and enters
startup_64, QEMU boots it through its PVH note, SeaBIOS still first). `memvisor run` boots the vmlinux by
default; QEMU users pass the bzImage. The ratios compare like with like, and each VMM's usual choice.
The runs are interleaved, and which VMM boots first rotates from run to run (memvisor, QEMU, ...; then QEMU,
memvisor, ...), so that load from other work on the machine and any warm-up falls on all of them alike. The
table shows medians, the number of boots behind each, and the boots that failed (a failed boot is reported and
not counted).

The exits reaching Python are counted on the timed boots themselves: memvisor runs with `--qmp`, and
`x-query-exits` is read as soon as /init's line is on the console (so it includes the few milliseconds after
it). QEMU's RSS includes its own copies of the kernel and initramfs (loaded through fw_cfg, which keeps them
in QEMU's memory): their sizes are printed under the table, to be read against the "VMM memory" row.
"""

import argparse
import collections
import collections.abc
import dataclasses
import importlib.util
import json
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

MARKER_LINE = re.compile(rb"memvisor-init: started at uptime ([0-9.]+)\s*\n")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.backends import BACKENDS, host_pages, memvisor_args, qemu_ram_options  # noqa: E402
from memvisor.guest.image import find_guest_image  # noqa: E402
from memvisor.vmm.config import BASE_CMDLINE  # noqa: E402

Argv = Callable[[Path, Path, int, Path], list[str]]


def stale_bytecode(package: Path) -> list[Path]:
    """The modules under `package` whose cached bytecode is missing or older than their source."""
    stale = []
    for source in package.rglob("*.py"):
        cached = Path(importlib.util.cache_from_source(str(source)))
        if not cached.exists() or cached.stat().st_mtime < source.stat().st_mtime:
            stale.append(source)
    return stale


def _rss_parts(pid: int) -> dict[str, int]:
    parts = {}
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith(("RssAnon:", "RssFile:", "RssShmem:")):
                name, value, _ = line.split()
                parts[name.rstrip(":")] = int(value) * 1024
    return parts


def _wait_for_marker(console: Path, process: subprocess.Popen[bytes], timeout: float) -> tuple[float, float]:
    """The monotonic time /init's whole marker line was on the console, and the guest uptime it printed."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = MARKER_LINE.search(console.read_bytes()) if console.exists() else None
        if found:
            return time.monotonic(), float(found.group(1))
        if process.poll() is not None:
            raise RuntimeError(f"the VMM exited with {process.returncode} before /init ran")
        time.sleep(0.01)
    raise RuntimeError("timed out waiting for /init")


def _exits(qmp_socket: Path, process: subprocess.Popen[bytes]) -> dict[str, int]:
    """memvisor's exits reaching Python so far, by kind (x-query-exits over its QMP socket)."""
    from memvisor.control.client import QmpConnection
    from memvisor.control.ready import wait_for_qmp

    with wait_for_qmp(str(qmp_socket), QmpConnection, timeout=60, process=process, what="memvisor's QMP") as qmp:
        reply = qmp.execute("x-query-exits")
    return {item["kind"]: int(item["count"]) for item in reply["kinds"]}


def boot_once(
    argv: list[str], console: Path, qmp_socket: Path | None = None, settle: float = 3.0
) -> tuple[float, float, dict[str, int], dict[str, int] | None]:
    """Seconds from spawn to /init, the guest's uptime then, the VMM's RSS parts a few seconds after, and (with
    `qmp_socket`, memvisor only) the exits that reached Python, read as soon as /init's line appeared."""
    started = time.monotonic()
    process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
    try:
        reached, uptime = _wait_for_marker(console, process, 180)
        exits = _exits(qmp_socket, process) if qmp_socket is not None else None
        time.sleep(max(0.0, settle - (time.monotonic() - reached)))
        rss = _rss_parts(process.pid)
    finally:
        process.kill()
        process.wait()
    return reached - started, uptime, rss, exits


# --memory-backend: the same host pages for both VMMs (benchmarks/backends.py, which also sets the host up).
BACKEND = "4k"


def memvisor_argv(kernel: Path, initrd: Path, memory_mib: int, console: Path) -> list[str]:
    return [sys.executable, "-m", "memvisor", "run", "--lab", "off", "--memory", f"{memory_mib}M",
            *memvisor_args(BACKEND),
            "--kernel", str(kernel), "--initrd", str(initrd), "--console", str(console),
            "--qmp", str(console.with_suffix(".qmp"))]  # fmt: skip


def qemu_argv(kernel: Path, initrd: Path, memory_mib: int, console: Path, machine: str = "pc") -> list[str]:
    return [
        "qemu-system-x86_64", "-enable-kvm", "-cpu", "host", "-smp", "1", "-nodefaults", "-no-user-config",
        "-display", "none", "-m", f"{memory_mib}M",
        "-object", f"memory-backend-memfd,id=ram,size={memory_mib}M{qemu_ram_options(BACKEND)}",
        "-machine", f"{machine},memory-backend=ram",
        "-kernel", str(kernel), "-initrd", str(initrd), "-append", BASE_CMDLINE,
        "-serial", f"file:{console}", "-serial", "null",
    ]  # fmt: skip


def microvm_argv(kernel: Path, initrd: Path, memory_mib: int, console: Path) -> list[str]:
    return qemu_argv(kernel, initrd, memory_mib, console, machine="microvm")


def _median(values: collections.abc.Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


@dataclasses.dataclass(frozen=True)
class Variant:
    """One column: a VMM and the kernel file it boots."""

    name: str
    argv: Argv
    kernel: str  # "bzImage" or "vmlinux"
    vmm: str  # "memvisor" or "QEMU"


def variants(microvm: bool, kernels: list[str]) -> list[Variant]:
    found = []
    for kernel in kernels:
        found.append(Variant(f"memvisor {kernel}", memvisor_argv, kernel, "memvisor"))
        found.append(Variant(f"QEMU pc {kernel}", qemu_argv, kernel, "QEMU"))
        if microvm:
            found.append(Variant(f"QEMU microvm {kernel}", microvm_argv, kernel, "QEMU"))
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--memory", type=int, default=1024, help="guest memory in MiB")
    parser.add_argument("--microvm", action="store_true", help="also boot QEMU -machine microvm (qboot)")
    parser.add_argument("--json", help="also write the raw numbers to this file ('-': print them)")
    parser.add_argument("--kernels", default="bzImage,vmlinux",
                        help="which kernel files each VMM boots, comma-separated: bzImage, vmlinux")  # fmt: skip
    parser.add_argument("--memory-backend", choices=BACKENDS, default="4k",
                        help="host pages behind guest RAM, for both VMMs (sets the host's shmem THP and hugetlbfs "
                        "pool for the run and puts them back: needs root)")  # fmt: skip
    args = parser.parse_args()
    global BACKEND
    BACKEND = args.memory_backend
    with host_pages(args.memory_backend, args.memory << 20):  # one VMM at a time holds the guest's RAM
        return _benchmark(args)


def _benchmark(args: argparse.Namespace) -> int:
    image = find_guest_image("default")
    if image is None:
        sys.exit("no guest image: run `memvisor image build` on the host first")
    stale = stale_bytecode(REPO / "memvisor")
    if stale:
        print(f"warning: {len(stale)} memvisor modules have no fresh bytecode (e.g. {stale[0].relative_to(REPO)}): "
              "run `python -m compileall -q memvisor` on the host first", file=sys.stderr)  # fmt: skip
    kernels = [kernel.strip() for kernel in args.kernels.split(",") if kernel.strip()]
    if not kernels or set(kernels) - {"bzImage", "vmlinux"}:
        sys.exit(f"--kernels {args.kernels!r}: give bzImage, vmlinux or both, comma-separated")
    if "vmlinux" in kernels and image.vmlinux is None:
        sys.exit("the guest image has no vmlinux: run `memvisor image build` on the host first")
    files = {"bzImage": image.kernel, "vmlinux": image.vmlinux or image.kernel}
    vmms = {variant.name: variant for variant in variants(args.microvm, kernels)}
    results: dict[str, dict[str, list[float]]] = {name: {"boot": [], "uptime": [], "vmm_rss": []} for name in vmms}
    failures: dict[str, list[str]] = {name: [] for name in vmms}
    exits_per_boot: list[tuple[dict[str, int], str]] = []
    names = list(vmms)
    with tempfile.TemporaryDirectory() as tmp:
        for run in range(args.runs):
            order = names[run % len(names):] + names[:run % len(names)]  # who boots first rotates
            for name in order:
                console = Path(tmp) / f"{name.replace(' ', '-')}-{run}.log"
                variant = vmms[name]
                argv = variant.argv(files[variant.kernel], image.initrd, args.memory, console)
                qmp_socket = console.with_suffix(".qmp") if variant.vmm == "memvisor" else None
                try:
                    seconds, uptime, rss, exits = boot_once(argv, console, qmp_socket)
                except Exception as err:
                    failures[name].append(f"run {run + 1}: {err}")
                    print(f"run {run + 1}: {name:24s} FAILED: {err}", flush=True)
                    continue
                own = rss.get("RssAnon", 0) + rss.get("RssFile", 0)  # guest RAM is RssShmem (memfd) for all
                results[name]["boot"].append(seconds)
                results[name]["uptime"].append(uptime)
                results[name]["vmm_rss"].append(own / (1 << 20))
                if exits is not None:
                    exits_per_boot.append((exits, variant.kernel))
                print(f"run {run + 1}: {name:24s} /init after {seconds:6.2f} s (guest uptime {uptime:5.2f} s), "
                      f"VMM RSS {own / (1 << 20):6.1f} MiB" + (f", {sum(exits.values())} exits" if exits else ""),
                      flush=True)  # fmt: skip
    medians = {name: {key: _median(values) for key, values in numbers.items()} for name, numbers in results.items()}
    print()
    print(f"| median ({args.memory} MiB on {BACKEND} pages, 1 vCPU; {args.runs} runs, first VMM rotating) | " + " | ".join(names) + " |")
    print("|---" * (len(names) + 1) + "|")
    for key, label, fmt in (("boot", "spawn to /init (s)", "{:.2f}"), ("uptime", "guest uptime at /init (s)", "{:.2f}"),
                            ("vmm_rss", "VMM memory, RSS less guest RAM (MiB)", "{:.1f}")):  # fmt: skip
        cells = [fmt.format(medians[name][key]) for name in names]
        print(f"| {label} | " + " | ".join(cells) + " |")
    print("| boots behind the medians (failed) | "
          + " | ".join(f"{len(results[name]['boot'])} ({len(failures[name])})" for name in names) + " |")  # fmt: skip
    print()
    for kernel in kernels:
        for qemu in (n for n in names if vmms[n].vmm == "QEMU" and vmms[n].kernel == kernel):
            ratio = medians[f"memvisor {kernel}"]["boot"] / medians[qemu]["boot"]
            print(f"memvisor / QEMU, spawn to /init, same kernel file: memvisor {kernel} / {qemu} = {ratio:.2f}")
    if "vmlinux" in kernels and "bzImage" in kernels:
        ratio = medians["memvisor vmlinux"]["boot"] / medians["QEMU pc bzImage"]["boot"]
        print(f"memvisor / QEMU, each VMM's usual kernel: memvisor vmlinux / QEMU pc bzImage = {ratio:.2f}")
    for kernel in kernels:
        totals = [sum(exits.values()) for exits, boot in exits_per_boot if boot == kernel]
        cell = f"{_median(totals):.0f} (n={len(totals)}, {min(totals)}-{max(totals)})" if totals else "-"
        print(f"memvisor exits reaching Python to /init (timed boots, {kernel}): {cell}")
    print()
    if exits_per_boot:
        last = collections.Counter(exits_per_boot[-1][0])
        print("exits by kind (last timed boot): " + ", ".join(f"{kind} {count}" for kind, count in last.most_common()))
    sizes = ", ".join(f"{kernel} {files[kernel].stat().st_size / (1 << 20):.1f} MiB" for kernel in kernels)
    print(f"blobs QEMU holds in its own memory (fw_cfg), inside its RSS: {sizes}, initramfs {image.initrd.stat().st_size / (1 << 20):.1f} MiB")  # fmt: skip
    for name in names:
        for failure in failures[name]:
            print(f"{name} FAILED {failure}")
    if args.json:
        text = json.dumps({"results": results, "medians": medians, "failures": failures,
                           "exits_to_init": exits_per_boot}, indent=2)  # fmt: skip
        if args.json == "-":
            print(text)
        else:
            Path(args.json).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
