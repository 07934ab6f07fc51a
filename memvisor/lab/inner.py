"""The agent inside the lab: runs one command for the host runner and bridges its streams and sockets.

`init.sh` starts it as `python -m memvisor.lab.inner`, as root, chrooted into the host's own root (read-only
9p). It first opens one KVM VM that it keeps until the lab powers off (kvm_keys: without it, starting and stopping
guests rewrites kernel text and can wedge the lab), opens the virtio-serial port named `memvisor.lab`, says READY,
waits for START, then:

1. mounts each read-write share (9p, `cache=mmap` so that shared writable mappings work) over the same path
   as on the host, creating the mount point first when it lies in one of the lab's tmpfs folders;
2. creates the folders of forwarded sockets that lie in those tmpfs folders;
3. starts the command in its own session (so that a signal reaches all of it) with its stdout and stderr on
   pipes, pumped to the host as channels 2 and 3 (stdin from channel 1 when asked, else /dev/null);
4. watches for each forwarded socket to appear, says LISTENING, and for each OPEN connects a new client to it;
5. when the command exits: drains its pipes, syncs the shares, sends EXIT with the shell-style status
   (128 + signal number when killed), and returns; init.sh then powers the lab off.

It imports nothing heavy: every import is a file read over 9p under TCG.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import stat
import subprocess
import sys
import time

from memvisor.lab.cpus import bring_cpus_online
from memvisor.lab.kvm_keys import hold_kvm_static_keys
from memvisor.lab.loopback import bring_loopback_up
from memvisor.lab.mux import (
    CONTROL,
    PORT_NAME,
    STDERR,
    STDIN,
    STDOUT,
    Frame,
    Kind,
    MuxError,
    StartRequest,
    int_frame,
)
from memvisor.lab.pump import Link, Reactor, Readable, Stream

VIRTIO_PORTS = "/sys/class/virtio-ports"
SHARE_MOUNT_OPTIONS = "trans=virtio,version=9p2000.L,cache=mmap,msize=262144"
# How often the forwarded socket paths are checked while they have not appeared yet.
FORWARD_POLL = 0.05
# How often the agent tells the host it is alive (the host gives up after runner.HEARTBEAT_TIMEOUT).
HEARTBEAT_INTERVAL = 5.0


def find_port(name: str = PORT_NAME, timeout: float = 10.0) -> str:
    """The /dev node of the virtio-serial port called `name` (it shows up as /dev/vportNpM)."""
    deadline = time.monotonic() + timeout
    while True:
        for port in os.listdir(VIRTIO_PORTS) if os.path.isdir(VIRTIO_PORTS) else []:
            try:
                with open(os.path.join(VIRTIO_PORTS, port, "name")) as file:
                    found = file.read().strip() == name
            except OSError:
                continue
            if found and os.path.exists(os.path.join("/dev", port)):
                return os.path.join("/dev", port)
        if time.monotonic() > deadline:
            raise RuntimeError(f"no virtio-serial port named {name} in {VIRTIO_PORTS}")
        time.sleep(0.05)


def mount_9p(tag: str, target: str) -> None:
    """Mount the read-write 9p share `tag` on `target` (mount(2) through libc: no helper binary needed)."""
    import ctypes  # only when there are shares: every import is a file read over 9p

    libc = ctypes.CDLL(None, use_errno=True)
    if libc.mount(tag.encode(), target.encode(), b"9p", 0, SHARE_MOUNT_OPTIONS.encode()) != 0:
        error = ctypes.get_errno()
        raise OSError(error, f"mount of share {tag} on {target}: {os.strerror(error)}")


def shell_status(returncode: int) -> int:
    """Popen's return code as a shell reports it: a death by signal N becomes 128 + N."""
    return 128 - returncode if returncode < 0 else returncode


class Forward:
    """One socket path the command creates; the host's clients are connected to it one by one."""

    def __init__(self, index: int, path: str) -> None:
        self.index = index
        self.path = path
        self.handle: int | None = None  # an O_PATH fd on the socket: survives the path being replaced
        self.identity: tuple[int, int] | None = None

    def check(self) -> bool:
        """True once the socket exists (first time only: the caller then reports LISTENING)."""
        if self.handle is not None:
            return False
        try:
            info = os.stat(self.path)
        except OSError:
            return False
        if not stat.S_ISSOCK(info.st_mode):
            return False
        self._hold(info)
        return True

    def _hold(self, info: os.stat_result) -> None:
        if self.handle is not None:
            os.close(self.handle)
        self.handle = os.open(self.path, os.O_PATH)
        self.identity = (info.st_dev, info.st_ino)

    def connect(self) -> socket.socket:
        """A new connection to the forwarded socket.

        It goes through /proc/self/fd of the O_PATH handle first: when the socket's folder is a share, the
        host runner has replaced the path by its own socket by now, yet the handle still names the command's.
        If that fails (the command made a new socket since), the current path is tried.
        """
        last: OSError | None = None
        for attempt in range(20):
            for target in self._targets():
                client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                try:
                    client.connect(target)
                    return client
                except OSError as error:
                    client.close()
                    last = error
            time.sleep(0.01 * (attempt + 1))  # bound but not listening yet: retry briefly
        raise last if last is not None else OSError("no socket")

    def _targets(self) -> list[str]:
        targets = [f"/proc/self/fd/{self.handle}"] if self.handle is not None else []
        try:
            info = os.stat(self.path)
            if stat.S_ISSOCK(info.st_mode) and (info.st_dev, info.st_ino) != self.identity:
                targets.append(self.path)
        except OSError:
            pass
        return targets


class Agent:
    """The state of one lab run inside L1."""

    def __init__(self, port_fd: int) -> None:
        self.reactor = Reactor()
        self.link = Link(port_fd, self.on_frame)
        self.reactor.add(self.link)
        self.streams: dict[int, Stream] = {}
        self.forwards: list[Forward] = []
        self.process: subprocess.Popen[bytes] | None = None
        self.pidfd: int | None = None
        self.status: int | None = None
        self.last_heartbeat = time.monotonic()

    # -- frames from the host --------------------------------------------------------------------
    def on_frame(self, frame: Frame) -> None:
        if frame.channel == CONTROL:
            if frame.kind is Kind.START and self.process is None and self.status is None:
                self.start(StartRequest.decode(frame.payload))
            elif frame.kind is Kind.SIGNAL and self.process is not None:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(self.process.pid, frame.integer())
            elif frame.kind is Kind.DIAGNOSE:
                self.diagnose()
            return
        if frame.kind is Kind.OPEN:
            self.open_connection(frame.channel, frame.integer())
            return
        stream = self.streams.get(frame.channel)
        if stream is not None:
            stream.deliver(frame)

    def diagnose(self) -> None:
        from memvisor.lab.diagnose import collect  # only when asked: every import is a read over 9p

        text = collect(self.process.pid if self.process is not None else None)
        self.link.send(Frame(CONTROL, Kind.DIAGNOSIS, text.encode(errors="replace")))

    def heartbeat(self) -> None:
        now = time.monotonic()
        if now - self.last_heartbeat >= HEARTBEAT_INTERVAL:
            self.last_heartbeat = now
            self.link.send(Frame(CONTROL, Kind.HEARTBEAT, _uptime().encode()))

    def fail(self, message: str) -> None:
        self.link.send(Frame(CONTROL, Kind.ERROR, message.encode()))
        self.status = -1

    # -- starting the command --------------------------------------------------------------------
    def start(self, request: StartRequest) -> None:
        try:
            for tag, path in sorted(request.shares, key=lambda share: share[1].count("/")):
                os.makedirs(path, exist_ok=True)  # succeeds in a tmpfs; exists already on the root
                mount_9p(tag, path)
            for path in request.forwards:
                os.makedirs(os.path.dirname(path), exist_ok=True)
        except OSError as error:
            self.fail(f"cannot prepare the lab: {error}")
            return
        self.forwards = [Forward(index, path) for index, path in enumerate(request.forwards)]
        if not os.path.isdir(request.cwd):
            self.fail(f"the working folder {request.cwd} does not exist in the lab")
            return
        try:
            self.process = subprocess.Popen(
                request.argv,
                cwd=request.cwd,
                env=request.env,
                stdin=subprocess.PIPE if request.stdin else subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                start_new_session=True,
            )
        except OSError as error:
            message = f"memvisor lab: cannot run {request.argv[0]}: {error.strerror or error}\n"
            self.link.send_data(STDERR, message.encode())
            self.finish(126 if isinstance(error, PermissionError) else 127)
            return
        # The streams own their fds from now on: take copies and close Popen's file objects, which would
        # otherwise close the same numbers again when collected (by then perhaps someone else's fds).
        for channel, pipe, readable in (
            (STDOUT, self.process.stdout, True),
            (STDERR, self.process.stderr, True),
            (STDIN, self.process.stdin, False),
        ):
            if pipe is not None:
                fd = os.dup(pipe.fileno())
                pipe.close()
                self.add_stream(channel, fd, readable=readable, writable=not readable)
        self.pidfd = os.pidfd_open(self.process.pid)
        self.reactor.add(Readable(self.pidfd, lambda: None))  # wakes the loop when the command exits

    def add_stream(
        self,
        channel: int,
        fd: int,
        *,
        readable: bool = False,
        writable: bool = False,
        sock: socket.socket | None = None,
    ) -> None:
        stream = Stream(
            self.link, channel, fd, readable=readable, writable=writable, sock=sock, on_closed=self.forget
        )
        self.streams[channel] = stream
        self.reactor.add(stream)

    def forget(self, stream: Stream) -> None:
        self.streams.pop(stream.channel, None)
        self.reactor.remove(stream)

    def open_connection(self, channel: int, index: int) -> None:
        if not 0 <= index < len(self.forwards) or channel in self.streams:
            self.link.send(Frame(channel, Kind.CLOSE))
            return
        try:
            client = self.forwards[index].connect()
        except OSError:
            self.link.send(Frame(channel, Kind.CLOSE))
            return
        self.add_stream(channel, client.fileno(), readable=True, writable=True, sock=client)

    # -- the main loop ----------------------------------------------------------------------------
    def poll_forwards(self) -> None:
        for forward in self.forwards:
            if forward.check():
                self.link.send(int_frame(CONTROL, Kind.LISTENING, forward.index))

    def exited(self) -> bool:
        if self.process is None or self.pidfd is None:
            return False
        if self.process.poll() is None:
            return False
        # Whatever the command wrote before it ended (its output, a last reply on a forwarded socket) goes
        # out before EXIT.
        for stream in list(self.streams.values()):
            stream.drain()
        self.finish(shell_status(self.process.returncode))
        return True

    def finish(self, status: int) -> None:
        os.sync()  # the shares' dirty pages (cache=mmap) reach the host before it stops the lab
        self.link.send(int_frame(CONTROL, Kind.EXIT, status))
        self.status = status

    def run(self) -> int:
        self.link.send(Frame(CONTROL, Kind.READY))
        while not self.link.closed:
            waiting = any(forward.handle is None for forward in self.forwards)
            self.reactor.poll(FORWARD_POLL if waiting else 1.0)
            if self.link.closed:
                break
            self.heartbeat()
            self.poll_forwards()
            if self.status is None and self.exited():
                break
            if self.status is not None:
                break
        self.link.flush(self.reactor, timeout=30)
        if self.process is not None and self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
        for stream in list(self.streams.values()):
            stream.close(notify=False)
        if self.pidfd is not None:
            os.close(self.pidfd)
        self.reactor.close()
        os.close(self.link.fd)  # the agent owns the port from here on
        return 0 if self.status is not None else 1


def _uptime() -> str:
    with open("/proc/uptime") as file:
        return file.read().split()[0]


def main() -> int:
    print(f"mvlab: agent running at uptime {_uptime()} s", file=sys.stderr, flush=True)
    try:
        held = hold_kvm_static_keys()  # kept open until the lab powers off: see kvm_keys
        print(f"mvlab: holding KVM's static keys ({len(held)} fds)", file=sys.stderr, flush=True)
    except OSError as error:
        print(f"mvlab: cannot hold KVM's static keys ({error}): guests may wedge the lab", file=sys.stderr, flush=True)
    try:  # only now, with the kernel's text patched on one CPU (plan.py: maxcpus=1)
        brought = bring_cpus_online()
        print(f"mvlab: brought CPUs {brought} online at uptime {_uptime()} s", file=sys.stderr, flush=True)
    except OSError as error:
        print(f"mvlab: cannot bring the other CPUs online ({error}): the lab runs on fewer", file=sys.stderr, flush=True)
    # plan.lab_kvm_amd: shadow paging (N) unless asked otherwise
    with contextlib.suppress(OSError), open("/sys/module/kvm_amd/parameters/npt") as file:
        print(f"mvlab: kvm_amd npt={file.read().strip()}", file=sys.stderr, flush=True)
    try:  # guests of one lab talk over 127.0.0.1 (a migration over tcp:), which needs lo up
        if bring_loopback_up():
            print("mvlab: loopback interface lo is up", file=sys.stderr, flush=True)
    except OSError as error:
        print(f"mvlab: cannot bring lo up ({error}): tcp to 127.0.0.1 fails in the lab", file=sys.stderr, flush=True)
    port = find_port()
    fd = os.open(port, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
    print(f"mvlab: port {port} open at uptime {_uptime()} s", file=sys.stderr, flush=True)
    agent = Agent(fd)
    try:
        return agent.run()
    except MuxError as error:
        print(f"mvlab: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
