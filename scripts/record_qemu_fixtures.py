#!/usr/bin/env python3
"""Record QEMU 7.2's QMP replies as JSON fixtures for memvisor's protocol tests.

Starts a real `qemu-system-x86_64` (TCG, stopped with -S, so no guest kernel is needed) with the same memory
devices memvisor offers (virtio-mem, virtio-pmem, virtio-balloon), drives it with the `qemu.qmp` library and
saves each reply under tests/fixtures/qemu72/NAME.json. The tests compare the keys and value types of
memvisor's replies with these (the values differ: other sizes, addresses, thread ids).

Usage: .venv/bin/python scripts/record_qemu_fixtures.py [--out DIR] [--qemu PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from qemu.qmp import ExecuteError, QMPClient

from memvisor.control.client import QmpConnection
from memvisor.control.ready import wait_for_qmp
from memvisor.errors import MemvisorError

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "tests" / "fixtures" / "qemu72"

VIRTIO_MEM_PROPS = ("requested-size", "size", "max-size", "block-size", "node", "memaddr", "memdev")
BALLOON_PROPS = ("guest-stats", "guest-stats-polling-interval")
PMEM_PROPS = ("memaddr", "size", "memdev")


def qemu_argv(qemu: str, sock: str, pmem_file: str) -> list[str]:
    """The QEMU command line: q35, 1G boot RAM, one virtio-mem, one virtio-pmem and a balloon."""
    return [
        qemu, "-accel", "tcg", "-S", "-nographic", "-nodefaults",
        "-machine", "q35", "-m", "1G,maxmem=4G,slots=1",
        "-object", "memory-backend-ram,id=mem0,size=2G",
        "-device", "virtio-mem-pci,id=vm0,memdev=mem0,requested-size=0",
        "-object", f"memory-backend-file,id=pmem0,mem-path={pmem_file},size=256M,share=on",
        "-device", "virtio-pmem-pci,id=pm0,memdev=pmem0",
        "-device", "virtio-balloon-pci,id=balloon0",
        "-qmp", f"unix:{sock},server=on,wait=off",
    ]  # fmt: skip


class Recorder:
    """Sends commands over a raw QMP message and stores each reply (success or error) as a fixture."""

    def __init__(self, client: QMPClient, out: Path) -> None:
        self.client = client
        self.out = out

    def save(self, name: str, reply: Any) -> None:
        path = self.out / f"{name}.json"
        path.write_text(json.dumps(reply, indent=2, sort_keys=True) + "\n")
        print(f"recorded {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}")

    async def record_raw(self, name: str, command: str, arguments: dict[str, Any] | None = None) -> None:
        """Run `command` and save the whole reply: {"return": ...} or the raw {"error": ..., "id": ...}."""
        try:
            value = await self.client.execute(command, arguments)
            self.save(name, {"return": value})
        except ExecuteError as err:
            self.save(name, json.loads(bytes(err.received)))


async def record_all(sock: str, out: Path) -> None:
    client = QMPClient("fixtures")
    await client.connect(sock)
    rec = Recorder(client, out)
    assert client.greeting is not None
    rec.save("greeting", client.greeting._asdict())
    await rec.record_raw("query-version", "query-version")
    await rec.record_raw("query-status", "query-status")
    await rec.record_raw("query-memory-devices", "query-memory-devices")
    await rec.record_raw("query-balloon", "query-balloon")
    await rec.record_raw("query-memory-size-summary", "query-memory-size-summary")
    await rec.record_raw("query-cpus-fast", "query-cpus-fast")
    await rec.record_raw("query-commands", "query-commands")
    await rec.record_raw("balloon", "balloon", {"value": 512 << 20})
    for prop in VIRTIO_MEM_PROPS:
        await rec.record_raw(f"qom-get-virtio-mem-{prop}", "qom-get", {"path": "vm0", "property": prop})
    for prop in BALLOON_PROPS:
        await rec.record_raw(f"qom-get-balloon-{prop}", "qom-get", {"path": "balloon0", "property": prop})
    for prop in PMEM_PROPS:
        await rec.record_raw(f"qom-get-virtio-pmem-{prop}", "qom-get", {"path": "pm0", "property": prop})
    await rec.record_raw(
        "qom-get-path", "qom-get", {"path": "/machine/peripheral/vm0", "property": "requested-size"}
    )
    await rec.record_raw("qom-list-virtio-mem", "qom-list", {"path": "vm0"})
    await rec.record_raw("qom-list-balloon", "qom-list", {"path": "balloon0"})
    await rec.record_raw("qom-list-peripheral", "qom-list", {"path": "/machine/peripheral"})
    await rec.record_raw("qom-get-no-such-path", "qom-get", {"path": "nosuch", "property": "size"})
    await rec.record_raw("qom-get-no-such-property", "qom-get", {"path": "vm0", "property": "nosuch"})
    await rec.record_raw(
        "qom-set-requested-size", "qom-set", {"path": "vm0", "property": "requested-size", "value": 0}
    )
    await rec.record_raw(
        "qom-set-balloon-polling", "qom-set",
        {"path": "balloon0", "property": "guest-stats-polling-interval", "value": 2},
    )  # fmt: skip
    await rec.record_raw("qom-set-read-only", "qom-set", {"path": "vm0", "property": "size", "value": 0})
    await rec.record_raw(
        "qom-set-unaligned", "qom-set", {"path": "vm0", "property": "requested-size", "value": 12345}
    )
    await rec.record_raw(
        "qom-set-too-big", "qom-set", {"path": "vm0", "property": "requested-size", "value": 8 << 30}
    )
    await rec.record_raw(
        "qom-set-wrong-type", "qom-set", {"path": "vm0", "property": "requested-size", "value": "big"}
    )
    for hmp in ("info memory-devices", "info balloon", "info status"):
        await rec.record_raw("hmp-" + hmp.replace(" ", "-"), "human-monitor-command", {"command-line": hmp})
    await rec.record_raw("hmp-unknown", "human-monitor-command", {"command-line": "nosuchcommand"})
    await rec.record_raw("hmp-info-unknown", "human-monitor-command", {"command-line": "info nosuch"})
    await rec.record_raw("unknown-command", "no-such-command")
    await rec.record_raw("bad-argument-type", "balloon", {"value": "lots"})
    await rec.record_raw("missing-argument", "balloon")
    await rec.record_raw("extra-argument", "query-status", {"bogus": 1})
    await rec.record_raw("balloon-zero", "balloon", {"value": 0})
    await rec.record_raw("balloon-negative", "balloon", {"value": -1})
    await rec.record_raw("qom-get-wrong-arg-type", "qom-get", {"path": 5, "property": "size"})
    for name, value in (("string", "x"), ("negative", -1), ("huge", 1 << 40)):
        await rec.record_raw(
            f"qom-set-balloon-polling-{name}", "qom-set",
            {"path": "balloon0", "property": "guest-stats-polling-interval", "value": value},
        )  # fmt: skip
    await rec.record_raw(
        "qom-set-requested-size-negative",
        "qom-set",
        {"path": "vm0", "property": "requested-size", "value": -2},
    )
    await rec.record_raw("balloon-huge", "balloon", {"value": 1 << 62})
    await rec.record_raw("query-balloon-after-huge", "query-balloon")
    await rec.record_raw("balloon-too-big-for-int64", "balloon", {"value": 1 << 64})
    await rec.record_raw(
        "hmp-info-memory-size-summary", "human-monitor-command", {"command-line": "info memory_size_summary"}
    )
    await rec.record_raw("stop", "stop")
    await rec.record_raw("cont", "cont")
    await rec.record_raw("query-status-running", "query-status")
    await rec.record_raw("stop-again", "stop")
    await rec.record_raw("system_reset", "system_reset")
    await rec.record_raw("system_powerdown", "system_powerdown")
    await record_events(client, rec)
    await client.disconnect()


async def record_events(client: QMPClient, rec: Recorder) -> None:
    """Record STOP, RESUME, and quit's SHUTDOWN as event fixtures."""
    with client.listener() as listener:
        await client.execute("cont")
        await client.execute("stop")
        await client.execute("quit")
        seen: dict[str, Any] = {}
        try:
            async with asyncio.timeout(5):
                async for event in listener:
                    seen.setdefault(str(event["event"]), dict(event))
                    if event["event"] == "SHUTDOWN":
                        break
        except TimeoutError:
            pass
    for name, event in seen.items():
        rec.save(f"event-{name}", event)


async def record_bare(sock: str, out: Path) -> None:
    """A machine with no balloon and no memory devices: the 'not there' replies."""
    client = QMPClient("fixtures-bare")
    await client.connect(sock)
    rec = Recorder(client, out)
    await rec.record_raw("bare-query-balloon", "query-balloon")
    await rec.record_raw("bare-balloon", "balloon", {"value": 512 << 20})
    await rec.record_raw("bare-hmp-info-balloon", "human-monitor-command", {"command-line": "info balloon"})
    await rec.record_raw("bare-query-memory-devices", "query-memory-devices")
    await rec.record_raw(
        "bare-hmp-info-memory-devices", "human-monitor-command", {"command-line": "info memory-devices"}
    )
    await rec.record_raw("bare-query-memory-size-summary", "query-memory-size-summary")
    await client.execute("quit")
    await client.disconnect()


def record_raw_errors(sock: str, out: Path) -> None:
    """Send bytes qemu.qmp would never send (malformed JSON, a command before negotiation) over a raw socket."""
    import socket

    def exchange(lines: list[bytes], count: int) -> list[Any]:
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(5)
            s.connect(sock)
            f = s.makefile("rb")
            f.readline()  # greeting
            replies = []
            for line in lines:
                s.sendall(line)
            for _ in range(count):
                replies.append(json.loads(f.readline()))
            return replies

    def save(name: str, reply: Any) -> None:
        (out / f"{name}.json").write_text(json.dumps(reply, indent=2, sort_keys=True) + "\n")
        print(f"recorded {name}")

    (before,) = exchange([b'{"execute": "query-status", "id": 1}\n'], 1)
    save("before-capabilities", before)
    neg, malformed = exchange([b'{"execute": "qmp_capabilities"}\n', b'{"execute": \n}\n'], 2)
    save("malformed-json", malformed)
    neg, not_object = exchange([b'{"execute": "qmp_capabilities"}\n', b"[1, 2]\n"], 2)
    save("not-an-object", not_object)
    neg, no_execute = exchange([b'{"execute": "qmp_capabilities"}\n', b'{"id": 7}\n'], 2)
    save("no-execute", no_execute)
    neg, bad_args = exchange(
        [b'{"execute": "qmp_capabilities"}\n', b'{"execute": "stop", "arguments": 3}\n'], 2
    )
    save("arguments-not-object", bad_args)
    neg, twice = exchange(
        [b'{"execute": "qmp_capabilities"}\n', b'{"execute": "qmp_capabilities", "id": "x"}\n'], 2
    )
    save("capabilities-twice", twice)
    neg, bad_key = exchange([b'{"execute": "qmp_capabilities"}\n', b'{"execute": "stop", "bogus": 1}\n'], 2)
    save("unknown-member", bad_key)


def run_qemu(argv: list[str], sock: str, body: Callable[[], None]) -> None:
    """Start QEMU with `argv`, wait for its QMP socket, run `body`, then make sure QEMU is gone."""
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL)
    try:
        try:  # the shared wait: missing or refused while QEMU starts is "not yet"; a probe connection, closed
            wait_for_qmp(sock, lambda path: QmpConnection(path).close(), timeout=30, process=proc, what="QEMU's QMP")
        except MemvisorError as err:
            raise SystemExit(str(err)) from None
        body()
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--qemu", default="qemu-system-x86_64")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="qmp-fixtures-") as tmp:
        sock = os.path.join(tmp, "qmp.sock")
        pmem = os.path.join(tmp, "pmem.img")
        with open(pmem, "wb") as f:
            f.truncate(256 << 20)
        argv = qemu_argv(args.qemu, sock, pmem)

        def full() -> None:
            record_raw_errors(sock, args.out)
            asyncio.run(record_all(sock, args.out))

        run_qemu(argv, sock, full)
        bare_sock = os.path.join(tmp, "bare.sock")
        bare = [*argv[:8], "-m", "1G", "-qmp", f"unix:{bare_sock},server=on,wait=off"]
        run_qemu(bare, bare_sock, lambda: asyncio.run(record_bare(bare_sock, args.out)))


if __name__ == "__main__":
    main()
