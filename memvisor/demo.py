"""The demo: the memory story on a live Debian guest, step by step, ending in a PNG plot.

    scripts/demo                    (sets the machine up first)
    python -m memvisor.demo [--out DIR]

It boots a 2G guest with a balloon (free page reporting on), a virtio-mem device and a virtio-pmem file, then:
the guest uses 600M and frees it (free page reporting gives it back to the host), the balloon takes 1G and
returns it, virtio-mem grows the guest by 1G and shrinks it again, and the guest writes a file on the pmem
disk with DAX. After each step one line shows what the host holds for the VM and the guest's total and free
memory; all samples go into DIR/memory.png.
"""

import argparse
import base64
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from memvisor.control.client import QmpConnection
from memvisor.control.ready import wait_for_qmp
from memvisor.errors import MemvisorError

MIB = 1 << 20


@dataclass
class Sample:
    seconds: float
    host: int
    guest_total: int
    guest_free: int
    step: str


@dataclass
class Demo:
    """The running guest and what was measured."""

    qmp: QmpConnection
    started: float = field(default_factory=time.monotonic)
    samples: list[Sample] = field(default_factory=list)
    step: str = "boot"

    def exec(self, command: str, timeout: float = 300) -> str:
        reply = self.qmp.execute("x-guest-exec", {"command": command, "timeout": timeout})
        if reply["exitcode"] != 0:
            error = base64.b64decode(reply["err-data"]).decode(errors="replace").strip()
            raise MemvisorError(f"demo: guest command {command!r} failed: {error}")
        return base64.b64decode(reply["out-data"]).decode(errors="replace")

    def sample(self) -> Sample:
        meminfo = {}
        for line in self.exec("grep -E '^(MemTotal|MemFree):' /proc/meminfo").splitlines():
            name, value, _ = line.split()
            meminfo[name.rstrip(":")] = int(value) * 1024
        host = int(self.qmp.execute("x-query-host-memory")["total"])
        sample = Sample(time.monotonic() - self.started, host, meminfo["MemTotal"], meminfo["MemFree"], self.step)
        self.samples.append(sample)
        return sample

    def report(self, what: str) -> None:
        s = self.sample()
        print(f"{what:<46} host holds {s.host // MIB:6d} MiB   guest total {s.guest_total // MIB:5d} MiB"
              f"   free {s.guest_free // MIB:5d} MiB", flush=True)  # fmt: skip

    def wait(self, condition: Callable[[Sample], bool], timeout: float) -> Sample:
        deadline = time.monotonic() + timeout
        while True:
            sample = self.sample()
            if condition(sample) or time.monotonic() > deadline:
                return sample
            time.sleep(2)


def _connect(socket_path: Path, process: subprocess.Popen[bytes], timeout: float) -> QmpConnection:
    return wait_for_qmp(
        str(socket_path), lambda path: QmpConnection(path, timeout=300), timeout=timeout, process=process,
        what="demo: memvisor's control socket",
    )  # fmt: skip


def run_story(demo: Demo) -> None:
    print(f"guest kernel {demo.exec('uname -r').strip()}, {demo.exec('nproc').strip()} vCPUs; free -m:")
    print(demo.exec("free -m"), end="", flush=True)
    demo.report("booted")

    demo.step = "reporting"
    demo.exec("mkdir -p /mnt/t && mount -t tmpfs -o size=1G tmpfs /mnt/t && dd if=/dev/zero of=/mnt/t/fill bs=1M count=600 2>/dev/null")
    before = demo.sample().host
    demo.report("guest filled 600M of tmpfs")
    demo.exec("rm /mnt/t/fill")
    demo.wait(lambda s: s.host < before - 400 * MIB, timeout=120)
    demo.report("guest freed it: free page reporting")

    demo.step = "balloon"
    demo.qmp.execute("balloon", {"value": 1024 * MIB})
    demo.wait(lambda s: s.guest_total <= 1100 * MIB, timeout=180)
    demo.report("balloon target 1G (inflate)")
    demo.qmp.execute("balloon", {"value": 2048 * MIB})
    demo.wait(lambda s: s.guest_total >= 1900 * MIB, timeout=180)
    demo.report("balloon target 2G (deflate)")

    demo.step = "virtio-mem"
    demo.qmp.execute("qom-set", {"path": "vm0", "property": "requested-size", "value": 1024 * MIB})
    demo.wait(lambda s: s.guest_total >= 2900 * MIB, timeout=180)
    demo.report("virtio-mem requested-size 1G (grow)")
    demo.qmp.execute("qom-set", {"path": "vm0", "property": "requested-size", "value": 0})
    demo.wait(lambda s: s.guest_total <= 2100 * MIB, timeout=300)
    demo.report("virtio-mem requested-size 0 (shrink)")

    demo.step = "pmem"
    demo.exec("mkfs.ext4 -q -F -b 4096 /dev/pmem0 && mkdir -p /mnt/p && mount -o dax /dev/pmem0 /mnt/p"
              " && dd if=/dev/urandom of=/mnt/p/file bs=1M count=64 2>/dev/null && sync")  # fmt: skip
    demo.report("pmem: ext4 with DAX, 64M written and synced")


def plot(samples: list[Sample], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(10, 5))
    t = [s.seconds for s in samples]
    axes.plot(t, [s.host / MIB for s in samples], label="host holds for the VM", marker="o")
    axes.plot(t, [s.guest_total / MIB for s in samples], label="guest MemTotal", marker=".")
    axes.plot(t, [s.guest_free / MIB for s in samples], label="guest MemFree", marker=".")
    previous = None
    for s in samples:
        if s.step != previous:
            axes.axvline(s.seconds, color="grey", linewidth=0.5)
            axes.annotate(s.step, (s.seconds, axes.get_ylim()[1] * 0.97), fontsize=8, rotation=90, va="top")
            previous = s.step
    axes.set_xlabel("seconds since boot")
    axes.set_ylabel("MiB")
    axes.set_title("memvisor: host and guest memory over the demo")
    axes.legend(loc="upper left")
    figure.tight_layout()
    figure.savefig(out, dpi=100)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("demo-output"), help="folder for the plot and logs")
    args = parser.parse_args(argv)
    out: Path = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="memvisor-demo-", dir=out) as tmp:
        pmem = Path(tmp) / "pmem.img"
        with pmem.open("wb") as file:
            file.truncate(256 * MIB)
        socket_path = Path(tmp) / "qmp.sock"
        argv_run = [sys.executable, "-m", "memvisor", "run", "--memory", "2G", "--vcpus", "2",
                    "--qmp", str(socket_path), "--console", str(out / "console.log"),
                    "--device", "virtio-balloon,id=balloon0,free-page-reporting=on",
                    "--device", "virtio-mem,id=vm0,max-size=2G,requested-size=0",
                    "--device", f"virtio-pmem,id=pm0,file={pmem}"]  # fmt: skip
        print("demo: memvisor run --memory 2G --vcpus 2 --qmp ... with a balloon, virtio-mem and virtio-pmem", flush=True)
        process = subprocess.Popen(argv_run, stdin=subprocess.DEVNULL, env=dict(os.environ, PYTHONUNBUFFERED="1"))
        demo: Demo | None = None
        try:
            qmp = _connect(socket_path, process, timeout=300)
            demo = Demo(qmp)
            demo.exec("true")  # waits for the guest to boot
            run_story(demo)
            qmp.execute("quit")
        except MemvisorError as error:
            print(f"memvisor: error: {error}", file=sys.stderr)
            return 125
        finally:
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        if demo is not None and demo.samples:
            plot(demo.samples, out / "memory.png")
            print(f"demo: plot of host and guest memory written to {out / 'memory.png'}")
    return 0




if __name__ == "__main__":
    sys.exit(main())
