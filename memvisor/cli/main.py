"""The `memvisor` command: one verb per job; memvisor's own failures exit 125 with a one-line message."""

import argparse
import os
import sys
from typing import NoReturn, cast

from memvisor.errors import EXIT_MEMVISOR_FAILURE, MemvisorError, UsageError

DESCRIPTION = """\
memvisor: a virtual machine monitor on KVM, built around managing guest memory
(virtio-balloon, virtio-mem, virtio-pmem), driven through a QMP-compatible socket.
On machines whose /dev/kvm is not hardware virtualization, guests run inside the lab
(QEMU TCG with nested SVM) on their own."""

EPILOG = """\
examples:
  memvisor image build                                  fetch the Debian kernel and build the guest image
  memvisor run --memory 1G --vcpus 2 --exec 'nproc'     boot, run a command, power off
  memvisor run --memory 1G --qmp /tmp/vm.sock           run a guest with a control socket
  memvisor exec /tmp/vm.sock -- free -m                 run a command in that guest
  memvisor manager --budget 2G /tmp/vm1.sock /tmp/vm2.sock   keep VMs inside a host memory budget
  memvisor lab -- pytest tests/guest                    run a command inside the lab"""


def build_parser(verb: str | None = None) -> argparse.ArgumentParser:
    """The `memvisor` parser; with `verb` "run", only the run verb's: a `memvisor run` then imports none of the
    other verbs' modules (its start before the guest runs is part of every boot: BENCHMARKS.md)."""
    parser = _Parser(
        prog="memvisor", description=DESCRIPTION, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    subparsers = parser.add_subparsers(dest="verb", metavar="COMMAND", required=True)
    from memvisor.cli.run import add_run_command

    add_run_command(subparsers)
    if verb == "run":
        return parser
    from memvisor.guest.cli import add_image_commands
    from memvisor.manager.cli import add_manager_command

    add_image_commands(subparsers)
    add_manager_command(subparsers)
    lab = subparsers.add_parser("lab", help="run a command inside the lab (QEMU TCG guest with a working /dev/kvm)",
                                add_help=False)  # fmt: skip
    lab.set_defaults(func=None)
    try:
        from memvisor.control.cli_verbs import register
    except ImportError:
        pass
    else:
        register(subparsers)
    return parser


class _ArgumentError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    """Argument errors as one UsageError line (subcommand parsers inherit the class), not usage + exit 2."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message}; see {self.prog} --help")

    def _get_formatter(self) -> argparse.HelpFormatter:
        # argparse makes a formatter for every add_argument too, and its default width comes from shutil, whose
        # import (bz2, lzma, zlib) is 5 ms of every `memvisor run` here and about 0.2 s in the lab: the same width
        # without it. (Every formatter class memvisor uses is a HelpFormatter, which takes a width.)
        formatter_class = cast(type[argparse.HelpFormatter], self.formatter_class)
        return formatter_class(prog=self.prog, width=_help_width())


def _help_width() -> int:
    """argparse's default help width, shutil.get_terminal_size().columns - 2 (COLUMNS, else stdout's terminal,
    else 80), without importing shutil."""
    try:
        columns = int(os.environ["COLUMNS"])
    except (KeyError, ValueError):
        columns = 0
    if columns <= 0:
        try:
            columns = os.get_terminal_size(sys.__stdout__.fileno()).columns if sys.__stdout__ else 0
        except (ValueError, OSError):
            columns = 0
    return (columns or 80) - 2


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv and argv[0] == "lab":
            from memvisor.lab.cli import lab_main

            return lab_main(argv[1:])
        parser = build_parser(argv[0] if argv else None)
        try:
            args = parser.parse_args(argv)
        except SystemExit as exit_:
            code = exit_.code if isinstance(exit_.code, int) else EXIT_MEMVISOR_FAILURE
            return EXIT_MEMVISOR_FAILURE if code == 2 else code
        if args.verb == "run":
            return int(args.func(args, argv[1:]))
        return int(args.func(args))
    except MemvisorError as error:
        print(f"memvisor: error: {error}", file=sys.stderr)
        return error.exit_status
    except KeyboardInterrupt:
        print("memvisor: interrupted", file=sys.stderr)
        return 130


def entry() -> None:
    sys.exit(main())
