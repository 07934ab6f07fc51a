"""Snapshots, memvisor against QEMU 7.2: save time, file size and allocated size, and memvisor's restore time.

Run inside the lab (or on a host with hardware KVM). Each scenario boots two guests, saves, restores and
cold-boots memvisor: about 5 minutes in the lab, so all four fit one lab hold, each in its own process and folder:
    rm -rf /tmp/snapbench && mkdir -p /tmp/snapbench && flock /work/lab.lock timeout 2700 \
      .venv/bin/memvisor lab --memory 6G --timeout 2600 --share /tmp/snapbench -- sh -c 'for s in idle \
        idle-hinted filled-freed balloon-512M; do mkdir -p /tmp/snapbench/$s; env PYTHONUNBUFFERED=1 \
        .venv/bin/python benchmarks/snapshot_vs_qemu.py --work /tmp/snapbench/$s --only $s \
        --json /tmp/snapbench/$s.json; done'

1G guests, each booted under both VMMs (same kernel, initramfs and command line as
benchmarks/memory_vs_qemu.py, whose VM classes this reuses), then saved:
- idle: booted, agent answering, nothing else;
- idle-hinted: the same with `free-page-hint=on` on memvisor's balloon and a hint round before `stop`, as
  `memvisor snapshot` runs it (QEMU's column is its plain idle guest: QEMU asks for hints only while a
  precopy runs, not for a guest stopped before `migrate`, and it drops free-page-hint without an iothread);
- filled-freed: the guest fills 600M of tmpfs and removes it, free page reporting on (waits until the host
  holds at least 400M less);
- balloon-512M: the balloon inflated to 512M (free page reporting off).

memvisor saves with `stop` + `migrate file:PATH` (sparse: only pages with data); QEMU 7.2 has no file: URI and
saves with `stop` + `migrate exec:cat > PATH`. For each: seconds from `migrate` to `completed`, the file's
size and its allocated size (st_blocks). memvisor's restore: seconds from starting `memvisor run --incoming
file:PATH` to the guest agent answering, against a cold boot of the same guest measured alone.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.memory_vs_qemu import (  # noqa: E402
    MemvisorVm,
    QemuVm,
    Vm,
    _connect_qmp,
    initrd_with_virtio_pci,
    log,
    wait_for,
)
from memvisor.guest.image import find_guest_image  # noqa: E402

MiB = 1 << 20
SCENARIOS = ("idle", "idle-hinted", "filled-freed", "balloon-512M")
PYTHON_FLAGS: list[str] = []  # --importtime


def save(vm: Vm, uri: str, path: Path) -> dict[str, Any]:
    vm.cmd("stop")
    started = time.monotonic()
    vm.cmd("migrate", uri=uri)
    info = wait_for(lambda: (i := vm.cmd("query-migrate")).get("status") in ("completed", "failed") and i,
                    600, f"{vm.name} to finish saving")  # fmt: skip
    seconds = time.monotonic() - started
    if info["status"] != "completed":
        raise RuntimeError(f"{vm.name}: the save failed: {info}")
    stat = path.stat()
    return {"save_seconds": round(seconds, 2), "file_mib": stat.st_size / MiB,
            "allocated_mib": stat.st_blocks * 512 / MiB}  # fmt: skip


def prepare(vm: Vm, scenario: str) -> None:
    if scenario == "filled-freed":
        before = vm.host_ram()
        vm.check("mkdir -p /mnt/f && mount -t tmpfs -o size=700M tmpfs /mnt/f")
        vm.check("dd if=/dev/urandom of=/mnt/f/fill bs=1M count=600 2>&1", 600)
        filled = vm.host_ram()
        vm.check("rm /mnt/f/fill && umount /mnt/f")
        wait_for(lambda: vm.host_ram() <= filled - 400 * MiB, 300, f"{vm.name}: free page reporting")
        log(f"{vm.name}: host RAM {before >> 20} -> {filled >> 20} -> {vm.host_ram() >> 20} MiB")
    elif scenario == "balloon-512M":
        vm.cmd("balloon", value=512 * MiB)
        wait_for(lambda: vm.cmd("query-balloon")["actual"] <= 516 * MiB, 300, f"{vm.name}: balloon 512M")
    else:
        time.sleep(5)


def guest_use(vm: Vm) -> dict[str, float]:
    """What the guest uses, in MiB: MemTotal - MemFree (what the guest's allocator handed out), and
    1024 - MemFree (the same plus what the kernel reserved at boot and MemTotal leaves out: its image, the
    struct page array, early allocations; the fairer yardstick for a file holding all of guest RAM)."""
    values = {}
    for line in vm.check("cat /proc/meminfo").splitlines():
        name, _, rest = line.partition(":")
        if rest.strip().endswith("kB"):
            values[name] = int(rest.split()[0]) * 1024
    return {"memtotal_mib": values["MemTotal"] / MiB, "used_mib": (values["MemTotal"] - values["MemFree"]) / MiB,
            "ram_minus_free_mib": 1024 - values["MemFree"] / MiB}  # fmt: skip


def hint_round(vm: Vm, timeout: float = 240.0) -> int:
    """memvisor's x-balloon-hint-start, wait for the guest's STOP, x-balloon-hint-stop (as `memvisor snapshot`;
    60-100 s under the lab's TCG for a 1G guest)."""
    vm.cmd("x-balloon-hint-start")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and vm.cmd("x-query-balloon-hints")[-1]["state"] not in ("stopped", "done"):
        time.sleep(0.2)
    return int(vm.cmd("x-balloon-hint-stop")["bytes"])


def memvisor_argv(work: Path, kernel: Path, initrd: Path, reporting: bool, sock: Path, hinting: bool = False) -> list[str]:
    balloon = "virtio-balloon,id=balloon0" + (",free-page-reporting=on" if reporting else "")
    balloon += ",free-page-hint=on" if hinting else ""  # the restore needs the devices of the saved guest
    return [sys.executable, *PYTHON_FLAGS, "-m", "memvisor", "run", "--lab", "off", "--memory", "1G", "--kernel", str(kernel),
            "--initrd", str(initrd), "--qmp", str(sock), "--console", str(work / "restore-console.log"),
            "--device", balloon]  # fmt: skip


def time_to_agent(argv: list[str], sock: Path, work: Path) -> float:
    """Seconds from starting memvisor with `argv` until its guest agent answers; then quit it."""
    started = time.monotonic()
    process = subprocess.Popen(argv, cwd=REPO, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                               stderr=(work / f"{sock.stem}-stderr.log").open("wb"))  # fmt: skip
    try:
        qmp = _connect_qmp(sock, process, 300)
        reply = qmp.cmd_obj({"execute": "x-guest-exec", "arguments": {"command": "true", "timeout": 300}})
        seconds = time.monotonic() - started
        if "error" in reply:
            raise RuntimeError(f"the guest agent did not answer: {reply['error']}")
        qmp.cmd_obj({"execute": "quit"})
        qmp.close()
        process.wait(60)
        return seconds
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def run_scenario(work: Path, kernel: Path, initrd: Path, scenario: str) -> dict[str, Any]:
    folder = work / scenario
    folder.mkdir(parents=True)
    reporting = scenario == "filled-freed"
    hinting = scenario == "idle-hinted"
    vms: dict[str, Vm] = {}
    errors: list[BaseException] = []

    def boot(cls: type[MemvisorVm] | type[QemuVm]) -> None:
        sub = folder / cls.name
        sub.mkdir()
        try:
            if cls is MemvisorVm:
                vms[cls.name] = MemvisorVm(sub, kernel, initrd, reporting=reporting, pmem=None, hinting=hinting)
            else:
                vms[cls.name] = cls(sub, kernel, initrd, reporting=reporting, pmem=None)
        except BaseException as err:
            errors.append(err)

    threads = [threading.Thread(target=boot, args=(cls,)) for cls in (MemvisorVm, QemuVm)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    result: dict[str, Any] = {}
    try:
        if errors:
            raise errors[0]
        for vm in vms.values():
            prepare(vm, scenario)
        use = {name: guest_use(vm) for name, vm in vms.items()}
        hinted = hint_round(vms["memvisor"]) if hinting else 0
        mv_file, qemu_file = folder / "memvisor.snap", folder / "qemu.mig"
        result["memvisor"] = save(vms["memvisor"], f"file:{mv_file}", mv_file) | use["memvisor"]
        result["memvisor"]["hinted_mib"] = hinted / MiB
        result["qemu"] = save(vms["qemu"], f"exec:cat > {qemu_file}", qemu_file) | use["qemu"]
    finally:
        for vm in vms.values():
            vm.close()
    sock = folder / "restore.sock"
    argv = memvisor_argv(folder, kernel, initrd, reporting, sock, hinting) + ["--incoming", f"file:{mv_file}"]
    result["memvisor"]["restore_seconds"] = round(time_to_agent(argv, sock, folder), 2)
    cold_sock = folder / "cold.sock"
    result["memvisor"]["cold_boot_seconds"] = round(
        time_to_agent(memvisor_argv(folder, kernel, initrd, reporting, cold_sock, hinting), cold_sock, folder), 2
    )
    log(f"{scenario}: {json.dumps(result)}")
    return result


def table(results: dict[str, dict[str, Any]]) -> str:
    lines = ["| guest | VMM | save s | file MiB | allocated MiB | guest used MiB (1G - MemFree) | "
             "allocated / used (/ 1G - MemFree) | restore s (cold boot s) |", "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for scenario, by_vmm in results.items():
        for vmm, r in by_vmm.items():
            restore = f"{r['restore_seconds']} ({r['cold_boot_seconds']})" if "restore_seconds" in r else "-"
            used, whole = r["used_mib"], r["ram_minus_free_mib"]
            lines.append(f"| {scenario} | {vmm} | {r['save_seconds']} | {r['file_mib']:.0f} | "
                         f"{r['allocated_mib']:.0f} | {used:.0f} ({whole:.0f}) | "
                         f"{r['allocated_mib'] / used:.2f} ({r['allocated_mib'] / whole:.2f}) | {restore} |")  # fmt: skip
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, required=True, help="an empty folder for the VMs and files")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--only", choices=SCENARIOS, action="append", help="run only these scenarios")
    parser.add_argument("--importtime", action="store_true",
                        help="run the restored and the cold-booted memvisor with python -X importtime (its stderr "
                             "log in the scenario's folder shows where start-up time goes)")  # fmt: skip
    args = parser.parse_args()
    if args.importtime:
        global PYTHON_FLAGS
        PYTHON_FLAGS = ["-X", "importtime"]
    image = find_guest_image("default")
    if image is None:
        print("no guest image: run `memvisor image build` first", file=sys.stderr)
        return 1
    args.work.mkdir(parents=True, exist_ok=True)
    initrd = initrd_with_virtio_pci(image, args.work / "initrd-pci.img")
    results = {scenario: run_scenario(args.work, image.kernel, initrd, scenario)
               for scenario in (args.only or SCENARIOS)}  # fmt: skip
    print(table(results))
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
