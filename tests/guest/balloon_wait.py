"""One way for guest tests to move the balloon and wait for the guest's driver: `move_balloon`.

Linux's virtio_balloon driver moves `actual` toward the target batch by batch (256 pages per inflate buffer)
and reaches it exactly, but a driver short of memory can stop just short of it; so a move has arrived when
`actual` is within 1 % of the target, and has settled when `actual` is the target or reads the same twice in a
row `settle_interval` apart. A move that does not arrive fails with what the guest and the VMM show (how
`actual` moved, the guest's memory, balloon counters and kernel log, the exit counts), each read best effort:
the guest may be what hangs.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from tests.guest.vm import GuestVM, wait_until

MiB = 1 << 20


@dataclass(frozen=True)
class BalloonMove:
    seconds: float  # from the `balloon` command until `actual` was within 1 % of the target
    actual: int  # query-balloon's `actual` once the driver settled, in bytes


def balloon_actual(vm: GuestVM) -> int:
    return int(vm.cmd("query-balloon")["actual"])


def move_balloon(vm: GuestVM, target: int, what: str, *, timeout: float = 400, settle_interval: float = 2
                 ) -> BalloonMove:  # fmt: skip
    """Ask for `target` bytes of guest RAM, wait until `actual` is within 1 % of it and the driver has settled."""
    start = time.monotonic()
    vm.cmd("balloon", value=target)
    seen: list[tuple[float, int]] = []  # (seconds, actual) each time `actual` changed

    def arrived() -> bool:
        actual = balloon_actual(vm)
        if not seen or seen[-1][1] != actual:
            seen.append((time.monotonic() - start, actual))
        return abs(actual - target) <= target // 100

    try:
        wait_until(arrived, timeout=timeout, interval=0.5, what=what)
    except AssertionError as error:
        raise AssertionError(f"{error}\n{stall_report(vm, seen)}") from None
    seconds = time.monotonic() - start
    previous = [-1]

    def settled() -> bool:
        actual = balloon_actual(vm)
        stable = actual == target or actual == previous[0]
        previous[0] = actual
        return stable

    wait_until(settled, timeout=60, interval=settle_interval, what=f"{what}: the driver to settle")
    actual = balloon_actual(vm)
    print(f"[balloon] {what}: {seconds:.1f} s (actual {actual // MiB} MiB)")
    return BalloonMove(seconds, actual)


def stall_report(vm: GuestVM, seen: list[tuple[float, int]]) -> str:
    """What a balloon that stopped short shows: how `actual` moved, the guest's view (free memory, its
    balloon counters, the end of its kernel log) and the VMM's exit counts."""
    lines = ["actual over time (s, MiB): " + ", ".join(f"{t:.0f}:{a // MiB}" for t, a in seen[-12:])]
    for label, command in (
        ("guest memory", "grep -E '^(MemTotal|MemFree|MemAvailable|Cached|Shmem):' /proc/meminfo"),
        ("guest balloon counters", "grep -E '^balloon' /proc/vmstat"),
        ("guest kernel log", "dmesg | tail -n 15"),
    ):
        try:
            lines.append(f"{label}:\n{vm.exec(command, timeout=30).stdout.rstrip()}")
        except Exception as error:  # the guest agent may not answer: say so and go on
            lines.append(f"{label}: not read ({error})")
    try:
        lines.append(f"exits to Python: {vm.cmd('x-query-exits')}")
    except Exception as error:
        lines.append(f"exits to Python: not read ({error})")
    return "\n".join(lines)
