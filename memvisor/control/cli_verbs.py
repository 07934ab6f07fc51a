"""The memvisor CLI verbs that talk to a running VM over its QMP socket.

    memvisor qmp SOCK COMMAND [key=value...]     raw QMP; values are JSON where they parse, else strings
    memvisor exec SOCK [--timeout S] -- CMD...   run CMD in the guest, exit with its status
    memvisor balloon SOCK 512M [--wait S]        set the balloon target (guest RAM)
    memvisor mem SOCK vm0 [--requested-size 4G]  show or resize a virtio-mem device
    memvisor info SOCK memory-devices|balloon|status
    memvisor stats SOCK [--poll S]               balloon statistics as a table
    memvisor snapshot SOCK PATH [--resume]       save the VM to PATH (memvisor/control/snapshot_verb.py)
    memvisor migrate SOCK URI                    live migration to tcp:HOST:PORT or unix:PATH (migration/verb.py)

Wiring into the CLI is one line: `cli_verbs.register(subparsers)`; each verb's parser gets
`handler=<function(Namespace) -> int>` as a default, so the CLI runs `args.handler(args)`. Each verb is also a
function of its argv (`VERBS["balloon"](["SOCK", "512M"])`) for tests and scripts.
"""

from __future__ import annotations

import argparse
import base64
import json
import shlex
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

from memvisor.control.client import DEFAULT_TIMEOUT, QmpConnection
from memvisor.errors import MemvisorError, UsageError
from memvisor.units import format_size, parse_size

STAT_NOT_REPORTED = (1 << 64) - 1
BYTE_STATS = {
    "stat-swap-in",
    "stat-swap-out",
    "stat-free-memory",
    "stat-total-memory",
    "stat-available-memory",
    "stat-disk-caches",
}
INFO_TOPICS = ("memory-devices", "balloon", "status", "memory_size_summary")

Handler = Callable[[argparse.Namespace], int]


# --- helpers (unit-tested) -----------------------------------------------------------------------------------


def parse_key_values(items: Sequence[str]) -> dict[str, Any]:
    """`["path=vm0", "value=1073741824", "enable=[\"oob\"]"]` -> arguments; JSON where it parses, else a string."""
    arguments: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise UsageError(f"argument {item!r} is not key=value: write e.g. path=vm0 or value=1073741824")
        if key in arguments:
            raise UsageError(f"argument {key!r} is given twice: give each key once")
        try:
            arguments[key] = json.loads(text)
        except ValueError:
            arguments[key] = text
    return arguments


def human_size(size: int) -> str:
    """Bytes as `512M` when exact, else to one decimal in the largest fitting unit (`976.6M`), else bytes."""
    exact = format_size(size)
    if not exact.lstrip("-").isdigit() or abs(size) < 1024:
        return exact
    for suffix, unit in (("T", 1 << 40), ("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
        if abs(size) >= unit:
            return f"{size / unit:.1f}{suffix}"
    return exact


def stats_table(guest_stats: dict[str, Any], polling_interval: int | None = None) -> str:
    """QEMU's guest-stats value as an aligned two-column table; byte counts printed as sizes."""
    rows = [("statistic", "value")]
    for name, value in guest_stats.get("stats", {}).items():
        label = name.removeprefix("stat-")
        if not isinstance(value, int) or value == STAT_NOT_REPORTED:
            shown = "-"
        elif name in BYTE_STATS:
            shown = human_size(value)
        else:
            shown = str(value)
        rows.append((label, shown))
    last = guest_stats.get("last-update", 0)
    rows.append(
        ("last-update", time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(last)) if last else "never")
    )
    if polling_interval is not None:
        rows.append(("polling-interval", f"{polling_interval}s" if polling_interval else "off"))
    width = max(len(label) for label, _ in rows)
    return "\n".join(f"{label:<{width}}  {value}" for label, value in rows)


def _connect(args: argparse.Namespace, timeout: float = DEFAULT_TIMEOUT) -> QmpConnection:
    return QmpConnection(args.socket, timeout=timeout)


def _find_balloon(qmp: QmpConnection) -> str:
    """The QOM path of the VM's balloon (memvisor's virtio-balloon-device or QEMU's virtio-balloon-pci)."""
    for prop in qmp.execute("qom-list", {"path": "/machine/peripheral"}):
        if prop["type"].startswith("child<virtio-balloon"):
            return f"/machine/peripheral/{prop['name']}"
    raise MemvisorError("the VM has no balloon: start it with --device virtio-balloon,id=balloon0")


# --- verbs ---------------------------------------------------------------------------------------------------


def _add_socket(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("socket", metavar="SOCK", help="the VM's QMP socket (memvisor run --qmp SOCK)")


def build_qmp(parser: argparse.ArgumentParser) -> None:
    _add_socket(parser)
    parser.add_argument("command", metavar="COMMAND", help="a QMP command, e.g. query-status")
    parser.add_argument("arguments", metavar="KEY=VALUE", nargs="*", help="arguments; values parse as JSON")


def run_qmp(args: argparse.Namespace) -> int:
    arguments = parse_key_values(args.arguments)
    with _connect(args) as qmp:
        value = qmp.execute(args.command, arguments or None)
    print(json.dumps({"return": value}, indent=2))
    return 0


def build_exec(parser: argparse.ArgumentParser) -> None:
    _add_socket(parser)
    parser.add_argument(
        "--timeout", type=float, default=30.0, metavar="S", help="seconds to wait (default 30)"
    )
    parser.add_argument(
        "command", metavar="CMD", nargs=argparse.REMAINDER, help="after --: the command and its arguments"
    )


def split_exec_words(words: Sequence[str], timeout: float) -> tuple[float, str]:
    """Options argparse left in the REMAINDER (`--timeout 5 -- CMD`), then the command as one shell string.

    One word is passed as-is (`-- 'echo $HOME'` runs in the guest's shell); several are quoted with shlex.
    """
    rest = list(words)
    while rest:
        if rest[0] == "--":
            rest.pop(0)
            break
        if rest[0] == "--timeout" and len(rest) > 1:
            timeout = _seconds(rest[1])
            del rest[:2]
        elif rest[0].startswith("--timeout="):
            timeout = _seconds(rest.pop(0).partition("=")[2])
        else:
            break
    if not rest:
        raise UsageError("no command to run: write memvisor exec SOCK [--timeout S] -- CMD [ARGS...]")
    if not 0 < timeout <= 24 * 3600:
        raise UsageError(f"--timeout must be between 0 and 86400 seconds, got {timeout:g}")
    return timeout, rest[0] if len(rest) == 1 else shlex.join(rest)


def _seconds(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise UsageError(f"--timeout {text!r} is not a number of seconds: write e.g. --timeout 10") from None


def run_exec(args: argparse.Namespace) -> int:
    timeout, command = split_exec_words(args.command, args.timeout)
    with _connect(args, timeout=timeout + 10) as qmp:
        result = qmp.execute("x-guest-exec", {"command": command, "timeout": timeout})
    sys.stdout.buffer.write(base64.b64decode(result.get("out-data", "")))
    sys.stdout.flush()
    sys.stderr.buffer.write(base64.b64decode(result.get("err-data", "")))
    sys.stderr.flush()
    return int(result["exitcode"])


def build_balloon(parser: argparse.ArgumentParser) -> None:
    _add_socket(parser)
    parser.add_argument("target", metavar="SIZE", help="guest RAM to leave the guest, e.g. 512M")
    parser.add_argument(
        "--wait", type=float, default=0.0, metavar="S", help="wait up to S seconds for the guest"
    )


def run_balloon(args: argparse.Namespace) -> int:
    target = parse_size(args.target, "balloon target")
    if target <= 0:
        raise UsageError("balloon target must be above 0: give the guest RAM to keep, e.g. 512M")
    with _connect(args) as qmp:
        qmp.execute("balloon", {"value": target})
        deadline = time.monotonic() + args.wait
        actual = qmp.execute("query-balloon")["actual"]
        while actual != target and time.monotonic() < deadline:
            time.sleep(0.1)
            actual = qmp.execute("query-balloon")["actual"]
    print(f"balloon: target {format_size(target)}, actual {human_size(actual)}")
    if args.wait and actual != target:
        raise MemvisorError(
            f"the guest reached {human_size(actual)}, not {format_size(target)}, within {args.wait:g} s: "
            "wait longer or check the guest's balloon driver"
        )
    return 0


def build_mem(parser: argparse.ArgumentParser) -> None:
    _add_socket(parser)
    parser.add_argument("device", metavar="ID", help="the virtio-mem device id, e.g. vm0")
    parser.add_argument(
        "--requested-size", metavar="SIZE", help="ask the guest to plug/unplug to SIZE, e.g. 4G"
    )


def run_mem(args: argparse.Namespace) -> int:
    with _connect(args) as qmp:
        if args.requested_size is not None:
            size = parse_size(args.requested_size, "--requested-size")
            qmp.execute("qom-set", {"path": args.device, "property": "requested-size", "value": size})
        devices = qmp.execute("query-memory-devices")
    for dev in devices:
        data = dev["data"]
        if data.get("id") == args.device and dev["type"] == "virtio-mem":
            print(
                f"{args.device}: requested-size {human_size(data['requested-size'])}, size {human_size(data['size'])}, "
                f"max-size {human_size(data['max-size'])}, block-size {human_size(data['block-size'])}, "
                f"memaddr 0x{data['memaddr']:x}, node {data['node']}"
            )
            return 0
    raise MemvisorError(
        f"no virtio-mem device {args.device!r}: list them with `memvisor info SOCK memory-devices`"
    )


def build_info(parser: argparse.ArgumentParser) -> None:
    _add_socket(parser)
    parser.add_argument("topic", choices=INFO_TOPICS, help="what to show")


def run_info(args: argparse.Namespace) -> int:
    with _connect(args) as qmp:
        text = qmp.execute("human-monitor-command", {"command-line": f"info {args.topic}"})
    sys.stdout.write(str(text).replace("\r\n", "\n"))
    return 0


def build_stats(parser: argparse.ArgumentParser) -> None:
    _add_socket(parser)
    parser.add_argument(
        "--poll", type=int, metavar="S", help="first set the stats polling interval to S seconds"
    )


def run_stats(args: argparse.Namespace) -> int:
    with _connect(args) as qmp:
        path = _find_balloon(qmp)
        if args.poll is not None:
            qmp.execute(
                "qom-set", {"path": path, "property": "guest-stats-polling-interval", "value": args.poll}
            )
        interval = qmp.execute("qom-get", {"path": path, "property": "guest-stats-polling-interval"})
        stats = qmp.execute("qom-get", {"path": path, "property": "guest-stats"})
    print(stats_table(stats, interval))
    if not interval:
        print(f"(polling is off: `memvisor stats {args.socket} --poll 2` asks the guest every 2 s)")
    return 0


_VERB_TABLE: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None], Handler]] = {
    "qmp": ("send a raw QMP command and print the reply", build_qmp, run_qmp),
    "exec": ("run a command in the guest", build_exec, run_exec),
    "balloon": ("set the balloon target", build_balloon, run_balloon),
    "mem": ("show or resize a virtio-mem device", build_mem, run_mem),
    "info": ("show VM information as QEMU's monitor does", build_info, run_info),
    "stats": ("show the guest's balloon statistics", build_stats, run_stats),
}


from memvisor.control.snapshot_verb import build_snapshot, run_snapshot  # noqa: E402

_VERB_TABLE["snapshot"] = ("save the VM to a snapshot file (stop, migrate file:)", build_snapshot, run_snapshot)


def register(subparsers: Any) -> None:
    """Add every verb to an argparse subparsers object; each sets `handler` (Namespace -> exit status)."""
    for name, (help_text, build, run) in _VERB_TABLE.items():
        parser = subparsers.add_parser(name, help=help_text, description=help_text)
        build(parser)
        parser.set_defaults(handler=run, func=run)


def _verb(name: str) -> Callable[[Sequence[str]], int]:
    help_text, build, run = _VERB_TABLE[name]

    def main(argv: Sequence[str]) -> int:
        parser = argparse.ArgumentParser(prog=f"memvisor {name}", description=help_text)
        build(parser)
        return run(parser.parse_args(list(argv)))

    return main


VERBS: dict[str, Callable[[Sequence[str]], int]] = {name: _verb(name) for name in _VERB_TABLE}
from memvisor.migration.verb import build_migrate, run_migrate  # noqa: E402

_VERB_TABLE["migrate"] = ("live-migrate the VM to tcp:HOST:PORT or unix:PATH", build_migrate, run_migrate)
