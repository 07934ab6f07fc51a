"""How fast the guest agent channel is: boot once, then time `agent.exec` calls and count the VM exits.

Run inside the lab (the channel's cost is VM exits, which are slow there):
    memvisor lab --memory 2G -- .venv/bin/python benchmarks/agent_channel.py [--rounds 5] [--kib 300]

It boots the built default image (512M, 1 vCPU), waits for the agent, then prints the time of
`cat /proc/meminfo` and of `true` (the floor: spawning a command in the guest), each `--rounds` times with
the median, and the time, payload rate and exits of one command printing `--kib` KiB of zeros in base64.
Set MEMVISOR_TREE to another checkout to measure it with this script (e.g. a `git archive` of an old commit).
"""

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.environ.get("MEMVISOR_TREE") or str(Path(__file__).resolve().parents[1]))

from memvisor.guest.image import ensure_guest_image  # noqa: E402
from memvisor.vmm.config import MachineConfig  # noqa: E402
from memvisor.vmm.session import build_machine  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--kib", type=int, default=300)
    args = parser.parse_args()
    image = ensure_guest_image("default")
    console = Path(tempfile.gettempdir()) / f"agent-channel-{os.getpid()}.log"
    config = MachineConfig(memory=512 << 20, vcpus=1, kernel=image.kernel, initrd=image.initrd,
                           console_path=console, reboot="exit")
    fd = os.open(console, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    machine = build_machine(config, fd)
    try:
        started = time.monotonic()
        machine.start()
        machine.agent.wait_ready(300)
        print(f"agent ready {time.monotonic() - started:.2f} s after start", flush=True)
        for command in ("cat /proc/meminfo", "true"):
            times = []
            for _ in range(args.rounds):
                before = time.monotonic()
                result = machine.agent.exec(command, 600)
                times.append(time.monotonic() - before)
                assert result.status == 0, result
            print(f"{command}: " + " ".join(f"{t:.3f}" for t in times) + f" s, median {statistics.median(times):.3f} s",
                  flush=True)
        exits = sum(machine.exit_counts.values())
        before = time.monotonic()
        result = machine.agent.exec(f"dd if=/dev/zero bs=1k count={args.kib} 2>/dev/null | base64", 3600)
        elapsed = time.monotonic() - before
        exits = sum(machine.exit_counts.values()) - exits
        print(f"{args.kib} KiB | base64: {len(result.stdout)} bytes in {elapsed:.2f} s "
              f"({len(result.stdout) / elapsed / 1024:.1f} KiB/s), {exits} exits", flush=True)
        machine.agent.poweroff()
        machine.wait(30)
    finally:
        machine.stop("benchmark over")
        machine.wait(5)
        machine.close()
        os.close(fd)


if __name__ == "__main__":
    main()
