"""benchmarks/memory_vs_qemu.py and benchmarks/backends.py without KVM: each VMM's command line on each
--memory-backend, memvisor's environment with and without ioeventfd, the VMs and their rotation, the host set up
for the backend and put back, and the table from new and old --json files."""

import json
from pathlib import Path
from typing import Any

import pytest

from benchmarks import backends, boot_vs_qemu
from benchmarks import memory_vs_qemu as mb

MiB, GiB = 1 << 20, 1 << 30


def _after(argv: list[str], flag: str) -> list[str]:
    return [argv[i + 1] for i, word in enumerate(argv[:-1]) if word == flag]


# --- command lines --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["4k", "thp", "hugetlb"])
def test_memvisor_runs_on_the_backend(tmp_path: Path, backend: str) -> None:
    argv = mb.memvisor_argv(
        tmp_path, Path("/k"), Path("/i"), reporting=False, pmem=tmp_path / "p.img", backend=backend
    )
    assert _after(argv, "--memory-backend") == [backend]
    assert _after(argv, "--memory") == ["1G"]
    assert "virtio-mem,id=vm0,max-size=2G" in _after(argv, "--device")  # block size: memvisor's default, 2M


@pytest.mark.parametrize(
    ("backend", "ram", "mem", "device"),
    [
        ("4k", "memory-backend-memfd,id=ram,size=1024M", "memory-backend-memfd,id=vm0-mem,size=2048M", ""),
        ("thp", "memory-backend-memfd,id=ram,size=1024M", "memory-backend-memfd,id=vm0-mem,size=2048M", ""),
        (
            "hugetlb",
            "memory-backend-memfd,id=ram,size=1024M,hugetlb=on,hugetlbsize=2M",
            "memory-backend-memfd,id=vm0-mem,size=2048M,hugetlb=on,hugetlbsize=2M,reserve=off",
            ",prealloc=on",
        ),
    ],
)
def test_qemu_puts_ram_and_virtio_mem_on_the_backend(tmp_path: Path, backend: str, ram: str, mem: str,
                                                     device: str) -> None:  # fmt: skip
    machine = mb.qemu_machine(tmp_path, Path("/k"), Path("/i"), reporting=False, pmem=tmp_path / "p.img",
                              backend=backend)  # fmt: skip
    argv = machine.argv()
    objects = _after(argv, "-object")
    assert ram in objects and mem in objects
    assert "virtio-mem-pci,id=vm0,memdev=vm0-mem,block-size=2M,requested-size=0" + device in _after(
        argv, "-device"
    )
    assert _after(argv, "-m") == ["1024M,maxmem=4096M"]


def test_qemu_reporting_guest_on_hugetlb_has_no_virtio_mem(tmp_path: Path) -> None:
    argv = mb.qemu_machine(
        tmp_path, Path("/k"), Path("/i"), reporting=True, pmem=None, backend="hugetlb"
    ).argv()
    assert _after(argv, "-object") == ["memory-backend-memfd,id=ram,size=1024M,hugetlb=on,hugetlbsize=2M"]


@pytest.mark.parametrize("backend", ["4k", "thp", "hugetlb"])
def test_boot_benchmark_gives_both_vmms_the_backend(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                    backend: str) -> None:  # fmt: skip
    monkeypatch.setattr(boot_vs_qemu, "BACKEND", backend)
    console = tmp_path / "c.log"
    assert _after(boot_vs_qemu.memvisor_argv(Path("/k"), Path("/i"), 512, console), "--memory-backend") == [
        backend
    ]
    (ram,) = _after(boot_vs_qemu.qemu_argv(Path("/k"), Path("/i"), 512, console), "-object")
    assert ram == "memory-backend-memfd,id=ram,size=512M" + backends.QEMU_RAM_OPTIONS[backend]


# --- ioeventfd --------------------------------------------------------------------------------------------------------


def test_memvisor_environment_says_ioeventfd_either_way() -> None:
    ours = {"PATH": "/bin", "MEMVISOR_IOEVENTFD": "1"}
    assert mb.memvisor_env(True, {"PATH": "/bin"}) == {"PATH": "/bin", "MEMVISOR_IOEVENTFD": "1"}
    assert mb.memvisor_env(False, ours) == {
        "PATH": "/bin",
        "MEMVISOR_IOEVENTFD": "0",
    }  # ours does not leak in
    assert ours["MEMVISOR_IOEVENTFD"] == "1"


def test_the_ioeventfd_vm_is_spawned_with_it_and_named_for_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[tuple[list[str], dict[str, Any]]] = []

    class Started(Exception):
        pass

    def popen(argv: list[str], **kwargs: Any) -> None:
        seen.append((argv, kwargs))
        raise Started

    monkeypatch.setattr(mb.subprocess, "Popen", popen)
    for ioeventfd in (True, False):
        with pytest.raises(Started):
            mb.MemvisorVm(tmp_path, Path("/k"), Path("/i"), reporting=True, pmem=None, backend="thp",
                          ioeventfd=ioeventfd)  # fmt: skip
    (on_argv, on), (off_argv, off) = seen
    assert on["env"]["MEMVISOR_IOEVENTFD"] == "1" and off["env"]["MEMVISOR_IOEVENTFD"] == "0"
    assert _after(on_argv, "--memory-backend") == _after(off_argv, "--memory-backend") == ["thp"]


def test_start_vm_picks_the_variant(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    made: list[tuple[str, dict[str, Any]]] = []
    monkeypatch.setattr(mb, "MemvisorVm", lambda *a, **kw: made.append(("memvisor", kw)))
    monkeypatch.setattr(mb, "QemuVm", lambda *a, **kw: made.append(("qemu", kw)))
    for name in ("memvisor", "memvisor-ioeventfd", "qemu"):
        mb.start_vm(name, tmp_path, Path("/k"), Path("/i"), reporting=False, pmem=None, backend="hugetlb")
    assert [(vmm, kw.get("ioeventfd"), kw["backend"]) for vmm, kw in made] == [
        ("memvisor", False, "hugetlb"), ("memvisor", True, "hugetlb"), ("qemu", None, "hugetlb")]  # fmt: skip


# --- the VMs of a run -----------------------------------------------------------------------------------------------


def test_memvisor_modes_name_the_vms_qemu_last() -> None:
    assert mb.variant_names("exit") == ["memvisor", "qemu"]
    assert mb.variant_names("exit,ioeventfd") == ["memvisor", "memvisor-ioeventfd", "qemu"]
    assert mb.variant_names(" ioeventfd ") == ["memvisor-ioeventfd", "qemu"]
    for wrong in ("", "exit,exit", "fast", "exit,qemu"):
        with pytest.raises(SystemExit, match="--memvisor-modes"):
            mb.variant_names(wrong)


def test_who_goes_first_rotates() -> None:
    a, b, c = (object() for _ in range(3))
    assert [mb.rotation([a, b], run) for run in range(3)] == [
        [a, b],
        [b, a],
        [a, b],
    ]  # as before: alternating
    assert [mb.rotation([a, b, c], run) for run in range(3)] == [[a, b, c], [b, c, a], [c, a, b]]
    assert mb.rotation([], 1) == []


# --- the host's pages -----------------------------------------------------------------------------------------------


def _host(tmp_path: Path, shmem: str, total: int, free: int, resv: int = 0) -> tuple[Path, Path]:
    control = tmp_path / "shmem_enabled"
    control.write_text(f"always within_size advise {shmem} deny force\n".replace(shmem, f"[{shmem}]", 1))
    pool = tmp_path / "hugepages-2048kB"
    pool.mkdir()
    for name, value in (("nr_hugepages", total), ("free_hugepages", free), ("resv_hugepages", resv)):
        (pool / name).write_text(f"{value}\n")
    return control, pool


def test_thp_sets_shmem_advise_and_puts_it_back(tmp_path: Path) -> None:
    control, pool = _host(tmp_path, "never", 0, 0)
    with backends.host_pages("thp", 3 * GiB, shmem_control=control, pool_folder=pool):
        assert control.read_text() == "advise"
        assert (pool / "nr_hugepages").read_text() == "0\n"  # the pool is left alone
    assert control.read_text() == "never"  # (the kernel's file would show it bracketed among the choices)


def test_4k_on_a_host_already_never_writes_nothing(tmp_path: Path) -> None:
    control, pool = _host(tmp_path, "never", 0, 0)
    control.chmod(0o444)
    before = control.read_text()
    with backends.host_pages("4k", GiB, shmem_control=control, pool_folder=pool):
        assert control.read_text() == before
    assert control.read_text() == before


def test_hugetlb_grows_the_pool_and_names_a_shortfall(tmp_path: Path) -> None:
    control, pool = _host(tmp_path, "advise", 10, 4)
    needed = backends.huge_pages_for(3 * GiB + GiB)
    assert needed == 2048 + backends.HUGE_PAGE_MARGIN
    with (
        pytest.raises(SystemExit, match=f"has 4 free 2 MiB pages after asking for {needed}"),
        backends.host_pages("hugetlb", 4 * GiB, shmem_control=control, pool_folder=pool),
    ):
        pytest.fail("went on without the pages")
    assert (pool / "nr_hugepages").read_text() == "10"  # put back
    assert control.read_text() == "advise"


def test_hugetlb_with_the_pages_runs_with_shmem_never(tmp_path: Path) -> None:
    control, pool = _host(tmp_path, "advise", 2100, 2100)
    with backends.host_pages("hugetlb", 4 * GiB, shmem_control=control, pool_folder=pool):
        assert control.read_text() == "never"
        assert (pool / "nr_hugepages").read_text() == "2100"  # enough already: nothing more asked
    assert control.read_text() == "advise"


def test_a_host_that_refuses_the_write_is_a_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    control, pool = _host(tmp_path, "never", 0, 0)

    def refused(path: Path, text: str) -> int:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(Path, "write_text", refused)  # as for a user who is not root
    with (
        pytest.raises(SystemExit, match="Permission denied .*run it as root"),
        backends.host_pages("thp", GiB, shmem_control=control, pool_folder=pool),
    ):
        pass


def test_backend_choices_match_memvisor() -> None:
    from memvisor.memory.backend import KINDS

    assert backends.BACKENDS == KINDS


# --- the table ------------------------------------------------------------------------------------------------------


def _results(inflate: float, exits: int) -> dict[str, list[Any]]:
    lists: dict[str, list[Any]] = {key: [] for key in mb.KEYS}
    lists["inflate"] = [inflate, inflate + 2, inflate + 4]
    lists["plug"] = [1.0]
    lists["inflate_exits"] = [{"mmio": exits}]
    return lists


def _lines(text: str) -> dict[str, list[str]]:
    rows = {}
    for line in text.splitlines():
        if line.startswith("| "):
            cells = [cell.strip() for cell in line.strip("|").split("|")]
            rows[cells[0]] = cells[1:]
    return rows


def test_the_table_has_a_column_and_a_ratio_per_memvisor_variant() -> None:
    results = {
        "memvisor": _results(10.0, 1000),
        "memvisor-ioeventfd": _results(6.0, 10),
        "qemu": _results(8.0, 0),
    }
    results["qemu"]["inflate_exits"] = [None]
    vmms = {name: mb.vmm_info(name, "thp") for name in results}
    text = mb.table(results, {"4k": [5.0], "1m": [1.0]}, vmms)
    rows = _lines(text)
    (heading,) = [key for key in rows if key.startswith("what")]
    assert "--memory-backend thp" in heading
    assert rows[heading] == [
        "memvisor",
        "memvisor ioeventfd",
        "QEMU 7.2",
        "memvisor/QEMU",
        "memvisor ioeventfd/QEMU",
    ]
    assert rows["balloon inflate 1G -> 512M (s)"] == [
        "12.00 (n=3)",
        "8.00 (n=3)",
        "10.00 (n=3)",
        "1.20",
        "0.80",
    ]
    assert rows["balloon deflate 512M -> 1G (s)"] == ["- (n=0)"] * 3 + ["-", "-"]
    assert rows["exits to Python per GiB inflated"][:3] == [f"{1000 * 2:.0f}", "20", "-"]
    assert rows["one call per 4 KiB page"] == ["5.000 (n=1)", "2.40", "1.60", "2.00"]
    assert "MEMVISOR_IOEVENTFD=1" in text
    first = text.split("\n\n")[0].splitlines()
    assert len(first) == 2 + 10 and all(line.count("|") == 7 for line in first)  # 6 cells a line, 10 rows


def test_the_json_records_backend_and_ioeventfd_per_vmm() -> None:
    assert {name: mb.vmm_info(name, "hugetlb") for name in mb.variant_names("exit,ioeventfd")} == {
        "memvisor": {"backend": "hugetlb", "ioeventfd": False},
        "memvisor-ioeventfd": {"backend": "hugetlb", "ioeventfd": True},
        "qemu": {"backend": "hugetlb", "ioeventfd": True},  # QEMU's own virtio-pci default
    }


def _write(path: Path, results: dict[str, Any], **extra: Any) -> Path:
    path.write_text(json.dumps({"runs": 3, "results": results, "raw": {"4k": [5.0], "1m": [1.0]}, **extra}))
    return path


def test_an_old_json_file_reads_as_4k_without_ioeventfd(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    old = {
        "memvisor": {"inflate": [13.0], "reporting": []},
        "qemu": {"inflate": [18.0]},
    }  # keys of the time only
    assert mb.print_merged([_write(tmp_path / "s4.json", old)]) == 0
    rows = _lines(capsys.readouterr().out)
    (heading,) = [key for key in rows if key.startswith("what")]
    assert "--memory-backend 4k" in heading
    assert rows[heading] == ["memvisor", "QEMU 7.2", "memvisor/QEMU"]
    assert rows["balloon inflate 1G -> 512M (s)"] == ["13.00 (n=1)", "18.00 (n=1)", "0.72"]
    _, _, vmms = mb.merge([("s4.json", json.loads((tmp_path / "s4.json").read_text()))])
    assert vmms == {
        "memvisor": {"backend": "4k", "ioeventfd": False},
        "qemu": {"backend": "4k", "ioeventfd": True},
    }


def test_main_and_reporting_files_merge_and_other_backends_do_not(tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    names = mb.variant_names("exit,ioeventfd")
    vmms = {name: mb.vmm_info(name, "thp") for name in names}
    main = _write(
        tmp_path / "main.json", {name: {"inflate": [4.0]} for name in names}, backend="thp", vmms=vmms
    )
    fpr = _write(
        tmp_path / "fpr.json", {name: {"reporting": [2.0]} for name in names}, backend="thp", vmms=vmms
    )
    assert mb.print_merged([main, fpr]) == 0
    rows = _lines(capsys.readouterr().out)
    assert rows["free page reporting: rm of 400M to host -300M (s)"] == ["2.00 (n=1)"] * 3 + ["1.00", "1.00"]
    assert rows["one call per 4 KiB page"][0] == "5.000 (n=2)"
    old = _write(tmp_path / "old.json", {"memvisor": {"inflate": [13.0]}, "qemu": {"inflate": [18.0]}})
    with pytest.raises(SystemExit, match="of one --memory-backend"):
        mb.print_merged([main, old])


def test_a_broken_table_file_is_named(tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text("{")
    with pytest.raises(SystemExit, match="bad.json"):
        mb.print_merged([bad])
