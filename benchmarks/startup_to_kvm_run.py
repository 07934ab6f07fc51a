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

    .venv/bin/python benchmarks/startup_to_kvm_run.py --runs 5 [--kernel K --initrd I] [--importtime PREFIX]
    .venv/bin/python benchmarks/startup_to_kvm_run.py --checkout /tmp/old --checkout . --runs 5   # before/after
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


def phase_marks(trace: str, kernel: Path, checkout: Path) -> dict[str, float] | None:
    """Times (s since spawn) at which each phase ends, from an strace -f -ttt log; None before a KVM_RUN."""
    ends = {
        "start": lambda call: call.startswith("openat(") and str(checkout / "memvisor") in call,
        "imports": lambda call: "KVM_CREATE_VM" in call,
        "build": lambda call: call.startswith("openat(") and str(kernel) in call,
        "load": lambda call: "KVM_CREATE_VCPU" in call,
        "vcpus": lambda call: "KVM_RUN" in call,
    }
    marks: dict[str, float] = {}
    spawned: float | None = None
    for line in trace.splitlines():
        match = LINE.match(line)
        if match is None:
            continue
        stamp, call = float(match.group(1)), match.group(2)
        if spawned is None:
            spawned = stamp if call.startswith("execve(") else None
            continue
        phase = PHASES[len(marks)]
        if ends[phase](call):
            marks[phase] = stamp - spawned
            if len(marks) == len(PHASES):
                return marks
    return None


def one_run(python: str, checkout: Path, kernel: Path, initrd: Path, importtime: Path | None) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        trace, console = Path(tmp) / "trace.txt", Path(tmp) / "console.log"
        argv = [python, *(["-X", "importtime"] if importtime else []), "-m", "memvisor", "run", "--lab", "off",
                "--memory", "1G", "--kernel", str(kernel), "--initrd", str(initrd), "--console", str(console)]  # fmt: skip
        strace = ["strace", "-f", "-ttt", "--seccomp-bpf", "-e", "trace=execve,openat,ioctl", "-o", str(trace)]
        stderr = importtime.open("wb") if importtime else subprocess.DEVNULL
        # `-m memvisor` from the checkout's folder: its memvisor comes first on sys.path.
        process = subprocess.Popen([*strace, *argv], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                   stderr=stderr, cwd=checkout, start_new_session=True)  # fmt: skip
        started = time.monotonic()
        try:
            while True:
                marks = phase_marks(trace.read_text() if trace.exists() else "", kernel, checkout)
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


def report(checkout: Path, runs: list[dict[str, float]]) -> None:
    print(f"{checkout}: median of {len(runs)}, seconds each phase took (first KVM_RUN at the end):")
    previous = [0.0] * len(runs)
    for name in PHASES:
        spans = [run[name] - before for run, before in zip(runs, previous, strict=True)]
        previous = [run[name] for run in runs]
        print(f"  {name:8} {statistics.median(spans):.3f}")
    print(f"  {'total':8} {statistics.median(run['vcpus'] for run in runs):.3f}")


def report_imports(path: Path) -> None:
    rows = parse_importtime(path.read_text())
    top_level = sum(cumulative for _, cumulative, name in rows if not name.startswith("  "))
    print(f"  -X importtime: {len(rows)} modules, {top_level / 1e6:.3f} s in total; slowest by cumulative time:")
    for self_us, cumulative_us, name in sorted(rows, key=lambda row: -row[1])[:10]:
        print(f"    {cumulative_us / 1e6:.3f} s cumulative {self_us / 1e6:.3f} s self  {name}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5, help="timed runs per checkout (default 5)")
    parser.add_argument("--kernel", type=Path, help="default: the built default image's boot kernel")
    parser.add_argument("--initrd", type=Path, help="default: the built default image's initramfs")
    parser.add_argument("--python", default=sys.executable, help="the interpreter that runs memvisor")
    parser.add_argument("--checkout", type=Path, action="append",
                        help="the memvisor checkout to time (default: this one); repeat to compare several, their "
                        "runs interleaved (compile each one's bytecode first)")  # fmt: skip
    parser.add_argument("--importtime", type=Path, metavar="PREFIX",
                        help="after the timed runs, one more per checkout under -X importtime, its report to "
                        "PREFIX.N.txt (N: the checkout's place), its total and slowest imports printed")  # fmt: skip
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
    checkouts = [path.resolve() for path in args.checkout or [REPO]]
    runs: list[list[dict[str, float]]] = [[] for _ in checkouts]
    for index in range(args.runs * len(checkouts)):
        place = index % len(checkouts)
        runs[place].append(one_run(args.python, checkouts[place], kernel, initrd, None))
        marks = runs[place][-1]
        print(f"{place}:", "  ".join(f"{name} {marks[name]:.3f}" for name in PHASES), "(s since spawn)", flush=True)
    for place, checkout in enumerate(checkouts):
        report(checkout, runs[place])
        if args.importtime:
            path = Path(f"{args.importtime}.{place}.txt")
            one_run(args.python, checkout, kernel, initrd, path)  # untimed: -X importtime slows the imports
            report_imports(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
