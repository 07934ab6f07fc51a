"""`memvisor image ...`: build, locate and re-pin the guest image.

Wiring into the main CLI is one line: `add_image_commands(subparsers)` adds the `image` command, whose
parser has `func=image_main` as a default (call `args.func(args)`; it returns the exit status and raises
MemvisorError for memvisor's own failures). `python -m memvisor.guest.cli image build` works standalone.

    memvisor image build [--flavour default|cloud|all] [--lab]   build (or find) images, print their paths
    memvisor image path  [--flavour default|cloud] [--lab]       print the kernel and initrd paths
    memvisor image pin   [--flavour default|cloud]               move the pins to the newest versions apt knows
Progress (downloads, builds) goes to stderr; stdout carries only the paths, for scripts.
"""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING, Any

from memvisor.errors import EXIT_MEMVISOR_FAILURE, MemvisorError
from memvisor.guest.packages import KERNEL_FLAVOURS, move_pins

if TYPE_CHECKING:
    from memvisor.guest.image import GuestImage


def _progress(line: str) -> None:
    print(f"memvisor: {line}", file=sys.stderr, flush=True)


def add_image_commands(subparsers: Any) -> argparse.ArgumentParser:
    """Add `image build|path|pin` to an argparse subparsers object; returns the `image` parser."""
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "image",
        help="build, locate or re-pin the guest image (Debian kernel + initramfs)",
        description="Build, locate or re-pin the guest image made from pinned Debian packages.",
    )
    commands = parser.add_subparsers(dest="image_command", metavar="COMMAND", required=True)
    build = commands.add_parser("build", help="build the guest image (cached; offline once built)")
    build.add_argument("--flavour", choices=[*sorted(KERNEL_FLAVOURS), "all"], default="default",
                       help="kernel flavour: default (-amd64), cloud (-cloud-amd64) or all")  # fmt: skip
    build.add_argument("--lab", action="store_true", help="also build the lab's image")
    path = commands.add_parser("path", help="print the kernel and initrd paths (building them if needed)")
    path.add_argument("--flavour", choices=sorted(KERNEL_FLAVOURS), default="default")
    path.add_argument("--lab", action="store_true", help="the lab's image instead of the guest's")
    pin = commands.add_parser("pin", help="move the package pins to the newest versions apt knows")
    pin.add_argument("--flavour", choices=sorted(KERNEL_FLAVOURS), action="append",
                     help="move only this kernel flavour's pin (repeatable); default: every pin")  # fmt: skip
    parser.set_defaults(func=image_main)
    return parser


def _print_image(image: GuestImage) -> None:
    print(image.kernel)
    print(image.initrd)


def image_main(args: argparse.Namespace) -> int:
    """Run one `memvisor image` command; returns the exit status (MemvisorError for failures)."""
    # The builder is imported here, not at the top: every `memvisor` command builds this parser.
    from memvisor.guest.image import build_lab_image, ensure_guest_image

    if args.image_command == "build":
        flavours = sorted(KERNEL_FLAVOURS) if args.flavour == "all" else [args.flavour]
        for flavour in flavours:
            _print_image(ensure_guest_image(flavour, progress=_progress))
        if args.lab:
            _print_image(build_lab_image(progress=_progress))
        return 0
    if args.image_command == "path":
        _print_image(
            build_lab_image(progress=_progress)
            if args.lab
            else ensure_guest_image(args.flavour, progress=_progress)
        )
        return 0
    if args.image_command == "pin":
        for what, old, new in move_pins(args.flavour, progress=_progress):
            print(f"{what}: {old} -> {new}" + ("" if old != new else " (unchanged)"))
        return 0
    raise MemvisorError(f"unknown image command {args.image_command!r}: see `memvisor image --help`")


def main(argv: list[str] | None = None) -> int:
    """Standalone entry: `python -m memvisor.guest.cli image ...`."""
    parser = argparse.ArgumentParser(prog="memvisor")
    add_image_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    try:
        status: int = args.func(args)
    except MemvisorError as exc:
        print(f"memvisor: {exc}", file=sys.stderr)
        return EXIT_MEMVISOR_FAILURE
    return status


if __name__ == "__main__":
    sys.exit(main())
