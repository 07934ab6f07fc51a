"""The sender's page path (memvisor/migration/source.py: run_bounds, send_pieces, Sender.send_region_pages):
the records it writes are the ones a run at a time gives, whatever the batching, and partial writes resume."""

from __future__ import annotations

import socket
import threading
from types import SimpleNamespace

import numpy as np
import pytest

from memvisor.memory.guest_memory import MemoryRegion
from memvisor.migration import stream
from memvisor.migration.pages import RegionReader
from memvisor.migration.source import (
    DowntimeEstimate,
    MigrationParameters,
    MigrationStats,
    Sender,
    count_runs,
    estimate_downtime,
    pass_bandwidth,
    run_bounds,
    send_pieces,
)
from memvisor.migration.stream import MAX_PAGES_PER_RECORD, PAGE_SIZE

GPA = 1 << 32


def naive_runs(pfns: list[int], limit: int) -> list[tuple[int, int]]:
    runs: list[list[int]] = []
    for pfn in pfns:
        if runs and runs[-1][0] + runs[-1][1] == pfn and runs[-1][1] < limit:
            runs[-1][1] += 1
        else:
            runs.append([pfn, 1])
    return [(first, count) for first, count in runs]


@pytest.mark.parametrize("seed", range(20))
def test_run_bounds_match_a_page_at_a_time(seed: int) -> None:
    rng = np.random.default_rng(seed)
    mask = rng.random(3000) < rng.choice([0.05, 0.5, 0.95, 1.0])
    pfns = np.flatnonzero(mask) + 17
    limit = int(rng.choice([1, 3, 256, 5000]))
    firsts, counts = run_bounds(pfns, limit)
    assert list(zip(firsts, counts, strict=True)) == naive_runs(pfns.tolist(), limit)


def test_run_bounds_of_nothing() -> None:
    assert run_bounds(np.array([], dtype=np.int64), 256) == ([], [])


def test_send_pieces_resumes_partial_writes() -> None:
    a, b = socket.socketpair()
    a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    pieces: list[bytes | memoryview] = [bytes([i % 251]) * (i * 997 % 70000) for i in range(300)]
    received = bytearray()

    def drain() -> None:
        while chunk := b.recv(65536):
            received.extend(chunk)

    reader = threading.Thread(target=drain)
    reader.start()
    send_pieces(a, [*pieces, memoryview(b"tail")])
    a.close()
    reader.join(10)
    b.close()
    assert bytes(received) == b"".join(pieces) + b"tail"


Record = tuple[int, int, int, bytes]  # type, gpa, count, page data


def expected_records(content: np.ndarray, wanted: np.ndarray, backed: np.ndarray) -> list[Record]:
    """(type, gpa, count, data) a run of wanted backed pages at a time, cut at 256 pages, then at zero/data."""
    records = []
    for first, count in naive_runs(np.flatnonzero(wanted & backed).tolist(), MAX_PAGES_PER_RECORD):
        page = first
        while page < first + count:
            data = bool(content[page].any())
            end = page
            while end < first + count and bool(content[end].any()) == data:
                end += 1
            kind = stream.PAGES if data else stream.ZERO
            payload = content[page:end].tobytes() if data else b""
            records.append((kind, GPA + page * PAGE_SIZE, end - page, payload))
            page = end
    return records


@pytest.mark.parametrize("seed", range(8))
def test_send_region_pages_writes_the_records_of_a_run_at_a_time(seed: int) -> None:
    rng = np.random.default_rng(seed)
    pages = 2048
    region = MemoryRegion.memfd(GPA, pages * PAGE_SIZE, "ram0")
    content = np.zeros((pages, PAGE_SIZE), dtype=np.uint8)
    data = rng.random(pages) < rng.choice([0.1, 0.5, 0.9])
    content[data] = rng.integers(0, 256, (int(data.sum()), PAGE_SIZE), dtype=np.uint8)
    content[data, 0] |= 1  # never all zero by chance
    region.view[:] = content.tobytes()
    wanted = rng.random(pages) < rng.choice([0.02, 0.3, 0.97, 1.0])
    backed = rng.random(pages) < 0.9
    a, b = socket.socketpair()
    stats = MigrationStats()
    sender = Sender(a, stats, MigrationParameters(max_bandwidth=0), threading.Event())
    reader = RegionReader(region)
    got: list[Record] = []

    def receive() -> None:
        while True:
            try:
                record = stream.read_record(b)
            except stream.StreamError:
                return
            gpa, count, payload = stream.parse_range(record)
            got.append((record.type, gpa, count, bytes(payload)))

    thread = threading.Thread(target=receive)
    thread.start()
    try:
        sender.send_region_pages(SimpleNamespace(gpa=GPA), reader, 0, wanted, backed, first_pass=True)  # type: ignore[arg-type]
    finally:
        a.close()
        thread.join(10)
        b.close()
        reader.close()
        region.close()
    expected = expected_records(content, wanted, backed)
    assert got == expected
    assert stats.normal == sum(r[2] for r in expected if r[0] == stream.PAGES)
    assert stats.duplicate == sum(r[2] for r in expected if r[0] == stream.ZERO)
    assert stats.skipped["unbacked"] == int(np.count_nonzero(wanted & ~backed))


def test_count_runs() -> None:
    assert count_runs(np.array([], dtype=bool)) == 0
    assert count_runs(np.array([0, 0, 0], dtype=bool)) == 0
    assert count_runs(np.array([1, 1, 0, 1, 0, 0, 1, 1], dtype=bool)) == 3
    assert count_runs(np.array([0, 1, 1, 1], dtype=bool)) == 1


def test_the_estimate_counts_the_fixed_part_and_a_cost_per_run() -> None:
    # 1000 scattered pages at 40 MB/s and 100 us a run, after a pass whose scans took 50 ms
    estimate = estimate_downtime(0.05, 40e6, 1000, 1000, 100e-6)
    assert estimate.fixed_ms == 50
    assert estimate.pages_ms == int((1000 * PAGE_SIZE / 40e6 + 0.1) * 1000)  # 102 + 100 ms
    assert estimate.total_ms == 50 + estimate.pages_ms
    assert estimate.fits(300) and not estimate.fits(200)
    # the same pages in one run cost their bytes only
    assert estimate_downtime(0.05, 40e6, 1000, 1, 100e-6).pages_ms == 102


def test_a_fixed_part_over_the_limit_leaves_the_pages_a_quarter_of_it() -> None:
    """Passes cannot shrink the fixed part: the migration still converges once the pages fit a quarter."""
    assert DowntimeEstimate(fixed_ms=400, pages_ms=75).fits(300)
    assert not DowntimeEstimate(fixed_ms=400, pages_ms=76).fits(300)
    assert DowntimeEstimate(fixed_ms=0, pages_ms=0).fits(0)
    assert not DowntimeEstimate(fixed_ms=0, pages_ms=1).fits(0)


def test_run_seconds_reads_and_builds_without_sending() -> None:
    region = MemoryRegion.memfd(GPA, 512 * PAGE_SIZE, "ram0")
    region.view[:PAGE_SIZE] = b"x" * PAGE_SIZE
    a, b = socket.socketpair()
    stats = MigrationStats()
    sender = Sender(a, stats, MigrationParameters(max_bandwidth=0), threading.Event())
    reader = RegionReader(region)
    try:
        assert 0 < sender.run_seconds(region, reader) < 0.1
        assert (stats.transferred, stats.normal, stats.duplicate) == (0, 0, 0)
        b.setblocking(False)
        with pytest.raises(BlockingIOError):
            b.recv(1)
    finally:
        reader.close()
        region.close()
        a.close()
        b.close()


@pytest.mark.parametrize("kind", ["memfd", "anonymous"])
def test_the_destination_writes_pages_into_the_file_or_the_mapping(
    kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import os

    from memvisor.migration import incoming

    writes: list[int] = []
    pwrite = os.pwrite

    def counted(fd: int, data: memoryview, offset: int) -> int:
        writes.append(offset)
        return pwrite(fd, data[:5000], offset)  # a short write: the rest goes in the next call

    monkeypatch.setattr(os, "pwrite", counted)
    if kind == "memfd":
        region = MemoryRegion.memfd(GPA, 16 * PAGE_SIZE, "ram0")
    else:
        region = MemoryRegion.anonymous(GPA, 16 * PAGE_SIZE, "ram0")
    try:
        data = bytes(range(256)) * (3 * PAGE_SIZE // 256)
        incoming.write_pages(region, 2 * PAGE_SIZE, memoryview(data), GPA + 2 * PAGE_SIZE)
        assert bytes(region.view[2 * PAGE_SIZE : 5 * PAGE_SIZE]) == data
        assert bytes(region.view[: 2 * PAGE_SIZE]) == bytes(2 * PAGE_SIZE)
        assert writes == ([2 * PAGE_SIZE + 5000 * i for i in range(3)] if kind == "memfd" else [])
    finally:
        region.close()


def test_the_page_bandwidth_of_a_scattered_pass_leaves_out_its_runs_cost() -> None:
    """A pass of 1000 single pages at 40 MB/s and 100 us a run took 102 + 100 ms: the same pages again are
    expected to take that long, not 100 ms more (the runs were counted twice and an idle guest did not converge)."""
    bytes_s, run_s, pages = 40e6, 100e-6, 1000
    paged = pages * PAGE_SIZE / bytes_s + pages * run_s
    bandwidth = pass_bandwidth(pages * PAGE_SIZE, paged, pages, run_s)
    assert bandwidth == pytest.approx(bytes_s)
    assert estimate_downtime(0.0, bandwidth, pages, pages, run_s).pages_ms == int(paged * 1000)
    # long runs: almost all of the time is the bytes'
    long_runs = pass_bandwidth(pages * PAGE_SIZE, 0.1, 1, run_s)
    assert long_runs == pytest.approx(pages * PAGE_SIZE / (0.1 - run_s))
    # a run cost timed too high at setup: a tenth of the pass's time is still the bytes'
    assert pass_bandwidth(pages * PAGE_SIZE, 0.1, pages, 1e-3) == pytest.approx(pages * PAGE_SIZE / 0.01)
