"""The human monitor (HMP) commands reachable through QMP's `human-monitor-command`, with QEMU 7.2's text.

As in QEMU, each HMP command is a thin printer over a QMP command: `info balloon` runs `query-balloon` and prints
`balloon: actual=1024` (MiB). QEMU's monitor ends lines with CR LF. A failing command prints `Error: DESC`; an
unknown one prints `unknown command: 'LINE'`. The reply is always a string (never a QMP error).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from memvisor.control.errors import QmpError
from memvisor.errors import MemvisorError

Execute = Callable[[str, dict[str, Any]], Any]
EOL = "\r\n"
MiB = 1 << 20


def _lines(*lines: str) -> str:
    return "".join(line + EOL for line in lines)


def info_status(execute: Execute) -> str:
    status = execute("query-status", {})
    text = "VM status: " + ("running" if status["running"] else "paused")
    if not status["running"] and status["status"] != "paused":
        text += f" ({status['status']})"
    return _lines(text)


def info_balloon(execute: Execute) -> str:
    return _lines(f"balloon: actual={execute('query-balloon', {})['actual'] // MiB}")


def info_memory_devices(execute: Execute) -> str:
    out: list[str] = []
    for dev in execute("query-memory-devices", {}):
        data = dev["data"]
        out.append(f'Memory device [{dev["type"]}]: "{data["id"]}"')
        out.append(f"  memaddr: 0x{data['memaddr']:x}")
        if dev["type"] == "virtio-mem":
            out.append(f"  node: {data['node']}")
            out.append(f"  requested-size: {data['requested-size']}")
            out.append(f"  size: {data['size']}")
            out.append(f"  max-size: {data['max-size']}")
            out.append(f"  block-size: {data['block-size']}")
        else:
            out.append(f"  size: {data['size']}")
        out.append(f"  memdev: {data['memdev']}")
    return _lines(*out)


def info_memory_size_summary(execute: Execute) -> str:
    summary = execute("query-memory-size-summary", {})
    return _lines(f"base memory: {summary['base-memory']}", f"plugged memory: {summary['plugged-memory']}")


INFO: dict[str, Callable[[Execute], str]] = {
    "status": info_status,
    "balloon": info_balloon,
    "memory-devices": info_memory_devices,
    "memory_size_summary": info_memory_size_summary,
}


def _simple(name: str) -> Callable[[Execute, list[str]], str]:
    def run(execute: Execute, words: list[str]) -> str:
        execute(name, {})
        return ""

    return run


def _balloon(execute: Execute, words: list[str]) -> str:
    """`balloon MB`: QEMU's HMP takes the target in MiB."""
    if len(words) != 1 or not words[0].isdigit():
        return _lines("Error: balloon takes one argument, the target size in MiB")
    execute("balloon", {"value": int(words[0]) * MiB})
    return ""


COMMANDS: dict[str, Callable[[Execute, list[str]], str]] = {
    "stop": _simple("stop"),
    "cont": _simple("cont"),
    "c": _simple("cont"),
    "system_reset": _simple("system_reset"),
    "system_powerdown": _simple("system_powerdown"),
    "balloon": _balloon,
}


def run(command_line: str, execute: Execute) -> str:
    """Run one HMP command line; the monitor's output text."""
    words = command_line.split()
    if not words:
        return ""
    try:
        if words[0] in ("info", "i") and len(words) >= 2 and words[1] in INFO:
            return INFO[words[1]](execute)
        if words[0] in COMMANDS:
            return COMMANDS[words[0]](execute, words[1:])
    except (QmpError, MemvisorError) as err:
        return _lines(f"Error: {err}")
    return _lines(f"unknown command: '{command_line.strip()}'")
