"""A running memvisor guest for guest tests: `memvisor run --lab off --qmp SOCK`, driven with qemu.qmp.

    with GuestVM(tmp_path, memory="1G", devices=["virtio-balloon,id=balloon0"]) as vm:
        vm.exec("free -m").stdout
        vm.cmd("balloon", value=512 << 20)
        vm.wait_until(lambda: vm.cmd("query-balloon")["actual"] <= 520 << 20, timeout=120)
"""

import base64
import contextlib
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from qemu.qmp.legacy import QEMUMonitorProtocol

from memvisor.control.ready import QmpNotReady, wait_for_qmp
from tests.guest.netns import exec_prefix

REPO = Path(__file__).resolve().parents[2]
T = TypeVar("T")


class QmpCommandFailed(AssertionError):
    """A QMP command answered with an error."""


@dataclass
class GuestResult:
    status: int
    stdout: str
    stderr: str


class GuestVM:
    """One guest VM under memvisor, with its QMP connection; a context manager that always cleans up."""

    def __init__(
        self,
        workdir: Path,
        *,
        memory: str = "1G",
        vcpus: int = 1,
        devices: list[str] | None = None,
        extra: list[str] | None = None,
        boot_timeout: float = 240,
        cgroup: Path | None = None,
        netns: str | None = None,
    ) -> None:
        self.workdir = workdir
        self.socket = workdir / "qmp.sock"
        self.console = workdir / "console.log"
        argv = [sys.executable, "-m", "memvisor", "run", "--lab", "off", "--memory", memory, "--vcpus", str(vcpus),
                "--qmp", str(self.socket), "--console", str(self.console)]  # fmt: skip
        for device in devices or []:
            argv += ["--device", device]
        argv += extra or []
        argv = wrapped_argv(argv, cgroup=cgroup, netns=netns)
        self.stderr_path = workdir / "memvisor.stderr"
        self._stderr = self.stderr_path.open("wb")
        env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")
        self.process = subprocess.Popen(argv, cwd=REPO, env=env, stdin=subprocess.DEVNULL,
                                        stdout=subprocess.DEVNULL, stderr=self._stderr)  # fmt: skip
        try:
            self.qmp = self._connect(boot_timeout)
            self.exec("true", timeout=boot_timeout)  # the guest has booted and its agent answers
        except BaseException:
            self.close()
            raise

    def _connect(self, timeout: float) -> QEMUMonitorProtocol:
        def connect(path: str) -> QEMUMonitorProtocol:
            qmp = QEMUMonitorProtocol(path)
            qmp.connect(negotiate=True)
            return qmp

        try:
            return wait_for_qmp(str(self.socket), connect, timeout=timeout, process=self.process,
                                what="memvisor's QMP socket")  # fmt: skip
        except QmpNotReady as error:
            raise AssertionError(f"{error}\nmemvisor's stderr: {self.stderr_text()}") from None

    def stderr_text(self) -> str:
        return self.stderr_path.read_text(errors="replace")[-2000:] if self.stderr_path.exists() else ""

    def console_text(self) -> str:
        return self.console.read_text(errors="replace") if self.console.exists() else ""

    def cmd(self, name: str, **arguments: Any) -> Any:
        """Run a QMP command (arguments with '-' written as '_') and return its "return" value."""
        args = {key.replace("_", "-"): value for key, value in arguments.items()}
        reply = self.qmp.cmd_obj({"execute": name, "arguments": args} if args else {"execute": name})
        if "error" in reply:
            raise QmpCommandFailed(f"{name} {args}: {reply['error']}")
        return reply["return"]

    def exec(self, command: str, timeout: float = 120) -> GuestResult:
        reply = self.cmd("x-guest-exec", command=command, timeout=timeout)
        return GuestResult(
            reply["exitcode"],
            base64.b64decode(reply["out-data"]).decode(errors="replace"),
            base64.b64decode(reply["err-data"]).decode(errors="replace"),
        )

    def check(self, command: str, timeout: float = 120) -> str:
        """Run `command` in the guest, assert it succeeded, return its stdout."""
        result = self.exec(command, timeout)
        assert result.status == 0, f"{command!r} exited {result.status}: {result.stderr}"
        return result.stdout

    def meminfo(self) -> dict[str, int]:
        """The guest's /proc/meminfo in bytes."""
        values = {}
        for line in self.check("cat /proc/meminfo").splitlines():
            match = re.match(r"(\w+(?:\(\w+\))?):\s+(\d+)(?: kB)?", line)
            if match:
                values[match.group(1)] = int(match.group(2)) * 1024
        return values

    def host_memory(self, region: str | None = None) -> int:
        """What the host really holds for this VM, in bytes, read from outside memvisor: the blocks allocated
        to its guest memory memfds, found through /proc/PID/fd (RAM is "memvisor-ram0", "memvisor-ram1", a
        virtio-mem device's memory "memvisor-mem-ID"). All of them, or one device's (`region` = its id)."""
        if region is None:
            return memfd_bytes(self.process.pid, lambda name: name.startswith(("memvisor-ram", "memvisor-mem-")))
        return memfd_bytes(self.process.pid, lambda name: name == f"memvisor-mem-{region}")

    def events(self, name: str) -> list[dict[str, Any]]:
        return [event for event in self.qmp.get_events(wait=False) if event["event"] == name]

    def close(self) -> None:
        qmp = getattr(self, "qmp", None)
        if qmp is not None and self.process.poll() is None:
            with contextlib.suppress(Exception):  # the VM may be gone already
                qmp.cmd_obj({"execute": "quit"})
            qmp.close()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self._stderr.close()

    def __enter__(self) -> "GuestVM":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def wrapped_argv(argv: list[str], *, cgroup: Path | None = None, netns: str | None = None) -> list[str]:
    """memvisor's `argv` run inside network namespace `netns` (`ip netns exec NAME`, tests/guest/netns.py) and
    in cgroup v2 `cgroup` (joined by a shell before exec: every page memvisor touches is charged there). Each
    wrapper execs the next, so the process started is memvisor's (its pid, its /proc/PID/fd)."""
    if netns is not None:
        argv = [*exec_prefix(netns), *argv]
    if cgroup is not None:
        argv = ["/bin/sh", "-c", 'echo $$ > "$0" && exec "$@"', str(cgroup / "cgroup.procs"), *argv]
    return argv


def memfd_bytes(pid: int, wanted: Callable[[str], bool]) -> int:
    """Bytes allocated to the memfds of process `pid` whose name (memfd_create's, without "/memfd:" and
    " (deleted)") `wanted` accepts, each file counted once: st_blocks through /proc/PID/fd, as `du` would."""
    seen: set[tuple[int, int]] = set()
    total = 0
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
            if not target.startswith("/memfd:"):
                continue
            name = target.removeprefix("/memfd:").removesuffix(" (deleted)")
            if not wanted(name):
                continue
            info = os.stat(fd)
        except OSError:  # closed meanwhile
            continue
        if (info.st_dev, info.st_ino) not in seen:
            seen.add((info.st_dev, info.st_ino))
            total += info.st_blocks * 512
    return total


def wait_until(predicate: Callable[[], T], timeout: float, interval: float = 1.0, what: str = "condition") -> T:
    """Poll `predicate` until it returns something truthy; fail after `timeout` seconds, naming what was
    awaited and the last value seen."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what} (last seen: {value!r})")
        time.sleep(interval)
