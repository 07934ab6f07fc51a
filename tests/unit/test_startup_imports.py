"""`memvisor run` imports only what booting needs: its start before the guest runs is part of every boot, and
inside the lab each module costs tens of milliseconds (BENCHMARKS.md, benchmarks/startup_to_kvm_run.py).

A fresh interpreter goes through `memvisor run --lab off` up to the point where the machine is built (the
session itself is replaced: no KVM is needed), then imports what building the machine imports, and lists
sys.modules. Whatever another verb, an opt-in feature or an error path needs must not be among them.
"""

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

PROBE = """
import sys
import memvisor.vmm.session as session
session.run_session = lambda config, args: 0  # everything before KVM: arguments, checks, the configuration
from memvisor.cli.main import main
status = main(["run", "--lab", "off", "--memory", "1G", "--kernel", sys.argv[1], "--initrd", sys.argv[2],
               "--console", sys.argv[3]])
import memvisor.vmm.devices  # what build_machine imports before it opens /dev/kvm
import memvisor.vmm.loader  # what Machine.load imports to boot (the probe's kernel is an ELF)
print(status, *sorted(sys.modules))  # (not json: the probe must not import what it looks for)
"""

# Not on the path of a plain boot: other verbs, opt-in features, error paths and the test/plot libraries.
NOT_AT_START = [
    "numpy", "matplotlib", "hypothesis", "qemu", "prometheus_client", "pytest",
    "memvisor.manager", "memvisor.guest", "memvisor.control", "memvisor.migration", "memvisor.lab",
    "memvisor.snapshot.writer", "memvisor.snapshot.fileformat", "memvisor.vmm.snapshot", "memvisor.vmm.control",
    "memvisor.vmm.migration", "memvisor.vmm.page_walk", "memvisor.devices.balloon", "memvisor.devices.mem",
    "memvisor.devices.pmem",
    "ctypes.util",  # find_library runs `ldconfig -p` in a subprocess
    "subprocess", "tempfile", "tomllib", "hashlib", "json", "socket", "http",
    "memvisor.vmm.event_loop", "selectors",  # the device-event thread: only with MEMVISOR_IOEVENTFD=1
    "memvisor.boot.bzimage",  # only for a bzImage kernel
    "shutil",  # argparse's default help width: memvisor.cli.main finds it without
    "logging",  # the device models log only when something fails (memvisor/lazylog.py)
]  # fmt: skip


def run_path_modules(tmp_path: Path) -> list[str]:
    kernel, initrd = tmp_path / "vmlinux", tmp_path / "initrd.img"
    kernel.write_bytes(b"\x7fELF")
    initrd.write_bytes(b"070701")
    result = subprocess.run(
        [sys.executable, "-c", PROBE, str(kernel), str(initrd), str(tmp_path / "console.log")],
        capture_output=True, text=True, cwd=REPO, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    status, *modules = result.stdout.splitlines()[-1].split()
    assert status == "0"
    return modules


def test_memvisor_run_imports_nothing_a_boot_does_not_need(tmp_path: Path) -> None:
    modules = run_path_modules(tmp_path)
    assert "memvisor.vmm.machine" in modules and "memvisor.vmm.loader" in modules  # the probe got that far
    loaded = [name for name in modules if any(name == bad or name.startswith(bad + ".") for bad in NOT_AT_START)]
    assert loaded == [], f"imported at the start of `memvisor run`: {loaded}; import them where they are used"


# What `memvisor run --incoming file:PATH` imports to restore a machine with a balloon (no virtio-mem, no
# hinting): the session, the devices, the snapshot code and the control server (--qmp). numpy costs seconds of
# start-up in the lab and only a save, virtio-mem or hinting needs it.
RESTORE_PROBE = """
import sys
import memvisor.vmm.session, memvisor.vmm.devices, memvisor.vmm.snapshot, memvisor.vmm.control
import memvisor.devices.balloon.state, memvisor.snapshot.fileformat, memvisor.snapshot.memory
from memvisor.devices.balloon.state import _pack, _unpack
assert _unpack(_pack(bytearray(100)), 100) == bytearray(100)  # an empty balloon's bitmaps round-trip
print(*sorted(sys.modules))
"""


def restore_path_modules() -> list[str]:
    result = subprocess.run([sys.executable, "-c", RESTORE_PROBE], capture_output=True, text=True,
                            cwd=REPO, timeout=60, check=False)  # fmt: skip
    assert result.returncode == 0, result.stderr
    return result.stdout.splitlines()[-1].split()


def test_restoring_a_balloon_machine_imports_no_numpy() -> None:
    modules = restore_path_modules()
    assert "memvisor.vmm.snapshot" in modules and "memvisor.snapshot.memory" in modules
    assert "numpy" not in modules, "imported numpy: import it inside the functions that need it"


# Booting, not restoring: the kernel loader and the ACPI tables (Machine.load). The QMP server's asyncio without
# ssl (memvisor/control/aio.py). The opt-in eventfd fast path's thread.
NOT_IN_RESTORE = [
    "memvisor.vmm.loader", "memvisor.boot.bzimage", "memvisor.boot.elf", "memvisor.boot.e820",
    "memvisor.boot.acpi.tables", "memvisor.vmm.event_loop", "ssl", "_ssl",
]  # fmt: skip


def test_restoring_imports_neither_the_boot_loader_nor_ssl() -> None:
    modules = restore_path_modules()
    assert "memvisor.vmm.control" in modules and "asyncio" in modules
    loaded = [name for name in NOT_IN_RESTORE if name in modules]
    assert loaded == [], f"imported on the restore path: {loaded}; import them where they are used"
