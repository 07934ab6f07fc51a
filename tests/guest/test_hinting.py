"""Issue 5, scenario 5: free page hinting with a real Linux guest, backed by KVM's dirty log.

A 1G guest with `free-page-hint=on`: `x-balloon-hint-start` turns dirty logging on, then offers a command id;
the Linux driver (virtio_balloon.c report_free_page_func) takes every free 4 MiB block it can get, hints it
and holds it, then answers STOP. `x-balloon-hint-stop` ends the cycle with STOP and DONE, the guest gets its
blocks back, and from then on each page the guest writes leaves the hinted set (read with
`x-query-balloon-hints`), which is what live migration will rely on to skip free pages safely.
"""

import time
from pathlib import Path

from tests.guest.vm import GuestVM, wait_until

MiB = 1 << 20
TOUCH = 200 * MiB  # what the guest writes after DONE, in a tmpfs file


def current_cycle(vm: GuestVM) -> dict[str, int | str]:
    cycles = vm.cmd("x-query-balloon-hints")
    assert cycles, "x-query-balloon-hints lists no cycle"
    return cycles[-1]  # type: ignore[no-any-return]


def test_hints_cover_free_memory_and_guest_writes_drop_out(tmp_path: Path) -> None:
    with GuestVM(tmp_path, memory="1G", devices=["virtio-balloon,id=balloon0,free-page-hint=on"]) as vm:
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
        assert ended is not None
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
        before = int(current_cycle(vm)["bytes"])

        vm.check("mkdir -p /mnt/hint && mount -t tmpfs -o size=400M tmpfs /mnt/hint")
        vm.check(f"dd if=/dev/zero of=/mnt/hint/touched bs=1M count={TOUCH // MiB} 2>/dev/null && sync")
        after_cycle = current_cycle(vm)
        after = int(after_cycle["bytes"])
        dropped = before - after
        print(f"after DONE: {before / MiB:.0f} MiB hinted; the guest wrote {TOUCH / MiB:.0f} MiB in tmpfs: "
              f"{dropped / MiB:.0f} MiB dropped out, {after / MiB:.0f} MiB still hinted")  # fmt: skip
        assert after_cycle["state"] == "done"
        assert dropped >= 0.5 * TOUCH  # most of the pages written were hinted ones, and they left the set
        assert after > 0  # pages the guest did not write keep their hints

        # Writing the same file again touches the same pages: nothing more to drop there.
        vm.check(f"dd if=/dev/zero of=/mnt/hint/touched bs=1M count={TOUCH // MiB} conv=notrunc 2>/dev/null")
        again = int(current_cycle(vm)["bytes"])
        assert after - again < 0.5 * TOUCH
        vm.check("rm /mnt/hint/touched && umount /mnt/hint")
