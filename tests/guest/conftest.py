"""Guest tests: each boots real Debian guests with memvisor on KVM.

They need hardware KVM, so on machines without it the whole folder runs inside one lab boot:
`scripts/guest-tests` (what scripts/test does: two tests at a time, then the `alone` ones, in one `memvisor lab`).
"""

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from tests.guest import progress

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


# Every guest test ends: pytest-timeout's thread method fires even while the test is blocked in C or in a
# subprocess (the signal method cannot), dumps every thread's stack and ends pytest. A test's own
# @pytest.mark.timeout(N) keeps its N; the default is pyproject's `timeout`.
TIMEOUT_METHOD = "thread"
# What a guest test's failure report shows of each guest console under its tmp_path.
CONSOLE_TAIL_LINES = 60


def pytest_itemcollected(item: pytest.Item) -> None:
    own = item.get_closest_marker("timeout")
    seconds = own.args[0] if own is not None and own.args else own.kwargs.get("timeout") if own else None
    if seconds is None:
        seconds = float(item.config.getini("timeout") or 600)
    item.add_marker(pytest.mark.timeout(seconds, method=TIMEOUT_METHOD), append=False)


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    """With MEMVISOR_GUEST_PROGRESS set (scripts/guest-tests), each phase's outcome is recorded as it ends: by
    pytest itself, or under pytest-xdist by the controller alone (its workers' reports all reach it)."""
    target = os.environ.get(progress.ENV)
    if target and report.nodeid.startswith("tests/guest/") and "PYTEST_XDIST_WORKER" not in os.environ:
        progress.record(Path(target), report.when, report.outcome, report.nodeid, report.duration)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):  # type: ignore[no-untyped-def]
    """A failed guest test's report carries the end of each guest console (and memvisor's stderr) it left."""
    report = yield
    if report.failed:
        stderrs = []
        for folder in _log_folders(getattr(item, "funcargs", {})):
            for path in sorted(folder.rglob("*")):
                if path.is_file() and (path.name.endswith("console.log") or path.name.endswith(".stderr")):
                    text = path.read_text(errors="replace")
                    lines = text.splitlines()[-CONSOLE_TAIL_LINES:]
                    report.sections.append((f"{path.name} ({path})", "\n".join(lines)))
                    if path.name.endswith(".stderr"):
                        stderrs.append(text)
        known = known_lab_reset(stderrs)
        if known is not None:
            report.outcome = "skipped"
            report.wasxfail = known
    return report


# Issue 13's guest reset, as it shows in the lab: a vCPU triple-faults while memory moves, yet the walk of the
# guest's page tables right after it (memvisor's reset report) finds every level present and no table page
# zeroed. It came only with the lab's KVM on the nested paging QEMU's TCG emulates; on shadow paging (kvm_amd
# npt=0, the lab's default since 2026-12-02, docs/LAB.md) the same stress ran clean. So a guest test that failed
# after exactly that reset is reported as an xfail naming it only in a lab that runs on the emulated nested paging
# (MEMVISOR_LAB_KVM_AMD=npt=1) and unless MEMVISOR_STRICT_RESETS=1: any other failure, a reset with a zeroed
# table, any reset on shadow paging and any reset on hardware KVM still fails. Every such xfail prints in the
# run's summary (-rx) with the reset line.
RESET_LINE = "the guest reset: triple fault"
TABLES_INTACT = "page walk: no table page on these walks reads all zeros"
NPT_PARAMETER = Path("/sys/module/kvm_amd/parameters/npt")


def lab_nested_paging(parameter: Path = NPT_PARAMETER) -> bool:
    """The lab's KVM runs its guests on (emulated) nested paging: kvm_amd's `npt` reads Y (or 1)."""
    try:
        return parameter.read_text().strip() in ("Y", "1")
    except OSError:
        return False


def known_lab_reset(stderrs: list[str], environ: dict[str, str] | os._Environ[str] = os.environ,
                    nested_paging: bool | None = None) -> str | None:  # fmt: skip
    """The xfail reason when memvisor's stderr shows issue 13's reset with intact tables, in a lab on the emulated
    nested paging (`nested_paging`, read from kvm_amd when None); else None."""
    if environ.get("MEMVISOR_IN_LAB") != "1" or environ.get("MEMVISOR_STRICT_RESETS") == "1":
        return None
    if not (lab_nested_paging() if nested_paging is None else nested_paging):
        return None
    for text in stderrs:
        resets = [line for line in text.splitlines() if RESET_LINE in line]
        if resets and TABLES_INTACT in text and "ALL ZEROS" not in text:
            return (f"issue 13, the guest reset of the lab's emulated nested paging (page tables intact): "
                    f"{resets[0].strip()[:300]}")  # fmt: skip
    return None


def _log_folders(funcargs: dict[str, object]) -> list[Path]:
    """The test's tmp_path, and the folder of every guest a fixture handed it (module-scoped guests live
    outside tmp_path): a guest is anything with a `workdir` folder."""
    folders: list[Path] = []
    for name, value in funcargs.items():
        candidate = value if name == "tmp_path" else getattr(value, "workdir", None)
        if isinstance(candidate, Path) and candidate.is_dir() and candidate not in folders:
            folders.append(candidate)
    return folders


def memvisor(
    *args: str, timeout: float = 240, check: bool = False, logs: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """Run the memvisor CLI (directly on this machine's KVM: --lab off) and capture its output.

    It always ends: past `timeout`, memvisor is asked for a dump of its threads (SIGUSR2), then killed with
    its whole process group, and the test fails with the end of its stderr (the dump) and of the console."""
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")
    with tempfile.TemporaryDirectory() as scratch:
        folder = logs or Path(scratch)
        out_path, err_path = folder / "memvisor.stdout", folder / "memvisor.stderr"
        with out_path.open("wb") as out, err_path.open("wb") as err:
            process = subprocess.Popen(
                [sys.executable, "-m", "memvisor", *args],
                cwd=REPO, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=err, start_new_session=True,
            )  # fmt: skip
            try:
                process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                _end_hung(process)
                stderr_tail = err_path.read_text(errors="replace")[-4000:]
                console = Path(args[args.index("--console") + 1]) if "--console" in args else None
                console_tail = console.read_text(errors="replace")[-2000:] if console and console.exists() else ""
                raise AssertionError(
                    f"memvisor {' '.join(args)} did not end within {timeout:.0f} s; killed it.\n"
                    f"its stderr (with its threads' stacks) ends:\n{stderr_tail}\nthe guest console ends:\n{console_tail}"
                ) from None
        result = subprocess.CompletedProcess(
            process.args, process.returncode, out_path.read_text(errors="replace"), err_path.read_text(errors="replace")
        )
    if check and result.returncode != 0:
        raise AssertionError(f"memvisor {' '.join(args)} exited {result.returncode}: {result.stderr}")
    return result


def _end_hung(process: subprocess.Popen[bytes]) -> None:
    """A memvisor past its time: its threads' stacks to its stderr (faulthandler on SIGUSR2), then SIGKILL."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(process.pid, signal.SIGUSR2)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=2)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    try:
        process.wait(timeout=15)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"memvisor (pid {process.pid}) is still there 15 s after SIGKILL: stuck in the kernel") from None


@pytest.fixture
def run_guest(tmp_path: Path):  # type: ignore[no-untyped-def]
    """run_guest(CMD, memory=..., vcpus=..., *extra) -> CompletedProcess of `memvisor run --exec CMD`."""

    def run(command: str, *extra: str, memory: str = "512M", vcpus: int = 1, timeout: float = 240):  # type: ignore[no-untyped-def]
        console = tmp_path / "console.log"
        return memvisor(
            "run", "--lab", "off", "--memory", memory, "--vcpus", str(vcpus),
            "--console", str(console), *extra, "--exec", command, timeout=timeout, logs=tmp_path,
        )  # fmt: skip

    return run
