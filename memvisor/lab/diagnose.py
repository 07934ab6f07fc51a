"""What the agent inside the lab collects when the host says the command looks stuck (a DIAGNOSE frame).

    text = collect(command_pid)

The text holds, in order:
1. every process of the command's session: pid, state, kernel wait channel and command line, so a process
   stuck in the kernel (state D, or R for minutes) shows;
2. for each `memvisor run` among them: each thread's kernel stack (/proc/PID/task/TID/stack), a dump of its
   Python threads (SIGUSR2: memvisor registers faulthandler on it, see memvisor/vmm/session.py), read back
   from the end of its stderr when that is a file, and the end of its guest's console (`--console`);
3. the lab kernel's own view: `sysrq l` (a backtrace of every CPU) and `sysrq w` (blocked tasks) go to the
   lab's console and dmesg; the end of dmesg is included.

Only the standard library, imported lazily: every import is a file read over 9p under TCG.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time

# memvisor run dumps its Python threads on this signal (faulthandler), to its stderr.
DUMP_SIGNAL = signal.SIGUSR2
CONSOLE_TAIL = 30
STDERR_TAIL = 80
DMESG_TAIL = 200
LIMIT = 512 * 1024


def _read(path: str, limit: int = 65536) -> str:
    try:
        with open(path, "rb") as file:
            return file.read(limit).decode(errors="replace")
    except OSError:
        return ""


def _read_tail(path: str, limit: int = 65536) -> str:
    try:
        with open(path, "rb") as file:
            file.seek(max(0, os.path.getsize(path) - limit))
            return file.read().decode(errors="replace")
    except OSError:
        return ""


def cmdline(pid: int) -> list[str]:
    return [word for word in _read(f"/proc/{pid}/cmdline").split("\0") if word]


def session_of(pid: int) -> int | None:
    stat = _read(f"/proc/{pid}/stat")
    try:
        return int(stat[stat.rindex(")") + 2 :].split()[3])  # field 6: session id
    except (ValueError, IndexError):
        return None


def processes_in_session(session: int) -> list[int]:
    found = []
    for name in os.listdir("/proc"):
        if name.isdigit() and session_of(int(name)) == session:
            found.append(int(name))
    return sorted(found)


def is_memvisor_run(argv: list[str]) -> bool:
    """`python -m memvisor run ...` or `.../memvisor run ...` (the processes that answer DUMP_SIGNAL)."""
    for index, word in enumerate(argv[:-1]):
        if (word == "memvisor" or word.endswith("/memvisor")) and argv[index + 1] == "run":
            return index == 0 or argv[index - 1] == "-m" or word.endswith("/memvisor")
    return False


def console_of(argv: list[str]) -> str | None:
    for index, word in enumerate(argv):
        if word == "--console" and index + 1 < len(argv):
            return argv[index + 1]
        if word.startswith("--console="):
            return word.split("=", 1)[1]
    return None


def tail(text: str, lines: int) -> str:
    return "\n".join(text.replace("\r", "\n").splitlines()[-lines:])


def _status_line(pid: int, key: str) -> str:
    for line in _read(f"/proc/{pid}/status").splitlines():
        if line.startswith(key + ":"):
            return line.split(":", 1)[1].strip()
    return "?"


def describe_process(pid: int) -> str:
    return (
        f"{pid} {_status_line(pid, 'State')} wchan={_read(f'/proc/{pid}/wchan') or '-'} "
        f"threads={_status_line(pid, 'Threads')}: {' '.join(cmdline(pid))[:300]}"
    )


def kernel_stacks(pid: int) -> str:
    parts = []
    try:
        tasks = sorted(os.listdir(f"/proc/{pid}/task"), key=int)
    except OSError:
        return "(gone)"
    for tid in tasks:
        base = f"/proc/{pid}/task/{tid}"
        parts.append(
            f"-- thread {tid} {_read(base + '/comm').strip()} {_status_line(int(tid), 'State')}\n"
            f"{_read(base + '/stack').rstrip() or '(no kernel stack readable)'}"
        )
    return "\n".join(parts)


def sysrq(keys: str) -> None:
    for key in keys:
        try:
            with open("/proc/sysrq-trigger", "w") as trigger:
                trigger.write(key)
        except OSError:
            return


def dmesg_tail(lines: int = DMESG_TAIL) -> str:
    """The end of the kernel log (/dev/kmsg, non-blocking: no dmesg binary needed)."""
    records: list[str] = []
    try:
        fd = os.open("/dev/kmsg", os.O_RDONLY | os.O_NONBLOCK)
    except OSError as error:
        return f"(cannot read /dev/kmsg: {error})"
    try:
        while True:
            try:
                record = os.read(fd, 8192).decode(errors="replace")
            except BlockingIOError:
                break
            except OSError:  # EPIPE: overwritten records; keep reading
                continue
            if not record:
                break
            header, _, message = record.partition(";")
            stamp = header.split(",")[2] if header.count(",") >= 2 else "?"
            records.append(f"[{int(stamp) / 1e6:12.6f}] {message.splitlines()[0] if message else ''}")
            records = records[-lines:]
    finally:
        os.close(fd)
    return "\n".join(records)


def collect(command_pid: int | None) -> str:
    """The diagnosis text (see the module docstring); never raises."""
    out = [f"== lab uptime {_read('/proc/uptime').split(' ')[0]} s, load {_read('/proc/loadavg').strip()}"]
    try:
        session = session_of(command_pid) if command_pid is not None else None
        pids = processes_in_session(session) if session is not None else []
        out.append("== the command's processes (pid state wchan threads: command line)")
        out += [describe_process(pid) for pid in pids] or ["(none left)"]
        runs = [pid for pid in pids if is_memvisor_run(cmdline(pid))]
        for pid in runs:
            out.append(f"== memvisor run {pid}: kernel stacks")
            out.append(kernel_stacks(pid))
        for pid in runs:  # the Python dumps go to each process's own stderr, which the test keeps
            with contextlib.suppress(OSError):
                os.kill(pid, DUMP_SIGNAL)
        time.sleep(1.0)  # the dumps reach the files
        for pid in runs:
            stderr = os.path.realpath(f"/proc/{pid}/fd/2")
            if os.path.isfile(stderr):
                out.append(f"== memvisor run {pid}: the end of its stderr {stderr} (with its Python threads)")
                out.append(tail(_read_tail(stderr), STDERR_TAIL))
        for pid in runs:
            console = console_of(cmdline(pid))
            if console:
                out.append(f"== memvisor run {pid}: the end of its guest's console {console}")
                out.append(tail(_read_tail(console), CONSOLE_TAIL) or "(empty)")
        sysrq("lw")
        time.sleep(1.0)
        out.append("== lab kernel log (after sysrq l: CPU backtraces, sysrq w: blocked tasks)")
        out.append(dmesg_tail())
    except Exception as error:  # a diagnosis must not take the agent down
        out.append(f"(the diagnosis stopped early: {error!r})")
    text = "\n".join(out)
    return text[-LIMIT:]
