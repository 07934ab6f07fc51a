"""How long `memvisor run` takes from its spawn to the guest's first instruction (the first KVM_RUN), by phase.

Runs `memvisor run --lab off --kernel --initrd` (the built image's vmlinux and initramfs unless given) under
`strace -f -ttt` tracing only execve, openat and ioctl, stops it at its first KVM_RUN and splits the time at
syscalls every run makes, with no change to memvisor:

    start    spawn (execve) to the first open of a memvisor module: the interpreter and `site`
    imports  to KVM_CREATE_VM: the imports, argument checks and the machine's configuration
    build    to the first open of the kernel: KVM objects, guest RAM, the devices
    load     to the first KVM_CREATE_VCPU: reading and placing kernel, initramfs, boot tables and ACPI
    vcpus    to the first KVM_RUN: vCPU setup and the start of the vCPU threads

Needs a /dev/kvm that can create a VM (the guest need not get far: it is stopped at its first KVM_RUN), so it
runs on a host whose KVM is software too, and inside the lab. strace adds a little to each traced syscall.

    .venv/bin/python benchmarks/startup_to_kvm_run.py --runs 5 [--kernel K --initrd I] [--importtime]
"""

import argparse
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.startup_imports import parse_importtime  # noqa: E402
from memvisor.guest.image import find_guest_image  # noqa: E402

PHASES = ("start", "imports", "build", "load", "vcpus")
TIMEOUT = 120.0
LINE = re.compile(r"^\d+\s+(\d+\.\d+)\s+(.*)$")


def phase_marks(trace: str, kernel: Path) -> dict[str, float] | None:
    """Times (s since spawn) at which each phase ends, from an strace -f -ttt log; None before a KVM_RUN."""
    marks: dict[str, float] = {}
    spawned: float | None = None
    package = str(REPO / "memvisor")
    for line in trace.splitlines():
        match = LINE.match(line)
        if match is None:
            continue
        stamp, call = float(match.group(1)), match.group(2)
        if spawned is None:
            if call.startswith("execve("):
                spawned = stamp
            continue
        if "start" not in marks and call.startswith("openat(") and package in call:
            marks["start"] = stamp - spawned
        elif "imports" not in marks and "KVM_CREATE_VM" in call:
            marks["imports"] = stamp - spawned
        elif "build" not in marks and call.startswith("openat(") and str(kernel) in call:
            marks["build"] = stamp - spawned
        elif "load" not in marks and "KVM_CREATE_VCPU" in call:
            marks["load"] = stamp - spawned
        elif "KVM_RUN" in call:
            marks["vcpus"] = stamp - spawned
            return marks if len(marks) == len(PHASES) else None
    return None


def one_run(python: str, kernel: Path, initrd: Path, importtime: Path | None) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        trace, console = Path(tmp) / "trace.txt", Path(tmp) / "console.log"
        argv = [python, *(["-X", "importtime"] if importtime else []), "-m", "memvisor", "run", "--lab", "off",
                "--memory", "1G", "--kernel", str(kernel), "--initrd", str(initrd), "--console", str(console)]  # fmt: skip
        strace = ["strace", "-f", "-ttt", "--seccomp-bpf", "-e", "trace=execve,openat,ioctl", "-o", str(trace)]
        stderr = importtime.open("wb") if importtime else subprocess.DEVNULL
        process = subprocess.Popen([*strace, *argv], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                   stderr=stderr, cwd=REPO, start_new_session=True)  # fmt: skip
        started = time.monotonic()
        try:
            while True:
                marks = phase_marks(trace.read_text() if trace.exists() else "", kernel)
                if marks is not None:
                    return marks
                if process.poll() is not None or time.monotonic() - started > TIMEOUT:
                    sys.exit(f"memvisor ended or timed out before its first KVM_RUN (status {process.poll()})")
                time.sleep(0.05)
        finally:
            os.killpg(process.pid, signal.SIGTERM)
            process.wait()
            if importtime:
                stderr.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--kernel", type=Path, help="default: the built default image's boot kernel")
    parser.add_argument("--initrd", type=Path, help="default: the built default image's initramfs")
    parser.add_argument("--python", default=sys.executable, help="the interpreter that runs memvisor")
    parser.add_argument("--importtime", type=Path, metavar="FILE", help="after the timed runs, one more under -X importtime, its report to FILE")
    args = parser.parse_args()
    if shutil.which("strace") is None:
        sys.exit("needs strace")
    kernel, initrd = args.kernel, args.initrd
    if kernel is None or initrd is None:
        image = find_guest_image("default")
        if image is None:
            sys.exit("no guest image: run `memvisor image build` first, or give --kernel and --initrd")
        kernel, initrd = kernel or image.boot_kernel, initrd or image.initrd
    kernel, initrd = kernel.resolve(), initrd.resolve()
    runs = []
    for _ in range(args.runs):
        runs.append(one_run(args.python, kernel, initrd, None))
        print("  ".join(f"{name} {runs[-1][name]:.3f}" for name in PHASES), "(s since spawn)", flush=True)
    print(f"median of {len(runs)}, seconds each phase took (first KVM_RUN at the end):")
    previous = [0.0] * len(runs)
    for name in PHASES:
        spans = [run[name] - before for run, before in zip(runs, previous, strict=True)]
        previous = [run[name] for run in runs]
        print(f"  {name:8} {statistics.median(spans):.3f}")
    print(f"  {'total':8} {statistics.median(run['vcpus'] for run in runs):.3f}")
    if args.importtime:
        one_run(args.python, kernel, initrd, args.importtime)  # untimed: -X importtime slows the imports
        rows = parse_importtime(args.importtime.read_text())
        top_level = sum(cumulative for _, cumulative, name in rows if not name.startswith("  "))
        print(f"-X importtime: {len(rows)} modules, {top_level / 1e6:.3f} s in total; slowest by cumulative time:")
        for self_us, cumulative_us, name in sorted(rows, key=lambda row: -row[1])[:10]:
            print(f"  {cumulative_us / 1e6:.3f} s cumulative {self_us / 1e6:.3f} s self  {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
