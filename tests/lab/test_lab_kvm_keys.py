"""The lab survives guests being started and stopped many times: the CI hang of issue 13.

KVM flips its `preempt_notifier_key` static branch when the first VM is created and the last one destroyed, and
each flip rewrites live kernel text; under the lab's multi-threaded TCG that wedged the lab's kernel after 200-400
VM lifetimes (memvisor/lab/kvm_keys.py tells the story). The agent now holds one VM for the whole lab. This test
runs 1000 VM lifetimes with both lab CPUs busy context-switching: before the fix it ended in the lab's watchdog
(exit 125, "no heartbeat") every time it was tried.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [
    pytest.mark.guest,
    pytest.mark.skipif(os.environ.get("MEMVISOR_IN_LAB") == "1", reason="a lab does not nest inside a lab"),
    pytest.mark.skipif(shutil.which("qemu-system-x86_64") is None, reason="needs Debian's qemu-system-x86"),
]

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.timeout(600)
def test_a_thousand_vm_lifetimes_do_not_wedge_the_lab() -> None:
    command = [str(REPO / "scripts/stress-kvm-keys"), "--vms", "1000", "--lab-timeout", "400"]
    result = subprocess.run(
        [sys.executable, *command], cwd=REPO, capture_output=True, text=True, timeout=560, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1000 VMs in" in result.stdout
