"""Two network namespaces joined by a veth pair, for a migration between them (issue 9): traffic only inside.

    with netns_pair() as pair:                  # mvmig-src-PID and mvmig-dst-PID, 10.213.0.1 <-> 10.213.0.2
        GuestVM(..., netns=pair.source.netns)   # `ip netns exec mvmig-src-PID python -m memvisor run ...`
        pair.dest.listens(port)                 # the destination namespace's own /proc/net/tcp
        pair.source.byte_counts()               # (rx, tx) bytes of the veth end in that namespace

Both namespaces are named (`ip netns add`: a bind mount under /run/netns, a tmpfs in the lab) with this process's
pid, so two runs never share one. The veth pair is created with each end already in its namespace (`ip link add
A netns X type veth peer name B netns Y`): nothing of it ever exists in the caller's namespace, and deleting the
two namespaces removes it. They are deleted whatever happens, in the reverse order of their creation, and a
failed deletion is reported without hiding the error that ended the test.

Everything runs through iproute2's `ip`, as root. The lab boots Debian's kernel, where veth is a module
(CONFIG_VETH=m): the lab's initramfs carries it and its /init loads it (memvisor/guest/image.py LAB_MODULES,
memvisor/lab/init.sh), since the chroot the tests run in is the host's root, whose /lib/modules holds no
modules of that kernel. A missing veth fails with a message saying so.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

# Runs one command (argv[0] is "ip"), returns its stdout, raises NetnsError when it fails.
Runner = Callable[[list[str]], str]

SUBNET = "10.213.0"  # a /30: .1 the source's end, .2 the destination's
PREFIX = 30
# Where iproute2 lives when PATH lacks the sbin folders (a non-login shell, the lab's agent without PATH).
SBIN_PATH = "/usr/sbin:/sbin:/usr/bin:/bin"
COMMAND_TIMEOUT = 30.0
VETH_MODULE = Path("/sys/module/veth")
LAB_HINT = ("the lab's initramfs carries veth (memvisor/guest/image.py LAB_MODULES) and its /init loads it "
            "(memvisor/lab/init.sh): a lab console line 'mvlab: veth did not load' says why it is missing")  # fmt: skip


class NetnsError(AssertionError):
    """An `ip` command failed: the command, its status and its stderr."""


def ip_program() -> str:
    """The path of iproute2's `ip` (NetnsError when there is none)."""
    found = shutil.which("ip") or shutil.which("ip", path=SBIN_PATH)
    if found is None:
        raise NetnsError(
            f"iproute2's `ip` is not installed (looked in $PATH and {SBIN_PATH}): apt install iproute2"
        )
    return found


def run_command(argv: list[str]) -> str:
    """Run `argv` (argv[0] "ip" is resolved by ip_program) and return its stdout; NetnsError when it fails."""
    program = ip_program() if argv[0] == "ip" else argv[0]
    try:
        result = subprocess.run([program, *argv[1:]], capture_output=True, text=True, timeout=COMMAND_TIMEOUT,
                                check=False)  # fmt: skip
    except subprocess.TimeoutExpired:
        raise NetnsError(f"`{' '.join(argv)}` did not end within {COMMAND_TIMEOUT:.0f} s") from None
    if result.returncode != 0:
        raise NetnsError(
            f"`{' '.join(argv)}` exited {result.returncode}: {result.stderr.strip() or 'no message'}"
        )
    return result.stdout


def exec_prefix(netns: str) -> list[str]:
    """The argv prefix that runs a program inside network namespace `netns` (iproute2 execs it: same pid)."""
    return [ip_program(), "netns", "exec", netns]


@dataclass(frozen=True)
class Side:
    """One end: its namespace, the veth end inside it and that end's IPv4 address."""

    netns: str
    interface: str
    address: str
    run: Runner = field(default=run_command, compare=False, repr=False)

    def byte_counts(self) -> tuple[int, int]:
        """(received, sent) bytes of this side's veth end, as the kernel counts them."""
        text = self.run(["ip", "-n", self.netns, "-j", "-s", "link", "show", "dev", self.interface])
        return parse_byte_counts(text)

    def listens(self, port: int) -> bool:
        """A TCP socket listens on `port` in this namespace (its /proc/net/tcp: that file is per namespace)."""
        return tcp_table_listens(self.run(["ip", "netns", "exec", self.netns, "cat", "/proc/net/tcp"]), port)


@dataclass(frozen=True)
class NetnsPair:
    source: Side
    dest: Side

    def setup_commands(self) -> list[list[str]]:
        """What makes the pair, after both namespaces exist: the veth with an end in each, addresses, links up."""
        commands = [["ip", "link", "add", self.source.interface, "netns", self.source.netns, "type", "veth",
                     "peer", "name", self.dest.interface, "netns", self.dest.netns]]  # fmt: skip
        for side in (self.source, self.dest):
            commands += [
                ["ip", "-n", side.netns, "addr", "add", f"{side.address}/{PREFIX}", "dev", side.interface],
                ["ip", "-n", side.netns, "link", "set", "lo", "up"],
                ["ip", "-n", side.netns, "link", "set", side.interface, "up"],
            ]
        return commands


def pair_for(pid: int, run: Runner = run_command) -> NetnsPair:
    """The names and addresses of this process's pair: namespaces mvmig-src-PID and mvmig-dst-PID (unique while
    the process lives), the veth ends mvmig-src and mvmig-dst (each in its own namespace: no clash)."""
    return NetnsPair(Side(f"mvmig-src-{pid}", "mvmig-src", f"{SUBNET}.1", run),
                     Side(f"mvmig-dst-{pid}", "mvmig-dst", f"{SUBNET}.2", run))  # fmt: skip


@contextlib.contextmanager
def netns_pair(run: Runner = run_command, pid: int | None = None) -> Iterator[NetnsPair]:
    """Create this process's pair of namespaces and their veth; yield it; always delete what was created."""
    pair = pair_for(os.getpid() if pid is None else pid, run)
    created: list[str] = []
    try:
        for side in (pair.source, pair.dest):
            add_namespace(side.netns, run)
            created.append(side.netns)
        commands = pair.setup_commands()
        add_veth(commands[0], run)
        for command in commands[1:]:
            run(command)
        yield pair
    except BaseException as error:
        for failure in delete_namespaces(created, run):  # the error that ended the test comes first
            error.add_note(f"and then: {failure}")
        raise
    failures = delete_namespaces(created, run)
    if failures:
        raise NetnsError("leftover network namespaces: " + "; ".join(failures))


def add_namespace(name: str, run: Runner) -> None:
    try:
        run(["ip", "netns", "add", name])
    except NetnsError as error:
        raise NetnsError(f"cannot create the network namespace {name} (needs root and a writable /run/netns, "
                         f"a tmpfs in the lab): {error}") from None  # fmt: skip


def add_veth(command: list[str], run: Runner) -> None:
    try:
        run(command)
    except NetnsError as error:
        raise NetnsError(f"cannot create the veth pair: {error}; {veth_diagnosis()}") from None


def veth_diagnosis(module: Path = VETH_MODULE, release: str | None = None) -> str:
    """What is known of the kernel's veth: loaded (or built in), or missing and where it should come from."""
    release = release or os.uname().release
    if module.exists():
        return f"the kernel {release} has veth (/sys/module/veth exists), so the failure lies elsewhere"
    modules_dir = Path("/lib/modules") / release
    where = "present" if modules_dir.is_dir() else "absent: no modprobe here can load veth"
    return f"the kernel {release} has no veth loaded (no {module}; {modules_dir} is {where}); {LAB_HINT}"


def delete_namespaces(names: list[str], run: Runner) -> list[str]:
    """Delete `names` last first (each deletion also ends the veth end inside it), trying every one; return
    the failures."""
    failures = []
    for name in reversed(names):
        try:
            run(["ip", "netns", "delete", name])
        except NetnsError as error:
            failures.append(str(error))
    return failures


def parse_byte_counts(text: str) -> tuple[int, int]:
    """(rx bytes, tx bytes) from `ip -j -s link show dev IF` (one interface's JSON, stats64)."""
    (link,) = json.loads(text)
    stats = link["stats64"]
    return int(stats["rx"]["bytes"]), int(stats["tx"]["bytes"])


def tcp_table_listens(table: str, port: int) -> bool:
    """`table` (/proc/net/tcp's text) has a socket listening (state 0A) on local `port`."""
    suffix = f":{port:04X}"
    for line in table.splitlines()[1:]:
        fields = line.split()
        if len(fields) > 3 and fields[1].endswith(suffix) and fields[3] == "0A":
            return True
    return False
