"""Guest tests: each boots real Debian guests with memvisor on KVM.

They need hardware KVM, so on machines without it the whole folder runs inside one lab boot:
`memvisor lab --memory 6G -- .venv/bin/pytest tests/guest` (what scripts/test does).
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _kvm_is_hardware() -> bool:
    from memvisor.lab.detect import kvm_status

    return kvm_status().kind == "hardware"


GUEST_TESTS = Path(__file__).resolve().parent


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Every test in this folder is a guest test (marker `guest`); without hardware KVM they skip (and in CI or
    the lab, tests/conftest.py turns that skip into a failure). Tests from other folders collected in the same
    run (tests/unit) are left alone."""
    guest_items = [item for item in items if GUEST_TESTS in Path(str(item.path)).resolve().parents]
    for item in guest_items:
        if item.get_closest_marker("guest") is None:
            item.add_marker(pytest.mark.guest)
    if not guest_items or _kvm_is_hardware():
        return
    skip = pytest.mark.skip(reason="needs hardware KVM: run inside the lab (memvisor lab -- pytest tests/guest)")
    for item in guest_items:
        item.add_marker(skip)


def memvisor(*args: str, timeout: float = 240, check: bool = False) -> subprocess.CompletedProcess[str]:
    """Run the memvisor CLI (directly on this machine's KVM: --lab off) and capture its output."""
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")
    result = subprocess.run(
        [sys.executable, "-m", "memvisor", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if check and result.returncode != 0:
        raise AssertionError(f"memvisor {' '.join(args)} exited {result.returncode}: {result.stderr}")
    return result


@pytest.fixture
def run_guest(tmp_path: Path):  # type: ignore[no-untyped-def]
    """run_guest(CMD, memory=..., vcpus=..., *extra) -> CompletedProcess of `memvisor run --exec CMD`."""

    def run(command: str, *extra: str, memory: str = "512M", vcpus: int = 1, timeout: float = 240):  # type: ignore[no-untyped-def]
        console = tmp_path / "console.log"
        return memvisor(
            "run", "--lab", "off", "--memory", memory, "--vcpus", str(vcpus),
            "--console", str(console), *extra, "--exec", command, timeout=timeout,
        )  # fmt: skip

    return run
