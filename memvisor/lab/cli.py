"""`memvisor lab [--memory SIZE] [--cpus N] [--share DIR]... [--forward SOCK]... [--timeout S] -- COMMAND...`

Runs COMMAND inside the lab (a QEMU TCG guest with nested SVM that sees this machine's files read-only and
offers a working /dev/kvm) and exits with COMMAND's status. A whole test suite shares one lab this way:
`memvisor lab -- pytest tests/guest`.

The lab never waits forever: its agent sends a heartbeat every few seconds; a lab that does not start, stops
answering, or passes --timeout is diagnosed (postmortem.py: the lab's CPU backtraces and registers, the
command's processes and its guests' consoles), the diagnosis is printed with the folder that keeps the logs,
and the exit status is 125.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from memvisor.errors import UsageError
from memvisor.lab.runner import run_in_lab
from memvisor.units import parse_size

DEFAULT_MEMORY = "4G"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(f"memvisor lab: {message}; see memvisor lab --help")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="memvisor lab",
        description="Run a command inside memvisor's lab: a QEMU TCG guest with nested SVM, a working "
        "/dev/kvm, and this machine's files read-only.",
    )
    parser.add_argument(
        "--memory", default=DEFAULT_MEMORY, help=f"the lab's memory (default {DEFAULT_MEMORY})"
    )
    parser.add_argument("--cpus", type=int, default=2, help="the lab's vCPUs (default 2)")
    parser.add_argument(
        "--share",
        action="append",
        default=[],
        metavar="DIR",
        help="a folder the command may write (repeatable)",
    )
    parser.add_argument(
        "--forward",
        action="append",
        default=[],
        metavar="SOCK",
        help="a UNIX socket the command creates, made reachable at the same path here (repeatable)",
    )
    parser.add_argument("--stdin", action="store_true", help="pass this stdin to the command")
    parser.add_argument("--console", metavar="FILE", help="keep the lab's console log in FILE")
    parser.add_argument(
        "--timeout",
        type=float,
        metavar="SECONDS",
        help="the command's deadline once the lab has started: past it the lab is diagnosed and stopped (exit 125)",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="print progress lines to stderr")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="the command, after --")
    return parser


def lab_main(argv: list[str]) -> int:
    """The `memvisor lab` subcommand; returns COMMAND's exit status (MemvisorError for the lab's own failures)."""
    args = build_parser().parse_args(argv)
    command = list(args.command)
    if command and command[0] == "--":
        command = command[1:]
    if not command:
        raise UsageError("memvisor lab: give a command to run, e.g. memvisor lab -- pytest tests/guest")
    if args.timeout is not None and not args.timeout > 0:
        raise UsageError(f"memvisor lab: --timeout {args.timeout:g} must be a positive number of seconds")
    if not 1 <= args.cpus <= 8:
        raise UsageError(f"memvisor lab: --cpus {args.cpus} is out of range: give 1 to 8")
    started = time.monotonic()

    def progress(message: str) -> None:
        if args.verbose:
            print(
                f"memvisor lab: [{time.monotonic() - started:6.2f} s] {message}", file=sys.stderr, flush=True
            )

    status = run_in_lab(
        command,
        memory=parse_size(args.memory, "--memory"),
        cpus=args.cpus,
        cwd=os.getcwd(),
        env=dict(os.environ),
        shares=[Path(folder) for folder in args.share],
        forwards=[Path(sock) for sock in args.forward],
        stdin=args.stdin,
        console_log=Path(args.console) if args.console else None,
        log=progress,
        timeout=args.timeout,
    )
    progress(f"the command exited with status {status}")
    return status


def main() -> int:
    """`python -m memvisor.lab.cli ...` (until the main CLI wires `memvisor lab` in)."""
    from memvisor.errors import MemvisorError

    try:
        return lab_main(sys.argv[1:])
    except MemvisorError as error:
        print(f"memvisor: {error}", file=sys.stderr)
        return error.exit_status


if __name__ == "__main__":
    sys.exit(main())
