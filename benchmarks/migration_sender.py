"""Where the live migration's time goes without a guest: the sender's pass over 1 GiB of memfd RAM, a pass of
scattered dirty pages (what the final pass sends, the guest stopped), the backed-set scan (SEEK_DATA) every pass
repeats, and a whole migration to a destination in a second process. Machines are the unit tests' fakes
(tests/unit/migration_fakes.py: real memfd memory, the real dirty tracker over a fake KVM); the machine state
and its load are stood in for, so neither the vCPUs' pause nor the destination's load is timed here.

    .venv/bin/python benchmarks/migration_sender.py            # on the host, or in the lab to scale by:
    .venv/bin/memvisor lab --memory 4G --timeout 900 -- .venv/bin/python benchmarks/migration_sender.py

Nothing is sent over a network: a socketpair, its far end drained by a thread (or the destination process).
"""

from __future__ import annotations

import os
import socket
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

GiB = 1 << 30
CHUNK = 64 << 20


def fill(region: Any, kind: str) -> None:
    """kind: random (all backed with random bytes), zero (backed, zeros) or holes70 (70 % of 64 KiB granules
    random, the rest never written)."""
    rng = np.random.default_rng(1)
    block = rng.bytes(CHUNK) if kind != "zero" else bytes(CHUNK)
    for offset in range(0, region.size, CHUNK):
        region.view[offset : offset + CHUNK] = block
    if kind == "holes70":
        for granule in np.flatnonzero(rng.random(region.size // 65536) >= 0.7):
            region.discard(int(granule) * 65536, 65536, "bench")


def drained() -> tuple[socket.socket, Callable[[], None]]:
    a, b = socket.socketpair()

    def drain() -> None:
        buffer = memoryview(bytearray(1 << 20))
        while b.recv_into(buffer):
            pass

    thread = threading.Thread(target=drain)
    thread.start()

    def close() -> None:
        a.close()
        thread.join()
        b.close()

    return a, close


def sender_passes(kind: str) -> None:
    from memvisor.migration.pages import RegionReader
    from memvisor.migration.source import MigrationParameters, MigrationStats, PreCopy, SourceHooks
    from memvisor.migration.stream import PAGE_SIZE
    from tests.unit.migration_fakes import FakeMachine

    machine = FakeMachine(GiB, manual_dirty_log=True)
    region = machine.memory.regions[0]
    fill(region, kind)
    sock, close = drained()
    stats = MigrationStats()
    precopy = PreCopy(machine, sock, SourceHooks(), MigrationParameters(max_bandwidth=0), stats, threading.Event())  # type: ignore[arg-type]
    reader = RegionReader(region)
    precopy._readers[region.name] = reader
    precopy._consumer = machine.dirty_tracker.subscribe("migration", manual=True)
    started = time.monotonic()
    precopy._send_pass(np.ones(precopy._limit(), dtype=bool), first_pass=True)
    took = time.monotonic() - started
    print(f"{kind}: pass 1 over 1 GiB {took:.2f} s, {stats.transferred / took / 2**20:.0f} MiB/s on the wire, "
          f"{took / (GiB // PAGE_SIZE) * 1e6:.1f} us a page ({stats.normal} data, {stats.duplicate} zero, "
          f"{stats.skipped['unbacked']} unbacked)")  # fmt: skip
    rng = np.random.default_rng(2)
    for count in (0, 100, 1000, 10000):
        wanted = np.zeros(precopy._limit(), dtype=bool)
        wanted[rng.choice(GiB // PAGE_SIZE, count, replace=False)] = True
        for final in (False, True):
            started = time.monotonic()
            precopy._send_pass(wanted.copy(), first_pass=False, final=final)
            print(f"{kind}: a {'final ' if final else ''}pass of {count} scattered pages "
                  f"{(time.monotonic() - started) * 1000:.1f} ms")  # fmt: skip
    print(f"{kind}: a run's cost (Sender.run_seconds) {precopy.sender.run_seconds(region, reader) * 1e6:.1f} us")
    started = time.monotonic()
    reader.data_mask()
    print(f"{kind}: the backed-set scan (SEEK_DATA/SEEK_HOLE) {(time.monotonic() - started) * 1000:.1f} ms")
    reader.close()
    close()
    precopy._consumer.close()
    region.close()


def whole_migration() -> None:
    """Source here, destination in a forked process, 1 GiB of random data."""
    import pytest

    from memvisor.migration import incoming
    from memvisor.migration.source import MigrationParameters, MigrationStats, PreCopy, SourceHooks
    from tests.unit.migration_fakes import FakeMachine, fake_machine_state

    patch = pytest.MonkeyPatch()
    fake_machine_state(patch)
    source = FakeMachine(GiB)
    fill(source.memory.regions[0], "random")
    a, b = socket.socketpair()
    pid = os.fork()
    if pid == 0:
        a.close()
        started = time.monotonic()
        incoming.receive_migration(FakeMachine(GiB), b)  # type: ignore[arg-type]
        print(f"whole migration: destination {time.monotonic() - started:.2f} s", flush=True)
        os._exit(0)
    b.close()
    stats = MigrationStats()
    started = time.monotonic()
    PreCopy(source, a, SourceHooks(), MigrationParameters(max_bandwidth=0), stats, threading.Event()).run()  # type: ignore[arg-type]
    took = time.monotonic() - started
    os.waitpid(pid, 0)
    print(f"whole migration: source {took:.2f} s, {stats.transferred / took / 2**20:.0f} MiB/s, {stats.passes} passes, "
          f"downtime {stats.downtime_ms} ms, by step {stats.downtime_parts}")  # fmt: skip
    patch.undo()


def main() -> None:
    for kind in ("random", "zero", "holes70"):
        sender_passes(kind)
    whole_migration()


if __name__ == "__main__":
    main()
