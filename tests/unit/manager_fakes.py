"""Fake VMs for the manager and `memvisor top` tests: memvisor's FakeMachine behind the real QMP server, and a
server that answers with QEMU 7.2's recorded replies (tests/fixtures/qemu72), so feature detection meets real
shapes."""

from __future__ import annotations

import json
import os
import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from memvisor.control.fake import FakeMachine
from memvisor.control.server import QmpServer

MiB = 1 << 20
FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "qemu72"
# virtio 1.2 section 5.5.6.3 tags
SWAP_IN, MAJOR_FAULTS, FREE, TOTAL, AVAILABLE, CACHES = 0, 2, 4, 5, 6, 7


@contextmanager
def socket_folder(prefix: str) -> Iterator[str]:
    """A fresh folder under /tmp for QMP sockets (short paths: sun_path holds 108 bytes), removed afterwards."""
    path = tempfile.mkdtemp(prefix=prefix, dir="/tmp")
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


class FakeGuest:
    """A FakeMachine (balloon, no pmem, no virtio-mem unless `machine` says) behind the real QMP server at
    SOCK_DIR/NAME.sock. With `used`, its guest uses that many bytes and report() refreshes the balloon
    statistics like a driver (done once at start); without, it has no statistics until report_stats()."""

    def __init__(self, sock_dir: str, name: str, used: int | None = None, **machine: Any) -> None:
        self.machine = FakeMachine(**{"virtio_mem": None, "pmem": None, **machine})
        self.used = used or 0
        self.path = os.path.join(sock_dir, f"{name}.sock")
        self.server = QmpServer(self.path, self.machine)
        self.server.start()
        if used is not None:
            self.report()

    def report(self, major_faults: int = 0) -> None:
        """Every statistic a Linux driver sends, from `used`, updated now."""
        balloon = self.machine.fake_balloon
        total = balloon.actual_bytes() - 40 * MiB
        balloon.stats = {TOTAL: total, AVAILABLE: max(0, total - self.used), FREE: max(0, total - self.used),
                         CACHES: 0, MAJOR_FAULTS: major_faults, SWAP_IN: 0}  # fmt: skip
        balloon.last_update = int(time.time())

    def report_stats(self, available: int, free: int, age: float = 0) -> None:
        """Only total, available and free memory, updated `age` seconds ago."""
        balloon = self.machine.fake_balloon
        balloon.stats = {TOTAL: balloon.actual_bytes() - 40 * MiB, AVAILABLE: available, FREE: free}
        balloon.last_update = int(time.time() - age)

    @property
    def actual(self) -> int:
        return self.machine.fake_balloon.actual_bytes()

    def stop(self) -> None:
        self.server.stop()


class RecordedQemu:
    """A QMP server that answers as the recorded QEMU 7.2 did (one VM: 1G, balloon0, virtio-mem vm0, pm0)."""

    REPLIES = {
        "qmp_capabilities": "cont", "query-commands": "query-commands", "query-balloon": "query-balloon",
        "query-memory-size-summary": "query-memory-size-summary", "query-memory-devices": "query-memory-devices",
        "balloon": "balloon",
    }  # fmt: skip

    def __init__(self, path: str) -> None:
        self.path = path
        self.commands: list[tuple[str, dict[str, Any]]] = []
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(path)
        self.listener.listen(4)
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def reply_for(self, command: str, arguments: dict[str, Any]) -> dict[str, Any]:
        if command == "qom-list":
            name = "qom-list-peripheral" if arguments.get("path") == "/machine/peripheral" else "qom-get-no-such-path"
        elif command == "qom-get":
            prop = arguments.get("property")
            name = {"guest-stats": "qom-get-balloon-guest-stats",
                    "guest-stats-polling-interval": "qom-get-balloon-guest-stats-polling-interval"}.get(
                        str(prop), "qom-get-no-such-property")  # fmt: skip
        elif command == "qom-set":
            name = "qom-set-balloon-polling" if arguments.get("property") != "requested-size" else "qom-set-requested-size"
        else:
            name = self.REPLIES.get(command, "unknown-command")
        reply = json.loads((FIXTURES / f"{name}.json").read_text())
        reply.pop("id", None)
        return reply

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            with conn:
                conn.sendall((FIXTURES / "greeting.json").read_text().replace("\n", "").encode() + b"\n")
                buf = b""
                while True:
                    chunk = conn.recv(65536)
                    if not chunk:
                        break
                    buf += chunk
                    while b"\n" in buf:
                        line, buf = buf.split(b"\n", 1)
                        request = json.loads(line)
                        arguments = request.get("arguments", {})
                        self.commands.append((request["execute"], arguments))
                        reply = self.reply_for(request["execute"], arguments)
                        reply["id"] = request.get("id")
                        conn.sendall(json.dumps(reply).encode() + b"\n")

    def close(self) -> None:
        self.listener.close()
