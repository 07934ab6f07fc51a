"""When the lab is stuck: collect what explains it on the host side, keep it, and say it in a few lines.

    monitor = Monitor(workdir / "monitor.sock")     # QEMU's human monitor on a private socket (plan.py)
    report = collect(reason, monitor, console_log, qemu_log, agent_text, keep=folder, nmi=True)
    raise MemvisorError(report.summary())

What it gathers, into `keep` (a folder that outlives the lab's temp folder):
- `registers.txt`: every L1 vCPU's registers (`info registers -a`), from QEMU, which answers even when the
  lab's kernel does not;
- with `nmi` (used when the agent no longer answers): sysrq l and w typed on the lab's PS/2 keyboard
  (`sendkey`; the lab kernel runs with `sysrq_always_enabled`), which print every CPU's backtrace and the
  blocked tasks on the console; if no backtrace appears, an NMI to every L1 vCPU, which the lab kernel
  (`unknown_nmi_panic=1 panic_print=0x40`, plan.py) turns into a panic with the interrupted code's
  backtrace. That ends the lab, which is being stopped anyway;
- `lab-console.log`: the L1 console (kernel messages, sysrq output, the NMI backtraces);
- `qemu.log`: QEMU's own stderr;
- `agent-diagnosis.txt`: what the agent inside collected (diagnose.py), when it still answered.
"""

from __future__ import annotations

import contextlib
import re
import shutil
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path

PROMPT = b"(qemu) "
ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
# After the NMI: wait for the console to stop growing for this long (the backtraces are being printed).
CONSOLE_SETTLE = 2.0
CONSOLE_WAIT = 15.0
SYSRQ_WAIT = 8.0


class Monitor:
    """QEMU's human monitor (HMP) on a UNIX socket: one command at a time, each answer up to the prompt."""

    def __init__(self, path: Path, timeout: float = 5.0) -> None:
        self.path = path
        self.timeout = timeout

    def command(self, line: str) -> str:
        """Run one HMP command; returns its output (empty on any failure: a diagnosis never raises)."""
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.settimeout(self.timeout)
                sock.connect(str(self.path))
                _read_until_prompt(sock)  # the greeting
                sock.sendall(line.encode() + b"\n")
                answer = _read_until_prompt(sock).decode(errors="replace")
        except OSError as error:
            return f"(the QEMU monitor did not answer {line!r}: {error})"
        # The first line is the monitor's echo of what we typed (redrawn with terminal escapes).
        lines = ANSI_ESCAPE.sub("", answer).replace("\r", "").splitlines()[1:]
        return "\n".join(lines).strip()


def _read_until_prompt(sock: socket.socket) -> bytes:
    data = b""
    while not data.endswith(PROMPT):
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    return data[: -len(PROMPT)] if data.endswith(PROMPT) else data


def wait_for_quiet(path: Path, since: int, settle: float = CONSOLE_SETTLE, limit: float = CONSOLE_WAIT) -> None:
    """Wait until the file at `path` has grown past `since` bytes and then stopped growing for `settle` s
    (or `limit` s passed)."""
    deadline = time.monotonic() + limit
    size = since
    last_change = time.monotonic()
    while time.monotonic() < deadline:
        now = _size(path)
        if now != size:
            size, last_change = now, time.monotonic()
        elif size != since and time.monotonic() - last_change >= settle:
            return
        time.sleep(0.2)


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def _text(path: Path) -> str:
    try:
        return path.read_bytes().decode(errors="replace")
    except OSError:
        return ""


def lab_backtraces(console: str) -> list[str]:
    """From the L1 console: the first lines of each CPU's backtrace the NMI panic or sysrq l printed."""
    found: list[str] = []
    lines = console.replace("\r", "\n").splitlines()
    for index, line in enumerate(lines):
        if "NMI backtrace for cpu" in line or "Kernel panic" in line or "RIP: 0010:" in line:
            found.append(line.strip())
        if "Call Trace:" in line:
            calls = [
                entry.strip()
                for entry in lines[index + 1 : index + 12]
                if "+0x" in entry and "?" not in entry.split("]")[-1][:3]
            ]
            if calls:
                found.append("  calls: " + " < ".join(c.split("] ")[-1].strip() for c in calls[:6]))
    return found[-12:]


# Console lines that start the story of a lab kernel crash (its cause comes before "Kernel panic").
_CRASH_STARTS = (
    "Uhhuh. NMI",
    "NMI: ",
    "BUG:",
    "kernel BUG at",
    "Oops:",
    "general protection fault",
    "WARNING:",
    "watchdog: ",
    "rcu: INFO",
    "INFO: task",
    "Kernel panic - not syncing",
)
CRASH_LINES = 40
CRASH_SEARCH = 5000  # console lines to walk back from the panic line
CRASH_SPAN = 10.0  # seconds: an earlier line belongs to another story
_STAMP = re.compile(r"^\[\s*(\d+\.\d+)\]")


def _stamp(line: str) -> float | None:
    """The kernel's timestamp at the start of a console line (`[  118.149400] ...`), if it has one."""
    match = _STAMP.match(line)
    return float(match.group(1)) if match else None


def panic_story(console: str, limit: int = CRASH_LINES) -> list[str]:
    """The lab kernel's last crash as the console told it: from the first line that names its cause (an
    unknown NMI, a BUG, an oops, a lockup) up to the panic line and the first frames after it; [] when the
    console shows no panic. The tail of a panic (the other CPUs' backtraces) hides the cause; this finds it.

    The walk back stays within the crash (lines stamped at most CRASH_SPAN seconds before the panic), which may
    be a long one: a recursive page fault prints a frame per level until the stack overflows (1,500 lines seen).
    A story longer than `limit` keeps its head and tail, and a line naming every distinct interrupted context
    (`RIP:` lines, in order), so that where the crash began is never cut out."""
    lines = [line.rstrip() for line in console.replace("\r", "\n").splitlines() if line.strip()]
    panics = [i for i, line in enumerate(lines) if "Kernel panic - not syncing" in line]
    if not panics:
        return []
    panic = panics[-1]
    panic_time = _stamp(lines[panic])
    start = panic
    for index in range(panic, max(panic - CRASH_SEARCH, -1), -1):
        stamp = _stamp(lines[index])
        if stamp is not None and panic_time is not None and panic_time - stamp > CRASH_SPAN:
            break
        if any(marker in lines[index] for marker in _CRASH_STARTS):
            start = index
    story = lines[start : panic + 1]
    after = [line for line in lines[panic + 1 : panic + 30] if "+0x" in line or "RIP:" in line][:8]
    if len(story) > limit:
        contexts: list[str] = []
        for line in story:
            if "RIP:" in line:
                where = line.split("RIP:", 1)[1].strip()
                if where not in contexts:
                    contexts.append(where)
        story = (
            story[: limit // 2]
            + [f"... ({len(story) - limit} lines left out; the interrupted contexts, in order: {' < '.join(contexts)})"]
            + story[-(limit // 2) :]
        )
    return story + after


@dataclass
class Report:
    reason: str
    folder: Path
    lines: list[str] = field(default_factory=list)

    def summary(self) -> str:
        body = "\n  ".join(self.lines)
        return f"{self.reason}\n  {body}\n  full logs: {self.folder}" if body else f"{self.reason}; logs: {self.folder}"


def collect(
    reason: str,
    monitor: Monitor | None,
    console_log: Path,
    qemu_log: Path,
    agent_text: str | None,
    keep: Path,
    *,
    nmi: bool,
) -> Report:
    """Gather the host side's evidence into `keep` (see the module docstring) and summarise it."""
    keep.mkdir(parents=True, exist_ok=True)
    report = Report(reason, keep)
    if monitor is not None:
        registers = monitor.command("info registers -a")
        (keep / "registers.txt").write_text(registers + "\n")
        rips = [line.split()[0] for line in registers.splitlines() if line.startswith(("RIP=", "EIP="))]
        if rips:
            report.lines.append(f"lab vCPUs at {', '.join(rips)} (registers.txt)")
        if nmi:
            # The keyboard first (plan.py enables sysrq): CPU backtraces (l) and blocked tasks (w), the lab
            # going on; an NMI panic only when that printed no backtrace (the keyboard interrupt not taken).
            for key in "lw":
                before = _size(console_log)
                monitor.command(f"sendkey alt-sysrq-{key}")
                wait_for_quiet(console_log, before, limit=SYSRQ_WAIT)
            if "NMI backtrace for cpu" not in _text(console_log):
                before = _size(console_log)
                monitor.command("nmi")
                wait_for_quiet(console_log, before)
    if agent_text is not None:
        (keep / "agent-diagnosis.txt").write_text(agent_text + "\n")
        report.lines += _agent_summary(agent_text)
    elif nmi:
        report.lines.append("the agent inside the lab did not answer: the lab's kernel itself is stuck")
    with contextlib.suppress(OSError):
        shutil.copyfile(qemu_log, keep / "qemu.log")
        qemu_text = qemu_log.read_text(errors="replace").strip()
        if qemu_text:
            report.lines.append("QEMU said: " + " | ".join(qemu_text.splitlines()[-3:]))
    console_copy = keep / "lab-console.log"
    if console_log.resolve() != console_copy.resolve():
        with contextlib.suppress(OSError):
            shutil.copyfile(console_log, console_copy)
    console = _text(console_log)
    backtraces = lab_backtraces(console)
    if backtraces:
        report.lines.append("lab kernel: " + " / ".join(backtraces[:6]))
    kept = [line.strip() for line in console.replace("\r", "\n").splitlines() if line.strip()]
    report.lines.append(
        "lab console ends: " + (" | ".join(kept[-4:]) if kept else "(empty: the lab kernel printed nothing)")
    )
    return report


def _agent_summary(text: str) -> list[str]:
    """The few lines of the agent's diagnosis worth printing: stuck processes and the guests' last words."""
    lines: list[str] = []
    section = ""
    for line in text.splitlines():
        if line.startswith("== "):
            section = line
            continue
        if "the command's processes" in section and (" D " in line or " R " in line):
            lines.append("busy or stuck: " + line[:200])
    consoles = [i for i, line in enumerate(text.splitlines()) if "end of its guest's console" in line]
    for index in consoles:
        tail = [entry for entry in text.splitlines()[index + 1 : index + 31] if not entry.startswith("== ")]
        if tail:
            lines.append(text.splitlines()[index][3:] + ": " + " | ".join(entry.strip() for entry in tail[-3:]))
    return lines[:12]
