"""Issue 2: memvisor boots stock Debian kernels and runs commands in them."""

import re

import pytest

pytestmark = pytest.mark.guest


@pytest.mark.parametrize("vcpus", [1, 2])
def test_vcpus_are_visible(run_guest, vcpus: int) -> None:  # type: ignore[no-untyped-def]
    result = run_guest("nproc", vcpus=vcpus)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(vcpus)


@pytest.mark.parametrize(("memory", "mib"), [("256M", 256), ("2G", 2048)])
def test_memory_size_is_what_was_asked(run_guest, memory: str, mib: int) -> None:  # type: ignore[no-untyped-def]
    result = run_guest("grep MemTotal /proc/meminfo", memory=memory)
    assert result.returncode == 0, result.stderr
    total_kib = int(re.search(r"MemTotal:\s+(\d+) kB", result.stdout).group(1))  # type: ignore[union-attr]
    # MemTotal is RAM minus what the kernel keeps for itself: its image and early allocations (a few tens
    # of MiB) and its page structures (about 1.6 % of RAM).
    reserved_kib = 64 * 1024 + mib * 1024 * 0.02
    assert mib * 1024 - reserved_kib < total_kib <= mib * 1024


@pytest.mark.parametrize(("flavour", "suffix"), [("default", "-amd64"), ("cloud", "-cloud-amd64")])
def test_both_kernel_flavours_boot(run_guest, flavour: str, suffix: str) -> None:  # type: ignore[no-untyped-def]
    result = run_guest("uname -r", "--flavour", flavour)
    assert result.returncode == 0, result.stderr
    release = result.stdout.strip()
    assert release.startswith("6.1.") and release.endswith(suffix)


def test_exec_passes_status_and_streams_through(run_guest) -> None:  # type: ignore[no-untyped-def]
    result = run_guest("echo to-out; echo to-err >&2; exit 7")
    assert result.returncode == 7
    assert result.stdout == "to-out\n"
    assert "to-err\n" in result.stderr


def test_guest_poweroff_ends_memvisor_cleanly(run_guest) -> None:  # type: ignore[no-untyped-def]
    result = run_guest("poweroff -f")
    assert result.returncode == 0, result.stderr
    assert "powered off" in result.stderr


def test_guest_reboot_with_reboot_exit_ends_memvisor(run_guest, tmp_path) -> None:  # type: ignore[no-untyped-def]
    result = run_guest("reboot -f", "--reboot", "exit")
    assert result.returncode == 0, result.stderr
    assert "rebooted" in result.stderr


def test_guest_panic_is_reported_with_status_125(run_guest) -> None:  # type: ignore[no-untyped-def]
    result = run_guest("echo c > /proc/sysrq-trigger")
    assert result.returncode == 125
    assert "guest kernel panic" in result.stderr
    assert "Traceback" not in result.stderr


def test_agent_is_protected_from_the_oom_killer(run_guest) -> None:  # type: ignore[no-untyped-def]
    # The command runs as `/bin/sh -c CMD` exec'd from the agent's subshell, so its parent is the agent itself:
    # found by parentage, not by grepping command lines (which the command's own `sh -c` would match too).
    result = run_guest(
        "cat /proc/self/oom_score_adj; tr '\\0' ' ' < /proc/$PPID/cmdline; echo; cat /proc/$PPID/oom_score_adj"
    )
    assert result.returncode == 0, result.stderr
    own, parent, parent_score = result.stdout.splitlines()
    assert own == "0"  # the command can be chosen by the OOM killer
    assert parent.split() == ["/bin/sh", "/usr/lib/memvisor/agent.sh"], parent
    assert parent_score == "-1000"


def test_guest_reboot_restarts_the_guest_by_default(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from tests.guest.vm import GuestVM, wait_until

    with GuestVM(tmp_path, memory="512M") as vm:
        vm.check("echo before-reboot > /dev/kmsg")
        vm.cmd("system_reset")

        def uptime_after_restart() -> float | None:
            try:
                uptime = float(vm.check("cut -d' ' -f1 /proc/uptime", timeout=30))
            except AssertionError:
                return None  # the agent is not back yet
            return uptime if "before-reboot" not in vm.check("dmesg") else None

        assert wait_until(uptime_after_restart, timeout=240, interval=2, what="the guest to boot again")
        assert vm.console_text().count("memvisor-init: started") == 2
        assert vm.process.poll() is None  # memvisor kept running across the reboot


def test_the_image_boots_its_vmlinux_directly_and_its_bzimage_still_boots(run_guest) -> None:  # type: ignore[no-untyped-def]
    from memvisor.guest.image import ensure_guest_image

    image = ensure_guest_image("default")
    assert image.vmlinux is not None, "the guest image has no vmlinux beside its bzImage"
    # A direct boot enters the kernel at its link address (no decompressor, so no KASLR): _text is where the
    # vmlinux was linked. (Through the bzImage's decompressor KASLR moves it, to one of ~500 slots, so a check of
    # that would fail now and then.)
    direct = run_guest("grep -w _text /proc/kallsyms")
    assert direct.returncode == 0, direct.stderr
    assert direct.stdout.split()[0] == "ffffffff81000000", direct.stdout
    through = run_guest("uname -r", "--kernel", str(image.kernel), "--initrd", str(image.initrd))
    assert through.returncode == 0, through.stderr
    assert through.stdout.strip() == image.kernel_release
