"""Live migration without KVM: the stream format, hostile streams, a whole pre-copy between two fake machines
over a socketpair, and the QMP job's shapes (memvisor/migration/)."""

import json
import socket
import threading
from typing import Any

import numpy as np
import pytest

from memvisor.control.machine_api import MachineError
from memvisor.errors import UsageError
from memvisor.migration import incoming, source, stream
from memvisor.migration.job import LiveMigrationJob
from memvisor.migration.source import MigrationParameters, PreCopy, SourceHooks
from memvisor.migration.stream import PAGE_SIZE, StreamError
from memvisor.migration.transport import parse_uri

from .migration_fakes import PAGES, RAM, VMEM_BLOCK, VMEM_GPA, FakeMachine, MiB, fake_machine_state, migrate


@pytest.fixture
def no_kvm_state(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_machine_state(monkeypatch)


def test_pages_zero_pages_and_pages_written_during_the_passes_arrive(no_kvm_state: None) -> None:
    src, dst = FakeMachine(), FakeMachine()
    for pfn in (0, 1, 7, 100, PAGES - 1):
        src.guest_write(pfn, bytes([pfn % 251 + 1]) * PAGE_SIZE)
    src.guest_write(50, bytes(PAGE_SIZE))  # backed, but zeros: a ZERO record

    def write_more(number: int) -> None:
        if number == 1:  # during pass 1: pages already sent change; the next pass sends them again
            src.guest_write(0, b"again" * 800)
            src.memory.write(3 * PAGE_SIZE, b"used ring entry")  # a VMM write, marked through GuestMemory

    stats = migrate(src, dst, params=MigrationParameters(max_bandwidth=0, downtime_limit_ms=0, max_passes=2),
                    between_passes=write_more)  # fmt: skip
    for pfn in range(PAGES):
        assert dst.page(pfn) == src.page(pfn), pfn
    assert dst.loaded == {"fake-state": 0}
    assert stats.passes >= 2  # pre-copy pass(es), then the final one
    assert stats.normal >= 6 and stats.duplicate >= 1
    assert stats.skipped["unbacked"] > PAGES - 10  # never-touched memory was not sent at all
    assert stats.transferred < 20 * PAGE_SIZE


def test_with_kvm_clear_dirty_log_a_page_written_before_its_chunk_is_read_goes_once(no_kvm_state: None) -> None:
    """KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2: each 64 MiB chunk's log is cleared right before the chunk is read, so a
    page written after the pass began but before its chunk was read is sent once, not again in the next pass."""
    src, dst = FakeMachine(manual_dirty_log=True), FakeMachine()
    src.guest_write(5, b"first" * 800)

    def write_again(number: int) -> None:
        if number == 1:  # pass 1 has begun (dirty logging is on), page 5 is not read yet
            src.guest_write(5, b"again" * 800)

    stats = migrate(src, dst, params=MigrationParameters(max_bandwidth=0, downtime_limit_ms=0, max_passes=5),
                    between_passes=write_again)  # fmt: skip
    assert dst.page(5) == src.page(5)
    assert stats.normal == 1  # with KVM's own re-protection at the end of pass 1: 2 (pass 1, then pass 2)
    assert src.vm.clears and src.vm.manual is False  # manual protection was used, and ended with the migration
    assert stats.dirty_log == "manual-protect"


def test_balloon_and_hinted_pages_are_not_sent_unless_written_after(no_kvm_state: None) -> None:
    src, dst = FakeMachine(), FakeMachine()
    for pfn in range(10, 20):
        src.guest_write(pfn, b"x" * PAGE_SIZE)
    inflated = np.zeros(PAGES, dtype=bool)
    inflated[10:12] = True
    hinted = np.zeros(PAGES, dtype=bool)
    hinted[12:15] = True
    hooks = SourceHooks(hinted=lambda: hinted, inflated=lambda: inflated)
    stats = migrate(src, dst, hooks)
    assert [dst.page(pfn) == src.page(pfn) for pfn in range(10, 20)] == [False] * 5 + [True] * 5
    assert all(dst.page(pfn) == bytes(PAGE_SIZE) for pfn in range(10, 15))
    assert stats.skipped["balloon"] == 2 and stats.skipped["free-page-hint"] == 3


def test_pages_given_back_during_the_migration_count_as_reported_in_later_passes(no_kvm_state: None) -> None:
    """Free page reporting discards pages (holes in the memfd) without a write the dirty log could see. In pass 1
    a hole is `unbacked` (never backed or given back before: the same to the source); afterwards a page the host
    no longer holds was written and given back since the previous pass: `reported`, sent as a ZERO marker (the
    destination gives it back too), whether the guest had written it since it was sent or not."""
    src, dst = FakeMachine(), FakeMachine()
    ram = src.memory.regions[0]
    for pfn in range(10, 20):
        src.guest_write(pfn, b"x" * PAGE_SIZE)

    def guest(number: int) -> None:
        if number == 1:  # pass 1 starts: page 40 is allocated, written and reported free again
            src.guest_write(40, b"w" * PAGE_SIZE)
            ram.discard(40 * PAGE_SIZE, PAGE_SIZE)
        if number == 2:  # page 10 (sent in pass 1, not written since) and page 11 are reported free
            ram.discard(10 * PAGE_SIZE, 2 * PAGE_SIZE)

    stats = migrate(src, dst, params=MigrationParameters(max_bandwidth=0, downtime_limit_ms=0, max_passes=3),
                    between_passes=guest)  # fmt: skip
    assert stats.skipped["reported"] == 3
    assert stats.duplicate == 0  # none of them counted as a zero page sent
    for pfn in range(64):
        assert dst.page(pfn) == src.page(pfn), pfn
    assert dst.memory.regions[0].view[10 * PAGE_SIZE] == 0


def test_a_destination_of_another_size_refuses_before_any_ram(no_kvm_state: None) -> None:
    src, dst = FakeMachine(), FakeMachine(memory=2 * MiB)
    src.guest_write(1, b"y" * PAGE_SIZE)
    with pytest.raises(Exception, match="CONFIG.memory: .*--memory 4M|refused"):
        migrate(src, dst)
    assert dst.page(1) == bytes(PAGE_SIZE)


def test_virtio_mem_blocks_keep_their_plugged_state_during_a_migration(no_kvm_state: None,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """The guest asks to plug (and unplug) blocks while a pass is under way, right after its PLUGGED record:
    the device answers BUSY (QEMU's virtio-mem does so while a migration runs), so the plugged bitmap the
    destination got is the one whose pages come; after the migration the device plugs again."""
    from memvisor.devices.mem import protocol
    from memvisor.devices.mem.protocol import RESPONSE, MemRequest
    from memvisor.virtio.testing import attach

    VIRTIO_MEM_REQ_PLUG, VIRTIO_MEM_REQ_UNPLUG = protocol.VIRTIO_MEM_REQ_PLUG, protocol.VIRTIO_MEM_REQ_UNPLUG
    VIRTIO_MEM_RESP_ACK, VIRTIO_MEM_RESP_BUSY = protocol.VIRTIO_MEM_RESP_ACK, protocol.VIRTIO_MEM_RESP_BUSY

    src, dst = FakeMachine(vmem=True), FakeMachine(vmem=True)
    device = src.devices[0].device
    driver = attach(device, src.memory)

    def request(kind: int, block: int) -> int:
        queue = driver.queues[0]
        head = queue.add_buffer([MemRequest(kind, VMEM_GPA + block * VMEM_BLOCK, 1).encode()], [RESPONSE.size])
        queue.kick()
        used = queue.get_used()
        assert [h for h, _, _ in used] == [head]
        return int(RESPONSE.unpack(used[0][2])[0])

    assert request(VIRTIO_MEM_REQ_PLUG, 0) == VIRTIO_MEM_RESP_ACK
    block_pfn = VMEM_GPA // PAGE_SIZE
    src.guest_write(block_pfn, b"plugged before" * 100)
    answers: list[int] = []
    send_plugged = PreCopy._send_plugged

    def plug_and_write_right_after(self: PreCopy) -> None:
        send_plugged(self)
        if not answers:  # the guest's driver plugs block 1 and writes it, then unplugs block 0, mid-pass
            answers.append(request(VIRTIO_MEM_REQ_PLUG, 1))
            if answers[0] == VIRTIO_MEM_RESP_ACK:
                src.guest_write(block_pfn + VMEM_BLOCK // PAGE_SIZE, b"plugged during" * 100)
            answers.append(request(VIRTIO_MEM_REQ_UNPLUG, 0))

    monkeypatch.setattr(PreCopy, "_send_plugged", plug_and_write_right_after)
    migrate(src, dst)
    assert answers == [VIRTIO_MEM_RESP_BUSY, VIRTIO_MEM_RESP_BUSY]
    target = dst.devices[0].device
    assert target.plugged_ranges() == device.plugged_ranges() == [(VMEM_GPA, VMEM_BLOCK)]
    assert dst.page(block_pfn) == src.page(block_pfn)
    assert request(VIRTIO_MEM_REQ_PLUG, 1) == VIRTIO_MEM_RESP_ACK  # the source's device is free again


def feed(records: list[bytes], header: bytes | None = None) -> socket.socket:
    a, b = socket.socketpair()
    a.sendall((stream.stream_header() if header is None else header) + b"".join(records))
    a.shutdown(socket.SHUT_WR)
    threading.Thread(target=lambda: (a.recv(1 << 16), a.close()), daemon=True).start()  # drains the ACKs
    return b


def config_of(machine: FakeMachine) -> bytes:
    return stream.json_record(stream.CONFIG, source.machine_config(machine))  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("header", "records", "error"),
    [
        (b"GARBAGE!" + bytes(8), [], "stream header.magic"),
        (stream.STREAM_HEADER.pack(stream.MAGIC, 2, 0), [], "stream header.version: 2"),
        (b"MVMIG", [], "stream header: the stream ended after 5 of 16 bytes"),
        (None, [stream.RECORD_HEADER.pack(99, 0)], "record.type: 99"),
        (None, [stream.encode_record(stream.END)], "END record came where CONFIG was expected"),
        (None, [stream.RECORD_HEADER.pack(stream.CONFIG, 1 << 30)], "CONFIG.length"),
        (None, ["CONFIG", stream.RECORD_HEADER.pack(stream.PAGES, 20) + bytes(5)], "PAGES record: the stream ended"),
        (None, ["CONFIG", stream.RECORD_HEADER.pack(stream.PAGES, 12 + PAGE_SIZE)
                + stream.RANGE.pack(RAM, 1) + bytes(PAGE_SIZE)], "PAGES.gpa: 0x400000"),  # fmt: skip
        (None, ["CONFIG", stream.RECORD_HEADER.pack(stream.PAGES, 12 + PAGE_SIZE)
                + stream.RANGE.pack(0x123, 1) + bytes(PAGE_SIZE)], "not page-aligned"),  # fmt: skip
        (None, ["CONFIG", stream.RECORD_HEADER.pack(stream.PAGES, 12 + PAGE_SIZE)
                + stream.RANGE.pack(0, 2) + bytes(PAGE_SIZE)], "PAGES.length"),  # fmt: skip
        (None, ["CONFIG", stream.zero_record(RAM - PAGE_SIZE, 2)], "ZERO.gpa"),
        (None, ["CONFIG", stream.encode_record(stream.STATE, b"{not json")], "STATE: the payload is not JSON"),
        (None, ["CONFIG", stream.json_record(stream.PLUGGED, {"devices": [{"id": "vm0"}]})],
         "PLUGGED.devices\\[0\\].id: 'vm0' is not a virtio-mem device"),  # fmt: skip
        (None, ["CONFIG"], "record header: the stream ended after 0 of 8 bytes"),
    ],
)
def test_a_hostile_or_broken_stream_is_refused_naming_the_field(header: bytes | None, records: list[Any],
                                                                  error: str) -> None:  # fmt: skip
    machine = FakeMachine()
    wire = [config_of(machine) if record == "CONFIG" else record for record in records]
    conn = feed(wire, header)
    with conn, pytest.raises(StreamError, match=error):
        incoming.receive_migration(machine, conn)  # type: ignore[arg-type]
    assert machine.loaded is None


def test_the_destination_refusal_reaches_the_source_as_an_ack() -> None:
    machine = FakeMachine()
    config = source.machine_config(machine) | {"vcpus": 4}  # type: ignore[arg-type]
    a, b = socket.socketpair()
    a.sendall(stream.stream_header() + stream.json_record(stream.CONFIG, config))
    with pytest.raises(StreamError, match="CONFIG.vcpus: the source has 4, .*--vcpus 4"):
        incoming.receive_migration(machine, b)  # type: ignore[arg-type]
    reply = stream.parse_json(stream.read_record(a, (stream.ACK,)))
    assert reply["ok"] is False and "--vcpus 4" in reply["error"]


def test_records_round_trip() -> None:
    a, b = socket.socketpair()
    data = bytes(range(256)) * 16
    a.sendall(stream.stream_header())
    a.sendall(b"".join(bytes(p) for p in stream.pages_record(0x5000, data)) + stream.zero_record(0x9000, 3)
              + stream.pass_record(7) + stream.json_record(stream.STATE, {"a": 1}) + stream.encode_record(stream.END))  # fmt: skip
    stream.read_stream_header(b)
    assert stream.parse_range(stream.read_record(b)) == (0x5000, 1, memoryview(data))
    gpa, count, _ = stream.parse_range(stream.read_record(b))
    assert (gpa, count) == (0x9000, 3)
    assert stream.parse_pass(stream.read_record(b)) == 7
    assert stream.parse_json(stream.read_record(b)) == {"a": 1}
    assert stream.read_record(b).type == stream.END


@pytest.mark.parametrize(
    ("uri", "kind", "address"),
    [("tcp:127.0.0.1:4444", "tcp", ("127.0.0.1", 4444)), ("tcp:[::1]:5", "tcp", ("::1", 5)),
     ("unix:/run/x.sock", "unix", "/run/x.sock")],  # fmt: skip
)
def test_uris(uri: str, kind: str, address: Any) -> None:
    endpoint = parse_uri(uri)
    assert (endpoint.kind, endpoint.address) == (kind, address)


@pytest.mark.parametrize("uri", ["tcp:host", "tcp:h:0", "unix:", "exec:cat", "rdma:x:1"])
def test_bad_uris_name_the_form(uri: str) -> None:
    with pytest.raises(UsageError, match="tcp:HOST:PORT|unix:PATH"):
        parse_uri(uri)


def test_the_job_reports_qemu_shapes_events_and_a_failure_leaves_the_source_running() -> None:
    events: list[tuple[str, Any]] = []
    job = LiveMigrationJob(lambda: lambda name, data: events.append((name, data)))
    assert job.info() == {}
    job.set_parameters({"downtime-limit": 50, "max-bandwidth": 1 << 20})
    assert job.parameters() == {"downtime-limit": 50, "max-bandwidth": 1 << 20, "x-max-passes": 30}
    with pytest.raises(MachineError, match="'speed' is not supported"):
        job.set_parameters({"speed": 1})
    resumed: list[bool] = []
    job.start(FakeMachine(), "unix:/nonexistent/dir/sock", SourceHooks(), True, lambda: resumed.append(True))
    job.wait(10)
    info = job.info()
    assert info["status"] == "failed" and "cannot connect to unix:/nonexistent/dir/sock" in info["error-desc"]
    assert resumed == [True]
    assert [e for e in events if e[0] == "MIGRATION"] == [("MIGRATION", {"status": "setup"}),
                                                          ("MIGRATION", {"status": "failed"})]  # fmt: skip
    assert set(info["ram"]) >= {"transferred", "remaining", "total", "duplicate", "normal", "normal-bytes",
                                "dirty-pages-rate", "mbps", "dirty-sync-count", "x-skipped-pages",
                                "x-dirty-log"}  # fmt: skip
    assert "total-time" in info and "setup-time" in info
    json.dumps(info)


def test_the_job_completes_and_cancel_stops_a_running_one(no_kvm_state: None, tmp_path: Any) -> None:
    src, dst = FakeMachine(), FakeMachine()
    src.guest_write(5, b"z" * PAGE_SIZE)
    path = str(tmp_path / "mig.sock")
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(path)
    listener.listen(1)
    job = LiveMigrationJob(lambda: None, MigrationParameters(max_bandwidth=0))
    resumed: list[bool] = []
    job.start(src, f"unix:{path}", SourceHooks(), True, lambda: resumed.append(True))
    conn, _ = listener.accept()
    with conn:
        incoming.receive_migration(dst, conn)  # type: ignore[arg-type]
    job.wait(10)
    info = job.info()
    assert info["status"] == "completed" and "downtime" in info and not resumed
    assert info["x-downtime-parts"]["destination"] <= info["downtime"]  # the stop phase by step (source.py)
    assert dst.page(5) == src.page(5)
    # cancel: the destination never answers the CONFIG
    job.set_parameters({"max-bandwidth": 0})
    job.start(src, f"unix:{path}", SourceHooks(), True, lambda: resumed.append(True))
    conn, _ = listener.accept()
    job.cancel()
    job.wait(10)
    conn.close()
    listener.close()
    assert job.info()["status"] == "cancelled" and resumed == [True]
    with pytest.raises(MachineError, match="Capability 'xbzrle' is not supported"):
        job.set_capabilities([{"capability": "xbzrle", "state": True}])


@pytest.mark.parametrize("cut_after", [stream.CONFIG, stream.PAGES, stream.STATE, stream.END],
                         ids=["setup", "ram-pass", "device-state", "before-final-ack"])  # fmt: skip
def test_a_connection_cut_fails_the_source_and_resumes_its_guest(no_kvm_state: None, tmp_path: Any,
                                                                 cut_after: int) -> None:  # fmt: skip
    """The destination goes away after receiving the first record of type `cut_after` (one test per phase)."""
    src = FakeMachine()
    for pfn in range(200):
        src.guest_write(pfn, bytes([pfn % 200 + 1]) * PAGE_SIZE)
    path = str(tmp_path / "mig.sock")
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(path)
    listener.listen(1)
    job = LiveMigrationJob(lambda: None, MigrationParameters(max_bandwidth=0))
    resumed: list[bool] = []
    job.start(src, f"unix:{path}", SourceHooks(), True, lambda: resumed.append(True))
    conn, _ = listener.accept()
    stream.read_stream_header(conn)
    stream.read_record(conn, (stream.CONFIG,))
    if cut_after != stream.CONFIG:
        conn.sendall(stream.json_record(stream.ACK, {"ok": True}))
        while stream.read_record(conn).type != cut_after:
            pass
    conn.close()
    listener.close()
    job.wait(10)
    info = job.info()
    assert info["status"] == "failed", info
    assert "destination" in info["error-desc"] and resumed == [True]


class _QmpMachine:
    def __init__(self) -> None:
        self.job = LiveMigrationJob(lambda: None)
        self.cancelled = 0

    def live_job(self) -> LiveMigrationJob:
        return self.job

    def migrate_cancel(self) -> None:
        self.cancelled += 1


def test_qmp_parameters_capabilities_and_cancel_reach_the_job() -> None:
    from memvisor.control.commands import Context, execute
    from memvisor.control.errors import QmpError

    machine = _QmpMachine()
    ctx = Context(machine, lambda name, data: None)  # type: ignore[arg-type]
    assert execute(ctx, "migrate-set-parameters", {"downtime-limit": 100, "max-bandwidth": 0}) == {}
    assert execute(ctx, "query-migrate-parameters", {}) == {"downtime-limit": 100, "max-bandwidth": 0,
                                                            "x-max-passes": 30}  # fmt: skip
    with pytest.raises(QmpError):
        execute(ctx, "migrate-set-parameters", {"downtime-limit": "fast"})
    assert {"capability": "events", "state": True} in execute(ctx, "query-migrate-capabilities", {})
    assert execute(ctx, "migrate-set-capabilities", {"capabilities": [{"capability": "zero-blocks", "state": True}]}) == {}
    assert execute(ctx, "migrate_cancel", {}) == {} and machine.cancelled == 1


def test_the_cli_progress_line_shows_pass_bytes_dirty_rate_and_downtime() -> None:
    from memvisor.migration.verb import progress_line

    line = progress_line({"status": "active", "expected-downtime": 40, "ram": {"dirty-sync-count": 3,
                          "transferred": 412 << 20, "total": 1 << 30, "dirty-pages-rate": 1200, "mbps": 850.12}})  # fmt: skip
    assert line == "active     pass 3  412M/1024M sent  dirty 1200 pages/s  expected downtime 40 ms  850.1 Mbps"


def test_hints_that_arrive_during_a_pass_still_spare_the_pages_not_sent_yet(
    no_kvm_state: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(source, "CHUNK_PAGES", 64)
    src, dst = FakeMachine(), FakeMachine()
    for pfn in range(0, 512):
        src.guest_write(pfn, b"h" * PAGE_SIZE)
    calls: list[int] = []

    def hinted() -> np.ndarray:  # the guest reports pages 256..511 free once the pass is under way
        calls.append(1)
        mask = np.zeros(PAGES, dtype=bool)
        if len(calls) > 2:
            mask[256:512] = True
        return mask

    stats = migrate(src, dst, SourceHooks(hinted=hinted))
    assert stats.skipped["free-page-hint"] == 256
    assert all(dst.page(pfn) == src.page(pfn) for pfn in range(256))
    assert dst.page(300) == bytes(PAGE_SIZE)


def test_migrate_incoming_with_a_stream_uri_answers_at_once_and_reports_a_failure() -> None:
    from memvisor.vmm.migration import IncomingSlot

    release = threading.Event()
    seen: list[str] = []

    def listen(uri: str) -> Any:  # the port opens at once; the receive runs in the slot's thread
        seen.append(uri)

        def receive() -> None:
            release.wait(5)
            raise StreamError("CONFIG.vcpus: the source has 2, this command line 1: start the destination with --vcpus 2")

        return receive

    slot = IncomingSlot(lambda path: None, listen)
    slot.migrate_incoming("tcp:127.0.0.1:4444")  # returns while the receive runs
    with pytest.raises(MachineError, match="already been started"):
        slot.migrate_incoming("tcp:127.0.0.1:4444")
    release.set()
    assert slot.wait(lambda: False) is True
    assert seen == ["tcp:127.0.0.1:4444"] and slot.error is not None and "--vcpus 2" in slot.error


def test_the_throttle_holds_the_vcpus_more_with_each_pass_that_does_not_converge() -> None:
    import time

    from memvisor.migration.throttle import Throttle

    class Machine:
        def __init__(self) -> None:
            self.paused, self.pauses, self.resumes = False, 0, 0

        def hold(self, timeout: float = 5.0) -> bool:
            self.paused, self.pauses = True, self.pauses + 1
            return True

        def release(self) -> None:
            self.paused, self.resumes = False, self.resumes + 1

    machine = Machine()
    throttle = Throttle(machine, period=0.01)
    throttle.after_pass(1, converged=False)
    assert throttle.percent == 0  # not before pass 4
    throttle.after_pass(4, converged=False)
    throttle.after_pass(5, converged=False)
    assert throttle.percent == 30
    deadline = time.monotonic() + 5  # two throttle cycles, however busy the machine
    while machine.pauses < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    throttle.stop()
    assert machine.pauses >= 2 and machine.resumes == machine.pauses and not machine.paused
    idle = Throttle(machine, enabled=False)  # a machine the user had paused is never released by a throttle
    idle.after_pass(9, converged=False)
    assert idle.percent == 0
    idle.stop()
