"""Is /dev/kvm here hardware virtualization, a software imitation, or missing?

    status = kvm_status()
    if status.kind != "hardware": print(status.reason)

- "missing": no /dev/kvm, or it cannot be opened read-write;
- "software": the `kvm_pvm` module is loaded (a page-table based virtualizer without VMX/SVM; its
  capabilities look like real KVM's, so only the module gives it away: docs/LAB.md);
- "hardware": otherwise, including inside memvisor's lab (kvm_amd on QEMU TCG's emulated SVM, nested).

A calibration run (time a short guest loop) could be added later to catch other slow implementations.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

KvmKind = Literal["hardware", "software", "missing"]

LAB_ADVICE = "memvisor runs it inside its lab instead (QEMU TCG with nested SVM). Use --lab on to force, --lab off to refuse."


@dataclass(frozen=True)
class KvmStatus:
    kind: KvmKind
    reason: str

    @property
    def hardware(self) -> bool:
        return self.kind == "hardware"


def in_lab(environ: dict[str, str] | None = None) -> bool:
    """True inside memvisor's lab (its agent sets MEMVISOR_IN_LAB=1 for the command)."""
    return (os.environ if environ is None else environ).get("MEMVISOR_IN_LAB") == "1"


def kvm_status(
    device: Path = Path("/dev/kvm"),
    modules: Path = Path("/sys/module"),
    environ: dict[str, str] | None = None,
) -> KvmStatus:
    """Classify the KVM this process would use (the arguments exist for tests)."""
    if not device.exists():
        return KvmStatus(
            "missing",
            f"{device} does not exist: this machine offers no KVM; {LAB_ADVICE}",
        )
    try:
        os.close(os.open(device, os.O_RDWR | os.O_CLOEXEC))
    except OSError as error:
        return KvmStatus(
            "missing",
            f"{device} cannot be opened ({error.strerror}): fix its permissions (e.g. join the kvm group); {LAB_ADVICE}",
        )
    if in_lab(environ):
        return KvmStatus("hardware", f"{device} is kvm_amd inside memvisor's lab (nested SVM on QEMU TCG)")
    if (modules / "kvm_pvm").exists():
        return KvmStatus(
            "software",
            f"{device} here is a software virtualizer (kvm_pvm): a guest would run at instruction-emulation "
            f"speed; {LAB_ADVICE}",
        )
    for vendor in ("kvm_intel", "kvm_amd"):
        if (modules / vendor).exists():
            return KvmStatus("hardware", f"{device} is hardware virtualization ({vendor})")
    return KvmStatus("hardware", f"{device} opens and no software virtualizer is loaded")
