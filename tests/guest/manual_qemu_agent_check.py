"""Manual check: boot the guest image under QEMU (TCG, no KVM needed) and talk to the agent on ttyS1.

Not a pytest test (it takes one to two minutes): run it by hand after changing init.sh, agent.sh or the
builder, e.g.
    .venv/bin/python tests/guest/manual_qemu_agent_check.py [--flavour cloud] [--compress]
It builds (or finds) the image, boots it with the console in a log file and the second UART on a UNIX
socket, waits for `MVAGENT READY`, exercises every request of the protocol (see memvisor/guest/agent.sh)
and prints the timings. Exit status 0 when every check passed.
"""

from __future__ import annotations

import argparse
import base64
import gzip
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from memvisor.guest.image import GUEST_CMDLINE, GuestImage, ensure_guest_image

APPEND = "console=ttyS0 8250.nr_uarts=2 quiet panic=-1"


class Agent:
    """The host end of the agent protocol over a stream socket (a tiny stand-in for the real client)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buffer = b""

    def line(self, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while b"\n" not in self.buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"no line from the agent within {timeout} s (have {self.buffer!r})")
            self.sock.settimeout(remaining)
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError("the agent channel closed")
            self.buffer += chunk
        raw, self.buffer = self.buffer.split(b"\n", 1)
        return raw.decode()

    def send(self, text: str) -> None:
        self.sock.sendall(text.encode() + b"\n")

    def run(self, ident: str, command: str, timeout: float = 120) -> tuple[bytes, bytes, int]:
        self.send(f"RUN {ident} {base64.b64encode(command.encode()).decode()}")
        out, err = [], []
        while True:
            words = self.line(timeout).split(" ", 2)
            if words[0] != ident:
                raise AssertionError(f"answer for another id: {words}")
            if words[1] == "O":
                out.append(words[2] if len(words) > 2 else "")
            elif words[1] == "E":
                err.append(words[2] if len(words) > 2 else "")
            elif words[1] == "X":
                return base64.b64decode("".join(out)), base64.b64decode("".join(err)), int(words[2])
            else:
                raise AssertionError(f"unexpected answer {words}")


def check(condition: bool, what: str, failures: list[str]) -> None:
    print(("  ok   " if condition else "  FAIL ") + what)
    if not condition:
        failures.append(what)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--flavour", default="default", choices=("default", "cloud"))
    parser.add_argument(
        "--compress", action="store_true", help="boot a gzip-compressed copy of the initramfs"
    )
    parser.add_argument("--memory", default="512M")
    parser.add_argument("--show-console", action="store_true", help="print the guest console log at the end")
    parser.add_argument(
        "--vmm-cmdline", action="store_true", help="boot with memvisor's own command line (GUEST_CMDLINE)"
    )
    args = parser.parse_args()

    started = time.monotonic()
    image: GuestImage = ensure_guest_image(args.flavour, progress=lambda s: print(s, file=sys.stderr))
    print(
        f"image: {image.kernel} {image.initrd} ({image.kernel_release}), ready after {time.monotonic() - started:.1f} s"
    )
    workdir = Path(tempfile.mkdtemp(prefix="mv-agent-check-"))
    initrd = image.initrd
    if args.compress:
        initrd = workdir / "initrd.gz"
        initrd.write_bytes(gzip.compress(image.initrd.read_bytes(), compresslevel=6, mtime=0))
    print(f"initramfs {initrd.stat().st_size / 1e6:.1f} MB")
    sock_path, console = workdir / "agent.sock", workdir / "console.log"
    argv = [
        "qemu-system-x86_64", "-accel", "tcg", "-m", args.memory, "-nographic", "-no-reboot",
        "-kernel", str(image.kernel), "-initrd", str(initrd),
        "-append", GUEST_CMDLINE if args.vmm_cmdline else APPEND,
        "-serial", f"file:{console}", "-serial", f"unix:{sock_path},server=on,wait=off",
    ]  # fmt: skip
    failures: list[str] = []
    spawn = time.monotonic()
    qemu = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        while not sock_path.exists():
            if qemu.poll() is not None:
                raise SystemExit(f"qemu exited: {qemu.stderr.read().decode() if qemu.stderr else ''}")
            time.sleep(0.05)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(str(sock_path))
        agent = Agent(sock)
        ready = agent.line(240)
        t_ready = time.monotonic() - spawn
        check(
            ready == "MVAGENT READY",
            f"first line is MVAGENT READY ({ready!r}) after {t_ready:.1f} s",
            failures,
        )

        t0 = time.monotonic()
        agent.send("PING p1")
        check(agent.line(30) == "p1 PONG", f"PING answered in {time.monotonic() - t0:.2f} s", failures)

        t0 = time.monotonic()
        out, err, status = agent.run("r1", "uname -r; free -m")
        t_run = time.monotonic() - t0
        print(out.decode(), end="")
        check(status == 0 and out.decode().splitlines()[0] == image.kernel_release,
              f"RUN uname -r; free -m -> status {status} in {t_run:.2f} s", failures)  # fmt: skip

        out, err, status = agent.run("r2", "echo to-out; echo to-err >&2; exit 3")
        check(
            (out, err, status) == (b"to-out\n", b"to-err\n", 3), "stdout, stderr and status 3 apart", failures
        )

        out, err, status = agent.run("r3", "true")
        check((out, err, status) == (b"", b"", 0), "empty output answers just X 0", failures)

        out, _, status = agent.run("r4", r"printf '\000\001\377\n\r'")
        check(out == b"\x00\x01\xff\n\r" and status == 0, f"binary output intact ({out!r})", failures)

        out, _, status = agent.run("r5", "kill -9 $$")
        check(status == 137, f"a command killed by SIGKILL answers X 137 ({status})", failures)

        out, _, _ = agent.run("r6", "cat /proc/self/oom_score_adj; cat /proc/$PPID/oom_score_adj; pwd")
        check(
            out.split() == [b"0", b"-1000", b"/"],
            f"command oom_score_adj 0, agent -1000, cwd / ({out!r})",
            failures,
        )

        out, _, status = agent.run("r7", "cat; echo done")
        check((out, status) == (b"done\n", 0), "stdin is /dev/null", failures)

        big = "head -c 300000 /dev/zero | tr '\\0' 'a'"
        t0 = time.monotonic()
        out, _, status = agent.run("r8", big)
        check(out == b"a" * 300000, f"300 kB of output in {time.monotonic() - t0:.2f} s", failures)

        t0 = time.monotonic()
        out, err, status = agent.run(
            "r9",
            "truncate -s 64M /tmp/fs.img && mkfs.ext4 -q -F -b 4096 /tmp/fs.img && e2fsck -fn /tmp/fs.img"
            " && debugfs -R stats /tmp/fs.img | grep -c 'Block size:.*4096'",
        )
        check(
            status == 0,
            f"mkfs.ext4, e2fsck, debugfs work ({time.monotonic() - t0:.1f} s): {err[-200:]!r}",
            failures,
        )

        # /sys/module lists the loaded modules; ext4 (built into the cloud flavour) shows in /proc/filesystems.
        out, _, status = agent.run("r10", "ls /sys/module; grep -ow ext4 /proc/filesystems")
        mods = set(out.decode().split())
        want = {
            "virtio_mmio",
            "virtio_balloon",
            "virtio_mem",
            "virtio_pmem",
            "nd_pmem",
            "ext4",
            "virtio_console",
        }
        check(
            want <= mods,
            f"modules present: {' '.join(sorted(want))} (missing {want - mods or 'none'})",
            failures,
        )

        agent.send("FROB f1 x")
        check(agent.line(30) == "f1 ERR unknown", "unknown request answers <id> ERR unknown", failures)
        agent.send("FROB")
        check(agent.line(30) == "- ERR unknown", "unknown request without id answers - ERR unknown", failures)
        agent.send("RUN bad/id Zm9v")
        check(agent.line(30) == "- ERR unknown", "a RUN with a malformed id is refused", failures)

        t0 = time.monotonic()
        agent.send("POWEROFF")
        code = qemu.wait(60)
        check(code == 0, f"POWEROFF ends QEMU with status 0 in {time.monotonic() - t0:.1f} s", failures)
        print(f"total wall from QEMU spawn: {time.monotonic() - spawn:.1f} s")
    finally:
        if qemu.poll() is None:
            qemu.kill()
            qemu.wait()
        if args.show_console and not failures:
            print(console.read_text(errors="replace"))
        if failures:
            print(f"console log kept: {console}")
            print(console.read_text(errors="replace")[-3000:])
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    print("PASSED" if not failures else f"FAILED: {len(failures)} checks")
    return 0 if not failures else 1


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
