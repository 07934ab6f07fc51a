"""Issue 5, scenario 5: free page hinting with a real Linux guest, backed by KVM's dirty log.

A 1G guest with `free-page-hint=on`: `x-balloon-hint-start` turns dirty logging on, then offers a command id;
the Linux driver (virtio_balloon.c report_free_page_func) takes every free 4 MiB block it can get, hints it
and holds it, then answers STOP. `x-balloon-hint-stop` ends the cycle with STOP and DONE, the guest gets its
blocks back, and from then on each page the guest writes must leave the hinted set, which is what live
migration relies on to skip free pages safely: one written page left hinted is a page of lost data.

So the check is exact: the guest writes a tmpfs file, reads which page frames hold it (tests/guest/
pagemap_pfns.c, reading /proc/self/pagemap), and not one of those frames may remain in the hinted ranges
(`x-query-balloon-hinted-ranges`). It is not vacuous: most of the file's frames were hinted before the write.
"""

import base64
import bisect
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from tests.guest.vm import GuestVM, wait_until

pytestmark = pytest.mark.guest

MiB = 1 << 20
PAGE = 4096
TOUCH = 200 * MiB  # what the guest writes after DONE, in a tmpfs file
SOURCE = Path(__file__).with_name("pagemap_pfns.c")
TOOL = "/tmp/pagemap_pfns"


@pytest.fixture(scope="module")
def pagemap_tool(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    """pagemap_pfns.c built static without libc (the guest image has no libc to link against)."""
    gcc = shutil.which("gcc")
    if gcc is None:
        pytest.skip("gcc is missing (apt-get install gcc): it builds the guest's pagemap reader")
    binary = tmp_path_factory.mktemp("pagemap") / "pagemap_pfns"
    subprocess.run([gcc, "-static", "-nostdlib", "-Os", "-fno-stack-protector", "-fno-pie", "-no-pie",
                    "-fno-builtin", "-s", "-o", str(binary), str(SOURCE)], check=True, capture_output=True)  # fmt: skip
    return binary.read_bytes()


def install_tool(vm: GuestVM, tool: bytes) -> None:
    encoded = base64.b64encode(tool).decode()
    vm.check(f": > {TOOL}.b64")
    for start in range(0, len(encoded), 4000):
        vm.check(f"printf %s {encoded[start:start + 4000]} >> {TOOL}.b64")
    vm.check(f"base64 -d {TOOL}.b64 > {TOOL} && chmod +x {TOOL} && rm {TOOL}.b64")


def file_frames(vm: GuestVM, path: str) -> list[tuple[int, int]]:
    """(first PFN, count) runs of the page frames holding the guest file `path`, from its pagemap."""
    runs = []
    for line in vm.check(f"{TOOL} {path}", timeout=300).splitlines():
        assert not line.startswith("missing"), f"pages of {path} not present after writing them: {line}"
        first, count = (int(word, 16) for word in line.split())
        runs.append((first, count))
    return runs


def hinted_ranges(vm: GuestVM) -> list[tuple[int, int]]:
    """The still-hinted pages as sorted (first PFN, end PFN) intervals."""
    ranges = vm.cmd("x-query-balloon-hinted-ranges")
    return sorted((r["start"] // PAGE, (r["start"] + r["length"]) // PAGE) for r in ranges)


def frames_inside(frames: list[tuple[int, int]], ranges: list[tuple[int, int]]) -> list[int]:
    """Every PFN of `frames` that lies inside one of `ranges` (sorted, disjoint)."""
    starts = [start for start, _end in ranges]
    inside = []
    for first, count in frames:
        for pfn in range(first, first + count):
            index = bisect.bisect_right(starts, pfn) - 1
            if index >= 0 and pfn < ranges[index][1]:
                inside.append(pfn)
    return inside


def current_cycle(vm: GuestVM) -> dict[str, int | str]:
    cycles = vm.cmd("x-query-balloon-hints")
    assert cycles, "x-query-balloon-hints lists no cycle"
    return cycles[-1]  # type: ignore[no-any-return]


def test_hints_cover_free_memory_and_no_written_page_stays_hinted(tmp_path: Path, pagemap_tool: bytes) -> None:
    with GuestVM(tmp_path, memory="1G", devices=["virtio-balloon,id=balloon0,free-page-hint=on"]) as vm:
        install_tool(vm, pagemap_tool)
        vm.check("mkdir -p /mnt/hint && mount -t tmpfs -o size=400M tmpfs /mnt/hint")
        free_before = vm.meminfo()["MemFree"]
        began = time.monotonic()
        started = vm.cmd("x-balloon-hint-start")
        assert started["state"] in ("requested", "running")

        # The driver hints until it cannot allocate another free block, then sends its STOP id.
        def finished() -> dict[str, int | str] | None:
            cycle = current_cycle(vm)
            return cycle if cycle["state"] == "stopped" else None

        ended = wait_until(finished, timeout=180, interval=0.5, what="the guest to finish hinting (STOP)")
        cycle_seconds = time.monotonic() - began
        assert ended["cmd-id"] == started["cmd-id"]
        hinted = int(ended["bytes"])
        held = vm.meminfo()["MemFree"]  # the driver holds the hinted blocks until DONE
        print(f"\nhinting: {hinted / MiB:.0f} MiB hinted of {free_before / MiB:.0f} MiB MemFree "
              f"({hinted / free_before:.0%}) in {cycle_seconds:.1f} s; MemFree while held {held / MiB:.0f} MiB")  # fmt: skip
        assert hinted >= 0.7 * free_before
        assert held < free_before - 0.5 * hinted

        done = vm.cmd("x-balloon-hint-stop")
        assert (done["state"], done["cmd-id"]) == ("done", started["cmd-id"])
        # DONE gives the blocks back to the guest's allocator.
        wait_until(lambda: vm.meminfo()["MemFree"] > held + 0.5 * hinted, timeout=120, what="the guest to get its blocks back")
        before = hinted_ranges(vm)
        assert sum(end - start for start, end in before) * PAGE >= 0.5 * hinted  # the guest wrote little so far

        vm.check(f"dd if=/dev/zero of=/mnt/hint/touched bs=1M count={TOUCH // MiB} 2>/dev/null")
        frames = file_frames(vm, "/mnt/hint/touched")
        assert sum(count for _first, count in frames) == TOUCH // PAGE
        after = hinted_ranges(vm)
        were_hinted = frames_inside(frames, before)
        still_hinted = frames_inside(frames, after)
        after_bytes = sum(end - start for start, end in after) * PAGE
        print(f"after DONE the guest wrote {TOUCH / MiB:.0f} MiB in tmpfs: {len(were_hinted) * PAGE / MiB:.0f} MiB "
              f"of its frames had been hinted, {len(still_hinted)} pages still are; {after_bytes / MiB:.0f} MiB "
              "stay hinted")  # fmt: skip
        assert current_cycle(vm)["state"] == "done"
        assert still_hinted == [], (
            f"{len(still_hinted)} written pages are still hinted free (first PFNs {still_hinted[:8]}): "
            "a migration would skip them and lose their data"
        )
        # Not vacuous: the file was mostly written into memory that had been hinted.
        assert len(were_hinted) >= 0.5 * TOUCH // PAGE
        assert after_bytes > 0  # pages the guest did not write keep their hints

        # Written again in place: the same frames, still none hinted.
        vm.check(f"dd if=/dev/zero of=/mnt/hint/touched bs=1M count={TOUCH // MiB} conv=notrunc 2>/dev/null")
        assert frames_inside(file_frames(vm, "/mnt/hint/touched"), hinted_ranges(vm)) == []
        vm.check("rm /mnt/hint/touched && umount /mnt/hint")
