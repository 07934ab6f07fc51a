"""The host side of the lab: start QEMU, hand the command to the agent inside, bridge everything back.

    status = run_in_lab(["pytest", "tests/guest"], memory=4 << 30, cwd=os.getcwd(), env=dict(os.environ))

What happens:
1. The plan (plan.py) is checked: shares, forwarded sockets, memory.
2. QEMU starts with the L1 console in a log file and a virtio-serial port on a UNIX socket in a private temp
   folder. The chardev waits (`wait=on`) until the runner connects, so no byte is lost.
3. The runner sends START (mux.py) and then pumps: the command's stdout and stderr to ours as they arrive,
   our stdin to the command when asked, and for each forwarded socket, once the agent says the command is
   listening, a host socket at the user's path whose every client gets its own connection inside.
4. EXIT carries the command's status; the runner stops QEMU and returns it. Ctrl-C or SIGTERM asks the agent
   to pass SIGTERM on, and stops QEMU after a grace period. If the lab dies first, MemvisorError carries the
   end of the L1 console log.
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, TextIO

from memvisor.errors import LabCrashed, MemvisorError
from memvisor.lab import plan, postmortem
from memvisor.lab.mux import (
    CONTROL,
    FIRST_CONNECTION,
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
from memvisor.lab.vmlinux import pvh_kernel
from memvisor.units import format_size

# How long the lab may take from QEMU's start to the agent's READY.
BOOT_TIMEOUT = 180.0
# How many times a lab that did not start (no READY within BOOT_TIMEOUT) is tried in all.
BOOT_ATTEMPTS = 2
# After Ctrl-C/SIGTERM: how long the command gets to end before QEMU is killed.
GRACE = 5.0
# The agent sends a HEARTBEAT every inner.HEARTBEAT_INTERVAL (5 s): this long without any frame from it
# means the lab's kernel no longer runs it. (MEMVISOR_LAB_HEARTBEAT_TIMEOUT overrides it, for tests.)
HEARTBEAT_TIMEOUT = float(os.environ.get("MEMVISOR_LAB_HEARTBEAT_TIMEOUT") or 60.0)
# How long the agent gets to answer DIAGNOSE.
DIAGNOSIS_WAIT = 30.0
CONSOLE_TAIL_LINES = 12
# The command's PATH when the caller's environment has none.
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


class LabImage(Protocol):
    """The lab's kernel and initramfs (memvisor.guest.image.build_lab_image() returns one)."""

    @property
    def kernel(self) -> Path: ...
    @property
    def initrd(self) -> Path: ...


@dataclass(frozen=True)
class _Paths:
    kernel: Path
    initrd: Path


def default_image(progress: Callable[[str], None] | None = None) -> LabImage:
    """The lab image: $MEMVISOR_LAB_KERNEL/$MEMVISOR_LAB_INITRD if both are set (for development),
    else the cached one from the image builder (built on first use)."""
    kernel, initrd = os.environ.get("MEMVISOR_LAB_KERNEL"), os.environ.get("MEMVISOR_LAB_INITRD")
    if kernel and initrd:
        return _Paths(Path(kernel), Path(initrd))
    from memvisor.guest.image import build_lab_image  # the builder fetches packages: import only when needed

    image: LabImage = build_lab_image(progress=progress)
    return image


def package_root() -> str:
    """The folder that holds the `memvisor` package: the agent inside imports it from there."""
    return str(Path(__file__).resolve().parent.parent.parent)


def console_tail(path: Path, lines: int = CONSOLE_TAIL_LINES) -> str:
    """The last lines of the L1 console log, joined with " | " (for one-line errors)."""
    try:
        text = path.read_bytes()[-16384:].decode(errors="replace")
    except OSError:
        return "(no console log)"
    kept = [line.strip() for line in text.replace("\r", "\n").splitlines() if line.strip()]
    return " | ".join(kept[-lines:]) or "(the console log is empty)"


def _stopped_error(status: int | None, qemu_log: Path, console: Path) -> MemvisorError:
    """Why the lab ended under a running command: QEMU's last words and, when the lab kernel panicked, the
    panic's cause from the console (kept with QEMU's log in a folder that outlives the lab): a LabCrashed."""
    head = f"the lab stopped before the command finished (QEMU status {status}; {_qemu_error(qemu_log)})"
    try:
        text = console.read_bytes().decode(errors="replace")
    except OSError:
        text = ""
    story = postmortem.panic_story(text)
    if not story:
        return MemvisorError(f"{head}: {console_tail(console)}")
    keep = Path(tempfile.mkdtemp(prefix="memvisor-lab-crash-"))
    with contextlib.suppress(OSError):
        shutil.copyfile(console, keep / "lab-console.log")
        shutil.copyfile(qemu_log, keep / "qemu.log")
    body = "\n  ".join(story)
    return LabCrashed(f"{head}: the lab's kernel panicked:\n  {body}\n  full console: {keep / 'lab-console.log'}")


class _Stopped(Exception):
    """The lab stopped without an EXIT frame."""


class _Stuck(Exception):
    """The lab makes no progress (no READY in time, no heartbeat, or the command's deadline passed)."""

    def __init__(self, reason: str, *, agent_alive: bool, booted: bool = True) -> None:
        super().__init__(reason)
        self.reason = reason
        self.agent_alive = agent_alive
        self.booted = booted


class LabSession:
    """One lab run on the host side (see the module docstring); `run()` returns the command's status."""

    def __init__(
        self,
        request: StartRequest,
        forwards: list[str],
        link_socket: socket.socket,
        qemu: subprocess.Popen[bytes],
        console_log: Path,
        *,
        forward_stdin: bool,
        log: Callable[[str], None],
        timeout: float | None = None,
        warn: Callable[[str], None] | None = None,
    ) -> None:
        self.request = request
        self.timeout = timeout  # the command's deadline, in seconds from READY
        self.warn = warn or (lambda message: print(f"memvisor lab: {message}", file=sys.stderr, flush=True))
        self.last_heard = time.monotonic()
        self.diagnosis: str | None = None
        self.forward_paths = forwards
        self.qemu = qemu
        self.console_log = console_log
        self.log = log
        self.reactor = Reactor()
        self.sock = link_socket
        self.link = Link(link_socket.fileno(), self.on_frame)
        self.reactor.add(self.link)
        self.streams: dict[int, Stream] = {}
        self.listeners: dict[int, socket.socket] = {}
        self.next_channel = FIRST_CONNECTION
        self.status: int | None = None
        self.ready_at: float | None = None
        self.error: str | None = None
        self.forward_stdin = forward_stdin
        self.broken_outputs: set[int] = set()
        self._stdin_pipe: int | None = None

    # -- frames from the lab ----------------------------------------------------------------------
    def on_frame(self, frame: Frame) -> None:
        self.last_heard = time.monotonic()
        if frame.channel == CONTROL:
            if frame.kind is Kind.HEARTBEAT:
                pass
            elif frame.kind is Kind.DIAGNOSIS:
                self.diagnosis = frame.payload.decode(errors="replace")
            elif frame.kind is Kind.READY:
                self.ready_at = time.monotonic()
                self.log("lab agent ready")
            elif frame.kind is Kind.EXIT:
                self.status = frame.integer()
            elif frame.kind is Kind.ERROR:
                self.error = frame.payload.decode(errors="replace")
            elif frame.kind is Kind.LISTENING:
                self.listen(frame.integer())
            return
        if frame.channel in (STDOUT, STDERR):
            if frame.kind is Kind.DATA and frame.channel not in self.broken_outputs:
                try:
                    _write_output(sys.stdout if frame.channel == STDOUT else sys.stderr, frame.payload)
                except OSError:  # our reader went away (a closed pipe): drop the rest, like `cmd | head`
                    self.broken_outputs.add(frame.channel)
            return
        stream = self.streams.get(frame.channel)
        if stream is not None:
            stream.deliver(frame)

    # -- forwarded sockets ------------------------------------------------------------------------
    def listen(self, index: int) -> None:
        """The command listens on forward `index` inside: own the same path on the host now."""
        if not 0 <= index < len(self.forward_paths) or index in self.listeners:
            return
        path = self.forward_paths[index]
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)  # a stale socket, or the one the command made through a shared folder
        server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        server.bind(path)
        server.listen(16)
        server.setblocking(False)
        self.listeners[index] = server
        self.reactor.add(Readable(server.fileno(), lambda: self.accept(index)))
        self.log(f"forwarding {path}")

    def accept(self, index: int) -> None:
        try:
            client, _ = self.listeners[index].accept()
        except (BlockingIOError, InterruptedError):
            return
        channel = self.next_channel
        self.next_channel += 1
        self.link.send(int_frame(channel, Kind.OPEN, index))
        self._add_stream(channel, client.fileno(), readable=True, writable=True, sock=client)

    def _add_stream(
        self, channel: int, fd: int, *, readable: bool, writable: bool, sock: socket.socket | None = None
    ) -> None:
        stream = Stream(
            self.link, channel, fd, readable=readable, writable=writable, sock=sock, on_closed=self._forget
        )
        self.streams[channel] = stream
        self.reactor.add(stream)

    def _forget(self, stream: Stream) -> None:
        self.streams.pop(stream.channel, None)
        self.reactor.remove(stream)

    # -- stdin ------------------------------------------------------------------------------------
    def _start_stdin(self) -> None:
        """Our stdin may be a terminal, a pipe or a file (not pollable): a thread copies it into a pipe."""
        read_end, write_end = os.pipe()
        self._stdin_pipe = read_end

        def copy() -> None:
            try:
                while chunk := os.read(0, 65536):
                    _write_all(write_end, chunk)
            except OSError:
                pass
            finally:
                os.close(write_end)

        threading.Thread(target=copy, name="lab-stdin", daemon=True).start()
        self._add_stream(STDIN, read_end, readable=True, writable=False)

    def _deliver_last_bytes(self, timeout: float = 2.0) -> None:
        """After EXIT: let forwarded clients receive what the command sent them last (a QMP reply to quit)."""
        deadline = time.monotonic() + timeout
        while any(stream.pending for stream in self.streams.values()) and time.monotonic() < deadline:
            self.reactor.poll(0.05)

    # -- the loop ---------------------------------------------------------------------------------
    def run(self, stop: _StopRequest) -> int:
        started = time.monotonic()
        self.link.send(Frame(CONTROL, Kind.START, self.request.encode()))
        if self.forward_stdin:
            self._start_stdin()
        qemu_exit = os.pidfd_open(self.qemu.pid)
        self.reactor.add(Readable(qemu_exit, lambda: None))
        self.reactor.add(Readable(stop.wake_fd, stop.drain))
        try:
            while self.status is None:
                if self.error is not None:
                    raise MemvisorError(f"the lab could not start the command: {self.error}")
                if self.link.closed or self.qemu.poll() is not None:
                    raise _Stopped()
                now = time.monotonic()
                if self.ready_at is None and now - started > BOOT_TIMEOUT:
                    raise _Stuck(f"the lab did not start within {BOOT_TIMEOUT:.0f} s", agent_alive=False, booted=False)
                if self.ready_at is not None and now - self.last_heard > HEARTBEAT_TIMEOUT:
                    raise _Stuck(
                        f"the lab stopped answering: no heartbeat from its agent for {now - self.last_heard:.0f} s "
                        f"(while running {_shown(self.request.argv)})",
                        agent_alive=False,
                    )
                if self.ready_at is not None and self.timeout is not None and now - self.ready_at > self.timeout:
                    raise _Stuck(
                        f"{_shown(self.request.argv)} did not end within its deadline of {self.timeout:.0f} s",
                        agent_alive=True,
                    )
                if stop.signal is not None:
                    name = signal.Signals(stop.signal).name
                    if self.ready_at is None:
                        self.warn(f"{name} while the lab was starting: stopping it")
                        return 128 + stop.signal
                    if stop.sent is None:
                        self.warn(f"{name}: stopping {_shown(self.request.argv)} in the lab (SIGTERM)")
                        self.link.send(int_frame(CONTROL, Kind.SIGNAL, signal.SIGTERM))
                        stop.sent = time.monotonic()
                    elif stop.count > 1 or time.monotonic() - stop.sent > GRACE:
                        self.warn(f"the command did not end within {GRACE:.0f} s of {name}: stopping the lab")
                        return 128 + stop.signal
                self.reactor.poll(0.5)
            self._deliver_last_bytes()
            return self.status
        finally:
            os.close(qemu_exit)
            for server in self.listeners.values():
                server.close()
            for index in self.listeners:
                with contextlib.suppress(OSError):
                    os.unlink(self.forward_paths[index])
            for stream in list(self.streams.values()):
                stream.close(notify=False)
            self.reactor.close()

    def ask_diagnosis(self, timeout: float = DIAGNOSIS_WAIT) -> str | None:
        """Ask the agent for its diagnosis (diagnose.py) and wait for it; None if it does not answer.

        Runs its own small loop over the link only (run() has closed the reactor and streams)."""
        if self.link.closed:
            return None
        reactor = Reactor()
        reactor.add(self.link)
        try:
            self.link.send(Frame(CONTROL, Kind.DIAGNOSE))
            deadline = time.monotonic() + timeout
            while self.diagnosis is None and not self.link.closed and time.monotonic() < deadline:
                reactor.poll(0.2)
        except (OSError, MuxError):
            return None
        finally:
            reactor.close()
        return self.diagnosis


def _shown(argv: list[str], limit: int = 80) -> str:
    text = " ".join(argv)
    return f"`{text if len(text) <= limit else text[: limit - 3] + '...'}`"


def _write_output(out: TextIO, data: bytes) -> None:
    """Bytes from the command to our stdout/stderr: straight to the fd, or as text when there is none."""
    try:
        fd = out.fileno()
    except (AttributeError, io.UnsupportedOperation):  # replaced by a capture object
        out.write(data.decode(errors="replace"))
        return
    out.flush()  # anything Python printed before goes first
    _write_all(fd, data)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        try:
            written = os.write(fd, view)
        except BlockingIOError:
            time.sleep(0.01)
            continue
        view = view[written:]


class _StopRequest:
    """SIGINT/SIGTERM received while the lab runs: recorded here, acted on by the loop."""

    def __init__(self) -> None:
        self.signal: int | None = None
        self.count = 0
        self.sent: float | None = None
        self._read, self._write = os.pipe()
        os.set_blocking(self._read, False)
        os.set_blocking(self._write, False)
        self.wake_fd = self._read

    def handle(self, signum: int, _frame: object) -> None:
        self.signal = signum
        self.count += 1
        with contextlib.suppress(OSError):
            os.write(self._write, b"!")

    def drain(self) -> None:
        with contextlib.suppress(OSError):
            os.read(self._read, 64)

    def close(self) -> None:
        os.close(self._read)
        os.close(self._write)


@contextlib.contextmanager
def _signals(stop: _StopRequest) -> Iterator[None]:
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {signum: signal.signal(signum, stop.handle) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _connect(
    path: Path,
    qemu: subprocess.Popen[bytes],
    qemu_log: Path,
    timeout: float = 30.0,
    stop: _StopRequest | None = None,
) -> socket.socket | None:
    """Connect to QEMU's chardev socket as soon as it exists (QEMU waits for us before it runs the guest);
    None when a signal arrived first."""
    deadline = time.monotonic() + timeout
    while True:
        if stop is not None and stop.signal is not None:
            return None
        if qemu.poll() is not None:
            raise MemvisorError(f"QEMU for the lab exited at once: {_qemu_error(qemu_log)}")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(str(path))
            return sock
        except (FileNotFoundError, ConnectionRefusedError):
            sock.close()
        if time.monotonic() > deadline:
            raise MemvisorError(f"QEMU for the lab did not open its port socket within {timeout:.0f} s")
        time.sleep(0.01)


def _qemu_error(log: Path) -> str:
    try:
        lines = [line.strip() for line in log.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        lines = []
    return " | ".join(lines[-5:]) or "no message"


def _stop_qemu(qemu: subprocess.Popen[bytes]) -> None:
    if qemu.poll() is not None:
        return
    qemu.kill()  # the agent has synced the shares before EXIT: nothing inside is worth waiting for
    with contextlib.suppress(subprocess.TimeoutExpired):
        qemu.wait(timeout=10)


def run_in_lab(
    argv: list[str],
    *,
    memory: int,
    cpus: int = 2,
    cwd: str,
    env: dict[str, str],
    shares: list[Path] | None = None,
    forwards: list[Path] | None = None,
    stdin: bool = False,
    console_log: Path | None = None,
    image: LabImage | None = None,
    log: Callable[[str], None] | None = None,
    timeout: float | None = None,
) -> int:
    """Run `argv` in a fresh lab and return its exit status (shell style: 128 + N when killed by signal N).

    `memory` is the lab's own memory (see plan.lab_memory_for); `shares` are host folders the command may
    write (mounted read-write at the same paths); `forwards` are UNIX socket paths the command creates inside,
    made reachable at the same paths on the host; `console_log` keeps the L1 console (else a temp file);
    `timeout` is the command's deadline in seconds once the lab has started.
    Raises MemvisorError when the lab cannot start, dies before the command ends, stops answering or the
    deadline passes; the last three with a diagnosis (postmortem.py) kept in a folder the message names.
    """
    if not argv:
        raise MemvisorError("nothing to run in the lab: give a command")
    if os.environ.get("MEMVISOR_IN_LAB") == "1":
        raise MemvisorError(
            "this is already inside memvisor's lab, which does not nest: run the command directly"
        )
    say = log or (lambda message: None)
    resolved_shares = sorted({plan.resolve_share(folder) for folder in shares or []})
    plan.check_lab_memory(memory, plan.mem_available())
    python = sys.executable
    root = package_root()
    # A checkout or virtualenv under /tmp (a CI clone, say) would be hidden by the lab's own tmpfs: share
    # those folders too, mounted by the lab's init before the agent starts (it is imported from there).
    early = plan.early_shares([root, sys.prefix])
    resolved_shares = sorted({*resolved_shares, *early})
    forward_paths = [plan.resolve_forward(path, resolved_shares) for path in forwards or []]
    plan.check_cwd(cwd, resolved_shares)
    lab_image = image or default_image(progress=say)
    request = StartRequest(
        argv=list(argv),
        cwd=cwd,
        env={"PATH": DEFAULT_PATH, **env, "MEMVISOR_IN_LAB": "1", "PYTHONDONTWRITEBYTECODE": "1"},
        shares=[
            (plan.share_tag(index), folder) for index, folder in enumerate(resolved_shares) if folder not in early
        ],
        forwards=forward_paths,
        stdin=stdin,
    )
    kvm_amd = plan.lab_kvm_amd()  # a bad value is a usage error before anything starts
    stop = _StopRequest()
    try:
        with _signals(stop):  # from here on a signal is handled: the temp folder and QEMU always go
            for attempt in range(1, BOOT_ATTEMPTS + 1):
                workdir = Path(tempfile.mkdtemp(prefix="memvisor-lab-"))
                try:
                    console = console_log or workdir / "console.log"
                    console.write_bytes(b"")
                    kernel = pvh_kernel(Path(lab_image.kernel)) or Path(lab_image.kernel)
                    machine = plan.LabMachine(
                        kernel=kernel,
                        initrd=Path(lab_image.initrd),
                        memory=memory,
                        cpus=cpus,
                        python=python,
                        root=root,
                        port_socket=workdir / plan.PORT_SOCKET,
                        console_log=console,
                        shares=tuple(resolved_shares),
                        early_shares=tuple(early),
                        monitor_socket=workdir / plan.MONITOR_SOCKET,
                        qemu=plan.lab_qemu(),
                        kvm_amd=kvm_amd,
                    )
                    say(
                        f"starting lab: {format_size(memory)}, {cpus} vCPUs, {len(resolved_shares)} shares, "
                        f"console {console}"
                        + (f", QEMU {machine.qemu} (${plan.QEMU_ENV})" if os.environ.get(plan.QEMU_ENV) else "")
                        + (f", kvm_amd {' '.join(kvm_amd) or 'defaults'}" if kvm_amd != plan.DEFAULT_KVM_AMD else "")
                    )
                    return _run_once(machine, request, workdir, stop, stdin=stdin, say=say, timeout=timeout)
                except _Stuck as stuck:
                    if stuck.booted or attempt == BOOT_ATTEMPTS or stop.signal is not None:
                        raise
                    print(f"memvisor lab: {stuck.reason}; trying once more", file=sys.stderr, flush=True)
                finally:
                    shutil.rmtree(workdir, ignore_errors=True)
    except _Stuck as stuck:  # _run_once turned it into a report already; only the message is left
        raise MemvisorError(stuck.reason) from None
    finally:
        stop.close()
    raise AssertionError("unreachable")


def _run_once(
    machine: plan.LabMachine,
    request: StartRequest,
    workdir: Path,
    stop: _StopRequest,
    *,
    stdin: bool,
    say: Callable[[str], None],
    timeout: float | None,
) -> int:
    """One lab boot: start QEMU, run the session, always stop QEMU. A _Stuck that escapes carries the report."""
    console = machine.console_log
    qemu_log = workdir / "qemu.log"
    with qemu_log.open("wb") as qemu_out:
        try:
            qemu = subprocess.Popen(
                plan.qemu_command(machine),
                stdin=subprocess.DEVNULL,
                stdout=qemu_out,
                stderr=qemu_out,
                start_new_session=True,
            )
        except FileNotFoundError:
            if os.environ.get(plan.QEMU_ENV):
                raise MemvisorError(
                    f"${plan.QEMU_ENV} names {machine.qemu}, which does not exist: fix it or unset it"
                ) from None
            raise MemvisorError(
                "qemu-system-x86_64 is not installed: install Debian's qemu-system-x86 (apt-get install qemu-system-x86)"
            ) from None
    try:
        link_socket = _connect(machine.port_socket, qemu, qemu_log, stop=stop)
        if link_socket is None:
            print("memvisor lab: interrupted while the lab was starting: stopped it", file=sys.stderr, flush=True)
            return 128 + (stop.signal or signal.SIGTERM)
        session = LabSession(
            request, list(request.forwards), link_socket, qemu, console, forward_stdin=stdin, log=say, timeout=timeout
        )
        try:
            return session.run(stop)
        except _Stopped:
            with contextlib.suppress(subprocess.TimeoutExpired):
                qemu.wait(timeout=5)
            raise _stopped_error(qemu.returncode, qemu_log, console) from None
        except MuxError as error:
            raise MemvisorError(f"{error}: {console_tail(console)}") from None
        except _Stuck as stuck:
            agent_text = session.ask_diagnosis() if stuck.agent_alive else None
            keep = Path(tempfile.mkdtemp(prefix="memvisor-lab-diagnosis-"))
            report = postmortem.collect(
                stuck.reason,
                postmortem.Monitor(machine.monitor_socket) if machine.monitor_socket else None,
                console,
                qemu_log,
                agent_text,
                keep,
                nmi=agent_text is None,
            )
            stuck.reason = report.summary()
            raise
        finally:
            link_socket.close()
    finally:
        _stop_qemu(qemu)
